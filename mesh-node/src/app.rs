//! The agent's two long-running commands, wired from their parts: [`agent`] for
//! `mesh-node run` (on every node) and [`ca`] for `mesh-node ca` (the cluster CA).
pub mod agent;
pub mod ca;
mod source;

pub use agent::{Bound, build};
pub use ca::run_ca;
