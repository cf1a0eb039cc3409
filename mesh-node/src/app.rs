//! The agent's commands, wired from their parts: [`agent`] for `mesh-node run` (on every
//! node), [`ca`] for `mesh-node ca` (the cluster CA), [`uninstall`] for `mesh-node
//! uninstall` (capture off on a node).
pub mod agent;
pub mod ca;
mod source;
pub mod uninstall;

pub use agent::{Bound, build};
pub use ca::run_ca;
