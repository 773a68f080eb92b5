//! HTTP responses of the registry API: the body type, the headers every
//! answer carries, and the rendering of [`Error`]s. No registry logic.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full, StreamBody};

use crate::error::Error;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

pub const API_VERSION: &str = "Docker-Distribution-API-Version";
pub const CONTENT_DIGEST: &str = "Docker-Content-Digest";

/// Where the bytes of an answer came from, for the request log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Served from the cache.
    Hit,
    /// Fetched from the upstream by this request.
    Miss,
    /// Joined a fetch another request started.
    Coalesced,
    /// Passed through from the upstream, not cached.
    Pass,
    /// Neither: an error or a ping.
    None,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Coalesced => "coalesced",
            Outcome::Pass => "pass",
            Outcome::None => "-",
        }
    }
}

/// A response and how it was produced.
pub struct Reply {
    pub response: Response<Body>,
    pub outcome: Outcome,
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

pub fn full(bytes: Bytes) -> Body {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn stream<S>(s: S) -> Body
where
    S: futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static,
{
    use futures_util::StreamExt;
    BodyExt::boxed_unsync(StreamBody::new(s.map(|r| {
        r.map(http_body::Frame::data)
            .map_err(|e| Box::new(e) as BoxError)
    })))
}

/// A response builder with the headers every answer carries (registry API,
/// errors and operator endpoints alike).
pub fn builder(status: StatusCode) -> http::response::Builder {
    Response::builder()
        .status(status)
        .header(API_VERSION, "registry/2.0")
        // A browser pointed at a blob (bytes the upstream chose) must not
        // guess it is HTML or script and run it under the mirror's origin.
        .header(header::X_CONTENT_TYPE_OPTIONS, NOSNIFF)
}

const NOSNIFF: &str = "nosniff";

/// Renders an error: the JSON envelope (no body for HEAD), its status, and
/// `Retry-After` for rate limits and login backoff.
pub fn error(err: &Error, head: bool) -> Response<Body> {
    let wire = err.wire();
    let json = err.to_json();
    let mut b = builder(wire.status)
        .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
        .header(header::CONTENT_LENGTH, json.len());
    match err {
        Error::TooManyRequests {
            retry_after: Some(r),
        } => {
            if let Ok(v) = HeaderValue::from_str(r) {
                b = b.header(header::RETRY_AFTER, v);
            }
        }
        Error::LoginBackoff { retry_after } => {
            b = b.header(header::RETRY_AFTER, *retry_after);
        }
        Error::UploadRangeInvalid { received } => {
            b = b.header(header::RANGE, upload_range(*received));
        }
        Error::Unauthorized { realm, .. } => {
            let realm = realm.replace(['"', '\\'], "");
            b = b.header(header::WWW_AUTHENTICATE, format!("Basic realm=\"{realm}\""));
        }
        _ => {}
    }
    let body = if head {
        empty()
    } else {
        full(Bytes::from(json))
    };
    b.body(body).unwrap_or_else(|_| fallback())
}

/// The `Range` header of an upload holding `received` bytes: `0-<last>`,
/// and `0-0` for an empty one, as distribution answers.
pub fn upload_range(received: u64) -> String {
    format!("0-{}", received.saturating_sub(1))
}

/// A bare 500 for the impossible case of a response that cannot be built.
pub fn fallback() -> Response<Body> {
    let mut r = Response::new(empty());
    *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    r.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static(NOSNIFF),
    );
    r
}
