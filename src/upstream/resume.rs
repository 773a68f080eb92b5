//! A blob body from the upstream that outlives its connection: when the
//! connection breaks, stalls (`read_timeout`) or trickles (below
//! `min_rate`), the body goes on with `Range: bytes=<received>-` from where
//! it was cut, within `retries` resumes with a doubling backoff. The
//! download sees one continuous stream and hashes it as before. A resumed
//! answer that does not continue exactly at the offset (a 200, or a 206
//! starting elsewhere) ends the body with an error: its bytes cannot be
//! joined to the ones already received. Knows nothing of the cache.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use http::{header, StatusCode};
use reqwest::Response;
use url::Url;

use super::rate::RateWindow;
use super::{transport_error, Upstream};
use crate::error::Error;
use crate::reference::{Digest, RepoName};

/// The longest wait between two resumes, however many came before.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// A blob's body as the download receives it.
pub struct BlobBody {
    /// From the first answer's Content-Length.
    pub size: Option<u64>,
    pub stream: BoxStream<'static, Result<Bytes, Error>>,
}

impl std::fmt::Debug for BlobBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobBody")
            .field("size", &self.size)
            .finish()
    }
}

impl BlobBody {
    /// A response's body as it comes, never resumed (tests, other sources).
    pub fn plain(resp: Response) -> Self {
        Self {
            size: resp.content_length(),
            stream: resp
                .bytes_stream()
                .map(|r| r.map_err(transport_error))
                .boxed(),
        }
    }
}

/// The wait before resume number `attempt` (0 for the first): `base`
/// doubled each time, at most [`MAX_BACKOFF`].
pub fn backoff(base: Duration, attempt: u32) -> Duration {
    base.saturating_mul(1u32 << attempt.min(16))
        .min(MAX_BACKOFF)
}

/// Whether an answer to `Range: bytes=<offset>-` continues a blob of
/// `size` bytes at `offset`: a 206 with `Content-Range: bytes
/// <offset>-<size - 1>/<size or *>`. `Err` says what it was instead.
pub fn continues_at(
    status: StatusCode,
    content_range: Option<&str>,
    offset: u64,
    size: u64,
) -> Result<(), String> {
    if status != StatusCode::PARTIAL_CONTENT {
        return Err(format!(
            "answered {status} to a Range request at offset {offset}"
        ));
    }
    let range = content_range.ok_or("sent a 206 without Content-Range")?;
    let parsed = range
        .strip_prefix("bytes ")
        .and_then(|r| r.split_once('/'))
        .and_then(|(span, total)| {
            let (a, b) = span.split_once('-')?;
            let total = match total.trim() {
                "*" => None,
                t => Some(t.parse::<u64>().ok()?),
            };
            Some((
                a.trim().parse::<u64>().ok()?,
                b.trim().parse::<u64>().ok()?,
                total,
            ))
        });
    match parsed {
        Some((first, last, total))
            if first == offset
                && last.checked_add(1) == Some(size)
                && total.is_none_or(|t| t == size) =>
        {
            Ok(())
        }
        Some(_) => Err(format!(
            "answered a Range request at offset {offset} of {size} bytes with Content-Range {range:?}"
        )),
        None => Err(format!("sent an unreadable Content-Range {range:?}")),
    }
}

/// How patiently a body is read and resumed (from the upstream's config).
#[derive(Debug, Clone, Copy)]
pub struct Patience {
    pub read_timeout: Duration,
    /// Bounds each resume's request (CDN, registry, token, redirects).
    pub timeout: Duration,
    pub retries: u32,
    pub backoff: Duration,
    pub min_rate: u64,
    pub rate_window: Duration,
}

impl Patience {
    /// The longest the body can stay silent: stalls and resumes included.
    /// The download's own between-chunks guard is set to this, so only the
    /// body's checks decide when the upstream failed.
    pub fn silence_bound(&self) -> Duration {
        let resumes = (0..self.retries)
            .map(|i| backoff(self.backoff, i) + self.timeout + self.read_timeout)
            .fold(Duration::ZERO, |a, b| a.saturating_add(b));
        self.read_timeout
            .saturating_add(resumes)
            .saturating_add(Duration::from_secs(1))
    }
}

/// Why a body stopped, and whether resuming may help.
enum Break {
    Retry(Error),
    Fatal(Error),
}

/// The state of one resumable body.
struct Resuming {
    upstream: Arc<Upstream>,
    repo: RepoName,
    digest: Digest,
    patience: Patience,
    /// `None`: no Content-Length, so nothing to resume against.
    size: Option<u64>,
    received: u64,
    resp: Option<Response>,
    /// The redirect target the body came from, tried first on a resume.
    redirected: Option<Url>,
    /// Why the body stopped, when it did (set with `resp` taken).
    broken: Option<Break>,
    resumes: u32,
    rate: RateWindow,
    done: bool,
}

impl Upstream {
    /// The body of a first blob answer, resumed as it breaks.
    pub(super) fn resumable(
        self: &Arc<Self>,
        repo: &RepoName,
        digest: &Digest,
        resp: Response,
        redirected: Option<Url>,
    ) -> BlobBody {
        let patience = self.patience;
        let size = resp.content_length();
        let state = Resuming {
            upstream: self.clone(),
            repo: repo.clone(),
            digest: digest.clone(),
            patience,
            size,
            received: 0,
            resp: Some(resp),
            redirected,
            broken: None,
            resumes: 0,
            rate: RateWindow::new(patience.min_rate, patience.rate_window),
            done: false,
        };
        let stream = futures_util::stream::unfold(state, |mut s| async move {
            let item = s.next().await?;
            Some((item, s))
        });
        BlobBody {
            size,
            stream: stream.boxed(),
        }
    }
}

impl Resuming {
    async fn next(&mut self) -> Option<Result<Bytes, Error>> {
        loop {
            if self.done || self.size == Some(self.received) {
                // Every announced byte is here: the download checks the rest.
                self.done = true;
                return None;
            }
            let stop = match self.broken.take() {
                Some(b) => b,
                None => match self.read().await {
                    Ok(Some(chunk)) => return Some(Ok(chunk)),
                    Ok(None) => {
                        self.done = true;
                        return None;
                    }
                    Err(b) => b,
                },
            };
            self.resp = None;
            let e = match stop {
                Break::Fatal(e) => return self.fail(e),
                Break::Retry(e) if self.size.is_none() => return self.fail(e),
                Break::Retry(e) if self.resumes >= self.patience.retries => {
                    let msg = format!(
                        "{} after {} of {} bytes of {}, {} resumes: {e}",
                        "the upstream body broke",
                        self.received,
                        self.size.unwrap_or(0),
                        self.digest,
                        self.resumes
                    );
                    return self.fail(match e {
                        Error::UpstreamTimeout(_) => Error::UpstreamTimeout(msg),
                        _ => Error::UpstreamFailed(msg),
                    });
                }
                Break::Retry(e) => e,
            };
            tracing::warn!(
                digest = %self.digest,
                offset = self.received,
                size = self.size,
                resume = self.resumes + 1,
                error = %e,
                "upstream body broke; resuming with Range"
            );
            tokio::time::sleep(backoff(self.patience.backoff, self.resumes)).await;
            self.resumes += 1;
            self.broken = self.resume().await.err();
        }
    }

    fn fail(&mut self, e: Error) -> Option<Result<Bytes, Error>> {
        self.done = true;
        self.resp = None;
        Some(Err(e))
    }

    /// The next chunk of the current answer; `Ok(None)` at a clean end of a
    /// body of unknown size.
    async fn read(&mut self) -> Result<Option<Bytes>, Break> {
        let resp = self
            .resp
            .as_mut()
            .ok_or_else(|| Break::Fatal(Error::Internal("a blob body without an answer".into())))?;
        let started = Instant::now();
        let chunk = tokio::time::timeout(self.patience.read_timeout, resp.chunk())
            .await
            .map_err(|_| {
                Break::Retry(Error::UpstreamTimeout(format!(
                    "the upstream sent nothing for {}",
                    humantime::format_duration(self.patience.read_timeout)
                )))
            })?
            .map_err(|e| Break::Retry(transport_error(e)))?;
        let Some(chunk) = chunk else {
            return match self.size {
                None => Ok(None),
                Some(size) => Err(Break::Retry(Error::UpstreamFailed(format!(
                    "the upstream body ended after {} of {size} bytes",
                    self.received
                )))),
            };
        };
        let end = self.received + chunk.len() as u64;
        if self.size.is_some_and(|s| end > s) {
            return Err(Break::Fatal(Error::UpstreamFailed(format!(
                "the upstream sent more bytes than announced for {}",
                self.digest
            ))));
        }
        self.received = end;
        if let Err(rate) = self.rate.record(started.elapsed(), chunk.len() as u64) {
            // This chunk is good; the connection is not.
            self.broken = Some(Break::Retry(Error::UpstreamTimeout(format!(
                "the upstream sent {rate} bytes/s over {}, below upstream.min_rate ({} bytes/s)",
                humantime::format_duration(self.patience.rate_window),
                self.patience.min_rate
            ))));
        }
        Ok(Some(chunk))
    }

    /// Asks for the rest: at the redirect target first, at the registry
    /// (a fresh redirect, a fresh token) when that is refused or fails.
    async fn resume(&mut self) -> Result<(), Break> {
        let size = self.size.unwrap_or(0);
        let offset = self.received;
        let from = self.redirected.take();
        let request = self
            .upstream
            .resume_blob(&self.repo, &self.digest, from.as_ref(), offset);
        let (resp, redirected) = tokio::time::timeout(self.patience.timeout, request)
            .await
            .map_err(|_| {
                Break::Retry(Error::UpstreamTimeout(format!(
                    "no answer to a resume within {}",
                    humantime::format_duration(self.patience.timeout)
                )))
            })?
            .map_err(|e| match e {
                Error::UpstreamTimeout(_)
                | Error::UpstreamUnreachable(_)
                | Error::UpstreamFailed(_)
                | Error::TooManyRequests { .. } => Break::Retry(e),
                e => Break::Fatal(e),
            })?;
        let content_range = resp
            .headers()
            .get(header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok());
        continues_at(resp.status(), content_range, offset, size).map_err(|why| {
            Break::Fatal(Error::UpstreamFailed(format!(
                "cannot resume {} at {offset} of {size} bytes: the upstream {why}",
                self.digest
            )))
        })?;
        if resp.content_length().is_some_and(|l| l != size - offset) {
            return Err(Break::Fatal(Error::UpstreamFailed(format!(
                "cannot resume {}: a 206 for {} bytes announced {:?}",
                self.digest,
                size - offset,
                resp.content_length()
            ))));
        }
        self.resp = Some(resp);
        self.redirected = redirected;
        self.rate.reset();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resume_must_continue_exactly_at_the_offset() {
        let ok = StatusCode::PARTIAL_CONTENT;
        assert_eq!(
            continues_at(ok, Some("bytes 100-999/1000"), 100, 1000),
            Ok(())
        );
        assert_eq!(continues_at(ok, Some("bytes 100-999/*"), 100, 1000), Ok(()));
        for (status, range) in [
            (StatusCode::OK, Some("bytes 100-999/1000")),
            (ok, None),
            (ok, Some("bytes 0-999/1000")),
            (ok, Some("bytes 101-999/1000")),
            (ok, Some("bytes 100-998/1000")),
            (ok, Some("bytes 100-999/2000")),
            (ok, Some("bytes 100-1999/2000")),
            (ok, Some("items 100-999/1000")),
            (ok, Some("bytes 100-/1000")),
            (ok, Some("bytes */1000")),
        ] {
            assert!(
                continues_at(status, range, 100, 1000).is_err(),
                "{status} {range:?} was taken"
            );
        }
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let base = Duration::from_millis(500);
        let got: Vec<_> = (0..5).map(|i| backoff(base, i).as_millis()).collect();
        assert_eq!(got, [500, 1000, 2000, 4000, 8000]);
        assert_eq!(backoff(base, 10), MAX_BACKOFF);
        assert_eq!(backoff(base, u32::MAX), MAX_BACKOFF);
        assert_eq!(backoff(Duration::ZERO, 3), Duration::ZERO);
    }

    #[test]
    fn the_silence_bound_covers_every_resume() {
        let p = Patience {
            read_timeout: Duration::from_secs(2),
            timeout: Duration::from_secs(3),
            retries: 2,
            backoff: Duration::from_secs(1),
            min_rate: 0,
            rate_window: Duration::ZERO,
        };
        // 2 + (1 + 3 + 2) + (2 + 3 + 2) + 1 of slack.
        assert_eq!(p.silence_bound(), Duration::from_secs(16));
        let none = Patience { retries: 0, ..p };
        assert_eq!(none.silence_bound(), Duration::from_secs(3));
    }
}
