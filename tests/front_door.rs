//! The front door with users and limits: HTTP Basic against htpasswd bcrypt users (the
//! challenge, a pull of many layers, reloads, startup errors, what wrong passwords may cost:
//! bounded bcrypt, per-address backoff, unknown users as slow as known ones), each `server`
//! limit (URL length, head size, connections, header read and idle timeouts), and which
//! token realms may receive the upstream credentials (never logs or error bodies).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::front::{
    after, basic, captured_logs, closed_within, exchange, htpasswd_line, read_response,
    read_until_closed, send_raw, startup_config, startup_error, Front, Reply,
};
use common::images::{sha256_digest, ImageInfo};
use common::observe::Scrape;
use common::{assert_error, header, random_bytes, start_mirror, FakeUpstream};
use regmirror::config::Secret;
use regmirror::server::ServeError;
use reqwest::header::HeaderValue;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;

const REPO: &str = "library/alpine";
const REALM: &str = "test mirror";
const PING: &[u8] = b"GET /v2/ HTTP/1.1\r\nHost: m\r\n\r\n";

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Writes `lines` to `path` atomically (a reader never sees half a file).
fn write_users(path: &Path, lines: &[String]) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, lines.join("\n") + "\n").unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn auth_mirror(fake: &FakeUpstream, htpasswd: &Path) -> Front {
    let path = htpasswd.to_path_buf();
    Front::start(&fake.url(), move |c| {
        c.auth.htpasswd = Some(path);
        c.auth.realm = REALM.into();
    })
    .await
}

/// A client whose connections come from `local` (any 127.x address is this host), so a
/// test can be two clients of the mirror at once.
fn client_from(local: &str) -> reqwest::ClientBuilder {
    let ip: IpAddr = local.parse().unwrap();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(120))
        .local_address(ip)
}

/// An htpasswd line of bcrypt `cost` (the crate's `$2b$`).
fn htpasswd_line_cost(user: &str, password: &str, cost: u32) -> String {
    format!("{user}:{}", bcrypt::hash(password, cost).unwrap())
}

/// `/metrics` as `auth` (a user verified before, so the scrape itself runs no bcrypt).
async fn scrape(m: &Front, auth: &str) -> Scrape {
    let r = send_as(&client(), "GET", &m.http("/metrics"), auth).await;
    assert_eq!(r.status(), 200);
    Scrape::parse(&r.text().await.unwrap())
}

const BCRYPT_RUNS: &str = "regmirror_auth_bcrypt_total";
const REFUSALS: &str = "regmirror_auth_refusals_total";

/// Pulls `img` (its manifest by digest, then every blob at once, each on its own
/// connection, as a client pulling layers does) as `auth`, checking the bytes: how long it took.
async fn timed_pull(m: &Front, img: &ImageInfo, auth: &str) -> Duration {
    let started = Instant::now();
    let url = m.http(&format!("/v2/{REPO}/manifests/{}", img.manifest_digest));
    let r = send_as(&client(), "GET", &url, auth).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), img.manifest);
    let gets = img.blobs().into_iter().map(|(digest, bytes)| {
        let url = m.http(&format!("/v2/{REPO}/blobs/{digest}"));
        async move {
            let r = send_as(&client(), "GET", &url, auth).await;
            assert_eq!(r.status(), 200, "{digest}");
            assert_eq!(r.bytes().await.unwrap(), bytes, "{digest}");
        }
    });
    futures_util::future::join_all(gets).await;
    started.elapsed()
}

/// `method url` with `authorization`.
async fn send_as(c: &reqwest::Client, method: &str, url: &str, auth: &str) -> reqwest::Response {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let req = c.request(method, url).header("authorization", auth);
    req.send().await.unwrap()
}

/// The status of `GET url` as `user`.
async fn status_as(c: &reqwest::Client, url: &str, user: &str, password: &str) -> u16 {
    let auth = basic(user, password);
    send_as(c, "GET", url, &auth).await.status().as_u16()
}

/// htpasswd lines for (user, password) pairs.
fn lines(users: &[(&str, &str)]) -> Vec<String> {
    users.iter().map(|(u, p)| htpasswd_line(u, p)).collect()
}

#[tokio::test]
async fn requests_without_valid_credentials_get_the_basic_challenge() {
    let fake = FakeUpstream::start().await;
    fake.add_image(REPO, "3.19", vec![random_bytes(500, 1)]);
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("htpasswd");
    write_users(&users, &[htpasswd_line("moby", "gordon")]);
    let m = auth_mirror(&fake, &users).await;
    let enc = |s: &[u8]| format!("Basic {}", base64::prelude::BASE64_STANDARD.encode(s));
    let bad: [(&str, Option<String>); 14] = [
        ("no credentials", None),
        ("wrong password", Some(enc(b"moby:wrong"))),
        ("password prefix", Some(enc(b"moby:gordo"))),
        ("empty password", Some(enc(b"moby:"))),
        ("unknown user", Some(enc(b"nobody:gordon"))),
        ("user in another case", Some(enc(b"Moby:gordon"))),
        ("bare scheme", Some("Basic".into())),
        ("not base64", Some("Basic !!!".into())),
        ("no colon", Some(enc(b"mobygordon"))),
        ("trailing junk", Some(enc(b"moby:gordon") + "x")),
        (
            "bearer",
            Some(enc(b"moby:gordon").replace("Basic", "Bearer")),
        ),
        ("digest", Some("Digest username=\"moby\"".into())),
        ("not UTF-8 inside", Some(enc(b"moby:\xff\xfe"))),
        ("huge", Some(format!("Basic {}", "QUFB".repeat(5000)))),
    ];
    let obs_text = HeaderValue::from_bytes(b"Basic \xff\xfe").unwrap();
    let bad = bad
        .into_iter()
        .map(|(what, v)| (what, v.map(|v| HeaderValue::from_str(&v).unwrap())))
        .chain([("obs-text bytes", Some(obs_text))]);
    let c = client();
    let manifest = m.http(&format!("/v2/{REPO}/manifests/3.19"));
    for (what, value) in bad {
        for (method, url) in [
            (reqwest::Method::GET, m.http("/v2/")),
            (reqwest::Method::HEAD, m.http("/v2/")),
            (reqwest::Method::GET, manifest.clone()),
            (reqwest::Method::GET, m.http("/v2/Bad..Name/manifests/-x")),
        ] {
            let mut req = c.request(method.clone(), &url);
            if let Some(v) = &value {
                req = req.header("authorization", v.clone());
            }
            let r = req.send().await.unwrap();
            let ctx = format!("{what}: {method} {url}");
            assert_eq!(
                header(&r, "www-authenticate"),
                format!("Basic realm=\"{REALM}\""),
                "{ctx}"
            );
            assert_eq!(
                header(&r, "docker-distribution-api-version"),
                "registry/2.0",
                "{ctx}"
            );
            if method == reqwest::Method::HEAD {
                assert_eq!(r.status(), 401, "{ctx}");
                assert!(r.bytes().await.unwrap().is_empty(), "{ctx}: HEAD body");
            } else {
                assert_error(r, 401, Some("UNAUTHORIZED")).await;
            }
        }
    }
    assert!(
        fake.requests().is_empty(),
        "forwarded: {:?}",
        fake.requests()
    );
}

#[tokio::test]
async fn right_credentials_pass_on_ping_and_on_a_pull_of_thirty_layers() {
    let fake = FakeUpstream::start().await;
    let layers = (0..30).map(|i| random_bytes(3000 + 97 * i, 200 + i as u64));
    let img = fake.add_image(REPO, "3.19", layers.collect());
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("htpasswd");
    // The operator's tool when it is there (`htpasswd -B`), else the same line from the crate.
    let moby = std::process::Command::new("htpasswd")
        .args(["-Bbn", "-C", "4", "moby", "gordon"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8(o.stdout).unwrap().trim().to_owned())
        .unwrap_or_else(|| htpasswd_line("moby", "gordon"));
    let lines = [
        "# users".to_owned(),
        String::new(),
        moby,
        htpasswd_line("carol", "pa:ss:word"),
    ];
    // CRLF line ends, as an editor on another system leaves them.
    std::fs::write(&users, lines.join("\r\n")).unwrap();
    let m = auth_mirror(&fake, &users).await;
    let c = client();
    assert_eq!(status_as(&c, &m.http("/v2/"), "moby", "gordon").await, 200);
    assert_eq!(
        status_as(&c, &m.http("/v2/"), "carol", "pa:ss:word").await,
        200
    );
    let good = basic("moby", "gordon");
    let lower = good.replacen("Basic", "basic", 1);
    assert_eq!(
        send_as(&c, "GET", &m.http("/v2/"), &lower).await.status(),
        200
    );

    let started = std::time::Instant::now();
    let url = m.http(&format!("/v2/{REPO}/manifests/3.19"));
    let r = send_as(&c, "HEAD", &url, &good).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "docker-content-digest"), img.manifest_digest);
    let url = m.http(&format!("/v2/{REPO}/manifests/{}", img.manifest_digest));
    let r = send_as(&c, "GET", &url, &good).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), img.manifest);
    // Every blob on its own connection, all at once, as a client pulling layers does.
    let gets = img.blobs().into_iter().map(|(digest, bytes)| {
        let url = m.http(&format!("/v2/{REPO}/blobs/{digest}"));
        let auth = good.clone();
        async move {
            let r = send_as(&client(), "GET", &url, &auth).await;
            assert_eq!(r.status(), 200, "{digest}");
            let body = r.bytes().await.unwrap();
            assert_eq!(sha256_digest(&body), digest);
            assert_eq!(body, bytes);
        }
    });
    futures_util::future::join_all(gets).await;
    let took = started.elapsed();
    eprintln!("the manifest and 31 blobs, authenticated, in {took:?}");
    assert_eq!(fake.blob_gets(&img.layer_digests[29]), 1);
    // The clients' credentials are the mirror's business: never passed upstream.
    for seen in fake.requests() {
        let auth = seen.authorization.unwrap_or_default();
        assert!(
            auth.is_empty() || auth.starts_with("Bearer "),
            "upstream got {auth}"
        );
    }
}

#[tokio::test]
async fn htpasswd_changes_apply_without_a_restart_and_a_broken_file_keeps_the_users() {
    let fake = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("htpasswd");
    write_users(&users, &lines(&[("alice", "a1"), ("bob", "b")]));
    let m = auth_mirror(&fake, &users).await;
    let c = client();
    let ping = m.http("/v2/");
    assert_eq!(status_as(&c, &ping, "alice", "a1").await, 200);
    assert_eq!(status_as(&c, &ping, "bob", "b").await, 200);
    assert_eq!(status_as(&c, &ping, "carol", "c").await, 401);

    // Carol added, bob removed, alice's password changed (bob and alice's old password
    // were verified a moment ago, so this also shows the remembered checks do not outlive it).
    write_users(&users, &lines(&[("alice", "a2"), ("carol", "c")]));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let last = loop {
        let got = vec![
            status_as(&c, &ping, "alice", "a2").await,
            status_as(&c, &ping, "alice", "a1").await,
            status_as(&c, &ping, "bob", "b").await,
            status_as(&c, &ping, "carol", "c").await,
        ];
        if got == [200, 401, 401, 200] || std::time::Instant::now() > deadline {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        last,
        [200, 401, 401, 200],
        "alice new, alice old, bob, carol"
    );

    // A line that is not bcrypt: logged, and the users stay as they were. Two and a half
    // poll periods give the watcher every chance to (wrongly) apply it.
    write_users(
        &users,
        &["alice:plaintext".to_owned(), htpasswd_line("eve", "e")],
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(status_as(&c, &ping, "carol", "c").await, 200);
    assert_eq!(status_as(&c, &ping, "alice", "a2").await, 200);
    assert_eq!(status_as(&c, &ping, "eve", "e").await, 401);

    // And the watcher still works after the failed reload.
    write_users(&users, &[htpasswd_line("dave", "d")]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while status_as(&c, &ping, "dave", "d").await != 200 {
        assert!(std::time::Instant::now() < deadline, "dave never accepted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status_as(&c, &ping, "carol", "c").await, 401);
}

#[tokio::test]
async fn htpasswd_lines_that_are_not_bcrypt_stop_startup_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let good = htpasswd_line("moby", "gordon");
    let cases = [
        (
            format!("{good}\nbob:{{SHA}}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n"),
            "line 2",
            "bob",
        ),
        (
            "moby:$apr1$kpBAkp9u$K0Ht7wHGwY1K/ng1iZxW5/\n".to_owned(),
            "line 1",
            "moby",
        ),
        ("moby:rqXexS6ZhobKA\n".to_owned(), "line 1", "moby"),
        (
            format!("# users\n\n{good}\nplain:gordon\n"),
            "line 4",
            "plain",
        ),
        (format!("{good}\njustaname\n"), "line 2", ""),
        (format!("{good}\n:{}\n", &good[5..]), "line 2", ""),
    ];
    for (i, (text, line, user)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("htpasswd-{i}"));
        std::fs::write(&path, text).unwrap();
        let mut config = startup_config(&dir.path().join(format!("data-{i}")));
        config.auth.htpasswd = Some(path.clone());
        let e = startup_error(config).await;
        let msg = e.to_string();
        assert!(matches!(e, ServeError::Htpasswd(_)), "{msg}");
        assert!(msg.contains(*line), "{text:?}: {msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains(user), "{msg}");
    }
    let missing = dir.path().join("no-such-htpasswd");
    let mut config = startup_config(&dir.path().join("data-missing"));
    config.auth.htpasswd = Some(missing.clone());
    let msg = startup_error(config).await.to_string();
    assert!(msg.contains(&missing.display().to_string()), "{msg}");
}

#[tokio::test]
async fn urls_longer_than_max_url_length_are_414_with_a_registry_error() {
    let fake = FakeUpstream::start().await;
    for limit in [1024usize, 8192] {
        let m = start_mirror(&fake.url(), |c| c.server.max_url_length = limit).await;
        // Path and query count: "/v2/" + "?" + query.
        let at = format!("/v2/?{}", "q".repeat(limit - 5));
        assert_eq!(at.len(), limit);
        assert_eq!(
            m.get(&at).await.unwrap().status(),
            200,
            "{limit}: at the limit"
        );
        let over = format!("/v2/?{}", "q".repeat(limit - 4));
        let v = assert_error(m.get(&over).await.unwrap(), 414, Some("NAME_INVALID")).await;
        assert!(v["errors"][0]["detail"]
            .as_str()
            .unwrap()
            .contains(&limit.to_string()));
        let long_path = format!("/v2/{REPO}/manifests/{}", "t".repeat(limit));
        assert_error(m.get(&long_path).await.unwrap(), 414, None).await;
        let r = m.head(&long_path).await.unwrap();
        assert_eq!(r.status(), 414);
        assert!(r.bytes().await.unwrap().is_empty());
    }
    assert!(
        fake.requests().is_empty(),
        "forwarded: {:?}",
        fake.requests()
    );
}

#[tokio::test]
async fn request_heads_over_max_header_size_get_431_and_the_connection_closes() {
    let fake = FakeUpstream::start().await;
    let m = Front::start(&fake.url(), |c| c.server.max_header_size.0 = 8192).await;
    let head = |extra: String| format!("GET /v2/ HTTP/1.1\r\nHost: m\r\n{extra}\r\n");
    let many: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    let long_url = format!("GET /v2/?{} HTTP/1.1\r\nHost: m\r\n\r\n", "q".repeat(8300));
    for (what, req) in [
        (
            "one 9 KB header",
            head(format!("X-Big: {}\r\n", "b".repeat(9000))),
        ),
        ("150 headers", head(many)),
        ("8 KB URL", long_url),
    ] {
        let mut s = TcpStream::connect(m.addr).await.unwrap();
        let _ = s.write_all(req.as_bytes()).await;
        let (raw, open) = read_until_closed(&mut s, after(10)).await;
        let text = String::from_utf8_lossy(&raw);
        // hyper answers a head past its buffer (or past 100 headers) itself, then closes.
        assert!(text.starts_with("HTTP/1.1 431 "), "{what}: {text:?}");
        assert!(!open, "{what}: the connection stayed open after 431");
    }
    // Just under the limit is served.
    let fits = head(format!(
        "X-Big: {}\r\nConnection: close\r\n",
        "b".repeat(7000)
    ));
    let r = exchange(m.addr, fits.as_bytes(), Duration::from_secs(10)).await;
    assert_eq!(r.status(), Some(200), "{r:?}");
}

/// At `max_connections` a new client is not left in the backlog: the oldest idle keep-alive
/// connection is closed for it, and the others go on being served. (When every connection is
/// busy, new ones wait: `connections::tests::at_the_cap_the_oldest_idle_connection_is_closed_and_busy_ones_never`.)
#[tokio::test]
async fn past_max_connections_the_oldest_idle_connection_makes_room() {
    let fake = FakeUpstream::start().await;
    let m = Front::start(&fake.url(), |c| c.server.max_connections = 2).await;
    let limit = Duration::from_secs(10);
    let mut a = send_raw(m.addr, PING).await;
    assert_eq!(read_response(&mut a, limit).await.0, 200);
    let mut b = send_raw(m.addr, PING).await;
    assert_eq!(read_response(&mut b, limit).await.0, 200);
    // Keeps b the younger idle one.
    tokio::time::sleep(Duration::from_millis(50)).await;
    b.write_all(PING).await.unwrap();
    assert_eq!(read_response(&mut b, limit).await.0, 200);

    let mut third = send_raw(m.addr, PING).await;
    assert_eq!(
        read_response(&mut third, limit).await.0,
        200,
        "served at once"
    );
    let (_, open) = read_until_closed(&mut a, after(2)).await;
    assert!(!open, "the oldest idle connection was closed for it");
    b.write_all(PING).await.unwrap();
    assert_eq!(read_response(&mut b, limit).await.0, 200);
}

#[tokio::test]
async fn request_heads_not_finished_within_header_read_timeout_are_cut_off() {
    let fake = FakeUpstream::start().await;
    let m = Front::start(&fake.url(), |c| {
        c.server.header_read_timeout = Duration::from_secs(1);
        c.server.idle_timeout = Duration::from_secs(60);
    })
    .await;
    // Half a head, then silence.
    let mut s = send_raw(m.addr, b"GET /v2/ HTTP/1.1\r\nHost: x\r\n").await;
    let started = std::time::Instant::now();
    let (raw, open) = read_until_closed(&mut s, after(5)).await;
    assert!(!open, "half a request head kept the connection for 5 s");
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "closed too early"
    );
    assert!(
        raw.is_empty(),
        "hyper sends nothing on a header timeout: {raw:?}"
    );

    // A slowloris: a header line every 200 ms keeps traffic flowing but never ends the head.
    let s = send_raw(m.addr, b"GET /v2/ HTTP/1.1\r\nHost: x\r\n").await;
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        for i in 0..40 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if wr
                .write_all(format!("X-{i}: y\r\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let mut sink = [0u8; 256];
    let cut = tokio::time::timeout(Duration::from_secs(5), async {
        while tokio::io::AsyncReadExt::read(&mut rd, &mut sink)
            .await
            .is_ok_and(|n| n > 0)
        {}
    })
    .await;
    assert!(cut.is_ok(), "a trickled head kept the connection for 5 s");
    writer.abort();

    // A whole request within the timeout is served.
    let whole = b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let r = exchange(m.addr, whole, Duration::from_secs(10)).await;
    assert_eq!(r.status(), Some(200));
}

/// A client that connects and never sends a byte has not sent its request head in time
/// either: it must not hold one of `max_connections` for the whole `idle_timeout`.
#[tokio::test]
async fn a_connection_that_sends_nothing_is_cut_off_after_header_read_timeout() {
    let fake = FakeUpstream::start().await;
    let m = Front::start(&fake.url(), |c| {
        c.server.header_read_timeout = Duration::from_secs(1);
        c.server.idle_timeout = Duration::from_secs(60);
    })
    .await;
    let mut s = TcpStream::connect(m.addr).await.unwrap();
    let closed = closed_within(&mut s, Duration::from_secs(5)).await;
    assert!(
        closed.is_some(),
        "a silent connection was still open after 5 s (header_read_timeout 1 s)"
    );
}

#[tokio::test]
async fn connections_without_traffic_for_idle_timeout_are_closed() {
    let fake = FakeUpstream::start().await;
    let size = 24 * 1024 * 1024;
    let blob = random_bytes(size, 9);
    let digest = fake.add_blob(REPO, blob.clone());
    let m = Front::start(&fake.url(), |c| {
        c.server.idle_timeout = Duration::from_secs(1);
        c.server.header_read_timeout = Duration::from_secs(30);
    })
    .await;
    let limit = Duration::from_secs(10);

    // Traffic every 400 ms keeps one connection open well past the timeout.
    let mut s = send_raw(m.addr, b"").await;
    for _ in 0..8 {
        s.write_all(PING).await.unwrap();
        assert_eq!(read_response(&mut s, limit).await.0, 200);
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    // Then silence closes it.
    let closed = closed_within(&mut s, Duration::from_secs(5)).await;
    assert!(
        closed.is_some(),
        "an idle keep-alive connection stayed open for 5 s"
    );

    // A client that stops reading a large body is as idle as one that sends nothing.
    let req = cache_blob(&m, &digest, size).await;
    let mut s = send_raw(m.addr, req.as_bytes()).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_cut_short(&mut s, size, "stalled 4 s (idle_timeout 1 s)").await;
}

/// GETs the blob once so it is cached; the raw request for it.
async fn cache_blob(m: &Front, digest: &str, size: usize) -> String {
    let url = m.http(&format!("/v2/{REPO}/blobs/{digest}"));
    let cached = client().get(&url).send().await.unwrap().bytes().await;
    assert_eq!(cached.unwrap().len(), size);
    format!("GET /v2/{REPO}/blobs/{digest} HTTP/1.1\r\nHost: m\r\n\r\n")
}

/// Reads what the stalled client's socket still holds: the connection must then be closed,
/// short of the whole blob.
async fn assert_cut_short(s: &mut TcpStream, size: usize, what: &str) {
    let (raw, open) = read_until_closed(s, after(20)).await;
    assert!(
        !open,
        "{what}: the stalled reader's connection is still open"
    );
    let got = Reply::Status(200, raw).body().len();
    assert!(got < size, "{what}: still got all {size} bytes");
}

/// A client that never reads the blob it asked for, with a second request pipelined behind
/// the first so hyper has no reason to poll the socket for reads: the stalled write alone
/// must end the connection after `idle_timeout`, free its slot, and leave others served.
#[tokio::test]
async fn a_client_that_never_reads_its_blob_is_cut_after_idle_timeout() {
    let fake = FakeUpstream::start().await;
    let size = 64 * 1024 * 1024;
    let digest = fake.add_blob(REPO, random_bytes(size, 14));
    let m = Front::start(&fake.url(), |c| {
        c.server.idle_timeout = Duration::from_secs(1);
        c.server.header_read_timeout = Duration::from_secs(30);
        c.server.max_connections = 2;
    })
    .await;
    let limit = Duration::from_secs(10);
    let req = cache_blob(&m, &digest, size).await;
    let mut stalled = send_raw(
        m.addr,
        (req + std::str::from_utf8(PING).unwrap()).as_bytes(),
    )
    .await;

    // The other slot: a keep-alive client served every 300 ms throughout (so it never idles).
    let mut other = send_raw(m.addr, PING).await;
    assert_eq!(read_response(&mut other, limit).await.0, 200);
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let pinger = tokio::spawn(async move {
        loop {
            other.write_all(PING).await.unwrap();
            assert_eq!(read_response(&mut other, limit).await.0, 200);
            tokio::select! {
                _ = &mut stopped => return,
                () = tokio::time::sleep(Duration::from_millis(300)) => {}
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Both slots were taken; a third connection is served only once the stalled one is gone.
    let whole = b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let third = exchange(m.addr, whole, Duration::from_secs(5)).await;
    assert_eq!(
        third.status(),
        Some(200),
        "the stalled reader still holds its connection slot: {third:?}"
    );
    stop.send(()).unwrap();
    pinger.await.unwrap();

    // Reading now gets what the socket buffers held, then the end: not the whole blob.
    assert_cut_short(&mut stalled, size, "stalled 3 s (idle_timeout 1 s)").await;
}

/// A browser pointed at the mirror must never sniff a blob (bytes the upstream chose) or an
/// error into HTML: every kind of answer says `nosniff`, hits, misses, errors and the operator
/// endpoints alike.
#[tokio::test]
async fn every_response_says_nosniff() {
    let fake = FakeUpstream::start().await;
    let html = b"<html><script>alert(1)</script></html>".to_vec();
    let img = fake.add_image(REPO, "v1", vec![html]);
    let m = Front::start(&fake.url(), |_| {}).await;
    let layer = format!("/v2/{REPO}/blobs/{}", img.layer_digests[0]);
    let long = format!("/v2/{}", "a".repeat(9000));
    let c = client();
    for (method, path, status) in [
        ("GET", "/v2/", 200),
        ("GET", &format!("/v2/{REPO}/manifests/v1") as &str, 200),
        ("GET", &layer, 200),
        ("GET", &layer, 200),
        ("HEAD", &layer, 200),
        ("GET", &format!("/v2/{REPO}/manifests/nope"), 404),
        ("GET", "/v2/no/such/thing/", 404),
        ("GET", &long, 414),
        ("GET", "/metrics", 200),
        ("GET", "/healthz", 200),
        ("GET", "/readyz", 200),
        ("GET", "/_/status", 200),
    ] {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let r = c
            .request(method.clone(), m.http(path))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{method} {path}");
        assert_eq!(
            header(&r, "x-content-type-options"),
            "nosniff",
            "{method} {path} ({status})"
        );
    }
}

#[tokio::test]
async fn upstream_credentials_go_only_to_allowed_token_hosts_and_never_into_logs() {
    const USER: &str = "mirror-bot";
    const PASSWORD: &str = "dckr_pat_S3cr3t-Never-Logged";
    let logs = captured_logs();
    let fake = FakeUpstream::start().await;
    fake.add_image(REPO, "1", vec![random_bytes(700, 11)]);
    // The fake's challenge names its realm as http://127.0.0.1:PORT/token; reaching the
    // upstream as localhost puts that realm on another host string.
    let as_localhost = fake.url().replace("127.0.0.1", "localhost");
    let creds = |c: &mut regmirror::config::Config| {
        c.upstream.username = Some(USER.into());
        c.upstream.password = Some(Secret::new(PASSWORD));
    };
    let (local, both) = (vec!["127.0.0.1"], vec!["EXAMPLE.org", "127.0.0.1"]);
    let cases = [
        ("realm on another host", &as_localhost, vec![], false),
        ("that host allowed", &as_localhost, local, true),
        ("among other hosts", &as_localhost, both, true),
        ("realm on the upstream's host", &fake.url(), vec![], true),
    ];
    for (what, upstream, hosts, sent) in cases {
        fake.reset_counts();
        let m = start_mirror(upstream, |c| {
            creds(c);
            c.upstream.credential_hosts = hosts.iter().map(|h| h.to_string()).collect();
        })
        .await;
        m.get_ok(&format!("/v2/{REPO}/manifests/1")).await;
        let fetches = fake.token_fetches();
        assert!(!fetches.is_empty(), "{what}: no token fetched");
        for f in &fetches {
            let expected = sent.then(|| (USER.to_owned(), PASSWORD.to_owned()));
            assert_eq!(f.basic, expected, "{what}");
        }
    }

    // The realm refuses these credentials: the client learns it, not the password.
    fake.set(|f| f.credentials = Some((USER.into(), "another".into())));
    fake.add_image(REPO, "2", vec![random_bytes(700, 12)]);
    let m = start_mirror(&fake.url(), creds).await;
    let r = m.get(&format!("/v2/{REPO}/manifests/2")).await.unwrap();
    let status = r.status();
    let body = r.text().await.unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(!body.contains(PASSWORD), "{body}");

    let mut config = common::test_config(Path::new("/nonexistent"), &fake.url());
    creds(&mut config);
    let debug = format!("{config:?}");
    assert!(!debug.contains(PASSWORD) && debug.contains("<redacted>"));

    let logs = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(
        logs.contains("another host"),
        "the capture saw the mirror's warnings"
    );
    let b64 = base64::prelude::BASE64_STANDARD.encode(format!("{USER}:{PASSWORD}"));
    assert!(
        !logs.contains(PASSWORD) && !logs.contains(&b64),
        "credentials in the log"
    );
}

#[tokio::test]
async fn upstream_credentials_are_not_sent_to_a_token_realm_on_another_port() {
    const USER: &str = "mirror-bot";
    const PASSWORD: &str = "same-host-other-port";
    let fake = FakeUpstream::start().await;
    fake.add_image(REPO, "1", vec![random_bytes(700, 21)]);
    // The mirror reaches the fake through a proxy on another port of 127.0.0.1; the fake's
    // challenge still names http://127.0.0.1:<its own port>/token: same host, another port,
    // so possibly another service on that host.
    let proxy = common::observe::RatelimitProxy::start(&fake.url()).await;
    let m = start_mirror(&proxy.url(), |c| {
        c.upstream.username = Some(USER.into());
        c.upstream.password = Some(Secret::new(PASSWORD));
    })
    .await;
    m.get_ok(&format!("/v2/{REPO}/manifests/1")).await;
    let fetches = fake.token_fetches();
    assert!(!fetches.is_empty(), "no token fetched");
    for f in &fetches {
        assert_eq!(f.basic, None, "credentials went to a realm on another port");
    }

    // Named with its port in credential_hosts, that realm receives them.
    fake.reset_counts();
    let realm_host = fake.url().trim_start_matches("http://").to_owned();
    let m = start_mirror(&proxy.url(), |c| {
        c.upstream.username = Some(USER.into());
        c.upstream.password = Some(Secret::new(PASSWORD));
        c.upstream.credential_hosts = vec![realm_host];
    })
    .await;
    m.get_ok(&format!("/v2/{REPO}/manifests/1")).await;
    let fetches = fake.token_fetches();
    assert!(!fetches.is_empty(), "no token fetched");
    for f in &fetches {
        assert_eq!(f.basic, Some((USER.to_owned(), PASSWORD.to_owned())));
    }
}

#[tokio::test]
async fn credentials_on_an_open_mirror_are_warned_about_and_used_only_for_credentials_for() {
    const USER: &str = "org-bot";
    const PASSWORD: &str = "scoped-password";
    let logs = captured_logs();
    let fake = FakeUpstream::start().await;
    fake.add_image("myorg/app", "1", vec![random_bytes(700, 31)]);
    fake.add_image(REPO, "1", vec![random_bytes(700, 32)]);
    let m = start_mirror(&fake.url(), |c| {
        c.upstream.name = "open-creds.example".into();
        c.upstream.username = Some(USER.into());
        c.upstream.password = Some(Secret::new(PASSWORD));
        c.upstream.credentials_for = vec!["myorg/*".into()];
    })
    .await;
    let logs = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    let warning = logs
        .lines()
        .find(|l| l.contains("upstream open-creds.example has credentials"))
        .unwrap_or_else(|| panic!("no startup warning in:\n{logs}"));
    assert!(warning.contains("WARN"), "{warning}");
    assert!(warning.contains("[auth] is off") && warning.contains("auth.htpasswd"));

    m.get_ok("/v2/myorg/app/manifests/1").await;
    m.get_ok(&format!("/v2/{REPO}/manifests/1")).await;
    let fetches = fake.token_fetches();
    let basic_for = |repo: &str| {
        let scope = format!("repository:{repo}:pull");
        let f: Vec<_> = fetches
            .iter()
            .filter(|f| f.scope.as_deref() == Some(scope.as_str()))
            .collect();
        assert!(!f.is_empty(), "no token fetched for {repo}: {fetches:?}");
        f.iter().map(|f| f.basic.clone()).collect::<Vec<_>>()
    };
    let creds = Some((USER.to_owned(), PASSWORD.to_owned()));
    assert!(basic_for("myorg/app").iter().all(|b| *b == creds));
    assert!(
        basic_for(REPO).iter().all(Option::is_none),
        "credentials used for a repository outside credentials_for"
    );
}
/// The reviewer's attack: hundreds of wrong passwords for a real user at once (here over one
/// HTTP/2 connection) ran one bcrypt each on the blocking pool that also serves the disk, and
/// an authenticated warm pull of 30 layers took 8.7 s instead of 0.33 s. Now bcrypt runs on two
/// threads of its own, and the attacking address gets `max_failures` checks, then 429s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_wrong_passwords_runs_few_bcrypts_and_does_not_stall_a_users_pull() {
    let fake = FakeUpstream::start().await;
    let layers = (0..30).map(|i| random_bytes(3000 + 97 * i, 300 + i as u64));
    let img = fake.add_image(REPO, "3.19", layers.collect());
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("htpasswd");
    // Cost 8: what a flood costs shows on a debug build as it would in production at 10 and up.
    write_users(&users, &[htpasswd_line_cost("moby", "gordon", 8)]);
    let m = auth_mirror(&fake, &users).await;
    let good = basic("moby", "gordon");

    // Warm: every blob cached, moby's credentials verified (the one bcrypt of the user).
    timed_pull(&m, &img, &good).await;
    let alone = timed_pull(&m, &img, &good).await;
    let before = scrape(&m, &good).await;

    // 200 wrong passwords, all different (so no outcome is shared), from another address.
    let attacker = client_from("127.0.0.2")
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let ping = m.http("/v2/");
    let flood = (0..200).map(|i| {
        let (c, url) = (attacker.clone(), ping.clone());
        tokio::spawn(async move {
            let auth = basic("moby", &format!("guess-{i}"));
            let r = send_as(&c, "GET", &url, &auth).await;
            (r.status().as_u16(), header(&r, "retry-after"))
        })
    });
    let flood: Vec<_> = flood.collect();
    let flooded = timed_pull(&m, &img, &good).await;
    let mut statuses = std::collections::BTreeMap::new();
    for answer in futures_util::future::join_all(flood).await {
        let (status, retry_after) = answer.unwrap();
        if status == 429 {
            let secs: u64 = retry_after.parse().unwrap();
            assert!((1..=60).contains(&secs), "Retry-After: {retry_after}");
        }
        *statuses.entry(status).or_insert(0) += 1;
    }
    let after = scrape(&m, &good).await;
    eprintln!("pull alone {alone:?}, during the flood {flooded:?}; flood answers {statuses:?}");

    // Counts first: they cannot flake. The default auth.max_failures is 10.
    let bcrypts = after.get(BCRYPT_RUNS, &[]) - before.get(BCRYPT_RUNS, &[]);
    assert_eq!(bcrypts, 10.0, "bcrypt runs for 200 wrong passwords");
    assert_eq!(statuses, [(401, 10), (429, 190)].into_iter().collect());
    let refused = |s: &Scrape, reason| s.get(REFUSALS, &[("reason", reason)]);
    assert_eq!(
        refused(&after, "backoff") - refused(&before, "backoff"),
        190.0
    );
    assert_eq!(
        refused(&after, "invalid") - refused(&before, "invalid"),
        10.0
    );
    // The issue asks for at most twice the time alone; a loaded 2-core machine gets a margin.
    // Before the fix this pull waited behind 200 bcrypts of cost 8 (tens of seconds of CPU).
    let bound = alone * 3 + Duration::from_secs(2);
    assert!(
        flooded <= bound,
        "pull during the flood took {flooded:?}, alone {alone:?}"
    );
}

/// A second address is another client: past its failures it is refused even the right
/// password (that would need a bcrypt) until the window ends, while credentials it verified
/// before and every other address are served as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_past_its_failures_gets_429_until_the_window_ends_and_others_do_not() {
    let fake = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("htpasswd");
    write_users(
        &users,
        &lines(&[("moby", "gordon"), ("carol", "c"), ("alice", "a")]),
    );
    let path = users.clone();
    let m = Front::start(&fake.url(), move |c| {
        c.auth.htpasswd = Some(path);
        c.auth.max_failures = 3;
        c.auth.failure_window = Duration::from_secs(3);
    })
    .await;
    let ping = m.http("/v2/");
    let attacker = client_from("127.0.0.2").build().unwrap();
    let user = client_from("127.0.0.1").build().unwrap();
    assert_eq!(status_as(&attacker, &ping, "moby", "gordon").await, 200);
    for i in 0..3 {
        let wrong = format!("wrong-{i}");
        assert_eq!(status_as(&attacker, &ping, "moby", &wrong).await, 401);
    }
    // The same wrong password again is known wrong: 401, no check, nothing more held against it.
    assert_eq!(status_as(&attacker, &ping, "moby", "wrong-0").await, 401);
    let r = send_as(&attacker, "GET", &ping, &basic("carol", "c")).await;
    assert_eq!(r.status(), 429);
    let retry: u64 = header(&r, "retry-after").parse().unwrap();
    assert!((1..=3).contains(&retry), "Retry-After {retry}");
    assert_error(r, 429, Some("TOOMANYREQUESTS")).await;
    assert_eq!(
        status_as(&attacker, &ping, "moby", "gordon").await,
        200,
        "verified before the backoff"
    );
    // Another address is not held back (alice needs a check, and gets it).
    assert_eq!(status_as(&user, &ping, "alice", "a").await, 200);
    assert_eq!(status_as(&user, &ping, "moby", "wrong-9").await, 401);

    // The window ends (3 s after the attacker's first check): carol is let in from there too.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = status_as(&attacker, &ping, "carol", "c").await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 429);
        assert!(Instant::now() < deadline, "still refused after 20 s");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let s = scrape(&m, &basic("moby", "gordon")).await;
    // moby, three wrong, alice, wrong-9, carol at last.
    assert_eq!(s.get(BCRYPT_RUNS, &[]), 7.0, "{}", s.show("regmirror_auth"));
}

/// An unknown user was refused at once and a known one after a bcrypt, so the time of a
/// refusal told which user names exist. Now an unknown user is checked against a dummy hash
/// of the file's cost: counted as a bcrypt, and about as slow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_users_refusal_costs_a_bcrypt_like_a_known_users() {
    let fake = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("htpasswd");
    write_users(
        &users,
        &[
            htpasswd_line_cost("moby", "gordon", 8),
            htpasswd_line_cost("carol", "c", 8),
        ],
    );
    let path = users.clone();
    let m = Front::start(&fake.url(), move |c| {
        c.auth.htpasswd = Some(path);
        c.auth.max_failures = 0;
    })
    .await;
    let c = client();
    let ping = m.http("/v2/");
    assert_eq!(status_as(&c, &ping, "moby", "gordon").await, 200);
    let base = scrape(&m, &basic("moby", "gordon"))
        .await
        .get(BCRYPT_RUNS, &[]);
    // Alternating, each password new, so neither kind gets a quieter moment of the machine.
    let (mut known, mut unknown) = (Vec::new(), Vec::new());
    for i in 0..5 {
        for (user, times) in [("carol", &mut known), ("nobody", &mut unknown)] {
            let started = Instant::now();
            assert_eq!(status_as(&c, &ping, user, &format!("p{i}")).await, 401);
            times.push(started.elapsed());
        }
    }
    let runs = scrape(&m, &basic("moby", "gordon"))
        .await
        .get(BCRYPT_RUNS, &[])
        - base;
    assert_eq!(runs, 10.0, "one bcrypt per refusal, unknown users included");
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (known, unknown) = (median(&mut known), median(&mut unknown));
    eprintln!("median refusal: known user {known:?}, unknown user {unknown:?}");
    // Before the fix the unknown user's refusal took a fraction of a millisecond against tens
    // of milliseconds; a ratio of 4 either way is far from both.
    assert!(
        unknown * 4 >= known && known * 4 >= unknown,
        "known {known:?}, unknown {unknown:?}"
    );
}

/// An htpasswd file that disappears (a botched deploy, a volume unmounted) is an error in the
/// log, and its users stay as they were: no user list would lock everyone out, and no file
/// would open the mirror. The file is read again when it is back.
#[tokio::test]
async fn an_htpasswd_file_that_disappears_is_logged_and_its_users_are_kept() {
    let logs = captured_logs();
    let fake = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("htpasswd");
    write_users(&users, &lines(&[("alice", "a1")]));
    let m = auth_mirror(&fake, &users).await;
    let c = client();
    let ping = m.http("/v2/");
    assert_eq!(status_as(&c, &ping, "alice", "a1").await, 200);
    std::fs::remove_file(&users).unwrap();
    let said = |logs: &std::sync::Arc<std::sync::Mutex<Vec<u8>>>| {
        String::from_utf8_lossy(&logs.lock().unwrap())
            .lines()
            .any(|l| l.contains("htpasswd file is gone") && l.contains("ERROR"))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !said(&logs) {
        assert!(
            Instant::now() < deadline,
            "no error logged for the missing file"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status_as(&c, &ping, "alice", "a1").await, 200, "kept");
    assert_eq!(status_as(&c, &ping, "bob", "b").await, 401);
    write_users(&users, &lines(&[("bob", "b")]));
    let deadline = Instant::now() + Duration::from_secs(10);
    while status_as(&c, &ping, "bob", "b").await != 200 {
        assert!(
            Instant::now() < deadline,
            "the file that came back was not read"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
