//! How results are printed: one JSON line each, with the machine's load beside it.

/// The 1-minute load average, so a reader can judge how noisy the machine was.
pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse().ok()))
        .unwrap_or(-1.0)
}

/// The kernel's transparent huge page mode (the bracketed word), e.g. "madvise".
pub fn thp_mode() -> String {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .ok()
        .and_then(|s| s.split('[').nth(1).and_then(|r| r.split(']').next()).map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

pub fn print(v: serde_json::Value) {
    println!("{v}");
}
