//! Hosted content is kept (issue 16): across a restart of the mirror (tags, manifests, blobs,
//! deletes), and through the cache's budget, which never evicts what was pushed nor a cached
//! blob once mounted into a hosted repository (hosted bytes count against `hosted.max_size`,
//! not `cache.max_size`).

use std::time::Duration;

use regmirror::config::ByteSize;

use crate::common::cache::{disk_usage, pull};
use crate::common::images::ImageInfo;
use crate::common::{random_bytes, wait_until, FakeUpstream, MirrorHandle};
use crate::push::{
    delete, get, hosted_mirror, hosting, post_upload, push_image, upstream_requests_for, APP,
};

const MIB: usize = 1 << 20;
const MIRRORED: &str = "team/app";

/// Pulls `count` fresh 1 MiB images of [`MIRRORED`] (tags `fill<seed>-<i>`) through `m`,
/// more than the cache's budget, and waits until eviction has taken the first of them (the
/// least recently used mirrored image, so everything older that is not pinned is gone too).
async fn churn(m: &MirrorHandle, fake: &FakeUpstream, count: u64, seed: u64) {
    let mut first = None;
    for i in 0..count {
        let tag = format!("fill{seed}-{i}");
        let img = fake.add_image(MIRRORED, &tag, vec![random_bytes(MIB, seed * 100 + i)]);
        assert_eq!(pull(m, MIRRORED, &tag).await, img.manifest);
        first.get_or_insert(img);
    }
    let first = first.expect("churned");
    let path = m.blob_path(&first.layer_digests[0]);
    // Eviction runs after the download that passes the budget, and every 10 s.
    let evicted = wait_until(Duration::from_secs(15), || !path.exists()).await;
    assert!(
        evicted,
        "no eviction: {MIRRORED}'s oldest layer is still cached ({} bytes in the cache areas)",
        disk_usage(&m.data_dir)
    );
}

/// Asserts the whole image is served from `repo`: manifest by tag, every blob's bytes.
async fn assert_image_served(m: &MirrorHandle, repo: &str, tag: &str, img: &ImageInfo) {
    let a = get(m, &format!("/v2/{repo}/manifests/{tag}"))
        .await
        .expect(200);
    assert!(a.body == img.manifest, "{repo}:{tag}: other manifest bytes");
    for (d, bytes) in img.blobs() {
        let a = get(m, &format!("/v2/{repo}/blobs/{d}")).await.expect(200);
        assert!(a.body == bytes, "{repo}: blob {d}: other bytes");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_content_survives_the_cache_budget() {
    let fake = FakeUpstream::start().await;
    let max = 3 * MIB as u64;
    let m = hosted_mirror(&fake, |c| c.cache.max_size = ByteSize(max)).await;
    // Bigger than the cache's budget: hosted bytes are not the cache's.
    let ours = push_image(
        &m,
        APP,
        "v1",
        vec![random_bytes(2 * MIB, 60), random_bytes(2 * MIB, 61)],
    )
    .await;
    churn(&m, &fake, 5, 1).await;
    assert_image_served(&m, APP, "v1", &ours).await;
    assert!(upstream_requests_for(&fake, "/v2/myorg/").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mounted_cached_blob_survives_the_cache_budget() {
    let fake = FakeUpstream::start().await;
    let max = 3 * MIB as u64;
    let theirs = fake.add_image("library/base", "1", vec![random_bytes(MIB, 62)]);
    let m = hosted_mirror(&fake, |c| c.cache.max_size = ByteSize(max)).await;
    let layer = &theirs.layer_digests[0];
    assert_eq!(pull(&m, "library/base", "1").await, theirs.manifest);
    assert!(m.committed(layer).await);
    post_upload(&m, APP, &format!("?mount={layer}&from=library/base"))
        .await
        .expect(201);
    let fetched = fake.blob_gets(layer);

    // Enough mirrored pulls that the least recently used, this layer among them, would go.
    churn(&m, &fake, 6, 2).await;
    let a = get(&m, &format!("/v2/{APP}/blobs/{layer}"))
        .await
        .expect(200);
    assert!(a.body == theirs.layers[0], "mounted layer: other bytes");
    assert_eq!(
        fake.blob_gets(layer),
        fetched,
        "the mounted layer was evicted and fetched again"
    );
    assert!(upstream_requests_for(&fake, "/v2/myorg/").is_empty());
}

#[tokio::test]
async fn pushed_content_and_deletes_survive_a_restart() {
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |_| {}).await;
    let kept = push_image(&m, APP, "v1", vec![random_bytes(5000, 63)]).await;
    let gone = push_image(&m, APP, "v2", vec![random_bytes(5000, 64)]).await;
    push_image(&m, "myorg/tools", "latest", vec![random_bytes(5000, 65)]).await;
    delete(&m, &format!("/v2/{APP}/manifests/{}", gone.manifest_digest))
        .await
        .expect(202);

    let dir = m.stop().await;
    let m = MirrorHandle::start_in(dir, &fake.url(), hosting).await;

    assert_image_served(&m, APP, "v1", &kept).await;
    get(&m, &format!("/v2/{APP}/manifests/v2"))
        .await
        .expect_error(404, "MANIFEST_UNKNOWN");
    let tags = get(&m, &format!("/v2/{APP}/tags/list")).await.expect(200);
    assert_eq!(tags.json()["tags"], serde_json::json!(["v1"]));
    let catalog = get(&m, "/v2/_catalog").await.expect(200).json();
    for repo in [APP, "myorg/tools"] {
        assert!(
            catalog["repositories"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r == repo),
            "{repo} not in {catalog}"
        );
    }
    assert!(upstream_requests_for(&fake, "/v2/myorg/").is_empty());
}

/// A pushed blob damaged on disk while the mirror is down (same length, other bytes) is not
/// served as if it were right: the client gets an error or a cut body, never a clean 200 of
/// the wrong bytes.
#[tokio::test]
async fn a_pushed_blob_damaged_on_disk_is_not_served_clean() {
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |_| {}).await;
    let bytes = random_bytes(200_000, 75);
    let digest = crate::push::push_blob(&m, APP, &bytes).await;
    let dir = m.stop().await;
    let files = crate::push::files_holding(&dir.path().join("hosted"), &bytes[..1024]);
    assert_eq!(files.len(), 1, "the blob's file under hosted/: {files:?}");
    let mut damaged = std::fs::read(&files[0]).unwrap();
    let at = damaged.len() - 1000;
    damaged[at] ^= 0xff;
    std::fs::write(&files[0], &damaged).unwrap();

    let m = MirrorHandle::start_in(dir, &fake.url(), hosting).await;
    let r = m.get(&format!("/v2/{APP}/blobs/{digest}")).await;
    if let Ok(r) = r {
        let status = r.status().as_u16();
        let body = crate::common::read_body(r).await;
        assert!(
            !(status == 200 && body.as_deref() == Ok(&damaged[..])),
            "the damaged blob was served clean with 200"
        );
    }
}

/// What was pushed before a restart, and an upload left open across it, still count against
/// `hosted.max_size` after it.
#[tokio::test]
async fn the_quota_counts_what_was_there_before_a_restart() {
    let fake = FakeUpstream::start().await;
    let quota = |c: &mut regmirror::config::Config| {
        hosting(c);
        c.hosted.max_size = Some(ByteSize(100_000));
    };
    let m = MirrorHandle::start_in(tempfile::tempdir().unwrap(), &fake.url(), quota).await;
    crate::push::push_blob(&m, APP, &random_bytes(40_000, 76)).await;
    let open = crate::push::open_upload(&m, APP).await;
    crate::push::patch(&m, &open, &random_bytes(30_000, 77), Some((0, 29_999)))
        .await
        .expect(202);
    let open = crate::push::path_of(&open);
    let dir = m.stop().await;
    let m = MirrorHandle::start_in(dir, &fake.url(), quota).await;

    // 40 kB pushed + 30 kB in the open upload + 40 kB > 100 kB.
    let over = random_bytes(40_000, 78);
    let d = crate::common::images::sha256_digest(&over);
    let loc = crate::push::open_upload(&m, APP).await;
    crate::push::put_upload(&m, &loc, &d, &over)
        .await
        .expect_error(403, "DENIED");
    // Once the open upload is cancelled, it fits.
    crate::push::delete(&m, &open).await.expect(204);
    crate::push::push_blob(&m, APP, &over).await;
}
