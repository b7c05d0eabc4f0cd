//! The process's own memory, for the debug log (the agent's footprint at
//! tens of thousands of Services is a goal: see BENCHMARKS.md).

/// This process's peak resident memory (VmHWM), for the debug log.
pub fn peak_rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kb| kb / 1024)
        .unwrap_or(0)
}
