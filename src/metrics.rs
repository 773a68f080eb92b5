//! What the mirror counts, for Prometheus (`/metrics`, OpenMetrics text) and
//! the status page. Mechanism only: the parts that observe something call
//! the recording methods; nothing here decides anything.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry as PromRegistry;

mod history;
mod signals;

pub use history::{History, Sample, SAMPLES_KEPT, SAMPLE_EVERY};
pub use signals::{watch, VERIFIED};

/// How many recent errors the status page shows.
const RECENT_ERRORS: usize = 20;

/// Why a download was served without being kept (the `reason` of
/// `downloads_not_kept`).
pub const NOT_KEPT: [&str; 3] = ["too_large", "no_space", "commit_failed"];

/// Why client credentials are refused (the `reason` of `auth_refusals`).
pub const AUTH_REFUSALS: [&str; 4] = ["missing", "malformed", "invalid", "backoff"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    endpoint: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    kind: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamStatusLabels {
    upstream: String,
    method: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TierLabels {
    tier: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartLabels {
    part: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertLabels {
    cert: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ImageLabels {
    image: String,
}

/// An error a client saw, for the status page.
#[derive(Debug, Clone)]
pub struct RecentError {
    pub at: SystemTime,
    pub status: u16,
    pub path: String,
    pub message: String,
}

/// What is known of an upstream's health.
#[derive(Debug, Clone, Default)]
pub struct UpstreamHealth {
    pub last_success: Option<SystemTime>,
    pub last_failure: Option<(SystemTime, String)>,
    /// The last `ratelimit-remaining` it reported (Docker Hub's pulls
    /// left), and when.
    pub ratelimit_remaining: Option<(i64, SystemTime)>,
}

/// Every metric of one mirror process.
pub struct Metrics {
    registry: PromRegistry,
    requests: Family<RequestLabels, Counter>,
    cache: Family<CacheLabels, Counter>,
    client_bytes: Family<OutcomeLabels, Counter>,
    upstream_bytes: Counter,
    upstream_requests: Family<UpstreamStatusLabels, Counter>,
    upstream_errors: Family<UpstreamLabels, Counter>,
    upstream_seconds: Family<UpstreamLabels, Histogram>,
    token_fetches: Family<UpstreamLabels, Counter>,
    ratelimit_remaining: Family<UpstreamLabels, Gauge>,
    evictions: Family<ReasonLabels, Counter>,
    evicted_bytes: Family<ReasonLabels, Counter>,
    not_kept: Family<ReasonLabels, Counter>,
    cache_bytes: Gauge,
    cache_entries: Family<KindLabels, Gauge>,
    stale_serves: Counter,
    tls_expiry: Family<CertLabels, Gauge>,
    auth_bcrypt: Counter,
    auth_refusals: Family<ReasonLabels, Counter>,
    tier_hits: Family<TierLabels, Counter>,
    upstream_fills: Counter,
    lease_takeovers: Counter,
    shared_errors: Family<PartLabels, Counter>,
    shared_up: Family<PartLabels, Gauge>,
    /// The error counts last copied into `shared_errors`, and whether up,
    /// by part.
    shared_seen: Mutex<HashMap<&'static str, (u64, bool)>>,
    /// The replicas last seen in the cluster, for the status page.
    peers: Mutex<Vec<(String, SystemTime)>>,
    /// Upstream up, budget, disk, verification failures, readiness.
    signals: signals::Signals,
    /// The status page's charts: the counters sampled once a minute.
    history: Mutex<History>,
    // For the status page (not all of it fits Prometheus' model).
    hits: AtomicU64,
    lookups: AtomicU64,
    bytes_from_cache: AtomicU64,
    pulls: Mutex<HashMap<String, u64>>,
    upstream_health: Mutex<HashMap<String, UpstreamHealth>>,
    recent_errors: Mutex<VecDeque<RecentError>>,
    tls_not_after: Mutex<Option<SystemTime>>,
    // The scheduled warm-up (`crate::warm`).
    warm_runs: Family<ResultLabels, Counter>,
    warm_last_success: Family<ImageLabels, Gauge>,
    warm_fetched_bytes: Counter,
    warm_paused: Gauge,
    warm: Mutex<Vec<crate::warm::ImageStatus>>,
}

/// Images whose pulls are counted one by one (the status page shows ten).
const PULLS_KEPT: usize = 1000;

fn upstream_seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Metrics {
    pub fn new() -> Self {
        let mut m = Self {
            registry: PromRegistry::with_prefix("regmirror"),
            requests: Family::default(),
            cache: Family::default(),
            client_bytes: Family::default(),
            upstream_bytes: Counter::default(),
            upstream_requests: Family::default(),
            upstream_errors: Family::default(),
            upstream_seconds: Family::new_with_constructor(upstream_seconds_histogram),
            token_fetches: Family::default(),
            ratelimit_remaining: Family::default(),
            evictions: Family::default(),
            evicted_bytes: Family::default(),
            not_kept: Family::default(),
            cache_bytes: Gauge::default(),
            cache_entries: Family::default(),
            stale_serves: Counter::default(),
            tls_expiry: Family::default(),
            auth_bcrypt: Counter::default(),
            auth_refusals: Family::default(),
            tier_hits: Family::default(),
            upstream_fills: Counter::default(),
            lease_takeovers: Counter::default(),
            shared_errors: Family::default(),
            shared_up: Family::default(),
            shared_seen: Mutex::new(HashMap::new()),
            peers: Mutex::new(Vec::new()),
            signals: signals::Signals::default(),
            history: Mutex::new(History::default()),
            hits: AtomicU64::new(0),
            lookups: AtomicU64::new(0),
            bytes_from_cache: AtomicU64::new(0),
            pulls: Mutex::new(HashMap::new()),
            upstream_health: Mutex::new(HashMap::new()),
            recent_errors: Mutex::new(VecDeque::new()),
            tls_not_after: Mutex::new(None),
            warm_runs: Family::default(),
            warm_last_success: Family::default(),
            warm_fetched_bytes: Counter::default(),
            warm_paused: Gauge::default(),
            warm: Mutex::new(Vec::new()),
        };
        // Every series an alert may watch exists from the start, at zero.
        for kind in ["manifest", "blob"] {
            for outcome in ["hit", "miss", "coalesced", "pass"] {
                drop(m.cache.get_or_create(&CacheLabels { kind, outcome }));
            }
        }
        for reason in ["idle", "size"] {
            drop(m.evictions.get_or_create(&ReasonLabels { reason }));
            drop(m.evicted_bytes.get_or_create(&ReasonLabels { reason }));
        }
        for reason in NOT_KEPT {
            drop(m.not_kept.get_or_create(&ReasonLabels { reason }));
        }
        for reason in AUTH_REFUSALS {
            drop(m.auth_refusals.get_or_create(&ReasonLabels { reason }));
        }
        for tier in ["local", "bucket", "peer"] {
            drop(m.tier_hits.get_or_create(&TierLabels { tier }));
        }
        let r = &mut m.registry;
        r.register(
            "http_requests",
            "Requests answered, by endpoint and status",
            m.requests.clone(),
        );
        r.register(
            "cache_requests",
            "Manifest and blob requests by cache outcome (hit, miss, coalesced, pass)",
            m.cache.clone(),
        );
        r.register(
            "client_bytes",
            "Body bytes sent to clients, by cache outcome",
            m.client_bytes.clone(),
        );
        r.register(
            "upstream_bytes",
            "Blob bytes downloaded from upstreams",
            m.upstream_bytes.clone(),
        );
        r.register(
            "upstream_requests",
            "Requests sent to upstreams, by method and status",
            m.upstream_requests.clone(),
        );
        r.register(
            "upstream_errors",
            "Upstream requests that failed without a status (connect, timeout, reset)",
            m.upstream_errors.clone(),
        );
        r.register(
            "upstream_request_seconds",
            "Time until an upstream answered with headers",
            m.upstream_seconds.clone(),
        );
        r.register(
            "token_fetches",
            "Bearer tokens fetched from upstream token realms",
            m.token_fetches.clone(),
        );
        r.register(
            "upstream_ratelimit_remaining",
            "The last ratelimit-remaining an upstream reported (Docker Hub pulls left)",
            m.ratelimit_remaining.clone(),
        );
        r.register(
            "evictions",
            "Items evicted from the cache, by reason",
            m.evictions.clone(),
        );
        r.register(
            "evicted_bytes",
            "Bytes evicted from the cache, by reason",
            m.evicted_bytes.clone(),
        );
        r.register(
            "downloads_not_kept",
            "Blob downloads served to their clients without being kept, by reason: too_large (over the budget or the filesystem), no_space (a spool write failed), commit_failed",
            m.not_kept.clone(),
        );
        r.register(
            "cache_bytes",
            "Bytes the cache takes on disk, downloads included",
            m.cache_bytes.clone(),
        );
        r.register(
            "cache_entries",
            "Items in the cache, by kind",
            m.cache_entries.clone(),
        );
        r.register(
            "stale_serves",
            "Tags and tag lists served from cache because the upstream failed",
            m.stale_serves.clone(),
        );
        // Upstream up, budget, disk, verification failures, readiness.
        m.signals.register(r);
        // A family, so that a mirror without TLS has no series (a 0 would
        // look like a certificate expired in 1970 to an alert).
        r.register(
            "tls_certificate_expiry_seconds",
            "When the served TLS certificate expires (its notAfter, Unix time)",
            m.tls_expiry.clone(),
        );
        r.register(
            "auth_bcrypt",
            "bcrypt checks run for client credentials (unknown users included)",
            m.auth_bcrypt.clone(),
        );
        r.register(
            "auth_refusals",
            "Client credentials refused: missing, malformed, invalid, or backoff (too many failures from the address)",
            m.auth_refusals.clone(),
        );
        r.register(
            "tier_hits",
            "Blobs served without the upstream, by the tier they came from (local disk, shared bucket, peer replica)",
            m.tier_hits.clone(),
        );
        r.register(
            "upstream_fills",
            "Blob downloads from an upstream (one per blob for the whole cluster when leases work)",
            m.upstream_fills.clone(),
        );
        r.register(
            "lease_takeovers",
            "Download leases taken over from a replica that could not be reached",
            m.lease_takeovers.clone(),
        );
        // Families: a single-node mirror has no shared parts, and no series.
        r.register(
            "shared_errors",
            "Failed calls to a shared part (redis, bucket)",
            m.shared_errors.clone(),
        );
        r.register(
            "shared_up",
            "Whether a shared part (redis, bucket) answered its last call (1) or not (0)",
            m.shared_up.clone(),
        );
        for result in ["ok", "failed"] {
            drop(m.warm_runs.get_or_create(&ResultLabels { result }));
        }
        let r = &mut m.registry;
        r.register(
            "warm_runs",
            "Scheduled warm-up checks of an image ([[warm]]), by result (ok, failed)",
            m.warm_runs.clone(),
        );
        // A family: an image has a series once it was warmed (a 0 would
        // look like a success in 1970 to an alert).
        r.register(
            "warm_last_success_timestamp_seconds",
            "When each [[warm]] image was last checked (and pulled) successfully, Unix time",
            m.warm_last_success.clone(),
        );
        r.register(
            "warm_fetched_bytes",
            "Bytes of manifests and blobs the scheduled warm-up fetched from upstreams",
            m.warm_fetched_bytes.clone(),
        );
        r.register(
            "warm_paused",
            "Whether the warm-up is paused because an upstream failed or rate-limited (1) or not (0)",
            m.warm_paused.clone(),
        );
        m
    }

    /// One warm-up check of `image`, and the bytes it fetched.
    pub fn warm_run(&self, image: &str, ok: bool, fetched: u64) {
        let result = if ok { "ok" } else { "failed" };
        self.warm_runs.get_or_create(&ResultLabels { result }).inc();
        self.warm_fetched_bytes.inc_by(fetched);
        if ok {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
            self.warm_last_success
                .get_or_create(&ImageLabels {
                    image: image.to_owned(),
                })
                .set(now);
        }
    }

    /// Whether the warm-up waits for a failing upstream.
    pub fn warm_paused(&self, paused: bool) {
        self.warm_paused.set(i64::from(paused));
    }

    /// The warm-up's images, for the status page.
    pub fn warm_statuses(&self, images: Vec<crate::warm::ImageStatus>) {
        *lock(&self.warm) = images;
    }

    /// A blob served from a tier without the upstream.
    pub fn tier_hit(&self, tier: &'static str) {
        self.tier_hits.get_or_create(&TierLabels { tier }).inc();
    }

    /// A download was filled from `origin` (`upstream`, `bucket`, `peer`).
    pub fn fill(&self, origin: &'static str) {
        match origin {
            "upstream" => {
                self.upstream_fills.inc();
            }
            tier => self.tier_hit(tier),
        }
    }

    pub fn lease_takeover(&self) {
        self.lease_takeovers.inc();
    }

    /// How a shared part stands: whether up, and its failures since start.
    pub fn shared(&self, part: &'static str, up: bool, errors: u64) {
        self.shared_up
            .get_or_create(&PartLabels { part })
            .set(i64::from(up));
        let mut seen = lock(&self.shared_seen);
        let (last, was_up) = seen.entry(part).or_insert((0, true));
        let counter = self.shared_errors.get_or_create(&PartLabels { part });
        counter.inc_by(errors.saturating_sub(*last));
        *last = errors.max(*last);
        *was_up = up;
    }

    /// The replicas the cluster has seen lately.
    pub fn peers_seen(&self, peers: Vec<(String, SystemTime)>) {
        *lock(&self.peers) = peers;
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// One answered request.
    pub fn request(
        &self,
        endpoint: &'static str,
        status: u16,
        kind: Option<&'static str>,
        outcome: &'static str,
    ) {
        self.requests
            .get_or_create(&RequestLabels { endpoint, status })
            .inc();
        if let Some(kind) = kind {
            if status < 400 {
                self.cache
                    .get_or_create(&CacheLabels { kind, outcome })
                    .inc();
                self.lookups.fetch_add(1, Ordering::Relaxed);
                if outcome == "hit" {
                    self.hits.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Body bytes sent to a client.
    pub fn client_bytes(&self, outcome: &'static str, bytes: u64) {
        self.client_bytes
            .get_or_create(&OutcomeLabels { outcome })
            .inc_by(bytes);
        if outcome == "hit" {
            self.bytes_from_cache.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// A manifest pulled by tag, for the most-pulled list.
    /// Counts a pull of `image` for the status page's top list. The map is
    /// bounded: past [`PULLS_KEPT`] images, a new one takes the place of the
    /// least pulled, from one (so a flood of new names never reaches the top).
    pub fn pulled(&self, image: &str) {
        let mut pulls = lock(&self.pulls);
        if let Some(n) = pulls.get_mut(image) {
            *n += 1;
            return;
        }
        if pulls.len() >= PULLS_KEPT {
            let least = pulls
                .iter()
                .min_by_key(|(_, n)| **n)
                .map(|(k, _)| k.clone());
            if let Some(k) = least {
                pulls.remove(&k);
            }
        }
        pulls.insert(image.to_owned(), 1);
    }

    pub fn upstream_bytes(&self, bytes: u64) {
        self.upstream_bytes.inc_by(bytes);
    }

    /// An upstream answered `status` after `elapsed`.
    pub fn upstream_answer(
        &self,
        upstream: &str,
        method: &str,
        status: u16,
        elapsed: Duration,
        ratelimit_remaining: Option<i64>,
    ) {
        self.upstream_requests
            .get_or_create(&UpstreamStatusLabels {
                upstream: upstream.to_owned(),
                method: method.to_owned(),
                status: status.to_string(),
            })
            .inc();
        let label = UpstreamLabels {
            upstream: upstream.to_owned(),
        };
        self.upstream_seconds
            .get_or_create(&label)
            .observe(elapsed.as_secs_f64());
        if let Some(r) = ratelimit_remaining {
            self.ratelimit_remaining.get_or_create(&label).set(r);
        }
        self.signals.upstream(upstream, status < 500);
        let mut health = lock(&self.upstream_health);
        let h = health.entry(upstream.to_owned()).or_default();
        if let Some(r) = ratelimit_remaining {
            h.ratelimit_remaining = Some((r, SystemTime::now()));
        }
        if status >= 500 || status == 429 {
            h.last_failure = Some((SystemTime::now(), format!("answered {status}")));
        } else {
            h.last_success = Some(SystemTime::now());
        }
    }

    /// An upstream request failed without an answer.
    pub fn upstream_failure(&self, upstream: &str, what: &str) {
        self.signals.upstream(upstream, false);
        self.upstream_errors
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_owned(),
            })
            .inc();
        lock(&self.upstream_health)
            .entry(upstream.to_owned())
            .or_default()
            .last_failure = Some((SystemTime::now(), what.to_owned()));
    }

    pub fn token_fetch(&self, upstream: &str) {
        self.token_fetches
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_owned(),
            })
            .inc();
    }

    pub fn eviction(&self, reason: &'static str, bytes: u64) {
        self.evictions.get_or_create(&ReasonLabels { reason }).inc();
        self.evicted_bytes
            .get_or_create(&ReasonLabels { reason })
            .inc_by(bytes);
    }

    /// What the cache holds now.
    pub fn cache_size(&self, bytes: u64, blobs: u64, manifests: u64) {
        self.cache_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        self.cache_entries
            .get_or_create(&KindLabels { kind: "blob" })
            .set(i64::try_from(blobs).unwrap_or(i64::MAX));
        self.cache_entries
            .get_or_create(&KindLabels { kind: "manifest" })
            .set(i64::try_from(manifests).unwrap_or(i64::MAX));
    }

    /// The certificate `cert` now served expires at `not_after` (unknown:
    /// its series is removed rather than left at an old value).
    pub fn tls_certificate(&self, cert: &str, not_after: Option<SystemTime>) {
        let labels = CertLabels {
            cert: cert.to_owned(),
        };
        let unix = not_after
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        match unix {
            Some(secs) => {
                self.tls_expiry.get_or_create(&labels).set(secs);
            }
            None => {
                self.tls_expiry.remove(&labels);
            }
        }
        *lock(&self.tls_not_after) = not_after;
    }

    pub fn stale_serve(&self) {
        self.stale_serves.inc();
    }

    /// One bcrypt check started.
    pub fn auth_bcrypt(&self) {
        self.auth_bcrypt.inc();
    }

    /// Credentials refused, for one of [`AUTH_REFUSALS`].
    /// A verified download's clients got the blob, but the cache did not
    /// keep it, for `reason` (one of [`NOT_KEPT`]).
    pub fn not_kept(&self, reason: &'static str) {
        self.not_kept.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub fn auth_refusal(&self, reason: &'static str) {
        self.auth_refusals
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// An error a client saw (4xx are the client's; only 5xx are kept).
    pub fn error(&self, status: u16, path: &str, message: String) {
        if status < 500 {
            return;
        }
        let mut recent = lock(&self.recent_errors);
        if recent.len() == RECENT_ERRORS {
            recent.pop_front();
        }
        recent.push_back(RecentError {
            at: SystemTime::now(),
            status,
            path: path.chars().take(200).collect(),
            message,
        });
    }

    /// The counters the status page charts, now.
    fn sample(&self, at: SystemTime) -> Sample {
        Sample {
            at,
            hits: self.hits.load(Ordering::Relaxed),
            lookups: self.lookups.load(Ordering::Relaxed),
            bytes_from_cache: self.bytes_from_cache.load(Ordering::Relaxed),
            upstream_bytes: self.upstream_bytes.get(),
        }
    }

    /// Keeps the counters of `at` in the history the status page charts.
    pub fn sample_history(&self, at: SystemTime) {
        let s = self.sample(at);
        lock(&self.history).record(s);
    }

    /// What the status page shows.
    pub fn snapshot(&self) -> Snapshot {
        let mut top: Vec<(String, u64)> = lock(&self.pulls)
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        top.truncate(10);
        let mut upstreams: Vec<(String, UpstreamHealth)> = lock(&self.upstream_health)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        upstreams.sort_by(|a, b| a.0.cmp(&b.0));
        let mut history = lock(&self.history).samples();
        history.push(self.sample(SystemTime::now()));
        Snapshot {
            history,
            hits: self.hits.load(Ordering::Relaxed),
            lookups: self.lookups.load(Ordering::Relaxed),
            bytes_from_cache: self.bytes_from_cache.load(Ordering::Relaxed),
            cache_bytes: u64::try_from(self.cache_bytes.get()).unwrap_or(0),
            top_pulled: top,
            upstreams,
            recent_errors: lock(&self.recent_errors).iter().rev().cloned().collect(),
            tls_not_after: *lock(&self.tls_not_after),
            peers: lock(&self.peers).clone(),
            tiers: ["local", "bucket", "peer"]
                .into_iter()
                .map(|tier| {
                    (
                        tier,
                        self.tier_hits.get_or_create(&TierLabels { tier }).get(),
                    )
                })
                .chain([("upstream", self.upstream_fills.get())])
                .collect(),
            shared: {
                let mut parts: Vec<_> = lock(&self.shared_seen)
                    .iter()
                    .map(|(part, (_, up))| (*part, *up))
                    .collect();
                parts.sort();
                parts
            },
            warm: lock(&self.warm).clone(),
        }
    }
}

/// A consistent-enough copy of what the status page shows.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The sampled counters, oldest first, ending with the counters now.
    pub history: Vec<Sample>,
    pub hits: u64,
    pub lookups: u64,
    pub bytes_from_cache: u64,
    pub cache_bytes: u64,
    pub top_pulled: Vec<(String, u64)>,
    pub upstreams: Vec<(String, UpstreamHealth)>,
    pub recent_errors: Vec<RecentError>,
    /// The served TLS certificate's expiry (`None` without TLS, or unread).
    pub tls_not_after: Option<SystemTime>,
    /// Replicas of the cluster seen lately, with when (empty on one node).
    pub peers: Vec<(String, SystemTime)>,
    /// Blobs served per tier (local, bucket, peer) and filled from upstream.
    pub tiers: Vec<(&'static str, u64)>,
    /// The shared parts (bucket, redis) and whether each answers.
    pub shared: Vec<(&'static str, bool)>,
    /// The scheduled warm-up's images (empty without `[[warm]]`).
    pub warm: Vec<crate::warm::ImageStatus>,
}

/// The `ratelimit-remaining` header: `100;w=21600` → 100.
pub fn parse_ratelimit(value: &str) -> Option<i64> {
    value.split(';').next()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unauthenticated pulls of ever new names must not grow memory without
    /// bound; the images pulled most stay on top.
    #[test]
    fn pull_counts_are_bounded_and_keep_the_top() {
        let m = Metrics::new();
        for _ in 0..50 {
            m.pulled("library/alpine:3");
        }
        for i in 0..20 * PULLS_KEPT {
            m.pulled(&format!("flood/{i}:latest"));
        }
        assert!(lock(&m.pulls).len() <= PULLS_KEPT);
        let top = m.snapshot().top_pulled;
        assert_eq!(top[0], ("library/alpine:3".to_owned(), 50));
    }

    #[test]
    fn counters_appear_in_the_exposition() {
        let m = Metrics::new();
        m.request("blob", 200, Some("blob"), "hit");
        m.request("blob", 200, Some("blob"), "miss");
        m.client_bytes("hit", 10);
        m.upstream_answer("docker.io", "GET", 200, Duration::from_millis(20), Some(99));
        m.eviction("size", 5);
        let text = m.encode();
        assert!(
            text.contains(r#"regmirror_cache_requests_total{kind="blob",outcome="hit"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"regmirror_client_bytes_total{outcome="hit"} 10"#),
            "{text}"
        );
        assert!(
            text.contains(r#"regmirror_upstream_ratelimit_remaining{upstream="docker.io"} 99"#),
            "{text}"
        );
        assert!(
            text.contains(r#"regmirror_evictions_total{reason="size"} 1"#),
            "{text}"
        );
        let s = m.snapshot();
        assert_eq!((s.hits, s.lookups, s.bytes_from_cache), (1, 2, 10));
    }

    #[test]
    fn ratelimit_header() {
        assert_eq!(parse_ratelimit("100;w=21600"), Some(100));
        assert_eq!(parse_ratelimit("7"), Some(7));
        assert_eq!(parse_ratelimit("x"), None);
    }

    #[test]
    fn only_server_errors_are_kept_and_at_most_twenty() {
        let m = Metrics::new();
        m.error(404, "/v2/x", "not found".into());
        for i in 0..25 {
            m.error(502, "/v2/y", format!("e{i}"));
        }
        let s = m.snapshot();
        assert_eq!(s.recent_errors.len(), 20);
        assert_eq!(s.recent_errors[0].message, "e24");
    }
}
