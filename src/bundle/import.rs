//! `regmirror import`: a bundle is input it cannot trust. Every file is
//! hashed into a parked spool, `index.json` and each manifest read within a
//! 4 MiB cap, each manifest walked once, its media type and its tag's
//! registry checked, and only then is anything committed.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::SystemTime;

use serde::Deserialize;

use super::{err, IMAGE_ANNOTATION, WRAPPER_ANNOTATION};
use crate::cache::store::disk::{DiskStore, Parked};
use crate::cache::store::local_index::LocalIndex;
use crate::cache::store::{BlobStore, ContentKey, Index, StoredManifest, TagEntry};
use crate::config::Config;
use crate::hashing::Hasher;
use crate::manifest;
use crate::reference::{Digest, RepoName, Tag};
use crate::registry::INDEX_FILE;

/// What `import` loaded.
#[derive(Debug, Default)]
pub struct ImportReport {
    pub images: Vec<String>,
    pub blobs: usize,
    pub bytes: u64,
}

/// Largest `index.json` or manifest an import reads: what the mirror takes
/// from an upstream (distribution's manifest limit too).
const MAX_DOCUMENT: u64 = crate::upstream::MAX_DOCUMENT as u64;
/// (repository, digest) pairs one bundle may add to the index. Each costs
/// work and memory: many repositories tagging one wide index would otherwise
/// cost their product. Real bundles stay far below it.
const MAX_HOLDS: usize = 1 << 20;

/// A bundle the import will not load, because of what it says (not because
/// it is damaged).
fn refused(msg: impl std::fmt::Display) -> io::Error {
    err(format!("refused bundle: {msg}; nothing was imported"))
}

fn damaged(msg: impl std::fmt::Display) -> io::Error {
    err(format!("damaged bundle: {msg}; nothing was imported"))
}

/// At most 100 characters of a string from the bundle, for an error.
fn bounded(s: &str) -> String {
    s.chars().take(100).collect()
}

/// All of `r` if it is at most [`MAX_DOCUMENT`] bytes, else `None`, having
/// read at most one byte more.
fn read_capped(r: impl Read) -> io::Result<Option<Vec<u8>>> {
    let mut raw = Vec::new();
    r.take(MAX_DOCUMENT + 1).read_to_end(&mut raw)?;
    Ok((raw.len() as u64 <= MAX_DOCUMENT).then_some(raw))
}

/// `index.json`, as far as the import reads it.
#[derive(Deserialize)]
struct Layout {
    #[serde(default)]
    manifests: Vec<Described>,
}

/// A descriptor in `index.json` or in an index.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Described {
    digest: Option<String>,
    media_type: Option<String>,
    #[serde(default)]
    annotations: HashMap<String, String>,
}

/// A manifest, as far as the walk reads it: its children if it is an index.
#[derive(Deserialize)]
struct Children {
    manifests: Option<Vec<Described>>,
}

impl Described {
    fn digest(&self) -> Option<Digest> {
        self.digest.as_deref().and_then(|d| Digest::parse(d).ok())
    }

    /// The manifest type it declares (an OCI manifest when it declares
    /// none), which becomes the manifest's `Content-Type` when served.
    fn manifest_type(&self, digest: &Digest) -> io::Result<&'static str> {
        let declared = self.media_type.as_deref().unwrap_or(manifest::OCI_MANIFEST);
        manifest::known_type(declared).ok_or_else(|| {
            refused(format!(
                "manifest {digest} has media type {:?}, which is not a manifest type",
                bounded(declared)
            ))
        })
    }
}

/// The bundle's files, hashed and parked in `tmp/`, by digest.
struct Staged(HashMap<Digest, (Parked, u64)>);

impl Staged {
    fn has(&self, d: &Digest) -> bool {
        self.0.contains_key(d)
    }

    /// The bytes of manifest `d`. Its size is what staging wrote to a file
    /// of ours in the locked data dir, so checking it first bounds the read.
    fn manifest(&self, d: &Digest) -> io::Result<Vec<u8>> {
        let (parked, size) = self
            .0
            .get(d)
            .ok_or_else(|| damaged(format!("{d} is missing")))?;
        if *size > MAX_DOCUMENT {
            return Err(refused(format!(
                "manifest {d} is over {} MiB",
                MAX_DOCUMENT >> 20
            )));
        }
        let buf = parked.read()?;
        if buf.len() as u64 != *size {
            return Err(err(format!("staged {d} changed size while importing")));
        }
        Ok(buf)
    }
}

/// The bundle's manifests, each read and checked once however many indexes
/// name it: walked path by path, an index naming one child a thousand times,
/// nested, costs a thousand to the power of its depth.
#[derive(Default)]
struct Walk {
    /// Each manifest's media type and the digests it points at, once each.
    manifests: HashMap<Digest, (&'static str, Vec<Digest>)>,
}

impl Walk {
    /// Checks `root` and every manifest under it not walked yet: within the
    /// size cap, of a known type, every blob it needs in the bundle.
    fn walk(&mut self, staged: &Staged, root: Digest, media_type: &'static str) -> io::Result<()> {
        let mut todo = vec![(root, media_type)];
        while let Some((d, mt)) = todo.pop() {
            if self.manifests.contains_key(&d) {
                continue;
            }
            let bytes = staged.manifest(&d)?;
            let doc: Children =
                serde_json::from_slice(&bytes).map_err(|e| damaged(format!("{d}: {e}")))?;
            let mut refs = BTreeSet::new();
            if let Some(children) = doc.manifests {
                for c in children {
                    let Some(cd) = c.digest() else { continue };
                    // A child not in the bundle is a platform left out at export.
                    if staged.has(&cd) {
                        let cmt = c.manifest_type(&cd)?;
                        if !self.manifests.contains_key(&cd) && !refs.contains(&cd) {
                            todo.push((cd.clone(), cmt));
                        }
                    }
                    refs.insert(cd);
                }
            } else {
                for r in manifest::references(&bytes) {
                    if !staged.has(&r) {
                        return Err(damaged(format!("{d} needs {r}, which is missing")));
                    }
                    refs.insert(r);
                }
            }
            self.manifests.insert(d, (mt, refs.into_iter().collect()));
        }
        Ok(())
    }

    /// Every digest each repository's tagged manifests reach, each once per
    /// repository, at most [`MAX_HOLDS`] in all.
    fn holds<'a>(
        &self,
        tagged: impl Iterator<Item = (&'a RepoName, &'a Digest)>,
    ) -> io::Result<HashMap<RepoName, HashSet<Digest>>> {
        let mut holds: HashMap<RepoName, HashSet<Digest>> = HashMap::new();
        let mut total = 0usize;
        for (key, root) in tagged {
            let held = holds.entry(key.clone()).or_default();
            let mut todo = vec![root.clone()];
            while let Some(d) = todo.pop() {
                if !held.insert(d.clone()) {
                    continue;
                }
                total += 1;
                if total > MAX_HOLDS {
                    return Err(refused(format!(
                        "its images hold over {MAX_HOLDS} (repository, digest) pairs"
                    )));
                }
                if let Some((_, refs)) = self.manifests.get(&d) {
                    todo.extend(refs.iter().filter(|r| !held.contains(*r)).cloned());
                }
            }
        }
        Ok(holds)
    }
}

/// `key` (`<registry>/<repo>`) if its registry is a configured upstream: the
/// index keys tags by upstream, and a bundle must not set the tags of a
/// registry this mirror does not mirror (nor, under a name it made up, tags
/// no client asks for).
fn configured(key: RepoName, tag: &Tag, upstreams: &[&str]) -> io::Result<RepoName> {
    let Some((registry, _)) = key.split_first() else {
        return Err(refused(format!(
            "{key}:{tag} names no registry (regmirror export writes <registry>/<repo>:<tag>)"
        )));
    };
    if !upstreams.contains(&registry) {
        return Err(refused(format!(
            "{key}:{tag} names registry {registry:?}, which is not a configured upstream \
             (configured: {}; add it as an [[upstreams]] entry to import its images)",
            upstreams.join(", ")
        )));
    }
    Ok(key)
}

/// Loads a bundle into the cache of a stopped mirror. Every file is hashed
/// against its name first; only when all match, every image is complete and
/// every manifest, type and tag is acceptable is anything committed.
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
    let mut layout: Option<Layout> = None;
    for entry in archive.entries()? {
        let mut entry = entry.map_err(|e| err(format!("damaged bundle: {e}")))?;
        let path = entry
            .path()?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_owned();
        if path == "index.json" {
            let raw = read_capped(&mut entry)?
                .ok_or_else(|| refused(format!("index.json is over {} MiB", MAX_DOCUMENT >> 20)))?;
            layout = Some(
                serde_json::from_slice(&raw).map_err(|e| damaged(format!("index.json: {e}")))?,
            );
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
    let layout = layout.ok_or_else(|| damaged("no index.json"))?;
    let staged = Staged(staged);
    let upstreams: Vec<&str> = config.all_upstreams().map(|u| u.name.as_str()).collect();
    // Check every image is complete, and learn which files are manifests.
    let mut walk = Walk::default();
    let mut tags: Vec<(RepoName, Tag, Digest, &'static str)> = Vec::new();
    for desc in layout.manifests {
        let digest = desc
            .digest()
            .ok_or_else(|| damaged("index.json has a descriptor without a valid digest"))?;
        let media_type = desc.manifest_type(&digest)?;
        let image = desc.annotations.get(IMAGE_ANNOTATION).ok_or_else(|| {
            refused(format!(
                "{digest}: no {IMAGE_ANNOTATION} annotation (bundles from regmirror export have one)"
            ))
        })?;
        let (key, tag) = image
            .rsplit_once(':')
            .and_then(|(k, t)| Some((RepoName::parse(k).ok()?, Tag::parse(t).ok()?)))
            .ok_or_else(|| {
                refused(format!(
                    "{digest}: bad {IMAGE_ANNOTATION} annotation {:?}",
                    bounded(image)
                ))
            })?;
        let key = configured(key, &tag, &upstreams)?;
        // A wrapper `export` made: the image is its one child.
        let wrapped = desc
            .annotations
            .get(WRAPPER_ANNOTATION)
            .is_some_and(|a| a == "true");
        let (digest, media_type) = if wrapped {
            let w: Children = serde_json::from_slice(&staged.manifest(&digest)?)
                .map_err(|e| damaged(format!("{digest}: {e}")))?;
            let child = w
                .manifests
                .and_then(|m| m.into_iter().next())
                .ok_or_else(|| damaged(format!("wrapper {digest} has no child")))?;
            let d = child
                .digest()
                .ok_or_else(|| damaged(format!("wrapper {digest} has no child")))?;
            let mt = child.manifest_type(&d)?;
            (d, mt)
        } else {
            (digest, media_type)
        };
        walk.walk(&staged, digest.clone(), media_type)?;
        tags.push((key, tag, digest, media_type));
    }
    let holds = walk.holds(tags.iter().map(|(key, _, d, _)| (key, d)))?;
    // Commit: manifests to the manifest store, everything else as blobs.
    let now = SystemTime::now();
    let mut report = ImportReport::default();
    for (d, (media_type, _)) in &walk.manifests {
        let m = StoredManifest {
            media_type: (*media_type).to_owned(),
            bytes: staged.manifest(d)?.into(),
        };
        let size = disk.put_manifest(d, &m).await?;
        index.record(&ContentKey::manifest(d), size, now).await;
    }
    for (d, (parked, size)) in staged.0 {
        if walk.manifests.contains_key(&d) {
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
                    media_type: Some(media_type.to_owned()),
                    size,
                    checked_at: now,
                },
            )
            .await;
        report.images.push(format!("{key}:{tag}"));
    }
    for (key, digests) in holds {
        index.add_holds(&key, digests.into_iter().collect()).await;
    }
    index.flush_now()?;
    Ok(report)
}
