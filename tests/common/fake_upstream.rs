//! An in-process fake upstream registry (hyper on 127.0.0.1:0) for the integration tests:
//! its content (repositories, tags, manifests, blobs), its bearer-token realm, what it
//! served (request log, token fetches, body progress) and its fault switches. Routing and
//! handlers are in `server`, blob bodies (where most faults act) in `body`.

mod body;
mod restart;
mod resume;
mod server;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle};

pub use resume::ResumeFaults;

use super::images::{build_image, build_index, sha256_digest, Format, ImageInfo, IndexInfo};

/// The `service` the fake's challenges name.
pub const SERVICE: &str = "fake";

/// One request the fake received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// The `Authorization` header as sent.
    pub authorization: Option<String>,
    pub accept: Option<String>,
    /// The `Range` header as sent.
    pub range: Option<String>,
    /// Whether it passed the token check (false: answered with a 401 challenge).
    pub authorized: bool,
}

/// One `GET /token`.
#[derive(Debug, Clone)]
pub struct TokenFetch {
    /// Decoded HTTP Basic credentials, when sent.
    pub basic: Option<(String, String)>,
    pub service: Option<String>,
    pub scope: Option<String>,
    /// The token issued; `None` when refused.
    pub issued: Option<String>,
}

/// Blob bodies served, as they go. Tests wait on it instead of sleeping.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub bodies_started: usize,
    /// Bodies whose last byte was handed to the connection.
    pub bodies_completed: usize,
    /// Bodies dropped before their end (client gone, or stalled and abandoned).
    pub bodies_dropped: usize,
    /// Bodies the fake cut on purpose (`cut_after`).
    pub bodies_cut: usize,
    /// Bodies waiting at the gate (`pause_blobs_at`), cumulative.
    pub paused: usize,
    /// Requests waiting at the gate (`hold_requests`), cumulative.
    pub held: usize,
    pub bytes_sent: u64,
}

/// A status the fake answers instead of the content.
#[derive(Debug, Clone)]
pub struct Failure {
    pub status: u16,
    pub retry_after: Option<String>,
    /// Only requests whose path contains this (all `/v2/<name>/...` requests when `None`).
    pub path_contains: Option<String>,
}

/// Fault switches and auth settings; change them at runtime with [`FakeUpstream::set`].
#[derive(Debug, Clone)]
pub struct Faults {
    /// Bytes per blob body chunk.
    pub chunk_size: usize,
    /// Pause before each blob body chunk after the first.
    pub chunk_delay: Option<Duration>,
    /// Cut the connection after this many bytes of a blob body.
    pub cut_after: Option<u64>,
    /// Stop sending (forever) after this many bytes of a blob body.
    pub stall_after: Option<u64>,
    /// Each blob body waits at this offset until [`FakeUpstream::release`].
    pub pause_at: Option<u64>,
    /// Blob bodies are sent without `Content-Length` (chunked).
    pub no_content_length: bool,
    /// Digests whose blob is served with wrong bytes of the right length.
    pub corrupt: HashSet<String>,
    /// Answer `/v2/<name>/...` requests with this status.
    pub fail: Option<Failure>,
    /// Never answer `/v2/<name>/...` requests whose path contains this ("" = all).
    pub hang: Option<String>,
    /// `/v2/<name>/...` requests whose path contains this wait until [`FakeUpstream::release`],
    /// then are answered as usual.
    pub hold: Option<String>,
    /// Blob GETs answer 307 to `/cdn/<digest>?sig=...`, which refuses an `Authorization`.
    pub redirect_blobs: bool,
    /// Whether `/v2/` requests need a bearer token from `/token`.
    pub require_auth: bool,
    /// Basic credentials `/token` insists on; anonymous tokens when `None`.
    pub credentials: Option<(String, String)>,
    /// `expires_in` of issued tokens, in seconds (also enforced).
    pub token_expires_in: u64,
    /// The next request carrying an otherwise valid token gets a 401 (and the token is revoked).
    pub reject_next_token: bool,
    /// Reject every token (the realm issues tokens the registry never accepts).
    pub reject_all_tokens: bool,
    /// Faults of resumed bodies and of the CDN (`resume.rs`).
    pub resume: ResumeFaults,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            chunk_size: 64 * 1024,
            chunk_delay: None,
            cut_after: None,
            stall_after: None,
            pause_at: None,
            no_content_length: false,
            corrupt: HashSet::new(),
            fail: None,
            hang: None,
            hold: None,
            redirect_blobs: false,
            require_auth: true,
            credentials: None,
            token_expires_in: 300,
            reject_next_token: false,
            reject_all_tokens: false,
            resume: ResumeFaults::default(),
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Repo {
    pub tags: BTreeMap<String, String>,
    /// digest → (media type, bytes)
    pub manifests: HashMap<String, (String, Bytes)>,
    pub blobs: HashSet<String>,
}

#[derive(Debug)]
pub(crate) struct IssuedToken {
    /// The repository of its scope; `None` for a scope-less token.
    pub repo: Option<String>,
    pub expires: Instant,
    pub revoked: bool,
}

#[derive(Debug, Default)]
pub(crate) struct Inner {
    pub repos: HashMap<String, Repo>,
    pub blobs: HashMap<String, Bytes>,
    pub tokens: HashMap<String, IssuedToken>,
    pub faults: Faults,
    pub requests: Vec<Seen>,
    pub token_fetches: Vec<TokenFetch>,
    /// Requests that carried a bearer token the fake refused.
    pub rejected_tokens: usize,
    pub cdn: resume::CdnState,
}

pub(crate) struct Shared {
    pub inner: Mutex<Inner>,
    pub progress: watch::Sender<Progress>,
    /// `true` when paused blob bodies may go on.
    pub gate: watch::Sender<bool>,
    pub base: String,
    conns: Mutex<Vec<AbortHandle>>,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The fake registry. Stops serving when dropped.
pub struct FakeUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Mutex<Option<JoinHandle<()>>>,
}

impl FakeUpstream {
    /// Starts serving on a fresh port of 127.0.0.1.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind fake");
        let addr = listener.local_addr().expect("fake addr");
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner::default()),
            progress: watch::channel(Progress::default()).0,
            gate: watch::channel(true).0,
            base: format!("http://{addr}"),
            conns: Mutex::new(Vec::new()),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Self {
            addr,
            shared,
            accept: Mutex::new(Some(accept)),
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The URL of a port nothing listens on (bound, then closed).
    pub async fn unreachable_url() -> String {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        drop(l);
        format!("http://{addr}")
    }

    /// Stops accepting and drops every open connection: the port refuses connections.
    pub fn stop(&self) {
        if let Some(h) = self.accept.lock().unwrap_or_else(|p| p.into_inner()).take() {
            h.abort();
        }
        for c in self
            .shared
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            c.abort();
        }
    }

    // ---- content ----

    /// Adds a Docker v2 image (config + `layers`) to `repo` under `tag`.
    pub fn add_image(&self, repo: &str, tag: &str, layers: Vec<Vec<u8>>) -> ImageInfo {
        self.add_image_as(repo, tag, layers, Format::Docker)
    }

    /// Adds an image in the given manifest format.
    pub fn add_image_as(
        &self,
        repo: &str,
        tag: &str,
        layers: Vec<Vec<u8>>,
        format: Format,
    ) -> ImageInfo {
        let img = build_image(layers, format, "amd64");
        self.put_image(repo, &img);
        self.tag(repo, tag, &img.manifest_digest);
        img
    }

    /// Adds a multi-platform OCI index with one child image per (arch, layers).
    pub fn add_index(
        &self,
        repo: &str,
        tag: &str,
        platforms: Vec<(&str, Vec<Vec<u8>>)>,
    ) -> IndexInfo {
        let children: Vec<(String, ImageInfo)> = platforms
            .into_iter()
            .map(|(arch, layers)| (arch.to_owned(), build_image(layers, Format::Oci, arch)))
            .collect();
        for (_, img) in &children {
            self.put_image(repo, img);
        }
        let index = build_index(children);
        self.put_manifest(repo, index.media_type, index.bytes.clone());
        self.tag(repo, tag, &index.digest);
        index
    }

    /// Stores an image's manifest and blobs in `repo` (no tag).
    pub fn put_image(&self, repo: &str, img: &ImageInfo) {
        self.put_manifest(repo, img.media_type, img.manifest.clone());
        for (_, bytes) in img.blobs() {
            self.add_blob(repo, bytes);
        }
    }

    /// Stores a manifest in `repo`; returns its digest.
    pub fn put_manifest(&self, repo: &str, media_type: &str, bytes: Bytes) -> String {
        let digest = sha256_digest(&bytes);
        let mut g = self.shared.lock();
        g.repos
            .entry(repo.to_owned())
            .or_default()
            .manifests
            .insert(digest.clone(), (media_type.to_owned(), bytes));
        digest
    }

    /// Points `repo:tag` at `digest`.
    pub fn tag(&self, repo: &str, tag: &str, digest: &str) {
        let mut g = self.shared.lock();
        g.repos
            .entry(repo.to_owned())
            .or_default()
            .tags
            .insert(tag.to_owned(), digest.to_owned());
    }

    /// Stores a blob in `repo`; returns its digest.
    pub fn add_blob(&self, repo: &str, bytes: impl Into<Bytes>) -> String {
        let bytes = bytes.into();
        let digest = sha256_digest(&bytes);
        let mut g = self.shared.lock();
        g.blobs.insert(digest.clone(), bytes);
        g.repos
            .entry(repo.to_owned())
            .or_default()
            .blobs
            .insert(digest.clone());
        digest
    }

    /// Makes an existing blob part of `repo` too (a cross-repository mount).
    pub fn link_blob(&self, repo: &str, digest: &str) {
        let mut g = self.shared.lock();
        assert!(
            g.blobs.contains_key(digest),
            "link of unknown blob {digest}"
        );
        g.repos
            .entry(repo.to_owned())
            .or_default()
            .blobs
            .insert(digest.to_owned());
    }

    // ---- faults ----

    /// Changes fault switches and auth settings.
    pub fn set(&self, f: impl FnOnce(&mut Faults)) {
        f(&mut self.shared.lock().faults);
    }

    /// Back to a well-behaved registry (auth settings kept); opens the gate.
    pub fn clear_faults(&self) {
        self.set(|f| {
            *f = Faults {
                require_auth: f.require_auth,
                credentials: f.credentials.clone(),
                token_expires_in: f.token_expires_in,
                ..Faults::default()
            }
        });
        self.shared.gate.send_replace(true);
    }

    /// Blob bodies go out in `chunk`-byte pieces with `delay` between them.
    pub fn slow_body(&self, delay: Duration, chunk: usize) {
        self.set(|f| {
            f.chunk_delay = Some(delay);
            f.chunk_size = chunk;
        });
    }

    /// Answers `/v2/<name>/...` requests with `status` (and `Retry-After`).
    pub fn fail_with(&self, status: u16, retry_after: Option<&str>) {
        self.set(|f| {
            f.fail = Some(Failure {
                status,
                retry_after: retry_after.map(str::to_owned),
                path_contains: None,
            })
        });
    }

    /// Blob bodies stop at `offset` until [`Self::release`]; bodies already past it go on.
    pub fn pause_blobs_at(&self, offset: u64) {
        self.shared.gate.send_replace(false);
        self.set(|f| f.pause_at = Some(offset));
    }

    /// Authorized `/v2/<name>/...` requests whose path contains `path` wait (counted in
    /// [`Progress::held`]) until [`Self::release`], then get their usual answer.
    pub fn hold_requests(&self, path: &str) {
        self.shared.gate.send_replace(false);
        self.set(|f| f.hold = Some(path.to_owned()));
    }

    /// Lets paused blob bodies and held requests go on; later ones no longer wait.
    pub fn release(&self) {
        self.set(|f| {
            f.pause_at = None;
            f.hold = None;
        });
        self.shared.gate.send_replace(true);
    }

    // ---- what it served ----

    /// Every request received, in order.
    pub fn requests(&self) -> Vec<Seen> {
        self.shared.lock().requests.clone()
    }

    /// Requests with this method and path (no query) that got past the token check.
    pub fn count(&self, method: &str, path: &str) -> usize {
        self.shared
            .lock()
            .requests
            .iter()
            .filter(|r| r.authorized && r.method == method && r.path == path)
            .count()
    }

    /// Like [`Self::count`] for paths starting with `prefix`.
    pub fn count_prefix(&self, method: &str, prefix: &str) -> usize {
        self.shared
            .lock()
            .requests
            .iter()
            .filter(|r| r.authorized && r.method == method && r.path.starts_with(prefix))
            .count()
    }

    /// Authorized registry GETs of the blob `digest`, by any repository (a redirected
    /// GET counts once, here; the CDN's GETs are `count_prefix("GET", "/cdn/")`).
    pub fn blob_gets(&self, digest: &str) -> usize {
        let suffix = format!("/blobs/{digest}");
        self.shared
            .lock()
            .requests
            .iter()
            .filter(|r| r.authorized && r.method == "GET" && r.path.ends_with(&suffix))
            .count()
    }

    /// Authorized GETs of any manifest of `repo` (by tag or digest).
    pub fn manifest_gets(&self, repo: &str) -> usize {
        self.count_prefix("GET", &format!("/v2/{repo}/manifests/"))
    }

    /// All `GET /token` requests.
    pub fn token_fetches(&self) -> Vec<TokenFetch> {
        self.shared.lock().token_fetches.clone()
    }

    /// CDN GETs refused because their signed URL had expired (`cdn_single_use`).
    pub fn expired_cdn_urls(&self) -> usize {
        self.shared.lock().cdn.expired
    }

    /// Requests refused because of their bearer token (expired, revoked, wrong scope).
    pub fn rejected_tokens(&self) -> usize {
        self.shared.lock().rejected_tokens
    }

    /// Forgets the request log and token fetches (content and faults stay).
    pub fn reset_counts(&self) {
        let mut g = self.shared.lock();
        g.requests.clear();
        g.token_fetches.clear();
        g.rejected_tokens = 0;
    }

    /// The blob-body progress now.
    pub fn progress(&self) -> Progress {
        self.shared.progress.borrow().clone()
    }

    /// Waits (at most 20 s, then panics naming `what`) until `cond` holds for the progress.
    pub async fn wait_progress(&self, what: &str, cond: impl FnMut(&Progress) -> bool) -> Progress {
        let mut rx = self.shared.progress.subscribe();
        let got = match tokio::time::timeout(Duration::from_secs(20), rx.wait_for(cond)).await {
            Ok(Ok(p)) => Some(p.clone()),
            _ => None,
        };
        match got {
            Some(p) => p,
            None => panic!(
                "fake upstream: timed out waiting for {what}; progress {:?}",
                self.progress()
            ),
        }
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors and the like: do not spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let shared2 = shared.clone();
        let task = tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = shared2.clone();
                async move { server::handle(shared, req).await }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        let mut conns = shared.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.retain(|c| !c.is_finished());
        conns.push(task.abort_handle());
    }
}
