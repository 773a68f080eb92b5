//! Narrow interfaces to what the cache keeps: the content-addressed
//! [`BlobStore`] (blob and manifest bytes) and the [`Index`] (which tag points
//! where, which repository holds which digest).
//!
//! The rest of the mirror sees only these traits, so another backend (an
//! S3-compatible object store shared by replicas) can be added beside
//! [`disk::DiskStore`] and [`memory::MemoryIndex`] without touching callers.

pub mod disk;
pub mod memory;

use std::io;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

use crate::reference::{Digest, RepoName, Tag};

/// A committed blob open for positional reads.
#[derive(Debug, Clone)]
pub struct BlobFile {
    pub file: Arc<std::fs::File>,
    pub size: u64,
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
    /// Stores a manifest whose bytes were verified against `digest`.
    async fn put_manifest(&self, digest: &Digest, manifest: &StoredManifest) -> io::Result<()>;
}

/// What is known of a tag: where it pointed when last checked upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagEntry {
    pub digest: Digest,
    pub media_type: Option<String>,
    pub size: Option<u64>,
    pub checked_at: SystemTime,
}

/// Metadata of the cache. Knows names and times, nothing of files.
#[async_trait]
pub trait Index: Send + Sync + 'static {
    async fn tag(&self, repo: &RepoName, tag: &Tag) -> Option<TagEntry>;
    async fn set_tag(&self, repo: &RepoName, tag: &Tag, entry: TagEntry);
    /// Whether `repo` is known to hold `digest` (so it may be served for it).
    async fn holds(&self, repo: &RepoName, digest: &Digest) -> bool;
    /// Records that `repo` holds these digests.
    async fn add_holds(&self, repo: &RepoName, digests: Vec<Digest>);
}
