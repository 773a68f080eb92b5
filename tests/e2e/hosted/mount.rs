//! A layer the mirror cached from the upstream, pushed to a hosted repository: dockerd, which
//! pulled the image from the mirror's address, and skopeo, copying within the mirror, mount it
//! (`POST ?mount=<digest>&from=<repo>`) rather than upload it, and the layer, now kept by the
//! hosted images, outlives an eviction pass that takes the cache's idle blobs.
//!
//! dockerd mounts only from a repository of the same registry host it pulled the layer from:
//! an image pulled as `docker.io/...` through `--registry-mirror` has no such candidate, so
//! dockerd uploads its layers when pushing it to the mirror's address.

use std::time::{Duration, Instant};

use crate::dockerd::{Dockerd, DOCKER};
use crate::hosted::{
    assert_upstream_never_asked, listing, output_text, pushed_digest, start_hosted_mirror,
};
use crate::mirror::Served;
use crate::procs::{run, run_ok};
use crate::skopeo::Skopeo;
use crate::world::World;

/// How long a cached blob nobody pulls stays: long enough for the push to follow the pull,
/// short enough for the test to see an eviction pass (every 10 s) take one.
const IDLE: &str = "20s";

/// dockerd pulls `127.0.0.1:PORT/library/small:1` (cached from the upstream), tags it
/// `myorg/small:v1` and pushes it: every layer is mounted (POST answered 201), at most one
/// upload (the image config) is started, and the pushed manifest names the cached layers.
/// skopeo copying `library/small:1` to `myorg/small-copy:v1` mounts them as well. Then, after
/// an eviction pass took the idle blobs of another cached image (and would have taken small's
/// layers, idle longer), both hosted images still pull whole from the mirror, which never
/// fetches a hosted repository's blobs from the upstream. (Whether the cache itself keeps its
/// copy of the layers for `library/small` is the mirror's business, not asserted.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_upstream_layer_is_mounted_not_uploaded_and_stays() {
    let mut world = World::upstream_only(&["dockerd", DOCKER]).await;
    start_hosted_mirror(
        &mut world,
        "",
        &[("REGMIRROR_CACHE_BLOB_IDLE_TTL", IDLE)],
        200,
    )
    .await;
    let addr = world.mirror().addr();
    let small = world.image("small");
    let layers = small.platform("amd64").layers.clone();
    let dockerd = Dockerd::start(
        &world.dir("dk"),
        &["--insecure-registry".into(), addr.clone()],
    )
    .await;

    let cached = format!("{addr}/{}:{}", small.name, small.tag);
    dockerd.pull(&cached).await;
    assert_eq!(
        dockerd.repo_digests(&cached).await,
        vec![format!("{addr}/{}@{}", small.name, small.digest)],
        "RepoDigests of the image pulled through the mirror"
    );
    world.assert_blob_gets(small, &layers, 1, "after docker pull through the mirror");

    let hosted = format!("{addr}/myorg/small:v1");
    let mut tag = dockerd.docker();
    tag.args(["tag", &cached, &hosted]);
    run_ok(&mut tag, Duration::from_secs(30)).await;
    let mark = world.mirror().log_mark();
    let mut push = dockerd.docker();
    push.args(["push", &hosted]);
    let out = run(&mut push, Duration::from_secs(120)).await;
    let served = world.mirror().served_since(mark);
    assert!(
        out.status.success(),
        "docker push {hosted} failed: {}\n--- what the mirror served ---\n{}",
        output_text(&out),
        listing(&served)
    );
    let pushed = pushed_digest(&output_text(&out));
    assert_mounted(&served, "myorg/small", &layers, "docker push");

    // The manifest pushed names the very layers the mirror cached.
    let manifest = reqwest::Client::new()
        .get(format!("http://{addr}/v2/myorg/small/manifests/v1"))
        .header(
            "accept",
            "application/vnd.docker.distribution.manifest.v2+json, \
             application/vnd.oci.image.manifest.v1+json",
        )
        .send()
        .await
        .expect("GET the pushed manifest")
        .bytes()
        .await
        .expect("the pushed manifest");
    let manifest: serde_json::Value =
        serde_json::from_slice(&manifest).expect("the pushed manifest is JSON");
    let named: Vec<&str> = manifest["layers"]
        .as_array()
        .map(|a| a.iter().filter_map(|l| l["digest"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(named, layers, "the layers of myorg/small:v1 as pushed");

    // skopeo mounts a layer from where its blob-info cache last saw it: once it has pulled
    // library/small from the mirror's address, copying it within the mirror finds the layers
    // in the source repository (HEAD there) and mounts them; the manifest goes over unchanged.
    let plain = Skopeo::plain(&world.dir("skopeo-plain"));
    plain
        .pull_to_dir(&cached, &world.dir("small-by-address"), false)
        .await;
    let mark = world.mirror().log_mark();
    let mut copy = plain.command("copy");
    copy.args(["--src-tls-verify=false", "--dest-tls-verify=false"])
        .arg(format!("docker://{cached}"))
        .arg(format!("docker://{addr}/myorg/small-copy:v1"));
    let out = run(&mut copy, Duration::from_secs(120)).await;
    let served = world.mirror().served_since(mark);
    assert!(
        out.status.success(),
        "skopeo copy of {cached} into myorg/small-copy failed: {}\n--- what the mirror \
         served ---\n{}",
        output_text(&out),
        listing(&served)
    );
    assert_mounted(&served, "myorg/small-copy", &layers, "skopeo copy");

    // Another image cached after the pushes: once an eviction pass has taken its idle blobs,
    // it has taken anything of the cache idle as long, small's layers included, unless being
    // in a hosted image keeps them.
    let many = world.image("many");
    let skopeo = Skopeo::with_mirror(&world.dir("skopeo"), &addr);
    skopeo
        .pull_to_dir(&many.docker_io(), &world.dir("many-out"), false)
        .await;
    let started = Instant::now();
    let cached_many = |world: &World| {
        many.blobs()
            .into_iter()
            .filter(|b| world.mirror().blob_path(b).is_file())
            .count()
    };
    while cached_many(&world) > 0 && started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        cached_many(&world),
        0,
        "no eviction pass took the blobs of library/many, idle for over {IDLE}, within {:?}",
        started.elapsed()
    );
    eprintln!(
        "[e2e] the idle blobs were evicted {:?} after the pull",
        started.elapsed()
    );

    let out = world.dir("hosted-out");
    let digest = plain
        .pull_to_dir(&format!("{addr}/myorg/small:v1"), &out, false)
        .await;
    assert_eq!(
        digest, pushed,
        "the digest skopeo pulled from myorg/small:v1, after the eviction pass"
    );
    let got = plain
        .pull_to_dir(
            &format!("{addr}/myorg/small-copy:v1"),
            &world.dir("copy-out"),
            false,
        )
        .await;
    assert_eq!(
        got, small.digest,
        "the digest of myorg/small-copy:v1 after the eviction pass"
    );
    for layer in &layers {
        let hex = layer.trim_start_matches("sha256:");
        assert!(
            out.join(hex).is_file(),
            "layer {layer} missing from the copy of myorg/small:v1"
        );
    }
    assert_upstream_never_asked(&world, "myorg/small");
    assert_upstream_never_asked(&world, "myorg/small-copy");
}

/// Asserts that what the mirror `served` during `who`'s push into `name` mounted each of
/// `layers` (`POST /v2/<name>/blobs/uploads/?mount=...` answered 201) and started at most one
/// upload (`POST` answered 202: the image config, which clients do not mount): no byte of a
/// layer was sent.
fn assert_mounted(served: &[Served], name: &str, layers: &[String], who: &str) {
    let path = format!("/v2/{name}/blobs/uploads/");
    let starts: Vec<&Served> = served
        .iter()
        .filter(|s| s.method == "POST" && s.path == path)
        .collect();
    let mounted = starts.iter().filter(|s| s.status == 201).count();
    let uploads = starts.iter().filter(|s| s.status == 202).count();
    assert!(
        mounted == layers.len() && uploads <= 1,
        "{who}: each of the {} cached layers should have been mounted (POST ?mount= answered \
         201; {mounted} were) and at most the config uploaded (POST answered 202; {uploads} \
         were); what the mirror served:\n{}",
        layers.len(),
        listing(served)
    );
}
