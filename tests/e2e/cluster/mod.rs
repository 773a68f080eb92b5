//! Cluster mode end to end, on real parts: several `regmirror serve` replicas on loopback
//! share one cache (bytes in a Garage bucket, metadata and download leases in Debian's
//! `redis-server`, each replica's data directory a local tier), nginx round-robin in front of
//! them, the token-auth docker-registry upstream behind. Each test is a check an operator or
//! a user of such a cluster makes; upstream requests are counted from the upstream's access
//! log.
//!
//! Needs, besides what the other e2e tests need: `garage` (`cargo install garage --locked`),
//! `redis-server`, `nginx` and `ss` (iproute2). A missing tool fails the tests.
//!
//! # Layout
//! - `garage`, `s3`: Garage (one node, or three), its bucket's counters, a signed S3 client
//!   to look into the bucket.
//! - `redis`, `nginx`: the other shared parts.
//! - `gate`: a TCP proxy in front of the upstream that holds a fill mid-way on demand.
//! - `replicas`: starting replicas; their `/metrics` and `/readyz`.
//! - `world`: one test's upstream + Garage + Redis + replicas + nginx.
//!
//! Tests: `harness` (the parts, without the feature), `pulls` (clients through nginx, a
//! replica on an empty disk, one tag check per TTL), `herd` (48 clients on one cold blob; the
//! lease holder killed mid-way), `budget` (`storage.max_size`), `outages` (Redis down, Garage
//! down, a Garage node lost), `hosted`, `hosted_outages`, `hosted_clients` (pushes to hosted
//! repositories through the cluster, with `raw_push`).

pub mod garage;
pub mod gate;
pub mod nginx;
pub mod raw_push;
pub mod redis;
pub mod replicas;
pub mod s3;
pub mod world;

mod budget;
mod harness;
mod herd;
mod hosted;
mod hosted_clients;
mod hosted_outages;
mod outages;
mod pulls;

use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::StreamExt as _;
use serde_json::json;

use crate::fixture::{Image, Platform};
use crate::oci::OCI_MANIFEST;
use crate::push::{descriptor, Pusher};
use crate::skopeo::{dir_blobs, Skopeo};
use crate::world::World;

/// `len` bytes of noise from `seed` (xorshift64*, seeded through splitmix64 so that nearby
/// seeds give unrelated bytes): the same bytes for the same seed.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    let mut state = (z ^ (z >> 31)) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Pushes a one-layer amd64 image `library/NAME:1` to `pusher`'s registry, its layer `len`
/// bytes of noise from `seed`; returns it as the fixture describes its images.
pub async fn push_image(pusher: &Pusher, name: &str, len: usize, seed: u64) -> Image {
    let layer = noise(len, seed);
    let layer_digest = pusher.blob(&layer).await;
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }))
    .expect("config json");
    let config_digest = pusher.blob(&config).await;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor("application/vnd.oci.image.config.v1+json", &config),
        "layers": [descriptor("application/vnd.oci.image.layer.v1.tar", &layer)],
    }))
    .expect("manifest json");
    let digest = pusher.manifest("1", OCI_MANIFEST, &manifest).await;
    Image {
        name: format!("library/{name}"),
        tag: "1".into(),
        digest: digest.clone(),
        media_type: OCI_MANIFEST.into(),
        platforms: vec![Platform {
            os: "linux".into(),
            arch: "amd64".into(),
            digest,
            config: config_digest,
            layers: vec![layer_digest],
        }],
    }
}

/// skopeo pulls `image` (every platform of an index) through the registry at `via`
/// (`127.0.0.1:PORT`: nginx or one replica) into a directory named after `label`; asserts the
/// digest and the blobs it stored.
pub async fn skopeo_pull(world: &World, via: &str, image: &Image, label: &str) {
    let skopeo = Skopeo::with_mirror(&world.dir(&format!("skopeo-{label}")), via);
    let out = world.dir(&format!("out-{label}"));
    let got = skopeo
        .pull_to_dir(&image.docker_io(), &out, image.is_index())
        .await;
    crate::assert_digest(&format!("skopeo via {via}"), image, &got, &image.digest);
    assert_eq!(
        dir_blobs(&out),
        image.blobs(),
        "blobs skopeo stored for {} pulled via {via}",
        image.name
    );
}

/// sha256 by ring's assembly (reached through rustls, a dependency of the mirror): in a debug
/// build `sha2` hashes about 40 MB/s here, ring about 1.7 GB/s, and the herd hashes gigabytes.
pub struct FastSha256(Box<dyn rustls::crypto::hash::Context>);

impl FastSha256 {
    pub fn start() -> FastSha256 {
        let suite = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256;
        let hash = suite.tls13().expect("a TLS 1.3 suite").common.hash_provider;
        FastSha256(hash.start())
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// `sha256:<hex>`.
    pub fn finish(self) -> String {
        format!("sha256:{}", hex::encode(self.0.finish().as_ref()))
    }
}

/// What one blob GET got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Got {
    /// 200 and a body that ended cleanly: its length and digest.
    Body { len: u64, digest: String },
    /// Another status (and the start of its body).
    Status(u16, String),
    /// No answer, or a body cut off: what went wrong.
    Broken(String),
}

/// `GET URL` of a blob, hashing the body as it streams and adding each chunk's length to
/// `progress`.
pub async fn get_blob(client: &reqwest::Client, url: &str, progress: &AtomicU64) -> Got {
    let resp = match client.get(url).send().await {
        Ok(r) => r,
        Err(e) => return Got::Broken(format!("request: {e}")),
    };
    let status = resp.status().as_u16();
    if status != 200 {
        let text = resp.text().await.unwrap_or_default();
        return Got::Status(status, text.chars().take(300).collect());
    }
    let mut hasher = FastSha256::start();
    let mut len = 0u64;
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(chunk) => {
                hasher.update(&chunk);
                len += chunk.len() as u64;
                progress.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
            Err(e) => return Got::Broken(format!("body cut off after {len} bytes: {e:?}")),
        }
    }
    Got::Body {
        len,
        digest: hasher.finish(),
    }
}

/// `http://ADDR/v2/NAME/blobs/DIGEST`.
pub fn blob_url(addr: &str, name: &str, digest: &str) -> String {
    format!("http://{addr}/v2/{name}/blobs/{digest}")
}

#[test]
fn noise_differs_for_nearby_seeds() {
    let seeds: Vec<Vec<u8>> = (0..4).map(|s| noise(64, 0xb0d6e7 + s)).collect();
    for (i, a) in seeds.iter().enumerate() {
        assert_eq!(a.len(), 64);
        assert!(seeds[i + 1..].iter().all(|b| a != b), "seed {i} repeats");
    }
    assert_eq!(noise(64, 5), noise(64, 5));
}
