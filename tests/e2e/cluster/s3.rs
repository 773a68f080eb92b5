//! A minimal signed S3 client for looking into the bucket as its operator would: list the
//! objects (ListObjectsV2) and the unfinished multipart uploads (ListMultipartUploads), and
//! read an object back, hashing it as it streams; and, for the harness's own check, put an
//! object and begin and abort a multipart upload. Requests are path-style and signed with AWS
//! Signature V4 (the mirror's own `hashing::hmac_sha256`, checked against RFC 4231 there), the payload's hash included.

use futures_util::StreamExt as _;
use regmirror::hashing::hmac_sha256 as hmac;
use sha2::{Digest as _, Sha256};

/// One object of a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Object {
    pub key: String,
    pub size: u64,
}

/// What an object of the shared store is, by its name (the layout of `src/cluster/bucket`:
/// `blobs/<alg>/<hex>`, `manifests/<alg>/<hex>`, `uploads/<alg>-<hex>-<random>.json`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A blob: its bytes are the content of `digest`.
    Blob(String),
    /// A manifest: its media type on the first line, then the bytes of `digest`.
    Manifest(String),
    /// The record of a multipart upload in progress.
    UploadMarker,
    Other,
}

impl Object {
    /// What the object's name says it is.
    pub fn kind(&self) -> Kind {
        let parts: Vec<&str> = self.key.rsplitn(3, '/').collect();
        let digest = match parts.as_slice() {
            [hex, alg, _] | [hex, alg]
                if *alg == "sha256"
                    && hex.len() == 64
                    && hex.bytes().all(|b| b.is_ascii_hexdigit()) =>
            {
                format!("sha256:{hex}")
            }
            _ if self.key.split('/').any(|p| p == "uploads") => return Kind::UploadMarker,
            _ => return Kind::Other,
        };
        let kind = parts
            .get(2)
            .map(|rest| rest.rsplit('/').next().unwrap_or(rest));
        match kind {
            Some("blobs") => Kind::Blob(digest),
            Some("manifests") => Kind::Manifest(digest),
            _ => Kind::Other,
        }
    }

    /// The digest of the blob this object holds, if it is one.
    pub fn blob_digest(&self) -> Option<String> {
        match self.kind() {
            Kind::Blob(d) => Some(d),
            _ => None,
        }
    }
}

pub struct S3 {
    client: reqwest::Client,
    endpoint: String,
    host: String,
    bucket: String,
    region: String,
    access_key: String,
    secret_key: String,
}

/// sha256 of nothing: the payload hash of a request without a body.
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// RFC 3986 encoding as SigV4 wants it: unreserved characters kept, `/` kept when `path`.
fn uri_encode(s: &str, path: bool) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) || (path && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The text of every `<tag>...</tag>` in `xml`, entities decoded.
fn elements(xml: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(start) = rest.find(&open) {
        rest = &rest[start + open.len()..];
        let Some(end) = rest.find(&close) else { break };
        out.push(
            rest[..end]
                .replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&quot;", "\"")
                .replace("&apos;", "'")
                .replace("&amp;", "&"),
        );
        rest = &rest[end + close.len()..];
    }
    out
}

impl S3 {
    /// A client for `bucket` at `endpoint` (`http://127.0.0.1:PORT`).
    pub fn new(endpoint: &str, bucket: &str, region: &str, access: &str, secret: &str) -> S3 {
        S3 {
            client: reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("s3 client"),
            endpoint: endpoint.trim_end_matches('/').to_owned(),
            host: endpoint
                .split("://")
                .nth(1)
                .unwrap_or(endpoint)
                .trim_end_matches('/')
                .to_owned(),
            bucket: bucket.to_owned(),
            region: region.to_owned(),
            access_key: access.to_owned(),
            secret_key: secret.to_owned(),
        }
    }

    /// A signed `GET /BUCKET/KEY?QUERY`.
    async fn get(&self, key: &str, query: &[(&str, &str)]) -> reqwest::Response {
        self.request("GET", key, query, Vec::new()).await
    }

    /// A signed `METHOD /BUCKET/KEY?QUERY` with `body`.
    async fn request(
        &self,
        method: &str,
        key: &str,
        query: &[(&str, &str)],
        body: Vec<u8>,
    ) -> reqwest::Response {
        let path = uri_encode(&format!("/{}/{key}", self.bucket), true);
        let path = if key.is_empty() {
            path.trim_end_matches('/').to_owned()
        } else {
            path
        };
        let mut pairs: Vec<(String, String)> = query
            .iter()
            .map(|(k, v)| (uri_encode(k, false), uri_encode(v, false)))
            .collect();
        pairs.sort();
        let query = pairs
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&");
        let stamp = crate::issuer::rfc3339_now().replace(['-', ':'], "");
        let date = &stamp[..8];
        let signed = "host;x-amz-content-sha256;x-amz-date";
        let payload = if body.is_empty() {
            EMPTY_SHA256.to_owned()
        } else {
            hex::encode(Sha256::digest(&body))
        };
        let canonical = format!(
            "{method}\n{path}\n{query}\nhost:{host}\nx-amz-content-sha256:{payload}\n\
             x-amz-date:{stamp}\n\n{signed}\n{payload}",
            host = self.host
        );
        let scope = format!("{date}/{}/s3/aws4_request", self.region);
        let to_sign = format!(
            "AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{}",
            hex::encode(Sha256::digest(canonical.as_bytes()))
        );
        let mut key = hmac(
            format!("AWS4{}", self.secret_key).as_bytes(),
            date.as_bytes(),
        );
        for part in [self.region.as_str(), "s3", "aws4_request"] {
            key = hmac(&key, part.as_bytes());
        }
        let signature = hex::encode(hmac(&key, to_sign.as_bytes()));
        let url = if query.is_empty() {
            format!("{}{path}", self.endpoint)
        } else {
            format!("{}{path}?{query}", self.endpoint)
        };
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("HTTP method");
        self.client
            .request(method.clone(), &url)
            .header("x-amz-date", &stamp)
            .header("x-amz-content-sha256", &payload)
            .header(
                "authorization",
                format!(
                    "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed}, \
                     Signature={signature}",
                    self.access_key
                ),
            )
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("S3 {method} {url}: {e}"))
    }

    /// Puts `bytes` as object `key` (for checking the harness: the replicas write the bucket).
    pub async fn put(&self, key: &str, bytes: &[u8]) {
        let resp = self.request("PUT", key, &[], bytes.to_vec()).await;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        assert_eq!(status, 200, "S3 PUT /{}/{key}: {text}", self.bucket);
    }

    /// Begins a multipart upload of `key` and leaves it unfinished, as a crashed writer does;
    /// returns its upload id.
    pub async fn begin_multipart(&self, key: &str) -> String {
        let resp = self
            .request("POST", key, &[("uploads", "")], Vec::new())
            .await;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        assert_eq!(
            status, 200,
            "S3 CreateMultipartUpload /{}/{key}: {text}",
            self.bucket
        );
        elements(&text, "UploadId")
            .pop()
            .unwrap_or_else(|| panic!("no UploadId in {text}"))
    }

    /// Aborts multipart upload `id` of `key`.
    pub async fn abort_multipart(&self, key: &str, id: &str) {
        let resp = self
            .request("DELETE", key, &[("uploadId", id)], Vec::new())
            .await;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        assert_eq!(
            status, 204,
            "S3 AbortMultipartUpload /{}/{key}: {text}",
            self.bucket
        );
    }

    /// A GET whose answer must be 200; its body.
    async fn get_text(&self, key: &str, query: &[(&str, &str)]) -> String {
        let resp = self.get(key, query).await;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        assert_eq!(
            status, 200,
            "S3 GET /{}/{key} {query:?}: {text}",
            self.bucket
        );
        text
    }

    /// Every object in the bucket (all pages of ListObjectsV2).
    pub async fn list(&self) -> Vec<Object> {
        let mut objects = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut query = vec![("list-type", "2")];
            if let Some(t) = &token {
                query.push(("continuation-token", t));
            }
            let xml = self.get_text("", &query).await;
            for entry in elements(&xml, "Contents") {
                let key = elements(&entry, "Key").pop().unwrap_or_default();
                let size = elements(&entry, "Size")
                    .pop()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                objects.push(Object { key, size });
            }
            token = elements(&xml, "NextContinuationToken").pop();
            let truncated = elements(&xml, "IsTruncated").pop().as_deref() == Some("true");
            if !truncated || token.is_none() {
                return objects;
            }
        }
    }

    /// The keys of the multipart uploads begun and neither completed nor aborted.
    pub async fn multipart_uploads(&self) -> Vec<String> {
        let xml = self.get_text("", &[("uploads", "")]).await;
        elements(&xml, "Upload")
            .iter()
            .filter_map(|u| elements(u, "Key").pop())
            .collect()
    }

    /// Object `key`'s bytes (for small objects: manifests).
    pub async fn read_bytes(&self, key: &str) -> Vec<u8> {
        let resp = self.get(key, &[]).await;
        let status = resp.status();
        let body = resp.bytes().await.unwrap_or_default();
        assert_eq!(
            status,
            200,
            "S3 GET /{}/{key}: {}",
            self.bucket,
            String::from_utf8_lossy(&body)
        );
        body.to_vec()
    }

    /// Reads object `key` back, returning its length and `sha256:<hex>`.
    pub async fn read(&self, key: &str) -> (u64, String) {
        let resp = self.get(key, &[]).await;
        let status = resp.status();
        if status != 200 {
            let text = resp.text().await.unwrap_or_default();
            panic!("S3 GET /{}/{key}: {status}: {text}", self.bucket);
        }
        let mut hasher = crate::cluster::FastSha256::start();
        let mut len = 0u64;
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.unwrap_or_else(|e| panic!("S3 GET /{}/{key}: {e}", self.bucket));
            len += chunk.len() as u64;
            hasher.update(&chunk);
        }
        (len, hasher.finish())
    }
}

#[test]
fn tells_blobs_manifests_and_markers_by_name() {
    let hex = "ab".repeat(32);
    let obj = |key: &str| Object {
        key: key.to_owned(),
        size: 0,
    };
    let digest = format!("sha256:{hex}");
    for prefix in ["", "team-a/", "a/b/"] {
        assert_eq!(
            obj(&format!("{prefix}blobs/sha256/{hex}")).kind(),
            Kind::Blob(digest.clone())
        );
        assert_eq!(
            obj(&format!("{prefix}manifests/sha256/{hex}")).kind(),
            Kind::Manifest(digest.clone())
        );
        assert_eq!(
            obj(&format!("{prefix}uploads/sha256-{hex}-1f2e.json")).kind(),
            Kind::UploadMarker
        );
    }
    assert_eq!(obj(&format!("harness/sha256/{hex}")).kind(), Kind::Other);
    assert_eq!(obj("blobs/sha256/abc").kind(), Kind::Other);
    assert_eq!(
        obj(&format!("blobs/sha256/{hex}")).blob_digest(),
        Some(digest)
    );
}
