//! The status page `/_/status` of a mirror that served pulls, a failing upstream request and
//! hostile paths, behind an upstream that reports `ratelimit-remaining`: its numbers agree
//! with `/metrics`, the most pulled images are listed, the upstream's state, the pull budget
//! left and the recent error are shown, the charts of bandwidth saved and hit ratio over the
//! last hour and day are drawn (inline SVG), nothing a client sent appears unescaped; and the
//! page rendered by headless Chromium (a screenshot kept under `target/tmp/`, and the rendered
//! DOM checked for the same numbers and the charts' SVG).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::fake_upstream::Failure;
use crate::common::front::{exchange, Reply};
use crate::common::observe::{RatelimitProxy, Scrape};
use crate::common::{random_bytes, start_mirror, FakeUpstream, MirrorHandle};
use crate::{delta, pull_expecting, scrape, scrape_until, REPO};

const CHROMIUM: &str = "/usr/bin/chromium";
const BUDGET: u64 = 64 << 20;
/// Docker Hub's pulls left, as the upstream (the proxy in front of the fake) reports them.
const PULLS_LEFT: &str = "57;w=21600";

/// What the page must show, as `/metrics` counts it.
struct Expected {
    usage: String,
    hits: String,
    ratio: String,
    saved: String,
    error_status: u16,
}

/// Bytes as the status page writes them.
fn human(n: u64) -> String {
    regmirror::units::human_bytes(n)
}

/// A mirror that pulled `team/app:v1` twice (a miss, then hits) and `team/app:v2` once, saw
/// the upstream fail one tag with 503 and was sent hostile paths; every upstream answer said
/// [`PULLS_LEFT`]. Returns what its status page must show. The fake and the proxy must
/// outlive the mirror.
async fn busy_mirror(fake: &FakeUpstream, proxy: &RatelimitProxy) -> (MirrorHandle, Expected) {
    let v1 = fake.add_image(REPO, "v1", vec![random_bytes(70_000, 80)]);
    let v2 = fake.add_image(REPO, "v2", vec![random_bytes(30_000, 81)]);
    proxy.set_remaining(Some(PULLS_LEFT));
    let m = start_mirror(&proxy.url(), |c| {
        c.cache.max_size = regmirror::config::ByteSize(BUDGET)
    })
    .await;
    let s0 = scrape(&m).await;
    pull_expecting(&m, &v1, "v1", "miss").await;
    let again = pull_expecting(&m, &v1, "v1", "hit").await;
    pull_expecting(&m, &v2, "v2", "miss").await;

    fake.set(|f| {
        f.fail = Some(Failure {
            status: 503,
            retry_after: None,
            path_contains: Some("/manifests/broken".into()),
        })
    });
    let r = m
        .get(&format!("/v2/{REPO}/manifests/broken"))
        .await
        .unwrap();
    let error_status = r.status().as_u16();
    assert!(
        error_status >= 500,
        "an upstream 503 is a 5xx: {error_status}"
    );

    let addr = m.url.trim_start_matches("http://").parse().unwrap();
    for path in [
        "/v2/<script>alert(1)</script>/manifests/1",
        "/v2/team/app/manifests/%22%3E%3Cscript%3Ealert(1)%3C/script%3E",
        "/v2/team/app\"&amp;/manifests/1",
    ] {
        let req = format!("GET {path} HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n");
        match exchange(addr, req.as_bytes(), Duration::from_secs(10)).await {
            Reply::Status(s, _) => assert!((400..500).contains(&s), "{path}: {s}"),
            other => panic!("{path}: {other:?}"),
        }
    }

    let on_disk = crate::common::cache::disk_usage(&m.data_dir) as f64;
    let s = scrape_until(&m, |s| {
        delta(
            &s0,
            s,
            "regmirror_client_bytes_total",
            &[("outcome", "hit")],
        ) >= again as f64
            && s.get("regmirror_cache_bytes", &[]) == on_disk
    })
    .await;
    let cr = "regmirror_cache_requests_total";
    let (hits, lookups) = (s.sum(cr, &[("outcome", "hit")]), s.sum(cr, &[]));
    assert_eq!((hits, lookups), (3.0, 9.0), "{}", s.show(cr));
    let expected = Expected {
        usage: format!("{} of {}", human(on_disk as u64), human(BUDGET)),
        hits: format!("{hits} hits of {lookups} lookups"),
        ratio: format!("{:.1}%", 100.0 * hits / lookups),
        saved: human(s.get("regmirror_client_bytes_total", &[("outcome", "hit")]) as u64),
        error_status,
    };
    (m, expected)
}

/// The text of the element `id=<id>` up to its closing `tag`, in `html`.
fn element<'a>(html: &'a str, id: &str, tag: &str) -> &'a str {
    let start = html
        .find(&format!("id={id}"))
        .or_else(|| html.find(&format!("id=\"{id}\"")))
        .unwrap_or_else(|| panic!("no element id={id} in:\n{html}"));
    let end = html[start..]
        .find(&format!("</{tag}>"))
        .unwrap_or_else(|| panic!("id={id} is not closed"));
    &html[start..start + end]
}

/// Asserts the page (served HTML, or the DOM Chromium rendered, where attributes are quoted).
fn assert_page(html: &str, want: &Expected, q: &str) {
    let usage = element(html, "usage", "div");
    assert!(
        usage.contains(&want.usage),
        "usage `{}`: {usage}",
        want.usage
    );
    let hits = element(html, "hits", "div");
    assert!(
        hits.contains(&want.ratio),
        "hit ratio `{}`: {hits}",
        want.ratio
    );
    assert!(hits.contains(&want.hits), "`{}`: {hits}", want.hits);
    let saved = element(html, "saved", "div");
    assert!(
        saved.contains(&want.saved),
        "saved `{}`: {saved}",
        want.saved
    );
    let top = element(html, "top", "table");
    let row = |image: &str, n: u32| format!("<td>docker.io/{image}</td><td class={q}n{q}>{n}</td>");
    let (r1, r2) = (row("team/app:v1", 2), row("team/app:v2", 1));
    let (p1, p2) = (top.find(&r1), top.find(&r2));
    assert!(p1.is_some() && p2.is_some(), "rows {r1} and {r2} in: {top}");
    assert!(p1 < p2, "the most pulled first: {top}");
    assert!(!top.contains("broken"), "a failed tag is no pull: {top}");
    let ups = element(html, "upstreams", "table");
    assert!(ups.contains("<td>docker.io</td>"), "{ups}");
    assert!(
        ups.contains("failing") && ups.contains("answered 503"),
        "{ups}"
    );
    let errors = element(html, "errors", "table");
    let path = format!("/v2/{REPO}/manifests/broken");
    assert!(errors.contains(&path), "{path} in: {errors}");
    assert!(
        errors.contains(&format!(">{}<", want.error_status)),
        "{errors}"
    );
    let lower = html.to_lowercase();
    assert!(
        !lower.contains("<script"),
        "a script element in the page:\n{html}"
    );
    assert!(
        !lower.contains("alert(1)"),
        "a hostile path reached the page:\n{html}"
    );
    let pulls = element(html, "pulls", "div");
    assert!(
        pulls.contains(">57</b>docker.io: 57,"),
        "pulls left 57: {pulls}"
    );
    assert_charts(html, want);
}

/// The charts: an SVG each for bandwidth saved and hit ratio over the last hour and day, with
/// the bytes served from the cache drawn as a bar and the hit ratio as a point or line, and the
/// captions' totals those of `/metrics` (the first sample is taken as the mirror starts).
fn assert_charts(html: &str, want: &Expected) {
    for window in ["hour", "day"] {
        let saved = element(html, &format!("saved-{window}"), "figure");
        assert!(
            saved.contains(&format!("<b>{}</b>", want.saved)),
            "saved over the last {window} `{}`: {saved}",
            want.saved
        );
        let svg = element(saved, &format!("chart-saved-{window}"), "svg");
        assert!(svg.contains("<rect"), "no bar in {svg}");
        let ratio = element(html, &format!("ratio-{window}"), "figure");
        assert!(
            ratio.contains(&format!("<b>{}</b>{}", want.ratio, want.hits)),
            "hit ratio over the last {window}: {ratio}"
        );
        let svg = element(ratio, &format!("chart-ratio-{window}"), "svg");
        assert!(
            svg.contains("<circle") || svg.contains("<polyline"),
            "no point in {svg}"
        );
        assert!(svg.contains("role=\"img\""), "{svg}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_shows_what_metrics_count() {
    let fake = FakeUpstream::start().await;
    let proxy = RatelimitProxy::start(&fake.url()).await;
    let (m, want) = busy_mirror(&fake, &proxy).await;
    let r = m.get("/_/status").await.unwrap();
    assert_eq!(r.status(), 200);
    let ct = crate::common::header(&r, "content-type");
    assert!(ct.starts_with("text/html"), "{ct}");
    // Nothing that got into the page could load or run anything, and the page is not framed.
    let csp = crate::common::header(&r, "content-security-policy");
    for directive in ["default-src 'none'", "frame-ancestors 'none'"] {
        assert!(csp.contains(directive), "CSP without {directive}: {csp:?}");
    }
    assert!(
        !csp.contains("script-src"),
        "the page needs no script: {csp:?}"
    );
    assert_eq!(
        crate::common::header(&r, "x-content-type-options"),
        "nosniff"
    );
    let html = r.text().await.unwrap();
    assert_page(&html, &want, "");
    let s: Scrape = scrape(&m).await;
    assert!(
        s.get(
            "regmirror_http_requests_total",
            &[("endpoint", "status"), ("status", "200")]
        ) >= 1.0
    );
}

/// Runs Chromium headless on `url` with `mode` (`--screenshot=PATH` or `--dump-dom`) and a
/// profile of its own; returns its stdout.
async fn chromium(url: &str, mode: &str, profile: &Path) -> String {
    assert!(
        Path::new(CHROMIUM).is_file(),
        "{CHROMIUM} is missing: the status page test renders the page in headless Chromium \
         (install the Debian package `chromium`)"
    );
    let mut cmd = tokio::process::Command::new(CHROMIUM);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1000,900",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .arg(mode)
    .arg(url)
    .stdin(std::process::Stdio::null())
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("chromium {mode} {url} ran for over 60 s"))
        .unwrap_or_else(|e| panic!("cannot run {CHROMIUM}: {e}"));
    assert!(
        out.status.success(),
        "chromium {mode} {url} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_renders_in_headless_chromium() {
    let fake = FakeUpstream::start().await;
    let proxy = RatelimitProxy::start(&fake.url()).await;
    let (m, want) = busy_mirror(&fake, &proxy).await;
    let url = m.url_for("/_/status");
    let profiles = tempfile::tempdir().unwrap();
    let out_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ops-status-page");
    std::fs::create_dir_all(&out_dir).unwrap();
    let png = out_dir.join("status.png");
    let _ = std::fs::remove_file(&png);

    let shot = format!("--screenshot={}", png.display());
    chromium(&url, &shot, &profiles.path().join("shot")).await;
    let bytes = std::fs::read(&png).unwrap_or_else(|e| panic!("{}: {e}", png.display()));
    assert_eq!(
        &bytes[..8],
        b"\x89PNG\r\n\x1a\n",
        "not a PNG: {}",
        png.display()
    );
    let dim = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    assert_eq!((dim(16), dim(20)), (1000, 900), "screenshot size");
    assert!(
        bytes.len() > 20_000,
        "{} is only {} bytes: an empty page?",
        png.display(),
        bytes.len()
    );
    println!("status page screenshot: {}", png.display());
    eprintln!("status page screenshot: {}", png.display());

    let dom = chromium(&url, "--dump-dom", &profiles.path().join("dom")).await;
    assert_page(&dom, &want, "\"");
}
