//! The mirror without its upstream: cached images pull while the upstream is stopped (tags
//! within their TTL from the cache, expired ones served stale), the index survives a restart
//! so a restarted mirror asks the upstream nothing, and `--offline` serves the cache and
//! refuses misses with a 404 that says so.

use crate::containerd::Containerd;
use crate::dockerd::{Dockerd, DOCKER};
use crate::fixture::Image;
use crate::mirror::Options;
use crate::skopeo::{dir_blobs, Skopeo};
use crate::world::World;
use crate::{assert_cached, assert_digest};

/// The log line of a tag served from the cache after the upstream failed to revalidate it.
const STALE: &str = "upstream unavailable; serving the tag from cache";

/// How many requests the upstream registry (its access log, every line) and its token issuer
/// have answered so far.
fn upstream_requests(world: &World) -> (usize, usize) {
    (
        world.upstream.access_lines().len(),
        world.issuer.requests().len(),
    )
}

/// Asserts the upstream and the token issuer got no request since `before`, showing them.
fn assert_no_upstream_requests(world: &World, before: (usize, usize), when: &str) {
    let served = world.upstream.access_lines();
    let tokens = world.issuer.requests();
    assert!(
        served.len() == before.0 && tokens.len() == before.1,
        "{when}: expected no request to the upstream, but it served {:?} and the issuer {:?}\n\
         --- mirror log ---\n{}",
        served.get(before.0..).unwrap_or_default(),
        tokens.get(before.1..).unwrap_or_default(),
        crate::procs::tail(&world.mirror().own_log(), 80)
    );
}

/// Fresh dockerd and containerd daemons (empty stores, so they really fetch) pull each of
/// `images` through the mirror as it is now; both must get the upstream's digests, and the
/// mirror's own log must show it served every amd64 blob. The daemons are stopped after.
async fn pull_with_fresh_daemons(world: &World, round: &str, images: &[&Image]) {
    let mirror = world.mirror().addr();
    let mark = world.mirror().log_mark();
    let (ct_dir, dk_dir) = (
        world.dir(&format!("{round}-ct")),
        world.dir(&format!("{round}-dk")),
    );
    let dk_args = ["--registry-mirror".into(), format!("http://{mirror}")];
    let (ctr, dockerd) = tokio::join!(
        Containerd::start(&ct_dir, Some(&mirror)),
        Dockerd::start(&dk_dir, &dk_args),
    );
    for img in images {
        let reference = img.docker_io();
        let ((), ()) = tokio::join!(dockerd.pull(&reference), ctr.pull(&reference, &[]));
        let got = ctr.image_digest(&reference).await;
        assert_digest(&format!("ctr ({round})"), img, &got, &img.digest);
        let digests = dockerd.repo_digests(&reference).await;
        let want = format!("{}@{}", img.name.trim_start_matches("library/"), img.digest);
        assert_eq!(digests, vec![want], "dockerd RepoDigests ({round})");
        let amd64 = img.platform("amd64").blobs();
        world
            .mirror()
            .assert_served_blobs(mark, &img.name, &amd64, "");
    }
}

/// Pulled once through a cold mirror, images pull again with fresh dockerd and containerd
/// stores after the upstream registry is killed: first with the tags within their TTL, then
/// after a restart with `REGMIRROR_CACHE_TAG_TTL=1s`, when every tag must be revalidated, the
/// upstream is found down, and the cached tag is served stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_images_pull_with_upstream_stopped() {
    let mut world = World::with_mirror(&["dockerd", DOCKER, "containerd", "ctr"]).await;
    let images = [world.image("small"), world.image("multi")];

    pull_with_fresh_daemons(&world, "cold", &images).await;
    for img in images {
        let amd64 = img.platform("amd64").blobs();
        world.assert_blob_gets(img, &amd64, 1, "after the cold pulls");
        assert_cached(&world, &amd64);
    }

    world.upstream.stop();
    let mark = world.mirror().log_mark();
    pull_with_fresh_daemons(&world, "down", &images).await;
    let log = world.mirror().log();
    let round = log.get(mark..).unwrap_or_default();
    assert!(
        !round.contains(STALE),
        "within the tag TTL (5m) the mirror should not have asked the upstream at all; \
         its log:\n{round}"
    );
    let served = world.mirror().served_since(mark);
    let misses: Vec<_> = served.iter().filter(|s| s.cache == "miss").collect();
    assert!(
        misses.is_empty(),
        "with the upstream down, nothing can be a cache miss: {misses:?}"
    );

    world
        .restart_mirror(&Options::env(&[("REGMIRROR_CACHE_TAG_TTL", "1s")]))
        .await;
    // The tags were last checked before the restart, well over 1 s ago.
    pull_with_fresh_daemons(&world, "stale", &images).await;
    let log = world.mirror().own_log();
    for img in images {
        // The log names the repository with its registry: docker.io/library/small.
        let repo = format!("/{} ", img.name);
        assert!(
            log.lines().any(|l| l.contains(STALE) && l.contains(&repo)),
            "with the tag TTL expired and the upstream down, the mirror should have logged \
             `{STALE}` for {}; its log:\n{}",
            img.name,
            crate::procs::tail(&log, 80)
        );
    }
}

/// A mirror stopped with SIGTERM and started again on the same data directory serves what it
/// cached without a single request to the upstream or its token issuer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_the_index() {
    let mut world = World::with_mirror(&[]).await;
    let images = [
        world.image("small"),
        world.image("multi"),
        world.image("many"),
    ];
    let skopeo = Skopeo::with_mirror(&world.dir("skopeo1"), &world.mirror().addr());
    for img in images {
        let out = world.dir(&format!("r1-{}", img.name.replace('/', "-")));
        let got = skopeo
            .pull_to_dir(&img.docker_io(), &out, img.is_index())
            .await;
        assert_digest("skopeo (before the restart)", img, &got, &img.digest);
    }

    world.restart_mirror(&Options::default()).await;
    let index = world.mirror().data_dir.join("index.json");
    assert!(
        index.is_file(),
        "the mirror wrote no {} at shutdown",
        index.display()
    );
    let before = upstream_requests(&world);
    let mark = world.mirror().log_mark();
    let skopeo = Skopeo::with_mirror(&world.dir("skopeo2"), &world.mirror().addr());
    for img in images {
        let out = world.dir(&format!("r2-{}", img.name.replace('/', "-")));
        let got = skopeo
            .pull_to_dir(&img.docker_io(), &out, img.is_index())
            .await;
        assert_digest("skopeo (after the restart)", img, &got, &img.digest);
        assert_eq!(dir_blobs(&out), img.blobs(), "blobs of {}", img.name);
        world
            .mirror()
            .assert_served_blobs(mark, &img.name, &img.blobs(), "hit");
    }
    assert_no_upstream_requests(&world, before, "after the restart");
}

/// Restarted with `--offline` beside a running upstream, the mirror serves what it cached,
/// refuses what it did not with 404 MANIFEST_UNKNOWN / BLOB_UNKNOWN saying it is offline, and
/// sends the upstream nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_mirror_serves_cache_and_refuses_misses() {
    let mut world = World::with_mirror(&[]).await;
    let (small, multi, many) = (
        world.image("small"),
        world.image("multi"),
        world.image("many"),
    );
    let skopeo = Skopeo::with_mirror(&world.dir("skopeo1"), &world.mirror().addr());
    for img in [small, multi] {
        let out = world.dir(&format!("warm-{}", img.name.replace('/', "-")));
        let got = skopeo
            .pull_to_dir(&img.docker_io(), &out, img.is_index())
            .await;
        assert_digest("skopeo (warming)", img, &got, &img.digest);
    }

    let offline = Options {
        offline: true,
        ..Options::default()
    };
    world.restart_mirror(&offline).await;
    let before = upstream_requests(&world);
    let mark = world.mirror().log_mark();
    let skopeo = Skopeo::with_mirror(&world.dir("skopeo2"), &world.mirror().addr());
    for img in [small, multi] {
        let out = world.dir(&format!("offline-{}", img.name.replace('/', "-")));
        let got = skopeo
            .pull_to_dir(&img.docker_io(), &out, img.is_index())
            .await;
        assert_digest("skopeo (offline mirror)", img, &got, &img.digest);
        world
            .mirror()
            .assert_served_blobs(mark, &img.name, &img.blobs(), "hit");
    }

    let out = world.dir("offline-many");
    let failed = skopeo.try_pull_to_dir(&many.docker_io(), &out).await;
    assert!(
        !failed.status.success(),
        "skopeo pulled {} through an offline mirror that never cached it",
        many.docker_io()
    );

    let base = format!("http://{}/v2/{}", world.mirror().addr(), many.name);
    let client = reqwest::Client::new();
    for (url, code) in [
        (format!("{base}/manifests/{}", many.tag), "MANIFEST_UNKNOWN"),
        (
            format!("{base}/manifests/{}", many.digest),
            "MANIFEST_UNKNOWN",
        ),
        (format!("{base}/blobs/{}", many.blobs()[0]), "BLOB_UNKNOWN"),
    ] {
        let resp = client.get(&url).send().await.expect("GET the mirror");
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default();
        let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let error = &json["errors"][0];
        let detail = error["detail"].to_string().to_lowercase();
        assert!(
            status == 404 && error["code"] == code && detail.contains("offline"),
            "GET {url} from an offline mirror that never cached it: expected 404 {code} with \
             a detail saying the mirror is offline, got {status}: {body}"
        );
    }
    assert_no_upstream_requests(&world, before, "with the mirror offline");
}
