//! Air-gap bundles: `export` writes cached images as an OCI image layout
//! archive (what `skopeo copy oci-archive:bundle.tar:TAG` reads); `import`
//! loads one into a stopped mirror's cache, verifying every digest before
//! anything is committed, so a damaged bundle leaves the cache as it was
//! (in `bundle/import.rs`).

mod import;
pub use import::{import, ImportReport};

use std::collections::{BTreeMap, HashSet};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde_json::json;

use crate::cache::store::disk::DiskStore;
use crate::cache::store::local_index::LocalIndex;
use crate::cache::store::{BlobStore, Index, StoredManifest};
use crate::config::Config;
use crate::imageref::ImageRef;
use crate::manifest::{self, OCI_INDEX};
use crate::reference::{Digest, Reference, RepoName, Tag};
use crate::registry::INDEX_FILE;
use crate::routing::Router;

/// The annotation naming the image (`<registry>/<repo>:<tag>`) a bundle
/// entry came from, so `import` can recreate the tag.
pub const IMAGE_ANNOTATION: &str = "io.regmirror.image";
const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// Marks an index `export` made around a Docker-format manifest.
pub const WRAPPER_ANNOTATION: &str = "io.regmirror.wrapper";

fn err(msg: impl Into<String>) -> io::Error {
    io::Error::other(msg.into())
}

fn router(config: &Config) -> Router {
    Router::new(config.all_upstreams().map(|u| u.name.clone()).collect())
}

/// One image to put in a bundle.
struct Entry {
    key: RepoName,
    tag: Tag,
    digest: Digest,
    manifest: StoredManifest,
}

/// Writes `images` from the cache under `config.data_dir` to `out` as an OCI
/// layout tar. Child manifests of an index that are not cached (platforms
/// never pulled) are left out with a warning; everything else must be cached.
pub async fn export(config: &Config, images: &[ImageRef], out: &Path) -> io::Result<Vec<String>> {
    let disk = DiskStore::open(&config.data_dir)?;
    let index = LocalIndex::load(&config.data_dir.join(INDEX_FILE), disk.scan().await?);
    let router = router(config);
    let mut entries = Vec::new();
    let mut seen_tags = HashSet::new();
    for image in images {
        let route = router
            .route(&image.routed_name(), None)
            .map_err(|e| err(format!("{image}: {e}")))?;
        let (tag, digest) = match &image.reference {
            Reference::Tag(t) => {
                let entry = index.tag(&route.key, t).await.ok_or_else(|| {
                    err(format!(
                        "{image}: not in the cache (pull or prefetch it first)"
                    ))
                })?;
                (t.clone(), entry.digest)
            }
            Reference::Digest(d) => {
                let tag = Tag::parse(&format!("{}-{}", d.algorithm().as_str(), &d.hex()[..12]))
                    .map_err(|e| err(e.to_string()))?;
                (tag, d.clone())
            }
        };
        if !seen_tags.insert(tag.clone()) {
            return Err(err(format!(
                "two images share the tag {tag}; oci-archive names images by tag alone, so export them to separate bundles"
            )));
        }
        let manifest = disk
            .get_manifest(&digest)
            .await?
            .ok_or_else(|| err(format!("{image}: manifest {digest} is not in the cache")))?;
        entries.push(Entry {
            key: route.key,
            tag,
            digest,
            manifest,
        });
    }
    let mut warnings = Vec::new();
    let mut blobs: BTreeMap<Digest, Kind> = BTreeMap::new();
    for e in &entries {
        collect(&disk, &e.digest, &e.manifest, &mut blobs, &mut warnings).await?;
    }
    let file = std::fs::File::create(out).map_err(|x| err(format!("{}: {x}", out.display())))?;
    let mut tar = tar::Builder::new(io::BufWriter::new(file));
    append(&mut tar, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    // skopeo finds a tag in index.json only on OCI manifests and indexes; a
    // Docker-format image is listed through a one-entry OCI index (marked, so
    // `import` tags the Docker manifest itself and keeps upstream's digest).
    let mut descriptors = Vec::new();
    for e in &entries {
        let mut annotations = json!({
            REF_NAME: e.tag.as_str(),
            IMAGE_ANNOTATION: format!("{}:{}", e.key, e.tag),
        });
        let own = json!({
            "mediaType": e.manifest.media_type,
            "digest": e.digest.to_string(),
            "size": e.manifest.bytes.len(),
        });
        if e.manifest.media_type.starts_with("application/vnd.oci.") {
            let mut d = own;
            d["annotations"] = annotations;
            descriptors.push(d);
            continue;
        }
        let mut child = own;
        if let Some(platform) = platform_of(&disk, &e.manifest).await? {
            child["platform"] = platform;
        }
        let wrapper = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [child]})
            .to_string()
            .into_bytes();
        let wrapper_digest = crate::hashing::digest_of(e.digest.algorithm(), &wrapper);
        annotations[WRAPPER_ANNOTATION] = json!("true");
        descriptors.push(json!({
            "mediaType": OCI_INDEX,
            "digest": wrapper_digest.to_string(),
            "size": wrapper.len(),
            "annotations": annotations,
        }));
        blobs.insert(wrapper_digest, Kind::Manifest(wrapper.into()));
    }
    let index_json =
        json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}).to_string();
    append(&mut tar, "index.json", index_json.as_bytes())?;
    for (digest, kind) in &blobs {
        let path = format!("blobs/{}/{}", digest.algorithm().as_str(), digest.hex());
        match kind {
            Kind::Manifest(bytes) => append(&mut tar, &path, bytes)?,
            Kind::Blob => {
                let blob = disk
                    .open_blob(digest)
                    .await?
                    .ok_or_else(|| err(format!("blob {digest} vanished from the cache")))?;
                let mut header = tar::Header::new_gnu();
                header.set_size(blob.size);
                header.set_mode(0o644);
                header.set_cksum();
                tar.append_data(&mut header, &path, blob.reader())?;
            }
        }
    }
    tar.into_inner()?.flush()?;
    Ok(warnings)
}

enum Kind {
    Manifest(bytes::Bytes),
    Blob,
}

/// The `platform` of an image manifest, read from its cached config blob.
async fn platform_of(
    disk: &DiskStore,
    m: &StoredManifest,
) -> io::Result<Option<serde_json::Value>> {
    let v: serde_json::Value = serde_json::from_slice(&m.bytes).map_err(|e| err(e.to_string()))?;
    let Some(config) = v
        .pointer("/config/digest")
        .and_then(|d| d.as_str())
        .and_then(|d| Digest::parse(d).ok())
    else {
        return Ok(None);
    };
    let Some(blob) = disk.open_blob(&config).await? else {
        return Ok(None);
    };
    let mut raw = vec![0u8; usize::try_from(blob.size.min(1 << 20)).unwrap_or(0)];
    blob.file.read_exact_at(&mut raw, 0)?;
    let c: serde_json::Value = serde_json::from_slice(&raw).unwrap_or_default();
    let (Some(os), Some(arch)) = (c.get("os"), c.get("architecture")) else {
        return Ok(None);
    };
    let mut p = json!({"os": os, "architecture": arch});
    if let Some(variant) = c.get("variant") {
        p["variant"] = variant.clone();
    }
    Ok(Some(p))
}

/// Everything `digest`'s manifest needs, recursively.
async fn collect(
    disk: &DiskStore,
    digest: &Digest,
    m: &StoredManifest,
    out: &mut BTreeMap<Digest, Kind>,
    warnings: &mut Vec<String>,
) -> io::Result<()> {
    out.insert(digest.clone(), Kind::Manifest(m.bytes.clone()));
    let v: serde_json::Value =
        serde_json::from_slice(&m.bytes).map_err(|e| err(format!("{digest}: {e}")))?;
    if let Some(children) = v.get("manifests").and_then(|x| x.as_array()) {
        for c in children {
            let Some(d) = c
                .get("digest")
                .and_then(|d| d.as_str())
                .and_then(|d| Digest::parse(d).ok())
            else {
                continue;
            };
            match disk.get_manifest(&d).await? {
                Some(child) => Box::pin(collect(disk, &d, &child, out, warnings)).await?,
                None => warnings.push(format!(
                    "{digest}: child manifest {d} is not cached; left out"
                )),
            }
        }
        return Ok(());
    }
    for d in manifest::references(&m.bytes) {
        if disk.open_blob(&d).await?.is_none() {
            return Err(err(format!(
                "{digest}: blob {d} is not cached (prefetch the image first)"
            )));
        }
        out.entry(d).or_insert(Kind::Blob);
    }
    Ok(())
}

fn append<W: Write>(tar: &mut tar::Builder<W>, path: &str, data: &[u8]) -> io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    tar.append_data(&mut header, path, data)
}
