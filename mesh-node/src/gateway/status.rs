//! The Gateway API's status, written back to the API server: whether each Gateway of the
//! gateway's class is accepted and programmed, each listener's conditions and attached
//! routes, and for each route (HTTPRoute, TLSRoute, TCPRoute) that names such a Gateway, whether it attached and whether
//! its backends exist. Users (and `kubectl get gateway`) read these to see what the gateway
//! made of their resources.
//!
//! What a status should say is worked out from the state and the gateway's plan
//! ([`desired`]); [`keep_written`] patches an object's status only when that changes (a
//! condition keeps its `lastTransitionTime` while its status stays). An HTTPRoute's
//! `status.parents` entries of other controllers are kept.
use std::{collections::HashMap, sync::Arc, time::Duration};

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams},
};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::serve::{Plan, Server};
use crate::{
    inventory::ObjectKey,
    plan::gateway::{attachment, parent_attachments},
    routing::{
        ApiRoute,
        gateway_api::{ApiGatewaySpec, GROUP, KIND as API_GATEWAY_KIND, Listener, RouteKind},
    },
    state::{State, StateRx},
};

/// How the gateway names itself in routes' `status.parents[].controllerName`.
pub const CONTROLLER_NAME: &str = "nodemesh.io/gateway-controller";
/// How soon a status that could not be written is tried again.
const RETRY: Duration = Duration::from_secs(10);

/// The Gateway API kinds whose status the gateway writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StatusKind {
    Gateway,
    Route(RouteKind),
}

impl StatusKind {
    fn api_resource(self) -> ApiResource {
        let (kind, plural, version) = match self {
            StatusKind::Gateway => ("Gateway", "gateways", "v1"),
            StatusKind::Route(RouteKind::Http) => ("HTTPRoute", "httproutes", "v1"),
            StatusKind::Route(RouteKind::Tls) => ("TLSRoute", "tlsroutes", "v1alpha2"),
            StatusKind::Route(RouteKind::Tcp) => ("TCPRoute", "tcproutes", "v1alpha2"),
        };
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, version, kind), plural)
    }
}

/// The status one object should have. Conditions carry no `lastTransitionTime` yet.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    pub kind: StatusKind,
    pub key: ObjectKey,
    pub status: Value,
}

fn condition(kind: &str, ok: bool, reason: &str, message: impl Into<String>) -> Value {
    json!({
        "type": kind,
        "status": if ok { "True" } else { "False" },
        "reason": reason,
        "message": message.into(),
    })
}

/// The statuses of the Gateway API Gateways of `class` and of the HTTPRoutes that name them,
/// as the gateway in `namespace` serves them (`plan`).
pub fn desired(state: &State, plan: &Plan, class: &str, namespace: &str) -> Vec<Desired> {
    let ours: Vec<(&ObjectKey, &Arc<ApiGatewaySpec>)> = state
        .api_gateways
        .iter()
        .filter(|(_, spec)| spec.gateway_class_name == class)
        .collect();
    let mut statuses = Vec::new();
    for (key, spec) in &ours {
        let status = if key.namespace == namespace {
            served_gateway(state, plan, key, spec)
        } else {
            let why = format!(
                "this gateway serves the Gateways of its own namespace, {namespace}, where it \
                 reads their certificates"
            );
            json!({"conditions": [
                condition("Accepted", false, "Invalid", why.clone()),
                condition("Programmed", false, "Invalid", why),
            ]})
        };
        statuses.push(Desired {
            kind: StatusKind::Gateway,
            key: (*key).clone(),
            status,
        });
    }
    let mut parents: HashMap<&str, (&ApiRoute, Vec<Value>)> = HashMap::new();
    for (key, spec) in ours.iter().filter(|(key, _)| key.namespace == namespace) {
        for (route, parent, attached) in parent_attachments(state, key, &spec.listeners) {
            let accepted = match attached {
                Ok(_) => condition("Accepted", true, "Accepted", ""),
                Err(miss) => condition(
                    "Accepted",
                    false,
                    miss.reason(),
                    "no listener of the Gateway takes this route",
                ),
            };
            let missing: Vec<String> = route
                .backends()
                .into_iter()
                .filter(|service| !state.services.contains_key(*service))
                .map(ToString::to_string)
                .collect();
            let resolved = if missing.is_empty() {
                condition("ResolvedRefs", true, "ResolvedRefs", "")
            } else {
                condition(
                    "ResolvedRefs",
                    false,
                    "BackendNotFound",
                    format!("no such Service: {}", missing.join(", ")),
                )
            };
            let mut reference = json!({
                "group": GROUP, "kind": "Gateway",
                "namespace": key.namespace, "name": key.name,
            });
            if let Some(section) = &parent.section_name {
                reference["sectionName"] = json!(section);
            }
            if let Some(port) = parent.port {
                reference["port"] = json!(port);
            }
            parents
                .entry(route.origin.as_str())
                .or_insert_with(|| (route, Vec::new()))
                .1
                .push(json!({
                    "parentRef": reference,
                    "controllerName": CONTROLLER_NAME,
                    "conditions": [accepted, resolved],
                }));
        }
    }
    let mut routes: Vec<_> = parents.into_values().collect();
    routes.sort_by(|a, b| a.0.origin.cmp(&b.0.origin));
    for (route, parents) in routes {
        let name = route.origin.rsplit('/').next().unwrap_or_default();
        statuses.push(Desired {
            kind: StatusKind::Route(route.kind),
            key: ObjectKey::new(route.namespace.as_str(), name),
            status: json!({ "parents": parents }),
        });
    }
    statuses
}

/// A Gateway of the gateway's class in its namespace: each listener as the plan serves it.
fn served_gateway(state: &State, plan: &Plan, key: &ObjectKey, spec: &ApiGatewaySpec) -> Value {
    let mut listeners = Vec::new();
    let mut not_programmed = Vec::new();
    for listener in &spec.listeners {
        let name = format!("{API_GATEWAY_KIND} {key} listener {}", listener.name);
        let served = plan
            .ports
            .values()
            .flat_map(|port| &port.servers)
            .find(|server| server.plan.name() == name);
        let conditions = listener_conditions(plan, &name, served);
        if conditions[2]["status"] != "True" {
            not_programmed.push(listener.name.clone());
        }
        listeners.push(json!({
            "name": listener.name,
            "supportedKinds": listener
                .route_kinds()
                .iter()
                .map(|kind| json!({"group": GROUP, "kind": kind.name()}))
                .collect::<Vec<_>>(),
            "attachedRoutes": attached_count(state, key, listener),
            "conditions": conditions,
        }));
    }
    let programmed = if not_programmed.is_empty() {
        condition("Programmed", true, "Programmed", "")
    } else {
        condition(
            "Programmed",
            false,
            "Invalid",
            format!("listeners not served: {}", not_programmed.join(", ")),
        )
    };
    json!({
        "conditions": [condition("Accepted", true, "Accepted", ""), programmed],
        "listeners": listeners,
    })
}

/// Accepted, ResolvedRefs and Programmed of the listener `name` (`served` as planned).
fn listener_conditions(plan: &Plan, name: &str, served: Option<&Server>) -> [Value; 3] {
    let Some(server) = served else {
        let why = plan
            .problems
            .iter()
            .find(|p| p.starts_with(name))
            .cloned()
            .unwrap_or_else(|| "not served".into());
        return [
            condition("Accepted", false, "PortUnavailable", why.clone()),
            condition("ResolvedRefs", true, "ResolvedRefs", ""),
            condition("Programmed", false, "Invalid", why),
        ];
    };
    match &server.credential {
        Some(Err(error)) => [
            condition("Accepted", true, "Accepted", ""),
            condition(
                "ResolvedRefs",
                false,
                "InvalidCertificateRef",
                error.clone(),
            ),
            condition("Programmed", false, "Invalid", "no certificate to serve"),
        ],
        _ => [
            condition("Accepted", true, "Accepted", ""),
            condition("ResolvedRefs", true, "ResolvedRefs", ""),
            condition("Programmed", true, "Programmed", ""),
        ],
    }
}

/// How many routes attach to `listener`.
fn attached_count(state: &State, gateway: &ObjectKey, listener: &Listener) -> usize {
    state
        .routes
        .api_routes()
        .iter()
        .filter(|route| {
            route.parents.iter().any(|parent| {
                parent.gateway == *gateway
                    && attachment(state, route, parent, &gateway.namespace, listener).is_ok()
            })
        })
        .count()
}

/// The conditions' `lastTransitionTime`s: when each last changed status, as this process
/// saw it.
#[derive(Default)]
struct Transitions {
    since: HashMap<String, (String, Time)>,
}

impl Transitions {
    /// Stamps every condition in `status` (of `object`), keeping the time of those whose
    /// status did not change.
    fn stamp(&mut self, object: &str, status: &mut Value) {
        let mut stamp = |scope: &str, conditions: &mut Value| {
            for condition in conditions.as_array_mut().into_iter().flatten() {
                let id = format!("{object} {scope} {}", condition["type"]);
                let now = condition["status"].as_str().unwrap_or_default().to_owned();
                let entry = self
                    .since
                    .entry(id)
                    .or_insert_with(|| (now.clone(), Time(Timestamp::now())));
                if entry.0 != now {
                    *entry = (now, Time(Timestamp::now()));
                }
                condition["lastTransitionTime"] = json!(entry.1);
            }
        };
        stamp("", &mut status["conditions"]);
        for (field, name) in [("listeners", "name"), ("parents", "parentRef")] {
            for item in status[field].as_array_mut().into_iter().flatten() {
                let scope = format!("{field} {}", item[name]);
                stamp(&scope, &mut item["conditions"]);
            }
        }
    }
}

/// Writes the statuses [`desired`] says, whenever the state or the plan changes, until
/// `shutdown`; a status that could not be written is tried again.
pub async fn keep_written(
    client: Client,
    mut state: StateRx,
    mut plans: watch::Receiver<Arc<Plan>>,
    class: String,
    namespace: String,
    shutdown: CancellationToken,
) {
    let mut written: HashMap<(StatusKind, ObjectKey), Value> = HashMap::new();
    let mut transitions = Transitions::default();
    loop {
        let wanted = {
            let current = state.borrow_and_update().clone();
            let plan = plans.borrow_and_update().clone();
            desired(&current, &plan, &class, &namespace)
        };
        let mut failed = false;
        for Desired {
            kind,
            key,
            mut status,
        } in wanted
        {
            let id = (kind, key);
            let unchanged = written.get(&id).is_some_and(|before| {
                let mut stamped = status.clone();
                transitions.stamp(&format!("{kind:?} {}", id.1), &mut stamped);
                *before == stamped
            });
            if unchanged {
                continue;
            }
            transitions.stamp(&format!("{kind:?} {}", id.1), &mut status);
            match write(&client, kind, &id.1, status.clone()).await {
                Ok(()) => {
                    debug!(kind = ?kind, object = %id.1, "status written");
                    written.insert(id, status);
                }
                Err(error) => {
                    warn!(kind = ?kind, object = %id.1, %error, "status not written; trying again");
                    failed = true;
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = state.changed() => if changed.is_err() { return },
            changed = plans.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(RETRY), if failed => {}
        }
    }
}

/// Patches `status` into the object. A route's parents that other controllers wrote are
/// read first and kept.
async fn write(
    client: &Client,
    kind: StatusKind,
    key: &ObjectKey,
    mut status: Value,
) -> Result<(), kube::Error> {
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &key.namespace, &kind.api_resource());
    if let StatusKind::Route(_) = kind {
        let current = api.get_status(&key.name).await?;
        let others = current.data["status"]["parents"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|parent| parent["controllerName"] != CONTROLLER_NAME)
            .cloned();
        let mut parents: Vec<Value> = others.collect();
        parents.extend(status["parents"].as_array().cloned().unwrap_or_default());
        status["parents"] = Value::Array(parents);
    }
    api.patch_status(
        &key.name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests;
