//! Hosted (pushable) repositories on a cluster (issue 16, item 5): every replica has
//! `hosted.repos = ["myorg/*"]`, the content goes to the bucket's `hosted/` area and the index
//! (tags, links) to Redis. One cluster, checks in turn, through the raw pusher of `raw_push`
//! and skopeo: a chunked push through nginx round-robin lands its requests on several replicas
//! and is pulled alike from each; a chunk sent twice is 416 wherever it lands; a tag, a mount,
//! deletes and a referrer pushed through one replica are seen at once by the others; wrong
//! bytes leave no chunk in the bucket; skopeo pushes through nginx and pulls from another
//! replica; a blob cached from a mirrored repository is mounted through any replica; every
//! replica's catalog lists every hosted repository.
//!
//! Also: `hosted_outages` (Redis or Garage down), `hosted_clients` (parallel pushes of one
//! layer; dockerd).

use std::sync::atomic::AtomicU64;

use serde_json::{json, Value};

use crate::cluster::raw_push::{assert_pulls, upload_chunks, Client, Pushed, APP, DELETE, HOSTED};
use crate::cluster::world::{ClusterWorld, Setup};
use crate::cluster::{blob_url, get_blob, noise, Got};
use crate::oci::{Content, Flavor, Layout, OCI_MANIFEST};
use crate::push::{descriptor, sha256};
use crate::skopeo::Skopeo;

/// The pushes of one cluster, each a check of its own, in an order where one does not
/// disturb the next: a chunked push through nginx (round-robin over the 3 replicas) pulled
/// from each replica; a tag pushed through replica 0 seen at once by replicas 1 and 2; a blob
/// whose bytes do not match its digest refused, nothing left of its upload in the bucket;
/// skopeo through nginx, then from replica 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_through_a_cluster_are_pulled_alike_from_every_replica() {
    let cluster = ClusterWorld::start(Setup::env(&[HOSTED, DELETE])).await;
    let v1 = a_chunked_push_through_nginx_lands_on_several_replicas(&cluster).await;
    a_chunk_sent_again_is_refused_wherever_it_lands(&cluster).await;
    let v2 = a_tag_pushed_through_one_replica_is_seen_at_once_by_the_others(&cluster, &v1).await;
    a_mount_and_deletes_through_one_replica_are_seen_by_the_others(&cluster, &v1, &v2).await;
    an_artifact_pushed_through_one_replica_is_a_referrer_on_the_others(&cluster, &v1).await;
    wrong_bytes_are_refused_and_leave_no_chunk_in_the_bucket(&cluster).await;
    skopeo_pushes_through_nginx_and_pulls_from_another_replica(&cluster).await;
    a_mount_from_a_mirrored_repository_works_on_every_replica(&cluster).await;
    every_replica_lists_every_hosted_repository(&cluster).await;
}

/// An artifact whose subject is `v1` (the empty config, one small blob) pushed through
/// replica 1: 201 with `OCI-Subject`; replicas 0 and 2 list it at once in `v1`'s referrers,
/// with its artifact type, filtered by it too.
async fn an_artifact_pushed_through_one_replica_is_a_referrer_on_the_others(
    cluster: &ClusterWorld,
    v1: &Pushed,
) {
    const EMPTY: &str = "application/vnd.oci.empty.v1+json";
    const SBOM: &str = "application/vnd.example.sbom.v1+json";
    let r1 = Client::new(&cluster.replicas[1].addr());
    let empty = r1.blob(APP, b"{}", 1).await;
    let sbom = br#"{"packages": []}"#;
    r1.blob(APP, sbom, 1).await;
    let artifact = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": SBOM,
        "config": {"mediaType": EMPTY, "digest": empty, "size": 2},
        "layers": [descriptor(SBOM, sbom)],
        "subject": {"mediaType": OCI_MANIFEST, "digest": v1.digest(), "size": v1.manifest.len()},
    }))
    .expect("artifact json");
    let digest = sha256(&artifact);
    let put = r1
        .put_manifest(APP, &digest, &artifact)
        .await
        .expect(201, "an artifact of v1 through replica 1");
    assert_eq!(put.header("oci-subject"), Some(v1.digest()));
    for i in [0, 2] {
        let client = Client::new(&cluster.replicas[i].addr());
        for query in ["", "?artifactType=application/vnd.example.sbom.v1%2Bjson"] {
            let got = client
                .send(
                    "GET",
                    &format!("/v2/{APP}/referrers/{}{query}", v1.digest()),
                    &[],
                    None,
                )
                .await
                .expect(200, &format!("replica {i}: v1's referrers{query}"));
            let index: Value = serde_json::from_slice(&got.body).expect("referrers json");
            assert_eq!(
                index["manifests"],
                json!([{
                    "mediaType": OCI_MANIFEST,
                    "digest": digest,
                    "size": artifact.len(),
                    "artifactType": SBOM,
                }]),
                "replica {i}: v1's referrers{query} right after the artifact was pushed \
                 through replica 1: {index}"
            );
        }
    }
}

/// `_catalog` of each replica names every hosted repository pushed to through any of them.
async fn every_replica_lists_every_hosted_repository(cluster: &ClusterWorld) {
    for (i, replica) in cluster.replicas.iter().enumerate() {
        let got = Client::new(&replica.addr())
            .send("GET", "/v2/_catalog", &[], None)
            .await
            .expect(200, &format!("replica {i}: _catalog"));
        let catalog: Value = serde_json::from_slice(&got.body).expect("catalog json");
        let names: Vec<&str> = catalog["repositories"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        for name in [APP, "myorg/other", "myorg/tool", "myorg/cached"] {
            assert!(
                names.contains(&name),
                "replica {i}'s _catalog lacks {name}: {catalog}"
            );
        }
    }
}

/// The fixture's `library/small` pulled through replica 0 (its blobs then in replica 0's disk
/// and in the bucket, not on the other replicas' disks); its blobs mounted into
/// `myorg/cached`, one through each replica directly: each mount is 201 (no bytes sent),
/// whichever disk holds the cached copy; its manifest PUT as `myorg/cached:1` through nginx;
/// every replica then serves the manifest and every blob with their digests.
async fn a_mount_from_a_mirrored_repository_works_on_every_replica(cluster: &ClusterWorld) {
    let small = cluster.image("small");
    assert!(!small.is_index());
    let r0 = cluster.replicas[0].addr();
    crate::cluster::skopeo_pull(&cluster.world, &r0, small, "small-r0").await;
    cluster.wait_in_bucket(&small.blobs()).await;
    let platform = small.platform("amd64");
    let blobs: Vec<&String> = std::iter::once(&platform.config)
        .chain(&platform.layers)
        .collect();
    assert_eq!(blobs.len(), cluster.replicas.len(), "one blob per replica");
    for (i, digest) in blobs.iter().enumerate() {
        let mounted = Client::new(&cluster.replicas[i].addr())
            .send(
                "POST",
                &format!(
                    "/v2/myorg/cached/blobs/uploads/?mount={digest}&from={}",
                    small.name
                ),
                &[],
                None,
            )
            .await;
        assert_eq!(
            mounted.status,
            201,
            "replica {i}: a mount of {digest}, cached from {} (in replica 0's disk and the \
             bucket), into myorg/cached answered {} {:?} {}",
            small.name,
            mounted.status,
            mounted.header("location"),
            mounted.text()
        );
    }
    let manifest = Client::new(&r0)
        .send(
            "GET",
            &format!("/v2/{}/manifests/{}", small.name, small.tag),
            &[("accept", small.media_type.clone())],
            None,
        )
        .await
        .expect(200, "library/small's manifest through replica 0");
    let front = Client::new(&cluster.front());
    front
        .send(
            "PUT",
            "/v2/myorg/cached/manifests/1",
            &[("content-type", small.media_type.clone())],
            Some(manifest.body.clone()),
        )
        .await
        .expect(201, "library/small's manifest as myorg/cached:1");
    let none = AtomicU64::new(0);
    for (i, replica) in cluster.replicas.iter().enumerate() {
        let client = Client::new(&replica.addr());
        let got = client
            .send(
                "GET",
                "/v2/myorg/cached/manifests/1",
                &[("accept", small.media_type.clone())],
                None,
            )
            .await
            .expect(200, &format!("replica {i}: myorg/cached:1"));
        assert_eq!(
            sha256(&got.body),
            small.digest,
            "replica {i}: myorg/cached:1"
        );
        for digest in &blobs {
            let url = blob_url(&replica.addr(), "myorg/cached", digest);
            let got = get_blob(&client.http, &url, &none).await;
            assert!(
                matches!(&got, Got::Body { digest: d, .. } if d == *digest),
                "replica {i}: GET {url}: {got:?}"
            );
        }
    }
}

/// A layer of 4 MiB and a bit, in 4 chunks, then the config blob (one streamed `PATCH`, as
/// dockerd sends it), then the manifest as `v1`, all through nginx; more than one replica served the upload requests; then each replica,
/// asked directly, serves the manifest by tag and every blob, digests checked by hashing.
async fn a_chunked_push_through_nginx_lands_on_several_replicas(cluster: &ClusterWorld) -> Pushed {
    let image = Pushed::new(4 * 1024 * 1024 + 12_345, 0x5eed_0001, "v1");
    let marks: Vec<usize> = cluster.replicas.iter().map(|r| r.log_mark()).collect();
    let front = Client::new(&cluster.front());
    let layer = front.blob(APP, &image.layer, 4).await;
    let config = front.streamed(APP, &image.config).await;
    assert_eq!([layer, config], image.blobs().map(|(d, _)| d));
    let put = front
        .put_manifest(APP, "v1", &image.manifest)
        .await
        .expect(201, "PUT of the manifest as v1 through nginx");
    assert_eq!(put.header("docker-content-digest"), Some(image.digest()));

    let served: Vec<usize> = cluster
        .replicas
        .iter()
        .zip(&marks)
        .map(|(r, m)| {
            r.served_since(*m)
                .iter()
                .filter(|s| s.path.contains("/blobs/uploads/"))
                .count()
        })
        .collect();
    assert!(
        served.iter().filter(|n| **n > 0).count() > 1,
        "nginx round-robin should have spread the upload requests over the replicas; \
         upload requests per replica: {served:?}\n{}",
        cluster.logs()
    );
    eprintln!("[e2e] upload requests served per replica: {served:?}");

    for (i, replica) in cluster.replicas.iter().enumerate() {
        assert_pulls(&replica.addr(), APP, "v1", &image, &format!("replica {i}")).await;
    }
    image
}

/// `v2` (another manifest over the same blobs) pushed through replica 0 directly; at once,
/// replicas 1 and 2 list both tags and serve `v2`.
async fn a_tag_pushed_through_one_replica_is_seen_at_once_by_the_others(
    cluster: &ClusterWorld,
    v1: &Pushed,
) -> Pushed {
    let v2 = Pushed {
        manifest: serde_json::to_vec(&{
            let mut m: Value = serde_json::from_slice(&v1.manifest).expect("v1 manifest");
            m["annotations"]["regmirror.e2e.note"] = "v2".into();
            m
        })
        .expect("manifest json"),
        layer: v1.layer.clone(),
        config: v1.config.clone(),
    };
    Client::new(&cluster.replicas[0].addr())
        .put_manifest(APP, "v2", &v2.manifest)
        .await
        .expect(201, "PUT of v2 through replica 0");
    for i in [1, 2] {
        let addr = cluster.replicas[i].addr();
        let client = Client::new(&addr);
        let tags = client
            .send("GET", &format!("/v2/{APP}/tags/list"), &[], None)
            .await
            .expect(200, &format!("replica {i}: tags/list right after v2"));
        let tags: Value = serde_json::from_slice(&tags.body).expect("tags/list json");
        assert_eq!(
            tags,
            json!({"name": APP, "tags": ["v1", "v2"]}),
            "replica {i}'s tags/list right after v2 was pushed through replica 0"
        );
        assert_pulls(&addr, APP, "v2", &v2, &format!("replica {i}, v2")).await;
    }
    v2
}

/// Through nginx, a first chunk, then the same chunk again to the `Location` it was given
/// (the next replica in turn): 416 with the upload's `Range`, the upload unharmed; the rest
/// follows and the blob is accepted.
async fn a_chunk_sent_again_is_refused_wherever_it_lands(cluster: &ClusterWorld) {
    let bytes = noise(600_000, 0x5eed_0003);
    let digest = sha256(&bytes);
    let front = Client::new(&cluster.front());
    let start = front
        .send("POST", &format!("/v2/{APP}/blobs/uploads/"), &[], None)
        .await
        .expect(202, "start of an upload");
    let (first, rest) = bytes.split_at(250_000);
    let range = |from: usize, chunk: &[u8]| -> Vec<(&str, String)> {
        vec![
            (
                "content-range",
                format!("{from}-{}", from + chunk.len() - 1),
            ),
            ("content-type", "application/octet-stream".into()),
        ]
    };
    let once = front
        .send(
            "PATCH",
            &start.location(&front.base),
            &range(0, first),
            Some(first.to_vec()),
        )
        .await
        .expect(202, "the first chunk");
    let again = front
        .send(
            "PATCH",
            &once.location(&front.base),
            &range(0, first),
            Some(first.to_vec()),
        )
        .await
        .expect(416, "the first chunk sent again");
    assert_eq!(again.code().as_deref(), Some("BLOB_UPLOAD_INVALID"));
    let status = front
        .send("GET", &once.location(&front.base), &[], None)
        .await
        .expect(204, "the status after the refused chunk");
    assert_eq!(
        status.header("range").as_deref(),
        Some("0-249999"),
        "the upload after a refused chunk"
    );
    let last = front
        .send(
            "PATCH",
            &status.location(&front.base),
            &range(first.len(), rest),
            Some(rest.to_vec()),
        )
        .await
        .expect(202, "the rest");
    let loc = last.location(&front.base);
    let sep = if loc.contains('?') { '&' } else { '?' };
    front
        .send("PUT", &format!("{loc}{sep}digest={digest}"), &[], None)
        .await
        .expect(201, "the end of the upload with a refused chunk");
    let none = AtomicU64::new(0);
    for (i, replica) in cluster.replicas.iter().enumerate() {
        let url = blob_url(&replica.addr(), APP, &digest);
        assert_eq!(
            get_blob(&front.http, &url, &none).await,
            Got::Body {
                len: bytes.len() as u64,
                digest: digest.clone()
            },
            "replica {i}: the blob whose first chunk was sent twice"
        );
    }
}

/// Through nginx, `myorg/other` mounts `v1`'s layer from `myorg/app` (201, no bytes sent);
/// every replica serves it there. Then, with `hosted.delete`, tag `v2` deleted through
/// replica 1: replicas 0 and 2 list only `v1` and answer 404 for `v2` at once, but still serve
/// its digest; that digest deleted through replica 2: replica 0 answers 404 for it too.
async fn a_mount_and_deletes_through_one_replica_are_seen_by_the_others(
    cluster: &ClusterWorld,
    v1: &Pushed,
    v2: &Pushed,
) {
    let (layer, bytes) = v1.blobs()[0].clone();
    let front = Client::new(&cluster.front());
    let mounted = front
        .send(
            "POST",
            &format!("/v2/myorg/other/blobs/uploads/?mount={layer}&from={APP}"),
            &[],
            None,
        )
        .await
        .expect(201, "a mount of v1's layer into myorg/other");
    assert_eq!(mounted.header("docker-content-digest"), Some(layer.clone()));
    let none = AtomicU64::new(0);
    for (i, replica) in cluster.replicas.iter().enumerate() {
        let url = blob_url(&replica.addr(), "myorg/other", &layer);
        assert_eq!(
            get_blob(&front.http, &url, &none).await,
            Got::Body {
                len: bytes.len() as u64,
                digest: layer.clone()
            },
            "replica {i}: the mounted layer in myorg/other"
        );
    }

    Client::new(&cluster.replicas[1].addr())
        .send("DELETE", &format!("/v2/{APP}/manifests/v2"), &[], None)
        .await
        .expect(202, "DELETE of tag v2 through replica 1");
    for i in [0, 2] {
        let client = Client::new(&cluster.replicas[i].addr());
        let tags = client
            .send("GET", &format!("/v2/{APP}/tags/list"), &[], None)
            .await
            .expect(200, &format!("replica {i}: tags/list after v2 was deleted"));
        let tags: Value = serde_json::from_slice(&tags.body).expect("tags/list json");
        assert_eq!(
            tags,
            json!({"name": APP, "tags": ["v1"]}),
            "replica {i}'s tags/list right after v2 was deleted through replica 1"
        );
        let gone = client
            .get_manifest(APP, "v2")
            .await
            .expect(404, &format!("replica {i}: v2 after its tag was deleted"));
        assert_eq!(gone.code().as_deref(), Some("MANIFEST_UNKNOWN"));
        client
            .get_manifest(APP, &v2.digest())
            .await
            .expect(200, &format!("replica {i}: v2's digest, untagged"));
    }
    Client::new(&cluster.replicas[2].addr())
        .send(
            "DELETE",
            &format!("/v2/{APP}/manifests/{}", v2.digest()),
            &[],
            None,
        )
        .await
        .expect(202, "DELETE of v2's digest through replica 2");
    let gone = Client::new(&cluster.replicas[0].addr())
        .get_manifest(APP, &v2.digest())
        .await
        .expect(
            404,
            "replica 0: v2's digest after it was deleted through replica 2",
        );
    assert_eq!(gone.code().as_deref(), Some("MANIFEST_UNKNOWN"));
    assert_pulls(
        &cluster.front(),
        APP,
        "v1",
        v1,
        "nginx, v1 after v2 was deleted",
    )
    .await;
}

/// A blob of 2 chunks through nginx finished with another blob's digest: 400
/// `DIGEST_INVALID`; the upload is gone (its status 404 `BLOB_UPLOAD_UNKNOWN`), neither
/// digest is served, and no object is left under `hosted/upload-chunks/` in the bucket.
async fn wrong_bytes_are_refused_and_leave_no_chunk_in_the_bucket(cluster: &ClusterWorld) {
    let bytes = noise(300_000, 0x5eed_0005);
    let claimed = sha256(&noise(300_000, 0x5eed_0006));
    let front = Client::new(&cluster.front());
    let refused = front
        .chunked(APP, &bytes, 2, &claimed)
        .await
        .expect(400, "an upload finished with another blob's digest");
    assert_eq!(
        refused.code().as_deref(),
        Some("DIGEST_INVALID"),
        "{}",
        refused.text()
    );
    let left = upload_chunks(cluster).await;
    assert!(
        left.is_empty(),
        "objects left under hosted/upload-chunks/ after a refused upload: {left:?}"
    );
    for (i, replica) in cluster.replicas.iter().enumerate() {
        let client = Client::new(&replica.addr());
        for digest in [claimed.clone(), sha256(&bytes)] {
            let got = client
                .send("GET", &format!("/v2/{APP}/blobs/{digest}"), &[], None)
                .await
                .expect(404, &format!("replica {i}: a blob of the refused upload"));
            assert_eq!(got.code().as_deref(), Some("BLOB_UNKNOWN"));
        }
    }
}

/// skopeo copies an OCI layout (two gzipped layers) into `myorg/tool:1` through nginx, then
/// copies it back out from replica 1 directly: the manifest digest is the layout's.
async fn skopeo_pushes_through_nginx_and_pulls_from_another_replica(cluster: &ClusterWorld) {
    let world = &cluster.world;
    let mut layout = Layout::create(&world.dir("tool-layout"));
    let layers = [
        layout.add_layer(&[("etc/tool.conf", Content::Text("tool = 1\n".into()))]),
        layout.add_layer(&[(
            "usr/bin/tool",
            Content::Random {
                len: 3 * 1024 * 1024,
                seed: 0x5eed_0002,
            },
        )]),
    ];
    let manifest = layout.add_image(Flavor::Oci, "linux", "amd64", &layers);
    layout.tag("1", manifest.media_type, &manifest.blob);
    layout.finish();
    let skopeo = Skopeo::plain(&world.dir("skopeo-tool"));
    let source = format!("oci:{}:1", world.dir("tool-layout").display());
    skopeo
        .push(&source, &format!("{}/myorg/tool:1", cluster.front()))
        .await;
    let via = cluster.replicas[1].addr();
    let out = world.dir("tool-out");
    let got = skopeo
        .pull_to_dir(&format!("{via}/myorg/tool:1"), &out, false)
        .await;
    assert_eq!(
        got, manifest.blob.digest,
        "the manifest skopeo pulled from replica 1 after pushing through nginx"
    );
    let mut want: Vec<String> = std::iter::once(manifest.config.digest.clone())
        .chain(manifest.layers.iter().map(|b| b.digest.clone()))
        .collect();
    want.sort();
    assert_eq!(
        crate::skopeo::dir_blobs(&out),
        want,
        "the blobs skopeo pulled"
    );
}
