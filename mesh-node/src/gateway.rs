//! `mesh-node gateway`: an ingress gateway. It runs in its own pod (a Deployment, outside
//! capture), listens on the ports of the Istio `Gateway` resources that select its pod,
//! terminates TLS with the certificates their servers name, and routes each request with
//! the VirtualServices bound to those Gateways (`spec.gateways`) — the node proxy's own
//! routing code — into the mesh over HBONE, as the gateway pod's SPIFFE identity.
pub mod credential;
pub mod resource;
pub mod route;
pub mod serve;
