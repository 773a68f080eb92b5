//! HTTPS on the listener, in process: RSA and ECDSA keys in each PEM form, a chain with an
//! intermediate, ALPN (HTTP/2 or HTTP/1.1 as the client offers), untrusting clients refused,
//! certificates replaced on disk or by SIGHUP reaching new connections while open ones keep
//! theirs, broken files (at startup an error naming the file, at reload the old certificate
//! kept), the handshake deadline, and a certificate near its expiry (logged, on `/metrics`
//! and the status page). Certificates are made with the `openssl` CLI.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::front::{captured_logs, read_until_closed, startup_config, startup_error, Front};
use common::{random_bytes, FakeUpstream};
use regmirror::server::ServeError;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;

const REPO: &str = "library/alpine";

/// The private key flavours an operator's files come in, and the command making each
/// (into the file `KEY`).
#[derive(Debug, Clone, Copy)]
enum Key {
    /// `BEGIN PRIVATE KEY`, RSA.
    RsaPkcs8,
    /// `BEGIN RSA PRIVATE KEY`.
    RsaPkcs1,
    /// `BEGIN PRIVATE KEY`, P-256.
    EcPkcs8,
    /// `BEGIN EC PRIVATE KEY`.
    EcSec1,
}

impl Key {
    fn pem_label(self) -> &'static str {
        match self {
            Key::RsaPkcs8 | Key::EcPkcs8 => "-----BEGIN PRIVATE KEY-----",
            Key::RsaPkcs1 => "-----BEGIN RSA PRIVATE KEY-----",
            Key::EcSec1 => "-----BEGIN EC PRIVATE KEY-----",
        }
    }

    fn command(self) -> &'static str {
        match self {
            Key::RsaPkcs8 => "genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out KEY",
            Key::RsaPkcs1 => "genrsa -traditional -out KEY 2048",
            Key::EcPkcs8 => "genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out KEY",
            Key::EcSec1 => "ecparam -name prime256v1 -genkey -noout -out KEY",
        }
    }
}

/// A certificate file, its key file, and the PEM a client must trust to accept it.
struct Cert {
    cert: PathBuf,
    key: PathBuf,
    trust: Vec<u8>,
}

/// Runs `openssl` with the space-separated `args` in `dir` (file names are relative to it).
fn openssl(dir: &Path, args: &str) {
    let out = Command::new("openssl")
        .args(args.split(' '))
        .current_dir(dir)
        .output()
        .expect("run openssl");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "openssl {args}: {err}");
}

/// How long test certificates are valid: far from the expiry warning.
const DAYS: u32 = 90;

/// `NAME.key` of `kind`, and `NAME.crt` signed by `ca` (self-signed when `None`) with `ext`.
fn issue(dir: &Path, name: &str, kind: Key, ca: Option<&str>, ext: &str) {
    issue_for(dir, name, kind, ca, ext, DAYS);
}

/// [`issue`], valid for `days` from now.
fn issue_for(dir: &Path, name: &str, kind: Key, ca: Option<&str>, ext: &str, days: u32) {
    std::fs::create_dir_all(dir).unwrap();
    openssl(dir, &kind.command().replace("KEY", &format!("{name}.key")));
    std::fs::write(dir.join(format!("{name}.ext")), ext.replace(';', "\n")).unwrap();
    let csr = format!("req -new -key {name}.key -subj /CN={name} -out {name}.csr");
    openssl(dir, &csr);
    let serial = rand::random::<u32>();
    let signer = match ca {
        Some(ca) => format!("-CA {ca}.crt -CAkey {ca}.key -set_serial {serial}"),
        None => format!("-key {name}.key -set_serial {serial}"),
    };
    let x509 = format!(
        "x509 -req -in {name}.csr {signer} -days {days} -extfile {name}.ext -out {name}.crt"
    );
    openssl(dir, &x509);
}

const LEAF: &str = "basicConstraints=critical,CA:FALSE;extendedKeyUsage=serverAuth;\
subjectAltName=IP:127.0.0.1,DNS:localhost";
const CA: &str = "basicConstraints=critical,CA:TRUE;keyUsage=critical,keyCertSign,cRLSign";

/// A self-signed server certificate for 127.0.0.1 and localhost. `CA:FALSE`, because
/// rustls (webpki) refuses a CA certificate as the server's own.
fn self_signed(dir: &Path, name: &str, kind: Key) -> Cert {
    self_signed_for(dir, name, kind, DAYS)
}

/// [`self_signed`], valid for `days` from now.
fn self_signed_for(dir: &Path, name: &str, kind: Key, days: u32) -> Cert {
    issue_for(dir, name, kind, None, LEAF, days);
    let cert = dir.join(format!("{name}.crt"));
    let trust = std::fs::read(&cert).unwrap();
    let key = dir.join(format!("{name}.key"));
    Cert { cert, key, trust }
}

/// Root CA → intermediate CA → leaf (RSA). The certificate file holds leaf and intermediate
/// (`with_intermediate`) or the leaf alone; clients trust the root only.
fn chained(dir: &Path, with_intermediate: bool) -> Cert {
    issue(dir, "root", Key::EcPkcs8, None, CA);
    issue(dir, "intermediate", Key::EcSec1, Some("root"), CA);
    issue(dir, "leaf", Key::RsaPkcs8, Some("intermediate"), LEAF);
    let mut pem = std::fs::read(dir.join("leaf.crt")).unwrap();
    if with_intermediate {
        pem.extend(std::fs::read(dir.join("intermediate.crt")).unwrap());
    }
    let cert = dir.join("served.crt");
    std::fs::write(&cert, pem).unwrap();
    let trust = std::fs::read(dir.join("root.crt")).unwrap();
    Cert {
        cert,
        key: dir.join("leaf.key"),
        trust,
    }
}

/// A client that trusts exactly `trust` (PEM certificates); HTTP/1.1 only when `http1`.
fn client(trust: &[&[u8]], http1: bool) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .no_proxy()
        .timeout(Duration::from_secs(10));
    for pem in trust {
        b = b.add_root_certificate(reqwest::Certificate::from_pem(pem).unwrap());
    }
    if http1 {
        b = b.http1_only();
    }
    b.build().unwrap()
}

async fn tls_mirror(upstream: &str, cert: &Path, key: &Path) -> Front {
    let (cert, key) = (cert.to_path_buf(), key.to_path_buf());
    Front::start(upstream, move |c| {
        c.tls.cert = Some(cert);
        c.tls.key = Some(key);
    })
    .await
}

/// Moves `from`'s certificate and key over `to`'s files (each by an atomic rename).
fn replace(from: &Cert, to: &Cert) {
    for (src, dst) in [(&from.key, &to.key), (&from.cert, &to.cert)] {
        let tmp = dst.with_extension("incoming");
        std::fs::copy(src, &tmp).unwrap();
        std::fs::rename(&tmp, dst).unwrap();
    }
}

/// Waits (at most 10 s) until a new connection of a client trusting only `trust` is served.
async fn wait_served_to(m: &Front, trust: &[u8], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // A new client each time: no pooled connection may answer for the new certificate.
        match client(&[trust], false).get(m.https("/v2/")).send().await {
            Ok(r) if r.status() == 200 => return,
            other => assert!(Instant::now() < deadline, "{what}: never served: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn https_serves_rsa_and_ecdsa_keys_over_h2_or_http1_as_the_client_offers() {
    let fake = FakeUpstream::start().await;
    let img = fake.add_image(REPO, "3.19", vec![random_bytes(40_000, 1)]);
    let dir = tempfile::tempdir().unwrap();
    let stranger = self_signed(dir.path(), "stranger", Key::EcPkcs8);
    for kind in [Key::RsaPkcs8, Key::RsaPkcs1, Key::EcPkcs8, Key::EcSec1] {
        let cert = self_signed(dir.path(), &format!("{kind:?}"), kind);
        let pem = std::fs::read_to_string(&cert.key).unwrap();
        assert!(pem.starts_with(kind.pem_label()), "{kind:?}: {pem}");
        let m = tls_mirror(&fake.url(), &cert.cert, &cert.key).await;
        let r = client(&[&cert.trust], false)
            .get(m.https("/v2/"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{kind:?}");
        assert_eq!(r.version(), reqwest::Version::HTTP_2, "{kind:?}: ALPN h2");
        let r = client(&[&cert.trust], true)
            .get(m.https("/v2/"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{kind:?}");
        assert_eq!(
            r.version(),
            reqwest::Version::HTTP_11,
            "{kind:?}: ALPN http/1.1"
        );
        // A pull over each protocol.
        for http1 in [false, true] {
            let c = client(&[&cert.trust], http1);
            let url = m.https(&format!("/v2/{REPO}/manifests/3.19"));
            let r = c.get(url).send().await.unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(r.bytes().await.unwrap(), img.manifest);
            let url = m.https(&format!("/v2/{REPO}/blobs/{}", img.layer_digests[0]));
            assert_eq!(
                c.get(url).send().await.unwrap().bytes().await.unwrap(),
                img.layers[0]
            );
        }
        // Clients that do not trust it fail the handshake.
        for (who, trust) in [
            ("no roots", vec![]),
            ("another cert", vec![&stranger.trust[..]]),
        ] {
            let e = client(&trust, false)
                .get(m.https("/v2/"))
                .send()
                .await
                .unwrap_err();
            assert!(e.is_connect(), "{kind:?}, {who}: {e:?}");
        }
    }
}

#[tokio::test]
async fn a_chain_with_an_intermediate_is_served_whole() {
    let fake = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let chain = chained(&dir.path().join("full"), true);
    let m = tls_mirror(&fake.url(), &chain.cert, &chain.key).await;
    for http1 in [false, true] {
        let r = client(&[&chain.trust], http1)
            .get(m.https("/v2/"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // Control: without the intermediate in the file, a client trusting the root cannot
    // build the chain, so it was the file's intermediate that made the difference above.
    let leaf_only = chained(&dir.path().join("leaf"), false);
    let m = tls_mirror(&fake.url(), &leaf_only.cert, &leaf_only.key).await;
    let e = client(&[&leaf_only.trust], false)
        .get(m.https("/v2/"))
        .send()
        .await;
    assert!(e.is_err(), "leaf without intermediate accepted: {e:?}");
}

#[tokio::test]
async fn a_replaced_certificate_reaches_new_connections_while_open_ones_keep_theirs() {
    let fake = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let old = self_signed(dir.path(), "old", Key::EcPkcs8);
    let new = self_signed(dir.path(), "new", Key::RsaPkcs8);
    let live = Cert {
        cert: dir.path().join("live.crt"),
        key: dir.path().join("live.key"),
        trust: vec![],
    };
    replace(&old, &live);
    let m = tls_mirror(&fake.url(), &live.cert, &live.key).await;
    // Connections opened before the change, one per protocol, kept alive in the pools.
    let (h2, h1) = (client(&[&old.trust], false), client(&[&old.trust], true));
    for c in [&h2, &h1] {
        assert_eq!(c.get(m.https("/v2/")).send().await.unwrap().status(), 200);
    }
    assert!(client(&[&new.trust], false)
        .get(m.https("/v2/"))
        .send()
        .await
        .is_err());

    replace(&new, &live);
    wait_served_to(&m, &new.trust, "the new certificate").await;
    let e = client(&[&old.trust], false)
        .get(m.https("/v2/"))
        .send()
        .await;
    assert!(
        e.is_err(),
        "a new connection still got the old certificate: {e:?}"
    );
    // The open connections still work: a new handshake would have failed right above.
    for (what, c) in [("h2", &h2), ("http/1.1", &h1)] {
        let r = c.get(m.https("/v2/")).send().await;
        assert_eq!(
            r.map(|r| r.status()).ok(),
            Some(reqwest::StatusCode::OK),
            "{what}"
        );
    }
}

#[tokio::test]
async fn sighup_reloads_the_certificate_even_when_the_files_look_unchanged() {
    // Handle SIGHUP in this process first, so the signal can never kill the test binary.
    let _hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).unwrap();
    let fake = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let old = self_signed(dir.path(), "old", Key::EcSec1);
    let new = self_signed(dir.path(), "new", Key::EcPkcs8);
    let live = Cert {
        cert: dir.path().join("live.crt"),
        key: dir.path().join("live.key"),
        trust: vec![],
    };
    replace(&old, &live);
    let m = tls_mirror(&fake.url(), &live.cert, &live.key).await;
    assert_eq!(
        client(&[&old.trust], false)
            .get(m.https("/v2/"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // New contents under the old modification times: polling cannot see the change.
    let mtime = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
    let stamps = [
        (live.cert.clone(), mtime(&live.cert)),
        (live.key.clone(), mtime(&live.key)),
    ];
    replace(&new, &live);
    for (path, t) in &stamps {
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(*t)
            .unwrap();
        assert_eq!(mtime(path), *t);
    }
    let pid = std::process::id().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    wait_served_to(&m, &new.trust, "after SIGHUP").await;
}

#[tokio::test]
async fn unusable_certificate_files_stop_startup_with_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = self_signed(d, "good", Key::EcPkcs8);
    let other = self_signed(d, "other", Key::RsaPkcs8);
    let file = |name: &str, bytes: &[u8]| {
        let path = d.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    };
    let pem = std::fs::read_to_string(&good.cert).unwrap();
    openssl(d, "x509 -in good.crt -outform DER -out good.der");
    let der = d.join("good.der");
    let encrypt = "genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -aes256 -pass pass:x";
    openssl(d, &format!("{encrypt} -out encrypted.key"));
    let encrypted = d.join("encrypted.key");
    let a_dir = d.join("a-directory");
    std::fs::create_dir(&a_dir).unwrap();
    let cert_cases = [
        ("missing", d.join("missing.crt")),
        ("a directory", a_dir.clone()),
        ("empty", file("empty.crt", b"")),
        ("not PEM", file("text.crt", b"this is not a certificate\n")),
        ("DER", der),
        ("a key", good.key.clone()),
        (
            "truncated",
            file("cut.crt", &pem.as_bytes()[..pem.len() / 2]),
        ),
    ];
    let key_cases = [
        ("missing", d.join("missing.key")),
        ("a directory", a_dir),
        ("not PEM", file("text.key", b"not a key")),
        ("a certificate", good.cert.clone()),
        ("another certificate's", other.key.clone()),
        ("encrypted", encrypted),
    ];
    let cases =
        cert_cases
            .into_iter()
            .map(|(what, path)| (format!("cert {what}"), path.clone(), good.key.clone(), path))
            .chain(key_cases.into_iter().map(|(what, path)| {
                (format!("key {what}"), good.cert.clone(), path.clone(), path)
            }));
    for (i, (what, cert, key, named)) in cases.enumerate() {
        let mut config = startup_config(&d.join(format!("data-{i}")));
        config.tls.cert = Some(cert);
        config.tls.key = Some(key);
        let e = startup_error(config).await;
        let msg = e.to_string();
        assert!(matches!(e, ServeError::Tls(_)), "{what}: {msg}");
        assert!(
            msg.contains(&named.display().to_string()),
            "{what}: the message does not name {}: {msg}",
            named.display()
        );
    }
}

#[tokio::test]
async fn a_broken_replacement_keeps_the_previous_certificate_until_a_good_one_comes() {
    let fake = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let old = self_signed(dir.path(), "old", Key::EcPkcs8);
    let new = self_signed(dir.path(), "new", Key::EcSec1);
    let live = Cert {
        cert: dir.path().join("live.crt"),
        key: dir.path().join("live.key"),
        trust: vec![],
    };
    replace(&old, &live);
    let m = tls_mirror(&fake.url(), &live.cert, &live.key).await;
    // Half an update: the new certificate next to the old key.
    std::fs::copy(&new.cert, &live.cert).unwrap();
    // Two and a half poll periods for the watcher to try (and refuse) it.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let r = client(&[&old.trust], false)
        .get(m.https("/v2/"))
        .send()
        .await;
    assert_eq!(
        r.map(|r| r.status()).ok(),
        Some(reqwest::StatusCode::OK),
        "old certificate kept"
    );
    // The key arrives: the pair is good, and it is served.
    std::fs::copy(&new.key, &live.key).unwrap();
    wait_served_to(&m, &new.trust, "the completed update").await;
}

#[tokio::test]
async fn tls_handshakes_not_finished_within_header_read_timeout_are_cut_off() {
    let fake = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cert = self_signed(dir.path(), "c", Key::EcPkcs8);
    let (c, k) = (cert.cert.clone(), cert.key.clone());
    let m = Front::start(&fake.url(), move |cfg| {
        cfg.tls.cert = Some(c);
        cfg.tls.key = Some(k);
        cfg.server.header_read_timeout = Duration::from_secs(1);
        cfg.server.idle_timeout = Duration::from_secs(60);
    })
    .await;
    // Connected, silent: no handshake within the timeout.
    let mut s = TcpStream::connect(m.addr).await.unwrap();
    let started = Instant::now();
    let (_, open) =
        read_until_closed(&mut s, tokio::time::Instant::now() + Duration::from_secs(5)).await;
    assert!(!open, "a silent TLS client stayed connected for 5 s");
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "cut before the timeout"
    );
    // Half a ClientHello: a record header announcing 512 bytes, then 5 of them.
    let mut s = TcpStream::connect(m.addr).await.unwrap();
    s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03])
        .await
        .unwrap();
    let (_, open) =
        read_until_closed(&mut s, tokio::time::Instant::now() + Duration::from_secs(5)).await;
    assert!(!open, "half a handshake stayed connected for 5 s");
    // Plain HTTP on the TLS port: refused at once, never answered as HTTP.
    let mut s = TcpStream::connect(m.addr).await.unwrap();
    s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: m\r\n\r\n")
        .await
        .unwrap();
    let (raw, open) =
        read_until_closed(&mut s, tokio::time::Instant::now() + Duration::from_secs(5)).await;
    assert!(!open && !raw.starts_with(b"HTTP/"), "{raw:?}");
    // The mirror still serves a proper client.
    let r = client(&[&cert.trust], false)
        .get(m.https("/v2/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn http2_header_lists_over_max_header_size_are_refused() {
    let fake = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cert = self_signed(dir.path(), "c", Key::EcPkcs8);
    let (c, k) = (cert.cert.clone(), cert.key.clone());
    let m = Front::start(&fake.url(), move |cfg| {
        cfg.tls.cert = Some(c);
        cfg.tls.key = Some(k);
        cfg.server.max_header_size.0 = 16 * 1024;
    })
    .await;
    let h2 = client(&[&cert.trust], false);
    let big = "b".repeat(20 * 1024);
    // The h2 server answers the stream itself with 431; the connection stays usable.
    let r = h2
        .get(m.https("/v2/"))
        .header("x-big", &big)
        .send()
        .await
        .unwrap();
    assert_eq!(
        (r.status(), r.version()),
        (
            reqwest::StatusCode::from_u16(431).unwrap(),
            reqwest::Version::HTTP_2
        )
    );
    let fits = "b".repeat(8 * 1024);
    let r = h2
        .get(m.https("/v2/"))
        .header("x-big", &fits)
        .send()
        .await
        .unwrap();
    assert_eq!(
        (r.status(), r.version()),
        (reqwest::StatusCode::OK, reqwest::Version::HTTP_2)
    );
}

/// `regmirror_tls_certificate_expiry_seconds{cert}` on the mirror's `/metrics`, if any.
async fn expiry_metric(m: &Front, trust: &[u8], cert: &Path) -> Option<f64> {
    let text = client(&[trust], false)
        .get(m.https("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series = format!(
        "regmirror_tls_certificate_expiry_seconds{{cert=\"{}\"}} ",
        cert.display()
    );
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map(|v| v.trim().parse().unwrap())
}

/// Seconds from now until the Unix time `at`.
fn seconds_until(at: f64) -> f64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    at - now.as_secs_f64()
}

/// A certificate three days from its end is something an operator must hear of before
/// clients refuse it: a warning at startup naming the file, its notAfter on `/metrics` (for
/// an alert) and a red card on the status page; a renewed one put in its place moves both.
#[tokio::test]
async fn a_certificate_near_its_expiry_is_logged_on_metrics_and_on_the_status_page() {
    let logs = captured_logs();
    let fake = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let soon = self_signed_for(dir.path(), "soon", Key::EcPkcs8, 3);
    let renewed = self_signed_for(dir.path(), "renewed", Key::EcPkcs8, 90);
    let live = Cert {
        cert: dir.path().join("live.crt"),
        key: dir.path().join("live.key"),
        trust: vec![],
    };
    replace(&soon, &live);
    let m = tls_mirror(&fake.url(), &live.cert, &live.key).await;
    let day = 86400.0;

    let at = expiry_metric(&m, &soon.trust, &live.cert)
        .await
        .expect("an expiry series for the served certificate");
    let left = seconds_until(at);
    assert!(
        (3.0 * day - 600.0..=3.0 * day + 5.0).contains(&left),
        "notAfter {at} is {left} s away, not 3 days"
    );

    let path = live.cert.display().to_string();
    let warned = String::from_utf8_lossy(&logs.lock().unwrap())
        .lines()
        .any(|l| {
            l.contains("WARN") && l.contains("TLS certificate expires soon") && l.contains(&path)
        });
    assert!(warned, "no warning naming {path}");

    let page = status_page(&m, &soon.trust).await;
    assert!(
        page.contains("<b class=bad>expires in 2 days</b>"),
        "no red expiry on the status page:\n{page}"
    );

    replace(&renewed, &live);
    wait_served_to(&m, &renewed.trust, "the renewed certificate").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let at = expiry_metric(&m, &renewed.trust, &live.cert).await.unwrap();
        if seconds_until(at) > 89.0 * day {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the metric kept {at} after the renewal"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let page = status_page(&m, &renewed.trust).await;
    assert!(
        page.contains("<b class=ok>expires in 89 days</b>"),
        "{page}"
    );
}

/// The status page's HTML, fetched over TLS trusting `trust`.
async fn status_page(m: &Front, trust: &[u8]) -> String {
    let resp = client(&[trust], false)
        .get(m.https("/_/status"))
        .send()
        .await;
    resp.unwrap().text().await.unwrap()
}
