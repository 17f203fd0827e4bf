//! CPU time and memory read from /proc (Linux only).

use std::fs;

/// Clock ticks per second for the utime/stime fields of /proc/*/stat.
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions; it only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// utime + stime, in seconds, from the text of one /proc/.../stat file.
fn parse_stat_cpu(text: &str) -> Option<f64> {
    // The second field (comm) is in parentheses and may hold spaces: split after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / ticks_per_second())
}

/// CPU seconds (user + system) this process has used so far, all threads included.
pub fn self_cpu_seconds() -> Option<f64> {
    parse_stat_cpu(&fs::read_to_string("/proc/self/stat").ok()?)
}

/// Whether /proc/PID/stat says the process has exited (zombie or dead: its counters are gone).
fn has_exited(pid: u32) -> bool {
    let Ok(text) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    let state = text.rfind(')').and_then(|i| text[i + 1..].split_whitespace().next());
    matches!(state, Some("Z" | "X" | "x") | None)
}

/// CPU seconds of another process, summed over /proc/PID/task/*/stat, and its thread count.
/// `None` when the process does not exist (any more) or has exited.
pub fn process_cpu_seconds(pid: u32) -> Option<(f64, usize)> {
    if has_exited(pid) {
        return None;
    }
    let mut total = 0.0;
    let mut threads = 0;
    for entry in fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        // A thread may exit between the listing and the read: skip it.
        if let Some(cpu) = fs::read_to_string(entry.path().join("stat")).ok().and_then(|text| parse_stat_cpu(&text)) {
            total += cpu;
            threads += 1;
        }
    }
    (threads > 0).then_some((total, threads))
}

/// Seconds a task waited on a run queue (ready to run, but the core ran something else), from
/// the text of /proc/.../schedstat: run time, wait time (both ns), timeslices.
fn parse_schedstat_wait(text: &str) -> Option<f64> {
    let ns: u64 = text.split_whitespace().nth(1)?.parse().ok()?;
    Some(ns as f64 / 1e9)
}

/// Run-queue wait summed over the threads of `pid` (`None`: this process). On a shared
/// machine this is the time other work took the cores while we wanted them.
pub fn wait_seconds(pid: Option<u32>) -> Option<f64> {
    let dir = match pid {
        Some(pid) => format!("/proc/{pid}/task"),
        None => "/proc/self/task".into(),
    };
    let mut total = 0.0;
    let mut threads = 0;
    for entry in fs::read_dir(dir).ok()?.flatten() {
        if let Some(wait) =
            fs::read_to_string(entry.path().join("schedstat")).ok().and_then(|text| parse_schedstat_wait(&text))
        {
            total += wait;
            threads += 1;
        }
    }
    (threads > 0).then_some(total)
}

/// Resident set size of a process, in bytes (VmRSS from /proc/PID/status).
pub fn process_rss_bytes(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_stat_line_with_spaces_in_comm() {
        let line = "1234 (my (odd) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 100 0 0";
        let cpu = parse_stat_cpu(line).unwrap();
        assert!((cpu - 300.0 / ticks_per_second()).abs() < 1e-9);
    }

    #[test]
    fn parses_schedstat() {
        assert_eq!(parse_schedstat_wait("314740 5946832 2\n"), Some(0.005946832));
        assert_eq!(parse_schedstat_wait("1"), None);
    }

    #[test]
    fn reads_its_own_cpu() {
        assert!(self_cpu_seconds().is_some());
        let (_, threads) = process_cpu_seconds(std::process::id()).unwrap();
        assert!(threads >= 1);
        assert!(process_rss_bytes(std::process::id()).unwrap() > 0);
    }
}
