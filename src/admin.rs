//! The cache commands of the CLI (`gc`, `ls`, `du`), working on a data dir
//! whether a mirror is serving it or not. They return data; `main` prints.
//! `gc` collects hosted content only when no mirror serves the data dir;
//! a running mirror is asked to collect its own.
//! [`shared`]: the same on a cluster's shared store.

pub mod shared;

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::cache::evictor::{Evictor, Report};
use crate::cache::store::disk::DiskStore;
use crate::cache::store::local_index::LocalIndex;
use crate::cache::store::{BlobStore, ContentEntry, ContentKey, Index, Kind};
use crate::config::Config;
use crate::manifest;
use crate::reference::{Digest, RepoName, Tag};
use crate::registry::{limits, INDEX_FILE};

/// Temp files untouched this long belong to no live download (a live one
/// writes at least every `upstream.read_timeout`, or fails).
const STALE_TEMP: Duration = Duration::from_secs(3600);

/// What `gc` did.
#[derive(Debug)]
pub struct GcReport {
    /// Whether a serving mirror holds the data dir (then it keeps its own
    /// index, and notices the removals at its next rescan).
    pub mirror_running: bool,
    pub temp_files_removed: usize,
    pub eviction: Report,
    pub hosted: HostedGc,
}

/// What `gc` did to the hosted repositories' content.
#[derive(Debug)]
pub enum HostedGc {
    /// The data dir has none.
    Nothing,
    /// Collected here (no mirror serves the data dir).
    Collected {
        report: crate::hosted::gc::Report,
        uploads_expired: usize,
    },
    /// A mirror serves the data dir: it collects its hosted content itself,
    /// as its pushes commit under a lock only it holds; it was asked to at
    /// its next upkeep (`hosted/collect-requested`), and logs what it removes.
    Requested,
}

/// Runs temp cleanup and eviction now, safely beside a running mirror.
pub async fn gc(config: &Config) -> io::Result<GcReport> {
    let disk = DiskStore::open(&config.data_dir)?;
    let lock = disk.try_lock()?;
    let mirror_running = lock.is_none();
    let temp_files_removed = disk
        .clean_temp(if mirror_running {
            Some(STALE_TEMP)
        } else {
            None
        })
        .await?;
    let index = Arc::new(LocalIndex::load(
        &config.data_dir.join(INDEX_FILE),
        disk.scan().await?,
    ));
    let store: Arc<dyn BlobStore> = Arc::new(disk);
    let evictor = Evictor::new(store, index.clone(), limits(&config.cache));
    let eviction = evictor.run_once(SystemTime::now()).await?;
    if !mirror_running {
        index.flush_now()?;
    }
    Ok(GcReport {
        mirror_running,
        temp_files_removed,
        eviction,
        hosted: gc_hosted(config, mirror_running).await?,
    })
}

/// Collects hosted content of a data dir no mirror serves; beside a running
/// mirror, asks it to (a sweep from here could remove a blob the server
/// has just found present for a push, and not yet linked).
async fn gc_hosted(config: &Config, mirror_running: bool) -> io::Result<HostedGc> {
    // A replica's hosted/ is a copy of the bucket's, and its index is in
    // Redis: replicas do not collect yet.
    if !config.data_dir.join(crate::hosted::DIR).is_dir()
        || config.storage.backend == crate::config::Backend::S3
    {
        return Ok(HostedGc::Nothing);
    }
    if mirror_running {
        if config.hosted.repos.is_empty() {
            // That mirror, configured alike, has no hosted store open.
            return Ok(HostedGc::Nothing);
        }
        crate::hosted::Hosted::request_collection(&config.data_dir)?;
        return Ok(HostedGc::Requested);
    }
    let hosted = crate::hosted::Hosted::open(&config.data_dir, &config.hosted).await?;
    let uploads_expired = hosted.uploads.expire(config.hosted.upload_ttl).await;
    let report = hosted.collect().await?;
    hosted.collection_done();
    Ok(HostedGc::Collected {
        report,
        uploads_expired,
    })
}

/// One cached tag, for `ls`.
#[derive(Debug, Clone)]
pub struct TagRow {
    pub repo: RepoName,
    pub tag: Tag,
    pub digest: Digest,
    /// Bytes of the manifest and the cached content it references.
    pub size: u64,
    pub last_pull: Option<SystemTime>,
}

/// Items and bytes by kind, for `du` (of a data dir, or of a bucket).
#[derive(Debug, Clone, Copy, Default)]
pub struct Tally {
    pub blobs: u64,
    pub blob_bytes: u64,
    pub manifests: u64,
    pub manifest_bytes: u64,
}

impl Tally {
    /// Counts one item of `size` bytes.
    pub fn add(&mut self, kind: Kind, size: u64) {
        match kind {
            Kind::Blob => {
                self.blobs += 1;
                self.blob_bytes += size;
            }
            Kind::Manifest => {
                self.manifests += 1;
                self.manifest_bytes += size;
            }
        }
    }

    pub fn bytes(&self) -> u64 {
        self.blob_bytes + self.manifest_bytes
    }
}

/// Totals, for `du`.
#[derive(Debug, Clone, Default)]
pub struct Usage {
    pub items: Tally,
    pub temp_bytes: u64,
    pub max_size: u64,
}

async fn open_read_only(dir: &Path) -> io::Result<(DiskStore, LocalIndex)> {
    let disk = DiskStore::open(dir)?;
    let index = LocalIndex::load(&dir.join(INDEX_FILE), disk.scan().await?);
    Ok((disk, index))
}

/// Cached repositories and tags, sorted.
pub async fn list(dir: &Path) -> io::Result<Vec<TagRow>> {
    let (disk, index) = open_read_only(dir).await?;
    list_from(&disk, &index).await
}

/// The tags `index` knows whose manifest `store` holds, with the bytes of
/// what they reference that `index` records, sorted.
pub(crate) async fn list_from(store: &dyn BlobStore, index: &dyn Index) -> io::Result<Vec<TagRow>> {
    let contents: HashMap<ContentKey, ContentEntry> = index.contents().await.into_iter().collect();
    let mut rows = Vec::new();
    for (repo, tag, entry) in index.tags().await {
        let mkey = ContentKey::manifest(&entry.digest);
        let Some(m) = store.get_manifest(&entry.digest).await? else {
            continue;
        };
        let mut size = m.stored_size();
        for d in manifest::references(&m.bytes) {
            for kind in [Kind::Blob, Kind::Manifest] {
                let key = ContentKey {
                    kind,
                    digest: d.clone(),
                };
                if let Some(e) = contents.get(&key) {
                    size += e.size;
                }
            }
        }
        rows.push(TagRow {
            repo,
            tag,
            digest: entry.digest,
            size,
            last_pull: contents.get(&mkey).map(|e| e.last_access),
        });
    }
    rows.sort_by(|a, b| (&a.repo, &a.tag).cmp(&(&b.repo, &b.tag)));
    Ok(rows)
}

/// What the cache holds on disk.
pub async fn usage(config: &Config) -> io::Result<Usage> {
    let (disk, index) = open_read_only(&config.data_dir).await?;
    let mut u = Usage {
        temp_bytes: disk.temp_bytes().await?,
        max_size: config.cache.max_size.0,
        ..Usage::default()
    };
    for (key, entry) in index.contents().await {
        u.items.add(key.kind, entry.size);
    }
    Ok(u)
}
