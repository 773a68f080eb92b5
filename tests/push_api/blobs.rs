//! What a pushed blob is once it is in: served whole and by ranges (empty, large, under a
//! sha512 digest), its repository's and no other's, kept once when pushed twice at once,
//! and mounted into another repository (from a hosted one by its link, from a mirrored one
//! whose blob is cached without a byte sent).

use reqwest::Method;

use crate::common::images::sha256_digest;
use crate::common::{random_bytes, FakeUpstream};
use crate::push::{
    assert_blob_served, get, head, hosted_mirror, open_upload, patch, path_of, post_upload,
    push_blob, put_upload, send, upstream_requests_for, APP,
};

#[tokio::test]
async fn a_blob_mounts_from_another_hosted_repository() {
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |_| {}).await;
    let bytes = random_bytes(8_000, 10);
    let digest = push_blob(&m, APP, &bytes).await;

    let a = post_upload(&m, "myorg/copy", &format!("?mount={digest}&from={APP}"))
        .await
        .expect(201);
    assert_eq!(
        path_of(&a.location(&m)),
        format!("/v2/myorg/copy/blobs/{digest}")
    );
    assert_eq!(a.header("docker-content-digest"), digest);
    assert_blob_served(&m, "myorg/copy", &digest, &bytes).await;

    // A blob the registry does not have, or no `from`: an ordinary upload to go on with
    // (the conformance suite's "Cross-mounting of nonexistent blob should yield session id").
    let missing = sha256_digest(b"hello world");
    for query in [
        format!("?mount={missing}&from={APP}"),
        format!("?mount={missing}"),
    ] {
        let a = post_upload(&m, "myorg/copy", &query).await.expect(202);
        assert!(
            path_of(&a.location(&m)).starts_with("/v2/myorg/copy/blobs/uploads/"),
            "{query}: Location {}",
            a.header("location")
        );
    }
    assert!(upstream_requests_for(&fake, "/v2/myorg/").is_empty());
}

#[tokio::test]
async fn a_cached_blob_of_a_mirrored_repository_mounts_without_its_bytes() {
    let fake = FakeUpstream::start().await;
    let img = fake.add_image("library/alpine", "3.19", vec![random_bytes(50_000, 11)]);
    let m = hosted_mirror(&fake, |_| {}).await;
    let layer = &img.layer_digests[0];
    // Pulled through the mirror, so cached.
    let pulled = m.blob("library/alpine", layer).await;
    assert!(pulled == img.layers[0]);
    assert!(m.committed(layer).await);
    let fetched = fake.blob_gets(layer);

    let a = post_upload(&m, APP, &format!("?mount={layer}&from=library/alpine"))
        .await
        .expect(201);
    assert_eq!(path_of(&a.location(&m)), format!("/v2/{APP}/blobs/{layer}"));
    assert_eq!(a.header("docker-content-digest"), *layer);
    assert_blob_served(&m, APP, layer, &img.layers[0]).await;
    assert_eq!(
        fake.blob_gets(layer),
        fetched,
        "the mount fetched the blob again"
    );
    assert!(upstream_requests_for(&fake, "/v2/myorg/").is_empty());
}

#[tokio::test]
async fn a_pushed_blob_serves_byte_ranges() {
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |_| {}).await;
    let bytes = random_bytes(10_000, 12);
    let digest = push_blob(&m, APP, &bytes).await;
    let path = format!("/v2/{APP}/blobs/{digest}");
    let a = send(&m, Method::GET, &path, &[("range", "bytes=100-199")], None)
        .await
        .expect(206);
    assert!(a.body[..] == bytes[100..200], "other bytes");
    assert_eq!(a.header("content-range"), "bytes 100-199/10000");
    let a = send(&m, Method::GET, &path, &[("range", "bytes=9000-")], None)
        .await
        .expect(206);
    assert!(a.body[..] == bytes[9000..], "other bytes");
}

/// A blob is its repository's: another repository does not serve it, nor mount it from a
/// repository that does not hold it.
#[tokio::test]
async fn a_blob_belongs_to_the_repositories_it_was_pushed_or_mounted_to() {
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |_| {}).await;
    let bytes = random_bytes(3000, 13);
    let digest = push_blob(&m, APP, &bytes).await;
    get(&m, &format!("/v2/myorg/other/blobs/{digest}"))
        .await
        .expect_error(404, "BLOB_UNKNOWN");
    head(&m, &format!("/v2/myorg/other/blobs/{digest}"))
        .await
        .expect(404);
    // `from` names a repository without it: an upload, not a mount.
    post_upload(
        &m,
        "myorg/other",
        &format!("?mount={digest}&from=myorg/third"),
    )
    .await
    .expect(202);
    head(&m, &format!("/v2/myorg/other/blobs/{digest}"))
        .await
        .expect(404);
}

#[tokio::test]
async fn an_empty_blob_is_pushed_and_served() {
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |_| {}).await;
    let digest = sha256_digest(b"");
    let loc = open_upload(&m, APP).await;
    let a = put_upload(&m, &loc, &digest, b"").await.expect(201);
    assert_eq!(a.header("docker-content-digest"), digest);
    assert_blob_served(&m, APP, &digest, b"").await;
    // In one POST too, into another repository.
    send(
        &m,
        Method::POST,
        &format!("/v2/myorg/other/blobs/uploads/?digest={digest}"),
        &[("content-type", "application/octet-stream")],
        Some(Vec::new()),
    )
    .await
    .expect(201);
    assert_blob_served(&m, "myorg/other", &digest, b"").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_blob_goes_in_a_few_big_chunks() {
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |_| {}).await;
    let bytes = random_bytes(12 << 20, 14);
    let digest = sha256_digest(&bytes);
    let mut loc = open_upload(&m, APP).await;
    let mut at = 0;
    for chunk in bytes.chunks(5 << 20) {
        let end = at + chunk.len() as u64 - 1;
        let a = patch(&m, &loc, chunk, Some((at, end))).await.expect(202);
        assert_eq!(a.header("range"), format!("0-{end}"));
        loc = a.location(&m);
        at = end + 1;
    }
    put_upload(&m, &loc, &digest, b"").await.expect(201);
    assert_blob_served(&m, APP, &digest, &bytes).await;
}

/// Parallel pushes of images sharing a layer upload it at the same time: both succeed, and
/// the bytes are kept (and counted against the quota) once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_blob_pushed_twice_at_once_is_kept_once() {
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |c| {
        c.hosted.max_size = Some(regmirror::config::ByteSize(5 << 19));
    })
    .await;
    let bytes = random_bytes(1 << 20, 15);
    let digest = sha256_digest(&bytes);
    let (a, b) = tokio::join!(
        async {
            let loc = open_upload(&m, APP).await;
            put_upload(&m, &loc, &digest, &bytes).await
        },
        async {
            let loc = open_upload(&m, "myorg/other").await;
            put_upload(&m, &loc, &digest, &bytes).await
        }
    );
    a.expect(201);
    b.expect(201);
    assert_blob_served(&m, APP, &digest, &bytes).await;
    assert_blob_served(&m, "myorg/other", &digest, &bytes).await;
    // 1 MiB held once, under a 2.5 MiB quota: another 1 MiB fits.
    push_blob(&m, APP, &random_bytes(1 << 20, 16)).await;
}

/// sha512 is the spec's other registered algorithm: an upload closed with a sha512 digest is
/// verified and served under it.
#[tokio::test]
async fn a_blob_pushed_under_a_sha512_digest_is_served_under_it() {
    use sha2::Digest as _;
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |_| {}).await;
    let bytes = random_bytes(5000, 17);
    let digest = format!("sha512:{}", hex::encode(sha2::Sha512::digest(&bytes)));
    let loc = open_upload(&m, APP).await;
    let a = patch(&m, &loc, &bytes, Some((0, 4999))).await.expect(202);
    let put = put_upload(&m, &a.location(&m), &digest, b"")
        .await
        .expect(201);
    assert_eq!(put.header("docker-content-digest"), digest);
    assert_blob_served(&m, APP, &digest, &bytes).await;
    // And a wrong one is refused.
    let wrong = format!("sha512:{}", hex::encode(sha2::Sha512::digest(b"other")));
    let loc = open_upload(&m, APP).await;
    put_upload(&m, &loc, &wrong, &bytes)
        .await
        .expect_error(400, "DIGEST_INVALID");
}
