//! Manifest pushes: PUT by tag and by digest, served back byte for byte with their media
//! type, and the refusals: a missing blob or child manifest (MANIFEST_BLOB_UNKNOWN), bytes
//! that do not parse (MANIFEST_INVALID), a digest reference the bytes do not match.

use crate::common::images::{
    build_image, build_index, sha256_digest, Format, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST,
};
use crate::common::{random_bytes, FakeUpstream, MirrorHandle};
use crate::push::{
    descriptor, get, head, hosted_mirror, index, push_blob, push_image, push_image_for,
    put_manifest, upstream_requests_for, Answer, APP,
};
use serde_json::json;

/// Asserts a successful manifest PUT: 201, `Location`, `Docker-Content-Digest` = `digest`.
fn assert_created(a: Answer, m: &MirrorHandle, digest: &str) {
    let a = a.expect(201);
    a.location(m);
    assert_eq!(a.header("docker-content-digest"), digest, "{}", a.what);
}

/// Asserts `GET`/`HEAD /v2/<repo>/manifests/<reference>` serve exactly `bytes` as
/// `media_type`.
async fn assert_manifest_served(
    m: &MirrorHandle,
    repo: &str,
    reference: &str,
    media_type: &str,
    bytes: &[u8],
) {
    let path = format!("/v2/{repo}/manifests/{reference}");
    let digest = sha256_digest(bytes);
    let g = get(m, &path).await.expect(200);
    assert!(
        g.body[..] == bytes[..],
        "GET {path}: other bytes: {}",
        g.text()
    );
    assert_eq!(g.header("content-type"), media_type, "GET {path}");
    assert_eq!(g.header("docker-content-digest"), digest, "GET {path}");
    let h = head(m, &path).await.expect(200);
    assert_eq!(h.header("docker-content-digest"), digest, "HEAD {path}");
    assert_eq!(
        h.header("content-length"),
        bytes.len().to_string(),
        "HEAD {path}"
    );
    assert_eq!(h.header("content-type"), media_type, "HEAD {path}");
}

#[tokio::test]
async fn a_manifest_put_by_tag_is_served_by_tag_and_digest() {
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |_| {}).await;
    let img = build_image(vec![random_bytes(3000, 20)], Format::Oci, "amd64");
    for (_, b) in img.blobs() {
        push_blob(&m, APP, &b).await;
    }
    // The conformance suite puts one manifest under several tags.
    for tag in ["test0", "test1", "latest"] {
        let a = put_manifest(&m, APP, tag, OCI_MANIFEST, &img.manifest).await;
        assert_created(a, &m, &img.manifest_digest);
    }
    for reference in ["test0", "latest", img.manifest_digest.as_str()] {
        assert_manifest_served(&m, APP, reference, OCI_MANIFEST, &img.manifest).await;
    }
    // The conformance suite's "GET nonexistent manifest should return 404".
    for reference in [".INVALID_MANIFEST_NAME", "nosuchtag"] {
        get(&m, &format!("/v2/{APP}/manifests/{reference}"))
            .await
            .expect_error(404, "MANIFEST_UNKNOWN");
        head(&m, &format!("/v2/{APP}/manifests/{reference}"))
            .await
            .expect(404);
    }
    assert!(upstream_requests_for(&fake, "/v2/myorg/").is_empty());
}

#[tokio::test]
async fn a_manifest_put_by_digest_is_served_by_digest() {
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |_| {}).await;
    let img = build_image(vec![random_bytes(2000, 21)], Format::Oci, "arm64");
    for (_, b) in img.blobs() {
        push_blob(&m, APP, &b).await;
    }
    let a = put_manifest(&m, APP, &img.manifest_digest, OCI_MANIFEST, &img.manifest).await;
    assert_created(a, &m, &img.manifest_digest);
    assert_manifest_served(&m, APP, &img.manifest_digest, OCI_MANIFEST, &img.manifest).await;
    // No tag was made.
    let tags = get(&m, &format!("/v2/{APP}/tags/list")).await;
    if tags.status == 200 {
        assert_eq!(tags.json()["tags"], json!([]), "{}", tags.text());
    } else {
        tags.expect_error(404, "NAME_UNKNOWN");
    }
}

#[tokio::test]
async fn a_digest_reference_the_bytes_do_not_match_is_refused() {
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |_| {}).await;
    let img = build_image(vec![random_bytes(2000, 22)], Format::Oci, "amd64");
    for (_, b) in img.blobs() {
        push_blob(&m, APP, &b).await;
    }
    let other = sha256_digest(b"not this manifest");
    let a = put_manifest(&m, APP, &other, OCI_MANIFEST, &img.manifest).await;
    a.expect_error(400, "DIGEST_INVALID");
    for d in [&other, &img.manifest_digest] {
        get(&m, &format!("/v2/{APP}/manifests/{d}"))
            .await
            .expect_error(404, "MANIFEST_UNKNOWN");
    }
}

#[tokio::test]
async fn a_manifest_naming_a_missing_blob_is_manifest_blob_unknown() {
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |_| {}).await;
    let img = build_image(vec![random_bytes(4000, 23)], Format::Oci, "amd64");
    // The config is pushed, the layer is not.
    push_blob(&m, APP, &img.config).await;
    put_manifest(&m, APP, "v1", OCI_MANIFEST, &img.manifest)
        .await
        .expect_error(400, "MANIFEST_BLOB_UNKNOWN");
    // Nor the other way round.
    let img2 = build_image(vec![random_bytes(4000, 24)], Format::Oci, "amd64");
    push_blob(&m, APP, &img2.layers[0]).await;
    put_manifest(&m, APP, "v2", OCI_MANIFEST, &img2.manifest)
        .await
        .expect_error(400, "MANIFEST_BLOB_UNKNOWN");
    for reference in ["v1", "v2", img.manifest_digest.as_str()] {
        get(&m, &format!("/v2/{APP}/manifests/{reference}"))
            .await
            .expect_error(404, "MANIFEST_UNKNOWN");
    }
    // Once the layer is there, the same bytes go in.
    push_blob(&m, APP, &img.layers[0]).await;
    let a = put_manifest(&m, APP, "v1", OCI_MANIFEST, &img.manifest).await;
    assert_created(a, &m, &img.manifest_digest);
}

#[tokio::test]
async fn a_manifest_that_does_not_parse_is_manifest_invalid() {
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |_| {}).await;
    for body in [
        &b"{not json"[..],
        b"",
        b"[1,2,3]",
        br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":"nope","layers":[]}"#,
    ] {
        let a = put_manifest(&m, APP, "bad", OCI_MANIFEST, body).await;
        a.expect_error(400, "MANIFEST_INVALID");
    }
    get(&m, &format!("/v2/{APP}/manifests/bad"))
        .await
        .expect_error(404, "MANIFEST_UNKNOWN");
}

#[tokio::test]
async fn an_index_naming_a_missing_child_is_manifest_blob_unknown_until_it_is_pushed() {
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |_| {}).await;
    let amd = push_image_for(&m, APP, "amd64", vec![random_bytes(1000, 25)], "amd64").await;
    let arm = build_image(vec![random_bytes(1000, 26)], Format::Oci, "arm64");
    let children = |arm_desc| {
        let mut a = descriptor(OCI_MANIFEST, &amd.manifest);
        a["platform"] = json!({"architecture": "amd64", "os": "linux"});
        vec![a, arm_desc]
    };
    let mut arm_desc = descriptor(OCI_MANIFEST, &arm.manifest);
    arm_desc["platform"] = json!({"architecture": "arm64", "os": "linux"});
    let idx = index(children(arm_desc), json!({}));
    put_manifest(&m, APP, "multi", OCI_INDEX, &idx)
        .await
        .expect_error(400, "MANIFEST_BLOB_UNKNOWN");
    get(&m, &format!("/v2/{APP}/manifests/multi"))
        .await
        .expect_error(404, "MANIFEST_UNKNOWN");

    // The child by digest only (no tag), then the index.
    for (_, b) in arm.blobs() {
        push_blob(&m, APP, &b).await;
    }
    put_manifest(&m, APP, &arm.manifest_digest, OCI_MANIFEST, &arm.manifest)
        .await
        .expect(201);
    let a = put_manifest(&m, APP, "multi", OCI_INDEX, &idx).await;
    assert_created(a, &m, &sha256_digest(&idx));
    assert_manifest_served(&m, APP, "multi", OCI_INDEX, &idx).await;
    assert_manifest_served(&m, APP, &arm.manifest_digest, OCI_MANIFEST, &arm.manifest).await;
}

#[tokio::test]
async fn a_manifest_with_no_layers_is_accepted() {
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |_| {}).await;
    let config = push_blob(&m, APP, b"{}").await;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 2},
        "layers": [],
    }))
    .unwrap();
    let a = put_manifest(&m, APP, "empty", OCI_MANIFEST, &manifest).await;
    assert_created(a, &m, &sha256_digest(&manifest));
    assert_manifest_served(&m, APP, "empty", OCI_MANIFEST, &manifest).await;
}

/// The same image under two repositories: each repository serves its own manifest.
#[tokio::test]
async fn manifests_belong_to_their_repository() {
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |_| {}).await;
    let img = push_image(&m, APP, "v1", vec![random_bytes(1000, 27)]).await;
    get(&m, "/v2/myorg/other/manifests/v1").await.expect(404);
    get(
        &m,
        &format!("/v2/myorg/other/manifests/{}", img.manifest_digest),
    )
    .await
    .expect(404);
    assert!(upstream_requests_for(&fake, "/v2/myorg/").is_empty());
}

/// `.INVALID_MANIFEST_NAME` (the conformance suite's nonexistent manifest) is 404
/// MANIFEST_UNKNOWN, hosted or mirrored, and never asked of the upstream.
#[tokio::test]
async fn an_impossible_reference_is_manifest_unknown() {
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |_| {}).await;
    for repo in [APP, "library/alpine"] {
        let path = format!("/v2/{repo}/manifests/.INVALID_MANIFEST_NAME");
        get(&m, &path).await.expect_error(404, "MANIFEST_UNKNOWN");
        head(&m, &path).await.expect(404);
    }
    assert!(fake.requests().is_empty(), "{:?}", fake.requests());
}

/// What `docker push` sends: Docker v2 manifests, and a Docker manifest list over them.
#[tokio::test]
async fn docker_manifests_and_manifest_lists_are_taken_and_served_as_pushed() {
    const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |_| {}).await;
    let mut children = Vec::new();
    for (arch, seed) in [("amd64", 28), ("arm64", 29)] {
        let img = build_image(vec![random_bytes(1500, seed)], Format::Docker, arch);
        for (_, b) in img.blobs() {
            push_blob(&m, APP, &b).await;
        }
        let a = put_manifest(&m, APP, arch, DOCKER_MANIFEST, &img.manifest).await;
        assert_created(a, &m, &img.manifest_digest);
        assert_manifest_served(&m, APP, arch, DOCKER_MANIFEST, &img.manifest).await;
        children.push((arch.to_owned(), img));
    }
    // build_index writes an OCI index; the same shape under Docker's list type.
    let oci = build_index(children);
    let mut v: serde_json::Value = serde_json::from_slice(&oci.bytes).unwrap();
    v["mediaType"] = json!(DOCKER_LIST);
    for c in v["manifests"].as_array_mut().unwrap() {
        c["mediaType"] = json!(DOCKER_MANIFEST);
    }
    let list = serde_json::to_vec_pretty(&v).unwrap();
    let a = put_manifest(&m, APP, "multi", DOCKER_LIST, &list).await;
    assert_created(a, &m, &sha256_digest(&list));
    assert_manifest_served(&m, APP, "multi", DOCKER_LIST, &list).await;
}

#[tokio::test]
async fn a_tag_pushed_again_moves_to_the_new_manifest() {
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |_| {}).await;
    let old = push_image(&m, APP, "latest", vec![random_bytes(1000, 70)]).await;
    let new = push_image(&m, APP, "latest", vec![random_bytes(1000, 71)]).await;
    assert_manifest_served(&m, APP, "latest", OCI_MANIFEST, &new.manifest).await;
    // The old manifest stays, by digest.
    assert_manifest_served(&m, APP, &old.manifest_digest, OCI_MANIFEST, &old.manifest).await;
    let tags = get(&m, &format!("/v2/{APP}/tags/list")).await.expect(200);
    assert_eq!(tags.json()["tags"], json!(["latest"]));
}

/// A blob pushed to another repository is not this one's: a manifest naming it is refused
/// until it is pushed or mounted here.
#[tokio::test]
async fn a_manifest_naming_another_repositorys_blob_is_manifest_blob_unknown() {
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |_| {}).await;
    let img = build_image(vec![random_bytes(1000, 72)], Format::Oci, "amd64");
    for (_, b) in img.blobs() {
        push_blob(&m, "myorg/other", &b).await;
    }
    put_manifest(&m, APP, "v1", OCI_MANIFEST, &img.manifest)
        .await
        .expect_error(400, "MANIFEST_BLOB_UNKNOWN");
    for (d, _) in img.blobs() {
        crate::push::post_upload(&m, APP, &format!("?mount={d}&from=myorg/other"))
            .await
            .expect(201);
    }
    let a = put_manifest(&m, APP, "v1", OCI_MANIFEST, &img.manifest).await;
    assert_created(a, &m, &img.manifest_digest);
}

/// The spec asks registries to take manifests of at least 4 MB and to answer a bigger one
/// they refuse with 413.
#[tokio::test]
async fn a_4_mb_manifest_is_taken_and_an_oversized_one_is_413() {
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |_| {}).await;
    let config = push_blob(&m, APP, b"{}").await;
    // A manifest of `size` bytes (padded by an annotation).
    let padded = |size: usize| {
        let mut v = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 2},
            "layers": [],
            "annotations": {"padding": ""},
        });
        let bare = serde_json::to_vec(&v).unwrap().len();
        v["annotations"]["padding"] = json!("x".repeat(size - bare));
        let bytes = serde_json::to_vec(&v).unwrap();
        assert_eq!(bytes.len(), size);
        bytes
    };
    let four_mb = padded(4_000_000);
    let a = put_manifest(&m, APP, "big", OCI_MANIFEST, &four_mb).await;
    assert_created(a, &m, &sha256_digest(&four_mb));
    assert_manifest_served(&m, APP, "big", OCI_MANIFEST, &four_mb).await;

    let huge = padded(5 << 20);
    let a = put_manifest(&m, APP, "huge", OCI_MANIFEST, &huge).await;
    assert_eq!(a.status, 413, "{}: {}", a.what, a.text());
    get(&m, &format!("/v2/{APP}/manifests/huge"))
        .await
        .expect_error(404, "MANIFEST_UNKNOWN");
}
