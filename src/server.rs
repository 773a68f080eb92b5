//! The HTTP server: accepts connections on an already-bound listener (so
//! tests bind port 0), speaks HTTP/1.1 and HTTP/2, parses each request into an
//! endpoint and hands it to the [`Registry`]. Stops accepting on `shutdown`.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::access_log::{LoggedBody, RequestInfo};
use crate::config::Config;
use crate::endpoint;
use crate::registry::Registry;
use crate::response::{self, Outcome};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Startup(#[from] crate::error::Error),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
}

/// Serves the registry API on `listener` until `shutdown` completes.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let registry = Arc::new(Registry::open(&config).await?);
    let upkeep = tokio::spawn(registry.clone().maintain());
    tracing::info!(
        addr = %listener.local_addr()?,
        upstream = %config.upstream.url,
        data_dir = %config.data_dir.display(),
        "regmirror listening"
    );
    tokio::pin!(shutdown);
    loop {
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
        let registry = registry.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let registry = registry.clone();
                async move { Ok::<_, Infallible>(handle(&registry, req).await) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    tracing::info!("shutting down");
    upkeep.abort();
    if let Err(e) = registry.flush().await {
        tracing::warn!(error = %e, "cannot write the index snapshot");
    }
    Ok(())
}

/// Parses, dispatches, renders errors, and wraps the body for the access log.
async fn handle(registry: &Registry, req: Request<Incoming>) -> Response<LoggedBody> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let head = method == http::Method::HEAD;
    let result = match endpoint::parse(&method, &path, req.uri().query()) {
        Ok(api) => registry.handle(&api, req.headers()).await,
        Err(e) => Err(e),
    };
    let (response, outcome) = match result {
        Ok(reply) => (reply.response, reply.outcome),
        Err(e) => {
            if e.wire().status.is_server_error() {
                tracing::warn!(%method, %path, error = %e, "request failed");
            }
            (response::error(&e, head), Outcome::None)
        }
    };
    let status = response.status();
    let length = if head {
        Some(0)
    } else {
        response
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    };
    response.map(|body| {
        LoggedBody::new(
            body,
            RequestInfo {
                method,
                path: path.chars().take(512).collect(),
                status,
                outcome,
                length,
                started,
            },
        )
    })
}
