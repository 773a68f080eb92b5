//! A TCP proxy on 127.0.0.1:0 between the mirror and its upstream, whose fault the test
//! switches at runtime: pass through, cut a response after N bytes of its body (or N bytes
//! in all), answer nothing, send the response head then nothing, trickle the body a byte at a
//! time. Real sockets, so the mirror's own client code meets the faults. It reads HTTP/1.1
//! requests and responses only as far as it must to find their ends (Content-Length), and
//! logs each exchange (method, path, `Range`, the fault applied, body bytes forwarded).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// What the proxy does to a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Pass,
    /// Closes both connections after this many bytes of the response body.
    CutBody(u64),
    /// Closes both connections after this many bytes of the response, head included.
    CutTotal(u64),
    /// Reads the request and answers nothing; the connection stays open.
    Silent,
    /// Sends the response head, then nothing; the connection stays open.
    HeadOnly,
    /// Sends the response head, then the body one byte per interval.
    Trickle(Duration),
}

/// One request through the proxy.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    /// The upstream's status (0: none came through).
    pub status: u16,
    pub fault: Fault,
    /// Body bytes forwarded to the client.
    pub body_sent: u64,
}

#[derive(Debug)]
struct Rule {
    fault: Fault,
    /// Requests whose path contains this.
    path: String,
    /// Requests it still applies to (`None`: every one).
    left: Option<usize>,
}

#[derive(Debug, Default)]
struct State {
    rule: Option<Rule>,
    log: Vec<Exchange>,
}

type Shared = Arc<Mutex<State>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// The proxy. Stops accepting when dropped (connections in flight end with their peers).
pub struct FaultProxy {
    addr: SocketAddr,
    state: Shared,
    open: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    /// Proxies to `upstream` (`http://127.0.0.1:PORT`), passing everything through.
    pub async fn start(upstream: &str) -> FaultProxy {
        let target: SocketAddr = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .expect("upstream address");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let state: Shared = Arc::default();
        let open = Arc::new(AtomicUsize::new(0));
        let (s, o) = (state.clone(), open.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let (s, o) = (s.clone(), o.clone());
                o.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let _ = serve(client, target, &s).await;
                    o.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        FaultProxy {
            addr,
            state,
            open,
            accept,
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Applies `fault` to the next `times` requests whose path contains `path` (every one when
    /// `None`) and, but for `Silent`, whose answer is a success with a body (not a HEAD, a 401
    /// challenge or a redirect); other requests pass.
    pub fn set(&self, fault: Fault, path: &str, times: Option<usize>) {
        lock(&self.state).rule = Some(Rule {
            fault,
            path: path.to_owned(),
            left: times,
        });
    }

    /// Everything passes from now on (connections held by a fault stay held).
    pub fn pass(&self) {
        lock(&self.state).rule = None;
    }

    /// Every exchange so far, in order.
    pub fn exchanges(&self) -> Vec<Exchange> {
        lock(&self.state).log.clone()
    }

    /// Client connections open now.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// One side of a connection with the bytes read ahead of what was consumed.
struct Side {
    read: OwnedReadHalf,
    buf: Vec<u8>,
}

impl Side {
    /// Reads until a blank line; the head's bytes, or `None` at EOF or on junk.
    async fn head(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                return Some(self.buf.drain(..end + 4).collect());
            }
            if self.buf.len() > 64 * 1024 || !self.fill().await {
                return None;
            }
        }
    }

    /// Reads more; false at EOF or error.
    async fn fill(&mut self) -> bool {
        let mut tmp = [0u8; 64 * 1024];
        match self.read.read(&mut tmp).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&tmp[..n]);
                true
            }
        }
    }

    /// Up to `max` bytes; empty at EOF.
    async fn some(&mut self, max: usize) -> Vec<u8> {
        if self.buf.is_empty() && !self.fill().await {
            return Vec::new();
        }
        let n = max.min(self.buf.len());
        self.buf.drain(..n).collect()
    }

    /// Waits until the peer closes (or sends anything, which a held client never does).
    async fn closed(&mut self) {
        while self.fill().await {
            self.buf.clear();
        }
    }
}

/// The first line's words and the headers (lower-case names) of a head.
fn parse(head: &[u8]) -> (Vec<String>, Vec<(String, String)>) {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let first = lines
        .next()
        .unwrap_or("")
        .split(' ')
        .map(str::to_owned)
        .collect();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (first, headers)
}

fn get<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// The rule's fault for a request to `path`, counting it: `Silent` before the answer
/// (`status` `None`), the others once the answer's `status` is a success.
fn fault_for(state: &Shared, method: &str, path: &str, status: Option<u16>) -> Fault {
    let mut g = lock(state);
    let Some(rule) = g.rule.as_mut() else {
        return Fault::Pass;
    };
    let stage = match status {
        None => rule.fault == Fault::Silent,
        // A HEAD's answer has no body to fault.
        Some(s) => rule.fault != Fault::Silent && method != "HEAD" && (200..300).contains(&s),
    };
    if !stage || !path.contains(&rule.path) || rule.left == Some(0) {
        return Fault::Pass;
    }
    if let Some(n) = rule.left.as_mut() {
        *n -= 1;
    }
    rule.fault
}

/// Serves one client connection, request by request; returns when either side is done.
async fn serve(client: TcpStream, target: SocketAddr, state: &Shared) -> Option<()> {
    let (read, mut to_client) = client.into_split();
    let mut from_client = Side {
        read,
        buf: Vec::new(),
    };
    let mut upstream: Option<(Side, OwnedWriteHalf)> = None;
    loop {
        let mut request = from_client.head().await?;
        let (line, headers) = parse(&request);
        let method = line.first().cloned().unwrap_or_default();
        let path = line
            .get(1)
            .map(|t| t.split('?').next().unwrap_or("").to_owned())
            .unwrap_or_default();
        let mut body_len: usize = get(&headers, "content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while body_len > 0 {
            let part = from_client.some(body_len).await;
            if part.is_empty() {
                return None;
            }
            body_len -= part.len();
            request.extend_from_slice(&part);
        }
        let fault = fault_for(state, &method, &path, None);
        let index = {
            let mut g = lock(state);
            g.log.push(Exchange {
                method: method.clone(),
                path: path.clone(),
                range: get(&headers, "range").map(str::to_owned),
                status: 0,
                fault,
                body_sent: 0,
            });
            g.log.len() - 1
        };
        if fault == Fault::Silent {
            from_client.closed().await;
            return None;
        }
        if upstream.is_none() {
            let (read, write) = TcpStream::connect(target).await.ok()?.into_split();
            upstream = Some((
                Side {
                    read,
                    buf: Vec::new(),
                },
                write,
            ));
        }
        let (from_up, to_up) = upstream.as_mut()?;
        to_up.write_all(&request).await.ok()?;
        let head = from_up.head().await?;
        let (status, headers) = parse(&head);
        let status: u16 = status.get(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let fault = fault_for(state, &method, &path, Some(status));
        {
            let mut g = lock(state);
            g.log[index].status = status;
            g.log[index].fault = fault;
        }
        let length: Option<u64> = if method == "HEAD" || status == 204 || status == 304 {
            Some(0)
        } else if get(&headers, "transfer-encoding").is_some() {
            None
        } else {
            get(&headers, "content-length").and_then(|v| v.parse().ok())
        };
        let sent = |n: u64| lock(state).log[index].body_sent += n;
        match fault {
            Fault::CutTotal(n) if (n as usize) < head.len() => {
                to_client.write_all(&head[..n as usize]).await.ok()?;
                return None;
            }
            _ => to_client.write_all(&head).await.ok()?,
        }
        let limit = match fault {
            Fault::CutBody(n) => Some(n),
            Fault::CutTotal(n) => Some(n - head.len() as u64),
            Fault::HeadOnly => {
                from_client.closed().await;
                return None;
            }
            _ => None,
        };
        let mut left = length;
        loop {
            if left == Some(0) {
                break;
            }
            let mut max = left.unwrap_or(u64::MAX).min(64 * 1024) as usize;
            if let Some(l) = limit {
                let done = lock(state).log[index].body_sent;
                if done >= l {
                    // The cut: both connections close here.
                    return None;
                }
                max = max.min((l - done) as usize);
            }
            if let Fault::Trickle(every) = fault {
                max = 1;
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = from_client.closed() => return None,
                }
            }
            let part = from_up.some(max).await;
            if part.is_empty() {
                // Upstream closed: so does the client's connection.
                return None;
            }
            to_client.write_all(&part).await.ok()?;
            sent(part.len() as u64);
            left = left.map(|l| l - part.len() as u64);
        }
        // A body without Content-Length ended with the upstream's connection.
        length?;
    }
}

/// A fake upstream, the proxy in front of it, and a mirror of the proxy: resumes after 50 ms
/// (then `tweak` adjusts the config).
pub struct Rig {
    pub fake: crate::common::FakeUpstream,
    pub proxy: FaultProxy,
    pub m: crate::common::MirrorHandle,
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

pub async fn rig(tweak: impl FnOnce(&mut regmirror::config::Config)) -> Rig {
    let serial = crate::one_at_a_time().await;
    let fake = crate::common::FakeUpstream::start().await;
    let proxy = FaultProxy::start(&fake.url()).await;
    let m = crate::common::start_mirror(&proxy.url(), |c| {
        c.upstream.retry_backoff = Duration::from_millis(50);
        tweak(c);
    })
    .await;
    Rig {
        fake,
        proxy,
        m,
        _serial: serial,
    }
}

impl Rig {
    /// The `Range` header (`None`: a whole GET) of each authorized registry GET of `digest`
    /// the fake answered, in order.
    pub fn blob_get_ranges(&self, digest: &str) -> Vec<Option<String>> {
        let suffix = format!("/blobs/{digest}");
        self.fake
            .requests()
            .into_iter()
            .filter(|r| r.authorized && r.method == "GET" && r.path.ends_with(&suffix))
            .map(|r| r.range)
            .collect()
    }

    /// Body bytes the proxy forwarded to the mirror for `digest` (registry and CDN).
    pub fn bytes_forwarded(&self, digest: &str) -> u64 {
        self.proxy
            .exchanges()
            .iter()
            .filter(|e| e.path.ends_with(digest) && (200..300).contains(&e.status))
            .map(|e| e.body_sent)
            .sum()
    }
}
