//! The admin API (loopback only): what the agent knows and does, as JSON, for
//! `mesh-node debug` and for people with curl.
use std::{sync::Arc, time::UNIX_EPOCH};

use http::Method;
use serde::Serialize;
use serde_json::{Value, json};

use crate::{
    egress::OutboundTrafficPolicy,
    explain::{self, Agent, ExplainError, ExplainRequest},
    identity::CertState,
    inventory::ObjectKey,
    policy::jwt::FetchedKeys,
    proxy::{Mtls, connections::Connections},
    readiness::Readiness,
    state::{State, StateRx},
};

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
    "/connections",
    "/gateways",
    "/explain?source=<pod>&destination=<service, pod or IP>&port=<port>&path=<path>&method=<method>&header=<name>:<value>",
    "POST /logging?level=<filter>",
    "/healthz/ready",
];

pub struct Admin {
    pub node: String,
    pub state: StateRx,
    pub mtls: Option<Arc<Mtls>>,
    pub readiness: Readiness,
    pub log: Option<LogControl>,
    /// The proxy's live connections.
    pub connections: Arc<Connections>,
    /// `--outbound-traffic-policy`, which `debug explain` tells about.
    pub outbound_traffic_policy: OutboundTrafficPolicy,
    /// The key sets fetched for RequestAuthentication, which `debug explain` validates with.
    pub jwt_keys: Arc<dyn FetchedKeys>,
    /// A gateway's own pod and listeners (`mesh-node gateway`); `None` in the agent.
    pub gateway: Option<GatewayAdmin>,
}

/// What the admin API of a gateway tells about: its own pod and what it serves.
pub struct GatewayAdmin {
    pub pod: crate::inventory::ObjectKey,
    pub plans: tokio::sync::watch::Receiver<Arc<crate::gateway::serve::Plan>>,
}

impl Admin {
    /// Answers `method` on `path` (with its query string): an HTTP status and a JSON body.
    /// What changes the agent takes POST only, so that a page the node's browser (or any
    /// link follower) loads cannot change it with a plain GET; everything else reads.
    pub fn answer(&self, method: &Method, path: &str, query: Option<&str>) -> (u16, Value) {
        let mutating = path == "/logging";
        let allowed = if mutating {
            method == Method::POST
        } else {
            method == Method::GET || method == Method::HEAD
        };
        if !allowed {
            let allow = if mutating { "POST" } else { "GET" };
            return (
                405,
                json!({ "error": format!("{method} {path}: method not allowed, use {allow}") }),
            );
        }
        let state = self.state.borrow().clone();
        match path {
            "/" => (200, json!({ "node": self.node, "paths": PATHS })),
            "/config_dump" => (200, self.config_dump(&state)),
            "/workloads" => (200, json!(state.workloads.values().collect::<Vec<_>>())),
            "/services" => (200, json!(state.services.values().collect::<Vec<_>>())),
            "/policies" => (200, json!(state.policies)),
            "/routes" => (200, self.routes(&state)),
            "/certs" => (200, self.certificates()),
            "/connections" => (200, json!(self.connections.snapshot())),
            "/gateways" => match &self.gateway {
                Some(gateway) => (200, json!(gateway.plans.borrow().summary(&state))),
                None => (
                    404,
                    json!({ "error": "this is a node agent, not a gateway (mesh-node gateway)" }),
                ),
            },
            "/explain" => self.explain(&state, query.unwrap_or_default()),
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

    /// The normalized state, each object with the `origin` it came from (a file for the
    /// file source; `null` when the source does not say), and every origin by object.
    /// Maps keyed by namespace/name become lists: JSON keys must be strings.
    fn config_dump(&self, state: &State) -> Value {
        let namespaces: Vec<Value> = state
            .namespaces
            .iter()
            .map(|(name, labels)| {
                json!({
                    "name": name,
                    "labels": labels,
                    "origin": state.origins.get(&format!("Namespace {name}")),
                })
            })
            .collect();
        let workloads: Vec<Value> = state
            .workloads
            .values()
            .map(|w| with_origin(state, "Pod", &w.key, w))
            .collect();
        let services: Vec<Value> = state
            .services
            .values()
            .map(|s| with_origin(state, "Service", &s.key, s))
            .collect();
        let policies = &state.policies;
        let route_origins: Vec<Value> = state
            .routes
            .summary()
            .into_iter()
            .map(|(service, resources, _)| {
                // `VirtualService ns/a` or, merged, `HTTPRoute ns/a, HTTPRoute ns/b`.
                let files: Vec<Option<&str>> = resources
                    .split(", ")
                    .map(|resource| state.origins.get(resource).map(|o| &**o))
                    .collect();
                json!({ "service": service, "resources": resources, "origins": files })
            })
            .collect();
        json!({
            "node": self.node,
            "namespaces": namespaces,
            "workloads": workloads,
            "services": services,
            "policies": {
                "root_namespace": policies.root_namespace,
                "peer_authentications": policies
                    .peer_authentications
                    .iter()
                    .map(|p| with_origin(state, "PeerAuthentication", &p.key, p))
                    .collect::<Vec<_>>(),
                "authorization_policies": policies
                    .authorization_policies
                    .iter()
                    .map(|p| with_origin(state, "AuthorizationPolicy", &p.key, p))
                    .collect::<Vec<_>>(),
            },
            "routes": state.routes,
            "route_origins": route_origins,
            "origins": state.origins,
            "rejected": state.rejections,
        })
    }

    /// `debug explain`: computed here, where the live state and the proxy's code are.
    fn explain(&self, state: &State, query: &str) -> (u16, Value) {
        let agent = Agent {
            node: &self.node,
            trust_domain: self.mtls.as_ref().map(|m| m.trust_domain.as_str()),
            outbound_traffic_policy: self.outbound_traffic_policy,
            jwt_keys: self.jwt_keys.as_ref(),
        };
        let explained = ExplainRequest::from_query(query).and_then(|request| match &self.gateway {
            None => explain::explain(state, agent, &request),
            Some(gateway) => {
                let plan = gateway.plans.borrow().clone();
                let ports: explain::GatewayPorts = plan
                    .ports
                    .iter()
                    .map(|(port, served)| {
                        let servers = served.servers.iter().map(|s| s.plan.clone()).collect();
                        (*port, servers)
                    })
                    .collect();
                explain::explain_at_gateway(state, agent, &request, &gateway.pod, &ports)
            }
        });
        match explained {
            Ok(explanation) => (200, json!(explanation)),
            Err(error @ ExplainError::UnknownSource(_)) => {
                (404, json!({ "error": error.to_string() }))
            }
            Err(error) => (400, json!({ "error": error.to_string() })),
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
                json!({ "error": "use POST /logging?level=<filter>, e.g. info,mesh_node=debug" }),
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

/// `item` as JSON with the `origin` of the object `kind` `key`.
fn with_origin(state: &State, kind: &str, key: &ObjectKey, item: &impl Serialize) -> Value {
    let mut value = json!(item);
    if let Value::Object(fields) = &mut value {
        fields.insert("origin".into(), json!(state.origin_of(kind, key)));
    }
    value
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, net::SocketAddr, time::SystemTime};

    use super::*;
    use crate::{inventory::Workload, policy::jwt::NothingFetched, proxy::connections::Connection};

    fn admin(state: State) -> Admin {
        let (_, rx) = tokio::sync::watch::channel(Arc::new(state));
        Admin {
            node: "node0".into(),
            state: rx,
            mtls: None,
            readiness: Readiness::default(),
            log: None,
            connections: Arc::default(),
            outbound_traffic_policy: OutboundTrafficPolicy::AllowAny,
            jwt_keys: Arc::new(NothingFetched),
            gateway: None,
        }
    }

    fn state_with_origins() -> State {
        let mut state = State::with_workloads([Workload::for_test("node0", "shop", "web", &[])]);
        state.origins = Arc::new(BTreeMap::from([(
            "Pod shop/web-0".to_string(),
            "/etc/mesh/pods.yaml".into(),
        )]));
        state
    }

    #[test]
    fn the_config_dump_says_where_each_object_came_from() {
        let (status, dump) = admin(state_with_origins()).answer(&Method::GET, "/config_dump", None);
        assert_eq!(status, 200);
        assert_eq!(dump["workloads"][0]["key"]["name"], "web-0");
        assert_eq!(dump["workloads"][0]["origin"], "/etc/mesh/pods.yaml");
        assert_eq!(dump["origins"]["Pod shop/web-0"], "/etc/mesh/pods.yaml");
    }

    #[test]
    fn connections_are_listed_while_they_are_open() {
        let admin = admin(State::default());
        let client: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let open = admin.connections.register(Connection {
            direction: "outbound",
            pod: ObjectKey::new("shop", "web-0"),
            client,
            original_destination: Some("10.96.0.1:80".parse().unwrap()),
            upstream: Some("Service shop/web".into()),
            opened_at: SystemTime::now(),
        });
        let (status, rows) = admin.answer(&Method::GET, "/connections", None);
        assert_eq!(status, 200);
        assert_eq!(rows[0]["original_destination"], "10.96.0.1:80");
        drop(open);
        assert_eq!(
            admin.answer(&Method::GET, "/connections", None).1,
            json!([])
        );
    }

    #[test]
    fn explain_answers_from_the_live_state_and_refuses_bad_questions() {
        let admin = admin(state_with_origins());
        let (status, answer) = admin.answer(
            &Method::GET,
            "/explain",
            Some("source=shop/web-0&destination=192.0.2.1&port=443"),
        );
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["verdict"]["verdict"], "ALLOWED");
        assert_eq!(answer["destination"], "outside the mesh");
        let (status, answer) = admin.answer(
            &Method::GET,
            "/explain",
            Some("source=shop/nobody&destination=x"),
        );
        assert_eq!(status, 404, "{answer}");
        let (status, answer) = admin.answer(&Method::GET, "/explain", None);
        assert_eq!(status, 400);
        assert!(answer["error"].as_str().unwrap().contains("missing source"));
    }

    #[test]
    fn the_log_level_changes_by_post_only_and_reads_refuse_post() {
        let changed = Arc::new(parking_lot::Mutex::new(Vec::<String>::new()));
        let mut admin = admin(State::default());
        let record = changed.clone();
        admin.log = Some(Arc::new(move |level: &str| {
            record.lock().push(level.to_string());
            Ok(())
        }));
        let (status, answer) = admin.answer(&Method::GET, "/logging", Some("level=trace"));
        assert_eq!(status, 405, "a GET must not change the log level: {answer}");
        assert!(changed.lock().is_empty(), "the GET changed the level");
        let (status, answer) = admin.answer(&Method::POST, "/logging", Some("level=debug"));
        assert_eq!(status, 200, "{answer}");
        assert_eq!(*changed.lock(), ["debug"]);
        let (status, _) = admin.answer(&Method::POST, "/config_dump", None);
        assert_eq!(status, 405, "reads answer GET only");
    }
}
