//! Serving from the cache when the upstream cannot answer: tags past their TTL served as last
//! seen while the upstream fails (503), rate-limits (429), hangs or refuses connections;
//! cached digests needing no upstream at all; an upstream 404 for a tag honoured; `offline`
//! mode on a warmed data dir; and the index surviving a restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::cache::pull;
use common::images::ImageInfo;
use common::{assert_error, header, random_bytes, start_mirror, FakeUpstream, MirrorHandle};

const REPO: &str = "library/alpine";
const TAG_PATH: &str = "/v2/library/alpine/manifests/3.19";
/// The tag TTL of the mirrors here, short enough to wait past.
const TTL: Duration = Duration::from_millis(100);

/// A fake holding `library/alpine:3.19` and a mirror (tag TTL [`TTL`]) that pulled it.
async fn warmed(timeout: Duration) -> (FakeUpstream, MirrorHandle, ImageInfo) {
    let fake = FakeUpstream::start().await;
    let img = fake.add_image(
        REPO,
        "3.19",
        vec![random_bytes(300_000, 1), random_bytes(20_000, 2)],
    );
    let m = start_mirror(&fake.url(), |c| {
        c.cache.tag_ttl = TTL;
        c.upstream.timeout = timeout;
    })
    .await;
    assert_eq!(pull(&m, REPO, "3.19").await, img.manifest);
    (fake, m, img)
}

/// Waits past the tag TTL, then pulls the tag while the upstream is broken: it must come from
/// the cache with the digest and bytes last seen, and its blobs without any upstream GET.
async fn assert_served_stale(fake: &FakeUpstream, m: &MirrorHandle, img: &ImageInfo, why: &str) {
    tokio::time::sleep(TTL * 2).await; // let the tag's TTL pass
    let r = m.get(TAG_PATH).await.unwrap();
    let status = r.status();
    let digest = header(&r, "docker-content-digest");
    let body = r.bytes().await.unwrap();
    assert_eq!(
        status,
        200,
        "{why}: a cached tag past its TTL was not served from the cache: {}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(digest, img.manifest_digest, "{why}: digest as last seen");
    assert_eq!(body, img.manifest, "{why}: manifest bytes as last seen");
    for (d, bytes) in img.blobs() {
        assert!(m.blob(REPO, &d).await == bytes, "{why}: blob {d}");
        assert_eq!(
            fake.blob_gets(&d),
            1,
            "{why}: {d} fetched once, at the first pull"
        );
    }
    let by_digest = format!("/v2/{REPO}/manifests/{}", img.manifest_digest);
    assert_eq!(m.get_ok(&by_digest).await, img.manifest, "{why}: by digest");
}

#[tokio::test]
async fn stale_tag_is_served_while_the_upstream_answers_503() {
    let (fake, m, img) = warmed(Duration::from_secs(5)).await;
    fake.fail_with(503, None);
    assert_served_stale(&fake, &m, &img, "upstream 503").await;
    assert!(
        fake.count("HEAD", TAG_PATH) >= 2,
        "the tag past its TTL was revalidated (and got the 503): {:?}",
        fake.requests()
    );
    // Twice, and the upstream is asked again each time (no caching of the failure as fresh).
    assert_served_stale(&fake, &m, &img, "upstream 503, again").await;
    assert!(fake.count("HEAD", TAG_PATH) >= 3);

    fake.clear_faults();
    tokio::time::sleep(TTL * 2).await; // let the tag's TTL pass
    assert_eq!(m.get_ok(TAG_PATH).await, img.manifest, "upstream back");
}

#[tokio::test]
async fn stale_tag_is_served_while_the_upstream_answers_429() {
    let (fake, m, img) = warmed(Duration::from_secs(5)).await;
    fake.fail_with(429, Some("30"));
    assert_served_stale(&fake, &m, &img, "upstream 429").await;
    assert!(
        fake.count("HEAD", TAG_PATH) >= 2,
        "the tag past its TTL was revalidated (and got the 429): {:?}",
        fake.requests()
    );
}

#[tokio::test]
async fn stale_tag_is_served_when_the_upstream_times_out() {
    let (fake, m, img) = warmed(Duration::from_millis(300)).await;
    fake.set(|f| f.hang = Some(String::new()));
    assert_served_stale(&fake, &m, &img, "upstream hanging").await;
}

#[tokio::test]
async fn stale_tag_is_served_when_the_upstream_refuses_connections() {
    let (fake, m, img) = warmed(Duration::from_secs(5)).await;
    fake.stop();
    let refused = tokio::net::TcpStream::connect(fake.url().trim_start_matches("http://")).await;
    assert!(
        refused.is_err(),
        "the stopped fake still accepts connections"
    );
    assert_served_stale(&fake, &m, &img, "upstream refusing connections").await;
}

#[tokio::test]
async fn upstream_404_for_a_tag_is_honoured_and_the_tag_forgotten() {
    let (fake, m, img) = warmed(Duration::from_secs(5)).await;
    // The tag is gone upstream (it points nowhere now).
    let nowhere = "sha256:0000000000000000000000000000000000000000000000000000000000000000";
    fake.tag(REPO, "3.19", nowhere);
    tokio::time::sleep(TTL * 2).await; // let the tag's TTL pass

    let r = m.get(TAG_PATH).await.unwrap();
    assert_error(r, 404, Some("MANIFEST_UNKNOWN")).await;
    assert_eq!(fake.count("HEAD", TAG_PATH), 2, "{:?}", fake.requests());

    // Forgotten: with the upstream down now, the old digest is not served for the tag.
    fake.fail_with(503, None);
    let r = m.get(TAG_PATH).await.unwrap();
    let status = r.status();
    let body = r.bytes().await.unwrap();
    assert!(
        status.is_server_error(),
        "a tag the upstream said is gone was served from the cache: {status} {}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(fake.count("HEAD", TAG_PATH), 3, "asked the upstream again");

    // A later request asks the upstream again, and follows it.
    fake.clear_faults();
    fake.tag(REPO, "3.19", &img.manifest_digest);
    assert_eq!(m.get_ok(TAG_PATH).await, img.manifest);
    assert_eq!(fake.count("HEAD", TAG_PATH), 4);
    // The content itself stayed cached: only the tag was forgotten.
    assert_eq!(fake.manifest_gets(REPO), 1, "{:?}", fake.requests());
}

#[tokio::test]
async fn offline_mirror_serves_the_cache_and_nothing_else() {
    let fake = FakeUpstream::start().await;
    let img = fake.add_image(REPO, "3.19", vec![random_bytes(100_000, 3)]);
    let other = fake.add_image("library/busybox", "1", vec![random_bytes(1000, 4)]);
    let uncached_blob = fake.add_blob(REPO, random_bytes(5000, 5));
    let m = start_mirror(&fake.url(), |_| {}).await;
    pull(&m, REPO, "3.19").await;
    let dir = m.stop().await;
    fake.reset_counts();

    // Offline, with a tag TTL long past: tags are served as last seen, never revalidated.
    let m = MirrorHandle::start_in(dir, &fake.url(), |c| {
        c.offline = true;
        c.cache.tag_ttl = Duration::from_millis(1);
    })
    .await;
    tokio::time::sleep(Duration::from_millis(10)).await; // let the 1 ms tag TTL pass
    assert_eq!(pull(&m, REPO, "3.19").await, img.manifest);
    assert!(
        fake.requests().is_empty(),
        "an offline mirror contacted the upstream: {:?}",
        fake.requests()
    );
    fake.stop();
    assert_eq!(pull(&m, REPO, "3.19").await, img.manifest, "fake stopped");
    let by_digest = format!("/v2/{REPO}/manifests/{}", img.manifest_digest);
    assert_eq!(m.get_ok(&by_digest).await, img.manifest);

    // Misses say the mirror is offline.
    let detail = |v: &serde_json::Value| v["errors"][0]["detail"].as_str().unwrap_or("").to_owned();
    let misses = [
        (
            "/v2/library/busybox/manifests/1".to_owned(),
            "MANIFEST_UNKNOWN",
        ),
        (
            format!("/v2/library/busybox/manifests/{}", other.manifest_digest),
            "MANIFEST_UNKNOWN",
        ),
        (
            format!("/v2/library/busybox/blobs/{}", other.layer_digests[0]),
            "BLOB_UNKNOWN",
        ),
        (format!("/v2/{REPO}/blobs/{uncached_blob}"), "BLOB_UNKNOWN"),
        (
            "/v2/library/alpine/manifests/3.20".to_owned(),
            "MANIFEST_UNKNOWN",
        ),
    ];
    for (path, code) in misses {
        let v = assert_error(m.get(&path).await.unwrap(), 404, Some(code)).await;
        assert!(
            detail(&v).contains("offline"),
            "GET {path}: the detail does not say the mirror is offline: {v}"
        );
        let r = m.head(&path).await.unwrap();
        assert_eq!(r.status(), 404, "HEAD {path}");
    }
}

#[tokio::test]
async fn restart_keeps_the_index_and_a_fresh_tag_needs_no_upstream_request() {
    let fake = FakeUpstream::start().await;
    let img = fake.add_image(REPO, "3.19", vec![random_bytes(100_000, 6)]);
    let m = start_mirror(&fake.url(), |_| {}).await;
    pull(&m, REPO, "3.19").await;
    let dir = m.stop().await;
    assert!(
        dir.path().join("index.json").is_file(),
        "index.json written at shutdown"
    );
    fake.reset_counts();

    let m = MirrorHandle::start_in(dir, &fake.url(), |_| {}).await;
    assert_eq!(pull(&m, REPO, "3.19").await, img.manifest);
    let r = m.head(TAG_PATH).await.unwrap();
    assert_eq!(header(&r, "docker-content-digest"), img.manifest_digest);
    assert!(
        fake.requests().is_empty(),
        "the restarted mirror asked the upstream (tokens included): {:?}",
        fake.requests()
    );
}
