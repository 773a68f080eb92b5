//! Issue 12, item 1: connection floods. Thousands of connections from 127.0.0.1 that drip a
//! header line a second or send nothing, against a `regmirror serve` process (so RSS and file
//! descriptors are the mirror's alone); meanwhile a client on 127.0.0.2 pulls a cached
//! manifest over a fresh connection every 50 ms. Asserted: every one of its GETs succeeds with
//! the manifest's bytes, the flood's connections get cut, the mirror's RSS stays bounded and
//! its file descriptors return to the baseline. Latency is reported, not asserted.
//!
//! Run twice: with the default per-address cap (the flood's address is capped) and with no cap
//! (`max_connections_per_address = 0`, as behind a load balancer), where the shedding at
//! `max_connections` alone must keep the door open. In the full run, distribution's proxy
//! takes the same flood.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::common::served::Served;
use crate::common::FakeUpstream;
use crate::{distribution, report, scale};

/// Lifts this process's soft open-file limit to the hard one: the flood's client sockets.
pub fn raise_nofile() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    if l.maximum.is_some() && l.current < l.maximum {
        l.current = l.maximum;
        let _ = setrlimit(Resource::Nofile, l);
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

const FLOODER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
const LEGIT: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// What the flood's connections saw.
#[derive(Default)]
struct FloodCounts {
    connected: AtomicUsize,
    cut: AtomicUsize,
    refused: AtomicUsize,
}

/// One flood connection: connects from 127.0.0.1, then drips a header line a second
/// (`drip`) or sends nothing; when cut, waits a second and connects again, until `stop`.
async fn flood_connection(
    target: SocketAddr,
    drip: bool,
    counts: Arc<FloodCounts>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind(SocketAddr::new(FLOODER, 0)).expect("bind");
        // Closed by a reset, not a FIN: no TIME_WAIT left on the flood's ports when the test
        // ends it (10,000 of them would leave the next run short of ephemeral ports).
        socket.set_zero_linger().expect("SO_LINGER 0");
        let mut stream = match socket.connect(target).await {
            Ok(s) => s,
            Err(_) => {
                counts.refused.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        counts.connected.fetch_add(1, Ordering::Relaxed);
        let mut line = 0u64;
        if drip {
            let _ = stream
                .write_all(b"GET /v2/ HTTP/1.1\r\nHost: mirror\r\n")
                .await;
        }
        let mut buf = [0u8; 512];
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let tick = tokio::time::sleep(Duration::from_secs(1));
            tokio::select! {
                r = stream.read(&mut buf) => match r {
                    // Anything but more silence: an answer (408, 431) or the close.
                    Ok(_) | Err(_) => break,
                },
                () = tick => {
                    if drip {
                        line += 1;
                        let h = format!("X-Drip-{line}: {line}\r\n");
                        if stream.write_all(h.as_bytes()).await.is_err() {
                            break;
                        }
                    }
                }
            }
        }
        counts.cut.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The figures of one flood against one target.
struct Measured {
    gets: usize,
    /// Normal GETs that failed: the error and when.
    failures: Vec<String>,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    rss_before_kib: u64,
    rss_peak_kib: u64,
    fds_before: usize,
    fds_peak: usize,
    fds_after: usize,
}

/// Floods `base` (`http://127.0.0.1:PORT`, served by process `pid`) with `connections` for
/// `duration`, half dripping and half silent, while the legitimate client GETs `path` and
/// checks the bytes against `want`.
async fn flood(
    base: &str,
    pid: u32,
    path: &str,
    accept: &str,
    want: &[u8],
    connections: usize,
    duration: Duration,
) -> (Measured, Arc<FloodCounts>) {
    let target: SocketAddr = base
        .trim_start_matches("http://")
        .parse()
        .expect("host:port");
    // A fresh connection per GET, from another address than the flood's.
    let legit = reqwest::Client::builder()
        .no_proxy()
        .local_address(LEGIT)
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let get = |legit: reqwest::Client| {
        let url = format!("{base}{path}");
        let accept = accept.to_owned();
        async move {
            let started = Instant::now();
            let r = legit
                .get(&url)
                .header("Accept", accept)
                .send()
                .await
                .map_err(|e| format!("{e:?}"))?;
            if r.status() != 200 {
                return Err(format!("status {}", r.status()));
            }
            let body = r.bytes().await.map_err(|e| format!("its body: {e:?}"))?;
            Ok::<_, String>((started.elapsed(), body))
        }
    };
    // Warm: the manifest is cached before the flood.
    let (_, body) = get(legit.clone()).await.expect("the GET before the flood");
    assert_eq!(&body[..], want);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fds_before = report::open_fds(pid);
    let rss_before_kib = report::rss_kib(pid);

    let counts = Arc::new(FloodCounts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut flooders = Vec::with_capacity(connections);
    for i in 0..connections {
        flooders.push(tokio::spawn(flood_connection(
            target,
            i % 2 == 0,
            counts.clone(),
            stop.clone(),
        )));
        if i % 200 == 199 {
            tokio::task::yield_now().await;
        }
    }
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut failures = Vec::new();
    let (mut rss_peak_kib, mut fds_peak) = (rss_before_kib, fds_before);
    while started.elapsed() < duration {
        match get(legit.clone()).await {
            Ok((took, body)) => {
                assert_eq!(&body[..], want, "the manifest's bytes during the flood");
                samples.push(took);
            }
            Err(e) => failures.push(format!("at {:?}: {e}", started.elapsed())),
        }
        rss_peak_kib = rss_peak_kib.max(report::rss_kib(pid));
        fds_peak = fds_peak.max(report::open_fds(pid));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for f in flooders {
        f.abort();
        let _ = f.await;
    }
    // The flood's sockets are closed: the mirror's must follow.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut fds_after = report::open_fds(pid);
    while fds_after > fds_before + 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        fds_after = report::open_fds(pid);
    }
    let gets = samples.len();
    let measured = Measured {
        gets,
        failures,
        p50_ms: report::percentile_ms(&mut samples, 50.0),
        p99_ms: report::percentile_ms(&mut samples, 99.0),
        max_ms: report::percentile_ms(&mut samples, 100.0),
        rss_before_kib,
        rss_peak_kib,
        fds_before,
        fds_peak,
        fds_after,
    };
    (measured, counts)
}

fn record(fault: &str, target: &str, connections: usize, m: &Measured, c: &FloodCounts) {
    report::figure(
        fault,
        target,
        serde_json::json!({
            "connections": connections,
            "gets": m.gets,
            "failed": m.failures.len(),
            "p50_ms": m.p50_ms,
            "p99_ms": m.p99_ms,
            "max_ms": m.max_ms,
            "rss_before_mib": m.rss_before_kib / 1024,
            "rss_peak_mib": m.rss_peak_kib / 1024,
            "fds_before": m.fds_before,
            "fds_peak": m.fds_peak,
            "fds_after": m.fds_after,
            "flood_connects": c.connected.load(Ordering::Relaxed),
            "flood_cut": c.cut.load(Ordering::Relaxed),
            "flood_refused": c.refused.load(Ordering::Relaxed),
        }),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_dripping_and_silent_connections_does_not_stall_a_normal_pull() {
    let _serial = crate::one_at_a_time().await;
    let connections = scale::pick(1_500, 10_000);
    let duration = Duration::from_secs(scale::pick(13, 30));
    let limit = raise_nofile();
    assert!(
        limit >= connections as u64 + 512,
        "the test needs {connections} sockets; the open-file limit is {limit}"
    );
    let fake = FakeUpstream::start().await;
    let img = fake.add_image("library/flood", "latest", vec![vec![7u8; 4096]]);
    let path = "/v2/library/flood/manifests/latest";

    for (cap, fault) in [
        (None, "flood: per-address cap (default)"),
        (Some("0"), "flood: no per-address cap"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let env: Vec<(String, &str)> = cap
            .map(|c| ("REGMIRROR_SERVER_MAX_CONNECTIONS_PER_ADDRESS".to_owned(), c))
            .into_iter()
            .collect();
        let served = Served::start_with(dir.path(), &fake.url(), &env).await;
        let pid = served.child.id();
        let (m, counts) = flood(
            &served.url,
            pid,
            path,
            img.media_type,
            &img.manifest,
            connections,
            duration,
        )
        .await;
        record(fault, "regmirror", connections, &m, &counts);
        let log = served.log();
        assert!(
            m.failures.is_empty(),
            "{fault}: every normal GET during the flood is answered; failed: {:?}\nwarnings:\n{}",
            m.failures,
            log.lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .take(20)
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert!(m.gets > 0);
        assert!(
            counts.cut.load(Ordering::Relaxed) >= connections / 2,
            "the flood's connections get cut ({} of {connections})",
            counts.cut.load(Ordering::Relaxed)
        );
        assert!(
            m.rss_peak_kib < 1024 * 1024,
            "RSS stays bounded: {} MiB",
            m.rss_peak_kib / 1024
        );
        assert!(
            m.fds_after <= m.fds_before + 2,
            "file descriptors back to the baseline: {} before, {} after",
            m.fds_before,
            m.fds_after
        );
        assert!(!log.contains("panicked"), "no panic:\n{log}");
    }

    if scale::compare_distribution() {
        let dir = tempfile::tempdir().unwrap();
        let d = distribution::Distribution::proxy(dir.path(), &fake.url(), None, "").await;
        let (m, counts) = flood(
            &d.url,
            d.pid(),
            path,
            img.media_type,
            &img.manifest,
            connections,
            duration,
        )
        .await;
        record(
            "flood: per-address cap (default)",
            "distribution",
            connections,
            &m,
            &counts,
        );
    }
}
