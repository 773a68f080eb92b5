//! Figures of a run: one JSON line per measure, printed (`cargo test -- --nocapture`) and,
//! when `REGMIRROR_RELIABILITY_OUT` names a file, appended to it, where
//! `bench/reliability.sh` collects them into the table of docs/RELIABILITY.md.
#![allow(dead_code)]

use std::io::Write as _;

/// Records what `target` ("regmirror" or "distribution") did under `fault`: `fields` are the
/// figures (numbers and short strings: what the client got, what the cache held after).
pub fn figure(fault: &str, target: &str, fields: serde_json::Value) {
    let mut line = serde_json::json!({ "fault": fault, "target": target });
    if let (Some(out), serde_json::Value::Object(more)) = (line.as_object_mut(), fields) {
        out.extend(more);
    }
    let text = line.to_string();
    println!("RELIABILITY {text}");
    if let Ok(path) = std::env::var("REGMIRROR_RELIABILITY_OUT") {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("open {path}: {e}"));
        writeln!(file, "{text}").expect("write a figure");
    }
}

/// The `p`th percentile (0..=100) of `samples` in milliseconds, nearest rank; 0 when empty.
pub fn percentile_ms(samples: &mut [std::time::Duration], p: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_unstable();
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1].as_secs_f64() * 1000.0
}

/// Resident memory of process `pid` in KiB, from /proc.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Open file descriptors of process `pid`, from /proc.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}
