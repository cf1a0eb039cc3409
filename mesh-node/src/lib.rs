//! Nodemesh node agent: eBPF capture of enrolled pods and the node-local proxy.
//!
//! Unsafe code is confined to the one socket option std and nix do not wrap (`netns`), the
//! allocator's trim (`memory`) and taking ownership of the descriptors nix hands over as raw
//! numbers (`holder`); raw aya handles stay inside `ebpf`.
#![deny(unsafe_code)]
pub mod accept;
pub mod access_log;
pub mod admin;
pub mod app;
pub mod ca_server;
pub mod cli;
pub mod cni;
pub mod config;
pub mod debug;
pub mod distributed_tracing;
pub mod ebpf;
pub mod egress;
pub mod endpoints;
pub mod enroll;
pub mod explain;
pub mod gateway;
pub mod holder;
pub mod identity;
pub mod inventory;
pub mod jwks;
pub mod memory;
pub mod metrics;
pub mod netns;
pub mod plan;
pub mod policy;
pub mod proxy;
pub mod readiness;
pub mod routing;
pub mod signal;
pub mod signer;
pub mod state;
