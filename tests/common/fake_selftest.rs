//! Tests of the fake upstream itself, with a plain reqwest client and no mirror, so the
//! mirror's tests stand on a registry known to behave (and misbehave) as designed.
//! Compiled only into the `api` test binary (`#[path]` there).

use std::time::Duration;

use crate::common::fake_upstream::{FakeUpstream, SERVICE};
use crate::common::images::sha256_digest;
use crate::common::{header, json, random_bytes, read_body};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Fetches a pull token for `repo` the way the challenge says.
async fn token(c: &reqwest::Client, fake: &FakeUpstream, repo: &str) -> String {
    let r = c
        .get(format!("{}/token", fake.url()))
        .query(&[
            ("service", SERVICE),
            ("scope", &format!("repository:{repo}:pull")),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = json(r).await;
    v["token"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn fake_challenges_then_serves_manifest_with_token() {
    let fake = FakeUpstream::start().await;
    let img = fake.add_image("library/alpine", "3.19", vec![b"layer one".to_vec()]);
    let c = client();
    let url = format!("{}/v2/library/alpine/manifests/3.19", fake.url());

    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let challenge = header(&r, "www-authenticate");
    assert_eq!(
        challenge,
        format!(
            "Bearer realm=\"{}/token\",service=\"fake\",scope=\"repository:library/alpine:pull\"",
            fake.url()
        )
    );
    assert_eq!(fake.count("GET", "/v2/library/alpine/manifests/3.19"), 0);

    let t = token(&c, &fake, "library/alpine").await;
    let r = c.get(&url).bearer_auth(&t).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "docker-content-digest"), img.manifest_digest);
    assert_eq!(header(&r, "content-type"), img.media_type);
    let body = r.bytes().await.unwrap();
    assert_eq!(body, img.manifest);
    assert_eq!(sha256_digest(&body), img.manifest_digest);

    let r = c.head(&url).bearer_auth(&t).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "content-length"),
        img.manifest.len().to_string(),
        "HEAD keeps Content-Length"
    );
    assert_eq!(header(&r, "docker-content-digest"), img.manifest_digest);

    let by_digest = format!(
        "{}/v2/library/alpine/manifests/{}",
        fake.url(),
        img.manifest_digest
    );
    let r = c.get(&by_digest).bearer_auth(&t).send().await.unwrap();
    assert_eq!(r.bytes().await.unwrap(), img.manifest);

    assert_eq!(fake.count("GET", "/v2/library/alpine/manifests/3.19"), 1);
    assert_eq!(fake.count("HEAD", "/v2/library/alpine/manifests/3.19"), 1);
    assert_eq!(fake.manifest_gets("library/alpine"), 2);
    assert_eq!(fake.token_fetches().len(), 1);
    assert!(fake.token_fetches()[0].basic.is_none());

    // A token is good for its own repository only.
    fake.add_image("library/other", "1", vec![b"x".to_vec()]);
    let r = c
        .get(format!("{}/v2/library/other/manifests/1", fake.url()))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(fake.rejected_tokens(), 1);
}

#[tokio::test]
async fn fake_blobs_ranges_membership_and_tags() {
    let fake = FakeUpstream::start().await;
    fake.set(|f| f.require_auth = false);
    let data = random_bytes(1000, 1);
    let img = fake.add_image("a/one", "v1", vec![data.clone()]);
    fake.tag("a/one", "v2", &img.manifest_digest);
    fake.tag("a/one", "latest", &img.manifest_digest);
    let d = &img.layer_digests[0];
    let c = client();

    let r = c
        .get(format!("{}/v2/a/one/blobs/{d}", fake.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&r, "content-length"), "1000");
    assert_eq!(r.bytes().await.unwrap(), data);
    let r = c
        .get(format!("{}/v2/a/one/blobs/{d}", fake.url()))
        .header("range", "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(header(&r, "content-range"), "bytes 10-19/1000");
    assert_eq!(r.bytes().await.unwrap(), data[10..20]);
    let r = c
        .get(format!("{}/v2/a/one/blobs/{d}", fake.url()))
        .header("range", "bytes=2000-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);

    let other = format!("{}/v2/b/two/blobs/{d}", fake.url());
    assert_eq!(c.head(&other).send().await.unwrap().status(), 404);
    fake.link_blob("b/two", d);
    let r = c.head(&other).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-length"), "1000");
    assert_eq!(fake.blob_gets(d), 3);

    let r = c
        .get(format!("{}/v2/a/one/tags/list?n=2", fake.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(
        header(&r, "link"),
        "</v2/a/one/tags/list?n=2&last=v1>; rel=\"next\""
    );
    let v: serde_json::Value = json(r).await;
    assert_eq!(
        v,
        serde_json::json!({"name": "a/one", "tags": ["latest", "v1"]})
    );
}

#[tokio::test]
async fn fake_faults_corrupt_cut_fail_hang_redirect() {
    let fake = FakeUpstream::start().await;
    fake.set(|f| f.require_auth = false);
    let data = random_bytes(300_000, 2);
    let d = fake.add_blob("r/x", data.clone());
    let c = client();
    let url = format!("{}/v2/r/x/blobs/{d}", fake.url());

    fake.set(|f| {
        f.corrupt.insert(d.clone());
    });
    let body = c.get(&url).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(body.len(), data.len());
    let body2 = c.get(&url).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(body2, body);
    assert_ne!(sha256_digest(&body), d);

    fake.clear_faults();
    fake.set(|f| f.cut_after = Some(100_000));
    let got = read_body(c.get(&url).send().await.unwrap()).await;
    assert_eq!(got.unwrap_err().len(), 100_000, "cut exactly at the offset");
    assert_eq!(fake.progress().bodies_cut, 1);

    fake.clear_faults();
    fake.fail_with(429, Some("42"));
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "retry-after"), "42");
    fake.fail_with(503, None);
    assert_eq!(c.get(&url).send().await.unwrap().status(), 503);

    fake.clear_faults();
    fake.set(|f| f.hang = Some(String::new()));
    let r = tokio::time::timeout(Duration::from_millis(300), c.get(&url).send()).await;
    assert!(r.is_err(), "a hanging fake never answers");

    fake.clear_faults();
    fake.set(|f| f.redirect_blobs = true);
    let r = c.get(&url).bearer_auth("t").send().await.unwrap();
    assert_eq!(r.status(), 307);
    let loc = header(&r, "location");
    assert!(
        loc.starts_with(&format!("{}/cdn/{d}?sig=", fake.url())),
        "{loc}"
    );
    let r = c.get(&loc).bearer_auth("t").send().await.unwrap();
    assert_eq!(r.status(), 403, "the CDN refuses an Authorization header");
    let r = c.get(&loc).send().await.unwrap();
    assert_eq!(r.bytes().await.unwrap(), data);
    assert_eq!(fake.count_prefix("GET", "/cdn/"), 2);
}

#[tokio::test]
async fn fake_token_switches_credentials_expiry_reject() {
    let fake = FakeUpstream::start().await;
    let img = fake.add_image("p/q", "t", vec![b"abc".to_vec()]);
    let c = client();
    let url = format!("{}/v2/p/q/blobs/{}", fake.url(), img.layer_digests[0]);

    fake.set(|f| f.credentials = Some(("user".into(), "pw".into())));
    let tok_url = format!(
        "{}/token?service=fake&scope=repository:p/q:pull",
        fake.url()
    );
    assert_eq!(c.get(&tok_url).send().await.unwrap().status(), 401);
    let r = c
        .get(&tok_url)
        .basic_auth("user", Some("pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let fetches = fake.token_fetches();
    assert_eq!(fetches.len(), 2);
    assert!(fetches[0].issued.is_none());
    assert_eq!(fetches[1].basic, Some(("user".into(), "pw".into())));
    let t: serde_json::Value = json(r).await;
    let t = t["token"].as_str().unwrap().to_owned();

    fake.set(|f| f.reject_next_token = true);
    assert_eq!(
        c.get(&url).bearer_auth(&t).send().await.unwrap().status(),
        401
    );
    assert_eq!(
        c.get(&url).bearer_auth(&t).send().await.unwrap().status(),
        401,
        "a rejected token stays revoked"
    );
    fake.set(|f| f.credentials = None);
    let t2 = token(&c, &fake, "p/q").await;
    assert_eq!(
        c.get(&url).bearer_auth(&t2).send().await.unwrap().status(),
        200
    );

    fake.set(|f| f.token_expires_in = 0);
    let t3 = token(&c, &fake, "p/q").await;
    assert_eq!(
        c.get(&url).bearer_auth(&t3).send().await.unwrap().status(),
        401,
        "an expired token is refused"
    );
}

#[tokio::test]
async fn fake_pause_gate_signals_and_stop() {
    let fake = FakeUpstream::start().await;
    fake.set(|f| f.require_auth = false);
    let data = random_bytes(1 << 20, 3);
    let d = fake.add_blob("g/h", data.clone());
    let url = format!("{}/v2/g/h/blobs/{d}", fake.url());
    fake.pause_blobs_at(256 * 1024);
    fake.slow_body(Duration::from_millis(1), 64 * 1024);

    let c = client();
    let mut resp = c.get(&url).send().await.unwrap();
    let p = fake
        .wait_progress("the body to pause", |p| p.paused == 1)
        .await;
    assert_eq!(p.bytes_sent, 256 * 1024);
    assert_eq!(p.bodies_completed, 0);
    let mut got = Vec::new();
    while got.len() < 256 * 1024 {
        got.extend_from_slice(&resp.chunk().await.unwrap().unwrap());
    }
    fake.release();
    while let Some(c) = resp.chunk().await.unwrap() {
        got.extend_from_slice(&c);
    }
    assert_eq!(got, data);
    fake.wait_progress("completion", |p| p.bodies_completed == 1)
        .await;

    // A dropped body is reported.
    fake.set(|f| f.stall_after = Some(1000));
    let resp = c.get(&url).send().await.unwrap();
    fake.wait_progress("the stalled body's first bytes", |p| {
        p.bytes_sent >= (1 << 20) + 1000
    })
    .await;
    drop(resp);
    fake.wait_progress("the drop", |p| p.bodies_dropped == 1)
        .await;

    fake.stop();
    let err = c.get(&url).send().await.unwrap_err();
    assert!(err.is_connect(), "{err}");
    let err = c
        .get(format!("{}/v2/", FakeUpstream::unreachable_url().await))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_connect(), "{err}");
}
