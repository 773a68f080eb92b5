//! The air gap: images prefetched through a mirror from the token-auth upstream are exported
//! with `regmirror export` as OCI archives skopeo reads, imported with `regmirror import` into
//! an empty data dir, and pulled by a fresh dockerd from an `--offline` mirror there while the
//! upstream is down, with the upstream's digests. A bundle cut in the middle of a blob is
//! refused whole: the cache it was imported into stays exactly as it was.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use sha2::{Digest as _, Sha256};

use crate::dockerd::{Dockerd, DOCKER};
use crate::fixture::Image;
use crate::mirror::{Mirror, Options};
use crate::procs::run;
use crate::skopeo::{dir_blobs, dir_manifest_digest, Skopeo};
use crate::world::World;

/// `regmirror ARGS` with no `REGMIRROR_*` variables from the environment.
async fn regmirror(args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_regmirror"));
    cmd.args(args);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("REGMIRROR_") {
            cmd.env_remove(key);
        }
    }
    run(&mut cmd, Duration::from_secs(120)).await
}

fn show(out: &Output) -> String {
    format!(
        "({})\n--- stdout ---\n{}--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Every file under the cache areas and the index of `data`, with its size, plus the index's
/// sha256: what an import that is refused must leave as it was.
fn listing(data: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            let meta = e.metadata().expect("metadata");
            if meta.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p
                    .strip_prefix(root)
                    .expect("under root")
                    .display()
                    .to_string();
                out.insert(rel, meta.len().to_string());
            }
        }
    }
    let mut out = BTreeMap::new();
    for area in ["blobs", "manifests"] {
        walk(data, &data.join(area), &mut out);
    }
    let index = std::fs::read(data.join("index.json")).expect("the import wrote index.json");
    out.insert(
        "index.json sha256".into(),
        hex::encode(Sha256::digest(&index)),
    );
    out
}

/// A copy of `bundle` cut in the middle of the blob `digest`; returns the byte it was cut at.
fn truncated(bundle: &Path, digest: &str, out: &Path) -> u64 {
    let name = format!("blobs/{}", digest.replacen(':', "/", 1));
    let file = std::fs::File::open(bundle).expect("open bundle");
    let mut archive = tar::Archive::new(file);
    let (start, size) = archive
        .entries()
        .expect("tar entries")
        .map(|e| e.expect("tar entry"))
        .find(|e| e.path().expect("entry path").to_str() == Some(name.as_str()))
        .map(|e| (e.raw_file_position(), e.size()))
        .unwrap_or_else(|| panic!("no {name} in {}", bundle.display()));
    assert!(size >= 2, "{name} is too small to cut in the middle");
    let cut = start + size / 2;
    let bytes = std::fs::read(bundle).expect("read bundle");
    std::fs::write(out, &bytes[..cut as usize]).expect("write the cut bundle");
    cut
}

/// skopeo copies `oci-archive:BUNDLE:1` into a `dir:` and gets the upstream's manifest and
/// blobs: every platform's with `all`, else (an amd64 machine) the amd64 image's.
async fn assert_skopeo_reads(world: &World, bundle: &Path, img: &Image, all: bool) {
    let short = img.name.trim_start_matches("library/");
    let skopeo = Skopeo::plain(&world.dir(&format!("skopeo-{short}")));
    let out = world.dir(&format!(
        "from-bundle-{short}-{}",
        if all { "all" } else { "amd64" }
    ));
    let mut cmd = skopeo.command("copy");
    cmd.args(["--override-os", "linux", "--override-arch", "amd64"]);
    if all {
        cmd.arg("--all");
    }
    cmd.arg(format!("oci-archive:{}:1", path(bundle)))
        .arg(format!("dir:{}", path(&out)));
    let copied = run(&mut cmd, Duration::from_secs(120)).await;
    assert!(
        copied.status.success(),
        "skopeo copy {} failed: {}",
        bundle.display(),
        show(&copied)
    );
    let (digest, mut blobs) = if all || !img.is_index() {
        (&img.digest, img.blobs())
    } else {
        let amd64 = img.platform("amd64");
        (&amd64.digest, amd64.blobs())
    };
    assert_eq!(
        &dir_manifest_digest(&out),
        digest,
        "the manifest skopeo read from {} (all: {all}) is not the upstream's",
        bundle.display()
    );
    blobs.sort();
    assert_eq!(dir_blobs(&out), blobs, "blobs skopeo read for {}", img.name);
}

/// A world whose mirror prefetched `small` and `multi` (every platform) from the upstream and
/// was stopped; their bundles exported from its data dir, `[small, multi]`.
async fn exported(tools: &[&str]) -> (World, [PathBuf; 2]) {
    let mut world = World::with_mirror(tools).await;
    let (small, multi) = (world.image("small"), world.image("multi"));
    let refs = [small.docker_io(), multi.docker_io()];
    let data = world.mirror().data_dir.clone();
    let mirror_url = format!("http://{}", world.mirror().addr());
    let out = regmirror(&[
        "prefetch",
        &refs[0],
        &refs[1],
        "--all-platforms",
        "--mirror",
        &mirror_url,
        "--data-dir",
        path(&data),
    ])
    .await;
    assert!(out.status.success(), "prefetch: {}", show(&out));
    for img in [small, multi] {
        world.assert_blob_gets(img, &img.blobs(), 1, "after prefetch --all-platforms");
    }
    // Stopped, the mirror writes its index, which export reads.
    let mut mirror = world.mirror.take().expect("mirror");
    mirror.terminate().await;
    drop(mirror);

    // Both are tagged 1, and oci-archive names images by tag alone: one bundle each.
    let both = world.dir("bundles").join("both.tar");
    let data = path(&data).to_owned();
    let args = [
        "export",
        &refs[0],
        &refs[1],
        "-o",
        path(&both),
        "--data-dir",
        &data,
    ];
    let out = regmirror(&args).await;
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("tag 1"),
        "two images tagged 1 in one archive should be refused naming the tag: {}",
        show(&out)
    );
    let bundles = [small, multi].map(|img| {
        let short = img.name.trim_start_matches("library/");
        world.dir("bundles").join(format!("{short}.tar"))
    });
    for (bundle, reference) in bundles.iter().zip(&refs) {
        let out = regmirror(&["export", reference, "-o", path(bundle), "--data-dir", &data]).await;
        assert!(out.status.success(), "export {reference}: {}", show(&out));
    }
    (world, bundles)
}

/// skopeo reads each exported bundle as `oci-archive:BUNDLE:1`, with the upstream's digests:
/// the OCI-format index `multi` (all platforms, or amd64) and the Docker-format image `small`.
/// (containers/image looks a `:TAG` up only among descriptors of the OCI manifest and index
/// media types, so a bundle must let it find a Docker-format image that way too.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_reads_exported_bundles_with_upstream_digests() {
    let (world, bundles) = exported(&[]).await;
    assert_skopeo_reads(&world, &bundles[1], world.image("multi"), true).await;
    assert_skopeo_reads(&world, &bundles[1], world.image("multi"), false).await;
    assert_skopeo_reads(&world, &bundles[0], world.image("small"), false).await;
}

/// Bundles imported into an empty data dir serve a fresh dockerd from an `--offline` mirror
/// while the upstream is down; a bundle cut inside a blob is refused and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imported_bundles_serve_dockerd_offline_and_a_cut_bundle_changes_nothing() {
    let (mut world, bundles) = exported(&["dockerd", DOCKER]).await;
    let (small, multi) = (world.image("small"), world.image("multi"));
    let air = world.dir("air");
    let air_data = air.join("data");
    std::fs::create_dir_all(&air_data).expect("create the empty data dir");
    for (bundle, img) in bundles.iter().zip([small, multi]) {
        let out = regmirror(&["import", path(bundle), "--data-dir", path(&air_data)]).await;
        assert!(
            out.status.success(),
            "import {}: {}",
            bundle.display(),
            show(&out)
        );
        let said = String::from_utf8_lossy(&out.stdout);
        let want = format!("imported {}", img.docker_io());
        assert!(said.contains(&want), "`{want}` in: {}", show(&out));
    }

    let before = listing(&air_data);
    assert!(
        before.len() > 10,
        "the imports stored too little: {before:?}"
    );
    let cut = world.dir("bundles").join("cut.tar");
    let layer = &multi.platform("amd64").layers[0];
    let at = truncated(&bundles[1], layer, &cut);
    let out = regmirror(&["import", path(&cut), "--data-dir", path(&air_data)]).await;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("damaged"),
        "a bundle cut at byte {at}, inside layer {layer}, should be refused as damaged: {}",
        show(&out)
    );
    assert_eq!(
        listing(&air_data),
        before,
        "the refused import changed the cache"
    );
    let left: Vec<_> = std::fs::read_dir(air_data.join("tmp"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "the refused import left temp files: {left:?}"
    );

    world.upstream.stop();
    let offline = Options {
        offline: true,
        ..Options::default()
    };
    let air_mirror = Mirror::start_with(&air, &world.upstream.url(), &offline).await;
    let out = regmirror(&["import", path(&bundles[0]), "--data-dir", path(&air_data)]).await;
    assert!(
        !out.status.success(),
        "import beside a running mirror: {}",
        show(&out)
    );
    let mark = air_mirror.log_mark();
    let args = [
        "--registry-mirror".into(),
        format!("http://{}", air_mirror.addr()),
    ];
    let dockerd = Dockerd::start(&world.dir("dk"), &args).await;
    for img in [small, multi] {
        dockerd.pull(&img.docker_io()).await;
        let want = format!("{}@{}", img.name.trim_start_matches("library/"), img.digest);
        let got = dockerd.repo_digests(&img.docker_io()).await;
        assert_eq!(
            got,
            vec![want],
            "RepoDigests of {} pulled offline",
            img.docker_io()
        );
        let amd64 = img.platform("amd64").blobs();
        air_mirror.assert_served_blobs(mark, &img.name, &amd64, "hit");
    }
}
