//! `mesh-node gateway`: an ingress gateway. It runs in its own pod (a Deployment, outside
//! capture), listens on the ports of the Istio `Gateway` resources that select its pod,
//! terminates TLS with the certificates their servers name, and routes each request with
//! the VirtualServices bound to those Gateways (`spec.gateways`) — the node proxy's own
//! routing code — into the mesh over HBONE, as the gateway pod's SPIFFE identity.
//!
//! Its parts sit at the floors they belong to: the `Gateway` resource in
//! [`routing::gateway`](crate::routing::gateway), a request's route in
//! [`plan::gateway`](crate::plan::gateway); here are the certificates and the listeners.
pub mod credential;
pub mod serve;
pub mod status;
