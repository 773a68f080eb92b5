//! What hosting must not do: take a push for a mirrored repository (DENIED naming
//! `hosted.repos`, nothing sent upstream), ask the upstream about a hosted repository, or
//! let a push past `hosted.max_size` in or leave any of its bytes behind.

use std::time::Duration;

use regmirror::config::ByteSize;
use reqwest::Method;

use crate::common::images::{sha256_digest, OCI_MANIFEST};
use crate::common::{random_bytes, wait_until, FakeUpstream, MirrorHandle};
use crate::push::{
    delete, files_holding, get, head, hosted_mirror, open_upload, patch, post_upload, push_blob,
    push_image, put_manifest, put_upload, send, upstream_requests_for, Answer, Feed, APP,
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
fn held(m: &MirrorHandle, bytes: &[u8]) -> Vec<std::path::PathBuf> {
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

/// Feeds `bytes` as the body of `method url` in `piece`-byte pieces (until the mirror stops
/// reading) and returns the answer; a PATCH answered 202 is closed with its PUT.
async fn fed(m: &MirrorHandle, method: Method, url: &str, bytes: &[u8], piece: usize) -> Answer {
    let feed = Feed::start(
        m,
        method,
        url,
        &[("content-type", "application/octet-stream")],
    );
    for p in bytes.chunks(piece) {
        if !feed.piece(p).await {
            break;
        }
    }
    let a = feed
        .finish()
        .await
        .unwrap_or_else(|e| panic!("no answer: {e}"));
    if a.what.starts_with("PATCH") && a.status == 202 {
        return put_upload(m, &a.location(m), &sha256_digest(bytes), b"").await;
    }
    a
}

/// A body arriving in small pieces is counted whole: every piece fits in what is left, the
/// upload does not.
#[tokio::test]
async fn a_push_arriving_in_small_pieces_is_held_to_max_size() {
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |c| c.hosted.max_size = Some(ByteSize(100_000))).await;
    push_blob(&m, APP, &random_bytes(40_000, 57)).await;

    // skopeo's way: one PATCH with the whole layer, no Content-Range.
    let big = random_bytes(300_000, 58);
    let loc = open_upload(&m, APP).await;
    let a = fed(&m, Method::PATCH, &loc, &big, 8192).await;
    a.expect_error(403, "DENIED");
    // And in one POST.
    let big2 = random_bytes(300_000, 59);
    let url = format!("/v2/{APP}/blobs/uploads/?digest={}", sha256_digest(&big2));
    let a = fed(&m, Method::POST, &url, &big2, 8192).await;
    a.expect_error(403, "DENIED");

    for (what, bytes) in [("PATCH", &big), ("POST", &big2)] {
        head(&m, &format!("/v2/{APP}/blobs/{}", sha256_digest(bytes)))
            .await
            .expect(404);
        let gone = wait_until(Duration::from_secs(10), || held(&m, bytes).is_empty()).await;
        assert!(gone, "{what}: refused bytes left in {:?}", held(&m, bytes));
    }
}

/// Two uploads that each fit in the room left but not together, sent at the same time:
/// not both go in.
#[tokio::test]
async fn two_pushes_racing_for_the_last_room_do_not_both_get_it() {
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |c| c.hosted.max_size = Some(ByteSize(100_000))).await;
    let blobs = [random_bytes(60_000, 60), random_bytes(60_000, 61)];
    let mut feeds = Vec::new();
    for _ in &blobs {
        let loc = open_upload(&m, APP).await;
        feeds.push(Feed::start(
            &m,
            Method::PATCH,
            &loc,
            &[("content-type", "application/octet-stream")],
        ));
    }
    // Piece by piece, in turns.
    let pieces: Vec<Vec<&[u8]>> = blobs.iter().map(|b| b.chunks(4096).collect()).collect();
    let mut open = [true, true];
    for (a, b) in pieces[0].iter().zip(&pieces[1]) {
        for (k, piece) in [a, b].into_iter().enumerate() {
            if open[k] {
                open[k] = feeds[k].piece(piece).await;
            }
        }
    }
    let mut answers = Vec::new();
    for (feed, bytes) in feeds.into_iter().zip(&blobs) {
        let a = feed
            .finish()
            .await
            .unwrap_or_else(|e| panic!("no answer: {e}"));
        answers.push(match a.status {
            202 => put_upload(&m, &a.location(&m), &sha256_digest(bytes), b"").await,
            _ => a,
        });
    }
    let stored = answers.iter().filter(|a| a.status == 201).count();
    assert!(
        stored <= 1,
        "both went in, 120000 bytes past hosted.max_size = 100000: {:?}",
        answers
            .iter()
            .map(|a| (a.status, a.code()))
            .collect::<Vec<_>>()
    );
    for a in answers.iter().filter(|a| a.status != 201) {
        a.expect_error(403, "DENIED");
    }
    let mut served = 0;
    for b in &blobs {
        let a = head(&m, &format!("/v2/{APP}/blobs/{}", sha256_digest(b))).await;
        served += usize::from(a.status == 200);
    }
    assert!(served <= 1, "{served} of the racing blobs are served");
}

/// The guides' workflow names a repository of one segment (`docker push
/// 127.0.0.1:5000/hello-world`): a glob without `*` hosts exactly that name.
#[tokio::test]
async fn a_glob_without_a_star_hosts_exactly_that_name() {
    let fake = FakeUpstream::start().await;
    let theirs = fake.add_image("library/hello-world", "latest", vec![random_bytes(300, 66)]);
    let m = hosted_mirror(&fake, |c| c.hosted.repos.push("hello-world".into())).await;
    let ours = push_image(&m, "hello-world", "latest", vec![random_bytes(300, 67)]).await;
    let a = get(&m, "/v2/hello-world/manifests/latest")
        .await
        .expect(200);
    assert!(a.body == ours.manifest, "hello-world: other bytes");
    assert!(upstream_requests_for(&fake, "/v2/hello-world/").is_empty());
    // Docker Hub's official image stays mirrored.
    let a = get(&m, "/v2/library/hello-world/manifests/latest")
        .await
        .expect(200);
    assert!(
        a.body == theirs.manifest,
        "library/hello-world: other bytes"
    );
    for repo in ["hello-world-2", "hello-world/sub", "library/hello-world"] {
        assert_denied_naming_hosted_repos(&post_upload(&m, repo, "").await);
    }
}

/// Manifests and mounts count against the quota too: with the room left smaller than what
/// they add, neither goes in.
#[tokio::test]
async fn a_manifest_or_a_mount_past_max_size_is_refused() {
    let fake = FakeUpstream::start().await;
    let theirs = fake.add_image("library/base", "1", vec![random_bytes(20_000, 68)]);
    let img = crate::common::images::build_image(
        vec![random_bytes(30_000, 69)],
        crate::common::images::Format::Oci,
        "amd64",
    );
    let blobs: u64 = img.blobs().iter().map(|(_, b)| b.len() as u64).sum();
    // Room for the blobs and 100 bytes: not for the manifest, nor the mounted layer.
    let max = blobs + 100;
    let m = hosted_mirror(&fake, |c| c.hosted.max_size = Some(ByteSize(max))).await;
    for (_, b) in img.blobs() {
        push_blob(&m, APP, &b).await;
    }
    put_manifest(&m, APP, "v1", OCI_MANIFEST, &img.manifest)
        .await
        .expect_error(403, "DENIED");
    get(&m, &format!("/v2/{APP}/manifests/v1"))
        .await
        .expect_error(404, "MANIFEST_UNKNOWN");

    let layer = &theirs.layer_digests[0];
    m.blob("library/base", layer).await;
    assert!(m.committed(layer).await);
    let a = post_upload(&m, APP, &format!("?mount={layer}&from=library/base")).await;
    assert!(
        (a.status == 403 && a.code() == "DENIED") || a.status == 202,
        "{}: want 403 DENIED or 202 (no mount), got {} {}",
        a.what,
        a.status,
        a.text()
    );
    head(&m, &format!("/v2/{APP}/blobs/{layer}"))
        .await
        .expect(404);
}

/// A hosted glob that would take Docker Hub's official images stops the start unless it is
/// listed in `hosted.shadowing` too; listed, those names are hosted: never fetched upstream.
#[tokio::test]
async fn shadowing_docker_hubs_names_takes_saying_so() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("regmirror.toml");
    let flags = regmirror::config::Flags {
        listen: None,
        data_dir: Some(dir.path().to_path_buf()),
        upstream: None,
        offline: false,
    };
    std::fs::write(&file, "[hosted]\nrepos = [\"library/*\"]\n").unwrap();
    let err = regmirror::config::load(Some(&file), Vec::new(), &flags)
        .expect_err("library/* hosted without hosted.shadowing");
    assert!(err.to_string().contains("hosted.shadowing"), "{err}");
    std::fs::write(
        &file,
        "[hosted]\nrepos = [\"library/*\"]\nshadowing = [\"library/*\"]\n",
    )
    .unwrap();
    let config = regmirror::config::load(Some(&file), Vec::new(), &flags).unwrap();
    assert!(config.hosted.hosts("library/alpine"));

    let fake = FakeUpstream::start().await;
    fake.add_image("library/alpine", "3.19", vec![random_bytes(300, 73)]);
    let m = crate::common::start_mirror(&fake.url(), |c| {
        c.hosted.repos = vec!["library/*".into()];
        c.hosted.shadowing = vec!["library/*".into()];
    })
    .await;
    get(&m, "/v2/library/alpine/manifests/3.19")
        .await
        .expect_error(404, "MANIFEST_UNKNOWN");
    let ours = push_image(&m, "library/alpine", "3.19", vec![random_bytes(300, 74)]).await;
    let a = get(&m, "/v2/library/alpine/manifests/3.19")
        .await
        .expect(200);
    assert!(a.body == ours.manifest, "other bytes");
    assert!(fake.requests().is_empty(), "{:?}", fake.requests());
}
