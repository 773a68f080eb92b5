//! The signals alerts watch that the request counters do not give: whether
//! each upstream answers, the cache's budget, the data dir's filesystem,
//! verification failures and readiness; and [`watch`], the background tick
//! that reads the filesystem and samples the status page's history.
//! Mechanism only: the parts that see these things report them here.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry as PromRegistry;

use super::history::SAMPLE_EVERY;
use super::{Metrics, UpstreamLabels};

/// What failed its digest check (the `what` of `verification_failures`):
/// a blob download (from the upstream, the bucket or a peer), a manifest
/// from the upstream, a blob already in the cache.
pub const VERIFIED: [&str; 3] = ["download", "manifest", "cached_blob"];

/// How often the data dir's filesystem is read.
const DISK_EVERY: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WhatLabels {
    what: &'static str,
}

/// The gauges and counters of this file, registered by [`Signals::register`].
#[derive(Default)]
pub(super) struct Signals {
    upstream_up: Family<UpstreamLabels, Gauge>,
    cache_max_bytes: Gauge,
    disk_free: Gauge,
    disk_size: Gauge,
    verification_failures: Family<WhatLabels, Counter>,
    ready: Gauge,
    downloads_in_flight: Gauge,
}

fn gauge_value(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Signals {
    pub(super) fn register(&self, r: &mut PromRegistry) {
        for what in VERIFIED {
            drop(
                self.verification_failures
                    .get_or_create(&WhatLabels { what }),
            );
        }
        // Ready until a probe says otherwise: a 0 before the first probe
        // would page for a replica that only just started.
        self.ready.set(1);
        r.register(
            "upstream_up",
            "Whether an upstream's last request was answered without a server error (1) or failed or got a 5xx (0)",
            self.upstream_up.clone(),
        );
        r.register(
            "cache_max_bytes",
            "The cache's byte budget (cache.max_size)",
            self.cache_max_bytes.clone(),
        );
        r.register(
            "data_dir_free_bytes",
            "Bytes available to the mirror on the data dir's filesystem",
            self.disk_free.clone(),
        );
        r.register(
            "data_dir_size_bytes",
            "Size of the data dir's filesystem",
            self.disk_size.clone(),
        );
        r.register(
            "verification_failures",
            "Bytes that did not match their digest: a blob download, an upstream manifest, a cached blob",
            self.verification_failures.clone(),
        );
        r.register(
            "downloads_in_flight",
            "Blob downloads running when scraped (each followed by its coalesced clients)",
            self.downloads_in_flight.clone(),
        );
        r.register(
            "ready",
            "Whether the last readiness check passed (1) or not (0), as /readyz answers",
            self.ready.clone(),
        );
    }

    pub(super) fn upstream(&self, upstream: &str, up: bool) {
        self.upstream_up
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_owned(),
            })
            .set(i64::from(up));
    }
}

impl Metrics {
    /// Bytes that did not hash to their digest; `what` is one of [`VERIFIED`].
    pub fn verification_failure(&self, what: &'static str) {
        self.signals
            .verification_failures
            .get_or_create(&WhatLabels { what })
            .inc();
    }

    /// The cache's byte budget.
    pub fn cache_budget(&self, bytes: u64) {
        self.signals.cache_max_bytes.set(gauge_value(bytes));
    }

    /// The data dir's filesystem: bytes available to the mirror, and its size.
    pub fn data_dir_space(&self, free: u64, size: u64) {
        self.signals.disk_free.set(gauge_value(free));
        self.signals.disk_size.set(gauge_value(size));
    }

    /// Blob downloads running now.
    pub fn set_downloads_in_flight(&self, n: usize) {
        self.signals
            .downloads_in_flight
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Whether the mirror is ready, as its last readiness check found.
    pub fn set_ready(&self, ready: bool) {
        self.signals.ready.set(i64::from(ready));
    }
}

/// Bytes available to an unprivileged user, and the size, of the filesystem
/// holding `dir`.
fn space(dir: &std::path::Path) -> std::io::Result<(u64, u64)> {
    let s = rustix::fs::statvfs(dir)?;
    Ok((
        s.f_bavail.saturating_mul(s.f_frsize),
        s.f_blocks.saturating_mul(s.f_frsize),
    ))
}

/// Until the process ends: the filesystem of `data_dir` every 10 s, the
/// status page's history every minute (the first at once), and the budget
/// `max_size` once.
pub async fn watch(metrics: Arc<Metrics>, data_dir: PathBuf, max_size: u64) {
    metrics.cache_budget(max_size);
    let mut tick = tokio::time::interval(DISK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_sample: Option<tokio::time::Instant> = None;
    loop {
        let now = tick.tick().await;
        if last_sample.is_none_or(|at| now.duration_since(at) >= SAMPLE_EVERY) {
            last_sample = Some(now);
            metrics.sample_history(SystemTime::now());
        }
        let dir = data_dir.clone();
        match tokio::task::spawn_blocking(move || space(&dir)).await {
            Ok(Ok((free, size))) => metrics.data_dir_space(free, size),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, dir = %data_dir.display(), "cannot read the data dir's filesystem");
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_are_in_the_exposition() {
        let m = Metrics::new();
        let text = m.encode();
        assert!(
            !text.contains("regmirror_upstream_up"),
            "no upstream contacted, no series (and prometheus-client writes no TYPE line)"
        );
        for line in [
            "regmirror_verification_failures_total{what=\"download\"} 0",
            "regmirror_verification_failures_total{what=\"cached_blob\"} 0",
            "regmirror_ready 1",
            "regmirror_cache_max_bytes 0",
            "regmirror_downloads_in_flight 0",
        ] {
            assert!(text.contains(line), "no `{line}` in:\n{text}");
        }
        m.verification_failure("manifest");
        m.cache_budget(1 << 30);
        m.data_dir_space(5, 10);
        m.set_ready(false);
        m.upstream_failure("docker.io", "connection refused");
        let text = m.encode();
        for line in [
            "regmirror_verification_failures_total{what=\"manifest\"} 1",
            "regmirror_cache_max_bytes 1073741824",
            "regmirror_data_dir_free_bytes 5",
            "regmirror_data_dir_size_bytes 10",
            "regmirror_ready 0",
            "regmirror_upstream_up{upstream=\"docker.io\"} 0",
        ] {
            assert!(text.contains(line), "no `{line}` in:\n{text}");
        }
        m.upstream_answer("docker.io", "GET", 503, Duration::ZERO, None);
        assert!(m
            .encode()
            .contains("regmirror_upstream_up{upstream=\"docker.io\"} 0"));
        m.upstream_answer("docker.io", "GET", 404, Duration::ZERO, None);
        assert!(m
            .encode()
            .contains("regmirror_upstream_up{upstream=\"docker.io\"} 1"));
    }

    #[test]
    fn the_data_dirs_filesystem_is_read() {
        let dir = std::env::temp_dir();
        let (free, size) = space(&dir).unwrap();
        assert!(size > 0 && free <= size, "{free} of {size}");
    }
}
