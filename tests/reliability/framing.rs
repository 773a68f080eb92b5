//! Issue 12, item 6: hostile framing. Each request below is sent raw to a `regmirror serve`
//! process; each must be answered 4xx or closed, never smuggle a second request (the
//! smuggled request names `/v2/smuggled/...`, which the mirror would fetch from the fake
//! upstream, so the upstream's count proves it), never panic the process, and serving goes on
//! afterwards. HTTP/2 (prior knowledge, h2c): a rapid reset and a CONTINUATION flood, with
//! frames written by hand.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::common::served::Served;
use crate::common::FakeUpstream;
use crate::report;

/// What came back on a connection: its bytes until the close (or `wait` ran out).
struct Answer {
    bytes: Vec<u8>,
    closed: bool,
}

impl Answer {
    /// Status codes of the HTTP/1.1 responses in it.
    fn statuses(&self) -> Vec<u16> {
        let text = String::from_utf8_lossy(&self.bytes);
        text.match_indices("HTTP/1.1 ")
            .filter_map(|(i, _)| text.get(i + 9..i + 12)?.parse().ok())
            .collect()
    }
}

async fn read_all(stream: &mut TcpStream, wait: Duration) -> Answer {
    let mut bytes = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                return Answer {
                    bytes,
                    closed: true,
                }
            }
            Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
            Err(_) => {
                return Answer {
                    bytes,
                    closed: false,
                }
            }
        }
    }
}

/// Sends `raw` (ignoring a write the mirror cut short) and reads what comes back.
async fn send_raw(addr: &str, raw: &[u8]) -> Answer {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let _ = stream.write_all(raw).await;
    read_all(&mut stream, Duration::from_secs(5)).await
}

const SMUGGLED: &str = "GET /v2/smuggled/manifests/latest HTTP/1.1\r\nHost: m\r\n\r\n";

fn cases() -> Vec<(&'static str, Vec<u8>)> {
    let mut v: Vec<(&'static str, Vec<u8>)> = vec![
        (
            "content-length with transfer-encoding",
            format!(
                "POST /v2/ HTTP/1.1\r\nHost: m\r\nContent-Length: 5\r\n\
                 Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"
            )
            .into_bytes(),
        ),
        (
            "transfer-encoding with content-length (smuggled in the body)",
            format!(
                "POST /v2/ HTTP/1.1\r\nHost: m\r\nTransfer-Encoding: chunked\r\n\
                 Content-Length: {}\r\n\r\n{SMUGGLED}",
                SMUGGLED.len()
            )
            .into_bytes(),
        ),
        (
            "two content-lengths",
            format!(
                "POST /v2/ HTTP/1.1\r\nHost: m\r\nContent-Length: 0\r\nContent-Length: {}\r\n\r\n{SMUGGLED}",
                SMUGGLED.len()
            )
            .into_bytes(),
        ),
        (
            "transfer-encoding not chunked",
            format!("POST /v2/ HTTP/1.1\r\nHost: m\r\nTransfer-Encoding: identity\r\n\r\n{SMUGGLED}")
                .into_bytes(),
        ),
        (
            "obs-fold",
            format!("GET /v2/ HTTP/1.1\r\nHost: m\r\nX-Folded: a\r\n b\r\n\r\n{SMUGGLED}").into_bytes(),
        ),
        (
            "obs-fold hiding a content-length",
            format!(
                "POST /v2/ HTTP/1.1\r\nHost: m\r\nX-Folded: a\r\n Content-Length: {}\r\n\r\n{SMUGGLED}",
                SMUGGLED.len()
            )
            .into_bytes(),
        ),
        (
            "bare LF ending a header before content-length",
            format!(
                "POST /v2/ HTTP/1.1\r\nHost: m\nContent-Length: {}\r\n\r\n{SMUGGLED}",
                SMUGGLED.len()
            )
            .into_bytes(),
        ),
        (
            "space before the colon",
            format!(
                "POST /v2/ HTTP/1.1\r\nHost: m\r\nContent-Length : {}\r\n\r\n{SMUGGLED}",
                SMUGGLED.len()
            )
            .into_bytes(),
        ),
    ];
    let big = "a".repeat(64 * 1024);
    v.push((
        "64 KiB header",
        format!("GET /v2/ HTTP/1.1\r\nHost: m\r\nX-Big: {big}\r\n\r\n").into_bytes(),
    ));
    let many: String = (0..10_000).map(|i| format!("X-{i}: v\r\n")).collect();
    v.push((
        "10,000 headers",
        format!("GET /v2/ HTTP/1.1\r\nHost: m\r\n{many}\r\n").into_bytes(),
    ));
    let long = "a".repeat(100_000);
    v.push((
        "100,000-character path",
        format!("GET /v2/{long}/manifests/latest HTTP/1.1\r\nHost: m\r\n\r\n").into_bytes(),
    ));
    v
}

// ---- HTTP/2 by hand ----

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK literal (never indexed) with a new name; both shorter than 127 bytes.
fn literal(name: &str, value: &str) -> Vec<u8> {
    let mut b = vec![0x10, name.len() as u8];
    b.extend_from_slice(name.as_bytes());
    b.push(value.len() as u8);
    b.extend_from_slice(value.as_bytes());
    b
}

/// `GET path` (`:method GET`, `:scheme http` from the static table, `:path`, `:authority`).
fn get_block(path: &str) -> Vec<u8> {
    let mut b = vec![0x82, 0x86, 0x04, path.len() as u8];
    b.extend_from_slice(path.as_bytes());
    b.extend_from_slice(&[0x01, 1, b'm']);
    b
}

const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

/// The GOAWAY error code in `bytes` (frames from the server), if any.
fn goaway(bytes: &[u8]) -> Option<u32> {
    let mut at = 0;
    while at + 9 <= bytes.len() {
        let len = (usize::from(bytes[at]) << 16)
            | (usize::from(bytes[at + 1]) << 8)
            | usize::from(bytes[at + 2]);
        if bytes[at + 3] == GOAWAY && at + 9 + 8 <= bytes.len() {
            let p = &bytes[at + 9..];
            return Some(u32::from_be_bytes([p[4], p[5], p[6], p[7]]));
        }
        at += 9 + len;
    }
    None
}

/// Opens and at once resets `streams` requests: the rapid reset.
async fn rapid_reset(addr: &str, streams: u32) -> (Answer, bool) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    let block = get_block("/v2/rapid/manifests/latest");
    let mut cut_short = false;
    for i in 0..streams {
        let id = 2 * i + 1;
        out.extend(frame(HEADERS, END_HEADERS | END_STREAM, id, &block));
        out.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
        if out.len() > 32 * 1024 {
            if stream.write_all(&out).await.is_err() {
                cut_short = true;
                break;
            }
            out.clear();
        }
    }
    if !cut_short && stream.write_all(&out).await.is_err() {
        cut_short = true;
    }
    (
        read_all(&mut stream, Duration::from_secs(5)).await,
        cut_short,
    )
}

/// One HEADERS without END_HEADERS, then CONTINUATION frames of headers until `total` bytes
/// were sent or the mirror stopped taking them.
async fn continuation_flood(addr: &str, total: usize) -> (Answer, usize) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    out.extend(frame(
        HEADERS,
        END_STREAM,
        1,
        &get_block("/v2/continued/manifests/latest"),
    ));
    let _ = stream.write_all(&out).await;
    let mut piece = Vec::new();
    let mut i = 0;
    while piece.len() < 16 * 1024 - 128 {
        piece.extend(literal(&format!("x-flood-{i}"), &"v".repeat(100)));
        i += 1;
    }
    let mut sent = 0;
    let started = Instant::now();
    while sent < total && started.elapsed() < Duration::from_secs(20) {
        let f = frame(CONTINUATION, 0, 1, &piece);
        match tokio::time::timeout(Duration::from_secs(5), stream.write_all(&f)).await {
            Ok(Ok(())) => sent += f.len(),
            _ => break,
        }
    }
    (read_all(&mut stream, Duration::from_secs(5)).await, sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_framing_is_refused_or_closed_and_smuggles_nothing() {
    let _serial = crate::one_at_a_time().await;
    let fake = FakeUpstream::start().await;
    let img = fake.add_image("library/frame", "latest", vec![vec![3u8; 2048]]);
    fake.add_image("smuggled", "latest", vec![vec![4u8; 64]]);
    fake.add_image("rapid", "latest", vec![vec![5u8; 64]]);
    let dir = tempfile::tempdir().unwrap();
    let served = Served::start(dir.path(), &fake.url()).await;
    let addr = served.url.trim_start_matches("http://").to_owned();
    let normal = || async {
        let r = served
            .client
            .get(served.url_for("/v2/library/frame/manifests/latest"))
            .header("Accept", img.media_type)
            .send()
            .await
            .expect("a normal GET");
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().await.unwrap(), img.manifest);
    };
    normal().await;

    let mut outcomes = serde_json::Map::new();
    for (name, raw) in cases() {
        let answer = send_raw(&addr, &raw).await;
        let statuses = answer.statuses();
        // The smuggled GET, had it been served, would be a second response.
        assert!(
            statuses.len() <= 1,
            "{name}: one request, one answer at most; got {statuses:?}"
        );
        let refused = statuses.first().is_some_and(|s| (400..500).contains(s));
        assert!(
            refused || (statuses.is_empty() && answer.closed),
            "{name}: answered 4xx or closed; got {statuses:?}, closed: {}",
            answer.closed
        );
        outcomes.insert(
            name.to_owned(),
            serde_json::json!(statuses.first().map_or("closed".to_owned(), u16::to_string)),
        );
        normal().await;
    }
    assert_eq!(
        fake.count_prefix("GET", "/v2/smuggled/"),
        0,
        "a smuggled request reached the upstream"
    );
    report::figure(
        "hostile HTTP/1.1 framing",
        "regmirror",
        serde_json::Value::Object(outcomes),
    );

    // HTTP/2 rapid reset: 10,000 streams opened and reset at once.
    let (answer, cut_short) = rapid_reset(&addr, 10_000).await;
    let code = goaway(&answer.bytes);
    assert!(
        code.is_some() || answer.closed || cut_short,
        "rapid reset: GOAWAY or close; got {} bytes, open",
        answer.bytes.len()
    );
    let rapid_upstream = fake.count_prefix("GET", "/v2/rapid/");
    normal().await;

    // HTTP/2 CONTINUATION flood: up to 64 MiB of one header block.
    let rss_before = report::rss_kib(served.child.id());
    let (cont, sent) = continuation_flood(&addr, 64 << 20).await;
    let rss_after = report::rss_kib(served.child.id());
    let cont_code = goaway(&cont.bytes);
    assert!(
        cont_code.is_some() || cont.closed,
        "CONTINUATION flood: GOAWAY or close"
    );
    assert!(
        sent < 64 << 20,
        "the mirror stopped taking the header block ({sent} bytes sent)"
    );
    assert_eq!(fake.count_prefix("GET", "/v2/continued/"), 0);
    normal().await;
    report::figure(
        "hostile HTTP/2",
        "regmirror",
        serde_json::json!({
            "rapid_reset_goaway": code,
            "rapid_reset_upstream_gets": rapid_upstream,
            "continuation_goaway": cont_code,
            "continuation_bytes_taken": sent,
            "rss_growth_kib": rss_after.saturating_sub(rss_before),
        }),
    );
    let log = served.log();
    assert!(!log.contains("panicked"), "no panic:\n{log}");
}
