//! The decisions the proxy makes, as pure functions of the state and the facts of a
//! connection or a request: which protocol, which route does what to a request, which
//! endpoints, admit or refuse. The proxy calls them and carries out what they decide;
//! `debug explain` calls the same functions, so it cannot tell a different story.
//!
//! Below the proxy and above the state, routing and policy: nothing here does I/O or
//! imports the proxy.
pub mod admission;
pub mod endpoints;
pub mod gateway;
pub mod path;
pub mod protocol;
pub mod request;
pub mod tunnel;

#[cfg(test)]
mod tests;
