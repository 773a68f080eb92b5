//! The operator's view of a mirror against the in-process fake upstream: `/metrics` counters
//! moving exactly as the pulls behind them (miss, hit, coalesced, pass, eviction, stale serve,
//! token fetches, upstream bytes and requests, the ratelimit gauge, verification failures by
//! what failed), the `X-Cache` header,
//! `/healthz` and `/readyz` (503 while the data dir takes no writes), the ops endpoints behind
//! `[auth]` and on the `metrics.listen` listener. The status page is in `ops/status_page.rs`,
//! `regmirror prefetch` in `ops/prefetch.rs`, `regmirror import` of hostile bundles in
//! `ops/hostile_bundles.rs`, the options every subcommand shares in `ops/cli.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "ops/cli.rs"]
mod cli;
mod common;
#[path = "ops/hostile_bundles.rs"]
mod hostile_bundles;
#[path = "ops/prefetch.rs"]
mod prefetch;
#[path = "ops/status_page.rs"]
mod status_page;

use std::time::{Duration, Instant};

use common::cache::disk_usage;
use common::front::{basic, htpasswd_line, Front};
use common::images::ImageInfo;
use common::observe::{RatelimitProxy, Scrape};
use common::{count_files, header, random_bytes, start_mirror, FakeUpstream, MirrorHandle};
use regmirror::config::ByteSize;

const REPO: &str = "team/app";
const MIB: usize = 1 << 20;
const UP: (&str, &str) = ("upstream", "docker.io");
/// The metric families a pull (miss, then hit) exposes. (prometheus-client writes a family
/// only once it has a sample: errors, the ratelimit gauge and evictions appear with their first
/// event; the tests of those check their values.)
const FAMILIES: [&str; 10] = [
    "http_requests",
    "cache_requests",
    "client_bytes",
    "upstream_bytes",
    "upstream_requests",
    "upstream_request_seconds",
    "token_fetches",
    "cache_bytes",
    "cache_entries",
    "stale_serves",
];

/// `GET base/metrics` (with `auth` as `Authorization`), checked for the OpenMetrics format.
pub async fn scrape_at(client: &reqwest::Client, base: &str, auth: Option<&str>) -> Scrape {
    let mut req = client.get(format!("{base}/metrics"));
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    let resp = req.send().await.expect("GET /metrics");
    assert_eq!(resp.status(), 200, "GET {base}/metrics");
    let ct = header(&resp, "content-type");
    assert!(
        ct.starts_with("application/openmetrics-text"),
        "/metrics content type: {ct}"
    );
    let text = resp.text().await.expect("metrics body");
    assert!(text.trim_end().ends_with("# EOF"), "no `# EOF`:\n{text}");
    Scrape::parse(&text)
}

pub async fn scrape(m: &MirrorHandle) -> Scrape {
    scrape_at(&m.client, &m.url, None).await
}

/// Scrapes until `cond` holds (at most 10 s: counters of a body are recorded when it ends, the
/// cache gauges after the eviction run a download triggers); returns the last scrape.
pub async fn scrape_until(m: &MirrorHandle, cond: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = scrape(m).await;
        if cond(&s) || Instant::now() > deadline {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// `name{labels}` in `after` minus in `before`.
pub fn delta(before: &Scrape, after: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    after.get(name, labels) - before.get(name, labels)
}

pub fn cache(kind: &'static str, outcome: &'static str) -> [(&'static str, &'static str); 2] {
    [("kind", kind), ("outcome", outcome)]
}

/// GETs `path`, asserting 200 and `X-Cache: want`; returns the body length.
pub async fn get_expecting(m: &MirrorHandle, path: &str, want: &str) -> u64 {
    let r = m.get(path).await.expect("request");
    assert_eq!(r.status(), 200, "GET {path}");
    assert_eq!(header(&r, "x-cache"), want, "X-Cache of GET {path}");
    r.bytes().await.expect("body").len() as u64
}

/// Pulls `REPO:tag` (manifest by tag, then each blob), asserting every answer's `X-Cache` is
/// `want`. Returns the body bytes the client received.
pub async fn pull_expecting(m: &MirrorHandle, img: &ImageInfo, tag: &str, want: &str) -> u64 {
    let mut n = get_expecting(m, &format!("/v2/{REPO}/manifests/{tag}"), want).await;
    for (digest, _) in img.blobs() {
        n += get_expecting(m, &format!("/v2/{REPO}/blobs/{digest}"), want).await;
    }
    n
}

fn blob_bytes(img: &ImageInfo) -> u64 {
    img.blobs().iter().map(|(_, b)| b.len() as u64).sum()
}

/// Upstream requests the fake logged, (total, answered with a 401 challenge).
fn fake_requests(fake: &FakeUpstream) -> (f64, f64) {
    let r = fake.requests();
    let challenged = r.iter().filter(|s| !s.authorized).count();
    (r.len() as f64, challenged as f64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_then_a_hit_move_every_counter_exactly() {
    let fake = FakeUpstream::start().await;
    let img = fake.add_image(
        REPO,
        "v1",
        vec![random_bytes(300_000, 1), random_bytes(20_000, 2)],
    );
    let m = start_mirror(&fake.url(), |_| {}).await;
    let pulled = img.manifest.len() as u64 + blob_bytes(&img);

    let s0 = scrape(&m).await;
    let got = pull_expecting(&m, &img, "v1", "miss").await;
    assert_eq!(got, pulled);
    let s1 = scrape_until(&m, |s| {
        delta(
            &s0,
            s,
            "regmirror_client_bytes_total",
            &[("outcome", "miss")],
        ) >= pulled as f64
            && s.get("regmirror_cache_entries", &[("kind", "blob")]) == 3.0
    })
    .await;
    let d = |name: &str, labels: &[(&str, &str)]| delta(&s0, &s1, name, labels);
    let why = s1.show("regmirror_");
    let cr = "regmirror_cache_requests_total";
    assert_eq!(d(cr, &cache("manifest", "miss")), 1.0, "{why}");
    assert_eq!(d(cr, &cache("blob", "miss")), 3.0, "{why}");
    assert_eq!(s1.sum(cr, &[]) - s0.sum(cr, &[]), 4.0, "only misses: {why}");
    let hr = "regmirror_http_requests_total";
    assert_eq!(d(hr, &[("endpoint", "manifest"), ("status", "200")]), 1.0);
    assert_eq!(d(hr, &[("endpoint", "blob"), ("status", "200")]), 3.0);
    assert_eq!(
        d("regmirror_client_bytes_total", &[("outcome", "miss")]),
        pulled as f64,
        "client bytes of the miss: manifest and blobs ({why})"
    );
    assert_eq!(
        d("regmirror_upstream_bytes_total", &[]),
        blob_bytes(&img) as f64,
        "upstream bytes are the blob sizes fetched"
    );
    let tokens = fake.token_fetches().len() as f64;
    assert_eq!(tokens, 1.0, "one token for one repository");
    assert_eq!(d("regmirror_token_fetches_total", &[UP]), tokens, "{why}");
    let (sent, challenged) = fake_requests(&fake);
    let ur = "regmirror_upstream_requests_total";
    assert_eq!(s1.sum(ur, &[UP]) - s0.sum(ur, &[UP]), sent, "{why}");
    assert_eq!(s1.sum(ur, &[UP, ("status", "401")]), challenged, "{why}");
    let seconds = "regmirror_upstream_request_seconds_count";
    assert_eq!(
        d(seconds, &[UP]),
        sent,
        "one observation per upstream answer"
    );
    assert_eq!(d("regmirror_upstream_errors_total", &[UP]), 0.0);
    assert_eq!(
        s1.get("regmirror_cache_entries", &[("kind", "manifest")]),
        1.0
    );
    let on_disk = disk_usage(&m.data_dir) as f64;
    let s1 = scrape_until(&m, |s| s.get("regmirror_cache_bytes", &[]) == on_disk).await;
    assert_eq!(s1.get("regmirror_cache_bytes", &[]), on_disk, "cache_bytes");

    // The second pull: all hits, nothing upstream.
    fake.reset_counts();
    let got = pull_expecting(&m, &img, "v1", "hit").await;
    assert_eq!(got, pulled);
    let s2 = scrape_until(&m, |s| {
        delta(
            &s1,
            s,
            "regmirror_client_bytes_total",
            &[("outcome", "hit")],
        ) >= pulled as f64
    })
    .await;
    let d = |name: &str, labels: &[(&str, &str)]| delta(&s1, &s2, name, labels);
    let why = s2.show("regmirror_");
    assert_eq!(d(cr, &cache("manifest", "hit")), 1.0, "{why}");
    assert_eq!(d(cr, &cache("blob", "hit")), 3.0, "{why}");
    assert_eq!(s2.sum(cr, &[]) - s1.sum(cr, &[]), 4.0, "only hits: {why}");
    assert_eq!(
        d("regmirror_client_bytes_total", &[("outcome", "hit")]),
        pulled as f64
    );
    assert_eq!(d("regmirror_upstream_bytes_total", &[]), 0.0);
    assert_eq!(s2.sum(ur, &[]) - s1.sum(ur, &[]), 0.0, "{why}");
    assert_eq!(d("regmirror_token_fetches_total", &[UP]), 0.0);
    assert!(fake.requests().is_empty(), "{:?}", fake.requests());
    for family in FAMILIES {
        let line = format!("# TYPE regmirror_{family} ");
        assert!(s2.text.contains(&line), "no `{line}` in:\n{}", s2.text);
    }

    // A HEAD of a blob the mirror does not have is answered from the upstream's HEAD: a pass.
    let other = fake.add_blob(REPO, random_bytes(5_000, 3));
    let r = m.head(&format!("/v2/{REPO}/blobs/{other}")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-cache"), "pass");
    let s3 = scrape(&m).await;
    assert_eq!(delta(&s2, &s3, cr, &cache("blob", "pass")), 1.0);
    assert_eq!(delta(&s2, &s3, "regmirror_upstream_bytes_total", &[]), 0.0);

    // Another repository needs a token of its own scope.
    fake.add_image("team/other", "1", vec![random_bytes(1_000, 4)]);
    m.get_ok("/v2/team/other/manifests/1").await;
    let s4 = scrape(&m).await;
    assert_eq!(delta(&s3, &s4, "regmirror_token_fetches_total", &[UP]), 1.0);
    assert_eq!(fake.token_fetches().len(), 1, "{:?}", fake.token_fetches());
    // Operator endpoints carry no X-Cache.
    let r = m.get("/metrics").await.unwrap();
    assert_eq!(header(&r, "x-cache"), "", "X-Cache on /metrics");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_gets_of_a_cold_blob_are_one_miss_and_the_rest_coalesced() {
    const N: usize = 4;
    let fake = FakeUpstream::start().await;
    let img = fake.add_image(REPO, "v1", vec![random_bytes(MIB, 5)]);
    let m = start_mirror(&fake.url(), |_| {}).await;
    // The repository's manifest first, so the mirror knows it holds the layer.
    get_expecting(&m, &format!("/v2/{REPO}/manifests/v1"), "miss").await;
    let layer = &img.layer_digests[0];
    let url = m.url_for(&format!("/v2/{REPO}/blobs/{layer}"));
    let s0 = scrape(&m).await;

    fake.pause_blobs_at(256 * 1024);
    let get = |client: reqwest::Client, url: String| {
        tokio::spawn(async move {
            let r = client.get(url).send().await.expect("blob GET");
            (r.status().as_u16(), header(&r, "x-cache"), r)
        })
    };
    let first = get(m.client.clone(), url.clone());
    fake.wait_progress("the first download to pause", |p| p.paused >= 1)
        .await;
    let others: Vec<_> = (1..N).map(|_| get(m.client.clone(), url.clone())).collect();
    let mut heads = Vec::new();
    for h in std::iter::once(first).chain(others) {
        let (status, x_cache, resp) = tokio::time::timeout(Duration::from_secs(10), h)
            .await
            .expect("response headers while the download is paused")
            .unwrap();
        assert_eq!(status, 200);
        heads.push((x_cache, resp));
    }
    fake.release();
    let mut labels = Vec::new();
    for (x_cache, resp) in heads {
        let body = resp.bytes().await.expect("blob body");
        assert_eq!(body, img.layers[0], "blob bytes");
        labels.push(x_cache);
    }
    labels.sort();
    let mut want = vec!["coalesced".to_owned(); N - 1];
    want.push("miss".to_owned());
    assert_eq!(
        labels, want,
        "X-Cache of {N} concurrent GETs of one cold blob"
    );
    assert_eq!(
        fake.blob_gets(layer),
        1,
        "the upstream served the blob once"
    );

    let size = img.layers[0].len() as f64;
    let s1 = scrape_until(&m, |s| {
        delta(
            &s0,
            s,
            "regmirror_client_bytes_total",
            &[("outcome", "coalesced")],
        ) >= size * (N - 1) as f64
    })
    .await;
    let d = |name: &str, labels: &[(&str, &str)]| delta(&s0, &s1, name, labels);
    let cr = "regmirror_cache_requests_total";
    let why = s1.show("regmirror_c");
    assert_eq!(d(cr, &cache("blob", "miss")), 1.0, "{why}");
    assert_eq!(d(cr, &cache("blob", "coalesced")), (N - 1) as f64, "{why}");
    assert_eq!(d(cr, &cache("blob", "hit")), 0.0, "{why}");
    assert_eq!(d("regmirror_upstream_bytes_total", &[]), size);
    assert_eq!(
        d("regmirror_client_bytes_total", &[("outcome", "miss")]),
        size
    );
    assert_eq!(
        d("regmirror_client_bytes_total", &[("outcome", "coalesced")]),
        size * (N - 1) as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evictions_are_counted_and_cache_bytes_stays_within_max_size() {
    let fake = FakeUpstream::start().await;
    let images: Vec<ImageInfo> = (0..5u64)
        .map(|i| fake.add_image(REPO, &format!("v{i}"), vec![random_bytes(MIB, 10 + i)]))
        .collect();
    let max = 4 * MIB as u64;
    let m = start_mirror(&fake.url(), |c| c.cache.max_size = ByteSize(max)).await;
    let s0 = scrape(&m).await;
    for (i, img) in images.iter().enumerate() {
        pull_expecting(&m, img, &format!("v{i}"), "miss").await;
    }
    // Every item stored: blobs as they are, manifests with their media-type line.
    let stored: u64 = images
        .iter()
        .map(|i| blob_bytes(i) + (i.media_type.len() + 1 + i.manifest.len()) as u64)
        .sum();
    let items = images.len() as f64 * 3.0;
    let last = images.last().unwrap();
    let manifest_file = std::fs::metadata(m.manifest_path(&last.manifest_digest)).unwrap();
    assert_eq!(
        manifest_file.len() as usize,
        last.media_type.len() + 1 + last.manifest.len(),
        "a stored manifest is its media type, a newline and its bytes"
    );
    // Commits end after the clients' last bytes and the eviction they wake after that: wait
    // for the state where every item was either kept or evicted.
    let s1 = scrape_until(&m, |s| {
        let freed = delta(
            &s0,
            s,
            "regmirror_evicted_bytes_total",
            &[("reason", "size")],
        );
        let kept = s.get("regmirror_cache_bytes", &[]);
        kept == disk_usage(&m.data_dir) as f64
            && s.get("regmirror_evictions_total", &[("reason", "size")]) >= 1.0
            && kept + freed == stored as f64
    })
    .await;
    let why = s1.show("regmirror_ev");
    let evicted = delta(&s0, &s1, "regmirror_evictions_total", &[("reason", "size")]);
    let freed = delta(
        &s0,
        &s1,
        "regmirror_evicted_bytes_total",
        &[("reason", "size")],
    );
    let cache_bytes = s1.get("regmirror_cache_bytes", &[]);
    assert!(evicted >= 1.0, "no eviction counted: {why}");
    assert!(
        cache_bytes <= max as f64,
        "cache_bytes {cache_bytes} > {max}"
    );
    assert_eq!(cache_bytes, disk_usage(&m.data_dir) as f64, "cache_bytes");
    assert_eq!(
        cache_bytes + freed,
        stored as f64,
        "kept + evicted = stored"
    );
    let on_disk = (count_files(&m.data_dir.join("blobs"))
        + count_files(&m.data_dir.join("manifests"))) as f64;
    assert_eq!(evicted, items - on_disk, "items evicted: {why}");
    let entries = s1.sum("regmirror_cache_entries", &[]);
    assert_eq!(
        entries,
        on_disk,
        "cache_entries: {}",
        s1.show("regmirror_cache")
    );
    assert_eq!(
        delta(&s0, &s1, "regmirror_evictions_total", &[("reason", "idle")]),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_serves_and_upstream_failures_are_counted() {
    const TTL: Duration = Duration::from_millis(100);
    let fake = FakeUpstream::start().await;
    let img = fake.add_image(REPO, "v1", vec![random_bytes(10_000, 20)]);
    let m = start_mirror(&fake.url(), |c| c.cache.tag_ttl = TTL).await;
    pull_expecting(&m, &img, "v1", "miss").await;
    let tag = format!("/v2/{REPO}/manifests/v1");

    fake.fail_with(503, None);
    tokio::time::sleep(TTL * 3).await;
    let s0 = scrape(&m).await;
    get_expecting(&m, &tag, "hit").await;
    let s1 = scrape(&m).await;
    let ur = "regmirror_upstream_requests_total";
    let head_503 = [UP, ("method", "HEAD"), ("status", "503")];
    assert_eq!(delta(&s0, &s1, "regmirror_stale_serves_total", &[]), 1.0);
    assert_eq!(delta(&s0, &s1, ur, &head_503), 1.0, "{}", s1.show(ur));
    assert_eq!(
        delta(&s0, &s1, "regmirror_upstream_errors_total", &[UP]),
        0.0
    );

    // Connection refused: an upstream error without a status, and again a stale serve.
    fake.stop();
    tokio::time::sleep(TTL * 3).await;
    get_expecting(&m, &tag, "hit").await;
    let s2 = scrape(&m).await;
    assert_eq!(delta(&s1, &s2, "regmirror_stale_serves_total", &[]), 1.0);
    assert_eq!(
        delta(&s1, &s2, "regmirror_upstream_errors_total", &[UP]),
        1.0
    );
    assert_eq!(
        s2.sum(ur, &[]) - s1.sum(ur, &[]),
        0.0,
        "no answer, no status"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ratelimit_remaining_gauge_follows_the_upstream_header() {
    let fake = FakeUpstream::start().await;
    let a = fake.add_image(REPO, "a", vec![random_bytes(1_000, 30)]);
    fake.add_image(REPO, "b", vec![random_bytes(1_000, 31)]);
    let proxy = RatelimitProxy::start(&fake.url()).await;
    let m = start_mirror(&proxy.url(), |_| {}).await;
    let gauge = "regmirror_upstream_ratelimit_remaining";
    proxy.set_remaining(None);
    pull_expecting(&m, &a, "a", "miss").await;
    assert!(!scrape(&m).await.has(gauge), "a gauge without any header");

    proxy.set_remaining(Some("100;w=21600"));
    m.get_ok(&format!("/v2/{REPO}/manifests/b")).await;
    assert_eq!(scrape(&m).await.get(gauge, &[UP]), 100.0);
    proxy.set_remaining(Some("42;w=21600"));
    let r = m.head(&format!("/v2/{REPO}/manifests/a")).await.unwrap();
    assert_eq!(r.status(), 200);
    let s = scrape(&m).await;
    assert_eq!(
        s.get(gauge, &[UP]),
        100.0,
        "a fresh tag asks the upstream nothing"
    );
    let c = fake.add_blob(REPO, random_bytes(2_000, 32));
    m.blob(REPO, &c).await;
    assert_eq!(scrape(&m).await.get(gauge, &[UP]), 42.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_and_readyz_and_not_ready_while_tmp_cannot_be_written() {
    let fake = FakeUpstream::start().await;
    let m = start_mirror(&fake.url(), |_| {}).await;
    for (path, body) in [("/healthz", "ok\n"), ("/readyz", "ready\n")] {
        let r = m.get(path).await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(header(&r, "cache-control"), "no-store", "{path}");
        assert_eq!(r.text().await.unwrap(), body, "{path}");
        assert_eq!(m.head(path).await.unwrap().status(), 200, "HEAD {path}");
    }
    // Root ignores permissions: a file where tmp/ should be makes every write fail.
    let tmp = m.data_dir.join("tmp");
    std::fs::remove_dir_all(&tmp).unwrap();
    std::fs::write(&tmp, b"not a directory").unwrap();
    // A probe's answer stands for a second (each one writes a file), so poll.
    let (status, text) = readyz_until(&m, 503).await;
    std::fs::remove_file(&tmp).unwrap();
    std::fs::create_dir(&tmp).unwrap();
    assert_eq!(status, 503, "/readyz with tmp/ unwritable: {text}");
    assert!(text.starts_with("not ready"), "{text}");
    let (status, _) = readyz_until(&m, 200).await;
    assert_eq!(status, 200, "/readyz after tmp/ is back");
    assert_eq!(m.get("/healthz").await.unwrap().status(), 200);
    let s = scrape(&m).await;
    let hr = "regmirror_http_requests_total";
    assert!(s.get(hr, &[("endpoint", "readyz"), ("status", "503")]) >= 1.0);
    assert!(s.get(hr, &[("endpoint", "healthz"), ("status", "200")]) >= 2.0);
}

/// GETs /readyz until it answers `want` (at most 5 s): its status and text.
async fn readyz_until(m: &MirrorHandle, want: u16) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = m.get("/readyz").await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        if status == want || Instant::now() > deadline {
            return (status, text);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A flood of /readyz probes costs one write to the data dir a second, not one per probe.
#[tokio::test]
async fn readyz_probes_the_disk_at_most_once_a_second() {
    let fake = FakeUpstream::start().await;
    let m = start_mirror(&fake.url(), |_| {}).await;
    assert_eq!(m.get("/readyz").await.unwrap().status(), 200);
    // tmp/ made unwritable right after a probe: the next ones within the second still say
    // ready (the last probe's answer), so no file was attempted for them.
    let tmp = m.data_dir.join("tmp");
    std::fs::remove_dir_all(&tmp).unwrap();
    std::fs::write(&tmp, b"not a directory").unwrap();
    let started = Instant::now();
    let mut ready = 0;
    for _ in 0..50 {
        if m.get("/readyz").await.unwrap().status() == 200 {
            ready += 1;
        }
    }
    let quick = started.elapsed() < Duration::from_millis(900);
    let (status, _) = readyz_until(&m, 503).await;
    std::fs::remove_file(&tmp).unwrap();
    std::fs::create_dir(&tmp).unwrap();
    assert_eq!(status, 503, "a broken tmp/ is seen within the next second");
    if quick {
        assert_eq!(ready, 50, "a probe within the second wrote to the disk");
    }
}

/// A mirror of `fake` requiring user `moby`/`gordon`; `tweak` adjusts the config further.
async fn mirror_with_users(
    fake: &FakeUpstream,
    dir: &std::path::Path,
    tweak: impl FnOnce(&mut regmirror::config::Config),
) -> Front {
    let users = dir.join("htpasswd");
    std::fs::write(&users, htpasswd_line("moby", "gordon") + "\n").unwrap();
    Front::start(&fake.url(), move |c| {
        c.auth.htpasswd = Some(users);
        tweak(c);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_probes_stay_open_and_metrics_and_status_need_a_user() {
    let fake = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let front = mirror_with_users(&fake, dir.path(), |_| {}).await;
    let c = reqwest::Client::new();
    let status = |path: &'static str, auth: Option<String>| {
        let (c, url) = (c.clone(), front.http(path));
        async move {
            let mut req = c.get(url);
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let r = req.send().await.unwrap();
            (r.status().as_u16(), header(&r, "www-authenticate"))
        }
    };
    for path in ["/healthz", "/readyz"] {
        assert_eq!(
            status(path, None).await.0,
            200,
            "{path} without credentials"
        );
    }
    for path in ["/metrics", "/_/status", "/v2/"] {
        let (code, challenge) = status(path, None).await;
        assert_eq!(code, 401, "{path} without credentials");
        assert!(challenge.starts_with("Basic"), "{path}: {challenge}");
        let wrong = Some(basic("moby", "wrong"));
        assert_eq!(status(path, wrong).await.0, 401, "{path}, wrong password");
        let right = Some(basic("moby", "gordon"));
        assert_eq!(status(path, right).await.0, 200, "{path} as moby");
    }
    let auth = basic("moby", "gordon");
    let s = scrape_at(&c, &front.http(""), Some(&auth)).await;
    let hr = "regmirror_http_requests_total";
    // Each refusal is counted under the endpoint it was for: two per path above, and on
    // /v2/ one more, the harness's readiness probe (sent without credentials).
    for (endpoint, refusals) in [("metrics", 2.0), ("status", 2.0), ("ping", 3.0)] {
        let counted = s.sum(hr, &[("endpoint", endpoint), ("status", "401")]);
        assert_eq!(counted, refusals, "401s on {endpoint}: {}", s.show(hr));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_listener_serves_only_the_ops_endpoints_and_without_auth() {
    let fake = FakeUpstream::start().await;
    let img = fake.add_image(REPO, "v1", vec![random_bytes(2_000, 40)]);
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let front = mirror_with_users(&fake, dir.path(), |c| c.metrics.listen = Some(port)).await;
    let ops = format!("http://{port}");
    let c = reqwest::Client::new();
    for path in ["/metrics", "/healthz", "/readyz", "/_/status"] {
        let r = c.get(format!("{ops}{path}")).send().await.unwrap();
        assert_eq!(
            r.status(),
            200,
            "{path} on the metrics listener, no credentials"
        );
    }
    let manifest = format!("/v2/{REPO}/manifests/v1");
    for path in ["/v2/", manifest.as_str()] {
        let r = c.get(format!("{ops}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path} on the metrics listener");
    }
    assert!(
        fake.requests().is_empty(),
        "the ops listener asked the upstream"
    );
    let r = c.get(front.http("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 401, "the main listener still needs a user");

    // One registry behind both listeners: a pull on the main one counts on the ops one.
    let r = c
        .get(front.http(&manifest))
        .header("authorization", basic("moby", "gordon"))
        .header("accept", img.media_type)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), img.manifest);
    let s = scrape_at(&c, &ops, None).await;
    assert_eq!(
        s.get("regmirror_cache_requests_total", &cache("manifest", "miss")),
        1.0
    );
}

/// The metrics listener needs no credentials, so it keeps to `server.max_connections` like the
/// main listener: past it the oldest idle connection is closed for a new one.
#[tokio::test]
async fn the_metrics_listener_keeps_to_max_connections() {
    use common::front::{read_response, read_until_closed, send_raw};
    use tokio::io::AsyncWriteExt as _;
    const HEALTH: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: m\r\n\r\n";
    let fake = FakeUpstream::start().await;
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let _m = Front::start(&fake.url(), |c| {
        c.server.max_connections = 2;
        c.metrics.listen = Some(addr);
    })
    .await;
    let limit = Duration::from_secs(10);
    let mut a = send_raw(addr, HEALTH).await;
    assert_eq!(read_response(&mut a, limit).await.0, 200);
    let mut b = send_raw(addr, HEALTH).await;
    assert_eq!(read_response(&mut b, limit).await.0, 200);
    tokio::time::sleep(Duration::from_millis(50)).await;
    b.write_all(HEALTH).await.unwrap();
    assert_eq!(read_response(&mut b, limit).await.0, 200);
    let mut third = send_raw(addr, HEALTH).await;
    assert_eq!(read_response(&mut third, limit).await.0, 200);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let (_, open) = read_until_closed(&mut a, deadline).await;
    assert!(
        !open,
        "the oldest idle connection was closed for the new one"
    );
    b.write_all(HEALTH).await.unwrap();
    assert_eq!(read_response(&mut b, limit).await.0, 200);
}

/// Bytes that do not hash to their digest are counted by what failed: a download from the
/// upstream (corrupted by the fake), and a cached blob damaged on disk while the mirror was
/// stopped (found as it streams after the restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verification_failures_are_counted_by_what_failed() {
    let vf = "regmirror_verification_failures_total";
    let fake = FakeUpstream::start().await;
    let img = fake.add_image(REPO, "v1", vec![random_bytes(200_000, 50)]);
    let layer = img.layer_digests[0].clone();
    let m = start_mirror(&fake.url(), |_| {}).await;
    get_expecting(&m, &format!("/v2/{REPO}/manifests/v1"), "miss").await;
    let s0 = scrape(&m).await;
    for what in ["download", "manifest", "cached_blob"] {
        assert_eq!(
            s0.get(vf, &[("what", what)]),
            0.0,
            "{what}: {}",
            s0.show(vf)
        );
    }

    fake.set(|f| {
        f.corrupt.insert(layer.clone());
    });
    let r = m.get(&format!("/v2/{REPO}/blobs/{layer}")).await.unwrap();
    assert!(
        common::read_body(r).await.is_err(),
        "a wrong body ended cleanly"
    );
    let s1 = scrape_until(&m, |s| s.get(vf, &[("what", "download")]) >= 1.0).await;
    assert_eq!(s1.get(vf, &[("what", "download")]), 1.0, "{}", s1.show(vf));

    fake.clear_faults();
    m.blob(REPO, &layer).await;
    assert!(m.committed(&layer).await, "the good bytes were kept");
    let file = m.blob_path(&layer);
    let dir = m.stop().await;
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[1000] ^= 0xff;
    std::fs::write(&file, &bytes).unwrap();
    let m = common::MirrorHandle::start_in(dir, &fake.url(), |_| {}).await;
    let r = m.get(&format!("/v2/{REPO}/blobs/{layer}")).await.unwrap();
    assert!(
        common::read_body(r).await.is_err(),
        "a damaged cached blob ended cleanly"
    );
    let s2 = scrape_until(&m, |s| s.get(vf, &[("what", "cached_blob")]) >= 1.0).await;
    assert_eq!(
        s2.get(vf, &[("what", "cached_blob")]),
        1.0,
        "{}",
        s2.show(vf)
    );
    assert_eq!(
        s2.get(vf, &[("what", "download")]),
        0.0,
        "a new process counts anew"
    );
}
