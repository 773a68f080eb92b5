//! Hosted (pushable) repositories on a cluster (issue 16, item 5): every replica has
//! `hosted.repos = ["myorg/*"]`, the content goes to the bucket's `hosted/` area and the index
//! (tags, links) to Redis.
//!
//! - `pushes_through_a_cluster_are_pulled_alike_from_every_replica` (one cluster, in turn): a
//!   chunked push through nginx round-robin lands its requests on several replicas and is
//!   pulled alike from each; a chunk sent twice is 416 wherever it lands; a tag, a mount,
//!   deletes and a referrer pushed through one replica are seen at once by the others; wrong
//!   bytes leave no chunk in the bucket; skopeo pushes through nginx and pulls from another
//!   replica; a blob cached from a mirrored repository is mounted through any replica; every
//!   replica's catalog lists every hosted repository.
//! - `a_push_while_redis_is_down_...`, `a_push_while_garage_is_down_...`: a push is refused
//!   with 503 (never a 201 for what was not recorded), a pull is 503 (never 404), and both
//!   work once the part is back.
//! - `concurrent_pushes_of_the_same_blobs_all_succeed`: parallel pushes of one layer.
//! - `docker_pushes_through_nginx_and_pulls_from_a_replica`: dockerd as the guides push.
//!
//! The pusher here is raw HTTP, as the distribution spec describes a chunked upload: `POST`,
//! `PATCH`es with `Content-Range` to each `Location` it is given, a `GET` of the status in
//! between, `PUT ?digest=`.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use serde_json::{json, Value};

use crate::cluster::world::{ClusterWorld, Setup};
use crate::cluster::{blob_url, get_blob, noise, Got};
use crate::oci::{Content, Flavor, Layout, OCI_MANIFEST};
use crate::push::{descriptor, sha256};
use crate::skopeo::Skopeo;

/// Every replica's hosted repositories.
const HOSTED: (&str, &str) = ("REGMIRROR_HOSTED_REPOS", r#"["myorg/*"]"#);
/// With deletes allowed.
const DELETE: (&str, &str) = ("REGMIRROR_HOSTED_DELETE", "true");
const APP: &str = "myorg/app";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

/// A response, read whole.
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
    /// What was asked, for messages.
    asked: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body)
            .chars()
            .take(500)
            .collect()
    }

    /// The first OCI error code of the body.
    fn code(&self) -> Option<String> {
        let v: Value = serde_json::from_slice(&self.body).ok()?;
        v["errors"][0]["code"].as_str().map(str::to_owned)
    }

    /// Asserts the status, naming the request, its headers and body otherwise.
    fn expect(self, status: u16, what: &str) -> Answer {
        assert_eq!(
            self.status,
            status,
            "{what}: {} answered {} {:?}: {}",
            self.asked,
            self.status,
            self.headers,
            self.text()
        );
        self
    }

    /// The `Location` to send the next request of an upload to.
    fn location(&self, base: &str) -> String {
        let loc = self.header("location").unwrap_or_else(|| {
            panic!("{} answered {} without a Location", self.asked, self.status)
        });
        if loc.starts_with("http://") || loc.starts_with("https://") {
            loc
        } else {
            format!("{base}{loc}")
        }
    }
}

/// Raw HTTP to one registry address (nginx or one replica).
struct Client {
    http: reqwest::Client,
    /// `http://127.0.0.1:PORT`.
    base: String,
}

impl Client {
    fn new(addr: &str) -> Client {
        Client {
            http: reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("http client"),
            base: format!("http://{addr}"),
        }
    }

    /// `METHOD URL` (a path is taken relative to the base) with `headers` and `body`.
    async fn send(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, String)],
        body: Option<Vec<u8>>,
    ) -> Answer {
        let url = if url.starts_with('/') {
            format!("{}{url}", self.base)
        } else {
            url.to_owned()
        };
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut req = self.http.request(m, &url);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        if let Some(b) = body {
            req = req.body(b);
        }
        let asked = format!("{method} {url}");
        let resp = req.send().await.unwrap_or_else(|e| panic!("{asked}: {e}"));
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .bytes()
            .await
            .unwrap_or_else(|e| panic!("{asked}: body: {e}"))
            .to_vec();
        Answer {
            status,
            headers,
            body,
            asked,
        }
    }

    /// A chunked upload of `bytes` into `name`, in `chunks` `PATCH`es with `Content-Range`,
    /// each to the `Location` the answer before gave, the upload's status asked after each
    /// (and checked); returns the final `PUT ?digest=` answer, unchecked.
    async fn chunked(&self, name: &str, bytes: &[u8], chunks: usize, digest: &str) -> Answer {
        let location = self.patched(name, bytes, chunks).await;
        self.finish(&location, digest).await
    }

    /// The chunks of [`Client::chunked`]: the `Location` to finish the upload at.
    async fn patched(&self, name: &str, bytes: &[u8], chunks: usize) -> String {
        let start = self
            .send("POST", &format!("/v2/{name}/blobs/uploads/"), &[], None)
            .await
            .expect(202, "start of an upload");
        let uuid = start.header("docker-upload-uuid");
        assert!(uuid.is_some(), "{} gave no Docker-Upload-UUID", start.asked);
        let mut location = start.location(&self.base);
        let size = bytes.len().div_ceil(chunks);
        let mut sent = 0usize;
        for (i, chunk) in bytes.chunks(size).enumerate() {
            let end = sent + chunk.len() - 1;
            let patched = self
                .send(
                    "PATCH",
                    &location,
                    &[
                        ("content-range", format!("{sent}-{end}")),
                        ("content-type", "application/octet-stream".into()),
                    ],
                    Some(chunk.to_vec()),
                )
                .await
                .expect(202, &format!("chunk {i} ({sent}-{end})"));
            assert_eq!(
                patched.header("range").as_deref(),
                Some(format!("0-{end}").as_str()),
                "the Range after chunk {i}"
            );
            sent += chunk.len();
            location = patched.location(&self.base);
            let status = self
                .send("GET", &location, &[], None)
                .await
                .expect(204, &format!("the status after chunk {i}"));
            assert_eq!(
                status.header("range").as_deref(),
                Some(format!("0-{end}").as_str()),
                "the status's Range after chunk {i}"
            );
            assert_eq!(status.header("docker-upload-uuid"), uuid);
            location = status.location(&self.base);
        }
        location
    }

    /// `PUT <location>?digest=DIGEST` with no body: the end of an upload, unchecked.
    async fn finish(&self, location: &str, digest: &str) -> Answer {
        let sep = if location.contains('?') { '&' } else { '?' };
        self.send("PUT", &format!("{location}{sep}digest={digest}"), &[], None)
            .await
    }

    /// An upload as dockerd makes it: one `PATCH` whose body streams (chunked transfer
    /// encoding: neither `Content-Length` nor `Content-Range`), then `PUT ?digest=`; returns
    /// the digest once accepted (201).
    async fn streamed(&self, name: &str, bytes: &[u8]) -> String {
        let digest = sha256(bytes);
        let start = self
            .send("POST", &format!("/v2/{name}/blobs/uploads/"), &[], None)
            .await
            .expect(202, "start of an upload");
        let location = start.location(&self.base);
        let pieces: Vec<Result<Vec<u8>, std::io::Error>> =
            bytes.chunks(64 * 1024).map(|c| Ok(c.to_vec())).collect();
        let body = reqwest::Body::wrap_stream(futures_util::stream::iter(pieces));
        let resp = self
            .http
            .patch(&location)
            .header("content-type", "application/octet-stream")
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("PATCH {location} (streamed): {e}"));
        let status = resp.status().as_u16();
        let range = resp.headers().get("range").cloned();
        let next = resp
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .map(|l| format!("{}{l}", if l.starts_with('/') { &self.base } else { "" }));
        let text = resp.text().await.unwrap_or_default();
        assert_eq!(status, 202, "a streamed PATCH of {digest}: {text}");
        assert_eq!(
            range.as_ref().and_then(|v| v.to_str().ok()),
            Some(format!("0-{}", bytes.len() - 1).as_str()),
            "the Range after a streamed PATCH of {digest}"
        );
        let next = next.expect("a Location after the streamed PATCH");
        let sep = if next.contains('?') { '&' } else { '?' };
        let done = self
            .send("PUT", &format!("{next}{sep}digest={digest}"), &[], None)
            .await
            .expect(201, &format!("the end of the streamed upload of {digest}"));
        assert_eq!(done.header("docker-content-digest"), Some(digest.clone()));
        digest
    }

    /// A chunked upload of `bytes` into `name` that must be accepted (201, its digest).
    async fn blob(&self, name: &str, bytes: &[u8], chunks: usize) -> String {
        let digest = sha256(bytes);
        let done = self
            .chunked(name, bytes, chunks, &digest)
            .await
            .expect(201, &format!("the end of the upload of {digest}"));
        assert_eq!(done.header("docker-content-digest"), Some(digest.clone()));
        digest
    }

    /// `PUT /v2/NAME/manifests/REFERENCE` of an OCI manifest, unchecked.
    async fn put_manifest(&self, name: &str, reference: &str, bytes: &[u8]) -> Answer {
        self.send(
            "PUT",
            &format!("/v2/{name}/manifests/{reference}"),
            &[("content-type", OCI_MANIFEST.into())],
            Some(bytes.to_vec()),
        )
        .await
    }

    /// `GET /v2/NAME/manifests/REFERENCE` accepting OCI manifests, unchecked.
    async fn get_manifest(&self, name: &str, reference: &str) -> Answer {
        self.send(
            "GET",
            &format!("/v2/{name}/manifests/{reference}"),
            &[("accept", OCI_MANIFEST.into())],
            None,
        )
        .await
    }
}

/// An image as pushed: its layer, config and manifest bytes.
struct Pushed {
    layer: Vec<u8>,
    config: Vec<u8>,
    manifest: Vec<u8>,
}

impl Pushed {
    /// A one-layer image whose layer is `len` bytes of noise from `seed`; `note` goes into
    /// the manifest's annotations (another manifest over the same blobs).
    fn new(len: usize, seed: u64, note: &str) -> Pushed {
        let layer = noise(len, seed);
        let config = serde_json::to_vec(&json!({
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [sha256(&layer)]},
        }))
        .expect("config json");
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": descriptor(OCI_CONFIG, &config),
            "layers": [descriptor(OCI_LAYER, &layer)],
            "annotations": {"regmirror.e2e.note": note},
        }))
        .expect("manifest json");
        Pushed {
            layer,
            config,
            manifest,
        }
    }

    fn digest(&self) -> String {
        sha256(&self.manifest)
    }

    /// The blobs, as (digest, bytes).
    fn blobs(&self) -> [(String, &[u8]); 2] {
        [
            (sha256(&self.layer), &self.layer),
            (sha256(&self.config), &self.config),
        ]
    }
}

/// Asserts that `addr` serves `name:reference` as `image`'s manifest (bytes hashed, header
/// checked) and each of its blobs with the right length and digest.
async fn assert_pulls(addr: &str, name: &str, reference: &str, image: &Pushed, who: &str) {
    let client = Client::new(addr);
    let got = client
        .get_manifest(name, reference)
        .await
        .expect(200, &format!("{who}: the manifest {name}:{reference}"));
    assert_eq!(
        sha256(&got.body),
        image.digest(),
        "{who}: the bytes of {name}:{reference}"
    );
    assert_eq!(
        got.header("docker-content-digest"),
        Some(image.digest()),
        "{who}: Docker-Content-Digest of {name}:{reference}"
    );
    assert_eq!(
        got.header("content-type").as_deref(),
        Some(OCI_MANIFEST),
        "{who}: the media type of {name}:{reference}"
    );
    let head = client
        .send(
            "HEAD",
            &format!("/v2/{name}/manifests/{reference}"),
            &[("accept", OCI_MANIFEST.into())],
            None,
        )
        .await
        .expect(200, &format!("{who}: HEAD of {name}:{reference}"));
    assert_eq!(head.header("docker-content-digest"), Some(image.digest()));
    assert_eq!(
        head.header("content-length"),
        Some(image.manifest.len().to_string())
    );
    let none = AtomicU64::new(0);
    for (digest, bytes) in image.blobs() {
        let head = client
            .send("HEAD", &format!("/v2/{name}/blobs/{digest}"), &[], None)
            .await
            .expect(200, &format!("{who}: HEAD of blob {digest}"));
        assert_eq!(head.header("content-length"), Some(bytes.len().to_string()));
        let url = blob_url(addr, name, &digest);
        let want = Got::Body {
            len: bytes.len() as u64,
            digest: digest.clone(),
        };
        assert_eq!(
            get_blob(&client.http, &url, &none).await,
            want,
            "{who}: GET {url}"
        );
    }
}

/// The bucket's objects under `hosted/upload-chunks/` (uploads in progress).
async fn upload_chunks(cluster: &ClusterWorld) -> Vec<String> {
    cluster
        .garage
        .s3()
        .list()
        .await
        .into_iter()
        .map(|o| o.key)
        .filter(|k| k.contains("hosted/upload-chunks/"))
        .collect()
}

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

/// Redis stopped after a first push: each replica answers 503 `UNAVAILABLE`, never 404, for
/// the pushed manifest (by tag and by digest), a blob and the tag list; a push through a
/// replica (chunked, monolithic, or the manifest) is refused with 503, never 201. Once Redis
/// is back (empty: nothing persisted), the push succeeds and every replica serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_while_redis_is_down_is_refused_and_succeeds_once_it_is_back() {
    let mut cluster = ClusterWorld::start(Setup::env(&[HOSTED])).await;
    let before = Pushed::new(200_000, 0x5eed_0010, "before");
    let r0 = Client::new(&cluster.replicas[0].addr());
    for (_, bytes) in before.blobs() {
        r0.blob(APP, bytes, 2).await;
    }
    r0.put_manifest(APP, "v1", &before.manifest)
        .await
        .expect(201, "PUT v1 before Redis stops");

    cluster.redis.kill();
    let (layer_digest, _) = &before.blobs()[0];
    for (i, replica) in cluster.replicas.iter().enumerate() {
        let client = Client::new(&replica.addr());
        for path in [
            format!("/v2/{APP}/manifests/v1"),
            format!("/v2/{APP}/manifests/{}", before.digest()),
            format!("/v2/{APP}/blobs/{layer_digest}"),
            format!("/v2/{APP}/tags/list"),
        ] {
            for method in ["GET", "HEAD"] {
                let got = client.send(method, &path, &[], None).await;
                assert_eq!(
                    got.status,
                    503,
                    "replica {i}: {method} {path} with Redis down: {}",
                    got.text()
                );
                if method == "GET" {
                    assert_eq!(got.code().as_deref(), Some("UNAVAILABLE"), "{}", got.text());
                }
            }
        }
    }

    let during = Pushed::new(150_000, 0x5eed_0011, "during");
    let r1 = Client::new(&cluster.replicas[1].addr());
    let (digest, bytes) = &during.blobs()[0];
    let chunked = r1.chunked(APP, bytes, 2, digest).await;
    assert_eq!(
        chunked.status,
        503,
        "the end of a chunked upload through replica 1 with Redis down: {}",
        chunked.text()
    );
    assert_eq!(chunked.code().as_deref(), Some("UNAVAILABLE"));
    let (digest, bytes) = &during.blobs()[1];
    let monolithic = r1
        .send(
            "POST",
            &format!("/v2/{APP}/blobs/uploads/?digest={digest}"),
            &[("content-type", "application/octet-stream".into())],
            Some(bytes.to_vec()),
        )
        .await;
    assert_eq!(
        monolithic.status,
        503,
        "a monolithic upload through replica 1 with Redis down: {}",
        monolithic.text()
    );
    let manifest = r1.put_manifest(APP, "v2", &during.manifest).await;
    assert_eq!(
        manifest.status,
        503,
        "a manifest PUT through replica 1 with Redis down: {}",
        manifest.text()
    );

    cluster.redis.restart().await;
    // A replica does not ask Redis again for a moment after a failure
    // (`cluster::redis::TIMEOUT`, 2 s): a client retrying a 503 gets through then.
    let front = Client::new(&cluster.front());
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (digest, bytes) = &during.blobs()[0];
        let done = front.chunked(APP, bytes, 2, digest).await;
        if done.status == 201 {
            break;
        }
        assert!(
            done.status == 503 && std::time::Instant::now() < deadline,
            "a push through nginx once Redis is back: {} {}\n{}",
            done.status,
            done.text(),
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    front.blob(APP, &during.config, 1).await;
    front
        .put_manifest(APP, "v2", &during.manifest)
        .await
        .expect(201, "PUT v2 through nginx once Redis is back");
    for (i, replica) in cluster.replicas.iter().enumerate() {
        assert_pulls(&replica.addr(), APP, "v2", &during, &format!("replica {i}")).await;
    }
}

/// Garage stopped after replica 0 took a push's blobs (so its disk holds them): the manifest
/// PUT through replica 0, whose blobs it finds on its own disk but which the bucket cannot
/// take, is 503 `UNAVAILABLE`, never a 201 nor a 500; so is a new upload; replica 0 still
/// serves the blobs its disk holds, replica 1 answers 503 for them (never 404). Once Garage
/// is back, the manifest PUT succeeds and every replica serves the image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_while_garage_is_down_is_refused_and_succeeds_once_it_is_back() {
    let mut cluster = ClusterWorld::start(Setup::env(&[HOSTED])).await;
    let image = Pushed::new(300_000, 0x5eed_0020, "garage");
    let r0 = Client::new(&cluster.replicas[0].addr());
    for (_, bytes) in image.blobs() {
        r0.blob(APP, bytes, 2).await;
    }

    cluster.garage.kill(0);
    let put = r0.put_manifest(APP, "v1", &image.manifest).await;
    assert_eq!(
        (put.status, put.code().as_deref()),
        (503, Some("UNAVAILABLE")),
        "a manifest PUT through replica 0 with Garage down: {}",
        put.text()
    );
    let start = r0
        .send("POST", &format!("/v2/{APP}/blobs/uploads/"), &[], None)
        .await;
    assert_eq!(
        start.status,
        503,
        "the start of an upload with Garage down: {}",
        start.text()
    );
    let none = AtomicU64::new(0);
    let r1 = Client::new(&cluster.replicas[1].addr());
    for (digest, bytes) in image.blobs() {
        let url = blob_url(&cluster.replicas[0].addr(), APP, &digest);
        assert_eq!(
            get_blob(&r0.http, &url, &none).await,
            Got::Body {
                len: bytes.len() as u64,
                digest: digest.clone()
            },
            "replica 0 serves {digest} from its disk with Garage down"
        );
        let got = r1
            .send("GET", &format!("/v2/{APP}/blobs/{digest}"), &[], None)
            .await;
        assert_eq!(
            got.status,
            503,
            "replica 1: {digest}, only in the bucket, with Garage down: {}",
            got.text()
        );
    }

    cluster.garage.restart(0).await;
    r0.put_manifest(APP, "v1", &image.manifest).await.expect(
        201,
        "the manifest PUT through replica 0 once Garage is back",
    );
    for (i, replica) in cluster.replicas.iter().enumerate() {
        assert_pulls(&replica.addr(), APP, "v1", &image, &format!("replica {i}")).await;
    }
}

/// Six clients push the same image at once through nginx (round-robin: the same blobs
/// committed concurrently through every replica, each blob's final `PUT ?digest=` sent by all
/// six together), three into `myorg/c0` and three into
/// `myorg/c1`, as parallel CI jobs sharing a base layer do: every blob upload and manifest
/// PUT is 201 (a commit that finds the bucket already completed by another is no failure),
/// every replica serves both, and no upload is left in the bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pushes_of_the_same_blobs_all_succeed() {
    let cluster = ClusterWorld::start(Setup::env(&[HOSTED])).await;
    let image = Pushed::new(3 * 1024 * 1024, 0x5eed_0030, "concurrent");
    let front = cluster.front();
    let together = std::sync::Arc::new(tokio::sync::Barrier::new(6));
    let pushes: Vec<_> = (0..6)
        .map(|k| {
            let client = Client::new(&front);
            let (layer, config) = (image.layer.clone(), image.config.clone());
            let manifest = image.manifest.clone();
            let together = together.clone();
            tokio::spawn(async move {
                let name = format!("myorg/c{}", k % 2);
                let mut got = Vec::new();
                for (bytes, chunks) in [(&layer, 3), (&config, 1)] {
                    let location = client.patched(&name, bytes, chunks).await;
                    // Every client's commit of the blob at once.
                    together.wait().await;
                    let done = client.finish(&location, &sha256(bytes)).await;
                    got.push((done.asked.clone(), done.status, done.text()));
                }
                let put = client.put_manifest(&name, "1", &manifest).await;
                got.push((put.asked.clone(), put.status, put.text()));
                got
            })
        })
        .collect();
    let mut failed = Vec::new();
    for push in pushes {
        let answers = push.await.expect("a push task");
        failed.extend(answers.into_iter().filter(|(_, status, _)| *status != 201));
    }
    assert!(
        failed.is_empty(),
        "concurrent pushes of the same blobs through nginx; these were not 201:\n{}\n{}",
        failed
            .iter()
            .map(|(asked, status, text)| format!("  {asked}: {status} {text}"))
            .collect::<Vec<_>>()
            .join("\n"),
        cluster.logs()
    );
    for (i, replica) in cluster.replicas.iter().enumerate() {
        for name in ["myorg/c0", "myorg/c1"] {
            assert_pulls(&replica.addr(), name, "1", &image, &format!("replica {i}")).await;
        }
    }
    let left = upload_chunks(&cluster).await;
    assert!(left.is_empty(), "upload chunks left: {left:?}");
    let multipart = cluster.garage.s3().multipart_uploads().await;
    assert!(
        multipart.is_empty(),
        "multipart uploads left: {multipart:?}"
    );
}

/// dockerd, as the guides push: an image `docker load`ed (made from an OCI layout the test
/// writes, two layers), `docker push 127.0.0.1:<nginx>/myorg/hello:1` through nginx (its
/// streamed `PATCH`es round-robin over the replicas), `docker image rm`, then `docker pull`
/// from replica 2 directly: the pulled image's digest is the one the push reported, and each
/// replica answers the tag with that digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_pushes_through_nginx_and_pulls_from_a_replica() {
    use crate::dockerd::{Dockerd, DOCKER};
    use crate::procs::run_ok;

    let cluster = ClusterWorld::start(Setup {
        tools: vec!["dockerd", DOCKER],
        ..Setup::env(&[HOSTED])
    })
    .await;
    let world = &cluster.world;
    let layout = Layout::create(&world.dir("hello-layout"));
    let layers = [
        layout.add_layer(&[("hello.txt", Content::Text("hello from a cluster\n".into()))]),
        layout.add_layer(&[(
            "blob.bin",
            Content::Random {
                len: 2 * 1024 * 1024,
                seed: 0x5eed_0040,
            },
        )]),
    ];
    let manifest = layout.add_image(Flavor::Docker, "linux", "amd64", &layers);
    let exported = world.dir("hello-dir");
    layout.export_dir(&manifest, &exported);
    let front = cluster.front();
    let pushed_ref = format!("{front}/myorg/hello:1");
    let archive = world.dir("hello-archive").join("hello.tar");
    let skopeo = Skopeo::plain(&world.dir("skopeo-hello"));
    let mut copy = skopeo.command("copy");
    copy.arg(format!("dir:{}", exported.display()))
        .arg(format!("docker-archive:{}:{pushed_ref}", archive.display()));
    run_ok(&mut copy, Duration::from_secs(120)).await;

    let dockerd = Dockerd::start(&world.dir("dk"), &[]).await;
    let mut load = dockerd.docker();
    load.arg("load").arg("-i").arg(&archive);
    run_ok(&mut load, Duration::from_secs(120)).await;
    let mut push = dockerd.docker();
    push.args(["push", &pushed_ref]);
    let out = run_ok(&mut push, Duration::from_secs(240)).await;
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    let digest = said
        .split_whitespace()
        .skip_while(|w| *w != "digest:")
        .nth(1)
        .unwrap_or_else(|| panic!("no digest in docker push's output:\n{said}"))
        .to_owned();
    let mut rm = dockerd.docker();
    rm.args(["image", "rm", &pushed_ref]);
    run_ok(&mut rm, Duration::from_secs(60)).await;

    let r2 = cluster.replicas[2].addr();
    let pulled_ref = format!("{r2}/myorg/hello:1");
    dockerd.pull(&pulled_ref).await;
    assert_eq!(
        dockerd.repo_digests(&pulled_ref).await,
        vec![format!("{r2}/myorg/hello@{digest}")],
        "the image docker pulled from replica 2 after pushing it through nginx"
    );
    for (i, replica) in cluster.replicas.iter().enumerate() {
        let got = Client::new(&replica.addr())
            .send(
                "HEAD",
                "/v2/myorg/hello/manifests/1",
                &[(
                    "accept",
                    "application/vnd.docker.distribution.manifest.v2+json, \
                     application/vnd.oci.image.manifest.v1+json"
                        .into(),
                )],
                None,
            )
            .await
            .expect(200, &format!("replica {i}: myorg/hello:1"));
        assert_eq!(
            got.header("docker-content-digest"),
            Some(digest.clone()),
            "replica {i}: myorg/hello:1"
        );
    }
}
