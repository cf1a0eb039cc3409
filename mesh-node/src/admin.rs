//! The admin API (loopback only): what the agent knows and does, as JSON, for
//! `mesh-node debug` and for people with curl.
use std::{sync::Arc, time::UNIX_EPOCH};

use serde_json::{Value, json};

use crate::{identity::CertState, proxy::Mtls, readiness::Readiness, state::StateRx};

/// Changes the log filter at run time (`RUST_LOG` syntax); `Err` says why not.
pub type LogControl = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// The paths the admin API answers, for its index page.
pub const PATHS: &[&str] = &[
    "/config_dump",
    "/workloads",
    "/services",
    "/policies",
    "/routes",
    "/certs",
    "/logging?level=<filter>",
    "/healthz/ready",
];

pub struct Admin {
    pub node: String,
    pub state: StateRx,
    pub mtls: Option<Arc<Mtls>>,
    pub readiness: Readiness,
    pub log: Option<LogControl>,
}

impl Admin {
    /// Answers `path` (with its query string): an HTTP status and a JSON body.
    pub fn answer(&self, path: &str, query: Option<&str>) -> (u16, Value) {
        let state = self.state.borrow().clone();
        match path {
            "/" => (200, json!({ "node": self.node, "paths": PATHS })),
            // Maps keyed by namespace/name become lists: JSON keys must be strings.
            "/config_dump" => (
                200,
                json!({
                    "node": self.node,
                    "namespaces": state.namespaces,
                    "workloads": state.workloads.values().collect::<Vec<_>>(),
                    "services": state.services.values().collect::<Vec<_>>(),
                    "policies": state.policies,
                    "routes": state.routes,
                    "rejected": state.rejections,
                }),
            ),
            "/workloads" => (200, json!(state.workloads.values().collect::<Vec<_>>())),
            "/services" => (200, json!(state.services.values().collect::<Vec<_>>())),
            "/policies" => (200, json!(state.policies)),
            "/routes" => (200, self.routes(&state)),
            "/certs" => (200, self.certificates()),
            "/healthz/ready" => {
                let pending = self.readiness.pending();
                let status = if pending.is_empty() { 200 } else { 503 };
                (status, json!({ "pending": pending }))
            }
            "/logging" => self.set_log_level(query),
            _ => (
                404,
                json!({ "error": format!("no such path {path}"), "paths": PATHS }),
            ),
        }
    }

    /// One row per Service with L7 or TCP routes or a DestinationRule: which resource
    /// supplies them and how many rules (or subsets) it has.
    fn routes(&self, state: &crate::state::State) -> Value {
        let rows: Vec<Value> = state
            .routes
            .summary()
            .into_iter()
            .map(|(service, origin, rules)| {
                json!({ "service": service, "origin": origin, "rules": rules })
            })
            .collect();
        json!(rows)
    }

    fn certificates(&self) -> Value {
        let Some(mtls) = &self.mtls else {
            return json!([]);
        };
        let rows: Vec<Value> = mtls
            .manager
            .snapshot()
            .into_iter()
            .map(|(identity, state)| match state {
                CertState::Ready(cert) => json!({
                    "identity": identity.to_string(),
                    "state": "ready",
                    "not_after_unix": cert
                        .not_after
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs()),
                    "chain_length": cert.chain.len(),
                }),
                CertState::Pending => {
                    json!({ "identity": identity.to_string(), "state": "pending" })
                }
                CertState::Unavailable(error) => json!({
                    "identity": identity.to_string(),
                    "state": "unavailable",
                    "error": error.to_string(),
                }),
            })
            .collect();
        json!(rows)
    }

    fn set_log_level(&self, query: Option<&str>) -> (u16, Value) {
        let Some(level) = query.and_then(|q| {
            q.split('&')
                .find_map(|pair| pair.strip_prefix("level="))
                .map(str::to_string)
        }) else {
            return (
                400,
                json!({ "error": "use /logging?level=<filter>, e.g. info,mesh_node=debug" }),
            );
        };
        match &self.log {
            None => (
                501,
                json!({ "error": "this agent cannot change its log level" }),
            ),
            Some(control) => match control(&level) {
                Ok(()) => (200, json!({ "level": level })),
                Err(error) => (400, json!({ "error": error })),
            },
        }
    }
}
