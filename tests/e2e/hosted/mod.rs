//! Hosted repositories (issue 16) pushed to and pulled from by real clients: the operator
//! guides' dockerd workflow over TLS with htpasswd (`guide`), skopeo and containerd copying
//! images and an index in and out (`copies`), the refusals a client sees (`refusals`), a layer
//! cached from the upstream mounted into a hosted repository rather than uploaded (`mount`),
//! and a repository listed, kept over a restart and deleted with skopeo (`lifecycle`). Every mirror here hosts `myorg/*` and `hello-world`; the images pushed are
//! written by the test as OCI layouts ([`crate::oci`]), since nothing here reaches Docker Hub.

mod copies;
mod guide;
mod lifecycle;
mod mount;
mod refusals;

use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::mirror::{Options, Served};
use crate::oci::{Content, Flavor, Layout, Manifest};
use crate::world::World;

/// The `[hosted]` table of every mirror in these tests, as issue 16 writes it.
const HOSTED: &str = "[hosted]\nrepos = [\"myorg/*\", \"hello-world\"]\n";

/// Writes `DIR/mirror.toml`: `extra` (other tables) and [`HOSTED`].
fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let config = dir.join("mirror.toml");
    std::fs::write(&config, format!("{extra}\n{HOSTED}")).expect("write mirror.toml");
    config
}

/// A world whose plain-HTTP mirror hosts [`HOSTED`] with `extra` in its configuration (and
/// answers `GET /v2/` with `ready`: 401 when it has users).
async fn hosted_world(tools: &[&str], extra: &str, env: &[(&str, &str)], ready: u16) -> World {
    let mut world = World::upstream_only(tools).await;
    start_hosted_mirror(&mut world, extra, env, ready).await;
    world
}

/// Starts `world`'s plain-HTTP mirror as [`hosted_world`] does.
async fn start_hosted_mirror(world: &mut World, extra: &str, env: &[(&str, &str)], ready: u16) {
    let config = write_config(&world.dir("ops"), extra);
    let opts = Options {
        config: Some(config),
        ready_status: ready,
        ..Options::env(env)
    };
    world.start_mirror_with(&opts).await;
}

/// A small single-platform image in a new layout at `dir`, tagged `tag`: a text layer and
/// `random` incompressible bytes in a second layer (none when 0), so that uploads carry
/// something.
fn small_image(dir: &Path, tag: &str, label: &str, random: u64) -> Manifest {
    let mut layout = Layout::create(dir);
    let mut layers = vec![layout.add_layer(&[(
        "etc/hosted-e2e",
        Content::Text(format!("pushed to a hosted repository: {label}\n")),
    )])];
    if random > 0 {
        layers.push(layout.add_layer(&[(
            "opt/noise",
            Content::Random {
                len: random,
                seed: label.len() as u64 * 7919 + random,
            },
        )]));
    }
    let manifest = layout.add_image(Flavor::Oci, "linux", "amd64", &layers);
    layout.tag(tag, manifest.media_type, &manifest.blob);
    layout.finish();
    manifest
}

/// The bytes of blob `digest` in the layout at `dir`.
fn layout_blob(dir: &Path, digest: &str) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    let path = dir.join("blobs/sha256").join(hex);
    std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// `sha256:<hex>` of a file.
fn file_digest(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    format!("sha256:{}", hex::encode(Sha256::digest(&bytes)))
}

/// Asserts that skopeo's `dir:` output `out` holds exactly `blobs`, each with the bytes the
/// layout at `layout` has for it.
fn assert_same_blobs(layout: &Path, out: &Path, blobs: &[String], what: &str) {
    let mut want = blobs.to_vec();
    want.sort();
    want.dedup();
    assert_eq!(crate::skopeo::dir_blobs(out), want, "the blobs of {what}");
    for digest in &want {
        let hex = digest.trim_start_matches("sha256:");
        let got = std::fs::read(out.join(hex)).expect("read a copied blob");
        assert!(
            got == layout_blob(layout, digest),
            "{what}: the bytes of {digest} copied back differ from those pushed"
        );
    }
}

/// Asserts that neither the upstream nor its token issuer heard of repository `name`: a
/// hosted repository's pushes and pulls stay in the mirror.
fn assert_upstream_never_asked(world: &World, name: &str) {
    let needle = format!("/v2/{name}/");
    let asked: Vec<_> = world
        .upstream
        .served()
        .into_iter()
        .filter(|s| s.path.starts_with(&needle))
        .collect();
    assert!(
        asked.is_empty(),
        "the upstream was asked about the hosted repository {name}: {asked:?}"
    );
    let scope = format!("repository:{name}:");
    let tokens: Vec<_> = world
        .issuer
        .requests()
        .into_iter()
        .filter(|r| r.scopes.iter().any(|s| s.starts_with(&scope)))
        .collect();
    assert!(
        tokens.is_empty(),
        "the upstream's token issuer was asked for {name}: {tokens:?}"
    );
}

/// The requests of the mirror's access log since `mark` that write to repository `name`
/// (POST, PATCH, PUT, DELETE under `/v2/<name>/`).
fn writes_to(world: &World, mark: usize, name: &str) -> Vec<Served> {
    let prefix = format!("/v2/{name}/");
    world
        .mirror()
        .served_since(mark)
        .into_iter()
        .filter(|s| s.path.starts_with(&prefix) && !matches!(s.method.as_str(), "GET" | "HEAD"))
        .collect()
}

/// One request per line, for failure messages.
fn listing(served: &[Served]) -> String {
    served
        .iter()
        .map(|s| format!("  {} {} {}", s.method, s.path, s.status))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The output of a client command, for failure messages and error text checks.
fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The digest `docker push` reports (`latest: digest: sha256:... size: N`).
fn pushed_digest(output: &str) -> String {
    output
        .lines()
        .find_map(|l| l.split("digest: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no digest in the output of docker push:\n{output}"))
        .to_owned()
}
