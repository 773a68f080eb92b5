//! Hostile requests against a running mirror, byte for byte over TCP and through reqwest:
//! path traversal in every encoding, malformed names, tags and digests, odd methods, broken
//! request lines, header floods, request smuggling, absurd `Range` headers and garbage
//! queries. Each is refused with a 4xx (or the connection closed where hyper refuses the
//! head), never a 5xx or a hang; afterwards pulls still work, the upstream saw no malformed
//! name, and the mirror wrote nothing outside `DATA/{blobs,manifests,tmp,index.json,lock}`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::front::{exchange, Reply};
use common::images::sha256_digest;
use common::{random_bytes, start_mirror, FakeUpstream};
use futures_util::StreamExt as _;

const REPO: &str = "library/alpine";
const HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
const LIMIT: Duration = Duration::from_secs(10);
/// What `request` puts after the target: cases built with it are plain HTTP/1.1.
const VIA: &[u8] = b" HTTP/1.1\r\nHost: mirror\r\n";

/// What a hostile request may get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// A 4xx status.
    Refused,
    /// A 4xx status, or the connection closed (hyper refusing a head or a protocol).
    RefusedOrClosed,
}
use Expect::{Refused, RefusedOrClosed};

struct Case {
    what: String,
    request: Vec<u8>,
    expect: Expect,
}

fn request(method: &[u8], target: &[u8], headers: &str) -> Vec<u8> {
    let mut r = [method, b" ", target, VIA, headers.as_bytes()].concat();
    r.extend_from_slice(b"Connection: close\r\n\r\n");
    r
}

/// A plain `method target` case expected to be refused.
fn refused(method: &str, target: &[u8]) -> Case {
    let what = format!("{method} {}", String::from_utf8_lossy(target));
    let request = request(method.as_bytes(), target, "");
    Case {
        what,
        request,
        expect: Refused,
    }
}

/// Whitespace-separated words of `table`, with `MK` the traversal marker and `HEX` a digest.
fn words(table: &str, mk: &str) -> Vec<String> {
    table
        .split_whitespace()
        .map(|w| w.replace("MK", mk).replace("HEX", HEX))
        .collect()
}

/// Names that must never reach the upstream or the disk.
const BAD_NAMES: &str = r"
    .. ../.. ../../MK ../../../../../../tmp/MK library/../../MK %2e%2e %2e%2e%2f%2e%2e%2fMK
    ..%2f..%2fMK %2E%2E%2FMK %252e%252e%252fMK ..%252fMK %c0%ae%c0%ae/MK ..\..\MK /tmp/MK
    library%5c..%5cMK library\alpine /etc/passwd %2ftmp%2fMK library/./alpine . ./library
    library/%00 MK%00x Library/Alpine UPPER library/alpine:3.19 library/alpine@sha256 -lead
    trail- a..b a___b a/ a//b %ff caf%C3%A9 ~root $(id) `id` a;b a|b a?b a#b a%20b a+b a* _ a_.b";

const BAD_TAGS: &str = r"-x .x x/y a:b .. %2e%2e ..%2f..%2fMK ../../../etc/passwd x%00 x%2fy
    tag%20x a+b ~ x\y latest%0d%0aX-Injected:%20yes %C3%A9";

const BAD_DIGESTS: &str = r"sha256:HEX0 SHA256:HEX sha256::HEX :HEX sha256:HEX/.. sha256:HEX%00
    sha256:HEX:HEX sha256: sha256:../../MK sha256:%2e%2e%2fMK sha256:..%2f..%2fMK
    md5:d41d8cd98f00b204e9800998ecf8427e";

fn name_cases(mk: &str) -> Vec<Case> {
    let mut names: Vec<Vec<u8>> = words(BAD_NAMES, mk)
        .into_iter()
        .map(String::into_bytes)
        .collect();
    names.extend([
        b"a".repeat(256),
        format!("{}c", "ab/".repeat(90)).into_bytes(),
    ]);
    // Bytes no URL parser would let through.
    let raw: [&[u8]; 8] = [
        b"a\x00b",
        b"a\xffb",
        "caf\u{e9}".as_bytes(),
        b"a b",
        b"a\tb",
        b"a\rb",
        b"a\nb",
        b"a\x7fb",
    ];
    names.extend(raw.map(<[u8]>::to_vec));
    let endpoints = words("manifests/latest manifests/sha256:HEX blobs/sha256:HEX tags/list referrers/sha256:HEX blobs/uploads/", mk);
    let mut out = Vec::new();
    for name in names {
        for ep in &endpoints {
            let target = [b"/v2/", &name[..], b"/", ep.as_bytes()].concat();
            out.push(refused("GET", &target));
            out.push(refused("HEAD", &target));
        }
    }
    out
}

fn reference_cases(mk: &str) -> Vec<Case> {
    let mut tags = words(BAD_TAGS, mk);
    tags.push("t".repeat(129));
    let mut digests = words(BAD_DIGESTS, mk);
    digests.extend([
        format!("sha256:{}", &HEX[1..]),
        format!("sha256:{}", HEX.to_uppercase()),
        format!("sha256:{}", "g".repeat(64)),
        format!("sha256:{}", "0".repeat(10_000)),
        format!("sha384:{}", "a".repeat(96)),
        format!("sha512:{HEX}"),
        format!("sha512:{}", "a".repeat(127)),
    ]);
    let mut out = Vec::new();
    for method in ["GET", "HEAD"] {
        for t in &tags {
            out.push(refused(
                method,
                format!("/v2/{REPO}/manifests/{t}").as_bytes(),
            ));
        }
        for d in &digests {
            for kind in ["manifests", "blobs", "referrers"] {
                out.push(refused(method, format!("/v2/{REPO}/{kind}/{d}").as_bytes()));
            }
        }
        // Without a colon it would be a tag for a manifest, so only for blobs.
        out.push(refused(
            method,
            format!("/v2/{REPO}/blobs/sha256{HEX}").as_bytes(),
        ));
    }
    for byte in [0u8, b' ', 0xff] {
        let target = [format!("/v2/{REPO}/blobs/sha256:").as_bytes(), &[byte; 64]].concat();
        out.push(refused("GET", &target));
    }
    out
}

fn method_and_protocol_cases() -> Vec<Case> {
    let manifest = format!("/v2/{REPO}/manifests/3.19");
    let mut methods = words(
        "FOO OPTIONS TRACE PROPFIND get M-SEARCH PUT POST DELETE PATCH",
        "",
    );
    methods.push("X".repeat(1000));
    let mut out = Vec::new();
    for method in &methods {
        for target in ["/v2/", manifest.as_str()] {
            let req = request(
                method.as_bytes(),
                target.as_bytes(),
                "Content-Length: 0\r\n",
            );
            let what = format!("{} {target}", &method[..method.len().min(20)]);
            out.push(Case {
                what,
                request: req,
                expect: Refused,
            });
        }
    }
    // hyper answers an h2 preface as HTTP/2 (a GOAWAY), and waits for a request line
    // after empty lines (RFC 9112 2.2) until the header timeout: closed, not a status.
    let raw: [(&str, &[u8], Expect); 12] = [
        (
            "CONNECT authority",
            b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: m\r\n\r\n",
            Refused,
        ),
        (
            "OPTIONS *",
            b"OPTIONS * HTTP/1.1\r\nHost: m\r\n\r\n",
            Refused,
        ),
        (
            "absolute-form",
            b"GET http://evil/v2/../etc/manifests/x HTTP/1.1\r\n\r\n",
            Refused,
        ),
        (
            "method with NUL",
            b"G\x00T /v2/ HTTP/1.1\r\nHost: m\r\n\r\n",
            Refused,
        ),
        ("garbage line", b"GARBAGE\r\n\r\n", Refused),
        ("HTTP/0.9", b"GET /v2/\r\n\r\n", Refused),
        ("HTTP/9.9", b"GET /v2/ HTTP/9.9\r\nHost: m\r\n\r\n", Refused),
        (
            "HTTP/2.0 in text",
            b"GET /v2/ HTTP/2.0\r\nHost: m\r\n\r\n",
            Refused,
        ),
        (
            "TLS hello on plain port",
            b"\x16\x03\x01\x00\x05hello\r\n\r\n",
            Refused,
        ),
        (
            "h2 preface, garbage",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\xff\xff\xff\xff\xff\xff",
            RefusedOrClosed,
        ),
        ("only CRLFs", b"\r\n\r\n\r\n\r\n", RefusedOrClosed),
        ("binary", &random_bytes(4096, 77), Refused),
    ];
    for (what, req, expect) in raw {
        out.push(Case {
            what: what.into(),
            request: req.to_vec(),
            expect,
        });
    }
    out
}

fn header_cases() -> Vec<Case> {
    let many: String = (0..300).map(|i| format!("X-Flood-{i}: {i}\r\n")).collect();
    let hosts: String = (0..50).map(|i| format!("Host: h{i}\r\n")).collect();
    let ranges = format!("Range: bytes={}0-1\r\n", "0-1,".repeat(5000));
    let big = |kib: usize| format!("X-Big: {}\r\n", "b".repeat(kib * 1024));
    let auth = format!("Authorization: Basic {}\r\n", "QUFB".repeat(8000));
    let smuggle =
        "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /v2/ HTTP/1.1\r\n";
    let cases: [(&str, &str, &str, Expect); 17] = [
        ("300 headers", "GET", &many, RefusedOrClosed),
        ("one 100 KiB header", "GET", &big(100), RefusedOrClosed),
        ("one 40 KiB header", "GET", &big(40), Refused),
        ("50 Host headers", "GET", &hosts, Refused),
        ("5000 ranges", "GET", &ranges, Refused),
        ("huge Authorization", "GET", &auth, Refused),
        ("NUL in a value", "GET", "X-A: a\x00b\r\n", Refused),
        ("space in a name", "GET", "Bad Header: x\r\n", Refused),
        ("obs-fold", "GET", "X-A: a\r\n folded\r\n", Refused),
        (
            "two Content-Lengths",
            "GET",
            "Content-Length: 1\r\nContent-Length: 2\r\n",
            Refused,
        ),
        (
            "negative Content-Length",
            "GET",
            "Content-Length: -1\r\n",
            Refused,
        ),
        (
            "huge Content-Length",
            "GET",
            "Content-Length: 99999999999999999999999\r\n",
            Refused,
        ),
        ("CL and TE smuggling", "POST", smuggle, Refused),
        (
            "bad chunk size",
            "POST",
            "Transfer-Encoding: chunked\r\n\r\nzz\r\n",
            Refused,
        ),
        (
            "TE other than chunked",
            "POST",
            "Transfer-Encoding: gzip\r\n",
            Refused,
        ),
        (
            "Expect 100-continue",
            "GET",
            "Expect: 100-continue\r\nContent-Length: 10\r\n",
            Refused,
        ),
        ("a second Host", "GET", "Host: evil\r\n", Refused),
    ];
    let bad = b"/v2/Bad..Name/manifests/latest";
    let mut out: Vec<Case> = cases
        .into_iter()
        .map(|(what, method, headers, expect)| {
            let request = request(method.as_bytes(), bad, headers);
            Case {
                what: what.into(),
                request,
                expect,
            }
        })
        .collect();
    for (what, raw) in [
        (
            "no Host",
            &b"GET /v2/Bad/manifests/x HTTP/1.1\r\nConnection: close\r\n\r\n"[..],
        ),
        (
            "bare LF line ends",
            b"GET /v2/Bad/manifests/x HTTP/1.1\nHost: m\nConnection: close\n\n",
        ),
    ] {
        out.push(Case {
            what: what.into(),
            request: raw.to_vec(),
            expect: Refused,
        });
    }
    out
}

fn query_cases() -> Vec<Case> {
    let tags = format!("/v2/{REPO}/tags/list");
    let queries = "n=-1 n=99999999999999999999 n=1e3 n=%00 n=0x10 n=%201 n=abc n=1&n=abc \
        last=%ff%fe last=-x last=../../x last=a%2fb last=%00";
    let mut out: Vec<Case> = words(queries, "")
        .iter()
        .map(|q| refused("GET", format!("{tags}?{q}").as_bytes()))
        .collect();
    out.push(refused(
        "GET",
        format!("{tags}?last={}", "a".repeat(200)).as_bytes(),
    ));
    for q in [
        "%%%%",
        "a=%ff&&&&=",
        "ns=../../etc",
        "\x01\x02",
        "ns=%00",
        &"x=y&".repeat(1500),
    ] {
        out.push(refused(
            "GET",
            format!("/v2/Bad/manifests/latest?{q}").as_bytes(),
        ));
    }
    out
}

/// Why `reply` is wrong for `expect`, if it is.
fn judge(expect: Expect, reply: &Reply) -> Option<String> {
    if let Reply::Status(_, raw) = reply {
        let text = String::from_utf8_lossy(raw);
        // A second response (a smuggled request answered) or any 2xx/5xx anywhere.
        for bad in ["HTTP/1.1 2", "HTTP/1.1 5", "HTTP/1.0 2", "HTTP/1.0 5"] {
            if text.contains(bad) {
                return Some(format!("answered {:?}", &text[..text.len().min(300)]));
            }
        }
    }
    match (expect, reply) {
        (_, Reply::Status(s, _)) if (400..500).contains(s) => None,
        (Expect::RefusedOrClosed, Reply::Closed | Reply::Garbage(_)) => None,
        (_, other) => Some(format!("{:?}", debug_short(other))),
    }
}

fn debug_short(r: &Reply) -> String {
    let s = format!("{r:?}");
    s[..s.len().min(300)].to_owned()
}

/// Sends every case (eight at a time); returns the failures.
async fn run_cases(addr: SocketAddr, cases: Vec<Case>) -> Vec<String> {
    futures_util::stream::iter(cases)
        .map(|c| async move {
            let reply = exchange(addr, &c.request, LIMIT).await;
            judge(c.expect, &reply)
                .map(|why| format!("{}: {why}", &c.what[..c.what.len().min(200)]))
        })
        .buffer_unordered(8)
        .filter_map(|f| async move { f })
        .collect()
        .await
}

/// Pulls `repo:tag` through the mirror and checks every byte against its digest.
async fn pull(m: &common::MirrorHandle, tag: &str) -> Vec<String> {
    let manifest = m.get_ok(&format!("/v2/{REPO}/manifests/{tag}")).await;
    let v: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    let mut digests = vec![v["config"]["digest"].as_str().unwrap().to_owned()];
    for l in v["layers"].as_array().unwrap() {
        digests.push(l["digest"].as_str().unwrap().to_owned());
    }
    for d in &digests {
        assert_eq!(&sha256_digest(&m.blob(REPO, d).await), d);
    }
    digests.push(sha256_digest(&manifest));
    digests
}

/// Absurd ranges on a cached blob: ignored (200, the whole blob), served (206, the bytes
/// Content-Range names) or refused (416); never a 5xx. Returns the failures.
async fn check_ranges(m: &common::MirrorHandle, digest: &str, blob: &[u8]) -> Vec<String> {
    let size = blob.len();
    let mut ranges = words(
        "bytes=999999999999999999999- bytes=18446744073709551615- bytes=-18446744073709551615
        bytes=-99999999999999999999999 bytes=5-1 bytes=-0 bytes=0-0,1-1 bytes= bytes=--1
        bytes=1--2 items=0-1 bytes=0-18446744073709551615 bytes=1-2-3 bytes=ab-cd bytes=-
        bytes=0x10-0x20 bytes=+1-2 bytes=1-+2 bytes=\u{e9}",
        "",
    );
    ranges.extend(["bytes= 1 - 2".into(), format!("bytes={size}-")]);
    ranges.extend([
        format!("bytes={}-{}", size - 1, size * 2),
        "bytes=0-1,".repeat(2000),
    ]);
    let mut failures = Vec::new();
    for range in &ranges {
        let r = m
            .get_range(&format!("/v2/{REPO}/blobs/{digest}"), range)
            .await;
        let status = r.status().as_u16();
        let content_range = common::header(&r, "content-range");
        let body = r.bytes().await.unwrap();
        let span = || -> Option<(usize, usize)> {
            let (span, total) = content_range.strip_prefix("bytes ")?.split_once('/')?;
            let (a, b) = span.split_once('-')?;
            (total.parse::<usize>().ok()? == size).then_some((a.parse().ok()?, b.parse().ok()?))
        };
        let ok = match status {
            200 => body[..] == *blob,
            206 => span().is_some_and(|(a, b)| a <= b && b < size && body[..] == blob[a..=b]),
            416 => true,
            _ => false,
        };
        if !ok {
            let range = &range[..range.len().min(40)];
            failures.push(format!("Range {range}: {status} {content_range:?}"));
        }
    }
    failures
}

/// The names in `dir`.
fn names_in(dir: &Path) -> Vec<String> {
    let entries = std::fs::read_dir(dir).unwrap().flatten();
    entries
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Each file under `DATA/<area>` is `<alg>/<2 hex>/<hex>`, nothing nested deeper.
fn assert_content_addressed(data: &Path, area: &str) {
    let root = data.join(area);
    for alg in names_in(&root) {
        let len = match alg.as_str() {
            "sha256" => 64,
            "sha512" => 128,
            _ => panic!("unexpected DATA/{area}/{alg}"),
        };
        for pre in names_in(&root.join(&alg)) {
            for hex in names_in(&root.join(&alg).join(&pre)) {
                let path = root.join(&alg).join(&pre).join(&hex);
                let lower_hex = hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
                let ok = hex.len() == len && lower_hex && hex.starts_with(&pre) && pre.len() == 2;
                assert!(ok && path.is_file(), "unexpected {}", path.display());
            }
        }
    }
}

/// Nothing written outside `DATA/{blobs,manifests,tmp,index.json,lock}`: not beside the
/// data dir in `outer`, not in the unused temp dir `spare`, and no `mk` anywhere near.
fn assert_nothing_outside(outer: &Path, spare: &Path, mk: &str) {
    assert!(names_in(spare).is_empty(), "files in the unused temp dir");
    assert_eq!(names_in(outer), ["data"], "beside the data dir");
    let data = outer.join("data");
    for name in names_in(&data) {
        let known = ["blobs", "manifests", "tmp", "index.json", "lock"];
        assert!(known.contains(&name.as_str()), "unexpected DATA/{name}");
    }
    assert_content_addressed(&data, "blobs");
    assert_content_addressed(&data, "manifests");
    if data.join("tmp").exists() {
        for name in names_in(&data.join("tmp")) {
            assert!(
                data.join("tmp").join(&name).is_file(),
                "DATA/tmp/{name} is not a file"
            );
        }
    }
    let cwd = std::env::current_dir().unwrap();
    for dir in [
        std::env::temp_dir(),
        cwd,
        "/".into(),
        outer.parent().unwrap().into(),
    ] {
        for name in names_in(&dir) {
            assert!(!name.contains(mk), "created {}/{name}", dir.display());
        }
    }
}

#[tokio::test]
async fn hostile_requests_are_refused_and_leave_no_trace() {
    let fake = FakeUpstream::start().await;
    let layers = vec![random_bytes(30_000, 1), random_bytes(5000, 2)];
    fake.add_image(REPO, "3.19", layers);
    fake.add_image(REPO, "other", vec![random_bytes(20_000, 3)]);
    let outer = tempfile::tempdir().unwrap();
    let data = outer.path().join("data");
    // A short header timeout bounds what hyper may legitimately wait for (it skips
    // empty lines before a request line, RFC 9112 section 2.2).
    let m = start_mirror(&fake.url(), move |c| {
        c.data_dir = data;
        c.server.header_read_timeout = Duration::from_secs(3);
    })
    .await;
    let addr: SocketAddr = m.url.trim_start_matches("http://").parse().unwrap();
    let mk = format!("pwned{}x{}", std::process::id(), rand::random::<u32>());

    let mut allowed = pull(&m, "3.19").await;
    let blob = allowed[1].clone();
    let blob_bytes = m.blob(REPO, &blob).await;

    let mut cases = name_cases(&mk);
    cases.extend(reference_cases(&mk));
    cases.extend(method_and_protocol_cases());
    cases.extend(header_cases());
    cases.extend(query_cases());
    let total = cases.len();
    // The same paths through reqwest, where its URL parser leaves them as they are.
    let via_reqwest: Vec<String> = cases
        .iter()
        .filter(|c| c.request.starts_with(b"GET /v2/"))
        .filter_map(|c| {
            let end = c.request.windows(VIA.len()).position(|w| w == VIA)?;
            let target = std::str::from_utf8(&c.request[4..end]).ok()?;
            let url = reqwest::Url::parse(&format!("{}{target}", m.url)).ok()?;
            let sent = match url.query() {
                Some(q) => format!("{}?{q}", url.path()),
                None => url.path().to_owned(),
            };
            (sent == target).then(|| target.to_owned())
        })
        .collect();
    let mut failures = run_cases(addr, cases).await;
    for target in &via_reqwest {
        match m.get(target).await {
            Ok(r) if r.status().is_client_error() => {}
            other => failures.push(format!("reqwest GET {target}: {other:?}")),
        }
    }
    // A flood through a real client on its kept-alive connection.
    let mut flood = m.client.get(m.url_for("/v2/Bad/manifests/x"));
    for i in 0..500 {
        flood = flood.header(format!("x-flood-{i}"), "v");
    }
    let r = flood.send().await;
    if !matches!(&r, Ok(r) if r.status().is_client_error()) {
        failures.push(format!("reqwest with 500 headers: {r:?}"));
    }
    failures.extend(check_ranges(&m, &blob, &blob_bytes).await);
    eprintln!("{total} raw cases, {} through reqwest", via_reqwest.len());
    let n = failures.len();
    assert!(
        n == 0,
        "{n} hostile requests mishandled:\n{}",
        failures.join("\n")
    );

    // Still a working mirror: a pull the cache has not seen.
    allowed.extend(pull(&m, "other").await);
    // The upstream only ever saw the two good pulls.
    let allowed: BTreeSet<String> = allowed
        .iter()
        .chain(&["3.19".to_owned(), "other".to_owned()])
        .flat_map(|d| {
            [
                format!("/v2/{REPO}/manifests/{d}"),
                format!("/v2/{REPO}/blobs/{d}"),
            ]
        })
        .chain(["/token", "/v2/"].map(String::from))
        .collect();
    for seen in fake.requests() {
        assert!(
            allowed.contains(&seen.path),
            "the upstream was asked for {}",
            seen.path
        );
    }
    let spare = m.stop().await;
    assert_nothing_outside(outer.path(), spare.path(), &mk);
}
