//! Config sources and the one translation from Kubernetes objects to [`State`].
//!
//! Every source (a directory of YAML, the API server) classifies each object through
//! [`document`], keeps the last good version of what it had to refuse with [`LastGood`], and
//! publishes through [`publish`]: so a YAML file and the API server give the same state for
//! the same objects, and refuse the same bad ones.
mod document;
mod last_good;
mod translate;

pub mod file;
pub mod kube;

use std::{collections::BTreeMap, sync::Arc};

pub use last_good::LastGood;
use tracing::{info, warn};
pub use translate::{Object, TranslateError, routing_resources, translate, validate};

use crate::{
    inventory::Rejection,
    metrics::NodeMetrics,
    state::{State, StateTx},
};

/// Translates `objects` and publishes the state; logs what was refused. `origins` says where
/// each object came from (`Kind namespace/name` → file path), for the admin API.
pub fn publish(
    objects: &[Object],
    rejections: Vec<Rejection>,
    origins: BTreeMap<String, String>,
    root_namespace: &str,
    tx: &StateTx,
    metrics: &NodeMetrics,
) -> Arc<State> {
    // A refusal stays until the resource changes; log it when it first appears, not again
    // at every publish.
    let known = tx.borrow().rejections.clone();
    for rejection in rejections.iter().filter(|r| !known.contains(r)) {
        warn!(
            origin = %rejection.origin,
            resource = %rejection.resource,
            error = %rejection.error,
            "config resource rejected; its last good version stays in force"
        );
    }
    let loaded_rejections = rejections.len();
    let mut state = translate(objects, rejections, root_namespace);
    state.origins = origins;
    let state = Arc::new(state);
    for rejection in state.rejections[loaded_rejections..]
        .iter()
        .filter(|r| !known.contains(r))
    {
        warn!(
            resource = %rejection.resource,
            error = %rejection.error,
            "routing resource not applied to a host"
        );
    }
    info!(
        namespaces = state.namespaces.len(),
        workloads = state.workloads.len(),
        services = state.services.len(),
        routed_hosts = state.routes.summary().len(),
        rejected = state.rejections.len(),
        "config loaded"
    );
    tx.send_replace(state.clone());
    metrics.config_loaded(state.rejections.len());
    state
}
