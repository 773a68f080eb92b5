//! The operator's endpoints beside the registry API: `/metrics`
//! (OpenMetrics text), `/healthz` (the process answers), `/readyz` (the cache
//! takes writes) and `/_/status` (a small HTML page, its charts drawn by
//! [`chart`]). Read-only.

pub mod chart;

use std::time::SystemTime;

use bytes::Bytes;
use http::{header, StatusCode};

use crate::error::Error;
use crate::metrics::Snapshot;
use crate::registry::Registry;
use crate::response::{self, Outcome, Reply};
use crate::tls::EXPIRY_WARNING;
use crate::units::human_bytes;

/// An operator endpoint, by path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpsEndpoint {
    Metrics,
    Health,
    Ready,
    Status,
}

impl OpsEndpoint {
    pub fn parse(path: &str) -> Option<Self> {
        match path {
            "/metrics" => Some(Self::Metrics),
            "/healthz" => Some(Self::Health),
            "/readyz" => Some(Self::Ready),
            "/_/status" | "/_/status/" => Some(Self::Status),
            _ => None,
        }
    }

    /// Probes must work without credentials; the rest shows what is pulled.
    pub fn needs_auth(self) -> bool {
        matches!(self, Self::Metrics | Self::Status)
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Metrics => "metrics",
            Self::Health => "healthz",
            Self::Ready => "readyz",
            Self::Status => "status",
        }
    }
}

/// Answers an operator endpoint.
pub async fn answer(registry: &Registry, which: OpsEndpoint, head: bool) -> Result<Reply, Error> {
    registry.refresh_shared_metrics();
    let (status, content_type, body) = match which {
        OpsEndpoint::Metrics => {
            // What /readyz would answer, for an alert (probed at most once
            // a second, however often this is scraped).
            let ready = registry.ready().await.is_ok();
            registry.metrics.set_ready(ready);
            registry
                .metrics
                .set_downloads_in_flight(registry.downloads_in_flight());
            (
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                registry.metrics.encode(),
            )
        }
        OpsEndpoint::Health => (
            StatusCode::OK,
            "text/plain; charset=utf-8",
            "ok\n".to_owned(),
        ),
        OpsEndpoint::Ready => {
            let ready = registry.ready().await;
            registry.metrics.set_ready(ready.is_ok());
            match ready {
                Ok(detail) => (
                    StatusCode::OK,
                    "text/plain; charset=utf-8",
                    std::iter::once("ready".to_owned())
                        .chain(detail)
                        .map(|l| l + "\n")
                        .collect(),
                ),
                Err(why) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain; charset=utf-8",
                    format!("not ready: {why}\n"),
                ),
            }
        }
        OpsEndpoint::Status => (
            StatusCode::OK,
            "text/html; charset=utf-8",
            status_page(
                &registry.metrics.snapshot(),
                registry.max_size(),
                SystemTime::now(),
            ),
        ),
    };
    let mut b = response::builder(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, body.len())
        .header(header::CACHE_CONTROL, "no-store");
    if which == OpsEndpoint::Status {
        b = b.header(header::CONTENT_SECURITY_POLICY, STATUS_PAGE_CSP);
    }
    let response = b
        .body(if head {
            response::empty()
        } else {
            response::full(Bytes::from(body))
        })
        .map_err(|e| Error::internal("building a response", e))?;
    Ok(Reply {
        response,
        outcome: Outcome::None,
    })
}

/// The status page has no script, image, font or form, only its own inline
/// `<style>` and `style=` attributes (the usage bar): anything else that got
/// into it (an escaping bug) is not loaded or run, and no other site may
/// frame it.
pub const STATUS_PAGE_CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; \
     base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Escapes text for HTML.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn ago(t: SystemTime, now: SystemTime) -> String {
    match now.duration_since(t) {
        Ok(d) => format!(
            "{} ago",
            humantime::format_duration(std::time::Duration::from_secs(d.as_secs()))
        ),
        Err(_) => "just now".to_owned(),
    }
}

/// The served certificate's expiry, red from [`EXPIRY_WARNING`] before it.
fn tls_card(at: SystemTime, now: SystemTime) -> String {
    let days = |d: std::time::Duration| match d.as_secs() / 86400 {
        1 => "1 day".to_owned(),
        n => format!("{n} days"),
    };
    let (class, what) = match at.duration_since(now) {
        Ok(left) if left >= EXPIRY_WARNING => ("ok", format!("expires in {}", days(left))),
        Ok(left) => ("bad", format!("expires in {}", days(left))),
        Err(past) => ("bad", format!("expired {} ago", days(past.duration()))),
    };
    format!(
        "\n<div class=card id=tls>TLS certificate<b class={class}>{what}</b>{}</div>",
        humantime::format_rfc3339_seconds(at)
    )
}

/// The tiers blobs came from, the shared parts and the peers seen: only for
/// a replica of a cluster (a single node has no shared part).
fn cluster_section(s: &Snapshot, now: SystemTime) -> String {
    if s.shared.is_empty() {
        return String::new();
    }
    let tiers: String = s
        .tiers
        .iter()
        .map(|(tier, n)| format!("<tr><td>{tier}</td><td class=n>{n}</td></tr>"))
        .collect();
    let parts: String = s
        .shared
        .iter()
        .map(|(part, up)| {
            format!(
                "<tr><td>{part}</td><td class={}>{}</td></tr>",
                if *up { "ok" } else { "bad" },
                if *up { "reachable" } else { "unreachable" }
            )
        })
        .collect();
    let mut peers: String = s
        .peers
        .iter()
        .map(|(peer, at)| format!("<tr><td>{}</td><td>{}</td></tr>", esc(peer), ago(*at, now)))
        .collect();
    if peers.is_empty() {
        peers.push_str("<tr><td colspan=2 class=none>none seen</td></tr>");
    }
    format!(
        "<h2>Cluster</h2>\n<table id=tiers><tr><th>blobs from</th><th class=n>count</th></tr>{tiers}</table>\n\
         <table id=shared><tr><th>shared part</th><th>state</th></tr>{parts}</table>\n\
         <table id=peers><tr><th>replica</th><th>last seen</th></tr>{peers}</table>\n"
    )
}

/// Below this many pulls left, the pull budget is shown red (and the rule
/// `RegmirrorPullBudgetLow` in `deploy/prometheus/alerts.yml` fires).
pub const PULLS_LOW: i64 = 20;

/// Docker Hub's pull budget: the lowest `ratelimit-remaining` an upstream
/// reported, and each upstream's last.
fn pull_budget_card(s: &Snapshot, now: SystemTime) -> String {
    let reported: Vec<(&str, i64, SystemTime)> = s
        .upstreams
        .iter()
        .filter_map(|(name, h)| h.ratelimit_remaining.map(|(n, at)| (name.as_str(), n, at)))
        .collect();
    let Some(lowest) = reported.iter().map(|r| r.1).min() else {
        return "\n<div class=card id=pulls>pulls left upstream<b class=none>–</b>no ratelimit-remaining reported</div>".to_owned();
    };
    let each: Vec<String> = reported
        .iter()
        .map(|(name, n, at)| format!("{}: {n}, {}", esc(name), ago(*at, now)))
        .collect();
    format!(
        "\n<div class=card id=pulls>pulls left upstream<b class={}>{lowest}</b>{}</div>",
        if lowest < PULLS_LOW { "bad" } else { "ok" },
        each.join("<br>")
    )
}

/// Bandwidth saved and the hit ratio over the last hour and day, from the
/// history the snapshot carries.
fn charts_section(s: &Snapshot, now: SystemTime) -> String {
    let mut out = String::from("<h2>Bandwidth saved and hit ratio</h2>\n<div class=charts>\n");
    for w in [chart::HOUR, chart::DAY] {
        let bars = chart::bars(&s.history, now, &w);
        let t = chart::total(&bars);
        let ratio = if t.lookups == 0 {
            "–".to_owned()
        } else {
            format!("{:.1}%", 100.0 * t.hits as f64 / t.lookups as f64)
        };
        let name = w.name;
        let saved_label =
            format!("bytes served from cache (green) and fetched upstream (grey), last {name}");
        let ratio_label = format!("hit ratio, last {name}");
        out.push_str(&format!(
            "<figure id=saved-{name}><figcaption>served from cache, last {name}<b>{saved}</b>{fetched} fetched upstream</figcaption>{svg_saved}</figure>\n\
             <figure id=ratio-{name}><figcaption>hit ratio, last {name}<b>{ratio}</b>{hits} hits of {lookups} lookups</figcaption>{svg_ratio}</figure>\n",
            saved = human_bytes(t.saved),
            fetched = human_bytes(t.fetched),
            svg_saved = chart::saved_svg(&format!("chart-saved-{name}"), &saved_label, &bars),
            hits = t.hits,
            lookups = t.lookups,
            svg_ratio = chart::ratio_svg(&format!("chart-ratio-{name}"), &ratio_label, &bars),
        ));
    }
    out.push_str("</div>\n");
    out
}

/// The status page: a pure function of a metrics snapshot and the budget.
pub fn status_page(s: &Snapshot, max_size: u64, now: SystemTime) -> String {
    let used_pct = if max_size == 0 {
        0.0
    } else {
        100.0 * s.cache_bytes as f64 / max_size as f64
    };
    let hit_ratio = if s.lookups == 0 {
        "–".to_owned()
    } else {
        format!("{:.1}%", 100.0 * s.hits as f64 / s.lookups as f64)
    };
    let mut top = String::new();
    for (image, pulls) in &s.top_pulled {
        top.push_str(&format!(
            "<tr><td>{}</td><td class=n>{pulls}</td></tr>",
            esc(image)
        ));
    }
    if top.is_empty() {
        top.push_str("<tr><td colspan=2 class=none>no pulls yet</td></tr>");
    }
    let mut ups = String::new();
    for (name, h) in &s.upstreams {
        let healthy = match (&h.last_success, &h.last_failure) {
            (_, None) => true,
            (Some(ok), Some((bad, _))) => ok > bad,
            (None, Some(_)) => false,
        };
        let last_ok = h
            .last_success
            .map_or_else(|| "never".to_owned(), |t| ago(t, now));
        let last_bad = h.last_failure.as_ref().map_or_else(
            || "–".to_owned(),
            |(t, why)| format!("{} ({})", ago(*t, now), esc(why)),
        );
        ups.push_str(&format!(
            "<tr><td>{}</td><td class={}>{}</td><td>{last_ok}</td><td>{last_bad}</td></tr>",
            esc(name),
            if healthy { "ok" } else { "bad" },
            if healthy { "healthy" } else { "failing" },
        ));
    }
    if ups.is_empty() {
        ups.push_str("<tr><td colspan=4 class=none>not contacted yet</td></tr>");
    }
    let cluster = cluster_section(s, now);
    let pulls = pull_budget_card(s, now);
    let charts = charts_section(s, now);
    let warm = crate::warm::status_section(&s.warm, now);
    let tls = s
        .tls_not_after
        .map_or_else(String::new, |at| tls_card(at, now));
    let mut errors = String::new();
    for e in &s.recent_errors {
        errors.push_str(&format!(
            "<tr><td>{}</td><td class=n>{}</td><td>{}</td><td>{}</td></tr>",
            ago(e.at, now),
            e.status,
            esc(&e.path),
            esc(&e.message)
        ));
    }
    if errors.is_empty() {
        errors.push_str("<tr><td colspan=4 class=none>none</td></tr>");
    }
    format!(
        r#"<!doctype html>
<html lang=en><head><meta charset=utf-8><title>regmirror status</title>
<meta name=viewport content="width=device-width, initial-scale=1">
<style>
body{{font:15px/1.4 system-ui,sans-serif;margin:2em auto;max-width:60em;color:#222;padding:0 1em}}
h1{{font-size:1.4em}} h2{{font-size:1.1em;margin-top:1.6em}}
.cards{{display:flex;gap:1em;flex-wrap:wrap}}
.card{{border:1px solid #ddd;border-radius:6px;padding:.8em 1.2em;min-width:10em}}
.card b{{display:block;font-size:1.5em}}
.bar{{background:#eee;border-radius:4px;height:.8em;margin-top:.4em}}
.bar span{{display:block;height:100%;border-radius:4px;background:#3a7}}
table{{border-collapse:collapse;width:100%}} td,th{{text-align:left;padding:.3em .6em;border-bottom:1px solid #eee}}
.n{{text-align:right}} .ok{{color:#2a6}} .bad{{color:#c33}} .none{{color:#888}}
.charts{{display:grid;grid-template-columns:repeat(2,minmax(0,1fr));gap:1em}}
figure{{margin:0;border:1px solid #ddd;border-radius:6px;padding:.6em .8em}}
figcaption b{{display:block;font-size:1.2em}} .chart{{display:block;margin-top:.4em;max-width:100%}}
</style></head><body>
<h1>regmirror</h1>
<div class=cards>
<div class=card id=usage>cache use<b>{used} of {budget}</b><div class=bar><span style="width:{bar:.1}%"></span></div>{used_pct:.1}%</div>
<div class=card id=hits>hit ratio<b>{hit_ratio}</b>{hits} hits of {lookups} lookups</div>
<div class=card id=saved>served from cache<b>{saved}</b>not fetched from upstream</div>{pulls}{tls}
</div>
{charts}{warm}<h2>Most pulled images</h2>
<table id=top><tr><th>image</th><th class=n>pulls</th></tr>{top}</table>
<h2>Upstreams</h2>
<table id=upstreams><tr><th>registry</th><th>state</th><th>last success</th><th>last failure</th></tr>{ups}</table>
{cluster}<h2>Recent errors</h2>
<table id=errors><tr><th>when</th><th class=n>status</th><th>path</th><th>error</th></tr>{errors}</table>
</body></html>
"#,
        used = human_bytes(s.cache_bytes),
        budget = human_bytes(max_size),
        bar = used_pct.min(100.0),
        hits = s.hits,
        lookups = s.lookups,
        saved = human_bytes(s.bytes_from_cache),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{RecentError, UpstreamHealth};

    #[test]
    fn page_shows_the_numbers_and_escapes_input() {
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        let minute = std::time::Duration::from_secs(60);
        let sample = |ago: u32, hits, lookups, saved| crate::metrics::Sample {
            at: now - minute * ago,
            hits,
            lookups,
            bytes_from_cache: saved,
            upstream_bytes: 0,
        };
        let s = Snapshot {
            history: vec![
                sample(90, 0, 0, 0),
                sample(70, 1, 2, 1024),
                sample(0, 3, 4, 2048),
            ],
            hits: 3,
            lookups: 4,
            bytes_from_cache: 2048,
            cache_bytes: 512 * 1024 * 1024,
            top_pulled: vec![("docker.io/library/alpine:3.19".into(), 7)],
            upstreams: vec![(
                "docker.io".into(),
                UpstreamHealth {
                    last_success: Some(now),
                    last_failure: None,
                    ratelimit_remaining: Some((57, now - minute)),
                },
            )],
            recent_errors: vec![RecentError {
                at: now,
                status: 502,
                path: "/v2/<script>".into(),
                message: "upstream answered 503".into(),
            }],
            tls_not_after: None,
            peers: vec![("http://10.0.0.8:5000/<b>".into(), now)],
            tiers: vec![("local", 5), ("bucket", 2), ("peer", 1), ("upstream", 3)],
            shared: vec![("bucket", true), ("redis", false)],
            warm: Vec::new(),
        };
        let html = status_page(&s, 1024 * 1024 * 1024, now);
        assert!(html.contains("512.0 MiB of 1.0 GiB"), "{html}");
        assert!(html.contains("75.0%"));
        assert!(html.contains("docker.io/library/alpine:3.19</td><td class=n>7"));
        assert!(html.contains("/v2/&lt;script&gt;"));
        assert!(!html.contains("<script>"));
        assert!(html.contains("healthy"));
        assert!(!html.contains("id=tls"), "no TLS, no certificate card");
        assert!(
            html.contains("<b class=ok>57</b>docker.io: 57, 1m ago</div>"),
            "{html}"
        );
        // A change counts where its later sample is: the one 70 minutes ago
        // is the day's, not the hour's.
        for (id, caption) in [
            ("saved-hour", "<b>1.0 KiB</b>"),
            ("saved-day", "<b>2.0 KiB</b>"),
            ("ratio-hour", "<b>100.0%</b>2 hits of 2 lookups"),
            ("ratio-day", "<b>75.0%</b>3 hits of 4 lookups"),
        ] {
            let at = html.find(&format!("<figure id={id}>")).expect(id);
            let figure = &html[at..at + html[at..].find("</figure>").unwrap()];
            assert!(figure.contains(caption), "{caption} in {figure}");
            assert!(figure.contains("<svg id=\"chart-"), "{figure}");
        }
        assert!(html.contains("<td>bucket</td><td class=n>2</td>"), "{html}");
        assert!(
            html.contains("<td>redis</td><td class=bad>unreachable</td>"),
            "{html}"
        );
        assert!(
            html.contains("<td>http://10.0.0.8:5000/&lt;b&gt;</td>"),
            "{html}"
        );
        let low = Snapshot {
            upstreams: vec![(
                "docker.io".into(),
                UpstreamHealth {
                    ratelimit_remaining: Some((3, now)),
                    ..UpstreamHealth::default()
                },
            )],
            ..s.clone()
        };
        assert!(status_page(&low, 1, now).contains("<b class=bad>3</b>"));
        let unreported = Snapshot {
            upstreams: Vec::new(),
            history: Vec::new(),
            ..s.clone()
        };
        let html = status_page(&unreported, 1, now);
        assert!(
            html.contains("<b class=none>–</b>no ratelimit-remaining reported"),
            "{html}"
        );
        assert!(
            html.contains("<figure id=saved-hour>") && !html.contains("<rect"),
            "no history, empty charts: {html}"
        );
        let single = Snapshot {
            shared: Vec::new(),
            peers: Vec::new(),
            ..s
        };
        assert!(
            !status_page(&single, 1, now).contains("Cluster"),
            "one node has no cluster section"
        );
    }

    #[test]
    fn certificate_card_turns_red_two_weeks_before_expiry() {
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000);
        let day = std::time::Duration::from_secs(86400);
        assert!(tls_card(now + 90 * day, now).contains("<b class=ok>expires in 90 days</b>"));
        assert!(
            tls_card(now + 3 * day + day / 2, now).contains("<b class=bad>expires in 3 days</b>")
        );
        assert!(tls_card(now - day, now).contains("<b class=bad>expired 1 day ago</b>"));
        assert!(tls_card(now, now).contains("2001-09-09T01:46:40Z"));
    }

    #[test]
    fn paths() {
        assert_eq!(OpsEndpoint::parse("/metrics"), Some(OpsEndpoint::Metrics));
        assert_eq!(OpsEndpoint::parse("/_/status"), Some(OpsEndpoint::Status));
        assert_eq!(OpsEndpoint::parse("/v2/"), None);
        assert!(!OpsEndpoint::Health.needs_auth());
    }
}
