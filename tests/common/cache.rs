//! Support for the cache tests (budget, stale and offline serving, crash recovery): pulling
//! an image like a client, and measuring what the mirror really keeps under its data dir.

use std::path::Path;

use super::images::sha256_digest;
use super::MirrorHandle;

/// The areas of the data dir that count against `cache.max_size`.
pub const CACHE_AREAS: [&str; 3] = ["blobs", "manifests", "tmp"];

/// Pulls `repo:reference` like a client: the manifest, then every blob it names, checking
/// each blob's bytes against its descriptor. Returns the manifest bytes.
pub async fn pull(m: &MirrorHandle, repo: &str, reference: &str) -> bytes::Bytes {
    let manifest = m.get_ok(&format!("/v2/{repo}/manifests/{reference}")).await;
    let v: serde_json::Value = serde_json::from_slice(&manifest).expect("manifest JSON");
    let mut descs = vec![v["config"].clone()];
    descs.extend(v["layers"].as_array().expect("layers").iter().cloned());
    for d in descs {
        let digest = d["digest"].as_str().expect("descriptor digest");
        let body = m.blob(repo, digest).await;
        assert_eq!(
            sha256_digest(&body),
            digest,
            "{repo}: blob bytes match their digest"
        );
        assert_eq!(body.len() as u64, d["size"].as_u64().expect("size"));
    }
    manifest
}

/// Bytes of the regular files under `dir`, recursively; 0 when it does not exist.
pub fn bytes_under(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => bytes_under(&e.path()),
            Ok(m) if m.is_file() => m.len(),
            _ => 0,
        })
        .sum()
}

/// Bytes the cache really takes on disk: the files under `blobs/`, `manifests/` and `tmp/`.
pub fn disk_usage(data_dir: &Path) -> u64 {
    CACHE_AREAS
        .iter()
        .map(|a| bytes_under(&data_dir.join(a)))
        .sum()
}

/// The files in `DATA/tmp` with their sizes.
pub fn temp_files(data_dir: &Path) -> Vec<(String, u64)> {
    let Ok(entries) = std::fs::read_dir(data_dir.join("tmp")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            meta.is_file()
                .then(|| (e.file_name().to_string_lossy().into_owned(), meta.len()))
        })
        .collect()
}
