//! Config sources and the one translation from Kubernetes objects to [`State`].
//!
//! Every source (a directory of YAML, the API server) classifies each object through
//! [`document`], keeps the last good version of what it had to refuse with [`LastGood`], and
//! publishes through [`publish`]: so a YAML file and the API server give the same state for
//! the same objects, and refuse the same bad ones.
pub(crate) mod core;
mod document;
mod last_good;
mod translate;

pub mod file;
pub mod kube;

use std::{collections::BTreeMap, sync::Arc, time::Instant};

pub use last_good::LastGood;
use tracing::{info, warn};
pub use translate::{Object, TranslateError, routing_resources, translate, validate};

use crate::{
    inventory::Rejection,
    metrics::NodeMetrics,
    state::{State, StateTx},
};

/// Reads one YAML document as the sources do (for tests that build states from YAML):
/// the object, or why it is refused.
#[cfg(test)]
pub(crate) fn object_from_yaml(value: serde_yaml::Value) -> Result<Object, String> {
    use serde::Deserialize as _;
    let meta = document::TypeMeta::deserialize(&value).map_err(|e| e.to_string())?;
    match document::classify(meta, &value) {
        document::Document::Object(object) => Ok(object),
        document::Document::Invalid { error, .. } => Err(error),
        document::Document::Ignored { kind } => Err(format!("{kind} is not a kind the mesh reads")),
    }
}

/// The state the sources would publish for the multi-document `yaml`; a document that is
/// refused fails the test.
#[cfg(test)]
pub(crate) fn state_from_yaml(yaml: &str) -> crate::state::State {
    use serde::Deserialize as _;
    let objects: Vec<Object> = serde_yaml::Deserializer::from_str(yaml)
        .map(|document| {
            let value = serde_yaml::Value::deserialize(document).expect("YAML");
            let object = object_from_yaml(value).unwrap_or_else(|error| panic!("{error}"));
            if let Err(error) = validate(&object) {
                panic!("{} should be valid: {error}", object.id());
            }
            object
        })
        .collect();
    translate(&objects, Vec::new(), crate::policy::DEFAULT_ROOT_NAMESPACE)
}

/// Runs a load, which takes a while on a big cluster, without holding up the tasks that
/// share its runtime worker (health and metrics endpoints, the proxy): on a multi-threaded
/// runtime the worker hands its other tasks to another thread meanwhile.
pub fn without_blocking_the_runtime<T>(load: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|handle| handle.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(load),
        _ => load(),
    }
}

/// Translates `objects` and publishes the state; logs what was refused. `origins` says where
/// each object came from (`Kind namespace/name` → file path), for the admin API. `started`
/// is when the source began this load, for the load-time metric.
pub fn publish(
    started: Instant,
    objects: &[Object],
    rejections: Vec<Rejection>,
    origins: Arc<BTreeMap<String, Arc<str>>>,
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
    let took = started.elapsed();
    info!(
        namespaces = state.namespaces.len(),
        workloads = state.workloads.len(),
        services = state.services.len(),
        routed_hosts = state.routes.summary().len(),
        rejected = state.rejections.len(),
        took_ms = took.as_millis(),
        "config loaded"
    );
    // The previous state is dropped here unless a reader still holds it.
    drop(tx.send_replace(state.clone()));
    // A load on a big cluster frees hundreds of MiB of parsed documents and old state.
    crate::memory::release_free_memory();
    metrics.config_loaded(state.rejections.len(), took);
    state
}
