//! Blob uploads, the spec's "Pushing blobs": POST then PUT, a single POST, chunks with
//! `Content-Range` (in order, out of order, twice at once, malformed), a streamed PATCH as
//! skopeo sends it, the upload's status, cancel, unknown and malformed ids, digest
//! verification, a mirror restarted in the middle, and uploads left untouched expiring.

use std::time::Duration;

use reqwest::Method;

use crate::common::images::sha256_digest;
use crate::common::{random_bytes, FakeUpstream, MirrorHandle};
use crate::push::{
    assert_blob_served, assert_no_copy_left, files_holding, get, head, hosted_mirror, hosting,
    open_upload, patch, path_of, post_upload, push_blob, put_upload, send, upstream_requests_for,
    Fresh, Target, APP,
};

#[tokio::test]
async fn post_opens_an_upload_with_location_uuid_and_range_0_0() {
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |_| {}).await;
    let a = post_upload(&m, APP, "").await.expect(202);
    let loc = a.location(&m);
    assert!(
        path_of(&loc).starts_with(&format!("/v2/{APP}/blobs/uploads/")),
        "Location {loc}"
    );
    let uuid = a.header("docker-upload-uuid");
    assert!(!uuid.is_empty(), "no Docker-Upload-UUID: {:?}", a.headers);
    assert!(loc.contains(&uuid), "Location {loc} does not name {uuid}");
    assert_eq!(a.header("range"), "0-0");
    // Two uploads are two sessions.
    let b = post_upload(&m, APP, "").await.expect(202);
    assert_ne!(b.header("docker-upload-uuid"), uuid);
    assert!(upstream_requests_for(&fake, "/v2/myorg/").is_empty());
}

#[tokio::test]
async fn post_then_put_with_the_body_stores_the_blob() {
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |_| {}).await;
    let bytes = random_bytes(100_000, 1);
    let digest = sha256_digest(&bytes);
    // Absent before (conformance: GET of a nonexistent blob is 404).
    get(&m, &format!("/v2/{APP}/blobs/{digest}"))
        .await
        .expect_error(404, "BLOB_UNKNOWN");
    let loc = open_upload(&m, APP).await;
    let put = put_upload(&m, &loc, &digest, &bytes).await.expect(201);
    assert_eq!(
        path_of(&put.location(&m)),
        format!("/v2/{APP}/blobs/{digest}")
    );
    assert_eq!(put.header("docker-content-digest"), digest);
    assert_blob_served(&m, APP, &digest, &bytes).await;
    // The session is closed.
    get(&m, &loc).await.expect_error(404, "BLOB_UPLOAD_UNKNOWN");
    assert!(upstream_requests_for(&fake, "/v2/myorg/").is_empty());
}

#[tokio::test]
async fn post_with_digest_and_body_is_a_whole_upload_in_one_request() {
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |_| {}).await;
    let bytes = random_bytes(5000, 2);
    let digest = sha256_digest(&bytes);
    let a = send(
        &m,
        Method::POST,
        &format!("/v2/{APP}/blobs/uploads/?digest={digest}"),
        &[("content-type", "application/octet-stream")],
        Some(bytes.clone()),
    )
    .await
    .expect(201);
    assert_eq!(
        path_of(&a.location(&m)),
        format!("/v2/{APP}/blobs/{digest}")
    );
    assert_eq!(a.header("docker-content-digest"), digest);
    assert_blob_served(&m, APP, &digest, &bytes).await;
}

#[tokio::test]
async fn chunks_in_order_then_put_make_the_blob() {
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |_| {}).await;
    let bytes = random_bytes(150_000, 3);
    let digest = sha256_digest(&bytes);
    let (one, rest) = bytes.split_at(60_001);
    let (two, three) = rest.split_at(50_000);
    let loc = open_upload(&m, APP).await;

    let a = patch(&m, &loc, one, Some((0, 60_000))).await.expect(202);
    assert_eq!(a.header("range"), "0-60000");
    assert!(
        !a.header("docker-upload-uuid").is_empty(),
        "{:?}",
        a.headers
    );
    let loc = a.location(&m);

    // The upload's status: 204, how far it got, where to go on.
    let s = get(&m, &loc).await.expect(204);
    assert_eq!(s.header("range"), "0-60000");
    let loc = s.location(&m);

    let b = patch(&m, &loc, two, Some((60_001, 110_000)))
        .await
        .expect(202);
    assert_eq!(b.header("range"), "0-110000");
    let loc = b.location(&m);
    let c = patch(&m, &loc, three, Some((110_001, 149_999)))
        .await
        .expect(202);
    assert_eq!(c.header("range"), "0-149999");

    // The closing PUT carries the whole blob's digest and no body.
    let put = put_upload(&m, &c.location(&m), &digest, &[])
        .await
        .expect(201);
    assert_eq!(put.header("docker-content-digest"), digest);
    assert_eq!(
        path_of(&put.location(&m)),
        format!("/v2/{APP}/blobs/{digest}")
    );
    assert_blob_served(&m, APP, &digest, &bytes).await;
}

#[tokio::test]
async fn the_closing_put_may_carry_the_last_chunk() {
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |_| {}).await;
    let bytes = random_bytes(20_000, 4);
    let digest = sha256_digest(&bytes);
    let loc = open_upload(&m, APP).await;
    let a = patch(&m, &loc, &bytes[..12_000], Some((0, 11_999)))
        .await
        .expect(202);
    put_upload(&m, &a.location(&m), &digest, &bytes[12_000..])
        .await
        .expect(201);
    assert_blob_served(&m, APP, &digest, &bytes).await;
}

/// skopeo and dockerd send the whole layer in one PATCH with no `Content-Range`
/// (shared/PROTOCOL.md), which the conformance suite calls a streamed upload.
#[tokio::test]
async fn a_streamed_patch_without_content_range_is_accepted() {
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |_| {}).await;
    let bytes = random_bytes(70_000, 5);
    let digest = sha256_digest(&bytes);
    let loc = open_upload(&m, APP).await;
    let a = patch(&m, &loc, &bytes, None).await.expect(202);
    assert_eq!(a.header("range"), "0-69999");
    // skopeo appends `digest=sha256:...` as is, the colon not escaped.
    let loc = a.location(&m);
    let sep = if loc.contains('?') { '&' } else { '?' };
    let put = send(
        &m,
        Method::PUT,
        &format!("{loc}{sep}digest={digest}"),
        &[("content-type", "application/octet-stream")],
        Some(Vec::new()),
    )
    .await
    .expect(201);
    assert_eq!(put.header("docker-content-digest"), digest);
    assert_blob_served(&m, APP, &digest, &bytes).await;
}

#[tokio::test]
async fn a_chunk_out_of_order_is_416_and_the_upload_goes_on() {
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |_| {}).await;
    let bytes = random_bytes(42, 6);
    let digest = sha256_digest(&bytes);
    let (one, two) = bytes.split_at(22);

    // The second chunk first (the conformance suite's "Out-of-order blob upload").
    let loc = open_upload(&m, APP).await;
    let r = patch(&m, &loc, two, Some((22, 41))).await;
    assert_eq!(r.status, 416, "{}: {}", r.what, r.text());

    // The conformance suite's "PATCH request with first chunk", then its "Retry previous
    // blob chunk": 416, and `Range` says how far the upload got.
    let loc = open_upload(&m, APP).await;
    let first = patch(&m, &loc, one, Some((0, 21))).await.expect(202);
    assert_eq!(first.header("range"), "0-21");
    let again = patch(&m, &loc, one, Some((0, 21))).await;
    assert_eq!(again.status, 416, "{}: {}", again.what, again.text());
    assert_eq!(again.header("range"), "0-21", "{:?}", again.headers);
    // A gap is out of order too.
    let gap = patch(&m, &first.location(&m), &two[1..], Some((23, 41))).await;
    assert_eq!(gap.status, 416, "{}: {}", gap.what, gap.text());

    // The refused chunks changed nothing: the status, then the right chunk, complete it.
    let s = get(&m, &loc).await.expect(204);
    assert_eq!(s.header("range"), "0-21");
    let b = patch(&m, &s.location(&m), two, Some((22, 41)))
        .await
        .expect(202);
    assert_eq!(b.header("range"), "0-41");
    put_upload(&m, &b.location(&m), &digest, &[])
        .await
        .expect(201);
    assert_blob_served(&m, APP, &digest, &bytes).await;
}

#[tokio::test]
async fn a_cancelled_upload_is_unknown_afterwards() {
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |_| {}).await;
    let bytes = random_bytes(30_000, 7);
    let loc = open_upload(&m, APP).await;
    let a = patch(&m, &loc, &bytes, Some((0, 29_999))).await.expect(202);
    let loc = a.location(&m);
    send(&m, Method::DELETE, &loc, &[], None).await.expect(204);
    get(&m, &loc).await.expect_error(404, "BLOB_UPLOAD_UNKNOWN");
    patch(&m, &loc, &bytes, Some((30_000, 59_999)))
        .await
        .expect_error(404, "BLOB_UPLOAD_UNKNOWN");
    put_upload(&m, &loc, &sha256_digest(&bytes), &[])
        .await
        .expect_error(404, "BLOB_UPLOAD_UNKNOWN");
    head(&m, &format!("/v2/{APP}/blobs/{}", sha256_digest(&bytes)))
        .await
        .expect(404);
    assert_no_copy_left(&m, &bytes, "a cancelled upload").await;
}

#[tokio::test]
async fn an_upload_nobody_opened_is_blob_upload_unknown() {
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |_| {}).await;
    let path = format!("/v2/{APP}/blobs/uploads/3f1c2b8e-6a4d-4c1e-9b0a-5d2e7f8a9c10");
    get(&m, &path)
        .await
        .expect_error(404, "BLOB_UPLOAD_UNKNOWN");
    patch(&m, &path, b"abc", Some((0, 2)))
        .await
        .expect_error(404, "BLOB_UPLOAD_UNKNOWN");
    send(&m, Method::DELETE, &path, &[], None)
        .await
        .expect_error(404, "BLOB_UPLOAD_UNKNOWN");
    // An upload is its repository's: another repository does not know it.
    let loc = open_upload(&m, APP).await;
    let elsewhere = path_of(&loc).replace(APP, "myorg/other");
    get(&m, &elsewhere)
        .await
        .expect_error(404, "BLOB_UPLOAD_UNKNOWN");
    assert!(upstream_requests_for(&fake, "/v2/myorg/").is_empty());
}

#[tokio::test]
async fn a_wrong_digest_is_digest_invalid_and_nothing_is_stored() {
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |_| {}).await;
    let bytes = random_bytes(10_000, 8);
    let real = sha256_digest(&bytes);
    let claimed = sha256_digest(b"something else");

    let loc = open_upload(&m, APP).await;
    put_upload(&m, &loc, &claimed, &bytes)
        .await
        .expect_error(400, "DIGEST_INVALID");
    // Chunked, then the wrong digest at the end.
    let loc = open_upload(&m, APP).await;
    let a = patch(&m, &loc, &bytes, Some((0, 9_999))).await.expect(202);
    put_upload(&m, &a.location(&m), &claimed, &[])
        .await
        .expect_error(400, "DIGEST_INVALID");
    // Single POST.
    send(
        &m,
        Method::POST,
        &format!("/v2/{APP}/blobs/uploads/?digest={claimed}"),
        &[("content-type", "application/octet-stream")],
        Some(bytes.clone()),
    )
    .await
    .expect_error(400, "DIGEST_INVALID");

    for d in [&claimed, &real] {
        head(&m, &format!("/v2/{APP}/blobs/{d}")).await.expect(404);
    }
    assert_no_copy_left(&m, &bytes, "refused uploads").await;
}

#[tokio::test]
async fn an_upload_survives_a_restart_of_the_mirror() {
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |_| {}).await;
    let bytes = random_bytes(90_000, 9);
    let digest = sha256_digest(&bytes);
    let loc = open_upload(&m, APP).await;
    let a = patch(&m, &loc, &bytes[..40_000], Some((0, 39_999)))
        .await
        .expect(202);
    // The new mirror listens on another port: the client keeps the Location's path.
    let loc = path_of(&a.location(&m));

    let dir = m.stop().await;
    let m = MirrorHandle::start_in(dir, &fake.url(), hosting).await;

    let s = get(&m, &loc).await.expect(204);
    assert_eq!(s.header("range"), "0-39999");
    let b = patch(
        &m,
        &s.location(&m),
        &bytes[40_000..],
        Some((40_000, 89_999)),
    )
    .await
    .expect(202);
    assert_eq!(b.header("range"), "0-89999");
    put_upload(&m, &b.location(&m), &digest, &[])
        .await
        .expect(201);
    assert_blob_served(&m, APP, &digest, &bytes).await;
}

#[tokio::test]
async fn a_malformed_content_range_is_refused_and_the_upload_is_unchanged() {
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |_| {}).await;
    let loc = open_upload(&m, APP).await;
    patch(&m, &loc, b"abcd", Some((0, 3))).await.expect(202);
    for range in ["four-seven", "7-4", "4"] {
        let a = send(
            &m,
            Method::PATCH,
            &loc,
            &[
                ("content-type", "application/octet-stream"),
                ("content-range", range),
            ],
            Some(b"efgh".to_vec()),
        )
        .await;
        assert!(
            (a.status == 400 && a.code() == "BLOB_UPLOAD_INVALID") || a.status == 416,
            "Content-Range {range}: want 400 BLOB_UPLOAD_INVALID or 416, got {} {}",
            a.status,
            a.text()
        );
    }
    let s = get(&m, &loc).await.expect(204);
    assert_eq!(s.header("range"), "0-3");
}

/// `hosted.upload_ttl`: an upload nobody touches for that long is removed by the mirror's
/// upkeep (which looks for them every sixth run, about a minute), its bytes off the disk and
/// out of the quota; one a client keeps sending to stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untouched_upload_expires_and_a_busy_one_stays() {
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |c| {
        c.hosted.upload_ttl = Duration::from_secs(1);
        c.hosted.max_size = Some(regmirror::config::ByteSize(50_000));
    })
    .await;
    let idle_bytes = random_bytes(40_000, 18);
    let idle = open_upload(&m, APP).await;
    patch(&m, &idle, &idle_bytes, Some((0, 39_999)))
        .await
        .expect(202);

    // The busy upload gets 10 bytes every 300 ms until the idle one is gone (at most 80 s).
    let busy_bytes = random_bytes(4000, 19);
    let mut busy = open_upload(&m, APP).await;
    let mut sent = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(80);
    let expired = loop {
        let a = patch(
            &m,
            &busy,
            &busy_bytes[sent..sent + 10],
            Some((sent as u64, sent as u64 + 9)),
        )
        .await
        .expect(202);
        busy = a.location(&m);
        sent += 10;
        // Watched on disk: even a status request might count as a touch.
        if files_holding(&m.data_dir, &idle_bytes[..1024]).is_empty() {
            break true;
        }
        if std::time::Instant::now() > deadline || sent + 10 > busy_bytes.len() {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(
        expired,
        "an upload untouched for 80 s with upload_ttl = 1s is still on disk"
    );
    get(&m, &idle)
        .await
        .expect_error(404, "BLOB_UPLOAD_UNKNOWN");
    // Its 40 kB are out of the quota: 40 kB more fit under 50 kB.
    push_blob(&m, APP, &random_bytes(40_000, 20)).await;

    let s = get(&m, &busy).await.expect(204);
    assert_eq!(s.header("range"), format!("0-{}", sent - 1));
    let digest = sha256_digest(&busy_bytes[..sent]);
    put_upload(&m, &busy, &digest, b"").await.expect(201);
    assert_blob_served(&m, APP, &digest, &busy_bytes[..sent]).await;
}

/// Upload ids are the mirror's UUIDs: anything else in their place is refused as unknown or
/// invalid (never a 500, never a path of the data dir), whatever the method.
#[tokio::test]
async fn an_upload_id_that_is_no_uuid_is_refused() {
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |_| {}).await;
    let uuid = "3f1c2b8e-6a4d-4c1e-9b0a-5d2e7f8a9c10";
    let ids = [
        "not-a-uuid".to_owned(),
        uuid.to_uppercase(),
        format!("{uuid}0"),
        format!("..%2F{uuid}"),
        "..%2F..%2Flock".to_owned(),
    ];
    for id in &ids {
        let url = format!("/v2/{APP}/blobs/uploads/{id}");
        for method in [Method::GET, Method::PATCH, Method::PUT, Method::DELETE] {
            let url = match method {
                Method::PUT => format!("{url}?digest={}", sha256_digest(b"x")),
                _ => url.clone(),
            };
            let a = send(&m, method, &url, &[], Some(b"x".to_vec())).await;
            let code = a.code();
            assert!(
                matches!(a.status, 400 | 404)
                    && ["BLOB_UPLOAD_UNKNOWN", "BLOB_UPLOAD_INVALID", "NAME_INVALID"]
                        .contains(&code.as_str()),
                "{}: got {} {}",
                a.what,
                a.status,
                a.text()
            );
        }
    }
    assert!(m.data_dir.join("lock").is_file());
}

/// A client retrying a chunk while the first try is still being received (a timeout, a
/// second connection): one goes in, the other is 416, and the upload holds the chunk once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_chunk_sent_twice_at_once_goes_in_once() {
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |_| {}).await;
    let bytes = random_bytes(2 << 20, 21);
    let digest = sha256_digest(&bytes);
    let half = bytes.len() / 2;
    let loc = open_upload(&m, APP).await;
    let chunk = &bytes[..half];
    let range = Some((0, half as u64 - 1));
    // Each through a client of its own, as two tries on two connections.
    let (one, two) = (Fresh::of(&m), Fresh::of(&m));
    let (a, b) = tokio::join!(
        patch(&one, &loc, chunk, range),
        patch(&two, &loc, chunk, range)
    );
    let mut statuses = [a.status, b.status];
    statuses.sort_unstable();
    assert_eq!(statuses, [202, 416], "{} / {}", a.text(), b.text());
    let s = get(&m, &loc).await.expect(204);
    assert_eq!(s.header("range"), format!("0-{}", half - 1));
    let c = patch(
        &m,
        &s.location(&m),
        &bytes[half..],
        Some((half as u64, bytes.len() as u64 - 1)),
    )
    .await
    .expect(202);
    put_upload(&m, &c.location(&m), &digest, b"")
        .await
        .expect(201);
    assert_blob_served(&m, APP, &digest, &bytes).await;
}

/// A refusal sent before the request's body is read (416 here; DENIED past the quota too)
/// must not leave the client a connection that fails its next request: the mirror either
/// reads the rest of the body or says `Connection: close` and closes.
#[tokio::test]
async fn the_request_after_an_early_refusal_does_not_fail() {
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |_| {}).await;
    let loc = open_upload(&m, APP).await;
    let client = Fresh::of(&m);
    let big = random_bytes(8 << 20, 22);
    for round in 0..3 {
        let a = patch(
            &client,
            &loc,
            &big,
            Some((1000, 1000 + big.len() as u64 - 1)),
        )
        .await;
        assert_eq!(a.status, 416, "round {round}: {}", a.text());
        let closes = a.header("connection").eq_ignore_ascii_case("close");
        for i in 0..3 {
            let r = client.http().get(m.url_for("/v2/")).send().await;
            assert!(
                r.as_ref().is_ok_and(|r| r.status() == 200),
                "round {round}, request {i} after a 416 (Connection: {}): {r:?}",
                if closes { "close" } else { "not close" }
            );
        }
    }
}
