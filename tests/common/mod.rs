//! Shared support for the in-process integration tests: starting the mirror on port 0 over
//! a temporary data dir ([`MirrorHandle`]), looking at its data dir, reading bodies and
//! registry errors as a client would. The fake upstream lives in [`fake_upstream`], the
//! test images in [`images`].
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod cache;
pub mod fake_upstream;
pub mod front;
pub mod images;
pub mod observe;
pub mod referrers_api;
pub mod served;
pub mod tmpfs;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use rand::{RngCore as _, SeedableRng as _};
use regmirror::config::{Config, Secret};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use fake_upstream::FakeUpstream;

/// A running mirror and what a test needs to talk to it.
pub struct MirrorHandle {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    pub data_dir: PathBuf,
    pub client: reqwest::Client,
    tmp: Option<TempDir>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), regmirror::server::ServeError>>>,
}

/// The configuration tests start from: data in `dir`, `upstream`, 5 s timeouts, a 300 s tag TTL,
/// no free space kept (`cache.min_free`).
pub fn test_config(dir: &Path, upstream: &str) -> Config {
    let mut config = Config {
        data_dir: dir.to_path_buf(),
        ..Config::default()
    };
    config.upstream.url = url::Url::parse(upstream).expect("upstream url");
    config.upstream.timeout = Duration::from_secs(5);
    config.upstream.read_timeout = Duration::from_secs(5);
    config.cache.tag_ttl = Duration::from_secs(300);
    // The tests' caches are small; what they assert must not depend on how full the
    // machine's disk is (the default keeps 5% of it free, which a full-enough disk is
    // already past: everything would be evicted at once).
    config.cache.min_free = regmirror::config::MinFree::Bytes(0);
    config
}

/// Starts a mirror of `upstream` on a fresh temporary data dir; `tweak` adjusts the config.
pub async fn start_mirror(upstream: &str, tweak: impl FnOnce(&mut Config)) -> MirrorHandle {
    let tmp = tempfile::tempdir().expect("tempdir");
    MirrorHandle::start_in(tmp, upstream, tweak).await
}

/// Shorthand: a mirror of `fake` with the test defaults.
pub async fn mirror_of(fake: &FakeUpstream) -> MirrorHandle {
    start_mirror(&fake.url(), |_| {}).await
}

/// Credentials for the config: user `user`, password `pw`.
pub fn with_credentials(config: &mut Config) {
    config.upstream.username = Some("user".into());
    config.upstream.password = Some(Secret::new("pw"));
}

/// The stop signal and task of a mirror started in-process.
pub type ServerTask = (
    SocketAddr,
    oneshot::Sender<()>,
    JoinHandle<Result<(), regmirror::server::ServeError>>,
);

/// Runs `server::run` with `config` (adjusted by `tweak`) on a port-0 listener.
pub async fn spawn_server(mut config: Config, tweak: impl FnOnce(&mut Config)) -> ServerTask {
    tweak(&mut config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind mirror");
    let addr = listener.local_addr().expect("mirror addr");
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(regmirror::server::run(listener, config, async {
        let _ = rx.await;
    }));
    (addr, tx, task)
}

impl MirrorHandle {
    /// Starts a mirror over an existing data dir (e.g. one a stopped mirror left).
    pub async fn start_in(
        tmp: TempDir,
        upstream: &str,
        tweak: impl FnOnce(&mut Config),
    ) -> MirrorHandle {
        let (addr, tx, task) = spawn_server(test_config(tmp.path(), upstream), tweak).await;
        let client = reqwest::Client::builder()
            .no_proxy()
            // A mirror that never answers fails the test instead of hanging it.
            .timeout(Duration::from_secs(60))
            .build()
            .expect("client");
        let mut handle = MirrorHandle {
            url: format!("http://{addr}"),
            data_dir: tmp.path().to_path_buf(),
            client,
            tmp: Some(tmp),
            shutdown: Some(tx),
            task: Some(task),
        };
        handle.wait_ready().await;
        handle
    }

    /// Waits for `/v2/` to answer (the listener is bound before `run`, so this is quick).
    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(task) = self.task.as_mut().filter(|t| t.is_finished()) {
                panic!("the mirror stopped while starting: {:?}", task.await);
            }
            if let Ok(r) = self.get("/v2/").await {
                if r.status().is_success() {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "the mirror did not come up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Shuts the mirror down and hands back its data dir once the mirror has let go of it
    /// (its `lock` file), for a restart.
    pub async fn stop(mut self) -> TempDir {
        // Close this client's keep-alive connections: `run` stops accepting on shutdown, but
        // a connection still open keeps being served, and keeps the data dir locked.
        self.client = reqwest::Client::new();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let r = tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("mirror shutdown in time")
                .expect("mirror task");
            r.expect("mirror exited with an error");
        }
        let lock = self.data_dir.join("lock");
        let released = wait_until(Duration::from_secs(10), || {
            std::fs::File::open(&lock).map_or(true, |f| f.try_lock().is_ok())
        })
        .await;
        assert!(
            released,
            "the stopped mirror still holds {}",
            lock.display()
        );
        self.tmp.take().expect("data dir")
    }

    pub fn url_for(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    pub async fn get(&self, path: &str) -> reqwest::Result<reqwest::Response> {
        self.client.get(self.url_for(path)).send().await
    }

    pub async fn head(&self, path: &str) -> reqwest::Result<reqwest::Response> {
        self.client.head(self.url_for(path)).send().await
    }

    /// GET with a `Range` header.
    pub async fn get_range(&self, path: &str, range: &str) -> reqwest::Response {
        self.client
            .get(self.url_for(path))
            .header("range", range)
            .send()
            .await
            .expect("range request")
    }

    /// GET `path`, asserting 200, returning the whole body.
    pub async fn get_ok(&self, path: &str) -> bytes::Bytes {
        let r = self.get(path).await.expect("request");
        let status = r.status();
        let body = r.bytes().await.expect("body");
        assert_eq!(
            status,
            200,
            "GET {path}: {}",
            String::from_utf8_lossy(&body[..body.len().min(500)])
        );
        body
    }

    /// `GET /v2/<repo>/blobs/<digest>`'s full body, asserting 200.
    pub async fn blob(&self, repo: &str, digest: &str) -> bytes::Bytes {
        self.get_ok(&format!("/v2/{repo}/blobs/{digest}")).await
    }

    /// Where the mirror keeps a committed blob.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        self.data_dir.join("blobs/sha256").join(&hex[..2]).join(hex)
    }

    /// Whether the blob is committed to disk within a few seconds: the
    /// mirror sends a download's last byte once it verifies, and commits
    /// (fsync, rename) right after.
    pub async fn committed(&self, digest: &str) -> bool {
        let path = self.blob_path(digest);
        wait_until(Duration::from_secs(10), || path.is_file()).await
    }

    /// Where the mirror keeps a committed manifest.
    pub fn manifest_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        self.data_dir
            .join("manifests/sha256")
            .join(&hex[..2])
            .join(hex)
    }

    /// Files under `DATA/<sub>` (recursively; 0 when it does not exist).
    pub fn files_under(&self, sub: &str) -> usize {
        count_files(&self.data_dir.join(sub))
    }

    /// Waits (at most 10 s) until `DATA/blobs` and `DATA/tmp` hold no file; panics otherwise.
    pub async fn assert_nothing_stored(&self, why: &str) {
        let ok = wait_until(Duration::from_secs(10), || {
            self.files_under("blobs") == 0 && self.files_under("tmp") == 0
        })
        .await;
        assert!(
            ok,
            "{why}: files left: blobs {}, tmp {}",
            self.files_under("blobs"),
            self.files_under("tmp")
        );
    }
}

impl Drop for MirrorHandle {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Regular files under `dir`, recursively; 0 when it does not exist.
pub fn count_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => count_files(&e.path()),
            Ok(t) if t.is_file() => 1,
            _ => 0,
        })
        .sum()
}

/// Polls `cond` until it holds or `limit` passes (for state the mirror gives no signal of,
/// like files it removes after aborting a response). Returns whether it held.
pub async fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `len` pseudo-random bytes, the same for the same `seed`.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// Asserts a registry error: `status`, a JSON body whose `errors[0].code` is `code`
/// (any code when `None`). Returns the parsed body.
pub async fn assert_error(
    resp: reqwest::Response,
    status: u16,
    code: Option<&str>,
) -> serde_json::Value {
    let got = resp.status().as_u16();
    let url = resp.url().path().to_owned();
    let body = resp.bytes().await.expect("error body");
    let text = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(got, status, "{url}: status (body {text})");
    let v: serde_json::Value = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("{url}: error body is not JSON ({e}): {text}"));
    let errors = v["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("{url}: no errors array: {text}"));
    assert!(!errors.is_empty(), "{url}: empty errors array");
    if let Some(code) = code {
        assert_eq!(errors[0]["code"], code, "{url}: error code (body {text})");
    }
    v
}

/// Reads a streamed body chunk by chunk: `Ok(bytes)` when it ended cleanly, `Err(bytes so far)`
/// when it errored.
pub async fn read_body(resp: reqwest::Response) -> Result<Vec<u8>, Vec<u8>> {
    let mut out = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => out.extend_from_slice(&c),
            Err(_) => return Err(out),
        }
    }
    Ok(out)
}

/// The response header `name` as a string ("" when absent).
pub fn header(resp: &reqwest::Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// The whole body parsed as JSON.
pub async fn json(resp: reqwest::Response) -> serde_json::Value {
    let body = resp.bytes().await.expect("body");
    serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&body)))
}

/// A GET running in its own task: its status arrives on `status` (0 when the request
/// failed), its body from `body` (as [`read_body`] reads it).
pub struct Pending {
    pub status: oneshot::Receiver<u16>,
    pub body: JoinHandle<Result<Vec<u8>, Vec<u8>>>,
}

/// Starts a GET of `url` in a task.
pub fn spawn_get(client: &reqwest::Client, url: String) -> Pending {
    let (tx, rx) = oneshot::channel();
    let client = client.clone();
    let body = tokio::spawn(async move {
        match client.get(url).send().await {
            Ok(resp) => {
                let _ = tx.send(resp.status().as_u16());
                read_body(resp).await
            }
            Err(_) => {
                let _ = tx.send(0);
                Err(Vec::new())
            }
        }
    });
    Pending { status: rx, body }
}

/// Waits up to `limit` for every pending GET's status; returns those that arrived.
pub async fn statuses(pending: &mut [Pending], limit: Duration) -> Vec<u16> {
    let all = futures_util::future::join_all(pending.iter_mut().map(|p| &mut p.status));
    match tokio::time::timeout(limit, all).await {
        Ok(v) => v.into_iter().map(|s| s.unwrap_or(0)).collect(),
        Err(_) => Vec::new(),
    }
}
