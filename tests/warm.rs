//! The scheduled warm-up (`[[warm]]`) of a mirror against the in-process fake upstream: a
//! configured image is cached soon after the start with no client, a tag moved upstream is
//! pulled within a period, a failing or rate-limiting upstream pauses it without a storm of
//! retries, and `/metrics` and `/_/status` show the runs. After each warm-up, a client's pull
//! asks the upstream nothing. Deadlines are generous "within N s" bounds on eventual outcomes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::cache::pull;
use common::images::ImageInfo;
use common::observe::Scrape;
use common::{random_bytes, start_mirror, FakeUpstream, MirrorHandle};
use regmirror::config::WarmConfig;

const REPO: &str = "team/app";

/// A `[[warm]]` entry for `images`, checked every `every`.
fn warm(images: &[&str], every: Duration) -> WarmConfig {
    WarmConfig {
        images: images.iter().map(|s| s.to_string()).collect(),
        file: None,
        every,
        platforms: Vec::new(),
    }
}

async fn mirror_warming(fake: &FakeUpstream, entry: WarmConfig) -> MirrorHandle {
    start_mirror(&fake.url(), |c| c.warm = vec![entry]).await
}

/// Whether every blob and the manifest of `img` are committed in the mirror's cache now.
fn cached(m: &MirrorHandle, img: &ImageInfo) -> bool {
    img.blobs().iter().all(|(d, _)| m.blob_path(d).is_file())
        && m.manifest_path(&img.manifest_digest).is_file()
}

/// Waits (at most `secs`) until `img` is in the cache.
async fn wait_cached(m: &MirrorHandle, img: &ImageInfo, secs: u64, why: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !cached(m, img) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{why}: not cached within {secs} s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Requests for `/v2/<name>/...` the fake received with a valid token (answered, or failed
/// by a fault switch); the 401 challenges before a token are not counted.
fn registry_requests(fake: &FakeUpstream) -> usize {
    fake.requests()
        .iter()
        .filter(|r| r.authorized && r.path.starts_with("/v2/") && r.path != "/v2/")
        .count()
}

/// A client's pull of `REPO:tag` that the fake sees nothing of.
async fn pull_without_upstream(m: &MirrorHandle, fake: &FakeUpstream, tag: &str, why: &str) {
    // Let the warm-up's own requests end before counting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    fake.reset_counts();
    pull(m, REPO, tag).await;
    let seen: Vec<String> = fake
        .requests()
        .iter()
        .filter(|r| r.path.starts_with("/v2/") && r.path != "/v2/")
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert!(
        seen.is_empty(),
        "{why}: the client's pull reached the upstream: {seen:?}"
    );
}

async fn scrape(m: &MirrorHandle) -> Scrape {
    Scrape::parse(&m.get("/metrics").await.unwrap().text().await.unwrap())
}

#[tokio::test]
async fn a_configured_image_is_cached_soon_after_the_start_without_any_client() {
    let fake = FakeUpstream::start().await;
    let img = fake.add_image(
        REPO,
        "1",
        vec![random_bytes(40_000, 1), random_bytes(900, 2)],
    );
    let m = mirror_warming(
        &fake,
        warm(&[&format!("{REPO}:1")], Duration::from_secs(1800)),
    )
    .await;
    wait_cached(&m, &img, 15, "the first warm-up").await;
    assert_eq!(
        fake.count("GET", &format!("/v2/{REPO}/manifests/1")),
        0,
        "the tag is checked with a HEAD (which Docker Hub does not count as a pull)"
    );
    for (d, _) in img.blobs() {
        assert_eq!(fake.blob_gets(&d), 1, "{d} fetched once");
    }
    pull_without_upstream(&m, &fake, "1", "after the first warm-up").await;
    m.stop().await;
}

#[tokio::test]
async fn a_tag_moved_upstream_is_pulled_within_a_period() {
    let fake = FakeUpstream::start().await;
    let old = fake.add_image(REPO, "latest", vec![random_bytes(5_000, 3)]);
    let every = Duration::from_secs(2);
    let m = mirror_warming(&fake, warm(&[&format!("{REPO}:latest")], every)).await;
    wait_cached(&m, &old, 15, "the first warm-up").await;
    // A release: the tag moves to an image sharing nothing with the old one.
    let new = fake.add_image(REPO, "latest", vec![random_bytes(7_000, 4)]);
    // One period (with its jitter) and some slack for a loaded machine.
    wait_cached(&m, &new, 10, "the moved tag").await;
    pull_without_upstream(&m, &fake, "latest", "after the tag moved").await;
    // Unchanged tags cost a HEAD per period and nothing else.
    fake.reset_counts();
    tokio::time::sleep(every * 3).await;
    let heads = fake.count("HEAD", &format!("/v2/{REPO}/manifests/latest"));
    assert!(
        (1..=5).contains(&heads),
        "{heads} HEADs in three periods of an unchanged tag"
    );
    assert_eq!(
        registry_requests(&fake),
        heads,
        "nothing but HEADs for an unchanged tag: {:?}",
        fake.requests()
    );
    m.stop().await;
}

#[tokio::test]
async fn a_failing_upstream_pauses_the_warm_up_without_a_storm_of_retries() {
    let fake = FakeUpstream::start().await;
    let img = fake.add_image(REPO, "1", vec![random_bytes(3_000, 5)]);
    fake.fail_with(503, None);
    let every = Duration::from_secs(1);
    let m = mirror_warming(&fake, warm(&[&format!("{REPO}:1")], every)).await;
    // Eight periods: a fixed schedule would check eight times; the backoff (1, 2, 4, 8 s)
    // checks at most four or five.
    tokio::time::sleep(every * 8).await;
    let failing = registry_requests(&fake);
    assert!(
        (1..=5).contains(&failing),
        "{failing} upstream requests in 8 s of 503s at every = 1s: {:?}",
        fake.requests()
    );
    let s = scrape(&m).await;
    assert!(
        s.get("regmirror_warm_runs_total", &[("result", "failed")]) >= 1.0,
        "{}",
        s.show("regmirror_warm")
    );
    assert_eq!(
        s.get("regmirror_warm_paused", &[]),
        1.0,
        "paused while failing"
    );
    // Recovered, it warms again (within the longest pause so far, and slack).
    fake.clear_faults();
    wait_cached(&m, &img, 30, "after the upstream recovered").await;
    m.stop().await;

    // A 429 with Retry-After is waited out: one request, however short `every` is.
    let img2 = fake.add_image(REPO, "2", vec![random_bytes(3_000, 6)]);
    fake.fail_with(429, Some("3600"));
    fake.reset_counts();
    let m2 = mirror_warming(&fake, warm(&[&format!("{REPO}:2")], every)).await;
    tokio::time::sleep(every * 6).await;
    let limited = registry_requests(&fake);
    assert!(
        limited <= 2,
        "{limited} upstream requests in 6 s after a 429 asking for an hour: {:?}",
        fake.requests()
    );
    assert!(!m2.manifest_path(&img2.manifest_digest).exists());
    assert!(
        limited >= 1,
        "the first warm-up asked the upstream: {:?}",
        fake.requests()
    );
    fake.clear_faults();
    m2.stop().await;
}

#[tokio::test]
async fn metrics_and_the_status_page_show_the_runs() {
    let fake = FakeUpstream::start().await;
    let img = fake.add_image(REPO, "1", vec![random_bytes(10_000, 7)]);
    let m = start_mirror(&fake.url(), |c| {
        c.warm = vec![warm(
            &[&format!("{REPO}:1"), &format!("{REPO}:missing")],
            Duration::from_secs(1800),
        )]
    })
    .await;
    wait_cached(&m, &img, 15, "the first warm-up").await;
    let mut s = scrape(&m).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while s.get("regmirror_warm_runs_total", &[("result", "failed")]) < 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no failed run counted: {}",
            s.show("regmirror_warm")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        s = scrape(&m).await;
    }
    assert_eq!(
        s.get("regmirror_warm_runs_total", &[("result", "ok")]),
        1.0,
        "{}",
        s.show("regmirror_warm")
    );
    let bytes: usize = img.blobs().iter().map(|(_, b)| b.len()).sum::<usize>() + img.manifest.len();
    assert_eq!(
        s.get("regmirror_warm_fetched_bytes_total", &[]),
        bytes as f64,
        "{}",
        s.show("regmirror_warm")
    );
    let image = format!("{REPO}:1");
    let at = s.get(
        "regmirror_warm_last_success_timestamp_seconds",
        &[("image", &image)],
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - at).abs() < 120.0, "last success at {at}, now {now}");

    let page = m.get("/_/status").await.unwrap().text().await.unwrap();
    let section = &page[page.find("id=warm").expect("a warm-up section")..];
    assert!(section.contains(&image), "{section}");
    assert!(
        section.contains("ago</td><td>in "),
        "last and next run: {section}"
    );
    assert!(
        section.contains("3 of 3 items"),
        "what it fetched: {section}"
    );
    assert!(
        section.contains(&format!("{REPO}:missing"))
            && section.contains("class=bad>manifest unknown"),
        "what failed: {section}"
    );
    m.stop().await;
}

#[tokio::test]
async fn a_list_file_and_platforms_choose_what_is_warmed() {
    let fake = FakeUpstream::start().await;
    let index = fake.add_index(
        REPO,
        "multi",
        vec![
            ("amd64", vec![random_bytes(2_000, 8)]),
            ("arm64", vec![random_bytes(2_000, 9)]),
        ],
    );
    let plain = fake.add_image("team/other", "1", vec![random_bytes(1_000, 10)]);
    let lists = tempfile::tempdir().unwrap();
    let file = lists.path().join("warm.txt");
    std::fs::write(
        &file,
        format!("# what CI pulls\n{REPO}:multi\n\nteam/other:1  # the tool image\n"),
    )
    .unwrap();
    let entry = WarmConfig {
        file: Some(file),
        platforms: vec!["linux/arm64".into()],
        ..warm(&[], Duration::from_secs(1800))
    };
    let m = mirror_warming(&fake, entry).await;
    wait_cached(&m, index.child("arm64"), 15, "the arm64 child of the index").await;
    wait_cached(&m, &plain, 15, "the image of the list file's second line").await;
    assert!(m.manifest_path(&index.digest).exists(), "the index itself");
    // Not asked for: not warmed (the arm64 child came after it in the index).
    assert!(!m
        .manifest_path(&index.child("amd64").manifest_digest)
        .exists());
    for (d, _) in index.child("amd64").blobs() {
        assert!(!m.blob_path(&d).exists(), "amd64 blob {d} in the cache");
        assert_eq!(fake.blob_gets(&d), 0, "amd64 blob {d} fetched");
    }
    m.stop().await;
}
