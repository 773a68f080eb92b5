//! deploy/Dockerfile and /.dockerignore: the stages, the user, the volume, the health check,
//! what the build context lets in, hadolint; the entrypoint started as the image starts it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::mirror::{assert_serves_v2, wait_ready, Mirror, Mounts};
use crate::{read, repo, run_ok, tool, CONFIG, DATA_DIR};

struct Instruction {
    keyword: String,
    args: String,
}

/// The instructions, continuation lines joined and comments dropped.
fn dockerfile() -> Vec<Instruction> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in read("deploy/Dockerfile").lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(trimmed);
                let (keyword, args) = current.split_once(' ').unwrap_or((&current, ""));
                out.push(Instruction {
                    keyword: keyword.to_ascii_uppercase(),
                    args: args.split_whitespace().collect::<Vec<_>>().join(" "),
                });
                current.clear();
            }
        }
    }
    out
}

/// The instructions after the last `FROM`: the runtime image.
fn runtime_stage(all: &[Instruction]) -> &[Instruction] {
    let last_from = all.iter().rposition(|i| i.keyword == "FROM").unwrap();
    &all[last_from..]
}

fn args_of<'a>(stage: &'a [Instruction], keyword: &str) -> Vec<&'a str> {
    stage
        .iter()
        .filter(|i| i.keyword == keyword)
        .map(|i| i.args.as_str())
        .collect()
}

/// `ENTRYPOINT ["regmirror", ...]`, without the program.
pub fn image_entrypoint() -> Vec<String> {
    let all = dockerfile();
    let args = args_of(runtime_stage(&all), "ENTRYPOINT");
    let argv: Vec<String> = serde_json::from_str(args.last().expect("an ENTRYPOINT"))
        .expect("ENTRYPOINT in exec form (a JSON list)");
    assert_eq!(
        argv[..2],
        ["regmirror", "serve"],
        "the entrypoint runs `regmirror serve`"
    );
    argv[1..].to_vec()
}

/// The user and group of `USER uid:gid`.
pub fn image_user() -> (u64, u64) {
    let all = dockerfile();
    let users = args_of(runtime_stage(&all), "USER");
    let user = users.last().expect("the runtime stage sets a USER");
    let (uid, gid) = user.split_once(':').unwrap_or((user, user));
    let (uid, gid) = (uid.parse().ok(), gid.parse().ok());
    let (Some(uid), Some(gid)) = (uid, gid) else {
        panic!("USER {user}: numeric, so that Kubernetes' runAsNonRoot can check it")
    };
    assert_ne!(uid, 0, "the image must not run as root");
    (uid, gid)
}

/// The repository file the runtime stage copies to `dest`.
fn image_file_source(dest: &str) -> String {
    let all = dockerfile();
    args_of(runtime_stage(&all), "COPY")
        .into_iter()
        .filter(|a| !a.starts_with("--from"))
        .find_map(|a| {
            let words: Vec<&str> = a.split_whitespace().collect();
            (words.len() == 2 && words[1] == dest).then(|| words[0].to_owned())
        })
        .unwrap_or_else(|| panic!("the runtime stage copies no file to {dest}"))
}

/// The shell command of `HEALTHCHECK ... CMD <command>`.
pub fn image_healthcheck() -> String {
    let all = dockerfile();
    let checks = args_of(runtime_stage(&all), "HEALTHCHECK");
    let check = checks.last().expect("a HEALTHCHECK");
    check
        .split_once("CMD ")
        .expect("HEALTHCHECK ... CMD")
        .1
        .to_owned()
}

#[test]
fn dockerfile_builds_in_stages_and_runs_unprivileged() {
    let all = dockerfile();
    let froms = args_of(&all, "FROM");
    assert!(froms.len() >= 2, "a multi-stage build: {froms:?}");
    assert!(
        froms[0].starts_with("rust:") && froms[0].ends_with(" AS build"),
        "{froms:?}"
    );
    assert_eq!(froms.last().unwrap(), &"debian:bookworm-slim");
    let build_runs = args_of(
        &all[..all.iter().rposition(|i| i.keyword == "FROM").unwrap()],
        "RUN",
    );
    assert!(
        build_runs
            .iter()
            .any(|r| r.contains("cargo build --release --locked")),
        "{build_runs:?}"
    );

    let stage = runtime_stage(&all);
    let installs = args_of(stage, "RUN").join(" ");
    for package in ["ca-certificates", "curl"] {
        assert!(
            installs.contains(package),
            "the runtime image installs {package}"
        );
    }
    image_user(); // numeric, not root
    assert!(args_of(stage, "VOLUME").iter().any(|v| v
        .split_whitespace()
        .any(|p| p.trim_matches(['[', ']', '"', ',']) == DATA_DIR)));
    assert!(args_of(stage, "EXPOSE")
        .iter()
        .any(|e| e.split_whitespace().any(|p| p == "5000" || p == "5000/tcp")));
    let health = image_healthcheck();
    assert!(
        health.contains("127.0.0.1:5000/readyz"),
        "the health check asks /readyz: {health}"
    );
    assert!(
        health.starts_with("curl"),
        "curl is what the image installs for it: {health}"
    );

    let entry = image_entrypoint();
    for pair in [["--config", CONFIG], ["--data-dir", DATA_DIR]] {
        assert!(
            entry.windows(2).any(|w| w == pair),
            "the entrypoint passes {pair:?}: {entry:?}"
        );
    }
    assert!(
        repo(&image_file_source(CONFIG)).is_file(),
        "the image's {CONFIG} comes from the repository"
    );
}

#[test]
fn dockerignore_lets_in_what_the_build_copies() {
    let ignore = read(".dockerignore");
    let rules: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(rules.first(), Some(&"*"), "everything is left out first");
    let all = dockerfile();
    for copy in args_of(&all, "COPY")
        .into_iter()
        .filter(|a| !a.starts_with("--from"))
    {
        let words: Vec<&str> = copy.split_whitespace().collect();
        for source in &words[..words.len() - 1] {
            let source = source.trim_end_matches('/');
            assert!(
                rules
                    .iter()
                    .any(|r| r.strip_prefix('!').map(|r| r.trim_end_matches('/')) == Some(source)),
                "COPY {source}: .dockerignore must let it in (!{source})"
            );
            assert!(
                repo(source).exists(),
                "COPY {source}: no such file in the repository"
            );
        }
    }
}

/// What the build stage copies into its work dir, as repository paths.
fn build_stage_sources() -> Vec<PathBuf> {
    let all = dockerfile();
    let last_from = all.iter().rposition(|i| i.keyword == "FROM").unwrap();
    args_of(&all[..last_from], "COPY")
        .into_iter()
        .filter(|a| !a.starts_with("--"))
        .flat_map(|a| {
            let words: Vec<&str> = a.split_whitespace().collect();
            words[..words.len() - 1]
                .iter()
                .map(|w| PathBuf::from(w.trim_end_matches('/')))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Every `.rs` file under `dir` (a repository path).
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(repo(&dir.to_string_lossy())) else {
        return Vec::new();
    };
    entries
        .map(|e| dir.join(e.unwrap().file_name()))
        .flat_map(|p| match repo(&p.to_string_lossy()).is_dir() {
            true => rust_files(&p),
            false => p
                .extension()
                .is_some_and(|x| x == "rs")
                .then_some(p)
                .into_iter()
                .collect(),
        })
        .collect()
}

/// `cargo build` in the image reads every target Cargo.toml declares and every file the
/// sources include: all must be among what the build stage copies.
#[test]
fn build_stage_copies_what_cargo_reads() {
    let copied = build_stage_sources();
    let is_copied = |p: &Path| copied.iter().any(|c| p.starts_with(c));
    let manifest: toml::Table = toml::from_str(&read("Cargo.toml")).unwrap();
    let mut needed: Vec<PathBuf> = vec!["Cargo.toml".into(), "Cargo.lock".into()];
    for (kind, dir) in [
        ("bin", "src/bin"),
        ("bench", "benches"),
        ("test", "tests"),
        ("example", "examples"),
    ] {
        for target in manifest
            .get(kind)
            .and_then(|t| t.as_array())
            .into_iter()
            .flatten()
        {
            let name = target["name"].as_str().unwrap();
            needed.push(match target.get("path").and_then(|p| p.as_str()) {
                Some(path) => path.into(),
                None if repo(&format!("{dir}/{name}.rs")).exists() => {
                    format!("{dir}/{name}.rs").into()
                }
                None => format!("{dir}/{name}/main.rs").into(),
            });
        }
    }
    if let Some(path) = manifest
        .get("lib")
        .and_then(|l| l.get("path"))
        .and_then(|p| p.as_str())
    {
        needed.push(path.into());
    }
    if repo("build.rs").exists() {
        needed.push("build.rs".into());
    }
    // include_str!/include_bytes! paths, relative to the including file.
    for file in copied.iter().flat_map(|c| rust_files(c)) {
        let text = read(&file.to_string_lossy());
        let after = |mac: &str| text.split(mac).skip(1).collect::<Vec<_>>();
        for part in [after("include_str!(\""), after("include_bytes!(\"")].concat() {
            let Some((rel, _)) = part.split_once('"') else {
                continue;
            };
            let mut path = file.parent().unwrap().to_owned();
            for c in Path::new(rel).components() {
                match c {
                    std::path::Component::ParentDir => {
                        path.pop();
                    }
                    other => path.push(other),
                }
            }
            needed.push(path);
        }
    }
    for path in needed {
        assert!(
            is_copied(&path),
            "cargo needs {}; deploy/Dockerfile's build stage does not copy it ({copied:?})",
            path.display()
        );
    }
}

#[test]
fn dockerfile_passes_hadolint() {
    let Some(hadolint) = tool("hadolint") else {
        return;
    };
    run_ok(Command::new(hadolint).arg(repo("deploy/Dockerfile")));
}

#[tokio::test]
async fn image_entrypoint_serves_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mounts = Mounts::new(vec![
        (CONFIG.into(), repo(&image_file_source(CONFIG))),
        (DATA_DIR.into(), dir.path().join("data")),
    ]);
    let mut mirror = Mirror::start(&image_entrypoint(), &mounts, &[]);
    let base = format!("http://{}", mirror.addr);
    assert_serves_v2(&base, None).await;
    if tool("curl").is_some() {
        wait_ready(&base).await;
        mirror.run_check(&["sh".into(), "-c".into(), image_healthcheck()]);
    }
    let exit = mirror.terminate(Duration::from_secs(15)).await;
    assert!(
        exit.is_some_and(|s| s.success()),
        "SIGTERM: a clean exit within 15 s, got {exit:?}; log:\n{}",
        mirror.log()
    );
    assert!(
        dir.path().join("data").is_dir(),
        "the cache is in the data dir given"
    );
}
