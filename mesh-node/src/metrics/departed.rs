//! Forgetting the series of workloads that left the mesh.
//!
//! `istio_*` series are labelled by source and destination workload: a node agent outlives
//! many of them (every Job, every renamed Deployment, every bare pod), and without this
//! their series would pile up for as long as it runs. A series whose source or destination
//! workload is gone is marked at one sweep and removed at a later one once it has been gone
//! for [`GRACE`], so scrapes in between still see its last increments.
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use prometheus::core::{Collector, MetricVec, MetricVecBuilder};

/// The label values of one series, in the order the vector declares its labels.
type Series = Vec<String>;

/// How long a departed workload's series stay: longer than any sensible scrape interval.
pub const GRACE: Duration = Duration::from_secs(60);

/// The series of departed workloads, per metric family, and since when they are gone.
#[derive(Default)]
pub struct DepartedSeries {
    marked: Mutex<HashMap<(String, Series), Instant>>,
}

impl DepartedSeries {
    /// Marks the series of `vec` (labelled `label_names`) whose workloads `present(workload,
    /// namespace)` does not know now, and removes those gone for `grace` already.
    pub fn sweep<T: MetricVecBuilder>(
        &self,
        vec: &MetricVec<T>,
        label_names: &[&str],
        present: &dyn Fn(&str, &str) -> bool,
        grace: Duration,
    ) {
        let position = |name: &str| label_names.iter().position(|label| *label == name);
        let workloads = [
            (
                position("source_workload"),
                position("source_workload_namespace"),
            ),
            (
                position("destination_workload"),
                position("destination_workload_namespace"),
            ),
        ];
        let mut marked = self.marked.lock();
        for family in vec.collect() {
            let name = family.name().to_string();
            for metric in family.get_metric() {
                let by_name: std::collections::HashMap<&str, &str> = metric
                    .get_label()
                    .iter()
                    .map(|pair| (pair.name(), pair.value()))
                    .collect();
                let values: Series = label_names
                    .iter()
                    .map(|label| by_name.get(label).copied().unwrap_or_default().to_string())
                    .collect();
                let departed = workloads.iter().any(|(workload, namespace)| {
                    let (Some(workload), Some(namespace)) = (*workload, *namespace) else {
                        return false;
                    };
                    let (workload, namespace) = (&values[workload], &values[namespace]);
                    workload != super::UNKNOWN && !present(workload, namespace)
                });
                let key = (name.clone(), values);
                if !departed {
                    marked.remove(&key);
                    continue;
                }
                let since = *marked.entry(key.clone()).or_insert_with(Instant::now);
                if since.elapsed() >= grace {
                    marked.remove(&key);
                    let values: Vec<&str> = key.1.iter().map(String::as_str).collect();
                    let _ = vec.remove_label_values(&values);
                }
            }
        }
    }
}
