//! Narrow interfaces to what the cache keeps: the content-addressed
//! [`BlobStore`] (blob and manifest bytes) and the [`Index`] (which tag points
//! where, which repository holds which digest).
//!
//! The rest of the mirror sees only these traits, so another backend (an
//! S3-compatible object store shared by replicas) can be added beside
//! [`disk::DiskStore`] and [`local_index::LocalIndex`] without touching callers.

pub mod disk;
pub mod local_index;

use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::reference::{Digest, RepoName, Tag};

/// A committed blob open for positional reads.
#[derive(Debug, Clone)]
pub struct BlobFile {
    pub file: Arc<std::fs::File>,
    pub size: u64,
}

impl BlobFile {
    /// Its bytes from the start, as a reader; clones share the open file,
    /// each with its own position.
    pub fn reader(&self) -> BlobReader {
        BlobReader {
            file: self.file.clone(),
            pos: 0,
        }
    }
}

/// Sequential reads of a blob by positional reads of its file.
#[derive(Debug)]
pub struct BlobReader {
    file: Arc<std::fs::File>,
    pos: u64,
}

impl io::Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// A temp file a download writes into before it is verified and committed.
/// Dropping a spool that was not committed removes its file.
#[derive(Debug)]
pub struct Spool {
    pub file: Arc<std::fs::File>,
    path: std::path::PathBuf,
    committed: bool,
}

impl Spool {
    pub(crate) fn new(file: std::fs::File, path: std::path::PathBuf) -> Self {
        Self {
            file: Arc::new(file),
            path,
            committed: false,
        }
    }

    pub(crate) fn path(&self) -> &std::path::Path {
        &self.path
    }

    pub(crate) fn disarm(&mut self) {
        self.committed = true;
    }

    /// Drops a failed download: truncated first, so its space is free at
    /// once even while a reader still has the file open (on a full disk the
    /// next download must not fail for space a dead one holds).
    pub fn discard(self) {
        let _ = self.file.set_len(0);
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A manifest as the upstream sent it, with the media type it was sent as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredManifest {
    pub media_type: String,
    pub bytes: Bytes,
}

/// The two kinds of content the store keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Blob,
    Manifest,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Blob => "blob",
            Kind::Manifest => "manifest",
        }
    }
}

/// One stored item.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ContentKey {
    pub kind: Kind,
    pub digest: Digest,
}

impl ContentKey {
    pub fn blob(digest: &Digest) -> Self {
        Self {
            kind: Kind::Blob,
            digest: digest.clone(),
        }
    }

    pub fn manifest(digest: &Digest) -> Self {
        Self {
            kind: Kind::Manifest,
            digest: digest.clone(),
        }
    }
}

/// An item found in the store by a scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub key: ContentKey,
    /// Bytes it takes on disk.
    pub size: u64,
    pub modified: SystemTime,
}

/// What the index knows of a stored item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentEntry {
    pub size: u64,
    pub last_access: SystemTime,
}

impl StoredManifest {
    /// The bytes a stored manifest takes: its media type line and its bytes.
    pub fn stored_size(&self) -> u64 {
        self.media_type.len() as u64 + 1 + self.bytes.len() as u64
    }
}

/// Content-addressed bytes. Knows files and digests, nothing of repositories
/// or policy. Everything it returns was verified when it was committed.
#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// Opens the committed blob `digest`, if present.
    async fn open_blob(&self, digest: &Digest) -> io::Result<Option<BlobFile>>;
    /// A new, empty spool file for a download.
    async fn spool(&self) -> io::Result<Spool>;
    /// Makes a fully written and verified spool the blob `digest`, durably.
    async fn commit_blob(&self, spool: Spool, digest: &Digest) -> io::Result<()>;
    /// The manifest `digest`, if present and intact.
    async fn get_manifest(&self, digest: &Digest) -> io::Result<Option<StoredManifest>>;
    /// Stores a manifest whose bytes were verified against `digest`; returns
    /// the bytes it takes in the store.
    async fn put_manifest(&self, digest: &Digest, manifest: &StoredManifest) -> io::Result<u64>;
    /// Whether an item is committed, without reading it (its bytes are
    /// checked when it is served).
    async fn contains(&self, key: &ContentKey) -> io::Result<bool>;
    /// Deletes an item; absent is fine. Readers that have it open keep reading.
    async fn remove(&self, key: &ContentKey) -> io::Result<()>;
    /// Every committed item, with the bytes it takes on disk.
    async fn scan(&self) -> io::Result<Vec<Found>>;
    /// Bytes taken by downloads in progress (and crash leftovers).
    async fn temp_bytes(&self) -> io::Result<u64>;
    /// Removes temp files not modified for `older_than` (all when `None`);
    /// returns how many.
    async fn clean_temp(&self, older_than: Option<Duration>) -> io::Result<usize>;
    /// The size and free space of the filesystem holding the store, when it
    /// has one.
    async fn fs_space(&self) -> io::Result<Option<crate::cache::policy::FsSpace>> {
        Ok(None)
    }
}

/// What is known of a tag: where it pointed when last checked upstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagEntry {
    pub digest: Digest,
    pub media_type: Option<String>,
    pub size: Option<u64>,
    pub checked_at: SystemTime,
}

/// Where the index stood when a store scan began, from [`Index::begin_scan`]
/// for the matching [`Index::reconcile`]. Opaque to callers: only the index
/// that issued it gives the number a meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanMark(pub u64);

/// What [`Index::flush`] persists. Access times change on every hit, and a
/// crash that loses some costs only eviction order: they need not be written
/// as often as what is stored, tagged and held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    /// Changes of what is stored, tagged or held (access times ride along).
    Changes,
    /// Those, and access times alone.
    All,
}

/// Metadata of the cache. Knows names, sizes and times, nothing of files.
#[async_trait]
pub trait Index: Send + Sync + 'static {
    async fn tag(&self, repo: &RepoName, tag: &Tag) -> Option<TagEntry>;
    async fn set_tag(&self, repo: &RepoName, tag: &Tag, entry: TagEntry);
    /// Forgets a tag the upstream says is gone.
    async fn remove_tag(&self, repo: &RepoName, tag: &Tag);
    /// Every tag, for listings.
    async fn tags(&self) -> Vec<(RepoName, Tag, TagEntry)>;
    /// The last tag list the upstream gave for a repository.
    async fn tag_list(&self, repo: &RepoName) -> Option<Vec<Tag>>;
    async fn set_tag_list(&self, repo: &RepoName, tags: Vec<Tag>);
    /// Every repository the cache knows something of.
    async fn repositories(&self) -> Vec<RepoName>;
    /// Whether `repo` is known to hold `digest` (so it may be served for it).
    async fn holds(&self, repo: &RepoName, digest: &Digest) -> bool;
    /// Records that `repo` holds these digests.
    async fn add_holds(&self, repo: &RepoName, digests: Vec<Digest>);
    /// The digests `repo` holds (a hosted repository's links).
    async fn held(&self, repo: &RepoName) -> Vec<Digest>;
    /// `repo` no longer holds `digest` (a hosted repository's delete); the
    /// item itself stays until nothing references it.
    async fn drop_hold(&self, repo: &RepoName, digest: &Digest);
    /// Records an item newly stored (a commit or an import) of `size` bytes,
    /// accessed `now`; replaces what was known of it.
    async fn record(&self, key: &ContentKey, size: u64, now: SystemTime);
    /// A hit: the item was accessed `now`. Only updates an entry that is
    /// present, never adds one: the item may have been evicted since the
    /// caller opened its file, and the index must not claim it again.
    async fn touch(&self, key: &ContentKey, now: SystemTime);
    /// The entry of a stored item.
    async fn entry(&self, key: &ContentKey) -> Option<ContentEntry>;
    /// Forgets a stored item (evicted, damaged or gone from the store), and
    /// what only existed for it: its digest's memberships (unless the digest
    /// is still stored as the other kind) and, for a manifest, the tags
    /// pointing at it. [`forget_if`](Index::forget_if) and
    /// [`reconcile`](Index::reconcile) forget the same way.
    async fn forget(&self, key: &ContentKey);
    /// Forgets a stored item only if its entry is still exactly `seen`, as
    /// one atomic step; returns whether it did. A caller acting on an entry
    /// it read earlier (the evictor's snapshot, a hit that found the file
    /// missing) so never undoes a hit or a commit that came in between.
    async fn forget_if(&self, key: &ContentKey, seen: ContentEntry) -> bool;
    /// Every stored item the index knows.
    async fn contents(&self) -> Vec<(ContentKey, ContentEntry)>;
    /// Tells the index that a store scan begins. Until the matching
    /// [`reconcile`](Index::reconcile) the index remembers which items are
    /// recorded or forgotten meanwhile, since the scan may not see those
    /// changes. A newer mark supersedes an older one, whose reconcile then
    /// does nothing (the scans are not expected to overlap).
    async fn begin_scan(&self) -> ScanMark;
    /// Makes the contents match what a store scan begun at `mark` found:
    /// items gone are forgotten, items unknown are added with their
    /// modification time. Items recorded or forgotten since the mark are
    /// left as they are: a commit the scan missed is not forgotten, an
    /// eviction after the scan listed the file is not undone.
    async fn reconcile(&self, mark: ScanMark, found: Vec<Found>);
    /// Persists the index, if it is persistent and changed; access times
    /// alone count as a change only for [`Flush::All`].
    async fn flush(&self, what: Flush) -> io::Result<()>;
}
