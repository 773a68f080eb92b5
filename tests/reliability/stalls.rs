//! Issue 12, item 4: an upstream that stalls (accepts and says nothing; sends headers then
//! nothing; trickles a byte a second) costs a pull its bounded time, not forever: the request
//! gets 504 (no headers in `upstream.timeout`) or the body aborts (no byte for
//! `upstream.read_timeout`, or less than `upstream.min_rate` over its window, each resumed
//! within `upstream.retries`); followers end the same way, the mirror's descriptors come back,
//! and the download has left the map: the next pull fetches again and succeeds.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::{random_bytes, read_body, spawn_get, wait_until};
use crate::fault_proxy::{rig, Fault, Rig};
use crate::{report, scale};

const REPO: &str = "library/alpine";

/// Short timeouts: headers in 1 s, a byte every 2 s, 1 KiB/s over 2 s, one resume.
fn patient(c: &mut regmirror::config::Config) {
    c.upstream.timeout = Duration::from_secs(1);
    c.upstream.read_timeout = Duration::from_secs(2);
    c.upstream.min_rate = regmirror::config::ByteSize(1024);
    c.upstream.min_rate_window = Duration::from_secs(2);
    c.upstream.retries = 1;
}

/// Runs `fault` on every blob request while `clients` pull one blob: each ends within
/// `limit` (with a 504, or an aborted body), descriptors return, and a pull after it succeeds
/// with a fresh GET.
async fn stall(name: &str, fault: Fault, limit: Duration) {
    let r = rig(patient).await;
    let size = scale::pick(1 << 20, 64 << 20);
    let data = random_bytes(size, 80);
    let d = r.fake.add_blob(REPO, data.clone());
    // Warm: a token, the realm, a pooled connection, as before a real fault.
    let warm = r.fake.add_blob(REPO, random_bytes(1000, 81));
    r.m.blob(REPO, &warm).await;
    let pid = std::process::id();
    let fds_before = report::open_fds(pid);

    r.proxy.set(fault, "/blobs/", None);
    let clients = scale::pick(2, 8);
    // A client of its own, closed before the descriptors are counted again.
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let started = Instant::now();
    let pending: Vec<_> = (0..clients)
        .map(|_| spawn_get(&client, r.m.url_for(&format!("/v2/{REPO}/blobs/{d}"))))
        .collect();
    let mut got = Vec::new();
    for mut p in pending {
        let status = tokio::time::timeout(limit, &mut p.status)
            .await
            .unwrap_or_else(|_| panic!("{name}: no status within {limit:?}"))
            .unwrap_or(0);
        let body = tokio::time::timeout(limit, p.body)
            .await
            .unwrap_or_else(|_| panic!("{name}: the body did not end within {limit:?}"))
            .unwrap();
        let ended = started.elapsed();
        let kind = match (status, body) {
            (200, Err(b)) => format!("aborted after {} bytes", b.len()),
            (200, Ok(b)) => panic!("{name}: a clean end with {} bytes", b.len()),
            (s @ (502 | 504), _) => format!("{s}"),
            (s, _) => panic!("{name}: status {s}"),
        };
        got.push((kind, ended));
    }
    let took = started.elapsed();
    assert!(took < limit, "{name}: took {took:?}");
    drop(client);
    r.proxy.pass();
    let back = wait_until(Duration::from_secs(10), || {
        report::open_fds(pid) <= fds_before
    })
    .await;
    let fds_after = report::open_fds(pid);
    assert!(
        back,
        "{name}: {fds_after} descriptors open, {fds_before} before the fault"
    );
    let gets = r
        .proxy
        .exchanges()
        .iter()
        .filter(|e| e.path.ends_with(&d))
        .count();
    assert!(r.m.blob(REPO, &d).await == data, "{name}: the next pull");
    let after = r
        .proxy
        .exchanges()
        .iter()
        .filter(|e| e.path.ends_with(&d))
        .count();
    assert_eq!(after, gets + 1, "{name}: the next pull fetched again");
    assert!(r.m.committed(&d).await);
    report::figure(
        name,
        "regmirror",
        json!({
            "clients": clients,
            "client_got": got.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
            "ended_ms": got.iter().map(|(_, t)| t.as_millis() as u64).collect::<Vec<_>>(),
            "upstream_requests": gets, "fds_before": fds_before, "fds_after": fds_after,
            "next_pull": "ok",
        }),
    );
    if scale::compare_distribution() {
        distribution_under(&r, name, fault, size).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upstream_that_accepts_and_says_nothing_is_a_504_within_the_timeout() {
    // upstream.timeout (1 s); the headers' stage is not resumed.
    stall(
        "upstream accepts and says nothing",
        Fault::Silent,
        Duration::from_secs(6),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn headers_then_nothing_aborts_the_body_after_read_timeout_and_one_resume() {
    // 2 s, a resume (50 ms, its headers), 2 s: about 4 s.
    stall(
        "upstream sends headers then nothing",
        Fault::HeadOnly,
        Duration::from_secs(10),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_byte_a_second_is_below_min_rate_and_aborts_the_body() {
    // A byte a second never trips the 2 s read_timeout; the 2 s rate window does, twice.
    stall(
        "upstream trickles a byte a second",
        Fault::Trickle(Duration::from_secs(1)),
        Duration::from_secs(12),
    )
    .await;
}

/// How long distribution's client waits before it gives up on its own.
const GIVE_UP: Duration = Duration::from_secs(60);

/// Distribution's proxy through the same proxy under `fault` (a fresh blob of `size`): what
/// its client got, and when.
pub async fn distribution_under(r: &Rig, name: &str, fault: Fault, size: usize) {
    let dir = tempfile::tempdir().unwrap();
    let dist = crate::distribution::Distribution::proxy(dir.path(), &r.proxy.url(), None, "").await;
    let data = random_bytes(size, 90);
    let d = r.fake.add_blob(REPO, data.clone());
    r.fake.clear_faults();
    r.proxy.set(fault, "/blobs/", Some(1));
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(GIVE_UP)
        .build()
        .unwrap();
    let started = Instant::now();
    let got = match client
        .get(format!("{}/v2/{REPO}/blobs/{d}", dist.url))
        .send()
        .await
    {
        Err(e) => format!("request failed: {e}"),
        Ok(resp) if resp.status() != 200 => format!("status {}", resp.status().as_u16()),
        Ok(resp) => match read_body(resp).await {
            Ok(b) if b == data => "whole".to_owned(),
            Ok(b) => format!("clean end of a wrong body ({} bytes)", b.len()),
            Err(b) => format!("aborted after {} bytes", b.len()),
        },
    };
    let took = started.elapsed();
    let got = if took >= GIVE_UP {
        format!("nothing ended it; the client gave up after {GIVE_UP:?} ({got})")
    } else {
        got
    };
    r.proxy.pass();
    let gets = r
        .proxy
        .exchanges()
        .iter()
        .filter(|e| e.path.ends_with(&d))
        .count();
    report::figure(
        name,
        "distribution",
        json!({"size": size, "client_got": got, "ms": took.as_millis() as u64,
               "upstream_requests": gets}),
    );
}
