//! Blobs: served from the store when cached, else from a single-flight
//! download that the client follows as it arrives. `Range` is honoured either
//! way.

use http::{header, StatusCode};

use super::Registry;
use crate::download::{Joined, Source};
use crate::error::Error;
use crate::range::{self, RangeRequest};
use crate::reference::{Digest, RepoName};
use crate::response::{self, Outcome, Reply, CONTENT_DIGEST};

impl Registry {
    pub(super) async fn blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        head: bool,
        range_header: Option<&str>,
    ) -> Result<Reply, Error> {
        let confirm = async { self.upstream.head_blob(repo, digest).await.map(drop) };
        if let Some(blob) = self.store.open_blob(digest).await.map_err(storage)? {
            self.authorize(repo, digest, confirm).await?;
            return blob_reply(
                digest,
                blob.size,
                Some(Source::from(blob)),
                head,
                range_header,
                Outcome::Hit,
            );
        }
        if head {
            // Headers only: the upstream's HEAD answers without a download.
            let size = self.upstream.head_blob(repo, digest).await?;
            self.index.add_holds(repo, vec![digest.clone()]).await;
            return match size {
                Some(size) => blob_reply(digest, size, None, true, None, Outcome::Pass),
                None => Err(Error::UpstreamFailed(
                    "upstream answered a blob HEAD without Content-Length".into(),
                )),
            };
        }
        let fetch = {
            let upstream = self.upstream.clone();
            let (repo, digest) = (repo.clone(), digest.clone());
            async move { upstream.get_blob(&repo, &digest).await }
        };
        match self.downloads.join_or_start(digest, fetch).await? {
            Joined::Cached(blob) => {
                self.authorize(repo, digest, confirm).await?;
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
                    self.authorize(repo, digest, confirm).await?;
                }
                let size = download.size().await?;
                if started {
                    self.index.add_holds(repo, vec![digest.clone()]).await;
                }
                let outcome = if started {
                    Outcome::Miss
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
