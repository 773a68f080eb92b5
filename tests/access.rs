//! Who may push, over HTTP: a mirror with htpasswd users, `auth.anonymous_pull` and
//! `[[auth.access]]` rules. Clients without credentials pull but get the Basic challenge for a
//! push and for the `/v2/` ping; a rule lets `ci` push to `myorg/*`; `bob`, whom no rule
//! names there, is DENIED with a detail naming user, action and repository; a delete needs a
//! rule of its own; a mount needs pull on the repository it mounts from.
//!
//! Hosted repositories are being built beside this: a request access lets through reaches
//! the registry, which answers what it answers (405 UNSUPPORTED today, 202/201 once pushes
//! work). So refusals are asserted exactly (status, code, detail) and allowed requests only as
//! "not refused by access": neither 401 nor 403.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::front::{basic, htpasswd_line, Front};
use common::images::ImageInfo;
use common::{assert_error, header, random_bytes, FakeUpstream};
use regmirror::config::AccessRule;

const REALM: &str = "access test";
const MIRRORED: &str = "library/alpine";
const HOSTED: &str = "myorg/app";
/// A digest no repository holds (the mount tests need only a well-formed one).
const SOME_DIGEST: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000001";

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

fn rule(users: &[&str], repos: &[&str], actions: &[&str]) -> AccessRule {
    let strings = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect();
    AccessRule {
        users: strings(users),
        repos: strings(repos),
        actions: strings(actions),
    }
}

/// `ci` pulls and pushes `myorg/*`; every user pulls `library/*`; nobody deletes.
fn rules() -> Vec<AccessRule> {
    vec![
        rule(&["ci"], &["myorg/*"], &["pull", "push"]),
        rule(&["*"], &["library/*"], &["pull"]),
    ]
}

/// A mirror of `fake` over plain HTTP with users `ci` and `bob` (in `dir`), `myorg/*`
/// hosted (deletes enabled, so a refused delete is access's doing), and `access`.
async fn mirror(
    fake: &FakeUpstream,
    dir: &Path,
    anonymous_pull: bool,
    access: Vec<AccessRule>,
) -> Front {
    let users = dir.join("htpasswd");
    let lines = [htpasswd_line("ci", "ci-pw"), htpasswd_line("bob", "bob-pw")];
    std::fs::write(&users, lines.join("\n") + "\n").unwrap();
    Front::start(&fake.url(), move |c| {
        c.auth.htpasswd = Some(users);
        c.auth.realm = REALM.into();
        c.auth.anonymous_pull = anonymous_pull;
        c.auth.access = access;
        c.hosted.repos = vec!["myorg/*".into()];
        c.hosted.delete = true;
    })
    .await
}

/// A fake upstream holding a small `library/alpine:3.19`.
async fn upstream() -> (FakeUpstream, ImageInfo) {
    let fake = FakeUpstream::start().await;
    let img = fake.add_image(MIRRORED, "3.19", vec![random_bytes(700, 7)]);
    (fake, img)
}

/// `method path` on `m`, with `authorization` when given.
async fn send(
    m: &Front,
    method: &str,
    path: &str,
    authorization: Option<&str>,
) -> reqwest::Response {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = client().request(method, m.http(path));
    if let Some(a) = authorization {
        req = req.header("authorization", a);
    }
    req.send().await.unwrap()
}

/// 401 UNAUTHORIZED with the Basic challenge of the mirror's realm.
async fn assert_challenge(r: reqwest::Response, what: &str) {
    assert_eq!(
        header(&r, "www-authenticate"),
        format!("Basic realm=\"{REALM}\""),
        "{what}"
    );
    assert_eq!(
        header(&r, "docker-distribution-api-version"),
        "registry/2.0",
        "{what}"
    );
    assert_error(r, 401, Some("UNAUTHORIZED")).await;
}

/// 403 DENIED with exactly `detail`, and no password in the body.
async fn assert_denied(r: reqwest::Response, detail: &str) {
    assert!(
        header(&r, "www-authenticate").is_empty(),
        "a 403 carries no challenge"
    );
    let body = assert_error(r, 403, Some("DENIED")).await;
    assert_eq!(body["errors"][0]["detail"], detail, "{body}");
    let text = body.to_string();
    assert!(!text.contains("-pw"), "a password in {text}");
}

/// Access let the request through to the registry, which answered it its own way (the
/// status of a hosted push changes as pushes get built; it is never a refusal of access).
async fn assert_not_refused(r: reqwest::Response, what: &str) {
    let status = r.status().as_u16();
    let body = r.text().await.unwrap();
    assert!(
        status != 401 && status != 403,
        "{what}: refused with {status}: {body}"
    );
}

fn upload_start(repo: &str) -> String {
    format!("/v2/{repo}/blobs/uploads/")
}

fn mount(repo: &str, from: &str) -> String {
    format!("/v2/{repo}/blobs/uploads/?mount={SOME_DIGEST}&from={from}")
}

#[tokio::test]
async fn clients_without_credentials_pull_but_get_the_challenge_for_pushes_and_the_ping() {
    let (fake, img) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let m = mirror(&fake, dir.path(), true, rules()).await;

    // Pulls without credentials: manifest, blobs, tags list, catalog.
    let manifest = format!("/v2/{MIRRORED}/manifests/3.19");
    let r = send(&m, "GET", &manifest, None).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), img.manifest);
    assert_eq!(send(&m, "HEAD", &manifest, None).await.status(), 200);
    for (digest, bytes) in img.blobs() {
        let r = send(&m, "GET", &format!("/v2/{MIRRORED}/blobs/{digest}"), None).await;
        assert_eq!(r.status(), 200, "{digest}");
        assert_eq!(r.bytes().await.unwrap(), bytes, "{digest}");
    }
    let tags = format!("/v2/{MIRRORED}/tags/list");
    assert_not_refused(send(&m, "GET", &tags, None).await, "tags list").await;
    assert_not_refused(send(&m, "GET", "/v2/_catalog", None).await, "catalog").await;
    // A hosted repository is pulled without credentials too (404 or 405 today, never 401).
    let hosted = format!("/v2/{HOSTED}/manifests/v1");
    assert_not_refused(send(&m, "GET", &hosted, None).await, "hosted pull").await;

    // The ping still challenges: it is how docker login and docker push learn to log in.
    assert_challenge(send(&m, "GET", "/v2/", None).await, "GET /v2/").await;
    let r = send(&m, "HEAD", "/v2/", None).await;
    assert_eq!(r.status(), 401, "HEAD /v2/");
    assert_eq!(
        header(&r, "www-authenticate"),
        format!("Basic realm=\"{REALM}\"")
    );

    // A read that does not parse gets its own error (what the conformance suite checks);
    // a write that does not parse, the challenge.
    let invalid = format!("/v2/{MIRRORED}/manifests/.INVALID_MANIFEST_NAME");
    assert_error(
        send(&m, "GET", &invalid, None).await,
        404,
        Some("MANIFEST_UNKNOWN"),
    )
    .await;
    let bad_write = "/v2/Bad..Name/manifests/v1";
    assert_challenge(send(&m, "PUT", bad_write, None).await, bad_write).await;

    // The operator endpoints keep needing a user.
    assert_challenge(send(&m, "GET", "/metrics", None).await, "GET /metrics").await;

    // Pushes and deletes without credentials: the challenge, never DENIED.
    let upload = format!("/v2/{HOSTED}/blobs/uploads/3f2b2c9e-8d4a-4b4e-9a6f-0c1d2e3f4a5b");
    for (method, path) in [
        ("POST", upload_start(HOSTED)),
        ("POST", mount(HOSTED, MIRRORED)),
        ("GET", upload.clone()),
        ("PATCH", upload.clone()),
        ("PUT", format!("{upload}?digest={SOME_DIGEST}")),
        ("DELETE", upload),
        ("PUT", hosted.clone()),
        ("DELETE", format!("/v2/{HOSTED}/manifests/{SOME_DIGEST}")),
        ("DELETE", format!("/v2/{HOSTED}/blobs/{SOME_DIGEST}")),
    ] {
        let what = format!("{method} {path}");
        assert_challenge(send(&m, method, &path, None).await, &what).await;
    }

    // Credentials, once sent, must be right, even for a pull anybody may make.
    let wrong = basic("ci", "wrong");
    assert_challenge(
        send(&m, "GET", &manifest, Some(&wrong)).await,
        "wrong password",
    )
    .await;
    let unknown = basic("nobody", "x");
    assert_challenge(
        send(&m, "GET", &manifest, Some(&unknown)).await,
        "unknown user",
    )
    .await;
    // With right ones the ping answers, and a user pulls what anybody may.
    let bob = basic("bob", "bob-pw");
    assert_eq!(send(&m, "GET", "/v2/", Some(&bob)).await.status(), 200);
    assert_not_refused(
        send(&m, "GET", &hosted, Some(&bob)).await,
        "bob pulls hosted",
    )
    .await;
    // But pushes only where a rule says so.
    assert_denied(
        send(&m, "POST", &upload_start(HOSTED), Some(&bob)).await,
        "user \"bob\" may not push to myorg/app: no auth.access rule grants it",
    )
    .await;
    let ci = basic("ci", "ci-pw");
    let r = send(&m, "POST", &upload_start(HOSTED), Some(&ci)).await;
    assert_not_refused(r, "ci pushes").await;

    assert!(
        !fake.requests().iter().any(|r| r.path.contains("myorg")),
        "a hosted repository reached the upstream: {:?}",
        fake.requests()
    );
}

#[tokio::test]
async fn a_rule_lets_ci_push_to_myorg_and_bob_is_denied_naming_user_action_and_repository() {
    let (fake, img) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let m = mirror(&fake, dir.path(), false, rules()).await;
    let (ci, bob) = (basic("ci", "ci-pw"), basic("bob", "bob-pw"));
    let manifest = format!("/v2/{HOSTED}/manifests/v1");

    // ci: push (start, mount from a repository it may pull, manifest) and pull of myorg/*.
    for (method, path) in [
        ("POST", upload_start(HOSTED)),
        ("POST", upload_start("myorg/team/tool")),
        ("POST", mount(HOSTED, MIRRORED)),
        ("PUT", manifest.clone()),
        ("GET", manifest.clone()),
        ("GET", format!("/v2/{HOSTED}/tags/list")),
    ] {
        let what = format!("ci: {method} {path}");
        assert_not_refused(send(&m, method, &path, Some(&ci)).await, &what).await;
    }

    // bob: no rule names him on myorg/*, neither to push nor to pull.
    let bob_push = "user \"bob\" may not push to myorg/app: no auth.access rule grants it";
    assert_denied(
        send(&m, "POST", &upload_start(HOSTED), Some(&bob)).await,
        bob_push,
    )
    .await;
    assert_denied(send(&m, "PUT", &manifest, Some(&bob)).await, bob_push).await;
    let bob_pull = "user \"bob\" may not pull from myorg/app: no auth.access rule grants it";
    assert_denied(send(&m, "GET", &manifest, Some(&bob)).await, bob_pull).await;
    let head = send(&m, "HEAD", &manifest, Some(&bob)).await;
    assert_eq!(head.status(), 403, "HEAD: the status alone (no body)");

    // What the rule for every user grants, bob has: the ping and pulls of library/*.
    assert_eq!(send(&m, "GET", "/v2/", Some(&bob)).await.status(), 200);
    let r = send(
        &m,
        "GET",
        &format!("/v2/{MIRRORED}/manifests/3.19"),
        Some(&bob),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), img.manifest);
    // ... but no push there (the registry would refuse it anyway: it is mirrored).
    assert_denied(
        send(&m, "POST", &upload_start(MIRRORED), Some(&bob)).await,
        "user \"bob\" may not push to library/alpine: no auth.access rule grants it",
    )
    .await;

    // No rule grants delete: refused for ci too, of manifests and blobs alike.
    let ci_delete = "user \"ci\" may not delete from myorg/app: no auth.access rule grants it";
    for path in [
        format!("/v2/{HOSTED}/manifests/{SOME_DIGEST}"),
        format!("/v2/{HOSTED}/manifests/v1"),
        format!("/v2/{HOSTED}/blobs/{SOME_DIGEST}"),
    ] {
        assert_denied(send(&m, "DELETE", &path, Some(&ci)).await, ci_delete).await;
    }

    // A mount needs pull on its source: ci may push to myorg/app, not read secret/app.
    assert_denied(
        send(&m, "POST", &mount(HOSTED, "secret/app"), Some(&ci)).await,
        "user \"ci\" may not pull from secret/app: no auth.access rule grants it",
    )
    .await;

    // The catalog lists every repository: only pull on repos = ["*"] grants it.
    assert_denied(
        send(&m, "GET", "/v2/_catalog", Some(&ci)).await,
        "user \"ci\" may not pull the catalog: no auth.access rule grants it \
         (the catalog needs pull on repos = [\"*\"])",
    )
    .await;

    // Without anonymous_pull, no credentials: the challenge, for pulls as before.
    let anonymous = send(&m, "GET", &format!("/v2/{MIRRORED}/manifests/3.19"), None).await;
    assert_challenge(anonymous, "anonymous pull").await;

    assert!(
        !fake.requests().iter().any(|r| r.path.contains("myorg")),
        "a hosted repository reached the upstream: {:?}",
        fake.requests()
    );
}

#[tokio::test]
async fn without_rules_every_user_pushes_and_deletes_and_without_users_everybody_does() {
    let (fake, _img) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let m = mirror(&fake, dir.path(), false, Vec::new()).await;
    let bob = basic("bob", "bob-pw");
    let writes = [
        ("POST", upload_start(HOSTED)),
        ("POST", mount(HOSTED, MIRRORED)),
        ("PUT", format!("/v2/{HOSTED}/manifests/v1")),
        ("DELETE", format!("/v2/{HOSTED}/manifests/{SOME_DIGEST}")),
        ("DELETE", format!("/v2/{HOSTED}/blobs/{SOME_DIGEST}")),
        ("GET", "/v2/_catalog".to_owned()),
    ];
    for (method, path) in &writes {
        let what = format!("bob: {method} {path}");
        assert_not_refused(send(&m, method, path, Some(&bob)).await, &what).await;
        // Without credentials, still the challenge.
        assert_challenge(send(&m, method, path, None).await, path).await;
    }

    // No [auth]: open, as distribution's registry is.
    let open = Front::start(&fake.url(), |c| {
        c.hosted.repos = vec!["myorg/*".into()];
        c.hosted.delete = true;
    })
    .await;
    assert_eq!(send(&open, "GET", "/v2/", None).await.status(), 200);
    for (method, path) in &writes {
        let what = format!("open: {method} {path}");
        assert_not_refused(send(&open, method, path, None).await, &what).await;
    }
}
