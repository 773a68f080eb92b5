//! Issue 12, item 1: slow readers. Clients that ask for a blob the mirror has not cached yet
//! and then take its body at 1 KiB/s (a 4 KiB receive buffer, 1 KiB read a second), against a
//! `regmirror serve` process (RSS and descriptors are the mirror's alone), while a normal
//! client pulls the same blob. Asserted: the normal client gets every byte with the right
//! digest; every slow reader is cut (`server.send_timeout`, `server.min_send_rate`) before it
//! has the blob; the mirror's RSS stays far below what holding the blob for each reader would
//! take; its descriptors return to the baseline. The normal client's time, beside its time on
//! a mirror without slow readers, is a figure, not an assertion.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::common::served::Served;
use crate::common::{random_bytes, FakeUpstream};
use crate::{report, scale};

const REPO: &str = "library/slow";
const MIB: usize = 1024 * 1024;
/// The send timeout the mirrors under test get: a slow reader is cut after about this much
/// waiting on it.
const SEND_TIMEOUT: &str = "5s";

/// What one slow reader got before the mirror cut it (or the test gave up on it).
struct Slow {
    received: usize,
    cut: bool,
    after: Duration,
}

/// Asks `target` for `path` over a socket with a 4 KiB receive buffer and reads 1 KiB a
/// second until the connection ends, `give_up` passes, or `stop` is set.
async fn slow_reader(
    target: SocketAddr,
    path: String,
    give_up: Duration,
    stop: Arc<AtomicBool>,
) -> Slow {
    let started = Instant::now();
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut stream = socket.connect(target).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut buf = [0u8; 1024];
    let mut received = 0;
    loop {
        if stop.load(Ordering::Relaxed) || started.elapsed() > give_up {
            return Slow {
                received,
                cut: false,
                after: started.elapsed(),
            };
        }
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => {
                return Slow {
                    received,
                    cut: true,
                    after: started.elapsed(),
                }
            }
            Ok(n) => received += n,
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// GETs the blob as a normal client would and returns the time to its last byte, checking
/// every byte's hash against `digest`.
async fn fast_pull(base: &str, digest: &str, size: usize) -> Duration {
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let started = Instant::now();
    let mut r = client
        .get(format!("{base}/v2/{REPO}/blobs/{digest}"))
        .send()
        .await
        .expect("the normal client's GET");
    assert_eq!(r.status(), 200, "the normal client's GET");
    let mut hasher = Sha256::new();
    let mut got = 0;
    while let Some(chunk) = r.chunk().await.expect("the normal client's body, whole") {
        got += chunk.len();
        hasher.update(&chunk);
    }
    let took = started.elapsed();
    assert_eq!(got, size, "the normal client's body length");
    assert_eq!(
        format!("sha256:{}", hex::encode(hasher.finalize())),
        digest,
        "the normal client's bytes"
    );
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_are_cut_and_neither_slow_nor_swell_the_mirror() {
    let _serial = crate::one_at_a_time().await;
    let readers = scale::pick(20, 200);
    let size = scale::pick(64 * MIB, 1024 * MIB);
    crate::flood::raise_nofile();
    let fake = FakeUpstream::start().await;
    let digest = fake.add_blob(REPO, random_bytes(size, 77));
    let env = [("REGMIRROR_SERVER_SEND_TIMEOUT".to_owned(), SEND_TIMEOUT)];

    // The normal client alone, on a cold mirror: the time to compare with.
    let alone = {
        let dir = tempfile::tempdir().unwrap();
        let served = Served::start_with(dir.path(), &fake.url(), &env).await;
        fast_pull(&served.url, &digest, size).await
    };

    let dir = tempfile::tempdir().unwrap();
    let served = Served::start_with(dir.path(), &fake.url(), &env).await;
    let pid = served.child.id();
    let target: SocketAddr = served
        .url
        .trim_start_matches("http://")
        .parse()
        .expect("host:port");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fds_before = report::open_fds(pid);
    let rss_before_kib = report::rss_kib(pid);
    let stop = Arc::new(AtomicBool::new(false));
    // Long enough for any cut the mirror makes: send_timeout of waiting, twice over, and slack.
    let give_up = Duration::from_secs(60);
    let path = format!("/v2/{REPO}/blobs/{digest}");
    let slow: Vec<_> = (0..readers)
        .map(|_| tokio::spawn(slow_reader(target, path.clone(), give_up, stop.clone())))
        .collect();
    // Sample the mirror's memory while the readers hang on.
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        tokio::spawn(async move {
            let mut peak = 0;
            while sampling.load(Ordering::Relaxed) {
                peak = peak.max(report::rss_kib(pid));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            peak
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let beside = fast_pull(&served.url, &digest, size).await;
    let mut outcomes = Vec::with_capacity(readers);
    for s in slow {
        outcomes.push(s.await.expect("a slow reader"));
    }
    sampling.store(false, Ordering::Relaxed);
    let rss_peak_kib = sampler.await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut fds_after = report::open_fds(pid);
    while fds_after > fds_before + 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        fds_after = report::open_fds(pid);
    }

    let cut = outcomes.iter().filter(|s| s.cut).count();
    let most = outcomes.iter().map(|s| s.received).max().unwrap_or(0);
    let mut cut_after: Vec<Duration> = outcomes.iter().map(|s| s.after).collect();
    report::figure(
        "slow readers",
        "regmirror",
        serde_json::json!({
            "readers": readers,
            "blob_mib": size / MIB,
            "send_timeout": SEND_TIMEOUT,
            "cut": cut,
            "most_bytes_one_reader_got": most,
            "cut_after_p50_s": report::percentile_ms(&mut cut_after, 50.0) / 1000.0,
            "cut_after_max_s": report::percentile_ms(&mut cut_after, 100.0) / 1000.0,
            "normal_client_alone_s": alone.as_secs_f64(),
            "normal_client_beside_slow_s": beside.as_secs_f64(),
            "rss_before_mib": rss_before_kib / 1024,
            "rss_peak_mib": rss_peak_kib / 1024,
            "fds_before": fds_before,
            "fds_after": fds_after,
        }),
    );
    assert_eq!(
        cut, readers,
        "every slow reader is cut before it has the blob (the most one got: {most} bytes)"
    );
    assert!(most < size, "no slow reader got the whole blob");
    // Each reader holding its own copy of the blob would take readers x size; the mirror
    // streams them all from one spool.
    let bound_kib = (256 * 1024 + size / 1024 / 2) as u64;
    assert!(
        rss_peak_kib < bound_kib,
        "the mirror's RSS stays bounded: peak {} MiB, bound {} MiB",
        rss_peak_kib / 1024,
        bound_kib / 1024
    );
    assert!(
        fds_after <= fds_before + 2,
        "descriptors back to the baseline: {fds_before} before, {fds_after} after"
    );
    let log = served.log();
    assert!(!log.contains("panicked"), "no panic:\n{log}");
}
