//! Enrollment at the size of a full node: 250 pods on one node (PERF.md: each enrollment
//! ≤ 5 ms, the agent's memory linear in its local pods).
//!
//! The pods exist and the agent runs before their namespace is enrolled; then the label is
//! set and the agent enrolls all of them in one round, finding each pod's netns itself (as
//! after its restart, or without the CNI plugin: the slowest way it finds them; the plugin
//! names the netns). Then one more pod arrives on the full node. The agent's own histogram
//! (`nodemesh_pod_enrollment_duration_seconds`) times each enrollment; its RSS before and
//! after gives the memory per enrolled pod.

use std::{
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use mesh_tests::{Cluster, PodSpec, namespace_yaml};

use super::{
    Interrupt, agent,
    scale::{metric, wait_until},
    table::{Align, Table},
};

/// Pods on the node: what PERF.md names (kubelet's default limit is 110; big nodes run 250).
const PODS: u32 = 250;
const NAMESPACE: &str = "crowd";
const ENROLLED: &[(&str, &str)] = &[("nodemesh.io/enabled", "true")];
/// How long the agent may take to enroll every pod before the row fails.
const ENROLL_TIMEOUT: Duration = Duration::from_secs(120);
/// How long after enrolling the memory is read (the allocator returns what it freed).
const SETTLE: Duration = Duration::from_secs(2);
const HISTOGRAM: &str = "nodemesh_pod_enrollment_duration_seconds";

/// What enrolling a full node cost.
pub struct Measured {
    pods: u32,
    /// From the label's write to every pod enrolled: one config load and the whole round.
    all_enrolled: Duration,
    /// The agent's own mean time per enrollment in that round.
    mean: Duration,
    /// The share of the round's enrollments that took ≤ 5 ms (the histogram's bucket).
    within_5ms: f64,
    /// The agent's time for one more pod, enrolled on the full node.
    one_more: Duration,
    rss_before_mib: f64,
    rss_after_mib: f64,
}

impl Measured {
    fn kib_per_pod(&self) -> f64 {
        (self.rss_after_mib - self.rss_before_mib) * 1024.0 / f64::from(self.pods)
    }
}

/// Enrollment time and memory of the agent's first round.
struct Histogram {
    count: f64,
    sum: f64,
    within_5ms: f64,
}

fn histogram(cluster: &Cluster) -> anyhow::Result<Histogram> {
    Ok(Histogram {
        count: metric(cluster, &format!("{HISTOGRAM}_count"), &[])?,
        sum: metric(cluster, &format!("{HISTOGRAM}_sum"), &[])?,
        within_5ms: metric(cluster, &format!("{HISTOGRAM}_bucket"), &[("le", "0.005")])?,
    })
}

fn enrolled_pods(cluster: &Cluster) -> anyhow::Result<f64> {
    metric(cluster, "nodemesh_enrolled_pods", &[])
}

/// One node with [`PODS`] pods, an agent, then their namespace enrolled.
pub fn measure(interrupt: &Interrupt) -> anyhow::Result<Measured> {
    println!("bench: enrollment: {PODS} pods on one node…");
    let mut cluster = Cluster::new("bench-enroll", 1);
    cluster.set_agent_log_filter("info");
    cluster.write_config("namespace.yaml", &namespace_yaml(NAMESPACE, &[]));
    for n in 0..PODS {
        interrupt.check()?;
        cluster.add_pod(PodSpec::new(&format!("pod-{n}"), 0).namespace(NAMESPACE));
    }
    cluster.start_agent(0, &[]);
    let pid = cluster.agent_pid(0).context("the agent's pid")?;
    thread::sleep(SETTLE);
    let rss_before_mib = agent::rss_mib(pid)?;

    let started = Instant::now();
    cluster.write_config("namespace.yaml", &namespace_yaml(NAMESPACE, ENROLLED));
    let all = f64::from(PODS);
    wait_until(ENROLL_TIMEOUT, "every pod to be enrolled", || {
        Ok(enrolled_pods(&cluster)? >= all)
    })?;
    let all_enrolled = started.elapsed();
    let round = histogram(&cluster)?;
    thread::sleep(SETTLE);
    let rss_after_mib = agent::rss_mib(pid)?;

    interrupt.check()?;
    cluster.add_pod(PodSpec::new("one-more", 0).namespace(NAMESPACE));
    wait_until(ENROLL_TIMEOUT, "the one more pod to be enrolled", || {
        Ok(enrolled_pods(&cluster)? > all)
    })?;
    let after = histogram(&cluster)?;
    let measured = Measured {
        pods: PODS,
        all_enrolled,
        mean: Duration::from_secs_f64(round.sum / round.count.max(1.0)),
        within_5ms: round.within_5ms / round.count.max(1.0),
        one_more: Duration::from_secs_f64(after.sum - round.sum),
        rss_before_mib,
        rss_after_mib,
    };
    println!(
        "bench:   {} pods enrolled after {:.2} s, {:.2} ms each on average ({:.0} % ≤ 5 ms); \
         one more: {:.2} ms; RSS {:.1} → {:.1} MiB ({:.0} KiB per pod)",
        round.count,
        all_enrolled.as_secs_f64(),
        measured.mean.as_secs_f64() * 1e3,
        measured.within_5ms * 100.0,
        measured.one_more.as_secs_f64() * 1e3,
        rss_before_mib,
        rss_after_mib,
        measured.kib_per_pod(),
    );
    Ok(measured)
}

/// The row of the report.
pub fn render(measured: &Measured) -> String {
    let mut table = Table::new(&[
        ("enrollment (one agent)", Align::Left),
        ("all enrolled after", Align::Right),
        ("per pod", Align::Right),
        ("≤ 5 ms", Align::Right),
        ("one more pod", Align::Right),
        ("RSS", Align::Right),
        ("per pod", Align::Right),
    ]);
    table.row(vec![
        format!(
            "{} pods on one node, netns found by the agent",
            measured.pods
        ),
        format!("{:.2} s", measured.all_enrolled.as_secs_f64()),
        format!("{:.2} ms", measured.mean.as_secs_f64() * 1e3),
        format!("{:.0} %", measured.within_5ms * 100.0),
        format!("{:.2} ms", measured.one_more.as_secs_f64() * 1e3),
        format!(
            "{:.1} → {:.1} MiB",
            measured.rss_before_mib, measured.rss_after_mib
        ),
        format!("{:.0} KiB", measured.kib_per_pod()),
    ]);
    format!(
        "\nEnrollment (target: each enrollment ≤ 5 ms, memory linear in local pods):\n{}",
        table.render(2)
    )
}
