//! What an agent process costs: CPU time and resident memory, read from /proc.

use std::fs;

use anyhow::{Context as _, bail};

/// Clock ticks per second of the CPU times in /proc/<pid>/stat: USER_HZ, which the kernel
/// fixes at 100 for user space on every architecture it supports (sysconf(_SC_CLK_TCK)).
const CLOCK_TICKS: f64 = 100.0;

/// User + system CPU seconds the process used so far.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_cpu_ticks(&stat)
        .map(|ticks| ticks as f64 / CLOCK_TICKS)
        .with_context(|| format!("unexpected {path}: {stat}"))
}

/// utime + stime (fields 14 and 15) of a /proc/<pid>/stat line.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may itself hold spaces or ')'.
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // After the name come field 3 (state) onwards: utime is field 14, the 12th here.
    let mut fields = after_comm.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Resident set size in MiB (VmRSS).
pub fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    match parse_vm_rss_kib(&status) {
        Some(kib) => Ok(kib as f64 / 1024.0),
        None => bail!("no VmRSS line in {path}"),
    }
}

/// Of the resident memory (MiB): what is the process's own (heap, stacks: `RssAnon`), and
/// what are pages of files it maps (`RssFile`: mostly the binary's code, shared with every
/// process running it and given back by the kernel whenever it needs the memory).
#[derive(Clone, Copy)]
pub struct RssSplit {
    pub anon: f64,
    pub file: f64,
}

pub fn rss_split_mib(pid: u32) -> anyhow::Result<RssSplit> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |name| {
        status_kib(&status, name)
            .map(|kib| kib as f64 / 1024.0)
            .with_context(|| format!("no {name} line in {path}"))
    };
    Ok(RssSplit {
        anon: field("RssAnon:")?,
        file: field("RssFile:")?,
    })
}

fn parse_vm_rss_kib(status: &str) -> Option<u64> {
    status_kib(status, "VmRSS:")
}

/// The value of a `<name> <n> kB` line of /proc/<pid>/status.
fn status_kib(status: &str, name: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(name))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_and_status() {
        let stat = "4242 (mesh node) S 1 4242 4242 0 -1 4194560 1029 0 0 0 250 75 0 0 20 0 \
                    4 0 1234 123456789 4000 18446744073709551615";
        assert_eq!(parse_cpu_ticks(stat), Some(325));
        assert_eq!(parse_cpu_ticks("garbage"), None);
        let status = "Name:\tmesh-node\nVmPeak:\t  200000 kB\nVmRSS:\t    9216 kB\n\
                      RssAnon:\t    3072 kB\nRssFile:\t    6144 kB\nThreads:\t4\n";
        assert_eq!(parse_vm_rss_kib(status), Some(9216));
        assert_eq!(status_kib(status, "RssAnon:"), Some(3072));
        assert_eq!(status_kib(status, "RssFile:"), Some(6144));
        assert_eq!(status_kib(status, "RssShmem:"), None);
    }
}
