//! Several upstreams behind one mirror: requests routed by `?ns=`, by a registry path prefix or
//! to the default (each fake counts what it served); unknown registries and denied
//! repositories answered without contacting any upstream; blobs shared by digest but served
//! for a repository only when its own upstream holds them; tags, tag lists (pagination, kept
//! for outages), the catalog and referrers (API, tag schema, none) per upstream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "routing/listings.rs"]
mod listings;

use std::time::Duration;

use common::images::{sha256_digest, ImageInfo};
use common::{assert_error, header, random_bytes, start_mirror, FakeUpstream, MirrorHandle};
use regmirror::config::{Config, UpstreamConfig};

/// The registry names of the fakes, the default first.
const NAMES: [&str; 3] = ["docker.io", "ghcr.io", "quay.io"];
const HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// An `[[upstreams]]` entry named `name` for the registry at `url`, with the tests' timeouts.
fn upstream(name: &str, url: &str) -> UpstreamConfig {
    UpstreamConfig {
        name: name.to_owned(),
        url: url::Url::parse(url).unwrap(),
        timeout: Duration::from_secs(5),
        read_timeout: Duration::from_secs(5),
        ..UpstreamConfig::default()
    }
}

/// `n` fakes (`NAMES[i]` for fake `i`) and a mirror with the first as default upstream and
/// the others as `[[upstreams]]`; `tweak` adjusts the config after that.
async fn fakes_and_mirror(
    n: usize,
    tweak: impl FnOnce(&mut Config),
) -> (Vec<FakeUpstream>, MirrorHandle) {
    let mut fakes = Vec::new();
    for _ in 0..n {
        fakes.push(FakeUpstream::start().await);
    }
    let urls: Vec<String> = fakes.iter().map(FakeUpstream::url).collect();
    let m = start_mirror(&urls[0], |c| {
        c.upstreams = (1..n).map(|i| upstream(NAMES[i], &urls[i])).collect();
        tweak(c);
    })
    .await;
    (fakes, m)
}

/// Asserts that fake `which` (when given) answered registry requests since its counts were
/// reset, and that every other fake received no request at all (no token fetch either).
fn assert_only(fakes: &[FakeUpstream], which: Option<usize>, what: &str) {
    for (i, fake) in fakes.iter().enumerate() {
        let seen = fake.requests();
        if Some(i) == which {
            let served = seen
                .iter()
                .filter(|r| r.authorized && r.path.starts_with("/v2/"))
                .count();
            assert!(served > 0, "{what}: {} served nothing", NAMES[i]);
        } else {
            let paths: Vec<String> = seen
                .iter()
                .map(|r| format!("{} {}", r.method, r.path))
                .collect();
            assert!(
                paths.is_empty(),
                "{what}: {} was contacted: {paths:?}",
                NAMES[i]
            );
        }
    }
}

fn reset(fakes: &[FakeUpstream]) {
    fakes.iter().for_each(FakeUpstream::reset_counts);
}

/// GETs a manifest through the mirror and asserts it is `img`'s, with `ns` (when given) as
/// the `OCI-Namespace` header.
async fn assert_manifest(m: &MirrorHandle, path: &str, img: &ImageInfo, ns: Option<&str>) {
    let r = m.get(path).await.unwrap();
    assert_eq!(r.status(), 200, "GET {path}");
    assert_eq!(
        header(&r, "docker-content-digest"),
        img.manifest_digest,
        "GET {path}: digest"
    );
    if let Some(ns) = ns {
        assert_eq!(header(&r, "oci-namespace"), ns, "GET {path}: OCI-Namespace");
    }
    assert_eq!(r.bytes().await.unwrap(), img.manifest, "GET {path}: body");
}

#[tokio::test]
async fn each_request_reaches_the_upstream_it_names() {
    let (fakes, m) = fakes_and_mirror(3, |_| {}).await;
    // The same repository and tag on all three, each with its own image.
    let app: Vec<ImageInfo> = (0..3)
        .map(|i| fakes[i].add_image("org/app", "1", vec![random_bytes(1000, i as u64)]))
        .collect();
    let alpine = fakes[0].add_image("library/alpine", "1", vec![random_bytes(500, 10)]);

    let first: [(&str, usize, &ImageInfo, Option<&str>); 4] = [
        ("/v2/org/app/manifests/1", 0, &app[0], None),
        (
            "/v2/org/app/manifests/1?ns=ghcr.io",
            1,
            &app[1],
            Some("ghcr.io"),
        ),
        ("/v2/quay.io/org/app/manifests/1", 2, &app[2], None),
        (
            "/v2/alpine/manifests/1?ns=registry-1.docker.io",
            0,
            &alpine,
            Some("docker.io"),
        ),
    ];
    for (path, which, img, ns) in first {
        reset(&fakes);
        assert_manifest(&m, path, img, ns).await;
        assert_only(&fakes, Some(which), path);
        let repo = if img.manifest_digest == alpine.manifest_digest {
            "library/alpine"
        } else {
            "org/app"
        };
        assert!(
            fakes[which].manifest_gets(repo) >= 1,
            "{path}: {} served no manifest of {repo}",
            NAMES[which]
        );
    }

    // Other spellings of the same routes: the tags and manifests cached above answer them,
    // each route with its own upstream's digest, and nobody is asked.
    reset(&fakes);
    let again: [(&str, &ImageInfo, Option<&str>); 8] = [
        ("/v2/docker.io/org/app/manifests/1", &app[0], None),
        (
            "/v2/org/app/manifests/1?ns=docker.io",
            &app[0],
            Some("docker.io"),
        ),
        ("/v2/ghcr.io/org/app/manifests/1", &app[1], None),
        (
            "/v2/org/app/manifests/1?ns=quay.io",
            &app[2],
            Some("quay.io"),
        ),
        ("/v2/org/app/manifests/1", &app[0], None),
        ("/v2/docker.io/alpine/manifests/1", &alpine, None),
        (
            "/v2/library/alpine/manifests/1?ns=index.docker.io",
            &alpine,
            Some("docker.io"),
        ),
        ("/v2/alpine/manifests/1", &alpine, None),
    ];
    for (path, img, ns) in again {
        assert_manifest(&m, path, img, ns).await;
    }
    assert_only(&fakes, None, "cached tags by other spellings");

    // HEADs carry the namespace header too.
    let r = m.head("/v2/org/app/manifests/1?ns=ghcr.io").await.unwrap();
    assert_eq!(
        (r.status().as_u16(), header(&r, "oci-namespace")),
        (200, "ghcr.io".into())
    );

    // Blobs go to their route's upstream.
    for (i, path) in [
        (
            1,
            format!("/v2/ghcr.io/org/app/blobs/{}", app[1].layer_digests[0]),
        ),
        (
            2,
            format!("/v2/org/app/blobs/{}?ns=quay.io", app[2].layer_digests[0]),
        ),
        (0, format!("/v2/org/app/blobs/{}", app[0].layer_digests[0])),
    ] {
        reset(&fakes);
        let body = m.get_ok(&path).await;
        assert_eq!(body, app[i].layers[0], "GET {path}");
        assert_only(&fakes, Some(i), &path);
        assert_eq!(
            fakes[i].blob_gets(&app[i].layer_digests[0]),
            1,
            "{path}: upstream blob GETs"
        );
    }
}

#[tokio::test]
async fn unknown_registries_are_name_unknown_and_reach_no_upstream() {
    // Default docker.io and quay.io only: ghcr.io and gcr.io are not configured.
    let (docker, quay) = (FakeUpstream::start().await, FakeUpstream::start().await);
    let m = start_mirror(&docker.url(), |c| {
        c.upstreams = vec![upstream("quay.io", &quay.url())];
    })
    .await;
    // What the default upstream would answer if the request reached it.
    docker.add_image("ghcr.io/org/app", "1", vec![random_bytes(100, 1)]);
    docker.add_image("org/app", "1", vec![random_bytes(100, 2)]);
    let paths = [
        "/v2/org/app/manifests/1?ns=ghcr.io".to_owned(),
        format!("/v2/org/app/blobs/sha256:{HEX}?ns=gcr.io"),
        "/v2/org/app/tags/list?ns=ghcr.io".to_owned(),
        format!("/v2/org/app/referrers/sha256:{HEX}?ns=ghcr.io"),
        "/v2/ghcr.io/org/app/manifests/1".to_owned(),
        format!("/v2/gcr.io/x/blobs/sha256:{HEX}"),
        "/v2/registry.k8s.io/pause/tags/list".to_owned(),
        format!("/v2/gcr.io/x/y/referrers/sha256:{HEX}"),
    ];
    for path in &paths {
        assert_error(m.get(path).await.unwrap(), 404, Some("NAME_UNKNOWN")).await;
    }
    let r = m.head("/v2/gcr.io/x/manifests/1").await.unwrap();
    assert_eq!(r.status(), 404, "HEAD with an unknown registry prefix");
    for (name, fake) in [("docker.io", &docker), ("quay.io", &quay)] {
        let seen: Vec<String> = fake.requests().iter().map(|r| r.path.clone()).collect();
        assert!(
            seen.is_empty(),
            "{name} was contacted for unknown registries: {seen:?}"
        );
    }
}

#[tokio::test]
async fn allow_and_deny_are_denied_before_any_upstream_request() {
    let (fakes, m) = fakes_and_mirror(3, |c| {
        c.upstream.deny = vec!["library/forbidden".into()];
        c.upstreams[1].allow = vec!["org/*".into()];
        c.upstreams[1].deny = vec!["org/secret-*".into()];
    })
    .await;
    let ok = fakes[2].add_image("org/app", "1", vec![random_bytes(100, 1)]);
    for fake in &fakes {
        for repo in ["other/app", "org/secret-app", "library/forbidden"] {
            fake.add_image(repo, "1", vec![random_bytes(100, 2)]);
        }
    }
    let denied = [
        "/v2/quay.io/other/app/manifests/1".to_owned(),
        "/v2/other/app/manifests/1?ns=quay.io".to_owned(),
        "/v2/quay.io/org/secret-app/manifests/1".to_owned(),
        format!("/v2/quay.io/org/secret-app/blobs/sha256:{HEX}"),
        "/v2/quay.io/org/secret-app/tags/list".to_owned(),
        format!("/v2/quay.io/org/secret-app/referrers/sha256:{HEX}"),
        "/v2/forbidden/manifests/1".to_owned(),
        "/v2/library/forbidden/tags/list?ns=docker.io".to_owned(),
        "/v2/docker.io/forbidden/manifests/1".to_owned(),
    ];
    for path in &denied {
        assert_error(m.get(path).await.unwrap(), 403, Some("DENIED")).await;
    }
    assert_only(&fakes, None, "denied repositories");
    // What the globs allow still pulls; other upstreams are not restricted by quay.io's list.
    assert_manifest(&m, "/v2/quay.io/org/app/manifests/1", &ok, None).await;
    let other = fakes[1].add_image("other/app", "2", vec![random_bytes(100, 3)]);
    assert_manifest(&m, "/v2/ghcr.io/other/app/manifests/2", &other, None).await;
}

#[tokio::test]
async fn a_layer_on_two_upstreams_is_stored_and_fetched_once() {
    let (fakes, m) = fakes_and_mirror(3, |_| {}).await;
    let layer = random_bytes(300_000, 42);
    let digest = sha256_digest(&layer);
    fakes[0].add_blob("org/app", layer.clone());
    fakes[1].add_blob("team/tool", layer.clone());
    // quay.io has it in an image whose manifest the mirror will cache.
    let img = fakes[2].add_image("some/image", "1", vec![layer.clone(), random_bytes(100, 7)]);

    assert_eq!(m.blob("org/app", &digest).await, layer, "via docker.io");
    assert_eq!(fakes[0].blob_gets(&digest), 1);

    // ghcr.io is asked whether team/tool holds it (a HEAD), not for its bytes.
    let via_b = format!("/v2/ghcr.io/team/tool/blobs/{digest}");
    assert_eq!(m.get_ok(&via_b).await, layer, "via ghcr.io");
    let head_path = format!("/v2/team/tool/blobs/{digest}");
    assert_eq!(
        fakes[1].count("HEAD", &head_path),
        1,
        "ghcr.io's HEAD confirmation"
    );
    assert_eq!(fakes[1].blob_gets(&digest), 0, "ghcr.io's blob GETs");
    // Confirmed once is remembered, whichever way the route is spelled.
    assert_eq!(m.get_ok(&via_b).await, layer);
    assert_eq!(
        m.get_ok(&format!("/v2/team/tool/blobs/{digest}?ns=ghcr.io"))
            .await,
        layer
    );
    assert_eq!(
        fakes[1].count("HEAD", &head_path),
        1,
        "HEADs after the confirmation"
    );

    // quay.io's cached manifest references the layer: served with no question asked.
    assert_manifest(&m, "/v2/quay.io/some/image/manifests/1", &img, None).await;
    assert_eq!(
        m.get_ok(&format!("/v2/quay.io/some/image/blobs/{digest}"))
            .await,
        layer
    );
    let quay_blob = format!("/v2/some/image/blobs/{digest}");
    assert_eq!(
        (
            fakes[2].count("HEAD", &quay_blob),
            fakes[2].count("GET", &quay_blob)
        ),
        (0, 0),
        "quay.io asked for a layer its cached manifest names"
    );

    assert_eq!(
        fakes[0].blob_gets(&digest),
        1,
        "docker.io's blob GETs in the end"
    );
    assert!(m.committed(&digest).await);
    // Only the layer was asked for, by three upstreams' repositories: one file.
    assert_eq!(m.files_under("blobs"), 1, "files under DATA/blobs");
}

#[tokio::test]
async fn a_layer_only_on_one_upstream_is_not_served_for_another() {
    let (fakes, m) = fakes_and_mirror(2, |_| {}).await;
    let layer = random_bytes(50_000, 9);
    let digest = sha256_digest(&layer);
    fakes[0].add_blob("org/app", layer.clone());
    // ghcr.io has a repository of the same name, without that layer.
    fakes[1].add_image("org/app", "1", vec![random_bytes(100, 1)]);
    assert_eq!(m.blob("org/app", &digest).await, layer);

    let head_path = format!("/v2/org/app/blobs/{digest}");
    for (round, path) in [
        format!("/v2/ghcr.io/org/app/blobs/{digest}"),
        format!("/v2/org/app/blobs/{digest}?ns=ghcr.io"),
    ]
    .iter()
    .enumerate()
    {
        assert_error(m.get(path).await.unwrap(), 404, Some("BLOB_UNKNOWN")).await;
        assert_eq!(
            fakes[1].count("HEAD", &head_path),
            round + 1,
            "{path}: ghcr.io's HEADs"
        );
    }
    let r = m
        .head(&format!("/v2/ghcr.io/org/app/blobs/{digest}"))
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "HEAD of a blob ghcr.io's repository lacks");
    assert_eq!(fakes[1].blob_gets(&digest), 0, "ghcr.io's blob GETs");
    assert_eq!(fakes[0].blob_gets(&digest), 1, "docker.io's blob GETs");
}
