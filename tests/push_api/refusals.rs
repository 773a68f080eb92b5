//! What hosting must not do: take a push for a mirrored repository (DENIED naming
//! `hosted.repos`, nothing sent upstream), ask the upstream about a hosted repository, or
//! let a push past `hosted.max_size` in or leave any of its bytes behind.

use std::time::Duration;

use regmirror::config::ByteSize;
use reqwest::Method;

use crate::common::images::{sha256_digest, OCI_MANIFEST};
use crate::common::{random_bytes, wait_until, FakeUpstream};
use crate::push::{
    delete, files_holding, get, head, hosted_mirror, open_upload, patch, post_upload, push_blob,
    push_image, put_manifest, put_upload, send, upstream_requests_for, Answer, APP,
};

/// Asserts a refused write to a mirrored repository: 403 DENIED, naming `hosted.repos`.
#[track_caller]
fn assert_denied_naming_hosted_repos(a: &Answer) {
    let v = a.expect_error(403, "DENIED");
    assert!(
        v.to_string().contains("hosted.repos"),
        "{}: does not name hosted.repos: {v}",
        a.what
    );
}

#[tokio::test]
async fn writes_to_a_mirrored_repository_are_denied_and_never_sent_upstream() {
    let fake = FakeUpstream::start().await;
    let img = fake.add_image("library/alpine", "3.19", vec![random_bytes(500, 50)]);
    let m = hosted_mirror(&fake, |_| {}).await;
    let repo = "library/alpine";
    let blob = &img.layer_digests[0];
    let upload = format!("/v2/{repo}/blobs/uploads/3f1c2b8e-6a4d-4c1e-9b0a-5d2e7f8a9c10");
    let answers = [
        post_upload(&m, repo, "").await,
        post_upload(&m, repo, &format!("?digest={blob}")).await,
        post_upload(&m, repo, &format!("?mount={blob}&from={APP}")).await,
        patch(&m, &upload, b"abc", Some((0, 2))).await,
        put_upload(&m, &upload, blob, b"").await,
        send(&m, Method::DELETE, &upload, &[], None).await,
        put_manifest(&m, repo, "3.19", OCI_MANIFEST, &img.manifest).await,
        delete(&m, &format!("/v2/{repo}/manifests/{}", img.manifest_digest)).await,
        delete(&m, &format!("/v2/{repo}/manifests/3.19")).await,
        delete(&m, &format!("/v2/{repo}/blobs/{blob}")).await,
    ];
    for a in &answers {
        assert_denied_naming_hosted_repos(a);
    }
    // A name no glob hosts, under the hosted organisation's neighbour.
    assert_denied_naming_hosted_repos(&post_upload(&m, "myorgx/app", "").await);
    assert!(fake.requests().is_empty(), "{:?}", fake.requests());
}

#[tokio::test]
async fn pulls_of_a_hosted_repository_never_reach_the_upstream() {
    let fake = FakeUpstream::start().await;
    // The upstream has a repository of the same name: it must not show through.
    let theirs = fake.add_image(APP, "latest", vec![random_bytes(500, 51)]);
    let m = hosted_mirror(&fake, |_| {}).await;
    get(&m, &format!("/v2/{APP}/manifests/latest"))
        .await
        .expect_error(404, "MANIFEST_UNKNOWN");
    head(
        &m,
        &format!("/v2/{APP}/manifests/{}", theirs.manifest_digest),
    )
    .await
    .expect(404);
    get(&m, &format!("/v2/{APP}/blobs/{}", theirs.layer_digests[0]))
        .await
        .expect_error(404, "BLOB_UNKNOWN");
    let tags = get(&m, &format!("/v2/{APP}/tags/list")).await;
    if tags.status == 200 {
        assert_eq!(
            tags.json()["tags"],
            serde_json::json!([]),
            "{}",
            tags.text()
        );
    } else {
        tags.expect_error(404, "NAME_UNKNOWN");
    }
    get(
        &m,
        &format!("/v2/{APP}/referrers/{}", theirs.manifest_digest),
    )
    .await
    .expect(200);

    // Pushed here, it is served from here.
    let ours = push_image(&m, APP, "latest", vec![random_bytes(500, 52)]).await;
    let a = get(&m, &format!("/v2/{APP}/manifests/latest"))
        .await
        .expect(200);
    assert!(a.body == ours.manifest);
    m.blob(APP, &ours.layer_digests[0]).await;
    assert!(fake.requests().is_empty(), "{:?}", fake.requests());
}

/// Whether any file under the data dir holds the first KiB of `bytes` (random bytes, so
/// only a copy of them would).
fn held(m: &crate::common::MirrorHandle, bytes: &[u8]) -> Vec<std::path::PathBuf> {
    files_holding(&m.data_dir, &bytes[..1024])
}

#[tokio::test]
async fn a_push_past_max_size_is_denied_and_leaves_nothing() {
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |c| c.hosted.max_size = Some(ByteSize(100_000))).await;
    let first = random_bytes(40_000, 53);
    push_blob(&m, APP, &first).await;

    // In one request: refused.
    let big = random_bytes(150_000, 54);
    let d = sha256_digest(&big);
    let a = send(
        &m,
        Method::POST,
        &format!("/v2/{APP}/blobs/uploads/?digest={d}"),
        &[("content-type", "application/octet-stream")],
        Some(big.clone()),
    )
    .await;
    a.expect_error(403, "DENIED");
    head(&m, &format!("/v2/{APP}/blobs/{d}")).await.expect(404);

    // In chunks that only together pass the quota: refused at a PATCH or at the PUT.
    let over = random_bytes(70_000, 55);
    let d2 = sha256_digest(&over);
    let loc = open_upload(&m, APP).await;
    let a = patch(&m, &loc, &over[..35_000], Some((0, 34_999))).await;
    let refused = if a.status == 202 {
        let b = patch(&m, &a.location(&m), &over[35_000..], Some((35_000, 69_999))).await;
        if b.status == 202 {
            put_upload(&m, &b.location(&m), &d2, b"").await
        } else {
            b
        }
    } else {
        a
    };
    refused.expect_error(403, "DENIED");
    head(&m, &format!("/v2/{APP}/blobs/{d2}")).await.expect(404);

    for (what, bytes) in [("single POST", &big), ("chunked", &over)] {
        let gone = wait_until(Duration::from_secs(10), || held(&m, bytes).is_empty()).await;
        assert!(gone, "{what}: refused bytes left in {:?}", held(&m, bytes));
    }
    // The refusals took no room: a blob that fits still goes in.
    push_blob(&m, APP, &random_bytes(30_000, 56)).await;
    assert!(upstream_requests_for(&fake, "/v2/myorg/").is_empty());
}
