//! The body of a request, shared between the handler and the front door: a
//! handler that answers before reading it all (a chunk refused as out of
//! order, a refused push) leaves the rest, which the front door then reads
//! and discards, up to a bound, before the answer goes out. Otherwise the
//! connection must close with bytes unread, and a proxy still sending them
//! (nginx in front of replicas) turns the answer into its own 502.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};

use crate::response::{Body, BoxError};

/// Bytes of an unread body the front door reads to keep its connection.
pub const DRAIN_LIMIT: u64 = 64 << 20;
/// How long it reads them at most.
pub const DRAIN_TIME: Duration = Duration::from_secs(30);

/// The front door's hold on a request body.
pub struct Shared(Arc<Mutex<Body>>);

/// The handler's view of the same body.
struct View(Arc<Mutex<Body>>);

impl Shared {
    /// Shares `body`: the view goes to the handler.
    pub fn new(body: Body) -> (Shared, Body) {
        let inner = Arc::new(Mutex::new(body));
        let view = View(inner.clone());
        (Shared(inner), http_body_util::BodyExt::boxed_unsync(view))
    }

    /// Reads and discards what the handler left, up to [`DRAIN_LIMIT`]
    /// bytes and [`DRAIN_TIME`]; `true` when the body ended.
    pub async fn drain(&self) -> bool {
        let read = async {
            let mut seen = 0u64;
            loop {
                let frame = std::future::poll_fn(|cx| poll(&self.0, cx)).await;
                match frame {
                    None => return true,
                    Some(Err(_)) => return false,
                    Some(Ok(f)) => {
                        seen += f.data_ref().map_or(0, |d| d.len() as u64);
                        if seen > DRAIN_LIMIT {
                            return false;
                        }
                    }
                }
            }
        };
        tokio::time::timeout(DRAIN_TIME, read)
            .await
            .unwrap_or(false)
    }
}

fn poll(body: &Mutex<Body>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    let mut body = body.lock().unwrap_or_else(|p| p.into_inner());
    Pin::new(&mut *body).poll_frame(cx)
}

impl http_body::Body for View {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        poll(&self.0, cx)
    }

    fn size_hint(&self) -> SizeHint {
        self.0
            .lock()
            .map_or_else(|_| SizeHint::default(), |b| b.size_hint())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn what_the_handler_left_is_read_and_what_it_read_is_not_read_twice() {
        let (shared, view) = Shared::new(crate::response::full(Bytes::from_static(b"abc")));
        drop(view);
        assert!(shared.drain().await, "an unread body is drained to its end");
        let (shared, view) = Shared::new(crate::response::full(Bytes::from_static(b"abc")));
        let got = view.collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], b"abc");
        assert!(shared.drain().await, "a read body is at its end already");
    }

    #[tokio::test]
    async fn a_body_past_the_limit_is_left() {
        let big = Bytes::from(vec![0u8; DRAIN_LIMIT as usize + 1]);
        let (shared, _view) = Shared::new(crate::response::full(big));
        assert!(!shared.drain().await);
    }
}
