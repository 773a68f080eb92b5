//! The cache budget as a user sees it: bytes on disk stay within `cache.max_size`, the least
//! recently *pulled* images are the ones evicted, a blob larger than the budget is served but
//! not kept, idle blobs are evicted whatever the usage, and per-pattern tag TTLs decide which
//! tags are revalidated upstream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::cache::{disk_usage, pull, temp_files};
use common::images::ImageInfo;
use common::{random_bytes, start_mirror, wait_until, FakeUpstream, MirrorHandle};
use regmirror::config::{ByteSize, TagTtlRuleConfig};

const MIB: u64 = 1 << 20;
const REPO: &str = "team/app";

/// How long eviction may take after the download that triggers it (it runs at once, and
/// every 10 s in any case).
const EVICTION: Duration = Duration::from_secs(10);

/// Waits until the cache is within `max` bytes on disk; panics with what is there otherwise.
async fn assert_within_budget(m: &MirrorHandle, max: u64, when: &str) {
    let ok = wait_until(EVICTION, || disk_usage(&m.data_dir) <= max).await;
    assert!(
        ok,
        "{when}: {} bytes on disk under blobs/, manifests/ and tmp/ after {EVICTION:?}, \
         max_size is {max} (temp files: {:?})",
        disk_usage(&m.data_dir),
        temp_files(&m.data_dir)
    );
}

/// Whether every blob of `img` (config and layers) and its manifest are on disk.
/// Whether the image's manifest and blobs are all on disk within a few seconds (a blob's
/// commit follows the last byte sent to the client).
async fn all_cached(m: &MirrorHandle, img: &ImageInfo) -> bool {
    wait_until(Duration::from_secs(10), || {
        m.manifest_path(&img.manifest_digest).is_file()
            && img.blobs().iter().all(|(d, _)| m.blob_path(d).is_file())
    })
    .await
}

/// Upstream requests to the registry API (`/v2/...`, any method) since the last reset.
fn registry_requests(fake: &FakeUpstream) -> Vec<String> {
    fake.requests()
        .into_iter()
        .filter(|r| r.path.starts_with("/v2/"))
        .map(|r| format!("{} {}", r.method, r.path))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulling_more_than_the_budget_keeps_disk_use_within_max_size() {
    let fake = FakeUpstream::start().await;
    let images: Vec<ImageInfo> = (0..5u64)
        .map(|i| {
            let layer = random_bytes(MIB as usize, 100 + i);
            fake.add_image(REPO, &format!("v{i}"), vec![layer])
        })
        .collect();
    let max = 4 * MIB;
    let m = start_mirror(&fake.url(), |c| c.cache.max_size = ByteSize(max)).await;

    // 5 MiB of images through a 4 MiB cache (watermarks 3.6 and 3.2 MiB): three fit.
    for (i, img) in images.iter().enumerate() {
        assert_eq!(pull(&m, REPO, &format!("v{i}")).await, img.manifest);
        assert_within_budget(&m, max, &format!("after pulling v{i}")).await;
    }
    assert!(
        disk_usage(&m.data_dir) >= 2 * MIB,
        "eviction frees down to the low watermark (3.2 MiB), not everything: {} bytes left",
        disk_usage(&m.data_dir)
    );

    // The most recent pull is still cached: no upstream request at all.
    let last = &images[4];
    assert!(all_cached(&m, last).await, "v4 (pulled last) is on disk");
    fake.reset_counts();
    assert_eq!(pull(&m, REPO, "v4").await, last.manifest);
    assert_eq!(
        registry_requests(&fake),
        Vec::<String>::new(),
        "re-pull of v4"
    );

    // The first one was evicted: its re-pull goes upstream again.
    let first = &images[0];
    assert!(
        !m.blob_path(&first.layer_digests[0]).exists(),
        "v0's layer (pulled first) was evicted"
    );
    fake.reset_counts();
    assert_eq!(pull(&m, REPO, "v0").await, first.manifest);
    assert_eq!(
        fake.blob_gets(&first.layer_digests[0]),
        1,
        "re-pull of v0 fetched its layer again: {:?}",
        registry_requests(&fake)
    );
    assert_within_budget(&m, max, "after pulling v0 again").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_is_least_recently_pulled_not_least_recently_stored() {
    let fake = FakeUpstream::start().await;
    let layer = |seed| vec![random_bytes(13 * MIB as usize / 10, seed)];
    let a = fake.add_image(REPO, "a", layer(200));
    let b = fake.add_image(REPO, "b", layer(201));
    let c = fake.add_image(REPO, "c", layer(202));
    // Watermarks 3.6 and 3.2 MiB: A and B (2.6 MiB) fit; C (3.9 MiB in all) forces one out.
    let m = start_mirror(&fake.url(), |cfg| cfg.cache.max_size = ByteSize(4 * MIB)).await;

    pull(&m, REPO, "a").await;
    pull(&m, REPO, "b").await;
    assert!(
        all_cached(&m, &a).await && all_cached(&m, &b).await,
        "A and B fit"
    );
    fake.reset_counts();
    pull(&m, REPO, "a").await;
    assert_eq!(
        registry_requests(&fake),
        Vec::<String>::new(),
        "the second pull of A is a cache hit"
    );

    pull(&m, REPO, "c").await;
    let b_layer = m.blob_path(&b.layer_digests[0]);
    let evicted = wait_until(EVICTION, || !b_layer.exists()).await;
    assert!(
        evicted,
        "B (stored after A, but pulled before A's second pull) was not evicted; {} bytes on disk",
        disk_usage(&m.data_dir)
    );
    assert!(
        all_cached(&m, &a).await,
        "A (pulled again after B) was evicted instead of, or besides, B"
    );
    assert!(all_cached(&m, &c).await, "C (pulled last) is cached");

    fake.reset_counts();
    pull(&m, REPO, "a").await;
    assert_eq!(
        registry_requests(&fake),
        Vec::<String>::new(),
        "A is still served from the cache"
    );
    pull(&m, REPO, "b").await;
    assert_eq!(
        fake.blob_gets(&b.layer_digests[0]),
        1,
        "B's layer is fetched again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_larger_than_the_budget_is_served_but_not_kept() {
    let fake = FakeUpstream::start().await;
    let data = random_bytes(3 * MIB as usize, 300);
    let d = fake.add_blob(REPO, data.clone());
    let m = start_mirror(&fake.url(), |c| c.cache.max_size = ByteSize(MIB)).await;

    let body = m.blob(REPO, &d).await;
    assert!(
        body == data,
        "the client got {} bytes, not the blob",
        body.len()
    );
    let clean = wait_until(EVICTION, || temp_files(&m.data_dir).is_empty()).await;
    assert!(clean, "DATA/tmp still holds {:?}", temp_files(&m.data_dir));
    assert!(!m.blob_path(&d).exists(), "a blob above max_size was kept");
    assert!(
        disk_usage(&m.data_dir) <= MIB,
        "{} bytes on disk",
        disk_usage(&m.data_dir)
    );

    // Not cached: the next client is served from a new upstream GET, correctly.
    assert!(m.blob(REPO, &d).await == data);
    assert_eq!(fake.blob_gets(&d), 2);
    assert!(!m.blob_path(&d).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_blobs_are_evicted_whatever_the_usage() {
    let fake = FakeUpstream::start().await;
    let a = fake.add_image(REPO, "a", vec![random_bytes(200_000, 400)]);
    let b = fake.add_image(REPO, "b", vec![random_bytes(200_000, 401)]);
    let idle = Duration::from_secs(1);
    // The default 20 GiB budget: usage has nothing to do with it.
    let m = start_mirror(&fake.url(), |c| c.cache.blob_idle_ttl = idle).await;

    pull(&m, REPO, "a").await;
    assert!(all_cached(&m, &a).await);
    tokio::time::sleep(idle + Duration::from_millis(200)).await; // let A's blobs idle out

    pull(&m, REPO, "b").await;
    // Checked at once: B's blobs are younger than their idle TTL only for a second.
    let a_gone = wait_until(EVICTION, || {
        a.blobs().iter().all(|(d, _)| !m.blob_path(d).exists())
    })
    .await;
    let b_kept = all_cached(&m, &b).await;
    assert!(
        a_gone,
        "A's blobs, not pulled for {idle:?}, were not evicted"
    );
    assert!(b_kept, "B's blobs, just pulled, were evicted");
    assert!(
        m.manifest_path(&a.manifest_digest).is_file(),
        "manifest_idle_ttl (30 days) is not blob_idle_ttl: A's manifest stays"
    );

    fake.reset_counts();
    pull(&m, REPO, "a").await;
    assert_eq!(
        fake.blob_gets(&a.layer_digests[0]),
        1,
        "A's layer fetched again"
    );
    assert_eq!(fake.manifest_gets(REPO), 0, "A's manifest was still cached");
}

#[tokio::test]
async fn latest_is_revalidated_on_every_request_other_tags_keep_the_default_ttl() {
    let fake = FakeUpstream::start().await;
    let img = fake.add_image(REPO, "latest", vec![random_bytes(1000, 500)]);
    fake.tag(REPO, "1.0", &img.manifest_digest);
    let ttl = Duration::from_millis(1);
    let m = start_mirror(&fake.url(), |c| {
        c.cache.tag_ttl = Duration::from_secs(300);
        c.cache.tag_ttl_rules = vec![TagTtlRuleConfig {
            pattern: "*:latest".into(),
            ttl,
        }];
    })
    .await;
    let latest = format!("/v2/{REPO}/manifests/latest");
    let one = format!("/v2/{REPO}/manifests/1.0");
    assert_eq!(m.get_ok(&latest).await, img.manifest);
    assert_eq!(m.get_ok(&one).await, img.manifest);
    fake.reset_counts();

    for _ in 0..3 {
        tokio::time::sleep(ttl * 5).await; // let the 1 ms TTL of latest pass
        assert_eq!(m.get_ok(&latest).await, img.manifest);
        assert_eq!(m.get_ok(&one).await, img.manifest);
    }
    assert_eq!(
        fake.count("HEAD", &latest),
        3,
        "latest (rule *:latest, 1 ms) is revalidated with a HEAD on each request: {:?}",
        registry_requests(&fake)
    );
    assert_eq!(
        fake.count_prefix("HEAD", &one) + fake.count_prefix("GET", &one),
        0,
        "1.0 (default 300 s) is served from the cache"
    );
    assert_eq!(
        fake.manifest_gets(REPO),
        0,
        "the digest did not change: no manifest GET"
    );
}

/// A blob whose Content-Length is over the budget is never spooled: its clients are fed from
/// memory at the pace of the slowest, and tmp/ stays empty while it streams. (A client that
/// arrives once the first bytes are dropped gets a download of its own, so the number of
/// upstream GETs depends on when the clients arrive and is not asserted.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blob_larger_than_the_budget_is_not_spooled_while_it_streams() {
    let fake = FakeUpstream::start().await;
    let data = random_bytes(8 * MIB as usize, 301);
    let d = fake.add_blob(REPO, data.clone());
    let m = start_mirror(&fake.url(), |c| c.cache.max_size = ByteSize(MIB)).await;
    fake.pause_blobs_at(6 * MIB);
    let url = m.url_for(&format!("/v2/{REPO}/blobs/{d}"));
    let clients: Vec<_> = (0..4)
        .map(|_| common::spawn_get(&m.client, url.clone()))
        .collect();
    fake.wait_progress("the upstream body to reach 6 MiB", |p| p.paused >= 1)
        .await;
    let spooled: u64 = temp_files(&m.data_dir).iter().map(|(_, n)| n).sum();
    fake.release();
    for (i, c) in clients.into_iter().enumerate() {
        let body = c.body.await.unwrap();
        assert!(
            body.is_ok_and(|b| b == data),
            "client {i}: wrong or aborted body"
        );
    }
    assert_eq!(
        spooled, 0,
        "{spooled} bytes spooled for a blob that cannot be kept"
    );
    assert!(!m.blob_path(&d).exists(), "a blob above max_size was kept");
}

/// Without a Content-Length the size is learnt as the bytes come: the spool stops at the
/// budget, the rest streams from memory, and the client still gets the whole verified blob.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blob_without_content_length_stops_spooling_at_the_budget() {
    let fake = FakeUpstream::start().await;
    let data = random_bytes(4 * MIB as usize, 302);
    let d = fake.add_blob(REPO, data.clone());
    fake.set(|f| f.no_content_length = true);
    let m = start_mirror(&fake.url(), |c| c.cache.max_size = ByteSize(MIB)).await;
    fake.pause_blobs_at(3 * MIB);
    let url = m.url_for(&format!("/v2/{REPO}/blobs/{d}"));
    let (head, rest) = read_past(&m, &url, 3 * MIB - 256 * 1024).await;
    let spooled: u64 = temp_files(&m.data_dir).iter().map(|(_, n)| n).sum();
    fake.release();
    assert!(
        [head, rest.await.unwrap()].concat() == data,
        "wrong or aborted body"
    );
    assert!(
        spooled <= MIB,
        "{spooled} bytes spooled past a budget of {MIB}"
    );
    assert!(!m.blob_path(&d).exists(), "a blob above max_size was kept");
}

/// GETs `url` and reads its body until more than `past` bytes came (so the mirror has received
/// them: it forwards only what it has); the bytes read, and a task that reads the rest.
async fn read_past(
    m: &MirrorHandle,
    url: &str,
    past: u64,
) -> (Vec<u8>, tokio::task::JoinHandle<Vec<u8>>) {
    let mut resp = m.client.get(url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut head = Vec::new();
    while (head.len() as u64) <= past {
        let chunk = resp.chunk().await.unwrap().expect("the body ended early");
        head.extend_from_slice(&chunk);
    }
    let rest = tokio::spawn(async move {
        let mut rest = Vec::new();
        while let Some(chunk) = resp.chunk().await.unwrap() {
            rest.extend_from_slice(&chunk);
        }
        rest
    });
    (head, rest)
}
