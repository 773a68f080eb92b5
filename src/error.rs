//! The one error type of the HTTP edge, and the single place that maps each
//! variant to its OCI error code and HTTP status.
//!
//! Upstream failures stay distinguishable from client errors (4xx) and from
//! the mirror's own failures (500): a client seeing 502/503/504 knows the
//! mirror is fine but could not reach or trust the upstream.

use http::StatusCode;

use crate::reference::ParseError;

/// Everything a request can fail with, as the client will be told.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("invalid repository name: {0}")]
    NameInvalid(String),
    #[error("invalid tag: {0}")]
    TagInvalid(String),
    #[error("invalid digest: {0}")]
    DigestInvalid(String),
    #[error("manifest unknown: {0}")]
    ManifestUnknown(String),
    #[error("blob unknown: {0}")]
    BlobUnknown(String),
    #[error("name unknown: {0}")]
    NameUnknown(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("no such endpoint: {0}")]
    NotFound(String),
    #[error("invalid pagination: {0}")]
    PaginationInvalid(String),
    #[error("requested range not satisfiable for a blob of {size} bytes")]
    RangeNotSatisfiable { size: u64 },
    #[error("authentication required: {detail}")]
    Unauthorized { realm: String, detail: String },
    #[error("request URL too long: {0}")]
    UriTooLong(String),
    #[error("upstream rate limit reached")]
    TooManyRequests { retry_after: Option<String> },
    /// A client address past `auth.max_failures`: refused without a check.
    #[error("too many failed logins from this address; retry in {retry_after} s")]
    LoginBackoff { retry_after: u64 },
    #[error("denied: {0}")]
    Denied(String),
    #[error("upstream denied access: {0}")]
    UpstreamDenied(String),
    #[error("upstream failed: {0}")]
    UpstreamFailed(String),
    #[error("upstream unreachable: {0}")]
    UpstreamUnreachable(String),
    #[error("upstream timed out: {0}")]
    UpstreamTimeout(String),
    #[error("the mirror is busy: {0}")]
    Busy(String),
    /// A shared part of the cluster (the bucket) cannot be reached: the
    /// item may well exist, so this is never a 404.
    #[error("shared storage unavailable: {0}")]
    SharedUnavailable(String),
    #[error("blob upload unknown: {0}")]
    BlobUploadUnknown(String),
    #[error("blob upload invalid: {0}")]
    BlobUploadInvalid(String),
    /// A chunk that does not start where the upload ends: 416, and the
    /// client is told how far the upload got.
    #[error("chunk out of order: the upload holds {received} bytes")]
    UploadRangeInvalid { received: u64 },
    #[error("size invalid: {0}")]
    SizeInvalid(String),
    #[error("manifest invalid: {0}")]
    ManifestInvalid(String),
    #[error("manifest references unknown blob: {0}")]
    ManifestBlobUnknown(String),
    /// A request body larger than the mirror takes for it (a manifest).
    #[error("request body too large: {0}")]
    TooLarge(String),
    #[error("internal error: {0}")]
    Internal(String),
}

/// What the wire needs to know about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wire {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: &'static str,
}

impl Error {
    /// The one mapping from error to OCI code and HTTP status.
    pub fn wire(&self) -> Wire {
        let (status, code, message) = match self {
            Error::NameInvalid(_) => (
                StatusCode::BAD_REQUEST,
                "NAME_INVALID",
                "invalid repository name",
            ),
            Error::TagInvalid(_) => (
                StatusCode::BAD_REQUEST,
                "TAG_INVALID",
                "manifest tag did not match URI",
            ),
            Error::DigestInvalid(_) => (
                StatusCode::BAD_REQUEST,
                "DIGEST_INVALID",
                "provided digest did not match uploaded content",
            ),
            Error::ManifestUnknown(_) => (
                StatusCode::NOT_FOUND,
                "MANIFEST_UNKNOWN",
                "manifest unknown",
            ),
            Error::BlobUnknown(_) => (
                StatusCode::NOT_FOUND,
                "BLOB_UNKNOWN",
                "blob unknown to registry",
            ),
            Error::NameUnknown(_) => (
                StatusCode::NOT_FOUND,
                "NAME_UNKNOWN",
                "repository name not known to registry",
            ),
            Error::Unsupported(_) => (
                StatusCode::METHOD_NOT_ALLOWED,
                "UNSUPPORTED",
                "the operation is unsupported",
            ),
            Error::NotFound(_) => (StatusCode::NOT_FOUND, "UNSUPPORTED", "no such endpoint"),
            Error::PaginationInvalid(_) => (
                StatusCode::BAD_REQUEST,
                "PAGINATION_NUMBER_INVALID",
                "invalid number of results requested",
            ),
            Error::RangeNotSatisfiable { .. } => (
                StatusCode::RANGE_NOT_SATISFIABLE,
                "RANGE_INVALID",
                "requested range not satisfiable",
            ),
            Error::Unauthorized { .. } => (
                StatusCode::UNAUTHORIZED,
                "UNAUTHORIZED",
                "authentication required",
            ),
            Error::UriTooLong(_) => (
                StatusCode::URI_TOO_LONG,
                "NAME_INVALID",
                "request URL too long",
            ),
            Error::TooManyRequests { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "TOOMANYREQUESTS",
                "too many requests",
            ),
            Error::LoginBackoff { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "TOOMANYREQUESTS",
                "too many failed logins",
            ),
            Error::Denied(_) => (
                StatusCode::FORBIDDEN,
                "DENIED",
                "requested access to the resource is denied",
            ),
            Error::UpstreamDenied(_) => (
                StatusCode::FORBIDDEN,
                "DENIED",
                "requested access to the resource is denied",
            ),
            Error::UpstreamFailed(_) => (
                StatusCode::BAD_GATEWAY,
                "UNAVAILABLE",
                "upstream registry failed",
            ),
            Error::UpstreamUnreachable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                "upstream registry unreachable",
            ),
            Error::UpstreamTimeout(_) => (
                StatusCode::GATEWAY_TIMEOUT,
                "UNAVAILABLE",
                "upstream registry timed out",
            ),
            Error::Busy(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                "the mirror is busy; retry later",
            ),
            Error::SharedUnavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                "the mirror's shared storage is unreachable; retry later",
            ),
            Error::BlobUploadUnknown(_) => (
                StatusCode::NOT_FOUND,
                "BLOB_UPLOAD_UNKNOWN",
                "blob upload unknown to registry",
            ),
            Error::BlobUploadInvalid(_) => (
                StatusCode::BAD_REQUEST,
                "BLOB_UPLOAD_INVALID",
                "blob upload invalid",
            ),
            Error::UploadRangeInvalid { .. } => (
                StatusCode::RANGE_NOT_SATISFIABLE,
                "BLOB_UPLOAD_INVALID",
                "chunk does not continue the upload",
            ),
            Error::SizeInvalid(_) => (
                StatusCode::BAD_REQUEST,
                "SIZE_INVALID",
                "provided length did not match content length",
            ),
            Error::ManifestInvalid(_) => (
                StatusCode::BAD_REQUEST,
                "MANIFEST_INVALID",
                "manifest invalid",
            ),
            Error::ManifestBlobUnknown(_) => (
                StatusCode::BAD_REQUEST,
                "MANIFEST_BLOB_UNKNOWN",
                "manifest references a blob unknown to the registry",
            ),
            Error::TooLarge(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "SIZE_INVALID",
                "request body too large",
            ),
            Error::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "UNKNOWN",
                "internal error",
            ),
        };
        Wire {
            status,
            code,
            message,
        }
    }

    /// The free-text detail sent to the client (never a secret: callers build it
    /// from parsed identifiers, statuses and I/O error kinds only).
    pub fn detail(&self) -> String {
        match self {
            Error::NameInvalid(d)
            | Error::TagInvalid(d)
            | Error::DigestInvalid(d)
            | Error::ManifestUnknown(d)
            | Error::BlobUnknown(d)
            | Error::NameUnknown(d)
            | Error::Unsupported(d)
            | Error::NotFound(d)
            | Error::PaginationInvalid(d)
            | Error::Denied(d)
            | Error::UpstreamDenied(d)
            | Error::UpstreamFailed(d)
            | Error::UpstreamUnreachable(d)
            | Error::UpstreamTimeout(d)
            | Error::UriTooLong(d)
            | Error::Busy(d)
            | Error::SharedUnavailable(d)
            | Error::BlobUploadUnknown(d)
            | Error::BlobUploadInvalid(d)
            | Error::SizeInvalid(d)
            | Error::ManifestInvalid(d)
            | Error::ManifestBlobUnknown(d)
            | Error::TooLarge(d)
            | Error::Internal(d) => d.clone(),
            Error::UploadRangeInvalid { received } => {
                format!("the upload holds {received} bytes; the next chunk starts there")
            }
            Error::Unauthorized { detail, .. } => detail.clone(),
            Error::RangeNotSatisfiable { size } => format!("blob size is {size}"),
            Error::LoginBackoff { retry_after } => {
                format!("too many failed logins from this address; retry in {retry_after} s")
            }
            Error::TooManyRequests { retry_after } => match retry_after {
                Some(r) => format!("upstream asks to retry after {r}"),
                None => "upstream rate limit reached".to_owned(),
            },
        }
    }

    /// The JSON envelope `{"errors":[{"code","message","detail"}]}`.
    pub fn to_json(&self) -> String {
        let wire = self.wire();
        serde_json::json!({
            "errors": [{
                "code": wire.code,
                "message": wire.message,
                "detail": self.detail(),
            }]
        })
        .to_string()
    }

    /// Whether the upstream is down or refusing service (not a definite
    /// answer about the content): then stale cached data may be served.
    pub fn is_upstream_outage(&self) -> bool {
        matches!(
            self,
            Error::UpstreamFailed(_)
                | Error::UpstreamUnreachable(_)
                | Error::UpstreamTimeout(_)
                | Error::TooManyRequests { .. }
        )
    }

    pub fn internal(context: &str, err: impl std::fmt::Display) -> Self {
        Error::Internal(format!("{context}: {err}"))
    }
}

impl From<ParseError> for Error {
    fn from(e: ParseError) -> Self {
        match e {
            ParseError::Name(_) => Error::NameInvalid(e.to_string()),
            ParseError::Tag(_) => Error::TagInvalid(e.to_string()),
            ParseError::Digest(_) => Error::DigestInvalid(e.to_string()),
            ParseError::Upload(_) => Error::BlobUploadUnknown(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_envelope_names_code_and_detail() {
        let e = Error::DigestInvalid("sha256:totallywrong".into());
        let v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(v["errors"][0]["code"], "DIGEST_INVALID");
        assert_eq!(v["errors"][0]["detail"], "sha256:totallywrong");
        assert_eq!(e.wire().status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn upstream_failures_are_gateway_statuses() {
        assert_eq!(Error::UpstreamFailed("x".into()).wire().status, 502);
        assert_eq!(Error::UpstreamUnreachable("x".into()).wire().status, 503);
        assert_eq!(Error::UpstreamTimeout("x".into()).wire().status, 504);
        assert_eq!(
            Error::TooManyRequests { retry_after: None }.wire().code,
            "TOOMANYREQUESTS"
        );
    }
}
