//! Requests between replicas: `GET /_cluster/blobs/<digest>` asks a replica
//! for a blob it holds or is fetching, signed with `cluster.secret`.
//!
//! The signature is an HMAC-SHA256 over the method, the path and a Unix
//! time, sent in [`TIME_HEADER`] and [`SIGNATURE_HEADER`]; a replica takes
//! it within [`WINDOW`] of its own clock. The secret itself never crosses
//! the network. The endpoint only streams what the replica already has (its
//! local tier, or a download in flight): it never fetches for the caller, so
//! it is no proxy, open or otherwise.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderMap;
use url::Url;

use crate::config::Secret;
use crate::error::Error;
use crate::hashing::{constant_time_eq, hmac_sha256};
use crate::reference::Digest;

/// The peer endpoint's path prefix, on the registry API's listener.
pub const PATH_PREFIX: &str = "/_cluster/blobs/";
pub const TIME_HEADER: &str = "x-regmirror-peer-time";
pub const SIGNATURE_HEADER: &str = "x-regmirror-peer-signature";
/// How far a request's time may be from the receiver's clock.
pub const WINDOW: Duration = Duration::from_secs(60);

/// The path of the peer request for `digest`.
pub fn path(digest: &Digest) -> String {
    format!("{PATH_PREFIX}{digest}")
}

/// A peer request's target, parsed: `None` when `path` is not one.
pub fn parse(path: &str) -> Option<Result<Digest, Error>> {
    let rest = path.strip_prefix(PATH_PREFIX)?;
    Some(Digest::parse(rest).map_err(|e| Error::DigestInvalid(e.to_string())))
}

fn signature(secret: &Secret, method: &str, path: &str, time: u64) -> String {
    let message = format!("{method}\n{path}\n{time}");
    hex::encode(hmac_sha256(secret.expose().as_bytes(), message.as_bytes()))
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Checks a peer request's signature at `now`.
pub fn verify(
    secret: &Secret,
    method: &str,
    path: &str,
    headers: &HeaderMap,
    now: SystemTime,
) -> Result<(), Error> {
    let denied = |why: &str| Error::Denied(format!("peer request refused: {why}"));
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let time: u64 = header(TIME_HEADER)
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| denied("no signature time"))?;
    let sent = header(SIGNATURE_HEADER).ok_or_else(|| denied("no signature"))?;
    if unix(now).abs_diff(time) > WINDOW.as_secs() {
        return Err(denied("signature time too far from this replica's clock"));
    }
    let expected = signature(secret, method, path, time);
    if !constant_time_eq(expected.as_bytes(), sent.as_bytes()) {
        return Err(denied("bad signature"));
    }
    Ok(())
}

/// Sends peer requests.
#[derive(Debug, Clone)]
pub struct PeerClient {
    http: reqwest::Client,
    secret: Secret,
}

impl PeerClient {
    pub fn new(secret: Secret, connect_timeout: Duration) -> Result<Self, Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            // A peer never redirects; following one would send a signed
            // request somewhere else.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| Error::internal("building the peer client", e))?;
        Ok(Self { http, secret })
    }

    /// Asks the replica at `peer` for the blob: its 200 response, whose body
    /// the caller verifies like any other.
    pub async fn get_blob(&self, peer: &Url, digest: &Digest) -> Result<reqwest::Response, Error> {
        let path = path(digest);
        let url = peer
            .join(&path)
            .map_err(|e| Error::internal("a peer URL", e))?;
        let time = unix(SystemTime::now());
        let resp = self
            .http
            .get(url)
            .header(TIME_HEADER, time.to_string())
            .header(
                SIGNATURE_HEADER,
                signature(&self.secret, "GET", &path, time),
            )
            .send()
            .await
            .map_err(|e| Error::UpstreamUnreachable(format!("peer {peer}: {e}")))?;
        match resp.status() {
            reqwest::StatusCode::OK => Ok(resp),
            reqwest::StatusCode::NOT_FOUND => Err(Error::BlobUnknown(format!(
                "peer {peer} no longer has {digest}"
            ))),
            status => Err(Error::UpstreamFailed(format!(
                "peer {peer} answered {status} for {digest}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed(secret: &str, path: &str, time: u64) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(TIME_HEADER, time.to_string().parse().unwrap());
        h.insert(
            SIGNATURE_HEADER,
            signature(&Secret::new(secret), "GET", path, time)
                .parse()
                .unwrap(),
        );
        h
    }

    #[test]
    fn only_a_fresh_signature_with_the_secret_for_this_path_passes() {
        let secret = Secret::new("0123456789abcdef0123");
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let t = unix(now);
        let p = "/_cluster/blobs/sha256:aa";
        assert!(verify(
            &secret,
            "GET",
            p,
            &signed("0123456789abcdef0123", p, t),
            now
        )
        .is_ok());
        assert!(verify(
            &secret,
            "GET",
            p,
            &signed("0123456789abcdef0123", p, t - 30),
            now
        )
        .is_ok());
        // Another secret, another path, another method, too old, unsigned.
        for (headers, method, path) in [
            (signed("another secret of 20", p, t), "GET", p),
            (
                signed("0123456789abcdef0123", "/_cluster/blobs/sha256:bb", t),
                "GET",
                p,
            ),
            (signed("0123456789abcdef0123", p, t), "HEAD", p),
            (signed("0123456789abcdef0123", p, t - 61), "GET", p),
            (HeaderMap::new(), "GET", p),
        ] {
            let e = verify(&secret, method, path, &headers, now).unwrap_err();
            assert!(matches!(e, Error::Denied(_)), "{e:?}");
        }
    }

    #[test]
    fn peer_paths_parse_to_digests_only() {
        let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert_eq!(
            parse(&format!("/_cluster/blobs/{d}"))
                .unwrap()
                .unwrap()
                .to_string(),
            d
        );
        assert!(parse("/_cluster/blobs/../../etc/passwd").unwrap().is_err());
        assert!(parse("/v2/_cluster/blobs/x").is_none());
    }
}
