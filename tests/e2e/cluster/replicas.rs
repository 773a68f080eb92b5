//! The replicas: `regmirror serve` processes started as [`crate::mirror::Mirror`]s, each on its
//! own port and data directory (its local tier), all with the same bucket, Redis and secret,
//! each advertising its own URL. Also what an operator reads off one: its `/metrics` (the
//! cluster's counters and gauges) and `/readyz`.

use std::path::Path;

use crate::mirror::{Mirror, Options};

/// The cluster's metric names, as each replica exposes them on `/metrics`.
pub mod names {
    /// Hits per tier: `tier="local"`, `"bucket"` or `"peer"`.
    pub const TIER_HITS: &str = "regmirror_tier_hits_total";
    /// Fills from the upstream this replica ran (it held the lease).
    pub const UPSTREAM_FILLS: &str = "regmirror_upstream_fills_total";
    /// Leases this replica took over from a holder it could not reach.
    pub const LEASE_TAKEOVERS: &str = "regmirror_lease_takeovers_total";
    /// Failed calls to a shared part: `part="redis"` or `"bucket"`.
    pub const SHARED_ERRORS: &str = "regmirror_shared_errors_total";
    /// Whether a shared part answered when last used (1) or not (0), by `part`.
    pub const SHARED_UP: &str = "regmirror_shared_up";
}

/// Starts one replica in `dir` in front of `upstream` with `env` (every replica's variables
/// and this one's own), on `port` or a free one, advertising `http://127.0.0.1:PORT`.
pub async fn start(
    dir: &Path,
    upstream: &str,
    env: &[(String, String)],
    port: Option<u16>,
) -> Mirror {
    let opts = Options {
        env: env.to_vec(),
        own_url_env: Some("REGMIRROR_CLUSTER_ADVERTISE".to_owned()),
        port,
        ..Options::default()
    };
    Mirror::start_with(dir, upstream, &opts).await
}

/// `GET http://ADDR/PATH`: status and body (a connection error panics).
async fn get(addr: &str, path: &str) -> (u16, String) {
    let url = format!("http://{addr}{path}");
    let resp = reqwest::Client::new()
        .get(&url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

/// The replica's `/metrics` text.
pub async fn metrics(replica: &Mirror) -> String {
    let (status, text) = get(&replica.addr(), "/metrics").await;
    assert_eq!(status, 200, "GET /metrics of {}: {text}", replica.addr());
    text
}

/// The replica's `/readyz`: status and body.
pub async fn readyz(replica: &Mirror) -> (u16, String) {
    get(&replica.addr(), "/readyz").await
}

/// The sum of the samples of metric `name` whose labels include every `labels` pair (a
/// counter is named with its `_total`); `None` when it has no such sample.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (set, value) = match rest.strip_prefix('{') {
            Some(r) => match r.split_once('}') {
                Some((set, value)) => (set, value),
                None => continue,
            },
            None if rest.starts_with(' ') => ("", rest),
            None => continue,
        };
        let matches = labels
            .iter()
            .all(|(k, v)| set.split(',').any(|l| l.trim() == format!("{k}=\"{v}\"")));
        if !matches {
            continue;
        }
        if let Some(v) = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// Like [`sample`] on the replica's `/metrics` now, 0 when absent (a counter not yet counted).
pub async fn value(replica: &Mirror, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(&metrics(replica).await, name, labels).unwrap_or(0.0)
}

/// Whether gauge `name` with `labels` reads `want` on the replica's `/metrics` now (absent is
/// not 0).
pub async fn gauge_is(replica: &Mirror, name: &str, labels: &[(&str, &str)], want: f64) -> bool {
    sample(&metrics(replica).await, name, labels) == Some(want)
}

#[test]
fn reads_samples_of_openmetrics_text() {
    let text = "# TYPE regmirror_tier_hits counter\n\
                regmirror_tier_hits_total{tier=\"local\"} 3\n\
                regmirror_tier_hits_total{tier=\"peer\",x=\"1\"} 2\n\
                regmirror_shared_up{part=\"redis\"} 0\n\
                regmirror_upstream_fills_total 5\n\
                regmirror_upstream_fills_created 1.7e9\n";
    assert_eq!(
        sample(text, names::TIER_HITS, &[("tier", "peer")]),
        Some(2.0)
    );
    assert_eq!(sample(text, names::TIER_HITS, &[]), Some(5.0));
    assert_eq!(sample(text, names::UPSTREAM_FILLS, &[]), Some(5.0));
    assert_eq!(
        sample(text, names::SHARED_UP, &[("part", "redis")]),
        Some(0.0)
    );
    assert_eq!(sample(text, names::SHARED_UP, &[("part", "bucket")]), None);
}
