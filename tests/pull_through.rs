//! Pull-through behaviour against the in-process fake upstream: correct bytes and digests,
//! the cache answering repeat pulls, single-flight downloads that clients follow as they
//! grow, aborted downloads leaving nothing behind, ranges, per-repository blob access,
//! tag freshness, multi-arch indexes, and manifest fetches shared by concurrent requests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::images::{sha256_digest, OCI_INDEX};
use common::{
    header, json, mirror_of, random_bytes, read_body, spawn_get, start_mirror, statuses,
    test_config, wait_until, FakeUpstream, MirrorHandle,
};
use http_body_util::BodyExt as _;
use regmirror::registry::Registry;

const ALPINE: &str = "library/alpine";

/// Pulls `repo:reference` like a client: the manifest, then every blob it names,
/// checking each blob's bytes against its descriptor. Returns the manifest bytes.
async fn pull(m: &MirrorHandle, repo: &str, reference: &str) -> bytes::Bytes {
    let manifest = m.get_ok(&format!("/v2/{repo}/manifests/{reference}")).await;
    let v: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    let mut descs = vec![v["config"].clone()];
    descs.extend(v["layers"].as_array().unwrap().iter().cloned());
    for d in descs {
        let digest = d["digest"].as_str().unwrap();
        let body = m.blob(repo, digest).await;
        assert_eq!(
            sha256_digest(&body),
            digest,
            "blob bytes match their digest"
        );
        assert_eq!(body.len() as u64, d["size"].as_u64().unwrap());
    }
    manifest
}

#[tokio::test]
async fn small_image_pulls_with_right_bytes_and_digests() {
    let fake = FakeUpstream::start().await;
    let layers = vec![random_bytes(10_000, 1), random_bytes(150_000, 2)];
    let img = fake.add_image(ALPINE, "3.19", layers.clone());
    let m = mirror_of(&fake).await;

    let r = m.get("/v2/library/alpine/manifests/3.19").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "docker-content-digest"), img.manifest_digest);
    assert_eq!(header(&r, "content-type"), img.media_type);
    assert_eq!(header(&r, "content-length"), img.manifest.len().to_string());
    assert_eq!(r.bytes().await.unwrap(), img.manifest);

    let manifest = pull(&m, ALPINE, "3.19").await;
    assert_eq!(manifest, img.manifest);
    for (digest, bytes) in img.blobs() {
        let r = m
            .get(&format!("/v2/library/alpine/blobs/{digest}"))
            .await
            .unwrap();
        assert_eq!(header(&r, "docker-content-digest"), digest);
        assert_eq!(header(&r, "content-length"), bytes.len().to_string());
        assert_eq!(r.bytes().await.unwrap(), bytes);
        assert!(m.committed(&digest).await, "{digest} committed to disk");
    }
    assert!(m.manifest_path(&img.manifest_digest).is_file());
    assert_eq!(m.files_under("tmp"), 0);
}

#[tokio::test]
async fn second_pull_makes_no_upstream_gets() {
    let fake = FakeUpstream::start().await;
    let img = fake.add_image(ALPINE, "3.19", vec![random_bytes(50_000, 3)]);
    let m = mirror_of(&fake).await;
    pull(&m, ALPINE, "3.19").await;
    for (d, _) in img.blobs() {
        assert_eq!(fake.blob_gets(&d), 1, "first pull fetched {d} once");
    }
    fake.reset_counts();

    assert_eq!(pull(&m, ALPINE, "3.19").await, img.manifest);
    pull(&m, ALPINE, &img.manifest_digest).await;
    assert_eq!(fake.count_prefix("GET", "/v2/"), 0, "{:?}", fake.requests());
}

#[tokio::test]
async fn cache_survives_a_restart() {
    let fake = FakeUpstream::start().await;
    let img = fake.add_image(ALPINE, "3.19", vec![random_bytes(70_000, 4)]);
    let m = mirror_of(&fake).await;
    pull(&m, ALPINE, "3.19").await;
    let dir = m.stop().await;
    fake.reset_counts();

    let m = MirrorHandle::start_in(dir, &fake.url(), |_| {}).await;
    assert_eq!(pull(&m, ALPINE, &img.manifest_digest).await, img.manifest);
    assert_eq!(fake.count_prefix("GET", "/v2/"), 0, "{:?}", fake.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_concurrent_clients_share_one_upstream_get() {
    let fake = FakeUpstream::start().await;
    let data = random_bytes(8 << 20, 5);
    let d = fake.add_blob(ALPINE, data.clone());
    let m = mirror_of(&fake).await;
    // Hold the upstream body at 1 MiB until every client is in.
    fake.pause_blobs_at(1 << 20);

    let url = m.url_for(&format!("/v2/library/alpine/blobs/{d}"));
    let mut clients: Vec<_> = (0..16).map(|_| spawn_get(&m.client, url.clone())).collect();
    fake.wait_progress("the upstream body to reach the pause", |p| p.paused >= 1)
        .await;
    // Clients whose headers do not come now still count below; the bodies are the test.
    let got = statuses(&mut clients, Duration::from_secs(10)).await;
    fake.release();

    for (i, c) in clients.into_iter().enumerate() {
        let body = c.body.await.unwrap();
        let body = body.unwrap_or_else(|b| panic!("client {i}: body aborted after {}", b.len()));
        assert!(
            body == data,
            "client {i}: wrong body of {} bytes",
            body.len()
        );
    }
    assert_eq!(
        got,
        vec![200; 16],
        "every client got its headers during the download"
    );
    assert_eq!(fake.blob_gets(&d), 1, "one upstream GET for 16 clients");
    assert!(m.committed(&d).await);
}

/// Clients that join a download before the upstream has answered it: joins leave no mark a
/// test can wait for, so the test gives them a moment (no outcome in the fixed code depends on
/// it; with the old code, joiners asked the upstream in that moment).
const JOIN_MOMENT: Duration = Duration::from_millis(300);

/// Joiners of the same repository wait for the starter's 200, which records the repository's
/// membership: they ask the upstream nothing (the old code sent one HEAD per joiner).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn joining_clients_of_the_same_repository_send_no_head() {
    let fake = FakeUpstream::start().await;
    let data = random_bytes(4 << 20, 6);
    let d = fake.add_blob(ALPINE, data.clone());
    let m = mirror_of(&fake).await;
    fake.hold_requests("/blobs/");
    let url = m.url_for(&format!("/v2/library/alpine/blobs/{d}"));
    let mut clients = vec![spawn_get(&m.client, url.clone())];
    fake.wait_progress("the first blob request to be held", |p| p.held >= 1)
        .await;
    clients.extend((0..15).map(|_| spawn_get(&m.client, url.clone())));
    tokio::time::sleep(JOIN_MOMENT).await;
    fake.release();
    for (i, c) in clients.into_iter().enumerate() {
        let body = c.body.await.unwrap();
        assert!(body.is_ok_and(|b| b == data), "client {i}: wrong body");
    }
    let path = format!("/v2/library/alpine/blobs/{d}");
    assert_eq!(fake.blob_gets(&d), 1, "one upstream GET");
    assert_eq!(fake.count("HEAD", &path), 0, "joiners asked the upstream");
}

/// A download started for a repository the upstream does not link the blob to fails with
/// 404; a client of another repository that joined it gets the blob from its own repository.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_joining_another_repositorys_failed_download_fetches_its_own() {
    let fake = FakeUpstream::start().await;
    let data = random_bytes(1 << 20, 7);
    let d = fake.add_blob("library/owner", data.clone());
    fake.add_blob(ALPINE, b"another".to_vec());
    let m = mirror_of(&fake).await;
    fake.hold_requests("/blobs/");
    let stranger = spawn_get(
        &m.client,
        m.url_for(&format!("/v2/library/alpine/blobs/{d}")),
    );
    fake.wait_progress("the first blob request to be held", |p| p.held >= 1)
        .await;
    let owner = spawn_get(
        &m.client,
        m.url_for(&format!("/v2/library/owner/blobs/{d}")),
    );
    tokio::time::sleep(JOIN_MOMENT).await;
    fake.release();
    assert_eq!(stranger.status.await.unwrap(), 404);
    assert_eq!(
        owner.status.await.unwrap(),
        200,
        "another repository's 404 was shared"
    );
    assert!(owner.body.await.unwrap().is_ok_and(|b| b == data));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn late_client_gets_first_bytes_before_the_download_ends() {
    let fake = FakeUpstream::start().await;
    let data = random_bytes(4 << 20, 6);
    let d = fake.add_blob(ALPINE, data.clone());
    let m = mirror_of(&fake).await;
    fake.pause_blobs_at(1 << 20);
    let path = format!("/v2/library/alpine/blobs/{d}");

    let first = spawn_get(&m.client, m.url_for(&path));
    fake.wait_progress("the upstream body to reach the pause", |p| p.paused == 1)
        .await;

    // The upstream is stopped mid-body: whatever the late client gets now was streamed.
    let late = async {
        let mut r = m.get(&path).await.unwrap();
        assert_eq!(r.status(), 200);
        r.chunk().await.unwrap().map(|c| (r, c))
    };
    let (mut late, chunk) = tokio::time::timeout(Duration::from_secs(10), late)
        .await
        .expect("the late client got no bytes while the upstream body was still in progress")
        .expect("the late client's body ended at once");
    assert!(!chunk.is_empty());
    assert_eq!(
        chunk,
        data[..chunk.len()],
        "the late client starts at byte 0"
    );
    let p = fake.progress();
    assert_eq!(
        p.bodies_completed, 0,
        "the upstream had not finished: {p:?}"
    );

    fake.release();
    let mut body = chunk.to_vec();
    while let Some(c) = late.chunk().await.expect("late client's body") {
        body.extend_from_slice(&c);
    }
    assert!(
        body == data,
        "late client: wrong body of {} bytes",
        body.len()
    );
    assert!(first.body.await.unwrap().unwrap() == data);
    assert_eq!(fake.blob_gets(&d), 1);
}

/// A download keeps its last MiB in memory for clients that keep up; a client that joins
/// 24 MiB in reads the start from the spool, then the rest as it arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_joining_far_behind_a_download_gets_every_byte() {
    let fake = FakeUpstream::start().await;
    let data = random_bytes(32 << 20, 25);
    let d = fake.add_blob(ALPINE, data.clone());
    let m = mirror_of(&fake).await;
    fake.pause_blobs_at(24 << 20);
    let path = format!("/v2/library/alpine/blobs/{d}");

    let first = spawn_get(&m.client, m.url_for(&path));
    fake.wait_progress("the upstream body to reach the pause", |p| p.paused == 1)
        .await;
    let late = spawn_get(&m.client, m.url_for(&path));
    // Let the late client read what has arrived so far while the upstream is paused.
    tokio::time::sleep(Duration::from_millis(200)).await;
    fake.release();

    for (who, got) in [("first", first.body), ("late", late.body)] {
        let body = got
            .await
            .unwrap()
            .unwrap_or_else(|b| panic!("{who} client aborted after {} bytes", b.len()));
        assert!(
            body == data,
            "{who} client: wrong body of {} bytes",
            body.len()
        );
    }
    assert_eq!(fake.blob_gets(&d), 1);
    assert!(m.committed(&d).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn download_continues_when_the_first_client_disconnects() {
    let fake = FakeUpstream::start().await;
    let data = random_bytes(2 << 20, 7);
    let d = fake.add_blob(ALPINE, data.clone());
    let m = mirror_of(&fake).await;
    fake.pause_blobs_at(512 << 10);
    fake.slow_body(Duration::from_millis(5), 64 << 10);
    let path = format!("/v2/library/alpine/blobs/{d}");

    let mut first = m.get(&path).await.unwrap();
    assert_eq!(first.status(), 200);
    let chunk = first.chunk().await.unwrap().expect("a first chunk");
    assert_eq!(chunk, data[..chunk.len()]);
    fake.wait_progress("the upstream body to reach the pause", |p| p.paused == 1)
        .await;
    let mut second = spawn_get(&m.client, m.url_for(&path));
    let got = statuses(std::slice::from_mut(&mut second), Duration::from_secs(10)).await;
    drop(first);
    fake.release();

    let body = second.body.await.unwrap();
    let body = body.unwrap_or_else(|b| panic!("second client aborted after {} bytes", b.len()));
    assert!(
        body == data,
        "second client: wrong body of {} bytes",
        body.len()
    );
    assert_eq!(got, vec![200]);
    assert_eq!(
        fake.blob_gets(&d),
        1,
        "the disconnect did not restart the download"
    );
    let p = fake.progress();
    assert_eq!(
        p.bodies_dropped, 0,
        "the upstream body was abandoned: {p:?}"
    );

    let committed = wait_until(Duration::from_secs(10), || m.blob_path(&d).is_file()).await;
    assert!(committed, "the blob was cached after the download");
    assert!(m.blob(ALPINE, &d).await == data);
    assert_eq!(fake.blob_gets(&d), 1, "served from the cache afterwards");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrong_bytes_abort_every_client_and_store_nothing() {
    let fake = FakeUpstream::start().await;
    let data = random_bytes(1 << 20, 8);
    let d = fake.add_blob(ALPINE, data.clone());
    let m = mirror_of(&fake).await;
    fake.set(|f| {
        f.corrupt.insert(d.clone());
    });
    fake.pause_blobs_at(256 << 10);
    let url = m.url_for(&format!("/v2/library/alpine/blobs/{d}"));

    let mut clients: Vec<_> = (0..3).map(|_| spawn_get(&m.client, url.clone())).collect();
    fake.wait_progress("the upstream body to reach the pause", |p| p.paused == 1)
        .await;
    statuses(&mut clients, Duration::from_secs(10)).await;
    fake.release();
    for (i, c) in clients.into_iter().enumerate() {
        match c.body.await.unwrap() {
            Err(_) => {}
            Ok(b) => panic!(
                "client {i}: a body of {} bytes ended cleanly (sha256 {}) although it does not match {d}",
                b.len(),
                sha256_digest(&b)
            ),
        }
    }
    assert_eq!(fake.blob_gets(&d), 1);
    m.assert_nothing_stored("after a digest mismatch").await;

    fake.clear_faults();
    assert!(
        m.blob(ALPINE, &d).await == data,
        "the next request fetches again"
    );
    assert_eq!(fake.blob_gets(&d), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cut_connection_aborts_and_the_next_request_fetches_again() {
    let fake = FakeUpstream::start().await;
    let data = random_bytes(3 << 20, 9);
    let d = fake.add_blob(ALPINE, data.clone());
    // Without resumes (tests/reliability/resume.rs has them): the cut is final.
    let m = start_mirror(&fake.url(), |c| c.upstream.retries = 0).await;
    fake.set(|f| f.cut_after = Some(1 << 20));

    let r = m
        .get(&format!("/v2/library/alpine/blobs/{d}"))
        .await
        .unwrap();
    match read_body(r).await {
        Err(_) => {}
        Ok(b) => panic!("a cut download ended cleanly with {} bytes", b.len()),
    }
    assert_eq!(fake.progress().bodies_cut, 1);
    m.assert_nothing_stored("after a cut connection").await;

    fake.clear_faults();
    assert!(m.blob(ALPINE, &d).await == data);
    assert_eq!(fake.blob_gets(&d), 2);
    assert!(m.committed(&d).await);
}

/// Status, `Content-Range` and body (as [`read_body`] reads it) of a ranged GET.
type Ranged = (u16, String, Result<Vec<u8>, Vec<u8>>);

/// A ranged GET in a task: (status, Content-Range, body as [`read_body`] reads it).
fn spawn_ranged(
    m: &MirrorHandle,
    path: &str,
    range: &'static str,
) -> tokio::task::JoinHandle<Ranged> {
    let (client, url) = (m.client.clone(), m.url_for(path));
    tokio::spawn(async move {
        let r = client.get(url).header("range", range).send().await.unwrap();
        let (status, cr) = (r.status().as_u16(), header(&r, "content-range"));
        (status, cr, read_body(r).await)
    })
}

/// The three range cases on `d` (of `data`), whatever the cache holds.
async fn check_ranges(m: &MirrorHandle, d: &str, data: &[u8]) {
    let path = format!("/v2/library/alpine/blobs/{d}");
    let len = data.len();

    let r = m.get_range(&path, "bytes=10-").await;
    assert_eq!(r.status(), 206, "bytes=10-");
    assert_eq!(
        header(&r, "content-range"),
        format!("bytes 10-{}/{len}", len - 1)
    );
    assert_eq!(header(&r, "content-length"), (len - 10).to_string());
    assert!(r.bytes().await.unwrap() == data[10..]);

    let r = m.get_range(&path, "bytes=10-19").await;
    assert_eq!(r.status(), 206, "bytes=10-19");
    assert_eq!(header(&r, "content-range"), format!("bytes 10-19/{len}"));
    assert_eq!(r.bytes().await.unwrap(), data[10..20]);

    let r = m.get_range(&path, &format!("bytes={}-", len + 5)).await;
    assert_eq!(r.status(), 416, "a range past the end");
}

#[tokio::test]
async fn range_requests_on_a_cached_blob() {
    let fake = FakeUpstream::start().await;
    let data = random_bytes(300_000, 10);
    let d = fake.add_blob(ALPINE, data.clone());
    let m = mirror_of(&fake).await;
    assert!(m.blob(ALPINE, &d).await == data);
    let r = m
        .head(&format!("/v2/library/alpine/blobs/{d}"))
        .await
        .unwrap();
    assert_eq!(header(&r, "accept-ranges"), "bytes");

    check_ranges(&m, &d, &data).await;
    assert_eq!(
        fake.blob_gets(&d),
        1,
        "ranges of a cached blob come from the cache"
    );
}

#[tokio::test]
async fn range_requests_on_an_uncached_blob() {
    let fake = FakeUpstream::start().await;
    let data = random_bytes(300_000, 11);
    let d = fake.add_blob(ALPINE, data.clone());
    let m = mirror_of(&fake).await;

    // The first request the mirror sees for this blob carries a Range.
    let r = m
        .get_range(&format!("/v2/library/alpine/blobs/{d}"), "bytes=10-19")
        .await;
    assert_eq!(r.status(), 206, "bytes=10-19 on a cold blob");
    assert_eq!(
        header(&r, "content-range"),
        format!("bytes 10-19/{}", data.len())
    );
    assert_eq!(r.bytes().await.unwrap(), data[10..20]);

    let data2 = random_bytes(200_000, 12);
    let d2 = fake.add_blob(ALPINE, data2.clone());
    check_ranges(&m, &d2, &data2).await;
    let data3 = random_bytes(100_000, 13);
    let d3 = fake.add_blob(ALPINE, data3.clone());
    let r = m
        .get_range(&format!("/v2/library/alpine/blobs/{d3}"), "bytes=100005-")
        .await;
    assert_eq!(r.status(), 416, "a range past the end of a cold blob");
    assert!(m.blob(ALPINE, &d3).await == data3);
}

#[tokio::test]
async fn blob_is_served_for_another_repository_only_when_upstream_confirms() {
    let fake = FakeUpstream::start().await;
    let data = random_bytes(100_000, 14);
    let d = fake.add_blob(ALPINE, data.clone());
    let m = mirror_of(&fake).await;
    assert!(m.blob(ALPINE, &d).await == data);

    let other = format!("/v2/other/app/blobs/{d}");
    let r = m.get(&other).await.unwrap();
    common::assert_error(r, 404, Some("BLOB_UNKNOWN")).await;
    assert_eq!(
        fake.count("HEAD", &other),
        1,
        "the mirror asked the upstream about other/app"
    );
    let r = m.head(&other).await.unwrap();
    assert_eq!(r.status(), 404, "HEAD for the other repository");

    fake.link_blob("other/app", &d);
    let r = m.get(&other).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.unwrap() == data);
    assert_eq!(
        fake.blob_gets(&d),
        1,
        "confirmed by a HEAD, served from the cache"
    );
}

#[tokio::test]
async fn blob_named_by_a_cached_manifest_of_the_repo_needs_no_upstream_check() {
    let fake = FakeUpstream::start().await;
    let shared = random_bytes(40_000, 22);
    let img = fake.add_image(ALPINE, "3.19", vec![shared.clone()]);
    let app = fake.add_image("team/app", "1", vec![shared.clone(), random_bytes(100, 23)]);
    let d = &img.layer_digests[0];
    assert_eq!(&app.layer_digests[0], d);
    let m = mirror_of(&fake).await;
    assert!(m.blob(ALPINE, d).await == shared);
    m.get_ok("/v2/team/app/manifests/1").await;
    fake.reset_counts();

    assert!(m.blob("team/app", d).await == shared);
    let path = format!("/v2/team/app/blobs/{d}");
    assert_eq!(
        fake.count("HEAD", &path),
        0,
        "team/app's cached manifest names {d}"
    );
    assert_eq!(fake.blob_gets(d), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn range_request_joining_a_download_in_progress() {
    let fake = FakeUpstream::start().await;
    let data = random_bytes(2 << 20, 24);
    let d = fake.add_blob(ALPINE, data.clone());
    let m = mirror_of(&fake).await;
    fake.pause_blobs_at(512 << 10);
    let path = format!("/v2/library/alpine/blobs/{d}");

    let first = spawn_get(&m.client, m.url_for(&path));
    fake.wait_progress("the upstream body to reach the pause", |p| p.paused == 1)
        .await;
    // containerd resuming: one range inside what has arrived, one beyond it. A range's
    // last byte may wait for the blob's verification; its first bytes may not.
    let early = async {
        let mut r = m.get_range(&path, "bytes=1000-1999").await;
        assert_eq!(r.status(), 206);
        assert_eq!(header(&r, "content-range"), "bytes 1000-1999/2097152");
        r.chunk().await.unwrap().map(|c| (r, c))
    };
    let (mut early, chunk) = tokio::time::timeout(Duration::from_secs(10), early)
        .await
        .expect("no bytes of a range already downloaded while the download went on")
        .expect("the range's body ended at once");
    assert_eq!(chunk, data[1000..1000 + chunk.len()]);
    let late = spawn_ranged(&m, &path, "bytes=1048576-");
    fake.release();

    let mut body = chunk.to_vec();
    while let Some(c) = early.chunk().await.expect("range body") {
        body.extend_from_slice(&c);
    }
    assert_eq!(body, data[1000..2000]);
    let (status, cr, body) = late.await.unwrap();
    assert_eq!(
        (status, cr.as_str()),
        (206, "bytes 1048576-2097151/2097152")
    );
    assert!(body.unwrap() == data[1 << 20..]);
    assert!(first.body.await.unwrap().unwrap() == data);
    assert_eq!(fake.blob_gets(&d), 1, "ranges joined the one download");
}

#[tokio::test]
async fn tag_resolves_with_head_and_manifest_get_by_digest() {
    let fake = FakeUpstream::start().await;
    let img = fake.add_image(ALPINE, "3.19", vec![random_bytes(1000, 15)]);
    let m = mirror_of(&fake).await;
    assert_eq!(
        m.get_ok("/v2/library/alpine/manifests/3.19").await,
        img.manifest
    );

    let by_tag = "/v2/library/alpine/manifests/3.19";
    let by_digest = format!("/v2/library/alpine/manifests/{}", img.manifest_digest);
    assert_eq!(fake.count("HEAD", by_tag), 1, "{:?}", fake.requests());
    assert_eq!(
        fake.count("GET", by_tag),
        0,
        "no GET by tag (it counts against rate limits)"
    );
    assert_eq!(fake.count("GET", &by_digest), 1);
}

#[tokio::test]
async fn fresh_tag_needs_no_upstream_request() {
    let fake = FakeUpstream::start().await;
    let img = fake.add_image(ALPINE, "3.19", vec![random_bytes(1000, 16)]);
    let m = mirror_of(&fake).await;
    m.get_ok("/v2/library/alpine/manifests/3.19").await;
    fake.reset_counts();

    let r = m.head("/v2/library/alpine/manifests/3.19").await.unwrap();
    assert_eq!(header(&r, "docker-content-digest"), img.manifest_digest);
    assert_eq!(
        m.get_ok("/v2/library/alpine/manifests/3.19").await,
        img.manifest
    );
    assert!(fake.requests().is_empty(), "{:?}", fake.requests());
}

#[tokio::test]
async fn stale_tag_is_revalidated_with_one_head() {
    let fake = FakeUpstream::start().await;
    let img = fake.add_image(ALPINE, "3.19", vec![random_bytes(1000, 17)]);
    let ttl = Duration::from_millis(300);
    let m = start_mirror(&fake.url(), |c| c.cache.tag_ttl = ttl).await;
    m.get_ok("/v2/library/alpine/manifests/3.19").await;
    fake.reset_counts();
    tokio::time::sleep(ttl + Duration::from_millis(200)).await; // let the TTL pass

    assert_eq!(
        m.get_ok("/v2/library/alpine/manifests/3.19").await,
        img.manifest
    );
    assert_eq!(fake.count("HEAD", "/v2/library/alpine/manifests/3.19"), 1);
    assert_eq!(
        fake.manifest_gets(ALPINE),
        0,
        "digest unchanged: no manifest GET"
    );
}

#[tokio::test]
async fn changed_tag_is_followed_after_the_ttl() {
    let fake = FakeUpstream::start().await;
    let old = fake.add_image(ALPINE, "3.19", vec![random_bytes(1000, 18)]);
    let ttl = Duration::from_millis(300);
    let m = start_mirror(&fake.url(), |c| c.cache.tag_ttl = ttl).await;
    assert_eq!(
        m.get_ok("/v2/library/alpine/manifests/3.19").await,
        old.manifest
    );

    let new = fake.add_image(ALPINE, "3.19", vec![random_bytes(1000, 19)]);
    fake.reset_counts();
    tokio::time::sleep(ttl + Duration::from_millis(200)).await; // let the TTL pass

    let r = m.get("/v2/library/alpine/manifests/3.19").await.unwrap();
    assert_eq!(header(&r, "docker-content-digest"), new.manifest_digest);
    assert_eq!(r.bytes().await.unwrap(), new.manifest);
    let by_digest = format!("/v2/library/alpine/manifests/{}", new.manifest_digest);
    assert_eq!(fake.count("GET", &by_digest), 1);
    pull(&m, ALPINE, "3.19").await;
}

#[tokio::test]
async fn multi_arch_index_fetches_only_the_requested_child() {
    let fake = FakeUpstream::start().await;
    let index = fake.add_index(
        "library/multi",
        "1.0",
        vec![
            ("amd64", vec![random_bytes(5000, 20)]),
            ("arm64", vec![random_bytes(5000, 21)]),
        ],
    );
    let m = mirror_of(&fake).await;

    let r = m.get("/v2/library/multi/manifests/1.0").await.unwrap();
    assert_eq!(header(&r, "content-type"), OCI_INDEX);
    assert_eq!(header(&r, "docker-content-digest"), index.digest);
    assert_eq!(r.bytes().await.unwrap(), index.bytes);

    let amd64 = index.child("amd64");
    let arm64 = index.child("arm64");
    assert_eq!(
        pull(&m, "library/multi", &amd64.manifest_digest).await,
        amd64.manifest
    );

    let child = |d: &str| format!("/v2/library/multi/manifests/{d}");
    assert_eq!(fake.count("GET", &child(&amd64.manifest_digest)), 1);
    assert_eq!(fake.count("GET", &child(&arm64.manifest_digest)), 0);
    assert_eq!(fake.count("HEAD", &child(&arm64.manifest_digest)), 0);
    for (d, _) in arm64.blobs() {
        assert_eq!(fake.blob_gets(&d), 0, "nothing of arm64 fetched");
    }
}

/// cosign stores signatures and attestations under `sha256-<hex>.sig` and
/// `.att` tags of the signed image's repository: they must pull like any tag.
#[tokio::test]
async fn cosign_signature_and_attestation_tags_pull_like_any_tag() {
    let fake = FakeUpstream::start().await;
    let image = fake.add_image("library/alpine", "3.19", vec![random_bytes(4096, 11)]);
    let hex = image
        .manifest_digest
        .trim_start_matches("sha256:")
        .to_owned();
    let sig = fake.add_image(
        "library/alpine",
        &format!("sha256-{hex}.sig"),
        vec![random_bytes(300, 12)],
    );
    let att = fake.add_image(
        "library/alpine",
        &format!("sha256-{hex}.att"),
        vec![random_bytes(300, 13)],
    );
    let mirror = mirror_of(&fake).await;
    for (tag, info) in [("sig", &sig), ("att", &att)] {
        let path = format!("/v2/library/alpine/manifests/sha256-{hex}.{tag}");
        let body = mirror.get_ok(&path).await;
        assert_eq!(body, info.manifest, "{tag} manifest bytes");
        assert_eq!(sha256_digest(&body), info.manifest_digest);
        let layer = mirror.blob("library/alpine", &info.layer_digests[0]).await;
        assert_eq!(layer, info.layers[0], "{tag} payload");
    }
}

/// What a client would get for `GET path` (status, `Docker-Content-Digest`, body), asked of
/// the registry itself rather than through the front door, so that a test can poll one
/// request to the point where it waits on another's upstream fetch.
async fn registry_get(registry: &Registry, path: &str) -> (u16, String, Bytes) {
    let req = regmirror::endpoint::parse(&http::Method::GET, path, None).unwrap();
    let response = match registry.handle(&req, &http::HeaderMap::new(), None).await {
        Ok(reply) => reply.response,
        Err(e) => regmirror::response::error(&e, false),
    };
    let status = response.status().as_u16();
    let digest = response
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, digest, body)
}

/// The registry API error code of an error body.
fn error_code(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    v["errors"][0]["code"].as_str().unwrap_or("").to_owned()
}

/// Starts `first` (driving it) until the fake holds its upstream request, then polls
/// `second` once: nothing in a manifest request waits before the single-flight fetch, so
/// a pending `second` is waiting on `first`'s fetch. Then lets the upstream answer.
async fn second_joins_first<A: std::future::Future, B: std::future::Future>(
    fake: &FakeUpstream,
    first: A,
    second: B,
) -> (A::Output, B::Output) {
    tokio::pin!(first, second);
    tokio::select! {
        _ = &mut first => panic!("the first request ended before its upstream GET"),
        _ = fake.wait_progress("the first manifest GET to be held", |p| p.held == 1) => {}
    }
    tokio::select! {
        biased;
        _ = &mut second => panic!("the second request ended while the first one's GET is held"),
        () = std::future::ready(()) => {}
    }
    fake.release();
    tokio::join!(first, second)
}

#[tokio::test]
async fn another_repositorys_manifest_error_is_not_shared() {
    let fake = FakeUpstream::start().await;
    let img = fake.add_image("team/b", "1", vec![random_bytes(500, 30)]);
    fake.add_image("team/a", "1", vec![random_bytes(500, 31)]);
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::open(&test_config(dir.path(), &fake.url()))
        .await
        .unwrap();
    let digest = &img.manifest_digest;
    // Only team/a's GET is held, and team/a does not have the manifest: it gets a 404.
    fake.hold_requests("/v2/team/a/manifests/");

    let ((a_status, _, a_body), (b_status, b_digest, b_body)) = second_joins_first(
        &fake,
        registry_get(&registry, &format!("/v2/team/a/manifests/{digest}")),
        registry_get(&registry, &format!("/v2/team/b/manifests/{digest}")),
    )
    .await;

    assert_eq!(a_status, 404);
    assert_eq!(error_code(&a_body), "MANIFEST_UNKNOWN");
    assert_eq!(
        b_status,
        200,
        "team/b was given team/a's answer: {}",
        String::from_utf8_lossy(&b_body)
    );
    assert_eq!(b_digest, *digest);
    assert_eq!(b_body, img.manifest);
}

#[tokio::test]
async fn concurrent_requests_of_one_repository_share_one_manifest_get() {
    let fake = FakeUpstream::start().await;
    let img = fake.add_image(ALPINE, "3.19", vec![random_bytes(500, 32)]);
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::open(&test_config(dir.path(), &fake.url()))
        .await
        .unwrap();
    let path = format!("/v2/{ALPINE}/manifests/{}", img.manifest_digest);
    fake.hold_requests("/manifests/");

    let (first, second) = second_joins_first(
        &fake,
        registry_get(&registry, &path),
        registry_get(&registry, &path),
    )
    .await;

    for (status, digest, body) in [first, second] {
        assert_eq!(status, 200);
        assert_eq!(digest, img.manifest_digest);
        assert_eq!(body, img.manifest);
    }
    assert_eq!(fake.count("GET", &path), 1, "{:?}", fake.requests());
}

#[tokio::test]
async fn a_manifest_the_store_cannot_take_is_served_anyway() {
    let fake = FakeUpstream::start().await;
    let img = fake.add_image(ALPINE, "3.19", vec![random_bytes(500, 33)]);
    fake.add_image("team/app", "1", vec![img.layers[0].to_vec()]);
    let m = mirror_of(&fake).await;
    // A file where `tmp/` was: the manifest's temp file cannot be created.
    let tmp = m.data_dir.join("tmp");
    std::fs::remove_dir(&tmp).unwrap();
    std::fs::write(&tmp, b"in the way").unwrap();

    let r = m
        .get(&format!("/v2/{ALPINE}/manifests/{}", img.manifest_digest))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "docker-content-digest"), img.manifest_digest);
    assert_eq!(r.bytes().await.unwrap(), img.manifest);
    assert!(!m.manifest_path(&img.manifest_digest).exists());

    // The repository's membership was recorded all the same: a layer the manifest names,
    // cached through another repository, is served for it without asking the upstream.
    std::fs::remove_file(&tmp).unwrap();
    std::fs::create_dir(&tmp).unwrap();
    let layer = &img.layer_digests[0];
    assert!(m.blob("team/app", layer).await == img.layers[0]);
    assert!(m.committed(layer).await);
    fake.reset_counts();
    assert!(m.blob(ALPINE, layer).await == img.layers[0]);
    let path = format!("/v2/{ALPINE}/blobs/{layer}");
    assert_eq!(fake.count("HEAD", &path), 0, "{:?}", fake.requests());

    // Not kept in memory either: the next request fetches it again, and stores it.
    let path = format!("/v2/{ALPINE}/manifests/{}", img.manifest_digest);
    assert_eq!(m.get_ok(&path).await, img.manifest);
    assert_eq!(fake.count("GET", &path), 1, "{:?}", fake.requests());
    assert!(m.manifest_path(&img.manifest_digest).is_file());
}

/// Downloads in flight are bounded (`cache.max_downloads`): past it a miss is refused with 503
/// at once, clients following a running download still join it, and once it ends the next
/// miss is fetched.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn downloads_past_max_downloads_are_refused_with_503_until_one_ends() {
    let fake = FakeUpstream::start().await;
    let a = random_bytes(1 << 20, 8);
    let b = random_bytes(1 << 20, 9);
    let (da, db) = (
        fake.add_blob(ALPINE, a.clone()),
        fake.add_blob(ALPINE, b.clone()),
    );
    let m = start_mirror(&fake.url(), |c| c.cache.max_downloads = 1).await;
    fake.hold_requests("/blobs/");
    let first = spawn_get(&m.client, m.url_for(&format!("/v2/{ALPINE}/blobs/{da}")));
    fake.wait_progress("the first blob request to be held", |p| p.held >= 1)
        .await;
    let r = m.get(&format!("/v2/{ALPINE}/blobs/{db}")).await.unwrap();
    assert_eq!(r.status(), 503);
    let body = json(r).await;
    assert_eq!(body["errors"][0]["code"], "UNAVAILABLE", "{body}");
    let joiner = spawn_get(&m.client, m.url_for(&format!("/v2/{ALPINE}/blobs/{da}")));
    fake.release();
    assert!(first.body.await.unwrap().is_ok_and(|x| x == a));
    assert!(joiner.body.await.unwrap().is_ok_and(|x| x == a));
    assert!(m.committed(&da).await);
    // The first download leaves the map just after its commit.
    let path = format!("/v2/{ALPINE}/blobs/{db}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let got = loop {
        let r = m.get(&path).await.unwrap();
        if r.status() != 503 || std::time::Instant::now() > deadline {
            break (r.status(), r.bytes().await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        got.0 == 200 && got.1 == b,
        "the next miss after the download ended: {}",
        got.0
    );
    assert_eq!(fake.blob_gets(&da), 1);
}
