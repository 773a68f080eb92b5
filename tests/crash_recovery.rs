//! Restarts after what goes wrong on the mirror's own machine: a `regmirror serve` process
//! killed (SIGKILL) in the middle of a download, cached blobs damaged on disk, cached files
//! deleted or damaged while it serves (the index forgets them), a full disk; and the cache
//! commands (`regmirror gc`, `ls`, `du`) on a stopped mirror's data dir; and who else on
//! the machine may read that data dir (nobody, whatever the umask).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::cache::{disk_usage, pull, temp_files};
use common::images::ImageInfo;
use common::served::{hermetic, Served};
use common::tmpfs::Tmpfs;
use common::{random_bytes, read_body, spawn_get, start_mirror, wait_until, FakeUpstream};
use common::{MirrorHandle, Pending};

const MIB: u64 = 1 << 20;
const REPO: &str = "library/alpine";

/// Where a data dir keeps the committed blob `digest`.
fn blob_file(data_dir: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    data_dir.join("blobs/sha256").join(&hex[..2]).join(hex)
}

/// A client gets a blob's last byte once it verifies, before the commit's fsync. A mirror told
/// to stop (SIGTERM) while the download is in flight lets the request finish, then finishes
/// the commit and records the blob in its index snapshot before it exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_downloading_at_sigterm_is_served_committed_and_indexed() {
    let fake = FakeUpstream::start().await;
    let size = 64 * MIB;
    let data = random_bytes(size as usize, 31);
    let d = fake.add_blob(REPO, data.clone());
    fake.pause_blobs_at(size - MIB);
    let dir = tempfile::tempdir().unwrap();
    let mut served = Served::start(dir.path(), &fake.url()).await;
    // A client of its own, dropped before the exit: no idle connection for the drain to wait on.
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let get = spawn_get(&client, served.url_for(&format!("/v2/{REPO}/blobs/{d}")));
    fake.wait_progress("the upstream body to reach the pause", |p| p.paused == 1)
        .await;

    // Stop while the download waits on the upstream; the commit starts only after the client
    // has its last byte, and the shutdown must wait for it.
    let exited = tokio::task::spawn_blocking(move || {
        let status = served.terminate();
        (status, served)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    fake.release();
    let body = get.body.await.unwrap();
    let body = body.unwrap_or_else(|b| panic!("the body was cut after {} bytes", b.len()));
    assert!(body == data, "wrong body of {} bytes", body.len());
    drop(client);
    let (status, served) = exited.await.unwrap();
    assert!(status.success(), "exit {status:?}; log:\n{}", served.log());
    assert!(
        blob_file(dir.path(), &d).is_file(),
        "the blob served before the stop was not committed; log:\n{}",
        served.log()
    );
    let index = std::fs::read_to_string(dir.path().join("index.json")).unwrap();
    assert!(
        index.contains(&format!(r#"{{"kind":"blob","digest":"{d}"}}"#)),
        "the index snapshot written at the stop lacks the blob: {index}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_during_a_download_restarts_clean_and_fetches_again() {
    let fake = FakeUpstream::start().await;
    let data = random_bytes(4 * MIB as usize, 1);
    let d = fake.add_blob(REPO, data.clone());
    let half = 2 * MIB;
    fake.pause_blobs_at(half);
    let dir = tempfile::tempdir().unwrap();
    let mut served = Served::start(dir.path(), &fake.url()).await;

    let path = format!("/v2/{REPO}/blobs/{d}");
    let client: Pending = spawn_get(&served.client, served.url_for(&path));
    fake.wait_progress("the upstream body to reach its middle", |p| p.paused == 1)
        .await;
    let spooled = wait_until(Duration::from_secs(10), || {
        temp_files(dir.path()).iter().map(|(_, n)| n).sum::<u64>() >= half
    })
    .await;
    assert!(
        spooled,
        "the first half never reached DATA/tmp: {:?}; log:\n{}",
        temp_files(dir.path()),
        served.log()
    );

    served.kill();
    let body = client.body.await.unwrap();
    assert!(
        body.is_err(),
        "a download cut by SIGKILL ended cleanly for the client"
    );
    let partial = temp_files(dir.path());
    assert_eq!(partial.len(), 1, "the partial spool is left: {partial:?}");
    assert!(partial[0].1 > 0 && partial[0].1 < data.len() as u64);
    assert!(
        !blob_file(dir.path(), &d).exists(),
        "a partial blob was committed"
    );

    fake.release();
    let restarted = Served::start(dir.path(), &fake.url()).await;
    assert_eq!(
        temp_files(dir.path()),
        vec![],
        "temp files of the interrupted download are removed at start; log:\n{}",
        restarted.log()
    );
    assert!(!blob_file(dir.path(), &d).exists());
    let r = restarted
        .client
        .get(restarted.url_for(&path))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "log:\n{}", restarted.log());
    let body = read_body(r).await.expect("the blob after the restart");
    assert!(
        body == data,
        "wrong body of {} bytes after the restart",
        body.len()
    );
    assert_eq!(fake.blob_gets(&d), 2, "fetched again after the crash");
    let committed = wait_until(Duration::from_secs(10), || {
        std::fs::read(blob_file(dir.path(), &d)).is_ok_and(|b| b == data)
    })
    .await;
    assert!(committed, "the blob fetched again was cached");
}

/// Pulls an image, stops the mirror, damages its layer's file with `damage`, restarts on the
/// same data dir: the layer must be served right, fetched again from the upstream.
async fn damaged_layer_is_fetched_again(damage: impl FnOnce(&Path), what: &str, first: First) {
    let fake = FakeUpstream::start().await;
    let img = fake.add_image(REPO, "3.19", vec![random_bytes(MIB as usize, 2)]);
    let (layer, bytes) = (&img.layer_digests[0], &img.layers[0]);
    let m = start_mirror(&fake.url(), |_| {}).await;
    pull(&m, REPO, "3.19").await;
    let file = m.blob_path(layer);
    let dir = m.stop().await;
    damage(&file);
    assert_ne!(
        std::fs::read(&file).unwrap(),
        bytes.as_ref(),
        "{what}: damaged"
    );

    let m = MirrorHandle::start_in(dir, &fake.url(), |_| {}).await;
    let path = format!("/v2/{REPO}/blobs/{layer}");
    let resp = m.get(&path).await.unwrap();
    assert_eq!(resp.status(), 200, "{what}");
    match (first, read_body(resp).await) {
        (First::Refetched, Ok(body)) => assert!(
            body == bytes.as_ref(),
            "{what}: the damaged blob was served"
        ),
        (First::Aborted, Err(sent)) => {
            assert!(sent.len() < bytes.len(), "{what}: the last byte was sent")
        }
        (_, got) => panic!("{what}: first answer {:?} bytes", got.map(|b| b.len())),
    }
    let body = m.blob(REPO, layer).await;
    assert!(
        body == bytes,
        "{what}: the damaged blob was served ({} bytes)",
        body.len()
    );
    assert_eq!(fake.blob_gets(layer), 2, "{what}: fetched again");
    let repaired = wait_until(Duration::from_secs(10), || {
        std::fs::read(&file).is_ok_and(|b| b == bytes.as_ref())
    })
    .await;
    assert!(repaired, "{what}: the file on disk was not replaced");
    assert!(m.blob(REPO, layer).await == bytes);
    assert_eq!(
        fake.blob_gets(layer),
        2,
        "{what}: then served from the cache"
    );
}

/// How the first request after the damage is answered.
#[derive(Debug, Clone, Copy)]
enum First {
    /// A file of the wrong size is caught before the headers: fetched again at once.
    Refetched,
    /// A file of the right size is hashed as it streams: the body aborts before its last
    /// byte, and the client's retry fetches it again.
    Aborted,
}

#[tokio::test]
async fn cached_blob_with_a_flipped_byte_is_fetched_again_after_a_restart() {
    damaged_layer_is_fetched_again(
        |file| {
            let mut b = std::fs::read(file).unwrap();
            let mid = b.len() / 2;
            b[mid] ^= 0xff;
            std::fs::write(file, b).unwrap();
        },
        "a flipped byte",
        First::Aborted,
    )
    .await;
}

#[tokio::test]
async fn truncated_cached_blob_is_fetched_again_after_a_restart() {
    damaged_layer_is_fetched_again(
        |file| {
            let f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
            f.set_len(MIB / 3).unwrap();
        },
        "a truncated file",
        First::Refetched,
    )
    .await;
}

/// The items a stopped mirror's `index.json` claims: (kind, digest, size).
fn indexed(data_dir: &Path) -> Vec<(String, String, u64)> {
    let raw = std::fs::read(data_dir.join("index.json")).expect("index.json");
    let v: serde_json::Value = serde_json::from_slice(&raw).expect("index.json is JSON");
    v["contents"]
        .as_array()
        .expect("contents")
        .iter()
        .map(|item| {
            let (key, entry) = (&item[0], &item[1]);
            (
                key["kind"].as_str().expect("kind").to_owned(),
                key["digest"].as_str().expect("digest").to_owned(),
                entry["size"].as_u64().expect("size"),
            )
        })
        .collect()
}

/// A cached layer deleted by hand and a cached manifest damaged by hand, while the mirror
/// runs: asked for them (offline, so they cannot be fetched again), the mirror answers 404 and
/// its index stops claiming them, so the sizes it counts are the bytes on disk.
#[tokio::test]
async fn a_blob_deleted_and_a_manifest_damaged_while_serving_are_forgotten() {
    let fake = FakeUpstream::start().await;
    let img = fake.add_image(REPO, "3.19", vec![random_bytes(100_000, 21)]);
    let layer = &img.layer_digests[0];
    let m = start_mirror(&fake.url(), |_| {}).await;
    pull(&m, REPO, "3.19").await;
    assert!(m.committed(layer).await && m.committed(&img.config_digest).await);
    let dir = m.stop().await;
    let claimed =
        |items: &[(String, String, u64)], digest: &str| items.iter().any(|(_, d, _)| d == digest);
    let before = indexed(dir.path());
    assert!(claimed(&before, layer) && claimed(&before, &img.manifest_digest));

    // A fresh process, so the manifest is not in memory: it is read from disk.
    let m = MirrorHandle::start_in(dir, &fake.url(), |c| c.offline = true).await;
    std::fs::remove_file(m.blob_path(layer)).unwrap();
    let mpath = m.manifest_path(&img.manifest_digest);
    let mut raw = std::fs::read(&mpath).unwrap();
    let last = raw.len() - 1;
    raw[last] ^= 0xff;
    std::fs::write(&mpath, raw).unwrap();

    let by_digest = format!("/v2/{REPO}/manifests/{}", img.manifest_digest);
    assert_eq!(m.get(&by_digest).await.unwrap().status(), 404);
    assert!(!mpath.exists(), "the damaged manifest was removed");
    let blob = format!("/v2/{REPO}/blobs/{layer}");
    assert_eq!(m.get(&blob).await.unwrap().status(), 404);
    let dir = m.stop().await;

    let after = indexed(dir.path());
    assert!(
        !claimed(&after, layer),
        "the index claims the deleted layer"
    );
    assert!(
        !claimed(&after, &img.manifest_digest),
        "the index claims the damaged manifest"
    );
    assert!(claimed(&after, &img.config_digest));
    let counted: u64 = after.iter().map(|(_, _, size)| size).sum();
    assert_eq!(counted, disk_usage(dir.path()), "{after:?}");
}

/// Runs `regmirror <args>` to completion: (success, stdout, stderr).
async fn cli(args: &[&std::ffi::OsStr]) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_regmirror"));
    cmd.args(args).stdin(Stdio::null());
    hermetic(&mut cmd);
    let out = tokio::process::Command::from(cmd)
        .output()
        .await
        .expect("run regmirror");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The words of the `ls` row of `REPO:tag` (the repository possibly named with its registry,
/// as `docker.io/library/alpine`).
fn ls_row<'a>(ls: &'a str, tag: &str) -> Option<Vec<&'a str>> {
    ls.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|w| {
            w.len() >= 3 && (w[0] == REPO || w[0].ends_with(&format!("/{REPO}"))) && w[1] == tag
        })
}

/// The numbers of the `du` line starting with `label` (e.g. `blobs 6 items 3.0 MiB`).
fn du_items(du: &str, label: &str) -> u64 {
    du.lines()
        .find(|l| l.split_whitespace().next() == Some(label))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no `{label} N items` line in du's output:\n{du}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_ls_and_du_on_a_stopped_mirror() {
    let fake = FakeUpstream::start().await;
    let images: Vec<ImageInfo> = (0..3u64)
        .map(|i| {
            fake.add_image(
                REPO,
                &format!("v{i}"),
                vec![random_bytes(MIB as usize, 10 + i)],
            )
        })
        .collect();
    let m = start_mirror(&fake.url(), |_| {}).await;
    for i in 0..3 {
        pull(&m, REPO, &format!("v{i}")).await;
    }
    let dir = m.stop().await;
    let data = dir.path().as_os_str();
    std::fs::write(dir.path().join("tmp/leftover.part"), [0u8; 1000]).unwrap();
    let conf_dir = tempfile::tempdir().unwrap();
    let conf = conf_dir.path().join("gc.toml");
    // Watermarks 1.8 and 1.6 MiB: room for one of the three 1 MiB images.
    std::fs::write(&conf, "[cache]\nmax_size = \"2MiB\"\n").unwrap();
    let with_conf = |cmd: &'static str| -> Vec<&std::ffi::OsStr> {
        vec![
            cmd.as_ref(),
            "--config".as_ref(),
            conf.as_os_str(),
            "--data-dir".as_ref(),
            data,
        ]
    };

    let (ok, ls, err) = cli(&["ls".as_ref(), "--data-dir".as_ref(), data]).await;
    assert!(ok, "regmirror ls failed: {err}");
    for (i, img) in images.iter().enumerate() {
        let tag = format!("v{i}");
        let digest = ls_row(&ls, &tag).map(|w| w[2]);
        assert!(
            digest.is_some_and(|d| d.len() > 10 && img.manifest_digest.starts_with(d)),
            "ls does not list {REPO} {tag} {}:\n{ls}",
            img.manifest_digest
        );
    }

    let (ok, du, err) = cli(&with_conf("du")).await;
    assert!(ok, "regmirror du failed: {err}");
    assert_eq!(du_items(&du, "blobs"), 6, "3 configs and 3 layers:\n{du}");
    assert_eq!(du_items(&du, "manifests"), 3, "{du}");
    let total = du.lines().find(|l| l.starts_with("total")).unwrap_or("");
    assert!(total.contains("of 2.0 MiB"), "du shows the budget: {du}");

    let (ok, gc, err) = cli(&with_conf("gc")).await;
    assert!(ok, "regmirror gc failed: {err}");
    assert!(!gc.contains("is serving"), "no mirror runs: {gc}");
    assert!(gc.contains("removed 1 temp files"), "{gc}");
    assert!(
        gc.contains("evicted 6 items"),
        "v0 and v1 (manifest, config, layer): {gc}"
    );
    let low = 2 * MIB * 80 / 100;
    assert!(
        disk_usage(dir.path()) <= low,
        "gc leaves at most the low watermark ({low}): {} bytes on disk; gc said: {gc}",
        disk_usage(dir.path())
    );
    assert_eq!(temp_files(dir.path()), vec![]);
    let gone = |img: &ImageInfo| {
        img.blobs()
            .iter()
            .all(|(d, _)| !blob_file(dir.path(), d).exists())
    };
    assert!(
        gone(&images[0]) && gone(&images[1]),
        "the least recently pulled went"
    );
    assert!(
        images[2]
            .blobs()
            .iter()
            .all(|(d, _)| blob_file(dir.path(), d).is_file()),
        "v2, pulled last, stays"
    );

    let (ok, du, err) = cli(&with_conf("du")).await;
    assert!(ok, "regmirror du failed: {err}");
    assert_eq!(du_items(&du, "blobs"), 2, "{du}");
    assert_eq!(du_items(&du, "manifests"), 1, "{du}");
    let (ok, ls, err) = cli(&["ls".as_ref(), "--data-dir".as_ref(), data]).await;
    assert!(ok, "regmirror ls failed: {err}");
    assert!(ls_row(&ls, "v2").is_some(), "v2 is still cached:\n{ls}");
    assert!(
        ls_row(&ls, "v0").is_none(),
        "v0's manifest was evicted:\n{ls}"
    );

    // A mirror started on the collected dir agrees with it.
    fake.reset_counts();
    let m = MirrorHandle::start_in(dir, &fake.url(), |_| {}).await;
    pull(&m, REPO, "v2").await;
    assert!(
        fake.requests().is_empty(),
        "v2 is cached: {:?}",
        fake.requests()
    );
    pull(&m, REPO, "v0").await;
    assert_eq!(
        fake.blob_gets(&images[0].layer_digests[0]),
        1,
        "v0 was evicted"
    );
}

/// Whether `bytes` more fit on the filesystem of `dir` (written to a probe file, removed).
fn room_for(dir: &Path, bytes: usize) -> bool {
    let probe = dir.join("space-probe");
    let fits = std::fs::write(&probe, vec![0u8; bytes]).is_ok();
    let _ = std::fs::remove_file(&probe);
    fits
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_streams_the_download_through_without_keeping_it_and_keeps_serving() {
    let outer = tempfile::tempdir().unwrap();
    let mnt = outer.path().join("tmpfs");
    std::fs::create_dir(&mnt).unwrap();
    let _tmpfs = Tmpfs::mount(&mnt, "8m");
    let fake = FakeUpstream::start().await;
    let before = random_bytes(100_000, 20);
    let d_before = fake.add_blob(REPO, before.clone());
    let big = random_bytes(12 * MIB as usize, 21);
    let d_big = fake.add_blob(REPO, big.clone());
    let after = random_bytes(100_000, 22);
    let d_after = fake.add_blob(REPO, after.clone());
    let data = tempfile::tempdir_in(&mnt).unwrap();
    let m = MirrorHandle::start_in(data, &fake.url(), |_| {}).await;

    assert!(m.blob(REPO, &d_before).await == before);

    // The spool's write fails for space: the download goes on without keeping the blob
    // (issue 12), so the client gets every byte, verified, and the cache keeps nothing.
    let what = "a 12 MiB blob through a mirror on an 8 MiB disk";
    let r = m
        .get(&format!("/v2/{REPO}/blobs/{d_big}"))
        .await
        .unwrap_or_else(|e| panic!("{what}: request failed: {e}"));
    assert_eq!(r.status(), 200, "{what}");
    match read_body(r).await {
        Ok(body) => assert!(
            body == big,
            "{what}: a clean 200 with wrong bytes ({} bytes of {})",
            body.len(),
            big.len()
        ),
        Err(partial) => panic!("{what}: body aborted after {} bytes", partial.len()),
    }
    assert_eq!(fake.blob_gets(&d_big), 1, "{what}: one upstream fetch");
    let clean = wait_until(Duration::from_secs(10), || {
        temp_files(&m.data_dir).is_empty()
    })
    .await;
    assert!(
        clean,
        "DATA/tmp after the failed download: {:?}",
        temp_files(&m.data_dir)
    );
    assert!(!m.blob_path(&d_big).exists(), "{what}: kept");

    assert!(
        m.blob(REPO, &d_before).await == before,
        "the blob cached before"
    );
    assert_eq!(fake.blob_gets(&d_before), 1, "still from the cache");
    // The unlinked spool's blocks are freed when its last descriptor closes: the mirror's
    // download task and followers drop theirs a moment after the client saw the abort (up to
    // a few ms under load; a download started meanwhile fails with ENOSPC).
    let freed = wait_until(Duration::from_secs(10), || room_for(&mnt, 1 << 20)).await;
    assert!(freed, "the failed download's space was never released");
    assert!(m.blob(REPO, &d_after).await == after, "a blob pulled after");
    assert!(m.committed(&d_after).await, "and cached");
    drop(m.stop().await);
}

/// Blobs pulled with the mirror's upstream credentials, and the index naming every
/// repository, are the mirror's alone: under the common umask 022 (files 0644, dirs 0755
/// by default) every file and directory the mirror creates has no group or other bits.
#[tokio::test]
async fn the_cache_is_private_whatever_the_umask() {
    use rustix::fs::Mode;
    use std::os::unix::fs::PermissionsExt as _;

    // Process-wide; 022 is what most services start with, so tests beside it see no change.
    let before = rustix::process::umask(Mode::from_raw_mode(0o022));
    let fake = FakeUpstream::start().await;
    let img = fake.add_image(
        REPO,
        "v1",
        vec![random_bytes(300_000, 41), random_bytes(1000, 42)],
    );
    let outer = tempfile::tempdir().unwrap();
    // A data dir the mirror creates itself, parents included.
    let data_dir = outer.path().join("var/cache/regmirror");
    let dir = data_dir.clone();
    let m = start_mirror(&fake.url(), move |c| c.data_dir = dir).await;
    pull(&m, REPO, "v1").await;
    m.stop().await;
    rustix::process::umask(before);

    let mut seen = Vec::new();
    let mut open = Vec::new();
    let mut todo = vec![outer.path().join("var")];
    while let Some(path) = todo.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            open.push(format!("{:o} {}", mode, path.display()));
        }
        if meta.is_dir() {
            todo.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        }
        seen.push(path.strip_prefix(&data_dir).unwrap_or(&path).to_path_buf());
    }
    assert!(open.is_empty(), "readable by others: {open:#?}");
    // The walk saw what a mirror writes: not an empty directory passing by default.
    let hex = |d: &str| d.trim_start_matches("sha256:").to_owned();
    for want in [
        "lock".to_owned(),
        "index.json".to_owned(),
        "tmp".to_owned(),
        format!(
            "blobs/sha256/{}/{}",
            &hex(&img.layer_digests[0])[..2],
            hex(&img.layer_digests[0])
        ),
        format!(
            "manifests/sha256/{}/{}",
            &hex(&img.manifest_digest)[..2],
            hex(&img.manifest_digest)
        ),
    ] {
        assert!(
            seen.contains(&PathBuf::from(&want)),
            "{want} not in {seen:#?}"
        );
    }
}
