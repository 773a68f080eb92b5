//! Clients that check every byte they get, for the crash loop and the soak: what the
//! upstream holds (a [`Catalog`] of digests and bytes), a pull by tag, a blob GET whole or by
//! `Range`, each body hashed or compared, and a [`Tally`] of what came back. A 200 or 206
//! body that ends cleanly with the wrong bytes is the one outcome the suite fails on;
//! errors and bodies cut before their end are counted.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::Rng as _;

use crate::common::images::{sha256_digest, ImageInfo};
use crate::common::read_body;

/// What the upstream holds: manifests and blobs by digest, and the manifests each
/// repository's tags may point at (tags move in the soak).
#[derive(Default)]
pub struct Catalog {
    pub blobs: HashMap<String, Bytes>,
    pub manifests: HashMap<String, Bytes>,
    /// (repository, tag) → the manifest digests it ever pointed at.
    pub tags: HashMap<(String, String), HashSet<String>>,
}

impl Catalog {
    /// Records `img` as what `repo:tag` may point at.
    pub fn add(&mut self, repo: &str, tag: &str, img: &ImageInfo) {
        self.manifests
            .insert(img.manifest_digest.clone(), img.manifest.clone());
        for (d, b) in img.blobs() {
            self.blobs.insert(d, b);
        }
        self.tags
            .entry((repo.to_owned(), tag.to_owned()))
            .or_default()
            .insert(img.manifest_digest.clone());
    }
}

/// Counts of what the clients got.
#[derive(Default)]
pub struct Tally {
    /// Bodies complete and right (200 or 206).
    pub ok: AtomicU64,
    pub bytes: AtomicU64,
    /// Bodies that ended in an error before their last byte (what a client retries).
    pub aborted: AtomicU64,
    /// Answers other than 200/206 (503, 429, 502, 404 ...), and requests that got no answer.
    pub errors: AtomicU64,
    /// Bodies that ended cleanly with wrong bytes: what must never happen.
    pub wrong: Mutex<Vec<String>>,
    /// Time to the last byte of complete manifest GETs and blob GETs.
    pub manifest_latency: Mutex<Vec<Duration>>,
    pub blob_latency: Mutex<Vec<Duration>>,
}

impl Tally {
    pub fn wrong(&self) -> Vec<String> {
        self.wrong.lock().unwrap().clone()
    }

    fn bad(&self, what: String) {
        eprintln!("WRONG BYTES: {what}");
        self.wrong.lock().unwrap().push(what);
    }

    pub fn get(&self, counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// What one GET ended in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Got {
    /// Complete and right.
    Ok,
    /// Cut before its end.
    Aborted,
    /// Another status, or no answer.
    Error,
    /// Ended cleanly with wrong bytes.
    Wrong,
}

pub const ACCEPT: &str = "application/vnd.docker.distribution.manifest.v2+json, \
    application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json";

/// GETs `repo:tag`'s manifest; a 200 body must be one of the manifests the tag pointed at.
/// Returns its digest when right.
pub async fn get_manifest(
    client: &reqwest::Client,
    base: &str,
    cat: &Catalog,
    tally: &Tally,
    repo: &str,
    tag: &str,
) -> Option<String> {
    let started = Instant::now();
    let resp = match client
        .get(format!("{base}/v2/{repo}/manifests/{tag}"))
        .header("accept", ACCEPT)
        .send()
        .await
    {
        Ok(r) if r.status() == 200 => r,
        _ => {
            tally.errors.fetch_add(1, Ordering::Relaxed);
            return None;
        }
    };
    let header = resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = match read_body(resp).await {
        Ok(b) => b,
        Err(_) => {
            tally.aborted.fetch_add(1, Ordering::Relaxed);
            return None;
        }
    };
    let digest = sha256_digest(&body);
    let allowed = cat
        .tags
        .get(&(repo.to_owned(), tag.to_owned()))
        .is_some_and(|s| s.contains(&digest));
    if !allowed || header.as_ref().is_some_and(|h| *h != digest) {
        tally.bad(format!(
            "{repo}:{tag}: a manifest of {} bytes hashing to {digest} (header {header:?}) is not one the tag pointed at",
            body.len()
        ));
        return None;
    }
    tally.ok.fetch_add(1, Ordering::Relaxed);
    tally.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
    tally
        .manifest_latency
        .lock()
        .unwrap()
        .push(started.elapsed());
    Some(digest)
}

/// The config and layer digests of an image manifest.
pub fn blobs_of(manifest: &[u8]) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_slice(manifest).expect("manifest JSON");
    let mut out = vec![v["config"]["digest"].as_str().expect("config").to_owned()];
    for l in v["layers"].as_array().expect("layers") {
        out.push(l["digest"].as_str().expect("layer digest").to_owned());
    }
    out
}

/// GETs blob `digest` of `repo`, whole or (`range`, inclusive) a part of it, and checks
/// the bytes: a 200 must be the whole blob, a 206 the part asked for.
pub async fn get_blob(
    client: &reqwest::Client,
    base: &str,
    cat: &Catalog,
    tally: &Tally,
    repo: &str,
    digest: &str,
    range: Option<(u64, u64)>,
) -> Got {
    let want = cat.blobs.get(digest).expect("a blob of the catalog");
    let started = Instant::now();
    let mut req = client.get(format!("{base}/v2/{repo}/blobs/{digest}"));
    if let Some((a, b)) = range {
        req = req.header("range", format!("bytes={a}-{b}"));
    }
    let resp = match req.send().await {
        Ok(r) if r.status() == 200 || (r.status() == 206 && range.is_some()) => r,
        _ => {
            tally.errors.fetch_add(1, Ordering::Relaxed);
            return Got::Error;
        }
    };
    let partial = resp.status() == 206;
    let body = match read_body(resp).await {
        Ok(b) => b,
        Err(_) => {
            tally.aborted.fetch_add(1, Ordering::Relaxed);
            return Got::Aborted;
        }
    };
    let expected: &[u8] = match range {
        Some((a, b)) if partial => &want[a as usize..=(b as usize).min(want.len() - 1)],
        _ => want,
    };
    if body != expected {
        tally.bad(format!(
            "{repo}@{digest} (range {range:?}, status {}): {} bytes ended cleanly, {} expected, {}",
            if partial { 206 } else { 200 },
            body.len(),
            expected.len(),
            if body.len() == expected.len() {
                "same length, different bytes"
            } else {
                "wrong length"
            }
        ));
        return Got::Wrong;
    }
    tally.ok.fetch_add(1, Ordering::Relaxed);
    tally.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
    if range.is_none() {
        tally.blob_latency.lock().unwrap().push(started.elapsed());
    }
    Got::Ok
}

/// Pulls `repo:tag` like a client: the manifest, then each blob it names (a random part of
/// one in `range_share` of the GETs). Whether every answer was complete and right.
pub async fn pull(
    client: &reqwest::Client,
    base: &str,
    cat: &Catalog,
    tally: &Tally,
    repo: &str,
    tag: &str,
    range_share: f64,
) -> bool {
    let Some(digest) = get_manifest(client, base, cat, tally, repo, tag).await else {
        return false;
    };
    let manifest = cat.manifests[&digest].clone();
    let mut all = true;
    for d in blobs_of(&manifest) {
        let range = {
            let mut rng = rand::thread_rng();
            let len = cat.blobs[&d].len() as u64;
            (len > 1 && rng.gen_bool(range_share)).then(|| {
                let a = rng.gen_range(0..len);
                (a, rng.gen_range(a..len))
            })
        };
        all &= get_blob(client, base, cat, tally, repo, &d, range).await == Got::Ok;
    }
    all
}
