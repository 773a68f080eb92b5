//! Item 7, the soak: 64 clients pull a mix of images from a `regmirror serve` process for a
//! bounded time (60 s; 30 min in the full run; `REGMIRROR_RELIABILITY_SOAK_SECS` sets it):
//! manifests by tag, blobs whole and by `Range`, under a 16 MiB budget (eviction all the
//! time) and a 1 s tag TTL while the tags move upstream, with upstream faults switched on
//! and off in turn (503, 429 with `Retry-After`, a slow body, bodies cut at 256 KiB).
//! Every body is checked by its client: a complete 200 or 206 with wrong bytes fails the
//! test; errors and cut bodies are counted. The mirror's RSS and open descriptors are
//! sampled every second: after warm-up (the first fifth) they must stay within a generous
//! bound, and the descriptors come back near their start once the clients and the upstream
//! are gone. Latency percentiles are figures, never assertions. In the full run the same
//! soak runs against distribution's proxy for the comparison row (figures only).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};

use crate::clients::{self, Catalog, Tally};
use crate::common::served::Served;
use crate::common::{random_bytes, wait_until, FakeUpstream};
use crate::distribution::Distribution;
use crate::{crash_loop, report, scale};

const CLIENTS: usize = 64;
const REPOS: usize = 6;
const VERSIONS: usize = 3;
const TAG: &str = "latest";
const KIB: usize = 1024;

/// The soak's length: `REGMIRROR_RELIABILITY_SOAK_SECS`, else 60 s (30 min in the full run).
fn soak_secs() -> u64 {
    std::env::var("REGMIRROR_RELIABILITY_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| scale::pick(60, 1800))
}

/// Six repositories of three versions each (a layer of 0.5-2.5 MiB, one of 100 KiB, one
/// small), `latest` on the first; every version in the catalog as what `latest` may be.
fn content(fake: &FakeUpstream) -> (Catalog, Vec<Vec<String>>) {
    let mut cat = Catalog::default();
    let mut versions = Vec::new();
    for r in 0..REPOS {
        let repo = format!("soak/app{r}");
        let mut digests = Vec::new();
        for v in 0..VERSIONS {
            let seed = (r * 10 + v) as u64 * 3;
            let layers = vec![
                random_bytes(512 * KIB + ((r + v) % 5) * 512 * KIB, seed + 1000),
                random_bytes(100 * KIB, seed + 1001),
                random_bytes(3 * KIB + v, seed + 1002),
            ];
            let img = fake.add_image(&repo, TAG, layers);
            cat.add(&repo, TAG, &img);
            digests.push(img.manifest_digest.clone());
        }
        fake.tag(&repo, TAG, &digests[0]);
        versions.push(digests);
    }
    (cat, versions)
}

/// The upstream faults switched on in turn, with a well-behaved phase between two.
const FAULTS: [&str; 4] = ["503", "429", "slow_body", "cut"];

fn switch(fake: &FakeUpstream, fault: Option<&str>) {
    fake.clear_faults();
    match fault {
        Some("503") => fake.fail_with(503, None),
        Some("429") => fake.fail_with(429, Some("1")),
        Some("slow_body") => fake.slow_body(Duration::from_millis(2), 16 * KIB),
        Some("cut") => fake.set(|f| f.cut_after = Some(256 * KIB as u64)),
        _ => {}
    }
}

/// One sample of the process: seconds since the start, RSS in KiB, open descriptors.
type Sample = (f64, u64, usize);

struct Outcome {
    tally: Arc<Tally>,
    samples: Vec<Sample>,
    /// Descriptors before the first request.
    fds_start: usize,
    secs: f64,
}

/// Runs the soak against `base` (process `pid`) for `secs`, moving tags and switching
/// faults in `fake`.
async fn soak(
    base: &str,
    pid: u32,
    fake: &FakeUpstream,
    cat: Arc<Catalog>,
    versions: &[Vec<String>],
    secs: u64,
    seed: u64,
) -> Outcome {
    let fds_start = report::open_fds(pid);
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let samples = Arc::new(Mutex::new(Vec::new()));
    let sampler = {
        let (stop, samples) = (stop.clone(), samples.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let s = (
                    started.elapsed().as_secs_f64(),
                    report::rss_kib(pid),
                    report::open_fds(pid),
                );
                samples.lock().unwrap().push(s);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    let mut clients_done = Vec::new();
    for c in 0..CLIENTS {
        let (stop, tally, cat, base) = (stop.clone(), tally.clone(), cat.clone(), base.to_owned());
        let mut rng = StdRng::seed_from_u64(seed ^ (c as u64 + 1).wrapping_mul(0x9e37_79b9));
        clients_done.push(tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap();
            let blobs: Vec<&String> = cat.blobs.keys().collect();
            while !stop.load(Ordering::Relaxed) {
                let repo = format!("soak/app{}", rng.gen_range(0..REPOS));
                let errors_before = tally.get(&tally.errors);
                match rng.gen_range(0..10) {
                    0..=4 => {
                        clients::pull(&client, &base, &cat, &tally, &repo, TAG, 0.15).await;
                    }
                    5..=7 => {
                        clients::get_manifest(&client, &base, &cat, &tally, &repo, TAG).await;
                    }
                    _ => {
                        // Any blob, asked of a repository that has it (the mirror serves a
                        // blob to a repository upstream lets see it).
                        let d = blobs[rng.gen_range(0..blobs.len())].clone();
                        let repo = owner(&cat, &d);
                        let len = cat.blobs[&d].len() as u64;
                        let range = rng.gen_bool(0.3).then(|| {
                            let a = rng.gen_range(0..len);
                            (a, rng.gen_range(a..len))
                        });
                        clients::get_blob(&client, &base, &cat, &tally, &repo, &d, range).await;
                    }
                }
                if tally.get(&tally.errors) > errors_before {
                    // As a client backs off after an error.
                    tokio::time::sleep(Duration::from_millis(rng.gen_range(20..200))).await;
                }
            }
        }));
    }
    // Tags move, faults come and go, until the end.
    let mut rng = StdRng::seed_from_u64(seed);
    let phase = Duration::from_secs(scale::pick(4, 15));
    let mut next_phase = Instant::now() + phase;
    let mut phase_no = 0usize;
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let r = rng.gen_range(0..REPOS);
        let v = rng.gen_range(0..VERSIONS);
        fake.tag(&format!("soak/app{r}"), TAG, &versions[r][v]);
        if Instant::now() >= next_phase {
            phase_no += 1;
            // Odd phases are faulty, even ones clean.
            let fault = (phase_no % 2 == 1).then(|| FAULTS[(phase_no / 2) % FAULTS.len()]);
            switch(fake, fault);
            next_phase = Instant::now() + phase;
        }
    }
    switch(fake, None);
    stop.store(true, Ordering::Relaxed);
    for c in clients_done {
        c.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    sampler.await.unwrap();
    let samples = samples.lock().unwrap().clone();
    Outcome {
        tally,
        samples,
        fds_start,
        secs,
    }
}

/// A repository the upstream has blob `digest` in.
fn owner(cat: &Catalog, digest: &str) -> String {
    for ((repo, _), manifests) in &cat.tags {
        for m in manifests {
            if clients::blobs_of(&cat.manifests[m])
                .iter()
                .any(|d| d == digest)
            {
                return repo.clone();
            }
        }
    }
    panic!("no repository has {digest}")
}

/// The median RSS (KiB) and the largest descriptor count of the samples within `[from, to]`
/// seconds.
fn window(samples: &[Sample], from: f64, to: f64) -> (u64, usize) {
    let mut rss: Vec<u64> = samples
        .iter()
        .filter(|s| s.0 >= from && s.0 <= to)
        .map(|s| s.1)
        .collect();
    rss.sort_unstable();
    let fds = samples
        .iter()
        .filter(|s| s.0 >= from && s.0 <= to)
        .map(|s| s.2)
        .max()
        .unwrap_or(0);
    (rss.get(rss.len() / 2).copied().unwrap_or(0), fds)
}

/// The figure line of one soak.
fn figures(target: &str, o: &Outcome, warm: (u64, usize), end: (u64, usize), fds_after: usize) {
    let t = &o.tally;
    let mut m = t.manifest_latency.lock().unwrap().clone();
    let mut b = t.blob_latency.lock().unwrap().clone();
    let peak_rss = o.samples.iter().map(|s| s.1).max().unwrap_or(0);
    let peak_fds = o.samples.iter().map(|s| s.2).max().unwrap_or(0);
    let round = |x: f64| (x * 10.0).round() / 10.0;
    report::figure(
        "soak",
        target,
        serde_json::json!({
            "secs": round(o.secs),
            "clients": CLIENTS,
            "ok": t.get(&t.ok),
            "gib": round(t.get(&t.bytes) as f64 / (1u64 << 30) as f64),
            "aborted": t.get(&t.aborted),
            "errors": t.get(&t.errors),
            "wrong_bytes": t.wrong().len(),
            "manifest_p50_ms": round(report::percentile_ms(&mut m, 50.0)),
            "manifest_p99_ms": round(report::percentile_ms(&mut m, 99.0)),
            "blob_p50_ms": round(report::percentile_ms(&mut b, 50.0)),
            "blob_p99_ms": round(report::percentile_ms(&mut b, 99.0)),
            "rss_warm_mib": round(warm.0 as f64 / 1024.0),
            "rss_end_mib": round(end.0 as f64 / 1024.0),
            "rss_peak_mib": round(peak_rss as f64 / 1024.0),
            "fds_start": o.fds_start,
            "fds_peak": peak_fds,
            "fds_after": fds_after,
        }),
    );
}

/// The warm-up's end and the run's end windows: (median RSS, most descriptors).
fn windows(o: &Outcome) -> ((u64, usize), (u64, usize)) {
    let warm_end = (o.secs / 5.0).max(5.0);
    (
        window(&o.samples, warm_end - 5.0, warm_end),
        window(&o.samples, o.secs - 6.0, o.secs),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_serves_right_bytes_with_flat_memory_and_descriptors() {
    let _serial = crate::one_at_a_time().await;
    let secs = soak_secs();
    let seed = crash_loop::seed();
    println!("soak: {secs} s, {CLIENTS} clients, seed {seed} (REGMIRROR_RELIABILITY_SEED)");
    let fake = FakeUpstream::start().await;
    let (cat, versions) = content(&fake);
    let cat = Arc::new(cat);
    let dir = tempfile::tempdir().unwrap();
    let served = Served::start_with(
        dir.path(),
        &fake.url(),
        &[
            ("REGMIRROR_CACHE_MAX_SIZE".to_owned(), "16MiB"),
            ("REGMIRROR_CACHE_TAG_TTL".to_owned(), "1s"),
        ],
    )
    .await;
    let pid = served.child.id();
    let o = soak(&served.url, pid, &fake, cat.clone(), &versions, secs, seed).await;
    // Clients are gone; without the upstream, its idle pooled connections close too.
    fake.stop();
    let fds_back = wait_until(Duration::from_secs(20), || {
        report::open_fds(pid) <= o.fds_start + 8
    })
    .await;
    let fds_after = report::open_fds(pid);
    let (warm, end) = windows(&o);
    figures("regmirror", &o, warm, end, fds_after);

    assert!(
        o.tally.wrong().is_empty(),
        "bodies that ended cleanly with wrong bytes: {:?}",
        o.tally.wrong()
    );
    assert!(
        o.tally.get(&o.tally.ok) > 0,
        "no request succeeded; log:\n{}",
        served.log()
    );
    // Generous: half again what it used after warm-up, plus 64 MiB.
    assert!(
        end.0 <= warm.0 + (warm.0 / 2).max(64 * 1024),
        "RSS grew from {} KiB after warm-up to {} KiB at the end",
        warm.0,
        end.0
    );
    assert!(
        end.1 <= warm.1 + 64 + CLIENTS,
        "open descriptors grew from {} after warm-up to {} at the end",
        warm.1,
        end.1
    );
    assert!(
        fds_back,
        "descriptors: {} at the start, {fds_after} after the clients and the upstream went away",
        o.fds_start
    );
    drop(served);

    if scale::compare_distribution() {
        let fake = FakeUpstream::start().await;
        let (cat, versions) = content(&fake);
        let dir = tempfile::tempdir().unwrap();
        let d = Distribution::proxy(dir.path(), &fake.url(), None, "").await;
        let o = soak(&d.url, d.pid(), &fake, Arc::new(cat), &versions, secs, seed).await;
        fake.stop();
        tokio::time::sleep(Duration::from_secs(5)).await;
        let fds_after = report::open_fds(d.pid());
        let (warm, end) = windows(&o);
        figures("distribution", &o, warm, end, fds_after);
    } else if scale::full() {
        println!("soak: docker-registry is not installed; no distribution row");
    }
}
