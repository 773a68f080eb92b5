//! What a download is filled from: a body of chunks with its size when
//! known, from the upstream, the shared bucket or a peer replica, and an
//! optional [`Sink`] that gets every chunk too (the bucket's upload) and
//! learns how the download ended.

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;

use crate::error::Error;
use crate::upstream::{transport_error, BlobBody};

/// Where a fill's bytes came from, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Upstream,
    Bucket,
    Peer,
}

impl Origin {
    pub fn label(self) -> &'static str {
        match self {
            Origin::Upstream => "upstream",
            Origin::Bucket => "bucket",
            Origin::Peer => "peer",
        }
    }
}

/// The body a download receives.
pub struct Fill {
    pub origin: Origin,
    /// From the source's Content-Length.
    pub size: Option<u64>,
    pub body: BoxStream<'static, Result<Bytes, Error>>,
    pub sink: Option<Box<dyn Sink>>,
}

impl std::fmt::Debug for Fill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fill")
            .field("origin", &self.origin)
            .field("size", &self.size)
            .field("sink", &self.sink.is_some())
            .finish()
    }
}

impl Fill {
    /// An upstream blob's body (which resumes itself where it breaks).
    pub fn upstream(body: BlobBody) -> Self {
        Self {
            origin: Origin::Upstream,
            size: body.size,
            body: body.stream,
            sink: None,
        }
    }

    /// An HTTP response's body, from `origin`.
    pub fn response(origin: Origin, resp: reqwest::Response) -> Self {
        Self {
            origin,
            size: resp.content_length(),
            body: resp
                .bytes_stream()
                .map(|r| r.map_err(transport_error))
                .boxed(),
            sink: None,
        }
    }

    pub fn with_sink(mut self, sink: Box<dyn Sink>) -> Self {
        self.sink = Some(sink);
        self
    }
}

/// Gets a download's chunks beside its clients and the spool. A sink that
/// fails handles that itself (it stops taking chunks); it never fails the
/// download, whose clients have their bytes either way.
#[async_trait]
pub trait Sink: Send {
    /// The next chunk, in order. Awaited: a slow sink slows the download.
    async fn push(&mut self, chunk: &Bytes);
    /// Every byte arrived and verified.
    async fn verified(self: Box<Self>, size: u64);
    /// The download failed (`error` says why: the checks of size and digest
    /// fail with `Error::UpstreamFailed`); nothing it pushed may be kept.
    async fn failed(self: Box<Self>, error: &Error);
}
