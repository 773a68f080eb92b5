//! Content management: DELETE of manifests (by digest), tags (by tag) and blobs when
//! `hosted.delete = true`, each 202 and gone after; refused when it is false, nothing gone.

use crate::common::images::OCI_MANIFEST;
use crate::common::{random_bytes, FakeUpstream};
use crate::push::{
    delete, get, head, hosted_mirror, push_blob, push_image, put_manifest, Answer, APP,
};
use serde_json::json;

#[tokio::test]
async fn a_manifest_deleted_by_digest_is_gone_with_its_tags() {
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |_| {}).await;
    let img = push_image(&m, APP, "v1", vec![random_bytes(1000, 40)]).await;
    let keep = push_image(&m, APP, "v2", vec![random_bytes(1000, 41)]).await;
    let d = &img.manifest_digest;
    delete(&m, &format!("/v2/{APP}/manifests/{d}"))
        .await
        .expect(202);
    for reference in [d.as_str(), "v1"] {
        get(&m, &format!("/v2/{APP}/manifests/{reference}"))
            .await
            .expect_error(404, "MANIFEST_UNKNOWN");
        head(&m, &format!("/v2/{APP}/manifests/{reference}"))
            .await
            .expect(404);
    }
    let tags = get(&m, &format!("/v2/{APP}/tags/list")).await.expect(200);
    assert_eq!(tags.json()["tags"], json!(["v2"]));
    get(&m, &format!("/v2/{APP}/manifests/{}", keep.manifest_digest))
        .await
        .expect(200);
    // Again: there is nothing to delete.
    delete(&m, &format!("/v2/{APP}/manifests/{d}"))
        .await
        .expect_error(404, "MANIFEST_UNKNOWN");
}

#[tokio::test]
async fn a_tag_deleted_is_gone_and_the_manifest_stays() {
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |_| {}).await;
    let img = push_image(&m, APP, "tagtest0", vec![random_bytes(1000, 42)]).await;
    put_manifest(&m, APP, "stays", OCI_MANIFEST, &img.manifest)
        .await
        .expect(201);
    let before = get(&m, &format!("/v2/{APP}/tags/list")).await.expect(200);
    assert_eq!(before.json()["tags"], json!(["stays", "tagtest0"]));

    delete(&m, &format!("/v2/{APP}/manifests/tagtest0"))
        .await
        .expect(202);
    get(&m, &format!("/v2/{APP}/manifests/tagtest0"))
        .await
        .expect_error(404, "MANIFEST_UNKNOWN");
    for reference in ["stays", img.manifest_digest.as_str()] {
        let a = get(&m, &format!("/v2/{APP}/manifests/{reference}"))
            .await
            .expect(200);
        assert!(a.body == img.manifest, "{reference}: other bytes");
    }
    let after = get(&m, &format!("/v2/{APP}/tags/list")).await.expect(200);
    assert_eq!(after.json()["tags"], json!(["stays"]));
    delete(&m, &format!("/v2/{APP}/manifests/tagtest0"))
        .await
        .expect_error(404, "MANIFEST_UNKNOWN");
}

#[tokio::test]
async fn a_blob_deleted_is_gone() {
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |_| {}).await;
    let img = push_image(&m, APP, "v1", vec![random_bytes(1000, 43)]).await;
    // The conformance suite deletes the manifest first, then config and layer.
    delete(&m, &format!("/v2/{APP}/manifests/{}", img.manifest_digest))
        .await
        .expect(202);
    for (d, _) in img.blobs() {
        let path = format!("/v2/{APP}/blobs/{d}");
        delete(&m, &path).await.expect(202);
        get(&m, &path).await.expect_error(404, "BLOB_UNKNOWN");
        head(&m, &path).await.expect(404);
        delete(&m, &path).await.expect_error(404, "BLOB_UNKNOWN");
    }
    // Pushed again, it is back.
    for (d, bytes) in img.blobs() {
        assert_eq!(push_blob(&m, APP, &bytes).await, d);
        let a = get(&m, &format!("/v2/{APP}/blobs/{d}")).await.expect(200);
        assert!(a.body == bytes, "{d}: other bytes");
    }
    let a = put_manifest(&m, APP, "v1", OCI_MANIFEST, &img.manifest).await;
    a.expect(201);
}

/// Asserts a refused delete: 400 or 405 UNSUPPORTED as the spec says, or 403 DENIED.
#[track_caller]
fn assert_delete_refused(a: &Answer) {
    let ok = matches!(
        (a.status, a.code().as_str()),
        (403, "DENIED") | (405 | 400, "UNSUPPORTED")
    );
    assert!(
        ok,
        "{}: want 403 DENIED or 400/405 UNSUPPORTED, got {} {}",
        a.what,
        a.status,
        a.text()
    );
}

#[tokio::test]
async fn deletes_are_refused_when_hosted_delete_is_off() {
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |c| c.hosted.delete = false).await;
    let img = push_image(&m, APP, "v1", vec![random_bytes(1000, 44)]).await;
    let paths = [
        format!("/v2/{APP}/manifests/v1"),
        format!("/v2/{APP}/manifests/{}", img.manifest_digest),
        format!("/v2/{APP}/blobs/{}", img.layer_digests[0]),
    ];
    for path in &paths {
        assert_delete_refused(&delete(&m, path).await);
    }
    for path in &paths {
        get(&m, path).await.expect(200);
    }
    // Cancelling one's own upload is no delete of content: still allowed.
    let loc = crate::push::open_upload(&m, APP).await;
    delete(&m, &loc).await.expect(204);
}

/// Deletes in a hosted repository nothing was pushed to: 404 (spec: "If the repository does
/// not exist, the response MUST return 404").
#[tokio::test]
async fn deletes_in_an_empty_hosted_repository_are_404() {
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |_| {}).await;
    let d = crate::common::images::sha256_digest(b"nothing");
    for path in [
        format!("/v2/myorg/empty/manifests/{d}"),
        "/v2/myorg/empty/manifests/latest".to_owned(),
        format!("/v2/myorg/empty/blobs/{d}"),
    ] {
        let a = delete(&m, &path).await;
        assert_eq!(a.status, 404, "{}: {}", a.what, a.text());
        let code = a.code();
        assert!(
            ["NAME_UNKNOWN", "MANIFEST_UNKNOWN", "BLOB_UNKNOWN"].contains(&code.as_str()),
            "{}: code {code}",
            a.what
        );
    }
    assert!(fake.requests().is_empty(), "{:?}", fake.requests());
}
