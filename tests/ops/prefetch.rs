//! `regmirror prefetch` run as the binary against the fake upstream: through a mirror it starts
//! itself on an unlocked data dir (which a mirror then serves with no upstream request at
//! all), through a running mirror (`--mirror`, or the `listen` of its config), with a failing
//! image among good ones, from `--from-file`, and per platform of a multi-arch index.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::images::ImageInfo;
use crate::common::{random_bytes, start_mirror, FakeUpstream, MirrorHandle};
use crate::{pull_expecting, REPO};

/// What one run of the binary did.
pub struct Run {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
    pub took: Duration,
}

impl Run {
    pub fn show(&self) -> String {
        format!(
            "--- stdout ---\n{}--- stderr ---\n{}",
            self.stdout, self.stderr
        )
    }
}

/// `regmirror ARGS` with no `REGMIRROR_*` variables but `env`; at most 60 s.
pub async fn regmirror(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_regmirror"));
    cmd.args(args).kill_on_drop(true).env_remove("RUST_LOG");
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("REGMIRROR_") {
            cmd.env_remove(key);
        }
    }
    cmd.envs(env.iter().copied());
    let started = Instant::now();
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("regmirror {args:?} ran for over 60 s"))
        .expect("run regmirror");
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took: started.elapsed(),
    }
}

/// `regmirror prefetch ARGS --data-dir DATA` with the fake as the upstream.
async fn prefetch(fake: &FakeUpstream, data: &Path, args: &[&str]) -> Run {
    let mut all = vec!["prefetch"];
    all.extend_from_slice(args);
    all.extend(["--data-dir", data.to_str().unwrap()]);
    regmirror(&all, &[("REGMIRROR_UPSTREAM_URL", &fake.url())]).await
}

/// A small image (its byte counts print as plain bytes) at `REPO:tag`.
fn small_image(fake: &FakeUpstream, tag: &str, seed: u64) -> ImageInfo {
    fake.add_image(REPO, tag, vec![random_bytes(300, seed)])
}

fn bytes_of(img: &ImageInfo) -> usize {
    img.blobs().iter().map(|(_, b)| b.len()).sum()
}

/// The line `prefetch` prints for an image.
fn line(image: &str, blobs: usize, fetched: usize, cached: usize) -> String {
    format!("{image}: {blobs} blobs, {fetched} B fetched, {cached} B already cached")
}

fn assert_fetched_once(fake: &FakeUpstream, img: &ImageInfo, why: &str) {
    for (d, _) in img.blobs() {
        assert_eq!(fake.blob_gets(&d), 1, "{why}: upstream GETs of {d}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_on_an_idle_data_dir_fills_it_for_a_mirror_that_then_asks_nothing_upstream() {
    let fake = FakeUpstream::start().await;
    let img = small_image(&fake, "v1", 50);
    let data = tempfile::tempdir().unwrap();
    let n = bytes_of(&img);

    let run = prefetch(&fake, data.path(), &["team/app:v1"]).await;
    assert!(run.ok, "prefetch failed:\n{}", run.show());
    assert!(
        run.stdout.contains(&line("team/app:v1", 2, n, 0)),
        "{}",
        run.show()
    );
    let summary = format!("1 images: {n} B fetched from upstream, 0 B already cached");
    assert!(run.stdout.contains(&summary), "{}", run.show());
    assert_fetched_once(&fake, &img, "after prefetch");
    assert!(
        run.took < Duration::from_secs(8),
        "prefetch of a {n}-byte image took {:?}",
        run.took
    );

    let again = prefetch(&fake, data.path(), &["team/app:v1"]).await;
    assert!(again.ok, "{}", again.show());
    assert!(
        again.stdout.contains(&line("team/app:v1", 2, 0, n)),
        "{}",
        again.show()
    );
    assert_fetched_once(&fake, &img, "after the second prefetch");

    fake.reset_counts();
    let m = MirrorHandle::start_in(data, &fake.url(), |_| {}).await;
    pull_expecting(&m, &img, "v1", "hit").await;
    assert!(
        fake.requests().is_empty() && fake.token_fetches().is_empty(),
        "a mirror on the prefetched data dir asked the upstream: {:?}",
        fake.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_pulls_through_a_running_mirror_by_url_or_by_its_config() {
    let fake = FakeUpstream::start().await;
    let v1 = small_image(&fake, "v1", 51);
    let v2 = small_image(&fake, "v2", 52);
    let m = start_mirror(&fake.url(), |_| {}).await;
    let data = m.data_dir.to_str().unwrap().to_owned();

    let run = prefetch(&fake, &m.data_dir, &["team/app:v1", "--mirror", &m.url]).await;
    assert!(run.ok, "prefetch --mirror failed:\n{}", run.show());
    assert!(
        run.stdout
            .contains(&line("team/app:v1", 2, bytes_of(&v1), 0)),
        "{}",
        run.show()
    );
    assert_fetched_once(&fake, &v1, "prefetch --mirror");
    pull_expecting(&m, &v1, "v1", "hit").await;

    // The data dir is locked by the running mirror: prefetch goes to its `listen` address.
    // The config names Docker Hub as the upstream, which only a mirror of its own would use.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("mirror.toml");
    let listen = m.url.trim_start_matches("http://");
    std::fs::write(
        &config,
        format!("listen = \"{listen}\"\ndata_dir = \"{data}\"\n"),
    )
    .unwrap();
    let args = [
        "prefetch",
        "team/app:v2",
        "--config",
        config.to_str().unwrap(),
    ];
    let run = regmirror(&args, &[]).await;
    assert!(run.ok, "prefetch --config failed:\n{}", run.show());
    assert!(
        run.stdout
            .contains(&line("team/app:v2", 2, bytes_of(&v2), 0)),
        "{}",
        run.show()
    );
    assert_fetched_once(&fake, &v2, "prefetch via the config's listen");
    pull_expecting(&m, &v2, "v2", "hit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_image_fails_the_command_by_name_while_the_others_are_fetched() {
    let fake = FakeUpstream::start().await;
    let imgs: Vec<ImageInfo> = (1..=3)
        .map(|i| small_image(&fake, &format!("v{i}"), 60 + i))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("images.txt");
    std::fs::write(
        &list,
        "# warm these before the training\nteam/app:v2\n\n  team/missing:1   # gone upstream\nteam/app:v3\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let args = ["team/app:v1", "--from-file", list.to_str().unwrap()];
    let run = prefetch(&fake, &data, &args).await;
    assert!(
        !run.ok,
        "a missing image must fail the command:\n{}",
        run.show()
    );
    assert!(
        run.stderr.contains("team/missing:1: FAILED"),
        "{}",
        run.show()
    );
    assert!(
        run.stderr.contains("prefetch failed for team/missing:1"),
        "the error names the failed image only:\n{}",
        run.show()
    );
    for (i, img) in imgs.iter().enumerate() {
        let name = format!("team/app:v{}", i + 1);
        assert!(
            run.stdout.contains(&line(&name, 2, bytes_of(img), 0)),
            "{}",
            run.show()
        );
        assert!(
            !run.stderr.contains(&name),
            "{name} did not fail:\n{}",
            run.show()
        );
        assert_fetched_once(&fake, img, &name);
    }
    assert!(run.stdout.contains("4 images:"), "{}", run.show());

    let none = prefetch(
        &fake,
        &data,
        &["--from-file", dir.path().join("nope").to_str().unwrap()],
    )
    .await;
    assert!(!none.ok && none.stderr.contains("nope"), "{}", none.show());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn platform_picks_one_child_of_an_index_and_all_platforms_every_child() {
    let fake = FakeUpstream::start().await;
    let layers = |seed| vec![random_bytes(200, seed)];
    let arches = ["amd64", "arm64", "s390x"];
    let index = fake.add_index(
        REPO,
        "multi",
        arches
            .iter()
            .zip(70..)
            .map(|(a, s)| (*a, layers(s)))
            .collect(),
    );
    let child_gets = |arch: &str| {
        let d = &index.child(arch).manifest_digest;
        fake.count("GET", &format!("/v2/{REPO}/manifests/{d}"))
    };
    let blob_gets = |arch: &str| -> Vec<usize> {
        let img = index.child(arch);
        img.blobs().iter().map(|(d, _)| fake.blob_gets(d)).collect()
    };
    let size = |arch: &str| bytes_of(index.child(arch));
    let data = tempfile::tempdir().unwrap();
    let image = "team/app:multi";

    let run = prefetch(&fake, data.path(), &[image]).await;
    assert!(run.ok, "{}", run.show());
    assert!(
        run.stdout.contains(&line(image, 2, size("amd64"), 0)),
        "{}",
        run.show()
    );
    assert_eq!(
        (
            child_gets("amd64"),
            child_gets("arm64"),
            child_gets("s390x")
        ),
        (1, 0, 0)
    );
    assert_eq!(blob_gets("amd64"), [1, 1], "linux/amd64 is the default");
    assert_eq!(blob_gets("arm64"), [0, 0]);

    let run = prefetch(&fake, data.path(), &[image, "--platform", "linux/arm64"]).await;
    assert!(run.ok, "{}", run.show());
    assert!(
        run.stdout.contains(&line(image, 2, size("arm64"), 0)),
        "{}",
        run.show()
    );
    assert_eq!(
        (
            child_gets("amd64"),
            child_gets("arm64"),
            child_gets("s390x")
        ),
        (1, 1, 0)
    );
    assert_eq!(blob_gets("arm64"), [1, 1]);
    assert_eq!(blob_gets("s390x"), [0, 0]);

    let run = prefetch(&fake, data.path(), &[image, "--all-platforms"]).await;
    assert!(run.ok, "{}", run.show());
    let cached = size("amd64") + size("arm64");
    assert!(
        run.stdout.contains(&line(image, 6, size("s390x"), cached)),
        "{}",
        run.show()
    );
    assert_eq!(
        (
            child_gets("amd64"),
            child_gets("arm64"),
            child_gets("s390x")
        ),
        (1, 1, 1)
    );
    for arch in arches {
        assert_eq!(
            blob_gets(arch),
            [1, 1],
            "{arch} blobs after --all-platforms"
        );
    }

    let run = prefetch(&fake, data.path(), &[image, "--platform", "linux/ppc64le"]).await;
    assert!(!run.ok, "no linux/ppc64le child, yet:\n{}", run.show());
    assert!(run.stderr.contains("team/app:multi"), "{}", run.show());
    let both = ["--platform", "linux/arm64", "--all-platforms"];
    let run = prefetch(&fake, data.path(), &[&[image][..], &both[..]].concat()).await;
    assert!(!run.ok, "--platform with --all-platforms:\n{}", run.show());
}

/// An air-gapped site seeds a mirror from a bundle of a wide image: `import` must not keep a
/// file open per blob, or a bundle with more blobs than the open-file limit fails to load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_with_more_blobs_than_the_open_file_limit_imports() {
    let fake = FakeUpstream::start().await;
    let layers: Vec<Vec<u8>> = (0..150).map(|i| random_bytes(200, 600 + i)).collect();
    let img = fake.add_image(REPO, "wide", layers);
    let source = tempfile::tempdir().unwrap();
    let run = prefetch(&fake, source.path(), &["team/app:wide"]).await;
    assert!(run.ok, "prefetch failed:\n{}", run.show());

    let bundle = source.path().join("wide.tar");
    let (src, out) = (source.path().to_str().unwrap(), bundle.to_str().unwrap());
    let run = regmirror(
        &["export", "--data-dir", src, "-o", out, "team/app:wide"],
        &[],
    )
    .await;
    assert!(run.ok, "export failed:\n{}", run.show());

    // 64 descriptors for a bundle of 152 files (150 layers, a config, a manifest).
    let target = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("sh")
        .args([
            "-c",
            r#"ulimit -n 64 && exec "$0" import --data-dir "$1" "$2""#,
            env!("CARGO_BIN_EXE_regmirror"),
            target.path().to_str().unwrap(),
            bundle.to_str().unwrap(),
        ])
        .env_remove("RUST_LOG")
        .output()
        .expect("run regmirror import");
    assert!(
        out.status.success(),
        "import under `ulimit -n 64` failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    fake.reset_counts();
    let m = MirrorHandle::start_in(target, &fake.url(), |c| c.offline = true).await;
    pull_expecting(&m, &img, "wide", "hit").await;
    assert!(
        fake.requests().is_empty(),
        "the offline mirror asked the upstream: {:?}",
        fake.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_through_a_mirror_with_auth_takes_the_password_from_a_file_or_the_environment() {
    let fake = FakeUpstream::start().await;
    let imgs: Vec<ImageInfo> = (1..=3)
        .map(|i| small_image(&fake, &format!("v{i}"), 70 + i))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("htpasswd");
    std::fs::write(
        &users,
        crate::common::front::htpasswd_line("moby", "gordon") + "\n",
    )
    .unwrap();
    let m =
        crate::common::front::Front::start(&fake.url(), |c| c.auth.htpasswd = Some(users.clone()))
            .await;
    let (url, data) = (
        format!("http://{}", m.addr),
        m.data_dir.to_str().unwrap().to_owned(),
    );
    let run_as = |image: &str, extra: Vec<String>, env: Vec<(&'static str, &'static str)>| {
        let mut args: Vec<String> = ["prefetch", image, "--mirror", &url, "--data-dir", &data]
            .map(str::to_owned)
            .to_vec();
        args.extend(extra);
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            regmirror(&args, &env).await
        }
    };
    let user = |u: &str| vec!["--user".to_owned(), u.to_owned()];

    let run = run_as(
        "team/app:v1",
        user("moby"),
        vec![("REGMIRROR_PREFETCH_PASSWORD", "gordon")],
    )
    .await;
    assert!(run.ok, "password from the environment:\n{}", run.show());
    assert_fetched_once(&fake, &imgs[0], "password from the environment");

    let file = dir.path().join("password");
    std::fs::write(&file, "gordon\n").unwrap();
    let mut args = user("moby");
    args.extend(["--password-file".to_owned(), file.display().to_string()]);
    let run = run_as("team/app:v2", args, vec![]).await;
    assert!(run.ok, "password from a file:\n{}", run.show());
    assert!(!run.stderr.contains("warning"), "{}", run.show());
    assert_fetched_once(&fake, &imgs[1], "password from a file");

    let run = run_as("team/app:v3", user("moby"), vec![]).await;
    assert!(!run.ok, "no password, yet it succeeded:\n{}", run.show());
    assert!(
        run.stderr.contains("--password-file")
            && run.stderr.contains("REGMIRROR_PREFETCH_PASSWORD"),
        "{}",
        run.show()
    );
    assert_eq!(fake.blob_gets(&imgs[2].blobs()[0].0), 0);

    // The old form still works, with a warning.
    let run = run_as("team/app:v3", user("moby:gordon"), vec![]).await;
    assert!(run.ok, "{}", run.show());
    assert!(run.stderr.contains("process list"), "{}", run.show());
    assert_fetched_once(&fake, &imgs[2], "USER:PASSWORD");
}
