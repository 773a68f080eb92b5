//! Support for the front-door tests (TLS, client auth, limits, hostile input): a mirror
//! started without the anonymous plain-HTTP readiness probe [`MirrorHandle`] relies on, a
//! startup expected to fail, raw HTTP/1.1 over TCP with deadlines (no client normalises or
//! refuses what is sent), and htpasswd lines with cheap bcrypt hashes.
//!
//! [`MirrorHandle`]: super::MirrorHandle

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use regmirror::config::Config;
use regmirror::server::ServeError;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::{spawn_server, test_config};

/// A running mirror on 127.0.0.1 (HTTP or HTTPS, with or without users).
pub struct Front {
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    _tmp: TempDir,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServeError>>>,
}

impl Front {
    /// Starts a mirror of `upstream` on a fresh data dir; `tweak` adjusts the config. Returns
    /// once the mirror accepts connections; panics with the startup error if `run` fails.
    pub async fn start(upstream: &str, tweak: impl FnOnce(&mut Config)) -> Front {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (addr, tx, task) = spawn_server(test_config(tmp.path(), upstream), tweak).await;
        let mut front = Front {
            addr,
            data_dir: tmp.path().to_path_buf(),
            _tmp: tmp,
            shutdown: Some(tx),
            task: Some(task),
        };
        front.wait_accepting().await;
        front
    }

    /// A connection the mirror accepts and then closes (an HTTP `Connection: close` request,
    /// or a failed TLS handshake) proves `run` got past its startup. The probe's connection is
    /// closed again when this returns.
    async fn wait_accepting(&mut self) {
        let probe = async {
            let mut s = TcpStream::connect(self.addr).await.ok()?;
            s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
                .await
                .ok()?;
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink).await;
            Some(())
        };
        let probed = tokio::time::timeout(Duration::from_secs(10), probe).await;
        if let Some(task) = self.task.as_mut().filter(|t| t.is_finished()) {
            panic!("the mirror stopped while starting: {:?}", task.await);
        }
        assert!(
            matches!(probed, Ok(Some(()))),
            "the mirror did not accept connections"
        );
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn https(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }

    /// Stops the mirror (connections still open keep being served until they close).
    pub async fn stop(mut self) -> Result<(), ServeError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let task = self.task.take().expect("running");
        tokio::time::timeout(Duration::from_secs(15), task)
            .await
            .expect("mirror shutdown in time")
            .expect("mirror task")
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Runs the mirror with `config` and returns the error it must stop with at startup.
pub async fn startup_error(config: Config) -> ServeError {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let run = regmirror::server::run(listener, config, std::future::pending());
    match tokio::time::timeout(Duration::from_secs(10), run).await {
        Ok(Err(e)) => e,
        Ok(Ok(())) => panic!("the mirror exited cleanly instead of refusing to start"),
        Err(_) => panic!("the mirror started instead of refusing to"),
    }
}

/// A config for `startup_error`: data in `dir`, an upstream that is never contacted.
pub fn startup_config(dir: &Path) -> Config {
    test_config(dir, "http://127.0.0.1:9")
}

/// An htpasswd line as `htpasswd -B -C 4` writes it (`$2y$`, the cheapest cost).
pub fn htpasswd_line(user: &str, password: &str) -> String {
    let hash = bcrypt::hash_with_result(password, 4)
        .expect("bcrypt")
        .format_for_version(bcrypt::Version::TwoY);
    format!("{user}:{hash}")
}

/// The `Authorization` value for Basic `user:password`.
pub fn basic(user: &str, password: &str) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {b64}")
}

/// How a raw exchange ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// A response: its status and everything read (head and body).
    Status(u16, Vec<u8>),
    /// The mirror closed (or reset) the connection without sending a byte.
    Closed,
    /// Bytes that are not an HTTP/1.x response.
    Garbage(Vec<u8>),
    /// Nothing within the deadline and the connection still open.
    Hang,
}

impl Reply {
    pub fn status(&self) -> Option<u16> {
        match self {
            Reply::Status(s, _) => Some(*s),
            _ => None,
        }
    }

    /// The body after the head (empty when there is none).
    pub fn body(&self) -> &[u8] {
        match self {
            Reply::Status(_, raw) => split_head(raw).map_or(&[][..], |(_, b)| b),
            _ => &[],
        }
    }

    /// A response header's value ("" when absent).
    pub fn header(&self, name: &str) -> String {
        let Reply::Status(_, raw) = self else {
            return String::new();
        };
        let head = split_head(raw).map_or(&raw[..], |(h, _)| h);
        String::from_utf8_lossy(head)
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .find(|(n, _)| n.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_default()
    }
}

fn split_head(raw: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    Some((&raw[..end], &raw[end + 4..]))
}

/// The status of a raw response, when `raw` starts like one.
pub fn status_of(raw: &[u8]) -> Option<u16> {
    let line = raw.split(|&b| b == b'\n').next()?;
    let text = std::str::from_utf8(line).ok()?;
    let mut parts = text.split(' ');
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.trim().parse().ok()
}

/// Sends `request` byte for byte on a new connection and reads until the mirror closes it
/// (so requests should say `Connection: close`) or `limit` passes. A write the mirror cuts
/// short (it answered and closed early) still has its answer read.
pub async fn exchange(addr: SocketAddr, request: &[u8], limit: Duration) -> Reply {
    let deadline = tokio::time::Instant::now() + limit;
    let mut s = match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        other => panic!("connect to the mirror: {other:?}"),
    };
    let _ = tokio::time::timeout_at(deadline, s.write_all(request)).await;
    let (out, open) = read_until_closed(&mut s, deadline).await;
    match status_of(&out) {
        Some(status) => Reply::Status(status, out),
        None if out.is_empty() && !open => Reply::Closed,
        None if out.is_empty() => Reply::Hang,
        None => Reply::Garbage(out),
    }
}

/// Reads until EOF, an error or `deadline`: what was read, and whether the connection was
/// still open at the deadline.
pub async fn read_until_closed(
    s: &mut TcpStream,
    deadline: tokio::time::Instant,
) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return (out, true),
            Ok(Ok(0)) | Ok(Err(_)) => return (out, false),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// How long until the mirror closes `s` (reading and discarding whatever it sends);
/// `None` when it is still open after `limit`.
pub async fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let (_, open) = read_until_closed(s, tokio::time::Instant::now() + limit).await;
    (!open).then(|| started.elapsed())
}

/// Reads one response with a `Content-Length` body from a kept-alive connection (within
/// `limit`): its status and body.
pub async fn read_response(s: &mut TcpStream, limit: Duration) -> (u16, Vec<u8>) {
    let deadline = tokio::time::Instant::now() + limit;
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        if let Some((head, body)) = split_head(&raw) {
            let head = String::from_utf8_lossy(head).into_owned();
            let len: usize = head
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(n, _)| n.trim().eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.trim().parse().ok())
                .unwrap_or(0);
            if body.len() >= len {
                let status = status_of(&raw).unwrap_or_else(|| panic!("not HTTP: {head}"));
                return (status, body[..len].to_vec());
            }
        }
        let n = tokio::time::timeout_at(deadline, s.read(&mut buf))
            .await
            .expect("a response in time")
            .expect("read response");
        assert!(n > 0, "closed mid-response after {raw:?}");
        raw.extend_from_slice(&buf[..n]);
    }
}

/// Everything the tracing subscriber of this test binary (installed by the first call,
/// at debug level) has written.
pub fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: std::sync::OnceLock<Arc<Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter("debug")
            .with_ansi(false)
            .with_writer(move || LogSink(sink.clone()))
            .try_init();
        buf
    })
    .clone()
}

pub struct LogSink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogSink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A new connection to `addr` that has sent `bytes`.
pub async fn send_raw(addr: SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr)
        .await
        .expect("connect to the mirror");
    s.write_all(bytes).await.expect("send");
    s
}

/// The instant `secs` seconds from now, for [`read_until_closed`].
pub fn after(secs: u64) -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(secs)
}
