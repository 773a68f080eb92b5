//! Pushing to a writable upstream docker-registry over the distribution API, with a push
//! token from our issuer: blobs (a two-step monolithic upload) and manifests by tag or digest.
//! For content the fixture does not have: a second registry's image, referrers artifacts.

use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

use crate::issuer::Issuer;
use crate::upstream::Upstream;

/// Pushes into one repository of one registry.
pub struct Pusher {
    client: reqwest::Client,
    base: String,
    name: String,
    token: String,
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// An OCI descriptor of `bytes` as `media_type`.
pub fn descriptor(media_type: &str, bytes: &[u8]) -> Value {
    json!({"mediaType": media_type, "digest": sha256(bytes), "size": bytes.len()})
}

impl Pusher {
    /// A pusher into repository `name` (e.g. `library/other`) of `upstream`.
    pub fn new(upstream: &Upstream, issuer: &Issuer, name: &str) -> Pusher {
        Pusher {
            client: reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("push client"),
            base: upstream.url(),
            name: name.to_owned(),
            token: issuer.token_for(name, &["pull", "push"]),
        }
    }

    /// Uploads `bytes` as a blob (POST an upload, PUT it with its digest); returns the digest.
    pub async fn blob(&self, bytes: &[u8]) -> String {
        let digest = sha256(bytes);
        let start = self
            .client
            .post(format!("{}/v2/{}/blobs/uploads/", self.base, self.name))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("POST blob upload");
        assert_eq!(
            start.status(),
            202,
            "start of a blob upload to {}",
            self.name
        );
        let location = start
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .expect("upload Location")
            .to_owned();
        let mut url = if location.starts_with('/') {
            format!("{}{location}", self.base)
        } else {
            location
        };
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str(&format!("digest={digest}"));
        let done = self
            .client
            .put(url)
            .bearer_auth(&self.token)
            .header("content-type", "application/octet-stream")
            .body(bytes.to_vec())
            .send()
            .await
            .expect("PUT blob");
        let status = done.status();
        let text = done.text().await.unwrap_or_default();
        assert_eq!(status, 201, "blob upload {digest} to {}: {text}", self.name);
        digest
    }

    /// Puts manifest `bytes` of `media_type` under `reference` (a tag, or its own digest);
    /// returns its digest, checked against the registry's `Docker-Content-Digest`.
    pub async fn manifest(&self, reference: &str, media_type: &str, bytes: &[u8]) -> String {
        let digest = sha256(bytes);
        let resp = self
            .client
            .put(format!(
                "{}/v2/{}/manifests/{reference}",
                self.base, self.name
            ))
            .bearer_auth(&self.token)
            .header("content-type", media_type)
            .body(bytes.to_vec())
            .send()
            .await
            .expect("PUT manifest");
        let status = resp.status();
        let got = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let text = resp.text().await.unwrap_or_default();
        assert_eq!(
            status, 201,
            "manifest PUT {}:{reference}: {text}",
            self.name
        );
        assert_eq!(
            got, digest,
            "the registry's digest of {}:{reference}",
            self.name
        );
        digest
    }
}
