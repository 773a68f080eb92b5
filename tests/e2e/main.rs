//! End-to-end tests: real clients (skopeo, dockerd, containerd) configured as users configure
//! them pull images through the `regmirror` binary from a real upstream (Debian's
//! docker-registry behind a Docker-Hub-like token issuer), and each test checks what a user
//! would check plus, from the upstream's access log, that the mirror served the pull.
//!
//! Run with `cargo test --test e2e` as root with docker-registry, skopeo, docker.io (dockerd),
//! containerd, openssl and htpasswd (apache2-utils) installed; a missing tool fails the tests
//! rather than skipping them. The TLS tests add (and remove) their own
//! `/etc/docker/certs.d/127.0.0.1:PORT` entry, the one place dockerd reads registry CAs from.
//!
//! # Layout
//! - `procs`: spawned processes (killed on drop), ports, running commands.
//! - `issuer`, `upstream`: the token issuer and docker-registry, with their request counts.
//! - `oci`, `fixture`: the test images, generated and pushed once per build of this code.
//! - `mirror`: the regmirror under test.
//! - `skopeo`, `dockerd`, `containerd`: the clients.
//! - `world`: one test's issuer + upstream(s) + mirror in a temporary directory.
//! - `push`: pushing blobs and manifests to a writable upstream (a second registry's content).
//! - `certs`: certificates and htpasswd files as operators make them; pinned HTTPS clients.
//! - `cluster`: replicas sharing a Garage bucket and a Redis behind nginx (its own harness).
//!
//! Tests live here (pulls through a mirror) and in `offline` (upstream stopped, restarts,
//! `--offline`), `tls` (HTTPS, users, reloads), `multi` (two registries through one mirror)
//! and `hosted` (pushes to hosted repositories, and pulls of them).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod airgap;
mod certs;
mod cluster;
mod containerd;
mod dockerd;
mod fixture;
mod hosted;
mod issuer;
mod mirror;
mod multi;
mod oci;
mod offline;
mod procs;
mod push;
mod skopeo;
mod tls;
mod upstream;
mod world;

use crate::containerd::Containerd;
use crate::dockerd::{Dockerd, DOCKER};
use crate::fixture::{manifest_digest, Image};
use crate::skopeo::{dir_blobs, Skopeo};
use crate::world::World;

/// Asserts that a client recorded `got` for `image`, where `want` is the upstream's digest.
fn assert_digest(client: &str, image: &Image, got: &str, want: &str) {
    assert_eq!(
        got,
        want,
        "{client} got digest {got} for {}, but the upstream's is {want}",
        image.docker_io()
    );
}

/// Asserts that the mirror holds each of `blobs` in its cache directory, within a few
/// seconds: a download's last byte goes out once it verifies, its commit (fsync, rename)
/// follows.
fn assert_cached(world: &World, blobs: &[String]) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let missing = loop {
        let missing: Vec<&String> = blobs
            .iter()
            .filter(|b| !world.mirror().blob_path(b).is_file())
            .collect();
        if missing.is_empty() || std::time::Instant::now() > deadline {
            break missing;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(
        missing.is_empty(),
        "the mirror's cache ({}) lacks blobs it served: {missing:?}",
        world.mirror().data_dir.display()
    );
}

/// Proves the harness without the mirror: each client pulls straight from the upstream (token
/// auth, plain HTTP). When this fails, the harness or the machine is at fault, not regmirror.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_clients_pull_straight_from_upstream() {
    let world = World::upstream_only(&["dockerd", DOCKER, "containerd", "ctr"]).await;
    let small = world.image("small");
    let multi = world.image("multi");
    let up = world.upstream.addr();
    let direct = |img: &Image| format!("{up}/{}:{}", img.name, img.tag);

    let skopeo = Skopeo::plain(&world.dir("skopeo"));
    let got = skopeo
        .pull_to_dir(&direct(small), &world.dir("s-small"), false)
        .await;
    assert_digest("skopeo", small, &got, &small.digest);
    let got = skopeo
        .pull_to_dir(&direct(multi), &world.dir("s-multi"), true)
        .await;
    assert_digest("skopeo --all", multi, &got, &multi.digest);

    let ctr = Containerd::start(&world.dir("ct"), None).await;
    ctr.pull(&direct(multi), &["--plain-http"]).await;
    let got = ctr.image_digest(&direct(multi)).await;
    assert_digest("ctr", multi, &got, &multi.digest);

    let dockerd = Dockerd::start(
        &world.dir("dk"),
        &["--insecure-registry".into(), up.clone()],
    )
    .await;
    dockerd.pull(&direct(small)).await;
    let digests = dockerd.repo_digests(&direct(small)).await;
    assert_eq!(
        digests,
        vec![format!("{up}/{}@{}", small.name, small.digest)]
    );

    let tokens = world.issuer.requests();
    let pull_small = format!("repository:{}:pull", small.name);
    assert!(
        tokens
            .iter()
            .any(|r| r.status == 200 && r.basic_user.is_none() && r.scopes.contains(&pull_small)),
        "the clients should have fetched anonymous tokens for {pull_small}: {tokens:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_pulls_through_mirror_with_upstream_digests() {
    let world = World::with_mirror(&[]).await;
    let images = ["small", "many", "big", "multi"].map(|s| world.image(s));
    for img in images {
        let upstream = manifest_digest(&world.upstream, &world.issuer, img).await;
        assert_eq!(upstream, img.digest, "upstream digest of {}", img.name);
    }
    let skopeo = Skopeo::with_mirror(&world.dir("skopeo"), &world.mirror().addr());
    for round in 1..=2 {
        for img in images {
            let out = world.dir(&format!("r{round}-{}", img.name.replace('/', "-")));
            let got = skopeo
                .pull_to_dir(&img.docker_io(), &out, img.is_index())
                .await;
            assert_digest("skopeo", img, &got, &img.digest);
            assert_eq!(
                dir_blobs(&out),
                img.blobs(),
                "blobs skopeo stored for {}",
                img.name
            );
            if img.is_index() {
                // Without --all, skopeo keeps the amd64 image of the index.
                let out = world.dir(&format!("r{round}-{}-amd64", img.name.replace('/', "-")));
                let got = skopeo.pull_to_dir(&img.docker_io(), &out, false).await;
                assert_digest("skopeo (amd64)", img, &got, &img.platform("amd64").digest);
            }
        }
        for img in images {
            let when = format!("after skopeo pull round {round}");
            world.assert_blob_gets(img, &img.blobs(), 1, &when);
            assert_cached(&world, &img.blobs());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dockerd_pulls_through_registry_mirror() {
    let world = World::with_mirror(&["dockerd", DOCKER]).await;
    let mirror_url = format!("http://{}", world.mirror().addr());
    let dockerd = Dockerd::start(&world.dir("dk"), &["--registry-mirror".into(), mirror_url]).await;
    for short in ["small", "multi", "big"] {
        let img = world.image(short);
        dockerd.pull(&img.docker_io()).await;
        let digests = dockerd.repo_digests(&img.docker_io()).await;
        let want = format!("{}@{}", img.name.trim_start_matches("library/"), img.digest);
        assert_eq!(digests, vec![want], "RepoDigests of {}", img.docker_io());
        let amd64 = img.platform("amd64").blobs();
        world.assert_blob_gets(img, &amd64, 1, "after docker pull");
        assert_cached(&world, &amd64);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_through_hosts_toml() {
    let world = World::with_mirror(&["containerd", "ctr"]).await;
    let ctr = Containerd::start(&world.dir("ct"), Some(&world.mirror().addr())).await;
    for short in ["small", "multi"] {
        let img = world.image(short);
        ctr.pull(&img.docker_io(), &[]).await;
        let got = ctr.image_digest(&img.docker_io()).await;
        assert_digest("ctr", img, &got, &img.digest);
        let amd64 = img.platform("amd64").blobs();
        world.assert_blob_gets(img, &amd64, 1, "after ctr image pull");
        assert_cached(&world, &amd64);
    }
}

/// With credentials configured, the mirror presents them to the upstream's token realm for
/// every token it fetches (pulls count against the account, not the anonymous limit), while
/// its own clients stay anonymous.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_presents_configured_credentials_to_token_realm() {
    let (user, password) = ("e2e-user", "e2e-secret-pw");
    let world = World::with_authenticated_mirror(&[], user, password).await;
    let small = world.image("small");
    let skopeo = Skopeo::with_mirror(&world.dir("skopeo"), &world.mirror().addr());
    let got = skopeo
        .pull_to_dir(&small.docker_io(), &world.dir("out"), false)
        .await;
    assert_digest("skopeo", small, &got, &small.digest);
    world.assert_blob_gets(small, &small.blobs(), 1, "after an authenticated pull");
    let tokens = world.issuer.requests();
    assert!(!tokens.is_empty(), "the mirror fetched no token");
    let wrong: Vec<_> = tokens
        .iter()
        .filter(|r| r.basic_user.as_deref() != Some(user) || r.status != 200)
        .collect();
    assert!(
        wrong.is_empty(),
        "every token request should carry {user}'s credentials; these did not: {wrong:?}\n\
         --- mirror log ---\n{}",
        world.mirror().log()
    );
    assert!(
        !world.mirror().log().contains(password),
        "the mirror logged the upstream password"
    );
}

/// Four clients of three kinds ask one cold mirror for the 100 MiB image at once: each gets
/// it, and the upstream serves each blob once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_fetch_each_blob_once() {
    let world = World::with_mirror(&["dockerd", DOCKER, "containerd", "ctr"]).await;
    let mirror = world.mirror().addr();
    let big = world.image("big");
    let ctr = Containerd::start(&world.dir("ct"), Some(&mirror)).await;
    let dockerd = Dockerd::start(
        &world.dir("dk"),
        &["--registry-mirror".into(), format!("http://{mirror}")],
    )
    .await;
    let skopeo = [1, 2].map(|i| Skopeo::with_mirror(&world.dir(&format!("skopeo{i}")), &mirror));
    let (out1, out2) = (world.dir("out1"), world.dir("out2"));
    let reference = big.docker_io();
    let (s1, s2, (), ()) = tokio::join!(
        skopeo[0].pull_to_dir(&reference, &out1, false),
        skopeo[1].pull_to_dir(&reference, &out2, false),
        ctr.pull(&reference, &[]),
        dockerd.pull(&reference),
    );
    assert_digest("skopeo #1", big, &s1, &big.digest);
    assert_digest("skopeo #2", big, &s2, &big.digest);
    let got = ctr.image_digest(&reference).await;
    assert_digest("ctr", big, &got, &big.digest);
    let digests = dockerd.repo_digests(&reference).await;
    assert_eq!(
        digests,
        vec![format!("big@{}", big.digest)],
        "dockerd RepoDigests"
    );
    world.assert_blob_gets(big, &big.blobs(), 1, "after four concurrent pulls");
    assert_cached(&world, &big.blobs());
}
