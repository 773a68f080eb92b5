//! The mirror's API surface as clients meet it: the `/v2/` ping, request validation (names,
//! digests, tags: 400, never 500, never forwarded), read-only methods (405), manifest and
//! blob headers clients depend on, containerd's `?ns=`, and tag lists passed through.
//! Also runs the fake upstream's own tests (`common/fake_selftest.rs`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "common/fake_selftest.rs"]
mod fake_selftest;

use common::images::{Format, OCI_MANIFEST};
use common::{
    assert_error, header, json, mirror_of, random_bytes, start_mirror, FakeUpstream, MirrorHandle,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const REPO: &str = "library/alpine";
const HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Sends `method path` byte for byte (no URL normalisation, unlike reqwest) and returns
/// the status and the raw response.
async fn raw(m: &MirrorHandle, method: &str, path: &str) -> (u16, String) {
    let addr = m.url.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{method} {path}: no status line in {text:?}"));
    (status, text)
}

#[tokio::test]
async fn ping_is_200_with_the_api_version_header() {
    let fake = FakeUpstream::start().await;
    let m = mirror_of(&fake).await;
    let r = m.get("/v2/").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "docker-distribution-api-version"),
        "registry/2.0"
    );
    let r = m.head("/v2/").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "docker-distribution-api-version"),
        "registry/2.0"
    );
}

#[tokio::test]
async fn malformed_names_are_name_invalid_and_not_forwarded() {
    let fake = FakeUpstream::start().await;
    let m = mirror_of(&fake).await;
    let long = "a".repeat(300);
    let names = [
        "Library/alpine",
        "library//alpine",
        "library/alpine-",
        "-library/alpine",
        "library/a..b",
        "library/al%20pine",
        "library/_alpine",
        long.as_str(),
    ];
    for name in names {
        for path in [
            format!("/v2/{name}/manifests/latest"),
            format!("/v2/{name}/blobs/sha256:{HEX}"),
            format!("/v2/{name}/tags/list"),
        ] {
            let r = m.get(&path).await.unwrap();
            assert_error(r, 400, Some("NAME_INVALID")).await;
        }
    }
    // Traversal attempts, sent raw so no client normalises them away.
    for path in [
        "/v2/library/../etc/manifests/latest",
        "/v2/library/%2e%2e/etc/manifests/latest",
        "/v2/../../etc/blobs/sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "/v2/library/alpine%2f..%2f..%2fx/manifests/latest",
    ] {
        let (status, text) = raw(&m, "GET", path).await;
        assert!(
            status == 400 || status == 404,
            "{path}: status {status}: {text}"
        );
    }
    assert!(
        fake.requests().is_empty(),
        "forwarded: {:?}",
        fake.requests()
    );
}

#[tokio::test]
async fn malformed_digests_are_digest_invalid_and_not_forwarded() {
    let fake = FakeUpstream::start().await;
    let m = mirror_of(&fake).await;
    let bad = [
        "sha256:totallywrong".to_owned(),
        format!("sha256:{}", &HEX[1..]),
        format!("sha256:{}", HEX.to_uppercase()),
        format!("sha256:{HEX}0"),
        format!("sha512:{HEX}"),
        "sha256:".to_owned(),
    ];
    for d in &bad {
        let r = m.get(&format!("/v2/{REPO}/blobs/{d}")).await.unwrap();
        assert_error(r, 400, Some("DIGEST_INVALID")).await;
        let r = m.get(&format!("/v2/{REPO}/manifests/{d}")).await.unwrap();
        assert_error(r, 400, Some("DIGEST_INVALID")).await;
        let r = m.head(&format!("/v2/{REPO}/blobs/{d}")).await.unwrap();
        assert_eq!(r.status(), 400, "HEAD blob {d}");
    }
    let r = m.get(&format!("/v2/{REPO}/blobs/nocolon")).await.unwrap();
    assert_error(r, 400, Some("DIGEST_INVALID")).await;
    assert!(
        fake.requests().is_empty(),
        "forwarded: {:?}",
        fake.requests()
    );
}

#[tokio::test]
async fn malformed_tags_are_not_found_and_odd_paths_never_500() {
    let fake = FakeUpstream::start().await;
    let m = mirror_of(&fake).await;
    let long = "t".repeat(129);
    // A reference that can be no tag names nothing: 404 MANIFEST_UNKNOWN, as the OCI
    // conformance suite expects of `.INVALID_MANIFEST_NAME` (issue 16).
    for tag in [
        "-bad",
        ".bad",
        ".INVALID_MANIFEST_NAME",
        "a%20b",
        long.as_str(),
    ] {
        let r = m.get(&format!("/v2/{REPO}/manifests/{tag}")).await.unwrap();
        assert_error(r, 404, Some("MANIFEST_UNKNOWN")).await;
    }
    assert!(
        fake.requests().is_empty(),
        "forwarded: {:?}",
        fake.requests()
    );

    for path in [
        "/v2/library/alpine/manifests/",
        "/v2/library/alpine/blobs/",
        "/v2//manifests/latest",
        "/v2/library/alpine/manifests/sha256:%00",
        "/v2/library/alpine/blobs/sha256:%2F..%2F..",
        "/v2/library/alpine/tags/list?n=abc",
        "/v2/library/alpine/tags/list?n=-1",
        "/v2/library/alpine/referrers/x",
        "/v2/library/alpine",
        "/v2/%ff/manifests/latest",
        "/v2/library/alpine/manifests/latest?ns=%ff",
    ] {
        let (status, text) = raw(&m, "GET", path).await;
        assert!((400..500).contains(&status), "{path}: {status}: {text}");
    }
}

#[tokio::test]
async fn writes_to_a_mirrored_repository_are_denied_and_never_forwarded() {
    let fake = FakeUpstream::start().await;
    let m = mirror_of(&fake).await;
    let upload = "6b0b7f8e-1c2d-4e5f-8a9b-0c1d2e3f4a5b";
    let cases = [
        ("PUT", format!("/v2/{REPO}/manifests/latest"), 403, "DENIED"),
        (
            "DELETE",
            format!("/v2/{REPO}/manifests/sha256:{HEX}"),
            403,
            "DENIED",
        ),
        ("POST", format!("/v2/{REPO}/blobs/uploads/"), 403, "DENIED"),
        (
            "PATCH",
            format!("/v2/{REPO}/blobs/uploads/{upload}"),
            403,
            "DENIED",
        ),
        (
            "PUT",
            format!("/v2/{REPO}/blobs/uploads/{upload}?digest=sha256:{HEX}"),
            403,
            "DENIED",
        ),
        (
            "DELETE",
            format!("/v2/{REPO}/blobs/sha256:{HEX}"),
            403,
            "DENIED",
        ),
        // An upload id the mirror could not have handed out names no upload.
        (
            "PATCH",
            format!("/v2/{REPO}/blobs/uploads/6b0b7f8e-uuid"),
            404,
            "BLOB_UPLOAD_UNKNOWN",
        ),
        ("POST", "/v2/".to_owned(), 404, "UNSUPPORTED"),
        (
            "OPTIONS",
            format!("/v2/{REPO}/manifests/latest"),
            405,
            "UNSUPPORTED",
        ),
    ];
    for (method, path, status, code) in cases {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let r = m
            .client
            .request(method.clone(), m.url_for(&path))
            .body("{}")
            .send()
            .await
            .unwrap();
        let v = assert_error(r, status, Some(code)).await;
        if status == 403 {
            let detail = v["errors"][0]["detail"].as_str().unwrap_or_default();
            assert!(detail.contains("hosted.repos"), "{method} {path}: {detail}");
        }
    }
    assert!(
        fake.requests().is_empty(),
        "forwarded: {:?}",
        fake.requests()
    );
}

#[tokio::test]
async fn head_manifest_carries_digest_and_length_cold_and_warm() {
    let fake = FakeUpstream::start().await;
    let img = fake.add_image(REPO, "3.19", vec![random_bytes(1000, 1)]);
    let m = mirror_of(&fake).await;
    let by_digest = format!("/v2/{REPO}/manifests/{}", img.manifest_digest);

    // containerd resolves with a HEAD and needs both headers, cold or warm.
    for round in ["cold", "warm"] {
        for path in ["/v2/library/alpine/manifests/3.19", by_digest.as_str()] {
            let r = m.head(path).await.unwrap();
            assert_eq!(r.status(), 200, "{round} HEAD {path}");
            assert_eq!(
                header(&r, "docker-content-digest"),
                img.manifest_digest,
                "{round} HEAD {path}"
            );
            assert_eq!(
                header(&r, "content-length"),
                img.manifest.len().to_string(),
                "{round} HEAD {path}"
            );
            assert_eq!(header(&r, "content-type"), img.media_type, "{round} {path}");
            assert!(r.bytes().await.unwrap().is_empty());
        }
        m.get_ok(&by_digest).await;
    }
}

#[tokio::test]
async fn manifest_get_headers_follow_the_stored_media_type() {
    let fake = FakeUpstream::start().await;
    let img = fake.add_image_as("library/oci", "1", vec![random_bytes(500, 2)], Format::Oci);
    let m = mirror_of(&fake).await;
    for _ in 0..2 {
        let r = m.get("/v2/library/oci/manifests/1").await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "content-type"), OCI_MANIFEST);
        assert_eq!(header(&r, "docker-content-digest"), img.manifest_digest);
        assert_eq!(header(&r, "etag"), format!("\"{}\"", img.manifest_digest));
        assert_eq!(header(&r, "content-length"), img.manifest.len().to_string());
        assert_eq!(r.bytes().await.unwrap(), img.manifest);
    }
}

#[tokio::test]
async fn blob_head_carries_length_digest_and_ranges() {
    let fake = FakeUpstream::start().await;
    let data = random_bytes(12_345, 3);
    let d = fake.add_blob(REPO, data.clone());
    let m = mirror_of(&fake).await;
    let path = format!("/v2/{REPO}/blobs/{d}");
    for round in ["cold", "warm"] {
        let r = m.head(&path).await.unwrap();
        assert_eq!(r.status(), 200, "{round}");
        assert_eq!(header(&r, "content-length"), "12345", "{round}");
        assert_eq!(header(&r, "docker-content-digest"), d, "{round}");
        assert_eq!(header(&r, "accept-ranges"), "bytes", "{round}");
        assert!(r.bytes().await.unwrap().is_empty());
        assert!(m.blob(REPO, &d).await == data);
    }
}

#[tokio::test]
async fn containerd_ns_query_is_accepted() {
    let fake = FakeUpstream::start().await;
    let img = fake.add_image(REPO, "3.19", vec![random_bytes(2000, 4)]);
    let m = mirror_of(&fake).await;
    let r = m
        .head("/v2/library/alpine/manifests/3.19?ns=docker.io")
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "docker-content-digest"), img.manifest_digest);
    let got = m
        .get_ok(&format!(
            "/v2/library/alpine/manifests/{}?ns=docker.io",
            img.manifest_digest
        ))
        .await;
    assert_eq!(got, img.manifest);
    let got = m
        .get_ok(&format!(
            "/v2/library/alpine/blobs/{}?ns=docker.io",
            img.layer_digests[0]
        ))
        .await;
    assert_eq!(got, img.layers[0]);
}

#[tokio::test]
async fn tags_list_is_passed_through() {
    let fake = FakeUpstream::start().await;
    let img = fake.add_image(REPO, "3.19", vec![random_bytes(100, 5)]);
    for t in ["3.18", "edge", "latest"] {
        fake.tag(REPO, t, &img.manifest_digest);
    }
    let m = mirror_of(&fake).await;

    let r = m.get("/v2/library/alpine/tags/list").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        json(r).await,
        serde_json::json!({"name": REPO, "tags": ["3.18", "3.19", "edge", "latest"]})
    );

    let r = m.get("/v2/library/alpine/tags/list?n=2").await.unwrap();
    assert_eq!(
        header(&r, "link"),
        "</v2/library/alpine/tags/list?n=2&last=3.19>; rel=\"next\""
    );
    assert_eq!(
        json(r).await,
        serde_json::json!({"name": REPO, "tags": ["3.18", "3.19"]})
    );
    let r = m
        .get("/v2/library/alpine/tags/list?n=2&last=3.19")
        .await
        .unwrap();
    assert_eq!(
        json(r).await,
        serde_json::json!({"name": REPO, "tags": ["edge", "latest"]})
    );
    // Fetched whole once, paginated here (and kept for the tag TTL).
    assert_eq!(fake.count("GET", "/v2/library/alpine/tags/list"), 1);

    let r = m.get("/v2/library/nosuch/tags/list").await.unwrap();
    assert_error(r, 404, None).await;
}

/// A tag list may be many upstream pages: within the tag TTL it is served from memory; with a
/// TTL of zero every request asks the upstream.
#[tokio::test]
async fn a_tag_list_is_fetched_once_per_tag_ttl() {
    let fake = FakeUpstream::start().await;
    let img = fake.add_image(REPO, "3.19", vec![random_bytes(100, 6)]);
    fake.tag(REPO, "edge", &img.manifest_digest);
    let list = "/v2/library/alpine/tags/list";
    let m = mirror_of(&fake).await;
    for _ in 0..3 {
        let r = m.get(list).await.unwrap();
        assert_eq!(json(r).await["tags"], serde_json::json!(["3.19", "edge"]));
    }
    assert_eq!(
        fake.count_prefix("GET", list),
        1,
        "refetched within the tag TTL"
    );

    let fresh = FakeUpstream::start().await;
    fresh.add_image(REPO, "3.19", vec![random_bytes(100, 7)]);
    let m = start_mirror(&fresh.url(), |c| {
        c.cache.tag_ttl = std::time::Duration::ZERO
    })
    .await;
    for _ in 0..2 {
        assert_eq!(m.get(list).await.unwrap().status(), 200);
    }
    assert_eq!(fresh.count_prefix("GET", list), 2);
}
