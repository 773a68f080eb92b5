//! Blobs: served from the store when cached (checked against the index's
//! size, and hashed once per process as the first clients stream it), else
//! from a single-flight download that the client follows as it arrives.
//! `Range` is honoured either way.

use http::{header, StatusCode};

use super::{offline_miss, Registry};
use crate::cache::download::{Fill, Joined, Origin, Source};
use crate::cache::store::{BlobFile, ContentKey};
use crate::error::Error;
use crate::range::{self, RangeRequest};
use crate::reference::Digest;
use crate::response::{self, Outcome, Reply, CONTENT_DIGEST};
use crate::routing::Route;
use crate::upstream::What;

impl Registry {
    pub(super) async fn blob(
        &self,
        route: &Route,
        digest: &Digest,
        head: bool,
        range_header: Option<&str>,
    ) -> Result<Reply, Error> {
        if let Some(blob) = self.cached_blob(digest).await? {
            self.authorize(route, digest, What::Blob).await?;
            self.touch(ContentKey::blob(digest)).await;
            return self.cached_reply(digest, blob, head, range_header).await;
        }
        if self.offline {
            return Err(offline_miss(What::Blob, &format!("{}@{digest}", route.key)));
        }
        if head {
            // Headers only: the upstream's HEAD answers without a download.
            let size = self.upstream(route).head_blob(&route.repo, digest).await?;
            self.index.add_holds(&route.key, vec![digest.clone()]).await;
            return match size {
                Some(size) => blob_reply(digest, size, None, true, None, Outcome::Pass),
                None => Err(Error::UpstreamFailed(
                    "upstream answered a blob HEAD without Content-Length".into(),
                )),
            };
        }
        if let Some(range) = range_header {
            if let Some(reply) = self.bucket_range(route, digest, range).await? {
                return Ok(reply);
            }
        }
        // The upstream's body guards itself (stalls, trickles) and resumes;
        // the download's guard only has to outlast that.
        let read_timeout = self.upstream(route).blob_silence_bound();
        let mut retried = false;
        loop {
            let joined = self
                .downloads
                .join_or_start(digest, read_timeout, self.fetch(route, digest))
                .await?;
            let (download, source, started) = match joined {
                Joined::Cached(blob) => {
                    self.authorize(route, digest, What::Blob).await?;
                    return self.cached_reply(digest, blob, false, range_header).await;
                }
                Joined::Download {
                    download,
                    source,
                    started,
                } => (download, source, started),
            };
            // The upstream's answer first: its 200 records that the
            // starter's repository holds the blob, so joiners of the same
            // repository need no HEAD of their own.
            let size = match download.size().await {
                Ok(size) => size,
                Err(e) if !started && !retried && !self.index.holds(&route.key, digest).await => {
                    // Another repository's request failed (its upstream may
                    // not link the blob there): fetch for this one.
                    tracing::debug!(%digest, repo = %route.key, error = %e, "a joined download failed; fetching for this repository");
                    self.authorize(route, digest, What::Blob).await?;
                    retried = true;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if !started || self.cluster.is_some() {
                // Another repository's request may have started it; and a
                // replica may have filled it from the bucket or a peer,
                // which says nothing of the repository.
                self.authorize(route, digest, What::Blob).await?;
            }
            let outcome = if started {
                Outcome::Miss
            } else if download.is_verified() {
                // Verified and being committed: local bytes, a hit.
                self.metrics.tier_hit("local");
                Outcome::Hit
            } else {
                Outcome::Coalesced
            };
            return match size {
                Some(size) => blob_reply(digest, size, Some(source), false, range_header, outcome),
                None => unsized_reply(digest, source, outcome),
            };
        }
    }

    /// The upstream GET of a blob for a route, as a download sends it: its
    /// 200 records that the route's repository holds the blob before any
    /// follower learns that the download is streaming.
    fn fetch(
        &self,
        route: &Route,
        digest: &Digest,
    ) -> impl std::future::Future<Output = Result<Fill, Error>> + Send + 'static {
        let upstream = self.upstream(route).clone();
        let index = self.index.clone();
        let tiers = self.cluster.as_ref().map(|c| c.tiers.clone());
        let stall = upstream.read_timeout();
        let (key, repo, digest) = (route.key.clone(), route.repo.clone(), digest.clone());
        let get = {
            let digest = digest.clone();
            async move {
                let resp = upstream.get_blob(&repo, &digest).await?;
                index.add_holds(&key, vec![digest]).await;
                Ok(resp)
            }
        };
        // Boxed: the cluster's fill is a large state machine, and it would
        // otherwise live inside every blob request's future.
        Box::pin(async move {
            match tiers {
                // The bucket, the lease holder, or the upstream.
                Some(tiers) => tiers
                    .fill(digest, get)
                    .await
                    .map(|fill| stall_guard(fill, stall)),
                None => get.await.map(Fill::upstream),
            }
        })
    }

    /// A cached blob's answer: its bytes checked as they stream when this
    /// process has not vouched for them yet; a GET counts as a local hit.
    async fn cached_reply(
        &self,
        digest: &Digest,
        blob: BlobFile,
        head: bool,
        range_header: Option<&str>,
    ) -> Result<Reply, Error> {
        let size = blob.size;
        let source = if head {
            None
        } else {
            self.metrics.tier_hit("local");
            Some(self.verifier.source(digest, blob).await)
        };
        blob_reply(digest, size, source, head, range_header, Outcome::Hit)
    }

    /// The committed blob, if present and of the size the index recorded
    /// (its bytes are checked as it streams). A file of another size is
    /// removed, so the caller fetches it again.
    pub(super) async fn cached_blob(&self, digest: &Digest) -> Result<Option<BlobFile>, Error> {
        let key = ContentKey::blob(digest);
        // Read before the open, so a commit that lands in between is not
        // forgotten below.
        let entry = self.index.entry(&key).await;
        let Some(blob) = self.store.open_blob(digest).await.map_err(storage)? else {
            if let Some(seen) = entry {
                // Gone from disk (by hand, or `gc`): stop claiming it.
                self.index.forget_if(&key, seen).await;
            }
            return Ok(None);
        };
        match entry {
            Some(entry) if entry.size != blob.size => {}
            _ => return Ok(Some(blob)),
        }
        tracing::warn!(%digest, size = blob.size, "cached blob has another size than recorded; removing it and fetching it again");
        self.store.remove(&key).await.map_err(storage)?;
        self.index.forget(&key).await;
        self.verifier.forget(digest).await;
        Ok(None)
    }
}

fn storage(e: std::io::Error) -> Error {
    Error::internal("cache storage", e)
}

/// A blob answer of known size: 200, or 206 for a satisfiable `Range`.
pub(super) fn blob_reply(
    digest: &Digest,
    size: u64,
    source: Option<Source>,
    head: bool,
    range_header: Option<&str>,
    outcome: Outcome,
) -> Result<Reply, Error> {
    let b = response::builder(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(CONTENT_DIGEST, digest.to_string())
        .header(header::ETAG, format!("\"{digest}\""))
        .header(header::ACCEPT_RANGES, "bytes");
    let (b, start, end) = match range::parse(range_header, size) {
        RangeRequest::Full => (b.header(header::CONTENT_LENGTH, size), 0, size),
        RangeRequest::Partial(r) => (
            b.status(StatusCode::PARTIAL_CONTENT)
                .header(header::CONTENT_RANGE, r.content_range(size))
                .header(header::CONTENT_LENGTH, r.len()),
            r.start,
            r.end + 1,
        ),
        RangeRequest::Unsatisfiable => return Err(Error::RangeNotSatisfiable { size }),
    };
    let body = match source {
        Some(src) if !head => body(digest, src.stream(start, Some(end))),
        _ => response::empty(),
    };
    let response = b
        .body(body)
        .map_err(|e| Error::internal("building a response", e))?;
    Ok(Reply { response, outcome })
}

/// A download whose upstream sent no `Content-Length`: streamed chunked.
fn unsized_reply(digest: &Digest, source: Source, outcome: Outcome) -> Result<Reply, Error> {
    let response = response::builder(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(CONTENT_DIGEST, digest.to_string())
        .body(body(digest, source.stream(0, None)))
        .map_err(|e| Error::internal("building a response", e))?;
    Ok(Reply { response, outcome })
}

/// A fill from the bucket or a peer, which has no guard of its own: ends
/// when it sends nothing for `read_timeout` (the download's guard is the
/// longer one the upstream's resumable body needs).
fn stall_guard(mut fill: Fill, read_timeout: std::time::Duration) -> Fill {
    use futures_util::StreamExt;
    if fill.origin == Origin::Upstream {
        return fill;
    }
    let origin = fill.origin.label();
    let body = std::mem::replace(&mut fill.body, futures_util::stream::empty().boxed());
    fill.body = futures_util::stream::unfold(Some(body), move |body| async move {
        let mut body = body?;
        match tokio::time::timeout(read_timeout, body.next()).await {
            Ok(Some(item)) => Some((item, Some(body))),
            Ok(None) => None,
            Err(_) => Some((
                Err(Error::UpstreamTimeout(format!(
                    "the {origin} sent nothing for {}",
                    humantime::format_duration(read_timeout)
                ))),
                None,
            )),
        }
    })
    .boxed();
    fill
}

/// A blob body; a failure in its middle (the client's response then aborts)
/// is logged with the digest, as the access log shows only the request.
fn body(
    digest: &Digest,
    stream: impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static,
) -> response::Body {
    use futures_util::TryStreamExt;
    let digest = digest.clone();
    response::stream(stream.inspect_err(move |e| {
        tracing::warn!(%digest, error = %e, "blob body aborted");
    }))
}
