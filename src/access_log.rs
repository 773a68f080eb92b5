//! One log line per request, written when the response body is finished or
//! dropped, so it carries the bytes really sent and whether the body was cut.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};

use crate::metrics::Metrics;
use crate::response::{Body, BoxError, Outcome};

/// What the log line says besides the body's fate.
pub struct RequestInfo {
    pub method: Method,
    /// The path only: a query could carry anything a client put there.
    pub path: String,
    pub status: StatusCode,
    pub outcome: Outcome,
    /// The `Content-Length` sent (0 for HEAD): hyper stops polling a body
    /// once that many bytes went out, so reaching it means complete.
    pub length: Option<u64>,
    pub started: Instant,
    pub metrics: Arc<Metrics>,
}

/// A response body that logs its request when it ends.
pub struct LoggedBody {
    inner: Body,
    info: RequestInfo,
    bytes: u64,
    failed: bool,
    finished: bool,
}

impl LoggedBody {
    pub fn new(inner: Body, info: RequestInfo) -> Self {
        Self {
            inner,
            info,
            bytes: 0,
            failed: false,
            finished: false,
        }
    }
}

impl HttpBody for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                }
            }
            Poll::Ready(Some(Err(_))) => this.failed = true,
            Poll::Ready(None) => this.finished = true,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        let body = if self.failed {
            "aborted"
        } else if self.finished
            || self.inner.is_end_stream()
            || self.info.length == Some(self.bytes)
        {
            "complete"
        } else {
            "client-gone"
        };
        let i = &self.info;
        i.metrics.client_bytes(i.outcome.as_str(), self.bytes);
        tracing::info!(
            target: "regmirror::access",
            method = %i.method,
            path = %i.path,
            status = i.status.as_u16(),
            bytes = self.bytes,
            cache = i.outcome.as_str(),
            body,
            ms = i.started.elapsed().as_millis() as u64,
            "request"
        );
    }
}
