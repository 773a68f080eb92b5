//! A `regmirror serve` process hosting `myorg/*` killed (SIGKILL) in the middle of a chunked
//! upload: what it acknowledged is there after the restart, the upload's status tells how
//! far it got (a chunk cut off mid-body included), and the client finishes from there.

use std::path::Path;

use reqwest::Method;

use crate::common::images::sha256_digest;
use crate::common::served::Served;
use crate::common::{random_bytes, FakeUpstream};
use crate::push::{get, open_upload, patch, path_of, put_upload, Feed, Target, APP};

impl Target for Served {
    fn base(&self) -> &str {
        &self.url
    }

    fn http(&self) -> &reqwest::Client {
        &self.client
    }
}

/// `regmirror serve` hosting `myorg/*`.
async fn serve(data_dir: &Path, upstream: &str) -> Served {
    let hosted = regmirror::config::env_name("hosted.repos");
    Served::start_with(data_dir, upstream, &[(hosted, r#"["myorg/*"]"#)]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_upload_resumes_after_the_mirror_is_killed() {
    let fake = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let bytes = random_bytes(3 << 20, 80);
    let digest = sha256_digest(&bytes);
    let first = 1 << 20;

    let mut s = serve(dir.path(), &fake.url()).await;
    let loc = open_upload(&s, APP).await;
    let a = patch(&s, &loc, &bytes[..first], Some((0, first as u64 - 1)))
        .await
        .expect(202);
    let loc = path_of(&a.location(&s));
    // The second chunk is cut off: the process dies with part of it sent.
    let feed = Feed::start(
        &s,
        Method::PATCH,
        &loc,
        &[
            ("content-type", "application/octet-stream"),
            ("content-range", &format!("{first}-{}", bytes.len() - 1)),
        ],
    );
    for piece in bytes[first..first + (1 << 20)].chunks(64 << 10) {
        assert!(feed.piece(piece).await, "the mirror stopped reading");
    }
    s.kill();
    let _ = feed.finish().await;

    let s = serve(dir.path(), &fake.url()).await;
    let status = get(&s, &loc).await;
    assert_eq!(status.status, 204, "{}; log:\n{}", status.text(), s.log());
    let range = status.header("range");
    let got: usize = range
        .strip_prefix("0-")
        .and_then(|end| end.parse::<usize>().ok())
        .map(|end| end + 1)
        .unwrap_or_else(|| panic!("Range {range:?}"));
    assert!(
        (first..bytes.len()).contains(&got),
        "after the kill the upload holds {got} bytes; the first chunk ({first}) was acknowledged"
    );
    let b = patch(
        &s,
        &status.location(&s),
        &bytes[got..],
        Some((got as u64, bytes.len() as u64 - 1)),
    )
    .await
    .expect(202);
    assert_eq!(b.header("range"), format!("0-{}", bytes.len() - 1));
    let put = put_upload(&s, &b.location(&s), &digest, b"").await;
    assert_eq!(put.status, 201, "{}; log:\n{}", put.text(), s.log());
    let served = get(&s, &format!("/v2/{APP}/blobs/{digest}"))
        .await
        .expect(200);
    assert!(
        served.body[..] == bytes[..],
        "the resumed blob has other bytes"
    );
}
