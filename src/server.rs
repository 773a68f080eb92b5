//! The HTTP front door: accepts connections on an already-bound listener (so
//! tests bind port 0), with TLS when configured, HTTP/1.1 and HTTP/2, the
//! connection limits, client authentication, and one parse of each request
//! into an endpoint handed to the [`Registry`]. Stops accepting on `shutdown`.

use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{header, Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Http1Builder;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;

use crate::access_log::{LoggedBody, RequestInfo};
use crate::auth::{Authenticator, Htpasswd};
use crate::cluster::peer;
use crate::config::{Config, ServerConfig};
use crate::connections::policy::SendRule;
use crate::connections::{Counted, InFlight, Slot, Table};
use crate::endpoint;
use crate::error::Error;
use crate::idle::IdleTimeout;
use crate::ops::{self, OpsEndpoint};
use crate::registry::Registry;
use crate::request_body;
use crate::response::{self, Outcome};
use crate::tls::{Tls, TlsError};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Startup(#[from] Error),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("auth.htpasswd: {0}")]
    Htpasswd(String),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
}

/// The response header naming the cache outcome (hit, miss, coalesced, pass).
pub const X_CACHE: &str = "X-Cache";

/// How long a shutdown waits for requests in flight to finish.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

/// What every request passes through before the registry.
struct Frontend {
    registry: Arc<Registry>,
    auth: Option<Arc<Authenticator>>,
    max_url_length: usize,
    /// Serves only the operator endpoints (the metrics listener).
    ops_only: bool,
}

/// The listen backlog asked for (the kernel caps it at `net.core.somaxconn`, 4096 on
/// current Linux). tokio's `TcpListener::bind` asks for 1,024: under a connection flood the
/// mirror sheds connections quickly, and a reconnecting flood overflowed that backlog, so
/// legitimate clients waited for SYN retransmits (1 s, then 3 s).
const BACKLOG: u32 = 4096;

/// Binds a listener for `addr` with SO_REUSEADDR and a backlog of [`BACKLOG`].
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Serves the registry API on `listener` until `shutdown` completes.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let mut config = config;
    config.server.max_connections = connections_within_open_files(config.server.max_connections);
    let tls = match (&config.tls.cert, &config.tls.key) {
        (Some(cert), Some(key)) => Some(Arc::new(Tls::new(cert, key)?)),
        _ => None,
    };
    // The file is read before anything else, so a broken one stops startup at once.
    let users = match &config.auth.htpasswd {
        Some(path) => Some((path, Htpasswd::load(path).map_err(ServeError::Htpasswd)?)),
        None => None,
    };
    let registry = Arc::new(Registry::open(&config).await?);
    if let Some(t) = &tls {
        t.report_to(registry.metrics.clone());
    }
    let auth = users.map(|(path, users)| {
        Arc::new(Authenticator::new(
            path,
            users,
            &config.auth,
            registry.metrics.clone(),
        ))
    });
    let mut background = vec![tokio::spawn(registry.clone().maintain())];
    background.push(tokio::spawn(crate::metrics::watch(
        registry.metrics.clone(),
        config.data_dir.clone(),
        registry.max_size(),
    )));
    background.extend(crate::warm::spawn(&config, &registry));
    if let Some(t) = &tls {
        background.push(tokio::spawn(t.clone().watch()));
    }
    background.push(tokio::spawn(on_hangup(tls.clone())?));
    if let Some(a) = &auth {
        background.push(tokio::spawn(a.clone().watch()));
    }
    let frontend = Arc::new(Frontend {
        registry: registry.clone(),
        auth,
        max_url_length: config.server.max_url_length,
        ops_only: false,
    });
    let limits = Arc::new(config.server.clone());
    if let Some(addr) = config.metrics.listen {
        let ops_listener = bind(addr)?;
        tracing::info!(addr = %ops_listener.local_addr()?, "operator endpoints listening");
        let ops = Arc::new(Frontend {
            registry: registry.clone(),
            auth: None,
            max_url_length: config.server.max_url_length,
            ops_only: true,
        });
        background.push(tokio::spawn(serve_ops(ops_listener, ops, limits.clone())));
    }
    let table = Table::new(&config.server);
    let graceful = GracefulShutdown::new();
    tracing::info!(
        addr = %listener.local_addr()?,
        tls = tls.is_some(),
        auth = frontend.auth.is_some(),
        upstream = %config.upstream.url,
        offline = config.offline,
        data_dir = %config.data_dir.display(),
        "regmirror listening"
    );
    tokio::pin!(shutdown);
    loop {
        // At max_connections a new client is still taken, and the cheapest
        // connection closed for it; only when all are busy do clients wait
        // in the backlog.
        tokio::select! {
            () = table.room() => {}
            () = &mut shutdown => break,
        }
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let admission = match table.admit(peer.ip()) {
            Ok(admission) => admission,
            Err(why) => {
                tracing::debug!(%peer, ?why, "connection closed unserved: max_connections held, none to close");
                continue;
            }
        };
        let (frontend, limits, tls) = (frontend.clone(), limits.clone(), tls.clone());
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let Some(slot) = admission.slot(limits.header_grace).await else {
                tracing::debug!(%peer, "no slot for the address within header_grace; closed");
                return;
            };
            let _ = stream.set_nodelay(true);
            match tls {
                None => serve_connection(stream, frontend, &limits, peer, watcher, slot).await,
                Some(tls) => {
                    let handshake = tls.acceptor().accept(stream);
                    let handshake = async {
                        tokio::select! {
                            r = FirstByte::of(&limits).handshake(handshake) => r,
                            () = slot.conn().closed_for_another() => None,
                        }
                    };
                    match handshake.await {
                        Some(Ok(s)) => {
                            serve_connection(s, frontend, &limits, peer, watcher, slot).await
                        }
                        Some(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        None => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
    tracing::info!(
        connections = graceful.count(),
        "shutting down; letting requests in flight finish"
    );
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still in flight after {DRAIN:?}; closing them");
    }
    for task in background {
        task.abort();
    }
    if tokio::time::timeout(DRAIN, registry.settle())
        .await
        .is_err()
    {
        tracing::warn!("blob commits still running after {DRAIN:?}; those blobs are not kept");
    }
    if let Err(e) = registry.flush().await {
        tracing::warn!(error = %e, "cannot write the index snapshot");
    }
    Ok(())
}

/// SIGHUP reloads the certificate; without TLS it is logged and ignored
/// (its default action would end the process, and `systemctl reload` sends
/// it). The handler is installed here, before the mirror says it listens:
/// installed by the task instead, a reload right after the start could meet
/// the default action (seen under load in the systemd test).
fn on_hangup(tls: Option<Arc<Tls>>) -> std::io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup())?;
    Ok(async move {
        while hup.recv().await.is_some() {
            match &tls {
                Some(t) => t.reload_logged("SIGHUP"),
                None => {
                    tracing::info!("SIGHUP: no TLS configured; the htpasswd file reloads by itself")
                }
            }
        }
    })
}

/// The operator listener: plain HTTP, no auth, operator endpoints only, and
/// the same connection limit as the main listener (it is reachable without
/// credentials, so it must not be a way to run the process out of files).
async fn serve_ops(listener: TcpListener, frontend: Arc<Frontend>, limits: Arc<ServerConfig>) {
    // Kept for the life of the loop: a dropped one would end connections.
    let graceful = GracefulShutdown::new();
    let table = Table::new(&limits);
    loop {
        table.room().await;
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let Ok(admission) = table.admit(peer.ip()) else {
            continue;
        };
        let (frontend, limits) = (frontend.clone(), limits.clone());
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            if let Some(slot) = admission.slot(limits.header_grace).await {
                serve_connection(stream, frontend, &limits, peer, watcher, slot).await;
            }
        });
    }
}

async fn serve_connection<S>(
    stream: S,
    frontend: Arc<Frontend>,
    limits: &ServerConfig,
    peer: std::net::SocketAddr,
    watcher: Watcher,
    slot: Slot,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + crate::idle::Abandon + 'static,
{
    let client = peer.ip();
    let tracked = slot.conn().clone();
    let service = hyper::service::service_fn(move |req| {
        let frontend = frontend.clone();
        // The head arrived: busy (never shed) until the response body ends.
        let busy = tracked.begin();
        async move {
            let response = frontend.handle(req, client).await;
            Ok::<_, Infallible>(response.map(|body| InFlight::new(body, busy)))
        }
    });
    let first_byte = FirstByte::of(limits);
    let send = SendRule {
        window: limits.send_timeout,
        min_rate: limits.min_send_rate.0,
    };
    let stream = first_byte
        .stream(stream, limits.idle_timeout)
        .with_send_rule(send);
    let stream = Counted::new(stream, slot.conn().clone());
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let max_header = usize::try_from(limits.max_header_size.0).unwrap_or(usize::MAX);
    let mut http1 = builder.http1();
    // 100 headers (hyper's default, said here): more is 431, as is a head
    // over max_header_size.
    http1
        .timer(TokioTimer::new())
        .max_buf_size(max_header)
        .max_headers(100);
    first_byte.http1(&mut http1);
    let mut http2 = builder.http2();
    http2
        .timer(TokioTimer::new())
        // A header block (HEADERS and its CONTINUATIONs, decoded) past this
        // is refused before it is all buffered: the CONTINUATION flood.
        .max_header_list_size(u32::try_from(max_header).unwrap_or(u32::MAX))
        // Streams a client opens and resets before we answer (the rapid
        // reset, CVE-2023-44487): past 20 pending the connection gets
        // GOAWAY(ENHANCE_YOUR_CALM) instead of spawning handlers forever.
        .max_pending_accept_reset_streams(20)
        // Streams we reset for a client's errors: past these, GOAWAY.
        .max_local_error_reset_streams(256)
        // Requests in flight on one connection: each may run a handler and
        // hold a blob stream, so a client cannot multiply them unbounded
        // (a puller asks for a few layers at a time).
        .max_concurrent_streams(128)
        // Response bytes buffered per stream for a client that does not
        // read them (hyper's default, said here: memory per slow reader).
        .max_send_buf_size(400 * 1024);
    let conn = builder
        .serve_connection(TokioIo::new(stream), service)
        .into_owned();
    let table = slot.table().clone();
    tokio::select! {
        r = watcher.watch(conn) => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        }
        () = slot.conn().closed_for_another() => {
            tracing::debug!(%peer, "connection closed to make room for another");
        }
        () = table.head_overdue(slot.conn()) => {
            tracing::debug!(%peer, "request head too slow (server.header_min_rate); closed");
        }
    }
}

/// Raises the soft limit of open files to the hard one, so that
/// `max_connections` (and a flood past it, which is accepted and shed) does
/// not meet `EMFILE`, and returns the connections to serve at most: the
/// configured ones, or fewer when even the hard limit leaves no room for
/// them beside the cache's files, the upstream's connections and the
/// connections shed but not closed yet (a warning says so).
fn connections_within_open_files(max_connections: usize) -> usize {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if let (Some(current), Some(max)) = (limit.current, limit.maximum) {
        if current < max {
            limit.current = Some(max);
            match setrlimit(Resource::Nofile, limit) {
                Ok(()) => tracing::debug!(from = current, to = max, "raised the open-file limit"),
                Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
            }
        }
    }
    let soft = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    let fits = usize::try_from(soft.saturating_sub(OTHER_FILES))
        .unwrap_or(usize::MAX)
        .max(MIN_CONNECTIONS);
    if fits < max_connections {
        tracing::warn!(
            open_files = soft,
            max_connections,
            serving = fits,
            "the open-file limit is low for server.max_connections; serving fewer (raise LimitNOFILE= or ulimit -n)"
        );
        return fits;
    }
    max_connections
}

/// Open files kept for other than client connections: the cache's files, the
/// upstream's and peers' connections, connections shed but not closed yet.
const OTHER_FILES: u64 = 1024;
/// Connections served whatever the open-file limit says.
const MIN_CONNECTIONS: usize = 64;

/// The first-byte rule, stated once: a client has the header read timeout
/// to finish a TLS handshake, as long again to send its first byte after it,
/// and as long for each HTTP/1 request header, so a client that sends
/// nothing holds a connection slot no longer than that.
#[derive(Debug, Clone, Copy)]
struct FirstByte(std::time::Duration);

impl FirstByte {
    fn of(limits: &ServerConfig) -> Self {
        Self(limits.header_read_timeout)
    }

    /// The handshake's result, or `None` when the deadline passed first.
    async fn handshake<F: Future>(self, handshake: F) -> Option<F::Output> {
        tokio::time::timeout(self.0, handshake).await.ok()
    }

    /// The stream with the first deadline, then `idle` for every silence.
    /// Above TLS, so the deadline covers the first request after a handshake.
    fn stream<S>(self, stream: S, idle: std::time::Duration) -> IdleTimeout<S> {
        IdleTimeout::new(stream, self.0, idle)
    }

    /// hyper's deadline for each request header (HTTP/2 has no equivalent;
    /// there the stream's first deadline and the idle timeout apply).
    fn http1<E>(self, http1: &mut Http1Builder<'_, E>) {
        http1.header_read_timeout(self.0);
    }
}

impl Frontend {
    /// Authenticates, parses, dispatches, renders errors, and wraps the body
    /// for the access log.
    /// `client` is the peer's address, which failed logins are held against.
    async fn handle(&self, req: Request<Incoming>, client: IpAddr) -> Response<LoggedBody> {
        let started = Instant::now();
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let head = method == http::Method::HEAD;
        let mut label = "other";
        let (parts, body) = req.into_parts();
        // A client that waits for `100 Continue` sends no body the handler
        // did not ask for, and a drain would ask for it.
        let drains = matches!(
            method,
            http::Method::POST | http::Method::PUT | http::Method::PATCH | http::Method::DELETE
        ) && parts.headers.get(header::EXPECT).is_none();
        let body = {
            use http_body_util::BodyExt;
            body.map_err(|e| Box::new(e) as response::BoxError)
                .boxed_unsync()
        };
        let (unread, body) = request_body::Shared::new(body);
        let result = self.answer(parts, body, client, &mut label).await;
        // Before the answer: a refusal that left the body unread would
        // otherwise close the connection under a client (or proxy) still
        // sending it.
        if drains {
            unread.drain().await;
        }
        let (response, outcome) = match result {
            Ok(mut reply) => {
                if reply.outcome != Outcome::None {
                    // Tells clients (and `regmirror prefetch`) where bytes came from.
                    reply.response.headers_mut().insert(
                        X_CACHE,
                        http::HeaderValue::from_static(reply.outcome.as_str()),
                    );
                }
                (reply.response, reply.outcome)
            }
            Err(e) => {
                let status = e.wire().status;
                if status.is_server_error() {
                    tracing::warn!(%method, path = %bounded(&path), error = %e, "request failed");
                    self.registry
                        .metrics
                        .error(status.as_u16(), &path, e.to_string());
                }
                (response::error(&e, head), Outcome::None)
            }
        };
        let status = response.status();
        let cache_kind = match label {
            "manifest" | "blob" => Some(label),
            _ => None,
        };
        self.registry
            .metrics
            .request(label, status.as_u16(), cache_kind, outcome.as_str());
        let length = if head {
            Some(0)
        } else {
            response
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
        };
        response.map(|body| {
            LoggedBody::new(
                body,
                RequestInfo {
                    method,
                    path: bounded(&path),
                    status,
                    outcome,
                    length,
                    started,
                    metrics: self.registry.metrics.clone(),
                },
            )
        })
    }

    async fn answer(
        &self,
        req: http::request::Parts,
        body: response::Body,
        client: IpAddr,
        label: &mut &'static str,
    ) -> Result<response::Reply, Error> {
        let uri_len = req.uri.path().len() + req.uri.query().map_or(0, |q| q.len() + 1);
        if uri_len > self.max_url_length {
            return Err(Error::UriTooLong(format!(
                "{uri_len} bytes; the limit is {}",
                self.max_url_length
            )));
        }
        // Parsed before authentication, so that a refused request is counted
        // under its endpoint; a parse error is answered only after it.
        let target = match OpsEndpoint::parse(req.uri.path()) {
            Some(which) => Target::Ops(which),
            None => match peer::parse(req.uri.path()) {
                Some(digest) => Target::Peer(digest),
                None => Target::Api(endpoint::parse(
                    &req.method,
                    req.uri.path(),
                    req.uri.query(),
                )),
            },
        };
        *label = match &target {
            Target::Ops(which) => which.label(),
            Target::Peer(_) => "peer",
            Target::Api(Ok(api)) => api.endpoint.label(),
            Target::Api(Err(_)) => "other",
        };
        if let Target::Peer(digest) = target {
            // Signed by a replica with the cluster's secret, instead of a
            // client's credentials; refused by a mirror that has no cluster.
            if self.ops_only || req.method != http::Method::GET {
                return Err(Error::NotFound("no such endpoint".into()));
            }
            return self
                .registry
                .peer_blob(req.method.as_str(), req.uri.path(), &req.headers, digest?)
                .await;
        }
        // Who sent it: `None` without users, or for a client without
        // credentials that `auth.anonymous_pull` lets pull.
        let mut user = None;
        if let Some(auth) = &self.auth {
            if !matches!(target, Target::Ops(which) if !which.needs_auth()) {
                let value = req
                    .headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok());
                let read = matches!(req.method, http::Method::GET | http::Method::HEAD);
                let anonymous = !req.headers.contains_key(header::AUTHORIZATION)
                    && match &target {
                        Target::Api(api) => {
                            auth.lets_in_anonymous(api.as_ref().ok().map(|a| &a.endpoint), read)
                        }
                        Target::Ops(_) | Target::Peer(_) => false,
                    };
                if !anonymous {
                    user = Some(auth.check(value, client).await?);
                }
            }
        }
        match target {
            Target::Ops(which) => {
                ops::answer(&self.registry, which, req.method == http::Method::HEAD).await
            }
            Target::Api(_) if self.ops_only => Err(Error::NotFound(
                "this listener serves /metrics, /healthz, /readyz and /_/status".into(),
            )),
            Target::Api(api) => {
                let api = api?;
                if let Some(auth) = &self.auth {
                    auth.authorize(user.as_ref(), &api.endpoint)?;
                }
                self.registry.handle(&api, &req.headers, Some(body)).await
            }
            Target::Peer(_) => Err(Error::Internal("a peer request was not answered".into())),
        }
    }
}

/// What a request asks for: an operator endpoint, or the registry API (or
/// why its path is not one).
enum Target {
    Ops(OpsEndpoint),
    /// A replica's `GET /_cluster/blobs/<digest>`.
    Peer(Result<crate::reference::Digest, Error>),
    Api(Result<endpoint::ApiRequest, Error>),
}

/// Log lines stay short whatever the client sent.
fn bounded(path: &str) -> String {
    path.chars().take(512).collect()
}
