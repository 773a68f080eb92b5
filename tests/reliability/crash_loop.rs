//! Item 5, the crash loop: a `regmirror serve` process under pulls (four clients over five
//! multi-layer images, layers of several MiB), a budget small enough that eviction runs
//! all the time (so index flushes and commits do too), and `regmirror import` of a bundle
//! `regmirror export` made (on the stopped data dir, the only way import runs; killed half
//! the time), is killed with SIGKILL at a random moment, round after round. After each
//! crash every file under `blobs/` and `manifests/` hashes to its name; after each restart
//! `tmp/` is empty, the index the restarted mirror writes (stopped with SIGTERM, which
//! flushes it) lists exactly the files on disk with their sizes, and a pull of every image is complete, its bytes hashed here.
//!
//! The seed is printed; `REGMIRROR_RELIABILITY_SEED` replays a run.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};

use crate::clients::{self, Catalog, Tally};
use crate::common::images::sha256_digest;
use crate::common::served::{hermetic, Served};
use crate::common::{random_bytes, FakeUpstream};
use crate::{report, scale};

const MIB: usize = 1 << 20;
const CLIENTS: usize = 4;
/// The image `regmirror import` brings in (the fake has it too, for after its eviction).
const BUNDLED: (&str, &str) = ("library/bundled", "b1");

/// The seed: `REGMIRROR_RELIABILITY_SEED`, or the clock.
pub fn seed() -> u64 {
    std::env::var("REGMIRROR_RELIABILITY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
}

/// Five images of three layers (one of 2-4 MiB), and the bundled one: (repo, tag).
fn images(fake: &FakeUpstream, cat: &mut Catalog) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for i in 0..5u64 {
        let repo = format!("library/img{i}");
        let layers = vec![
            random_bytes(2 * MIB + (i as usize) * 512 * 1024, 100 + i),
            random_bytes(300 * 1024, 200 + i),
            random_bytes(20 * 1024 + i as usize, 300 + i),
        ];
        let img = fake.add_image(&repo, "1", layers);
        cat.add(&repo, "1", &img);
        out.push((repo, "1".to_owned()));
    }
    let img = fake.add_image(
        BUNDLED.0,
        BUNDLED.1,
        vec![random_bytes(3 * MIB, 400), random_bytes(64 * 1024, 401)],
    );
    cat.add(BUNDLED.0, BUNDLED.1, &img);
    out.push((BUNDLED.0.to_owned(), BUNDLED.1.to_owned()));
    out
}

fn env() -> Vec<(String, &'static str)> {
    vec![
        ("REGMIRROR_CACHE_MAX_SIZE".to_owned(), "8MiB"),
        ("REGMIRROR_CACHE_TAG_TTL".to_owned(), "2s"),
    ]
}

/// `regmirror ARGS` with no `REGMIRROR_*` of ours.
fn regmirror(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_regmirror"));
    cmd.args(args).stdin(Stdio::null());
    hermetic(&mut cmd);
    cmd
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A bundle of the bundled image, exported from a mirror of its own that pulled it.
async fn make_bundle(fake: &FakeUpstream, cat: &Catalog, dir: &Path) -> PathBuf {
    let src = dir.join("source");
    let mut served = Served::start(&src, &fake.url()).await;
    let tally = Tally::default();
    assert!(
        clients::pull(
            &served.client,
            &served.url,
            cat,
            &tally,
            BUNDLED.0,
            BUNDLED.1,
            0.0
        )
        .await,
        "the source mirror pulled the bundled image; log:\n{}",
        served.log()
    );
    let status = served.terminate();
    assert!(status.success(), "source mirror exit {status:?}");
    let bundle = dir.join("bundle.tar");
    let image = format!("docker.io/{}:{}", BUNDLED.0, BUNDLED.1);
    let out = regmirror(&[
        "export",
        &image,
        "-o",
        path(&bundle),
        "--data-dir",
        path(&src),
    ])
    .output()
    .expect("run regmirror export");
    assert!(
        out.status.success(),
        "export: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    bundle
}

/// (kind, digest, size) of every file under `blobs/` and `manifests/`, each checked to hash
/// to its name (a manifest file is its media type, a newline, then the manifest bytes).
fn stored(data: &Path, when: &str) -> BTreeSet<(String, String, u64)> {
    let mut out = BTreeSet::new();
    for (area, kind) in [("blobs", "blob"), ("manifests", "manifest")] {
        let Ok(algs) = std::fs::read_dir(data.join(area)) else {
            continue;
        };
        for alg in algs.flatten() {
            let alg_name = alg.file_name().to_string_lossy().into_owned();
            assert_eq!(alg_name, "sha256", "{when}: {area}/{alg_name}");
            for prefix in std::fs::read_dir(alg.path()).unwrap().flatten() {
                let prefix_name = prefix.file_name().to_string_lossy().into_owned();
                for file in std::fs::read_dir(prefix.path()).unwrap().flatten() {
                    let hex = file.file_name().to_string_lossy().into_owned();
                    let shown = format!("{area}/sha256/{prefix_name}/{hex}");
                    assert!(
                        hex.len() == 64 && hex.starts_with(&prefix_name),
                        "{when}: a file not named by a digest: {shown}"
                    );
                    let raw = std::fs::read(file.path()).unwrap();
                    let content = if kind == "manifest" {
                        let nl = raw.iter().position(|&b| b == b'\n');
                        let nl = nl.unwrap_or_else(|| panic!("{when}: {shown} has no media type"));
                        &raw[nl + 1..]
                    } else {
                        &raw[..]
                    };
                    let digest = format!("sha256:{hex}");
                    assert_eq!(
                        sha256_digest(content),
                        digest,
                        "{when}: {shown} ({} bytes) does not hash to its name",
                        raw.len()
                    );
                    out.insert((kind.to_owned(), digest, raw.len() as u64));
                }
            }
        }
    }
    out
}

/// What `index.json` claims to hold: (kind, digest, size).
fn indexed(data: &Path, when: &str) -> BTreeSet<(String, String, u64)> {
    let raw = std::fs::read(data.join("index.json"))
        .unwrap_or_else(|e| panic!("{when}: index.json: {e}"));
    let v: serde_json::Value = serde_json::from_slice(&raw)
        .unwrap_or_else(|e| panic!("{when}: index.json does not parse: {e}"));
    assert_eq!(v["version"], 1, "{when}: index.json version");
    v["contents"]
        .as_array()
        .expect("contents")
        .iter()
        .map(|item| {
            (
                item[0]["kind"].as_str().expect("kind").to_owned(),
                item[0]["digest"].as_str().expect("digest").to_owned(),
                item[1]["size"].as_u64().expect("size"),
            )
        })
        .collect()
}

fn temp_count(data: &Path) -> usize {
    std::fs::read_dir(data.join("tmp")).map_or(0, |d| d.count())
}

/// Starts the mirror and checks what its start promises: `tmp/` emptied.
async fn restart(data: &Path, fake: &FakeUpstream, when: &str) -> Served {
    let served = Served::start_with(data, &fake.url(), &env()).await;
    let left: Vec<_> = std::fs::read_dir(data.join("tmp"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        left.is_empty(),
        "{when}: tmp/ after the restart's cleanup: {left:?}; log:\n{}",
        served.log()
    );
    served
}

#[derive(Default)]
struct Figures {
    kills: u64,
    imports: u64,
    imports_killed: u64,
    imports_completed: u64,
    /// Temp files a crash left, removed by the restart.
    temp_left: u64,
    /// Files on disk the crashed process's last index.json did not list yet, and items it
    /// listed that were gone: what the restart's reconcile repaired.
    unindexed: u64,
    stale: u64,
    files_checked: u64,
    pulls_verified: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_keeps_the_cache_whole() {
    let _serial = crate::one_at_a_time().await;
    let rounds: usize = scale::pick(10, 100);
    let seed = seed();
    println!(
        "crash loop: seed {seed} (REGMIRROR_RELIABILITY_SEED={seed} replays it), {rounds} rounds"
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();
    let fake = FakeUpstream::start().await;
    let mut cat = Catalog::default();
    let images = images(&fake, &mut cat);
    let cat = Arc::new(cat);
    let tmp = tempfile::tempdir().unwrap();
    let bundle = make_bundle(&fake, &cat, tmp.path()).await;
    let data = tmp.path().join("data");
    let tally = Arc::new(Tally::default());
    let mut fig = Figures::default();

    let mut served = restart(&data, &fake, "first start").await;
    for round in 0..rounds {
        let when = format!("round {round} (seed {seed})");
        // The next pull of every image, complete and right.
        for (repo, tag) in &images {
            let t = Tally::default();
            let ok = clients::pull(&served.client, &served.url, &cat, &t, repo, tag, 0.0).await;
            assert!(
                ok && t.wrong().is_empty(),
                "{when}: pull of {repo}:{tag} after the restart: {} ok, {} errors, {} aborted, wrong {:?}; log:\n{}",
                t.get(&t.ok),
                t.get(&t.errors),
                t.get(&t.aborted),
                t.wrong(),
                served.log()
            );
            fig.pulls_verified += 1;
        }

        // Traffic, then SIGKILL at a random moment of it.
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for c in 0..CLIENTS {
            let (client, url, cat, tally, stop) = (
                served.client.clone(),
                served.url.clone(),
                cat.clone(),
                tally.clone(),
                stop.clone(),
            );
            let images = images.clone();
            let mut crng = StdRng::seed_from_u64(seed ^ ((round * CLIENTS + c) as u64 + 1));
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let (repo, tag) = &images[crng.gen_range(0..images.len())];
                    clients::pull(&client, &url, &cat, &tally, repo, tag, 0.2).await;
                }
            }));
        }
        let at = Duration::from_millis(rng.gen_range(50..2500));
        tokio::time::sleep(at).await;
        served.kill();
        fig.kills += 1;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
        assert!(
            tally.wrong().is_empty(),
            "{when}: wrong bytes served: {:?}",
            tally.wrong()
        );

        // What the crash left: whole files only; an index possibly behind.
        let on_disk = stored(&data, &format!("{when}, after the kill at {at:?}"));
        fig.files_checked += on_disk.len() as u64;
        fig.temp_left += temp_count(&data) as u64;
        if data.join("index.json").exists() {
            let items = indexed(&data, &format!("{when}, after the kill"));
            fig.unindexed += on_disk.difference(&items).count() as u64;
            fig.stale += items.difference(&on_disk).count() as u64;
        }

        // An import into the stopped data dir, killed at a random moment half the time.
        if rng.gen_bool(0.4) {
            fig.imports += 1;
            let mut child = regmirror(&["import", path(&bundle), "--data-dir", path(&data)])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("run regmirror import");
            let kill_at = rng
                .gen_bool(0.5)
                .then(|| Duration::from_millis(rng.gen_range(0..400)));
            let deadline = Instant::now() + kill_at.unwrap_or(Duration::from_secs(60));
            let status = loop {
                if let Some(s) = child.try_wait().unwrap() {
                    break Some(s);
                }
                if Instant::now() >= deadline {
                    child.kill().unwrap();
                    child.wait().unwrap();
                    break None;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            };
            match status {
                Some(s) => {
                    let mut err = String::new();
                    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err)
                        .unwrap();
                    assert!(s.success(), "{when}: import: {s:?} {err}");
                    fig.imports_completed += 1;
                }
                None => fig.imports_killed += 1,
            }
            let on_disk = stored(&data, &format!("{when}, after the import ({kill_at:?})"));
            fig.files_checked += on_disk.len() as u64;
        }

        // The restart: tmp/ emptied, and the index it writes agrees with the disk.
        let mut restarted = restart(&data, &fake, &when).await;
        let status = restarted.terminate();
        assert!(
            status.success(),
            "{when}: SIGTERM exit {status:?}; log:\n{}",
            restarted.log()
        );
        let on_disk = stored(&data, &format!("{when}, after the restart"));
        // Its contents, that is: a tag may point at a manifest not cached (resolved by a HEAD,
        // the manifest fetched by digest after), by design.
        let items = indexed(&data, &format!("{when}, after the restart"));
        assert_eq!(
            items,
            on_disk,
            "{when}: the restarted mirror's index.json (left) and the files on disk (right) differ; log:\n{}",
            restarted.log()
        );
        served = restart(&data, &fake, &when).await;
    }
    drop(served);
    let secs = started.elapsed().as_secs_f64();
    println!("crash loop: {rounds} rounds in {secs:.1} s");
    report::figure(
        "crash_loop",
        "regmirror",
        serde_json::json!({
            "rounds": rounds,
            "seed": seed.to_string(),
            "kills": fig.kills,
            "imports": fig.imports,
            "imports_killed": fig.imports_killed,
            "imports_completed": fig.imports_completed,
            "pulls_verified": fig.pulls_verified,
            "traffic_ok": tally.get(&tally.ok),
            "traffic_aborted": tally.get(&tally.aborted),
            "traffic_errors": tally.get(&tally.errors),
            "wrong_bytes": tally.wrong().len(),
            "files_hashed": fig.files_checked,
            "temp_files_left_by_kills": fig.temp_left,
            "unindexed_after_kill": fig.unindexed,
            "stale_index_after_kill": fig.stale,
            "secs": (secs * 10.0).round() / 10.0,
        }),
    );
}
