//! Blobs: served from the store when cached (checked against the index's
//! size, and hashed once per process before the first serve), else from a
//! single-flight download that the client follows as it arrives. `Range` is
//! honoured either way.

use std::os::unix::fs::FileExt;

use http::{header, StatusCode};

use super::{offline_miss, Registry};
use crate::download::{Joined, Source};
use crate::error::Error;
use crate::hashing::Hasher;
use crate::range::{self, RangeRequest};
use crate::reference::Digest;
use crate::response::{self, Outcome, Reply, CONTENT_DIGEST};
use crate::routing::Route;
use crate::store::{BlobFile, ContentKey};
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
            self.touch(ContentKey::blob(digest), blob.size).await;
            return blob_reply(
                digest,
                blob.size,
                Some(Source::from(blob)),
                head,
                range_header,
                Outcome::Hit,
            );
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
        let upstream = self.upstream(route).clone();
        let read_timeout = upstream.read_timeout();
        let fetch = {
            let (repo, digest) = (route.repo.clone(), digest.clone());
            async move { upstream.get_blob(&repo, &digest).await }
        };
        match self
            .downloads
            .join_or_start(digest, read_timeout, fetch)
            .await?
        {
            Joined::Cached(blob) => {
                self.authorize(route, digest, What::Blob).await?;
                blob_reply(
                    digest,
                    blob.size,
                    Some(Source::from(blob)),
                    false,
                    range_header,
                    Outcome::Hit,
                )
            }
            Joined::Download { download, started } => {
                if !started {
                    // Another repository's request may have started it.
                    self.authorize(route, digest, What::Blob).await?;
                }
                let size = download.size().await?;
                if started {
                    self.index.add_holds(&route.key, vec![digest.clone()]).await;
                }
                let outcome = if started {
                    Outcome::Miss
                } else if download.is_verified() {
                    // Verified and being committed: local bytes, a hit.
                    Outcome::Hit
                } else {
                    Outcome::Coalesced
                };
                match size {
                    Some(size) => blob_reply(
                        digest,
                        size,
                        Some(download.source()),
                        false,
                        range_header,
                        outcome,
                    ),
                    None => unsized_reply(digest, download.source(), outcome),
                }
            }
        }
    }

    /// The committed blob, if present and intact: its size must match the
    /// index, and its bytes are hashed once per process (concurrent first
    /// requests share one hash). A damaged file is removed, so the caller
    /// fetches it again.
    async fn cached_blob(&self, digest: &Digest) -> Result<Option<BlobFile>, Error> {
        let Some(blob) = self.store.open_blob(digest).await.map_err(storage)? else {
            return Ok(None);
        };
        let key = ContentKey::blob(digest);
        let size_ok = match self.index.entry(&key).await {
            Some(entry) => entry.size == blob.size,
            None => true,
        };
        let intact = size_ok
            && self
                .verified
                .try_get_with(digest.clone(), verify(blob.clone(), digest.clone()))
                .await
                .is_ok();
        if intact {
            return Ok(Some(blob));
        }
        tracing::warn!(%digest, size = blob.size, "cached blob is damaged; removing it and fetching it again");
        self.store.remove(&key).await.map_err(storage)?;
        self.index.forget(&key).await;
        self.verified.invalidate(digest).await;
        Ok(None)
    }
}

/// Hashes a whole cached file off the async workers.
async fn verify(blob: BlobFile, digest: Digest) -> Result<(), Error> {
    tokio::task::spawn_blocking(move || {
        let mut hasher = Hasher::new(digest.algorithm());
        let mut buf = vec![0u8; 1 << 20];
        let mut pos = 0u64;
        while pos < blob.size {
            let n = blob.file.read_at(&mut buf, pos).map_err(storage)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            pos += n as u64;
        }
        if pos == blob.size && hasher.finish() == digest {
            Ok(())
        } else {
            Err(Error::Internal(format!(
                "cached {digest} does not match its digest"
            )))
        }
    })
    .await
    .map_err(|e| Error::internal("verifying a cached blob", e))?
}

fn storage(e: std::io::Error) -> Error {
    Error::internal("cache storage", e)
}

/// A blob answer of known size: 200, or 206 for a satisfiable `Range`.
fn blob_reply(
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
        Some(src) if !head => response::stream(src.stream(start, Some(end))),
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
        .body(response::stream(source.stream(0, None)))
        .map_err(|e| Error::internal("building a response", e))?;
    Ok(Reply { response, outcome })
}
