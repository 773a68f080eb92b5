//! What clients see when the upstream fails (404, 429, 5xx, unreachable, hanging, stalled
//! bodies), and the mirror's side of upstream auth: one token for many requests, Basic
//! credentials to the realm, refresh of rejected and expired tokens, credential-free redirects.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{
    assert_error, header, mirror_of, random_bytes, read_body, start_mirror, with_credentials,
    FakeUpstream,
};

const REPO: &str = "library/alpine";

#[tokio::test]
async fn upstream_404_is_manifest_unknown_or_blob_unknown() {
    let fake = FakeUpstream::start().await;
    let img = fake.add_image(REPO, "3.19", vec![random_bytes(1000, 1)]);
    let m = mirror_of(&fake).await;
    let missing = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

    let r = m
        .get("/v2/library/alpine/manifests/nosuchtag")
        .await
        .unwrap();
    assert_error(r, 404, Some("MANIFEST_UNKNOWN")).await;
    let r = m
        .head("/v2/library/alpine/manifests/nosuchtag")
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = m
        .get(&format!("/v2/library/alpine/manifests/{missing}"))
        .await
        .unwrap();
    assert_error(r, 404, Some("MANIFEST_UNKNOWN")).await;
    let r = m
        .get("/v2/library/nosuchrepo/manifests/latest")
        .await
        .unwrap();
    assert_error(r, 404, Some("MANIFEST_UNKNOWN")).await;

    let r = m
        .get(&format!("/v2/library/alpine/blobs/{missing}"))
        .await
        .unwrap();
    assert_error(r, 404, Some("BLOB_UNKNOWN")).await;
    let r = m
        .head(&format!("/v2/library/alpine/blobs/{missing}"))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // The misses did not poison anything.
    assert_eq!(
        m.get_ok("/v2/library/alpine/manifests/3.19").await,
        img.manifest
    );
}

#[tokio::test]
async fn upstream_429_is_too_many_requests_with_retry_after() {
    let fake = FakeUpstream::start().await;
    let img = fake.add_image(REPO, "3.19", vec![random_bytes(1000, 2)]);
    let m = mirror_of(&fake).await;
    fake.fail_with(429, Some("17"));

    let r = m.get("/v2/library/alpine/manifests/3.19").await.unwrap();
    assert_eq!(header(&r, "retry-after"), "17");
    assert_error(r, 429, Some("TOOMANYREQUESTS")).await;
    let r = m
        .get(&format!(
            "/v2/library/alpine/blobs/{}",
            img.layer_digests[0]
        ))
        .await
        .unwrap();
    assert_eq!(header(&r, "retry-after"), "17");
    assert_error(r, 429, Some("TOOMANYREQUESTS")).await;
    m.assert_nothing_stored("after 429s").await;
}

#[tokio::test]
async fn upstream_5xx_is_502_and_not_remembered() {
    let fake = FakeUpstream::start().await;
    let img = fake.add_image(REPO, "3.19", vec![random_bytes(1000, 3)]);
    let m = mirror_of(&fake).await;
    let blob = format!("/v2/library/alpine/blobs/{}", img.layer_digests[0]);

    for status in [503, 500] {
        fake.fail_with(status, None);
        let r = m.get("/v2/library/alpine/manifests/3.19").await.unwrap();
        assert_error(r, 502, None).await;
        let r = m.get(&blob).await.unwrap();
        assert_error(r, 502, None).await;
    }

    fake.clear_faults();
    assert_eq!(
        m.get_ok("/v2/library/alpine/manifests/3.19").await,
        img.manifest
    );
    assert_eq!(m.get_ok(&blob).await, img.layers[0]);
}

#[tokio::test]
async fn unreachable_upstream_is_503() {
    let url = FakeUpstream::unreachable_url().await;
    let m = start_mirror(&url, |_| {}).await;
    let r = m.get("/v2/library/alpine/manifests/3.19").await.unwrap();
    assert_error(r, 503, None).await;
    let d = common::images::sha256_digest(b"x");
    let r = m
        .get(&format!("/v2/library/alpine/blobs/{d}"))
        .await
        .unwrap();
    assert_error(r, 503, None).await;
}

#[tokio::test]
async fn upstream_going_away_is_503() {
    let fake = FakeUpstream::start().await;
    let img = fake.add_image(REPO, "3.19", vec![random_bytes(1000, 4)]);
    let m = mirror_of(&fake).await;
    m.get_ok("/v2/library/alpine/manifests/3.19").await;
    fake.stop();

    let r = m
        .get(&format!(
            "/v2/library/alpine/blobs/{}",
            img.layer_digests[0]
        ))
        .await
        .unwrap();
    assert_error(r, 503, None).await;
}

#[tokio::test]
async fn hanging_upstream_is_504_after_the_timeout() {
    let fake = FakeUpstream::start().await;
    let img = fake.add_image(REPO, "3.19", vec![random_bytes(1000, 5)]);
    let m = start_mirror(&fake.url(), |c| {
        c.upstream.timeout = Duration::from_millis(500);
    })
    .await;
    fake.set(|f| f.hang = Some(String::new()));

    let started = Instant::now();
    let r = m.get("/v2/library/alpine/manifests/3.19").await.unwrap();
    assert_error(r, 504, None).await;
    let r = m
        .get(&format!(
            "/v2/library/alpine/blobs/{}",
            img.layer_digests[0]
        ))
        .await
        .unwrap();
    assert_error(r, 504, None).await;
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "two 0.5 s timeouts took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_blob_body_is_aborted_after_the_read_timeout() {
    let fake = FakeUpstream::start().await;
    let data = random_bytes(1 << 20, 6);
    let d = fake.add_blob(REPO, data.clone());
    let m = start_mirror(&fake.url(), |c| {
        c.upstream.read_timeout = Duration::from_millis(500);
        // Without resumes (tests/reliability/stalls.rs has them): the stall is final.
        c.upstream.retries = 0;
    })
    .await;
    fake.set(|f| f.stall_after = Some(100_000));

    let r = m
        .get(&format!("/v2/library/alpine/blobs/{d}"))
        .await
        .unwrap();
    match read_body(r).await {
        Err(_) => {}
        Ok(b) => panic!("a stalled download ended cleanly with {} bytes", b.len()),
    }
    m.assert_nothing_stored("after a stalled download").await;
    fake.wait_progress("the mirror to drop the stalled body", |p| {
        p.bodies_dropped == 1
    })
    .await;

    fake.clear_faults();
    assert!(m.blob(REPO, &d).await == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_token_serves_many_requests() {
    let fake = FakeUpstream::start().await;
    let layers: Vec<Vec<u8>> = (0..24).map(|i| random_bytes(2000 + i, i as u64)).collect();
    let img = fake.add_image(REPO, "3.19", layers);
    let m = mirror_of(&fake).await;
    let (first, rest) = img.layer_digests.split_at(12);

    // Cold: concurrent requests all meet the challenge at once.
    let tasks: Vec<_> = first
        .iter()
        .map(|d| {
            let (client, url) = (
                m.client.clone(),
                m.url_for(&format!("/v2/{REPO}/blobs/{d}")),
            );
            tokio::spawn(async move { client.get(url).send().await.unwrap().status() })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    for (i, d) in rest.iter().enumerate() {
        assert_eq!(m.blob(REPO, d).await, img.layers[12 + i]);
    }

    let fetches = fake.token_fetches();
    assert_eq!(
        fetches.len(),
        1,
        "one token fetch for 24 blobs: {fetches:?}"
    );
    assert_eq!(fetches[0].service.as_deref(), Some("fake"));
    assert_eq!(
        fetches[0].scope.as_deref(),
        Some("repository:library/alpine:pull")
    );
    let bearer = format!("Bearer {}", fetches[0].issued.as_deref().unwrap());
    let gets: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| r.authorized && r.method == "GET" && r.path.contains("/blobs/"))
        .collect();
    assert_eq!(gets.len(), 24);
    assert!(gets
        .iter()
        .all(|r| r.authorization.as_deref() == Some(bearer.as_str())));
}

#[tokio::test]
async fn credentials_go_to_the_realm_as_basic() {
    let fake = FakeUpstream::start().await;
    fake.set(|f| f.credentials = Some(("user".into(), "pw".into())));
    let img = fake.add_image(REPO, "3.19", vec![random_bytes(1000, 7)]);
    let m = start_mirror(&fake.url(), with_credentials).await;

    assert_eq!(
        m.get_ok("/v2/library/alpine/manifests/3.19").await,
        img.manifest
    );
    let fetches = fake.token_fetches();
    assert!(!fetches.is_empty());
    for f in &fetches {
        assert_eq!(f.basic, Some(("user".to_owned(), "pw".to_owned())));
    }
    // Credentials go to the realm only, never to the registry endpoints.
    for r in fake.requests() {
        if r.path.starts_with("/v2/") {
            assert!(
                !r.authorization
                    .as_deref()
                    .unwrap_or("")
                    .starts_with("Basic"),
                "Basic credentials sent to {}",
                r.path
            );
        }
    }
}

#[tokio::test]
async fn without_credentials_tokens_are_anonymous() {
    let fake = FakeUpstream::start().await;
    let img = fake.add_image(REPO, "3.19", vec![random_bytes(1000, 8)]);
    let m = mirror_of(&fake).await;
    assert_eq!(m.blob(REPO, &img.layer_digests[0]).await, img.layers[0]);
    let fetches = fake.token_fetches();
    assert_eq!(fetches.len(), 1);
    assert!(fetches[0].basic.is_none());

    // A realm that wants credentials the mirror lacks: an error, not a 200 or a 500.
    fake.set(|f| f.credentials = Some(("user".into(), "pw".into())));
    let m = mirror_of(&fake).await;
    let r = m.get("/v2/library/alpine/manifests/3.19").await.unwrap();
    let status = r.status().as_u16();
    assert!(status != 200 && status != 500, "status {status}");
    assert_error(r, status, None).await;
}

#[tokio::test]
async fn rejected_token_is_refreshed_once() {
    let fake = FakeUpstream::start().await;
    let img = fake.add_image(
        REPO,
        "3.19",
        vec![random_bytes(1000, 9), random_bytes(1000, 10)],
    );
    let m = mirror_of(&fake).await;
    assert_eq!(m.blob(REPO, &img.layer_digests[0]).await, img.layers[0]);
    assert_eq!(fake.token_fetches().len(), 1);

    fake.set(|f| f.reject_next_token = true);
    assert_eq!(m.blob(REPO, &img.layer_digests[1]).await, img.layers[1]);
    assert_eq!(fake.rejected_tokens(), 1);
    assert_eq!(
        fake.token_fetches().len(),
        2,
        "one refresh after the rejection"
    );
}

#[tokio::test]
async fn always_rejected_tokens_give_an_error_not_a_loop() {
    let fake = FakeUpstream::start().await;
    let img = fake.add_image(REPO, "3.19", vec![random_bytes(1000, 11)]);
    let m = mirror_of(&fake).await;
    fake.set(|f| f.reject_all_tokens = true);

    let r = m
        .get(&format!(
            "/v2/library/alpine/blobs/{}",
            img.layer_digests[0]
        ))
        .await
        .unwrap();
    let status = r.status().as_u16();
    assert!(status != 200 && status != 500, "status {status}");
    assert_error(r, status, None).await;
    let fetches = fake.token_fetches().len();
    assert!(
        (1..=2).contains(&fetches),
        "{fetches} token fetches for one request"
    );
}

#[tokio::test]
async fn expired_token_is_not_sent() {
    let fake = FakeUpstream::start().await;
    fake.set(|f| f.token_expires_in = 1);
    let img = fake.add_image(
        REPO,
        "3.19",
        vec![random_bytes(1000, 12), random_bytes(1000, 13)],
    );
    let m = mirror_of(&fake).await;
    assert_eq!(m.blob(REPO, &img.layer_digests[0]).await, img.layers[0]);
    tokio::time::sleep(Duration::from_millis(1500)).await; // let the 1 s token expire

    assert_eq!(m.blob(REPO, &img.layer_digests[1]).await, img.layers[1]);
    assert_eq!(fake.token_fetches().len(), 2);
    assert_eq!(
        fake.rejected_tokens(),
        0,
        "the mirror sent a token past its expires_in"
    );
}

#[tokio::test]
async fn redirect_is_followed_without_authorization() {
    let fake = FakeUpstream::start().await;
    fake.set(|f| f.redirect_blobs = true);
    let data = random_bytes(500_000, 14);
    let img = fake.add_image(REPO, "3.19", vec![data.clone()]);
    let m = mirror_of(&fake).await;

    let d = &img.layer_digests[0];
    assert!(m.blob(REPO, d).await == data);
    let cdn: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| r.path.starts_with("/cdn/"))
        .collect();
    assert_eq!(cdn.len(), 1, "{cdn:?}");
    assert_eq!(cdn[0].path, format!("/cdn/{d}"));
    assert!(
        cdn[0].authorization.is_none(),
        "Authorization sent to the CDN"
    );
    assert!(m.committed(d).await);

    // The signed URL is not reused: another blob is another redirect.
    assert_eq!(m.blob(REPO, &img.config_digest).await, img.config);
    assert_eq!(fake.count_prefix("GET", "/cdn/"), 2);
}
