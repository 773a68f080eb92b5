//! A full disk costs the cache, never the client (issue 12, item 2): a `regmirror serve`
//! process with its data dir on a small tmpfs this module mounts (root only), a FakeUpstream
//! behind it, clients that hash what they get.
//!
//! - The case: a blob larger than the filesystem. Every client, and every retry, gets
//!   it whole; nothing of it lands on the disk; a small cached blob stays a hit.
//! - Another tenant took the disk: a blob that fits the filesystem but not its free space. The
//!   spool write fails mid-way; the clients still get every byte, nothing partial stays,
//!   eviction runs; with the disk then full to the last byte, a new blob and a manifest are
//!   served whole too, and the index snapshot on disk still parses.
//! - `cache.min_free`: pulls that would fill the disk leave the cache below the filesystem's
//!   size minus `min_free`, by eviction, and no write fails.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use serde_json::json;
use sha2::{Digest as _, Sha256};

use crate::common::fake_upstream::FakeUpstream;
use crate::common::served::Served;
use crate::common::tmpfs::Tmpfs;
use crate::common::{random_bytes, wait_until};
use crate::{distribution, report, scale};

const MIB: u64 = 1 << 20;
const REPO: &str = "library/big";

/// What one client got.
#[derive(Debug, Default, Clone)]
struct Pulled {
    bytes: u64,
    /// The body ended cleanly and hashed to the digest asked for.
    whole: bool,
}

async fn pull(client: &reqwest::Client, base: &str, repo: &str, digest: &str) -> Pulled {
    let mut got = Pulled::default();
    let Ok(resp) = client
        .get(format!("{base}/v2/{repo}/blobs/{digest}"))
        .send()
        .await
    else {
        return got;
    };
    if !resp.status().is_success() {
        return got;
    }
    let mut hasher = Sha256::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let Ok(chunk) = chunk else { return got };
        got.bytes += chunk.len() as u64;
        hasher.update(&chunk);
    }
    got.whole = format!("sha256:{:x}", hasher.finalize()) == digest;
    got
}

/// `clients` pulls of `digest` at once, all attached before the first byte (the upstream
/// holds the body at offset 0 until every request is in).
async fn pull_together(
    fake: &FakeUpstream,
    client: &reqwest::Client,
    base: &str,
    digest: &str,
    clients: usize,
) -> Vec<Pulled> {
    fake.pause_blobs_at(0);
    let gets = fake.blob_gets(digest);
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (client, base, digest) = (client.clone(), base.to_owned(), digest.to_owned());
            tokio::spawn(async move { pull(&client, &base, REPO, &digest).await })
        })
        .collect();
    // The first request reached the upstream; the others join its download meanwhile.
    let started = wait_until(Duration::from_secs(10), || fake.blob_gets(digest) > gets).await;
    assert!(started, "no upstream GET for {digest}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    fake.release();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("client task"));
    }
    out
}

fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

/// Bytes of the files under `dir`, recursively.
fn bytes_under(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => bytes_under(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .flat_map(|e| {
            if e.path().is_dir() {
                files_under(&e.path())
            } else {
                vec![e.path()]
            }
        })
        .collect()
}

/// The value of the counter series `line` (e.g. `name{label="x"}`) on /metrics.
async fn metric(served: &Served, series: &str) -> f64 {
    let text = served
        .client
        .get(served.url_for("/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(name, _)| *name == series)
        .filter_map(|(_, v)| v.parse::<f64>().ok())
        .sum()
}

/// Writes zeros to `path` until the filesystem is full; returns how many were written.
fn fill_up(path: &Path, most: u64) -> u64 {
    use std::io::Write as _;
    let mut f = std::fs::File::create(path).expect("filler");
    let block = vec![0u8; MIB as usize];
    let mut written = 0;
    while written < most {
        match f.write(&block[..(most - written).min(MIB) as usize]) {
            Ok(0) | Err(_) => break,
            Ok(n) => written += n as u64,
        }
    }
    let _ = f.sync_all();
    written
}

fn summary(pulls: &[Pulled]) -> (usize, usize, u64) {
    let whole = pulls.iter().filter(|p| p.whole).count();
    let bytes = pulls.iter().map(|p| p.bytes).sum();
    (whole, pulls.len() - whole, bytes)
}

/// The case, then a disk another tenant filled: every client and retry gets the whole
/// blob; the cache, not the client, goes without.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_costs_the_cache_never_the_client() {
    let _serial = crate::one_at_a_time().await;
    let fs_size = scale::pick(64 * MIB, 300 * MIB);
    let big_size = scale::pick(100 * MIB, 1024 * MIB);
    let clients = scale::pick(3, 4);
    let outer = tempfile::tempdir().unwrap();
    let mnt = outer.path().join("tmpfs");
    let tmpfs = Tmpfs::mount(&mnt, &fs_size.to_string());
    let data_dir = mnt.join("data");
    let fake = FakeUpstream::start().await;
    let small = random_bytes(64 * 1024, 1);
    let d_small = fake.add_blob(REPO, small.clone());
    let big = random_bytes(big_size as usize, 2);
    let d_big = fake.add_blob(REPO, big.clone());
    drop(big);
    let served = Served::start(&data_dir, &fake.url()).await;
    // No total timeout (`Served`'s client has 60 s): a 1 GiB body to several debug-built
    // clients at once takes longer on a small machine.
    let c = reqwest::Client::builder().no_proxy().build().unwrap();
    assert!(pull(&c, &served.url, REPO, &d_small).await.whole);
    let committed = wait_until(Duration::from_secs(10), || {
        files_under(&data_dir.join("blobs")).len() == 1
    })
    .await;
    assert!(committed, "the small blob was not cached");

    // The case: larger than the whole filesystem.
    let started = Instant::now();
    let hits_during = {
        let (c, url, d) = (c.clone(), served.url.clone(), d_small.clone());
        tokio::spawn(async move {
            let mut hits = 0;
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_millis(200)).await;
                hits += usize::from(pull(&c, &url, REPO, &d).await.whole);
            }
            hits
        })
    };
    let mut first = pull_together(&fake, &c, &served.url, &d_big, clients).await;
    first.extend(pull_together(&fake, &c, &served.url, &d_big, clients).await);
    let elapsed = started.elapsed();
    assert_eq!(
        hits_during.await.unwrap(),
        5,
        "the cached blob during the pulls"
    );
    let (whole, aborted, bytes) = summary(&first);
    let gets_big = fake.blob_gets(&d_big);
    report::figure(
        "full disk",
        "regmirror",
        json!({
            "case": "blob larger than the filesystem",
            "fs_mib": fs_size / MIB, "blob_mib": big_size / MIB,
            "clients_complete": whole, "clients_aborted": aborted,
            "client_bytes": bytes, "upstream_gets": gets_big,
            "cache_bytes_after": bytes_under(&data_dir.join("blobs")),
            "seconds": elapsed.as_secs_f64(),
        }),
    );
    assert_eq!(
        aborted, 0,
        "clients of a blob larger than the disk: {first:?}"
    );
    assert_eq!(
        gets_big, 2,
        "one upstream GET per round of {clients} clients"
    );
    assert!(pull(&c, &served.url, REPO, &d_small).await.whole);
    assert_eq!(fake.blob_gets(&d_small), 1, "the small blob stays a hit");
    let clean = wait_until(Duration::from_secs(10), || {
        files_under(&data_dir.join("tmp")).is_empty()
    })
    .await;
    assert!(
        clean,
        "left in tmp/: {:?}",
        files_under(&data_dir.join("tmp"))
    );
    assert_eq!(
        files_under(&data_dir.join("blobs")).len(),
        1,
        "only the small blob"
    );
    let too_large = metric(
        &served,
        "regmirror_downloads_not_kept_total{reason=\"too_large\"}",
    )
    .await;
    assert_eq!(too_large, 2.0);

    // Another tenant takes most of the disk: a blob that fits the filesystem (and the
    // default min_free) but not what is free. Its spool write fails mid-way.
    let (size, _) = tmpfs.space();
    let mid_size = size * 5 / 8;
    let mid = random_bytes(mid_size as usize, 3);
    let d_mid = fake.add_blob(REPO, mid.clone());
    drop(mid);
    let filler = mnt.join("other-tenant");
    fill_up(&filler, size / 2);
    let (_, free_before) = tmpfs.space();
    assert!(free_before < mid_size, "{free_before} free");
    let evictions_before = metric(&served, "regmirror_evictions_total{reason=\"size\"}").await;
    let mut pulls = pull_together(&fake, &c, &served.url, &d_mid, clients).await;
    pulls.extend(pull_together(&fake, &c, &served.url, &d_mid, clients).await);
    let (whole, aborted, bytes) = summary(&pulls);
    let no_space = metric(
        &served,
        "regmirror_downloads_not_kept_total{reason=\"no_space\"}",
    )
    .await;
    let ran = {
        let mut ran = false;
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if metric(&served, "regmirror_evictions_total{reason=\"size\"}").await
                > evictions_before
            {
                ran = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ran
    };
    report::figure(
        "full disk",
        "regmirror",
        json!({
            "case": "spool write fails (another tenant filled the disk)",
            "fs_mib": size / MIB, "free_mib": free_before / MIB, "blob_mib": mid_size / MIB,
            "clients_complete": whole, "clients_aborted": aborted,
            "client_bytes": bytes, "upstream_gets": fake.blob_gets(&d_mid),
            "not_kept_no_space": no_space,
            "cache_bytes_after": bytes_under(&data_dir.join("blobs")),
        }),
    );
    assert_eq!(
        aborted, 0,
        "clients of a blob the disk could not take: {pulls:?}"
    );
    assert_eq!(fake.blob_gets(&d_mid), 2, "one upstream GET per round");
    assert_eq!(no_space, 2.0, "each round's spool write failed");
    assert!(ran, "no eviction after the disk filled");
    let clean = wait_until(Duration::from_secs(10), || {
        files_under(&data_dir.join("tmp")).is_empty()
    })
    .await;
    assert!(
        clean,
        "left in tmp/: {:?}",
        files_under(&data_dir.join("tmp"))
    );
    for f in files_under(&data_dir.join("blobs")) {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            !d_mid.ends_with(&name),
            "the blob that did not fit was kept"
        );
    }

    // Full to the last byte: a blob and a manifest pulled now cannot be written at all.
    let img = fake.add_image(REPO, "v1", vec![random_bytes(300_000, 4)]);
    let last = mnt.join("last-bytes");
    fill_up(&last, u64::MAX);
    let layer = &img.layer_digests[0];
    assert!(
        pull(&c, &served.url, REPO, layer).await.whole,
        "a blob on a full disk"
    );
    let resp = c
        .get(served.url_for(&format!("/v2/{REPO}/manifests/v1")))
        .header("accept", img.media_type)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "a manifest on a full disk");
    assert_eq!(digest_of(&resp.bytes().await.unwrap()), img.manifest_digest);
    assert!(pull(&c, &served.url, REPO, &d_small).await.whole);
    // Shutdown writes the index snapshot (the hits changed access times); it cannot.
    let mut served = served;
    let status = served.terminate();
    let log = served.log();
    let index = std::fs::read_to_string(data_dir.join("index.json")).unwrap_or_default();
    assert!(
        index.is_empty() || serde_json::from_str::<serde_json::Value>(&index).is_ok(),
        "index.json does not parse after failed writes"
    );
    assert!(
        !data_dir.join("index.json.tmp").exists(),
        "a partial snapshot left"
    );
    let _ = std::fs::remove_file(&last);
    let _ = std::fs::remove_file(&filler);
    eprintln!(
        "regmirror exited {status:?}; index write failures logged: {}",
        log.matches("cannot write the index snapshot").count()
    );
    // Restarted on the same data dir, the index loads and the small blob is still a hit
    // (unless evicted while the disk was full: then it is fetched again, whole).
    let served = Served::start(&data_dir, &fake.url()).await;
    assert!(
        pull(&served.client, &served.url, REPO, &d_small)
            .await
            .whole
    );
    assert!(
        !served.log().contains("index snapshot unreadable"),
        "{}",
        served.log()
    );
    drop(served);

    if scale::compare_distribution() {
        distribution_through_the_same(fs_size, big_size, &d_big, &fake, clients).await;
    }
}

/// Distribution's proxy, its storage on a tmpfs of the same size, through the case.
async fn distribution_through_the_same(
    fs_size: u64,
    big_size: u64,
    d_big: &str,
    fake: &FakeUpstream,
    clients: usize,
) {
    let outer = tempfile::tempdir().unwrap();
    let mnt = outer.path().join("tmpfs");
    let _tmpfs = Tmpfs::mount(&mnt, &fs_size.to_string());
    let proxy = distribution::Distribution::proxy(&mnt, &fake.url(), None, "").await;
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let gets = fake.blob_gets(d_big);
    let started = Instant::now();
    let mut pulls = Vec::new();
    // Two rounds of clients at once, as regmirror's (without holding the upstream's body:
    // how the proxy shares a download is its own business).
    for _ in 0..2 {
        let tasks: Vec<_> = (0..clients)
            .map(|_| {
                let (client, base, digest) = (client.clone(), proxy.url.clone(), d_big.to_owned());
                tokio::spawn(async move { pull(&client, &base, REPO, &digest).await })
            })
            .collect();
        for t in tasks {
            pulls.push(t.await.expect("client task"));
        }
    }
    let (whole, aborted, bytes) = summary(&pulls);
    report::figure(
        "full disk",
        "distribution",
        json!({
            "case": "blob larger than the filesystem",
            "fs_mib": fs_size / MIB, "blob_mib": big_size / MIB,
            "clients_complete": whole, "clients_aborted": aborted,
            "client_bytes": bytes, "upstream_gets": fake.blob_gets(d_big) - gets,
            "cache_bytes_after": bytes_under(&mnt.join("storage")),
            "seconds": started.elapsed().as_secs_f64(),
        }),
    );
}

/// With `cache.min_free`, pulls that would fill the disk leave the cache below the
/// filesystem's size minus it: eviction makes the room, no write fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_free_keeps_the_cache_below_the_filesystem() {
    let _serial = crate::one_at_a_time().await;
    let fs_size = scale::pick(64 * MIB, 300 * MIB);
    let blob_size = scale::pick(6 * MIB, 30 * MIB);
    let min_free = 2 * blob_size + MIB;
    let count = 10;
    let outer = tempfile::tempdir().unwrap();
    let mnt = outer.path().join("tmpfs");
    let tmpfs = Tmpfs::mount(&mnt, &fs_size.to_string());
    let data_dir = mnt.join("data");
    let fake = FakeUpstream::start().await;
    let digests: Vec<String> = (0..count)
        .map(|i| fake.add_blob(REPO, random_bytes(blob_size as usize, 100 + i)))
        .collect();
    let env = [(
        "REGMIRROR_CACHE_MIN_FREE".to_owned(),
        format!("{}MiB", min_free / MIB),
    )];
    let env: Vec<(String, &str)> = env.iter().map(|(k, v)| (k.clone(), v.as_str())).collect();
    let served = Served::start_with(&data_dir, &fake.url(), &env).await;
    let (size, _) = tmpfs.space();
    let limit = size - min_free;
    let mut most = 0;
    for d in &digests {
        assert!(
            pull(&served.client, &served.url, REPO, d).await.whole,
            "{d}"
        );
        // The commit, then the eviction it wakes.
        tokio::time::sleep(Duration::from_millis(300)).await;
        most = most.max(bytes_under(&data_dir.join("blobs")));
    }
    let settled = wait_until(Duration::from_secs(15), || {
        bytes_under(&data_dir.join("blobs")) <= limit
    })
    .await;
    let after = bytes_under(&data_dir.join("blobs"));
    let evictions = metric(&served, "regmirror_evictions_total{reason=\"size\"}").await;
    let no_space = metric(
        &served,
        "regmirror_downloads_not_kept_total{reason=\"no_space\"}",
    )
    .await;
    report::figure(
        "full disk",
        "regmirror",
        json!({
            "case": "min_free",
            "fs_mib": size / MIB, "min_free_mib": min_free / MIB,
            "pulled_mib": count * blob_size / MIB, "cache_bytes_most": most,
            "cache_bytes_after": after, "evictions": evictions, "not_kept_no_space": no_space,
        }),
    );
    assert!(settled, "{after} bytes cached, over {limit}");
    assert!(evictions > 0.0, "nothing evicted");
    assert_eq!(no_space, 0.0, "a write failed: eviction came too late");
    assert!(
        most <= limit,
        "the cache reached {most} bytes, over {limit}"
    );
}
