//! The agent process's own CPU time, memory, threads and descriptors, as the standard
//! `process_*` metrics every Prometheus client exports (and dashboards expect).
//!
//! The node proxy runs inside the agent, so these are the proxy's cost on the node. They
//! are read from `/proc/self` at scrape time. The prometheus crate's `process` feature
//! would do the same through the procfs crate (a dependency the workspace does not have)
//! and rounds CPU time down to whole seconds, too coarse for a 1 s scrape.
use std::fs;

use parking_lot::Mutex;
use prometheus::{
    Counter, IntGauge,
    core::{Collector, Desc},
    proto::MetricFamily,
};

/// Clock ticks per second in `/proc/<pid>/stat`. Linux reports these in `USER_HZ`, which
/// its ABI fixes at 100 on every architecture the agent runs on (Prometheus' Go procfs
/// library relies on the same); asking `sysconf` would take unsafe code for a constant.
const USER_HZ: f64 = 100.0;

/// Exports `process_cpu_seconds_total`, `process_resident_memory_bytes`,
/// `process_open_fds`, `process_threads` and `process_start_time_seconds`.
pub struct ProcessCollector {
    descs: Vec<Desc>,
    cpu: Counter,
    resident_memory: IntGauge,
    open_fds: IntGauge,
    threads: IntGauge,
    start_time: IntGauge,
    /// A collection advances `cpu` by what it read minus what it holds, so two concurrent
    /// scrapes must not both add the same difference.
    collecting: Mutex<()>,
}

impl ProcessCollector {
    pub fn new() -> prometheus::Result<Self> {
        let cpu = Counter::new(
            "process_cpu_seconds_total",
            "User and system CPU time of the agent (and so of its proxy), in seconds",
        )?;
        let resident_memory = IntGauge::new(
            "process_resident_memory_bytes",
            "Resident memory of the agent process, in bytes",
        )?;
        let open_fds = IntGauge::new(
            "process_open_fds",
            "File descriptors the agent process holds open",
        )?;
        let threads = IntGauge::new("process_threads", "OS threads of the agent process")?;
        let start_time = IntGauge::new(
            "process_start_time_seconds",
            "When the agent process started (Unix time)",
        )?;
        if let Some(started) = start_time_seconds() {
            start_time.set(started);
        }
        let descs = [
            cpu.desc(),
            resident_memory.desc(),
            open_fds.desc(),
            threads.desc(),
            start_time.desc(),
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
        Ok(Self {
            descs,
            cpu,
            resident_memory,
            open_fds,
            threads,
            start_time,
            collecting: Mutex::new(()),
        })
    }
}

impl Collector for ProcessCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    /// Reads `/proc/self`; a value that cannot be read keeps its last reading.
    fn collect(&self) -> Vec<MetricFamily> {
        let _one_at_a_time = self.collecting.lock();
        if let Some(stat) = read_proc("/proc/self/stat").and_then(|text| Stat::parse(&text)) {
            let behind = stat.cpu_seconds() - self.cpu.get();
            if behind > 0.0 {
                self.cpu.inc_by(behind);
            }
            self.threads.set(stat.threads);
        }
        if let Some(bytes) = read_proc("/proc/self/status").and_then(|text| resident_bytes(&text)) {
            self.resident_memory.set(bytes);
        }
        if let Ok(entries) = fs::read_dir("/proc/self/fd") {
            self.open_fds
                .set(i64::try_from(entries.count()).unwrap_or(i64::MAX));
        }
        [
            self.cpu.collect(),
            self.resident_memory.collect(),
            self.open_fds.collect(),
            self.threads.collect(),
            self.start_time.collect(),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

fn read_proc(path: &str) -> Option<String> {
    fs::read_to_string(path).ok()
}

/// The fields of `/proc/<pid>/stat` the collector uses (proc(5)).
#[derive(Debug, PartialEq)]
struct Stat {
    user_ticks: u64,
    system_ticks: u64,
    threads: i64,
    /// Since boot.
    start_ticks: u64,
}

impl Stat {
    fn parse(text: &str) -> Option<Self> {
        // `comm` (field 2) is in parentheses and may itself hold spaces and parentheses:
        // the fields that follow start after the last `)`, with `state` (field 3).
        let (_, after_comm) = text.rsplit_once(')')?;
        let fields: Vec<&str> = after_comm.split_whitespace().collect();
        let field = |number: usize| fields.get(number - 3)?.parse().ok();
        Some(Self {
            user_ticks: field(14)?,
            system_ticks: field(15)?,
            threads: i64::try_from(field(20)?).ok()?,
            start_ticks: field(22)?,
        })
    }

    fn cpu_seconds(&self) -> f64 {
        (self.user_ticks + self.system_ticks) as f64 / USER_HZ
    }
}

/// `VmRSS` of `/proc/<pid>/status`, in bytes.
fn resident_bytes(status: &str) -> Option<i64> {
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kibibytes: i64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kibibytes.checked_mul(1024)
}

/// `btime` of `/proc/stat`: when the machine booted (Unix time).
fn boot_time(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|line| line.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

fn start_time_seconds() -> Option<i64> {
    let booted = boot_time(&read_proc("/proc/stat")?)?;
    let since_boot = Stat::parse(&read_proc("/proc/self/stat")?)?.start_ticks as f64 / USER_HZ;
    i64::try_from(booted + since_boot as u64).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real line, with a `comm` that needs the last-parenthesis rule.
    const STAT: &str = "4242 (mesh node) (x)) S 1 4242 4242 0 -1 4194560 5120 0 0 0 \
                        250 75 0 0 20 0 7 0 123456 1073741824 2560 18446744073709551615 \
                        1 1 0 0 0 0 0 4096 17920 0 0 0 17 1 0 0 0 0 0";

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let stat = Stat::parse(STAT).expect("a stat line");
        assert_eq!(
            stat,
            Stat {
                user_ticks: 250,
                system_ticks: 75,
                threads: 7,
                start_ticks: 123_456,
            }
        );
        assert_eq!(stat.cpu_seconds(), 3.25);
        assert_eq!(Stat::parse("4242 (truncated) S 1 2"), None);
    }

    #[test]
    fn resident_memory_and_boot_time_are_read_from_their_lines() {
        let status = "Name:\tmesh-node\nVmPeak:\t  99999 kB\nVmRSS:\t   20480 kB\nThreads:\t7\n";
        assert_eq!(resident_bytes(status), Some(20 * 1024 * 1024));
        assert_eq!(resident_bytes("Name:\tkthreadd\n"), None, "kernel threads");
        let stat = "cpu  1 2 3\nintr 5\nbtime 1700000000\nprocesses 9\n";
        assert_eq!(boot_time(stat), Some(1_700_000_000));
    }

    #[test]
    fn this_process_is_measured() {
        let collector = ProcessCollector::new().expect("a collector");
        let registry = prometheus::Registry::new();
        let families = collector.collect();
        registry
            .register(Box::new(collector))
            .expect("the collector registers");
        let value = |name: &str| {
            let family = families
                .iter()
                .find(|family| family.name() == name)
                .unwrap_or_else(|| panic!("{name} collected"));
            let metric = &family.get_metric()[0];
            metric.get_counter().get_value() + metric.get_gauge().get_value()
        };
        assert!(
            value("process_resident_memory_bytes") > 1e6,
            "a test binary"
        );
        assert!(value("process_threads") >= 1.0);
        assert!(value("process_open_fds") >= 3.0, "stdin, stdout, stderr");
        assert!(value("process_cpu_seconds_total") >= 0.0);
        assert!(value("process_start_time_seconds") > 1.6e9, "after 2020");
        assert_eq!(registry.gather().len(), 5);
    }
}
