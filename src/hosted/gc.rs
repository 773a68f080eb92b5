//! Garbage collection of hosted content, while the mirror serves and clients
//! push: a mark and sweep over the hosted store and index. Owns what a
//! collection removes; must not touch uploads in progress (not content:
//! [`UploadArea::expire`](super::UploadArea::expire) removes them after
//! `hosted.upload_ttl`) nor the cache's store.
//!
//! A delete drops links (a manifest's by digest with its tags, a tag, a
//! blob's); the bytes stay until a collection finds nothing needs them.
//! **Marked**: every manifest a repository holds or a tag names; every
//! blob a repository holds that was linked, pulled or checked (`HEAD`)
//! within the grace period, `hosted.upload_ttl`; and, recursively, every
//! digest a marked manifest references (config, layers, artifact blobs, an
//! index's children). A subject keeps none of its referrers, nor a referrer
//! its subject. **Swept**: every other item of the hosted index, forgotten
//! (with its links) only if its entry is as the mark saw it, then removed
//! from the store; the index is written at the end. So a deleted image's
//! layers, still linked to its repository, go once nothing used them for
//! the grace period, and a layer another manifest references stays.
//!
//! **The rules that keep pushes in flight whole.** Every path that links
//! content to a repository (an upload's completion, a mount, a manifest's
//! commit) holds [`Hosted::commits`] for reading from its check that the
//! content is there to its link; a collection holds it for writing from its
//! mark to the end of its sweep. A check-and-link so lies wholly before a
//! mark, which then sees the fresh link, or wholly after a sweep, whose
//! removals its check then sees (an upload commits its bytes again, a
//! manifest whose blob is gone is `MANIFEST_BLOB_UNKNOWN`, never stored half
//! resolved). Between a push's blobs and its manifest nothing is held: the
//! grace period keeps the blobs, each refreshed by its link, or by the
//! `HEAD` by which a client found it already there ([`Hosted::seen`], before
//! the answer, and a sweep forgets only an entry unchanged since its mark).
//! Pulls take no lock: a swept item is linked nowhere once forgotten, and a
//! client already reading it keeps its open file. The lock is this
//! process's: `regmirror gc` beside a running mirror does not sweep but asks
//! the mirror (the file [`REQUEST`], honoured by its upkeep), and replicas
//! (a shared store) do not collect yet.

use std::collections::HashSet;
use std::io;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::cache::store::{ContentEntry, ContentKey, Kind};
use crate::manifest;
use crate::reference::{Digest, RepoName};

use super::{Hosted, DIR};

/// The file under `<data_dir>/hosted` by which `regmirror gc` asks the
/// running mirror for a collection; removed once that collection ended.
pub const REQUEST: &str = "collect-requested";

/// Bytes of remembered manifest references (a digest's string is about 80).
const REFERENCES_MEMORY: u64 = 16 * 1024 * 1024;

/// What stored manifests reference, by digest.
pub(super) type References = moka::future::Cache<Digest, Arc<Vec<Digest>>>;

pub(super) fn references_memory() -> References {
    moka::future::Cache::builder()
        .weigher(|_, refs: &Arc<Vec<Digest>>| {
            u32::try_from(80 * (refs.len() + 1)).unwrap_or(u32::MAX)
        })
        .max_capacity(REFERENCES_MEMORY)
        .build()
}

/// What a collection removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Report {
    pub manifests: usize,
    pub blobs: usize,
    /// Bytes the removed items took.
    pub bytes: u64,
    /// Items marked (kept).
    pub kept: usize,
}

impl Report {
    /// Items removed.
    pub fn removed(&self) -> usize {
        self.manifests + self.blobs
    }
}

impl Hosted {
    /// Removes every item nothing needs: see the module's header. An error
    /// reading a manifest stops the collection before it removes anything
    /// (what it references is unknown).
    pub async fn collect(&self) -> io::Result<Report> {
        self.collect_at(SystemTime::now(), self.config.upload_ttl)
            .await
    }

    /// [`collect`](Self::collect) as at `now`, with a grace period of `grace`.
    pub async fn collect_at(&self, now: SystemTime, grace: Duration) -> io::Result<Report> {
        if !self.collects() {
            return Err(io::Error::other(
                "hosted content on replicas is not collected yet: the commit lock is one process's",
            ));
        }
        let report = {
            let _all = self.commits.write().await;
            let contents = self.index.contents().await;
            let marked = self.mark(&contents, now, grace).await?;
            let mut report = Report::default();
            for (key, entry) in contents {
                if marked.contains(&key.digest) {
                    report.kept += 1;
                    continue;
                }
                // Forgotten first (the index never claims what is gone), and
                // only as the mark saw it: a HEAD since then keeps it.
                if !self.index.forget_if(&key, entry).await {
                    report.kept += 1;
                    continue;
                }
                if let Err(e) = self.store.remove(&key).await {
                    // Found again by the scan at the next start, and swept.
                    tracing::warn!(digest = %key.digest, error = %e, "cannot remove hosted content");
                    continue;
                }
                self.verifier.forget(&key.digest).await;
                match key.kind {
                    Kind::Blob => report.blobs += 1,
                    Kind::Manifest => report.manifests += 1,
                }
                report.bytes += entry.size;
            }
            report
        };
        if report.removed() > 0 {
            self.index
                .flush(crate::cache::store::Flush::Changes)
                .await?;
        }
        Ok(report)
    }

    /// The roots (see the module's header) and what marked manifests
    /// reference, recursively. `contents` is the index's.
    async fn mark(
        &self,
        contents: &[(ContentKey, ContentEntry)],
        now: SystemTime,
        grace: Duration,
    ) -> io::Result<HashSet<Digest>> {
        let stored: HashSet<&ContentKey> = contents.iter().map(|(k, _)| k).collect();
        let fresh: HashSet<&Digest> = contents
            .iter()
            .filter(|(_, e)| now.duration_since(e.last_access).unwrap_or_default() < grace)
            .map(|(k, _)| &k.digest)
            .collect();
        let mut queue: Vec<Digest> = Vec::new();
        for repo in self.index.repositories().await {
            for d in self.index.held(&repo).await {
                if stored.contains(&ContentKey::manifest(&d)) || fresh.contains(&d) {
                    queue.push(d);
                }
            }
        }
        queue.extend(
            self.index
                .tags()
                .await
                .into_iter()
                .map(|(_, _, e)| e.digest),
        );
        let mut marked = HashSet::new();
        while let Some(d) = queue.pop() {
            if !marked.insert(d.clone()) {
                continue;
            }
            queue.extend(self.references(&stored, &d).await?.iter().cloned());
        }
        Ok(marked)
    }

    /// What the stored manifest `digest` references (nothing when it is no
    /// stored manifest, or a damaged one: the store removed that).
    async fn references(
        &self,
        stored: &HashSet<&ContentKey>,
        digest: &Digest,
    ) -> io::Result<Arc<Vec<Digest>>> {
        if !stored.contains(&ContentKey::manifest(digest)) {
            return Ok(Arc::default());
        }
        if let Some(refs) = self.references.get(digest).await {
            return Ok(refs);
        }
        let Some(m) = self.store.get_manifest(digest).await? else {
            return Ok(Arc::default());
        };
        let refs = Arc::new(manifest::references(&m.bytes));
        self.references.insert(digest.clone(), refs.clone()).await;
        Ok(refs)
    }

    /// Whether this process may collect: not on replicas, whose pushes
    /// check and link under locks of their own.
    pub fn collects(&self) -> bool {
        !self.shared_store
    }

    /// A client asks `repo` for the blob `digest` (a `HEAD` or `GET`, before
    /// the answer): if the repository holds it, it is in use for another
    /// grace period. A sweep between the check and the touch leaves nothing
    /// to touch, and the answer, which checks again, is then 404.
    pub async fn seen(&self, repo: &RepoName, digest: &Digest) {
        if self.collects() && self.index.holds(repo, digest).await {
            let key = ContentKey::blob(digest);
            self.index.touch(&key, SystemTime::now()).await;
        }
    }

    /// Asks for a collection at the next upkeep (something was deleted).
    pub fn collect_soon(&self) {
        self.collect_soon.store(true, Ordering::Relaxed);
    }

    /// Whether a collection is due besides the schedule: something was
    /// deleted, or `regmirror gc` asked; clears the first.
    pub fn collection_wanted(&self) -> bool {
        let deleted = self.collect_soon.swap(false, Ordering::Relaxed);
        deleted || self.root.join(REQUEST).exists()
    }

    /// Removes `regmirror gc`'s request, once a collection has run.
    pub fn collection_done(&self) {
        match std::fs::remove_file(self.root.join(REQUEST)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                tracing::warn!(error = %e, "cannot remove the hosted collection's request");
            }
            _ => {}
        }
    }

    /// Asks the mirror serving `data_dir` for a collection at its next
    /// upkeep (`regmirror gc` beside a running mirror, which must not sweep
    /// under the server's pushes itself).
    pub fn request_collection(data_dir: &Path) -> io::Result<()> {
        let path = data_dir.join(DIR).join(REQUEST);
        std::fs::File::create(path)?.sync_all()
    }
}

#[cfg(test)]
mod tests;
