//! Support for the push API tests (`tests/push_api.rs`): a mirror hosting `myorg/*`, the
//! client side of the OCI push flows written out request by request (uploads, manifests,
//! artifacts with a subject), answers read with their status, headers and body, and a
//! look through the data dir for bytes a refused push must not leave behind. Included by
//! `#[path]`, so the other test binaries do not build it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use regmirror::config::Config;
use reqwest::header::HeaderMap;
use reqwest::Method;
use serde_json::{json, Value};

use crate::common::images::{
    build_image, sha256_digest, Format, ImageInfo, OCI_INDEX, OCI_MANIFEST,
};
use crate::common::{start_mirror, wait_until, FakeUpstream, MirrorHandle};

/// The hosted repository most tests push to.
pub const APP: &str = "myorg/app";
/// The OCI empty descriptor's media type, and its blob (`{}`).
pub const EMPTY_JSON: &str = "application/vnd.oci.empty.v1+json";
pub const EMPTY_JSON_BLOB: &[u8] = b"{}";
/// The body type uploads are sent with.
const OCTET: &str = "application/octet-stream";

/// `myorg/*` hosted, deletes allowed: the configuration most tests run with.
pub fn hosting(c: &mut Config) {
    c.hosted.repos = vec!["myorg/*".into()];
    c.hosted.delete = true;
}

/// A mirror of `fake` with [`hosting`], then `tweak`.
pub async fn hosted_mirror(fake: &FakeUpstream, tweak: impl FnOnce(&mut Config)) -> MirrorHandle {
    start_mirror(&fake.url(), |c| {
        hosting(c);
        tweak(c);
    })
    .await
}

/// Where requests go: a mirror started in process, or a `regmirror serve` process.
pub trait Target {
    /// `http://127.0.0.1:PORT`
    fn base(&self) -> &str;
    fn http(&self) -> &reqwest::Client;
}

impl Target for MirrorHandle {
    fn base(&self) -> &str {
        &self.url
    }

    fn http(&self) -> &reqwest::Client {
        &self.client
    }
}

/// The same server through a client of its own (its own connections).
pub struct Fresh {
    url: String,
    client: reqwest::Client,
}

impl Fresh {
    pub fn of(m: &impl Target) -> Fresh {
        Fresh {
            url: m.base().to_owned(),
            client: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("client"),
        }
    }
}

impl Target for Fresh {
    fn base(&self) -> &str {
        &self.url
    }

    fn http(&self) -> &reqwest::Client {
        &self.client
    }
}

/// An answer read whole: what the tests assert on.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// `METHOD path?query`, for messages.
    pub what: String,
}

impl Answer {
    /// The header `name` ("" when absent).
    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body[..self.body.len().min(800)]).into_owned()
    }

    /// Asserts the status; returns `self` for more.
    #[track_caller]
    pub fn expect(self, status: u16) -> Answer {
        assert_eq!(
            self.status,
            status,
            "{}: status (headers {:?}, body {})",
            self.what,
            self.headers,
            self.text()
        );
        self
    }

    /// Asserts a registry error: `status` and `errors[0].code` = `code`. Returns the body.
    #[track_caller]
    pub fn expect_error(&self, status: u16, code: &str) -> Value {
        assert_eq!(
            self.status,
            status,
            "{}: status (body {})",
            self.what,
            self.text()
        );
        let v = self.error_body();
        assert_eq!(
            v["errors"][0]["code"],
            code,
            "{}: error code (body {})",
            self.what,
            self.text()
        );
        v
    }

    /// The body as a registry error envelope; panics when it is not one.
    #[track_caller]
    pub fn error_body(&self) -> Value {
        let v: Value = serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{}: error body is not JSON ({e}): {}",
                self.what,
                self.text()
            )
        });
        assert!(
            v["errors"].as_array().is_some_and(|a| !a.is_empty()),
            "{}: no errors in {}",
            self.what,
            self.text()
        );
        v
    }

    /// The first error's code ("" when the body is no error envelope).
    pub fn code(&self) -> String {
        serde_json::from_slice::<Value>(&self.body)
            .ok()
            .and_then(|v| v["errors"][0]["code"].as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    /// The body as JSON.
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {}", self.what, self.text()))
    }

    /// `Location`, resolved against the mirror's URL; panics when absent.
    #[track_caller]
    pub fn location(&self, m: &impl Target) -> String {
        let loc = self.header("location");
        assert!(
            !loc.is_empty(),
            "{}: no Location (headers {:?})",
            self.what,
            self.headers
        );
        resolve(m, &loc)
    }
}

/// `loc` (relative or absolute, as a `Location` may be) as an absolute URL of the mirror.
pub fn resolve(m: &impl Target, loc: &str) -> String {
    url::Url::parse(m.base())
        .and_then(|base| base.join(loc))
        .unwrap_or_else(|e| panic!("Location {loc:?}: {e}"))
        .to_string()
}

/// The path and query of an absolute URL (what survives a restart on another port).
pub fn path_of(url: &str) -> String {
    let u = url::Url::parse(url).unwrap_or_else(|e| panic!("{url:?}: {e}"));
    match u.query() {
        Some(q) => format!("{}?{q}", u.path()),
        None => u.path().to_owned(),
    }
}

/// `url` with `?digest=` (or `&digest=`) appended.
pub fn with_digest(url: &str, digest: &str) -> String {
    let mut u = url::Url::parse(url).unwrap_or_else(|e| panic!("{url:?}: {e}"));
    u.query_pairs_mut().append_pair("digest", digest);
    u.to_string()
}

/// Sends `method` to `url` (a path of the mirror, or an absolute URL) with `headers` and
/// `body`, and reads the whole answer.
pub async fn send(
    m: &impl Target,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> Answer {
    let url = resolve(m, url);
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    exchange(m.http().clone(), method, url, headers, body.map(Into::into))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// One request and its whole answer; `Err` says what failed when no answer came.
async fn exchange(
    client: reqwest::Client,
    method: Method,
    url: String,
    headers: Vec<(String, String)>,
    body: Option<reqwest::Body>,
) -> Result<Answer, String> {
    let what = format!("{method} {}", path_of(&url));
    let mut req = client.request(method, &url);
    for (k, v) in &headers {
        req = req.header(k, v);
    }
    if let Some(body) = body {
        req = req.body(body);
    }
    let resp = req.send().await.map_err(|e| format!("{what}: {e:?}"))?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .bytes()
        .await
        .map_err(|e| format!("{what}: body: {e:?}"))?;
    Ok(Answer {
        status,
        headers,
        body,
        what,
    })
}

/// A request whose body the test hands over piece by piece (sent chunked, without
/// `Content-Length`), so the mirror reads each piece as a frame of its own.
pub struct Feed {
    tx: Option<tokio::sync::mpsc::Sender<Bytes>>,
    answer: tokio::task::JoinHandle<Result<Answer, String>>,
}

impl Feed {
    /// Starts `method url` with a body still to come.
    pub fn start(m: &impl Target, method: Method, url: &str, headers: &[(&str, &str)]) -> Feed {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
        let pieces = futures_util::stream::unfold(rx, |mut rx| async move {
            let piece = rx.recv().await?;
            Some((Ok::<_, std::io::Error>(piece), rx))
        });
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let answer = tokio::spawn(exchange(
            m.http().clone(),
            method,
            resolve(m, url),
            headers,
            Some(reqwest::Body::wrap_stream(pieces)),
        ));
        Feed {
            tx: Some(tx),
            answer,
        }
    }

    /// Hands over one piece, then gives the mirror a moment to read it; `false` once the
    /// mirror stopped reading (it answered early).
    pub async fn piece(&self, bytes: &[u8]) -> bool {
        let Some(tx) = &self.tx else { return false };
        let sent = tx.send(Bytes::copy_from_slice(bytes)).await.is_ok();
        tokio::time::sleep(std::time::Duration::from_millis(3)).await;
        sent && !self.answer.is_finished()
    }

    /// Ends the body and waits for the answer.
    pub async fn finish(mut self) -> Result<Answer, String> {
        self.tx = None;
        self.answer
            .await
            .unwrap_or_else(|e| Err(format!("request task: {e}")))
    }
}

/// The `Accept` clients send for manifests (one comma-joined header, as containerd does).
pub const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.docker.distribution.manifest.list.v2+json";

/// The headers a client sends with a GET or HEAD of `url`: `Accept` for a manifest.
fn pull_headers(url: &str) -> &'static [(&'static str, &'static str)] {
    if url.contains("/manifests/") {
        &[("accept", ACCEPT_MANIFESTS)]
    } else {
        &[]
    }
}

pub async fn get(m: &impl Target, url: &str) -> Answer {
    send(m, Method::GET, url, pull_headers(url), None).await
}

pub async fn head(m: &impl Target, url: &str) -> Answer {
    send(m, Method::HEAD, url, pull_headers(url), None).await
}

pub async fn delete(m: &impl Target, url: &str) -> Answer {
    send(m, Method::DELETE, url, &[], None).await
}

/// `POST /v2/<repo>/blobs/uploads/<query>` with an empty body.
pub async fn post_upload(m: &impl Target, repo: &str, query: &str) -> Answer {
    let url = format!("/v2/{repo}/blobs/uploads/{query}");
    send(
        m,
        Method::POST,
        &url,
        &[("content-type", OCTET)],
        Some(Vec::new()),
    )
    .await
}

/// Opens an upload (asserting 202) and returns its absolute location.
pub async fn open_upload(m: &impl Target, repo: &str) -> String {
    post_upload(m, repo, "").await.expect(202).location(m)
}

/// `PATCH <loc>` with `chunk`, and `Content-Range: <start>-<end>` when `range` is given.
pub async fn patch(m: &impl Target, loc: &str, chunk: &[u8], range: Option<(u64, u64)>) -> Answer {
    let range = range.map(|(s, e)| format!("{s}-{e}"));
    let mut headers = vec![("content-type", OCTET)];
    if let Some(r) = &range {
        headers.push(("content-range", r.as_str()));
    }
    send(m, Method::PATCH, loc, &headers, Some(chunk.to_vec())).await
}

/// `PUT <loc>?digest=<digest>` closing an upload, with `body` (the last chunk, or all of it).
pub async fn put_upload(m: &impl Target, loc: &str, digest: &str, body: &[u8]) -> Answer {
    send(
        m,
        Method::PUT,
        &with_digest(&resolve(m, loc), digest),
        &[("content-type", OCTET)],
        Some(body.to_vec()),
    )
    .await
}

/// Pushes `bytes` to `repo` as POST then PUT (asserting 202, 201); returns its digest.
pub async fn push_blob(m: &impl Target, repo: &str, bytes: &[u8]) -> String {
    let digest = sha256_digest(bytes);
    let loc = open_upload(m, repo).await;
    put_upload(m, &loc, &digest, bytes).await.expect(201);
    digest
}

/// `PUT /v2/<repo>/manifests/<reference>` with `Content-Type: media_type`.
pub async fn put_manifest(
    m: &impl Target,
    repo: &str,
    reference: &str,
    media_type: &str,
    bytes: &[u8],
) -> Answer {
    send(
        m,
        Method::PUT,
        &format!("/v2/{repo}/manifests/{reference}"),
        &[("content-type", media_type)],
        Some(bytes.to_vec()),
    )
    .await
}

/// Builds an OCI image over `layers`, pushes its blobs and its manifest as `repo:tag`
/// (asserting 201 for each).
pub async fn push_image(m: &impl Target, repo: &str, tag: &str, layers: Vec<Vec<u8>>) -> ImageInfo {
    push_image_for(m, repo, tag, layers, "amd64").await
}

/// [`push_image`] for an architecture.
pub async fn push_image_for(
    m: &impl Target,
    repo: &str,
    tag: &str,
    layers: Vec<Vec<u8>>,
    arch: &str,
) -> ImageInfo {
    let img = build_image(layers, Format::Oci, arch);
    for (_, bytes) in img.blobs() {
        push_blob(m, repo, &bytes).await;
    }
    put_manifest(m, repo, tag, OCI_MANIFEST, &img.manifest)
        .await
        .expect(201);
    img
}

/// The descriptor of a manifest (`mediaType`, `digest`, `size`).
pub fn descriptor(media_type: &str, bytes: &[u8]) -> Value {
    json!({"mediaType": media_type, "digest": sha256_digest(bytes), "size": bytes.len()})
}

/// An OCI artifact manifest referring to `subject`: `artifactType` when given, the config
/// `config_type` over the empty JSON blob, one layer `layer`, one annotation.
pub fn artifact(
    subject: &Value,
    artifact_type: Option<&str>,
    config_type: &str,
    layer: &[u8],
    annotation: &str,
) -> Bytes {
    let mut m = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": config_type,
            "digest": sha256_digest(EMPTY_JSON_BLOB),
            "size": EMPTY_JSON_BLOB.len(),
        },
        "layers": [{
            "mediaType": artifact_type.unwrap_or(OCTET),
            "digest": sha256_digest(layer),
            "size": layer.len(),
        }],
        "subject": subject,
        "annotations": {"org.example.note": annotation},
    });
    if let Some(t) = artifact_type {
        m["artifactType"] = json!(t);
    }
    Bytes::from(serde_json::to_vec(&m).unwrap_or_default())
}

/// An OCI image index over `manifests` (descriptors), with `extra` fields merged in.
pub fn index(manifests: Vec<Value>, extra: Value) -> Bytes {
    let mut v = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
    if let (Some(obj), Some(more)) = (v.as_object_mut(), extra.as_object()) {
        for (k, val) in more {
            obj.insert(k.clone(), val.clone());
        }
    }
    Bytes::from(serde_json::to_vec(&v).unwrap_or_default())
}

/// Upstream requests whose path names `prefix` (e.g. `/v2/myorg/`).
pub fn upstream_requests_for(fake: &FakeUpstream, prefix: &str) -> Vec<String> {
    fake.requests()
        .into_iter()
        .filter(|r| r.path.starts_with(prefix))
        .map(|r| format!("{} {}", r.method, r.path))
        .collect()
}

/// Files under `dir` (recursively) holding `needle` somewhere in their bytes.
pub fn files_holding(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let path = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => out.extend(files_holding(&path, needle)),
            Ok(t) if t.is_file() => {
                let held = std::fs::read(&path)
                    .map(|data| data.windows(needle.len()).any(|w| w == needle))
                    .unwrap_or(false);
                if held {
                    out.push(path);
                }
            }
            _ => {}
        }
    }
    out
}

/// Asserts the blob `digest` of `repo` is served: HEAD with its length and digest and no
/// body, GET with exactly `bytes`.
pub async fn assert_blob_served(m: &impl Target, repo: &str, digest: &str, bytes: &[u8]) {
    let path = format!("/v2/{repo}/blobs/{digest}");
    let h = head(m, &path).await.expect(200);
    assert_eq!(h.header("docker-content-digest"), digest, "HEAD {path}");
    assert_eq!(
        h.header("content-length"),
        bytes.len().to_string(),
        "HEAD {path}"
    );
    assert!(h.body.is_empty(), "HEAD {path} has a body");
    let g = get(m, &path).await.expect(200);
    assert_eq!(g.header("docker-content-digest"), digest, "GET {path}");
    assert_eq!(
        g.header("content-length"),
        bytes.len().to_string(),
        "GET {path}"
    );
    assert!(g.body[..] == bytes[..], "GET {path}: other bytes");
}

/// Asserts that within a few seconds no file under the data dir holds the first KiB of
/// `bytes` (random, so only a copy of them would).
pub async fn assert_no_copy_left(m: &MirrorHandle, bytes: &[u8], what: &str) {
    let needle = &bytes[..1024];
    let gone = wait_until(Duration::from_secs(10), || {
        files_holding(&m.data_dir, needle).is_empty()
    })
    .await;
    assert!(
        gone,
        "{what}: bytes left in {:?}",
        files_holding(&m.data_dir, needle)
    );
}
