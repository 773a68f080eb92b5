//! Air-gap bundles: `export` writes cached images as an OCI image layout
//! archive (what `skopeo copy oci-archive:bundle.tar:TAG` reads); `import`
//! loads one into a stopped mirror's cache, verifying every digest before
//! anything is committed, so a damaged bundle leaves the cache as it was.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::SystemTime;

use serde_json::json;

use crate::config::Config;
use crate::hashing::Hasher;
use crate::imageref::ImageRef;
use crate::manifest::{self, OCI_INDEX};
use crate::reference::{Digest, Reference, RepoName, Tag};
use crate::registry::INDEX_FILE;
use crate::routing::Router;
use crate::store::disk::{DiskStore, Parked};
use crate::store::local_index::LocalIndex;
use crate::store::{BlobStore, ContentKey, Index, StoredManifest, TagEntry};

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

/// What `import` loaded.
#[derive(Debug, Default)]
pub struct ImportReport {
    pub images: Vec<String>,
    pub blobs: usize,
    pub bytes: u64,
}

/// Loads a bundle into the cache of a stopped mirror. Every file is hashed
/// against its name first; only when all match and every image is complete
/// is anything committed.
pub async fn import(config: &Config, bundle: &Path) -> io::Result<ImportReport> {
    let disk = DiskStore::open(&config.data_dir)?;
    let _lock = disk.try_lock()?.ok_or_else(|| {
        err(format!(
            "{} is in use by a running mirror; stop it to import",
            config.data_dir.display()
        ))
    })?;
    let index = LocalIndex::load(&config.data_dir.join(INDEX_FILE), disk.scan().await?);
    let file =
        std::fs::File::open(bundle).map_err(|e| err(format!("{}: {e}", bundle.display())))?;
    let mut archive = tar::Archive::new(io::BufReader::new(file));
    // Staged files are parked (closed): a bundle may hold more blobs than
    // the process may have files open.
    let mut staged: HashMap<Digest, (Parked, u64)> = HashMap::new();
    let mut index_json: Option<serde_json::Value> = None;
    for entry in archive.entries()? {
        let mut entry = entry.map_err(|e| err(format!("damaged bundle: {e}")))?;
        let path = entry
            .path()?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_owned();
        if path == "index.json" {
            let mut raw = Vec::new();
            entry.read_to_end(&mut raw)?;
            index_json =
                Some(serde_json::from_slice(&raw).map_err(|e| err(format!("index.json: {e}")))?);
            continue;
        }
        let Some(rest) = path.strip_prefix("blobs/") else {
            continue;
        };
        let Some((alg, hex)) = rest.split_once('/') else {
            continue;
        };
        let digest = Digest::parse(&format!("{alg}:{hex}"))
            .map_err(|_| err(format!("damaged bundle: {path} is not a digest")))?;
        let spool = disk.spool().await?;
        let mut hasher = Hasher::new(digest.algorithm());
        let mut buf = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = entry
                .read(&mut buf)
                .map_err(|e| err(format!("damaged bundle: {path}: {e}")))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            spool.file.write_all_at(&buf[..n], size)?;
            size += n as u64;
        }
        let got = hasher.finish();
        if got != digest {
            return Err(err(format!(
                "damaged bundle: {path} hashes to {got}; nothing was imported"
            )));
        }
        staged.insert(digest, (disk.park(spool).await?, size));
    }
    let index_json =
        index_json.ok_or_else(|| err("damaged bundle: no index.json; nothing was imported"))?;
    let read = |d: &Digest| -> io::Result<Vec<u8>> {
        let (parked, size) = staged.get(d).ok_or_else(|| {
            err(format!(
                "damaged bundle: {d} is missing; nothing was imported"
            ))
        })?;
        let buf = parked.read()?;
        if buf.len() as u64 != *size {
            return Err(err(format!("staged {d} changed size while importing")));
        }
        Ok(buf)
    };
    // Check every image is complete, and learn which files are manifests.
    let mut manifests: Vec<(Digest, String, Vec<u8>)> = Vec::new();
    let mut tags: Vec<(RepoName, Tag, Digest, String)> = Vec::new();
    let mut holds: HashMap<RepoName, Vec<Digest>> = HashMap::new();
    let descriptors = index_json
        .get("manifests")
        .and_then(|m| m.as_array())
        .cloned()
        .unwrap_or_default();
    for desc in descriptors {
        let digest = desc
            .get("digest")
            .and_then(|d| d.as_str())
            .and_then(|d| Digest::parse(d).ok())
            .ok_or_else(|| {
                err("damaged bundle: index.json has a descriptor without a valid digest")
            })?;
        let media_type = desc
            .get("mediaType")
            .and_then(|m| m.as_str())
            .unwrap_or(manifest::OCI_MANIFEST)
            .to_owned();
        let image = desc
            .pointer(&format!("/annotations/{}", IMAGE_ANNOTATION.replace('/', "~1")))
            .and_then(|a| a.as_str())
            .ok_or_else(|| err(format!("{digest}: no {IMAGE_ANNOTATION} annotation (bundles from regmirror export have one)")))?;
        let (key, tag) = image
            .rsplit_once(':')
            .and_then(|(k, t)| Some((RepoName::parse(k).ok()?, Tag::parse(t).ok()?)))
            .ok_or_else(|| {
                err(format!(
                    "{digest}: bad {IMAGE_ANNOTATION} annotation {image:?}"
                ))
            })?;
        // A wrapper `export` made: the image is its one child.
        let wrapped = desc
            .pointer(&format!(
                "/annotations/{}",
                WRAPPER_ANNOTATION.replace('/', "~1")
            ))
            .is_some_and(|a| a == "true");
        let (digest, media_type) = if wrapped {
            let w: serde_json::Value = serde_json::from_slice(&read(&digest)?)
                .map_err(|e| err(format!("{digest}: {e}")))?;
            let child = w.pointer("/manifests/0").cloned().unwrap_or_default();
            let d = child
                .get("digest")
                .and_then(|d| d.as_str())
                .and_then(|d| Digest::parse(d).ok())
                .ok_or_else(|| err(format!("damaged bundle: wrapper {digest} has no child")))?;
            let mt = child
                .get("mediaType")
                .and_then(|m| m.as_str())
                .unwrap_or(manifest::OCI_MANIFEST)
                .to_owned();
            (d, mt)
        } else {
            (digest, media_type)
        };
        let bytes = read(&digest)?;
        let mut held = vec![digest.clone()];
        let v: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| err(format!("{digest}: {e}")))?;
        let mut stack = vec![(digest.clone(), media_type.clone(), bytes, v)];
        while let Some((d, mt, b, v)) = stack.pop() {
            if let Some(children) = v.get("manifests").and_then(|x| x.as_array()) {
                for c in children {
                    let Some(cd) = c
                        .get("digest")
                        .and_then(|x| x.as_str())
                        .and_then(|x| Digest::parse(x).ok())
                    else {
                        continue;
                    };
                    held.push(cd.clone());
                    if !staged.contains_key(&cd) {
                        continue; // a platform left out at export
                    }
                    let cb = read(&cd)?;
                    let cmt = c
                        .get("mediaType")
                        .and_then(|x| x.as_str())
                        .unwrap_or(manifest::OCI_MANIFEST)
                        .to_owned();
                    let cv = serde_json::from_slice(&cb).map_err(|e| err(format!("{cd}: {e}")))?;
                    stack.push((cd, cmt, cb, cv));
                }
            } else {
                for r in manifest::references(&b) {
                    if !staged.contains_key(&r) {
                        return Err(err(format!(
                            "damaged bundle: {d} needs {r}, which is missing; nothing was imported"
                        )));
                    }
                    held.push(r);
                }
            }
            manifests.push((d, mt, b));
        }
        tags.push((key.clone(), tag, digest, media_type));
        holds.entry(key).or_default().extend(held);
    }
    // Commit: manifests to the manifest store, everything else as blobs.
    let now = SystemTime::now();
    let manifest_digests: HashSet<Digest> = manifests.iter().map(|(d, _, _)| d.clone()).collect();
    let mut report = ImportReport::default();
    for (d, media_type, bytes) in manifests {
        let m = StoredManifest {
            media_type,
            bytes: bytes.into(),
        };
        let size = disk.put_manifest(&d, &m).await?;
        index.record(&ContentKey::manifest(&d), size, now).await;
    }
    for (d, (parked, size)) in staged {
        if manifest_digests.contains(&d) {
            continue;
        }
        disk.commit_parked(parked, &d).await?;
        index.record(&ContentKey::blob(&d), size, now).await;
        report.blobs += 1;
        report.bytes += size;
    }
    for (key, tag, digest, media_type) in tags {
        let size = disk
            .get_manifest(&digest)
            .await?
            .map(|m| m.bytes.len() as u64);
        index
            .set_tag(
                &key,
                &tag,
                TagEntry {
                    digest,
                    media_type: Some(media_type),
                    size,
                    checked_at: now,
                },
            )
            .await;
        report.images.push(format!("{key}:{tag}"));
    }
    for (key, digests) in holds {
        index.add_holds(&key, digests).await;
    }
    index.flush_now()?;
    Ok(report)
}
