//! The agent's commands, wired from their parts: [`agent`] for `mesh-node run` (on every
//! node), [`ca`] for `mesh-node ca` (the cluster CA), [`gateway`] for `mesh-node gateway`
//! (an ingress gateway), [`uninstall`] for `mesh-node uninstall` (capture off on a node).
pub mod agent;
pub mod ca;
pub mod gateway;
mod source;
pub mod uninstall;

pub use agent::{Bound, build};
pub use ca::run_ca;
pub use gateway::build_gateway;
