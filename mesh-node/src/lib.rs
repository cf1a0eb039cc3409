//! Nodemesh node agent: eBPF capture of enrolled pods and the node-local proxy.
pub mod app;
pub mod cli;
pub mod config;
pub mod ebpf;
pub mod enroll;
pub mod metrics;
pub mod netns;
pub mod proxy;
pub mod readiness;
pub mod signal;
pub mod state;
