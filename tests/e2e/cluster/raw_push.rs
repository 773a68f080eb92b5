//! A raw HTTP pusher for the hosted repositories of a cluster, as the distribution spec
//! describes uploads: `POST`, `PATCH`es with `Content-Range` to each `Location` it is given, a
//! `GET` of the status in between, `PUT ?digest=`; or one streamed `PATCH` as dockerd sends
//! it. Also the images it pushes and the checks of what a replica then serves.

use std::sync::atomic::AtomicU64;

use serde_json::{json, Value};

use crate::cluster::world::ClusterWorld;
use crate::cluster::{blob_url, get_blob, noise, Got};
use crate::oci::OCI_MANIFEST;
use crate::push::{descriptor, sha256};

/// Every replica's hosted repositories.
pub const HOSTED: (&str, &str) = ("REGMIRROR_HOSTED_REPOS", r#"["myorg/*"]"#);
/// With deletes allowed.
pub const DELETE: (&str, &str) = ("REGMIRROR_HOSTED_DELETE", "true");
pub const APP: &str = "myorg/app";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

/// A response, read whole.
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
    /// What was asked, for messages.
    pub asked: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body)
            .chars()
            .take(500)
            .collect()
    }

    /// The first OCI error code of the body.
    pub fn code(&self) -> Option<String> {
        let v: Value = serde_json::from_slice(&self.body).ok()?;
        v["errors"][0]["code"].as_str().map(str::to_owned)
    }

    /// Asserts the status, naming the request, its headers and body otherwise.
    pub fn expect(self, status: u16, what: &str) -> Answer {
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
    pub fn location(&self, base: &str) -> String {
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
pub struct Client {
    pub http: reqwest::Client,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
}

impl Client {
    pub fn new(addr: &str) -> Client {
        Client {
            http: reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("http client"),
            base: format!("http://{addr}"),
        }
    }

    /// `METHOD URL` (a path is taken relative to the base) with `headers` and `body`.
    pub async fn send(
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
    pub async fn chunked(&self, name: &str, bytes: &[u8], chunks: usize, digest: &str) -> Answer {
        let location = self.patched(name, bytes, chunks).await;
        self.finish(&location, digest).await
    }

    /// The chunks of [`Client::chunked`]: the `Location` to finish the upload at.
    pub async fn patched(&self, name: &str, bytes: &[u8], chunks: usize) -> String {
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
    pub async fn finish(&self, location: &str, digest: &str) -> Answer {
        let sep = if location.contains('?') { '&' } else { '?' };
        self.send("PUT", &format!("{location}{sep}digest={digest}"), &[], None)
            .await
    }

    /// An upload as dockerd makes it: one `PATCH` whose body streams (chunked transfer
    /// encoding: neither `Content-Length` nor `Content-Range`), then `PUT ?digest=`; returns
    /// the digest once accepted (201).
    pub async fn streamed(&self, name: &str, bytes: &[u8]) -> String {
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
    pub async fn blob(&self, name: &str, bytes: &[u8], chunks: usize) -> String {
        let digest = sha256(bytes);
        let done = self
            .chunked(name, bytes, chunks, &digest)
            .await
            .expect(201, &format!("the end of the upload of {digest}"));
        assert_eq!(done.header("docker-content-digest"), Some(digest.clone()));
        digest
    }

    /// `PUT /v2/NAME/manifests/REFERENCE` of an OCI manifest, unchecked.
    pub async fn put_manifest(&self, name: &str, reference: &str, bytes: &[u8]) -> Answer {
        self.send(
            "PUT",
            &format!("/v2/{name}/manifests/{reference}"),
            &[("content-type", OCI_MANIFEST.into())],
            Some(bytes.to_vec()),
        )
        .await
    }

    /// `GET /v2/NAME/manifests/REFERENCE` accepting OCI manifests, unchecked.
    pub async fn get_manifest(&self, name: &str, reference: &str) -> Answer {
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
pub struct Pushed {
    pub layer: Vec<u8>,
    pub config: Vec<u8>,
    pub manifest: Vec<u8>,
}

impl Pushed {
    /// A one-layer image whose layer is `len` bytes of noise from `seed`; `note` goes into
    /// the manifest's annotations (another manifest over the same blobs).
    pub fn new(len: usize, seed: u64, note: &str) -> Pushed {
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

    pub fn digest(&self) -> String {
        sha256(&self.manifest)
    }

    /// The blobs, as (digest, bytes).
    pub fn blobs(&self) -> [(String, &[u8]); 2] {
        [
            (sha256(&self.layer), &self.layer),
            (sha256(&self.config), &self.config),
        ]
    }
}

/// Asserts that `addr` serves `name:reference` as `image`'s manifest (bytes hashed, header
/// checked) and each of its blobs with the right length and digest.
pub async fn assert_pulls(addr: &str, name: &str, reference: &str, image: &Pushed, who: &str) {
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
pub async fn upload_chunks(cluster: &ClusterWorld) -> Vec<String> {
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
