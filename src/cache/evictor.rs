//! Eviction mechanism: measures what is on disk (and what its filesystem
//! has free), asks [`policy`] what to remove, removes it from the store and
//! the index. Readers that have a file open keep streaming it: removal only
//! unlinks.

use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::cache::policy::{self, Budget, Candidate, EvictReason};
use crate::cache::store::{BlobStore, ContentEntry, ContentKey, Index, Kind};
use crate::config::MinFree;

/// The budget and idle TTLs eviction works with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub budget: Budget,
    pub blob_idle_ttl: Option<Duration>,
    pub manifest_idle_ttl: Option<Duration>,
    /// What to leave free on the store's filesystem.
    pub min_free: MinFree,
}

/// What one eviction run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub evicted: Vec<(ContentKey, u64, EvictReason)>,
    /// Bytes on disk (items and temp files) before and after.
    pub usage_before: u64,
    pub usage_after: u64,
}

impl Report {
    pub fn freed(&self) -> u64 {
        self.evicted.iter().map(|(_, size, _)| size).sum()
    }
}

pub struct Evictor {
    store: Arc<dyn BlobStore>,
    index: Arc<dyn Index>,
    limits: Limits,
}

impl Evictor {
    pub fn new(store: Arc<dyn BlobStore>, index: Arc<dyn Index>, limits: Limits) -> Self {
        Self {
            store,
            index,
            limits,
        }
    }

    /// Bytes on disk now: every indexed item plus temp files.
    pub async fn usage(&self) -> io::Result<u64> {
        let items: u64 = self
            .index
            .contents()
            .await
            .iter()
            .map(|(_, e)| e.size)
            .sum();
        Ok(items + self.store.temp_bytes().await?)
    }

    /// Evicts what the policy selects at `now`.
    pub async fn run_once(&self, now: SystemTime) -> io::Result<Report> {
        let contents = self.index.contents().await;
        let items: u64 = contents.iter().map(|(_, e)| e.size).sum();
        let usage_before = items + self.store.temp_bytes().await?;
        let budget = self.budget(usage_before).await;
        let candidates: Vec<Candidate<ContentKey>> = contents
            .into_iter()
            .map(|(key, entry)| Candidate {
                idle_ttl: match key.kind {
                    Kind::Blob => self.limits.blob_idle_ttl,
                    Kind::Manifest => self.limits.manifest_idle_ttl,
                },
                key,
                size: entry.size,
                last_access: entry.last_access,
            })
            .collect();
        let seen: std::collections::HashMap<&ContentKey, ContentEntry> = candidates
            .iter()
            .map(|c| {
                let entry = ContentEntry {
                    size: c.size,
                    last_access: c.last_access,
                };
                (&c.key, entry)
            })
            .collect();
        let chosen = policy::select_evictions(&candidates, usage_before, budget, now);
        let mut report = Report {
            usage_before,
            ..Report::default()
        };
        for (key, reason) in chosen {
            let Some(&entry) = seen.get(&key) else {
                continue;
            };
            // The choice was made on a snapshot: forget the item first, and
            // only if nothing pulled or committed it since, then unlink only
            // what was forgotten. A hit that opens the file in between keeps
            // its open file, and its touch finds no entry to bring back.
            if !self.index.forget_if(&key, entry).await {
                tracing::debug!(kind = key.kind.as_str(), digest = %key.digest, "accessed since chosen; kept");
                continue;
            }
            if let Err(e) = self.store.remove(&key).await {
                tracing::warn!(kind = key.kind.as_str(), digest = %key.digest, error = %e, "cannot evict");
                // Still on disk, so the index must know it again.
                self.index.record(&key, entry.size, entry.last_access).await;
                continue;
            }
            tracing::info!(
                kind = key.kind.as_str(),
                digest = %key.digest,
                size = entry.size,
                reason = reason.as_str(),
                "evicted"
            );
            report.evicted.push((key, entry.size, reason));
        }
        report.usage_after = usage_before.saturating_sub(report.freed());
        Ok(report)
    }

    /// The budget with the filesystem's free space taken into account.
    async fn budget(&self, usage: u64) -> Budget {
        match self.store.fs_space().await {
            Ok(Some(space)) => {
                let min_free = self.limits.min_free.bytes(space.size);
                self.limits.budget.on_disk(usage, space, min_free)
            }
            Ok(None) => self.limits.budget,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the cache filesystem's free space");
                self.limits.budget
            }
        }
    }

    /// Brings the index in line with the store (files removed by hand or by
    /// `regmirror gc` while the mirror ran).
    pub async fn rescan(&self) -> io::Result<()> {
        // Commits and evictions go on while the store is scanned; the mark
        // makes the reconcile leave alone what they changed.
        let mark = self.index.begin_scan().await;
        let found = self.store.scan().await?;
        self.index.reconcile(mark, found).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::store::disk::DiskStore;
    use crate::cache::store::local_index::LocalIndex;
    use crate::cache::store::{BlobFile, Flush, Found, ScanMark, Spool, StoredManifest, TagEntry};
    use crate::hashing::digest_of;
    use crate::reference::{Algorithm, Digest};
    use crate::reference::{RepoName, Tag};
    use async_trait::async_trait;
    use std::os::unix::fs::FileExt;
    use std::sync::Mutex;

    const T0: Duration = Duration::from_secs(1000);

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + T0 + Duration::from_secs(secs)
    }

    /// Commits 100 bytes of `byte` as a blob; returns its digest.
    async fn commit(store: &dyn BlobStore, byte: u8) -> Digest {
        let data = vec![byte; 100];
        let d = digest_of(Algorithm::Sha256, &data);
        let spool = store.spool().await.unwrap();
        spool.file.write_all_at(&data, 0).unwrap();
        store.commit_blob(spool, &d).await.unwrap();
        d
    }

    /// Limits that evict everything above `max` bytes, down to 60 % of it.
    fn budget(max: u64) -> Limits {
        Limits {
            budget: Budget::new(max, 90, 60),
            blob_idle_ttl: None,
            manifest_idle_ttl: None,
            min_free: MinFree::Bytes(0),
        }
    }

    /// A client that opened a blob before it was evicted reads it whole.
    #[tokio::test]
    async fn an_evicted_blob_stays_readable_through_an_open_file() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn BlobStore> = Arc::new(DiskStore::open(dir.path()).unwrap());
        let index: Arc<dyn Index> = Arc::new(LocalIndex::in_memory());
        let d = commit(store.as_ref(), 9).await;
        index.record(&ContentKey::blob(&d), 100, at(0)).await;
        let open = store.open_blob(&d).await.unwrap().unwrap();
        let ev = Evictor::new(store.clone(), index.clone(), budget(50));
        let report = ev.run_once(at(10)).await.unwrap();
        assert_eq!(report.evicted.len(), 1);
        assert!(store.open_blob(&d).await.unwrap().is_none(), "not evicted");
        let mut buf = vec![0u8; 100];
        open.file.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf, vec![9u8; 100]);
    }

    #[tokio::test]
    async fn evicts_least_recently_used_files_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn BlobStore> = Arc::new(DiskStore::open(dir.path()).unwrap());
        let index: Arc<dyn Index> = Arc::new(LocalIndex::in_memory());
        let mut digests = Vec::new();
        for i in 0..4u8 {
            let d = commit(store.as_ref(), i).await;
            index
                .record(&ContentKey::blob(&d), 100, at(u64::from(i)))
                .await;
            digests.push(d);
        }
        let ev = Evictor::new(store.clone(), index.clone(), budget(300));
        assert_eq!(ev.usage().await.unwrap(), 400);
        let report = ev.run_once(at(10)).await.unwrap();
        assert_eq!(report.usage_before, 400);
        assert_eq!(report.usage_after, 100);
        let kept: Vec<bool> = {
            let mut v = Vec::new();
            for d in &digests {
                v.push(store.open_blob(d).await.unwrap().is_some());
            }
            v
        };
        assert_eq!(kept, vec![false, false, false, true]);
        assert_eq!(ev.usage().await.unwrap(), 100);
    }

    /// A hit opens the file, the evictor unlinks it, then the hit records
    /// its access: the index must not claim the file again.
    #[tokio::test]
    async fn a_hit_on_a_blob_evicted_meanwhile_does_not_bring_its_entry_back() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn BlobStore> = Arc::new(DiskStore::open(dir.path()).unwrap());
        let index: Arc<dyn Index> = Arc::new(LocalIndex::in_memory());
        let d = commit(store.as_ref(), 1).await;
        let key = ContentKey::blob(&d);
        index.record(&key, 100, at(0)).await;

        let opened = store.open_blob(&d).await.unwrap().unwrap();
        let ev = Evictor::new(store.clone(), index.clone(), budget(50));
        let report = ev.run_once(at(10)).await.unwrap();
        assert_eq!(report.evicted.len(), 1);
        index.touch(&key, at(11)).await;

        assert_eq!(
            index.entry(&key).await,
            None,
            "the index claims a gone file"
        );
        assert!(store.open_blob(&d).await.unwrap().is_none());
        assert_eq!(ev.usage().await.unwrap(), 0);
        // The hit keeps reading its open file.
        let mut buf = [0u8; 100];
        opened.file.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [1u8; 100]);
    }

    /// A local index on which a hit lands right after the next snapshot
    /// (`contents()`) is taken: the race of a pull with an eviction run,
    /// made deterministic.
    struct HitAfterSnapshot {
        inner: LocalIndex,
        hit: Mutex<Option<(ContentKey, SystemTime)>>,
    }

    #[async_trait]
    impl Index for HitAfterSnapshot {
        async fn tag(&self, repo: &RepoName, tag: &Tag) -> Option<TagEntry> {
            self.inner.tag(repo, tag).await
        }
        async fn set_tag(&self, repo: &RepoName, tag: &Tag, entry: TagEntry) {
            self.inner.set_tag(repo, tag, entry).await
        }
        async fn remove_tag(&self, repo: &RepoName, tag: &Tag) {
            self.inner.remove_tag(repo, tag).await
        }
        async fn tags(&self) -> Vec<(RepoName, Tag, TagEntry)> {
            self.inner.tags().await
        }
        async fn tag_list(&self, repo: &RepoName) -> Option<Vec<Tag>> {
            self.inner.tag_list(repo).await
        }
        async fn set_tag_list(&self, repo: &RepoName, tags: Vec<Tag>) {
            self.inner.set_tag_list(repo, tags).await
        }
        async fn repositories(&self) -> Vec<RepoName> {
            self.inner.repositories().await
        }
        async fn holds(&self, repo: &RepoName, digest: &Digest) -> bool {
            self.inner.holds(repo, digest).await
        }
        async fn add_holds(&self, repo: &RepoName, digests: Vec<Digest>) {
            self.inner.add_holds(repo, digests).await
        }
        async fn held(&self, repo: &RepoName) -> Vec<Digest> {
            self.inner.held(repo).await
        }
        async fn drop_hold(&self, repo: &RepoName, digest: &Digest) {
            self.inner.drop_hold(repo, digest).await
        }
        async fn record(&self, key: &ContentKey, size: u64, now: SystemTime) {
            self.inner.record(key, size, now).await
        }
        async fn touch(&self, key: &ContentKey, now: SystemTime) {
            self.inner.touch(key, now).await
        }
        async fn entry(&self, key: &ContentKey) -> Option<ContentEntry> {
            self.inner.entry(key).await
        }
        async fn forget(&self, key: &ContentKey) {
            self.inner.forget(key).await
        }
        async fn forget_if(&self, key: &ContentKey, seen: ContentEntry) -> bool {
            self.inner.forget_if(key, seen).await
        }
        async fn contents(&self) -> Vec<(ContentKey, ContentEntry)> {
            let snapshot = self.inner.contents().await;
            let hit = self.hit.lock().unwrap().take();
            if let Some((key, now)) = hit {
                self.inner.touch(&key, now).await;
            }
            snapshot
        }
        async fn begin_scan(&self) -> ScanMark {
            self.inner.begin_scan().await
        }
        async fn reconcile(&self, mark: ScanMark, found: Vec<Found>) {
            self.inner.reconcile(mark, found).await
        }
        async fn flush(&self, what: Flush) -> io::Result<()> {
            self.inner.flush(what).await
        }
    }

    /// A disk store with faults: removals that fail, or a commit and an
    /// eviction landing while a scan runs (once it has listed the files).
    struct Faulty {
        disk: DiskStore,
        fail_remove: bool,
        during_scan: Mutex<Option<DuringScan>>,
    }

    /// What lands during a scan: a blob of 100 `commit` bytes is committed
    /// and recorded, `evict` is evicted as the evictor does it.
    struct DuringScan {
        index: Arc<dyn Index>,
        commit: u8,
        evict: ContentKey,
    }

    impl Faulty {
        fn new(dir: &std::path::Path) -> Self {
            Self {
                disk: DiskStore::open(dir).unwrap(),
                fail_remove: false,
                during_scan: Mutex::new(None),
            }
        }
    }

    #[async_trait]
    impl BlobStore for Faulty {
        async fn open_blob(&self, digest: &Digest) -> io::Result<Option<BlobFile>> {
            self.disk.open_blob(digest).await
        }
        async fn spool(&self) -> io::Result<Spool> {
            self.disk.spool().await
        }
        async fn commit_blob(&self, spool: Spool, digest: &Digest) -> io::Result<()> {
            self.disk.commit_blob(spool, digest).await
        }
        async fn get_manifest(&self, digest: &Digest) -> io::Result<Option<StoredManifest>> {
            self.disk.get_manifest(digest).await
        }
        async fn contains(&self, key: &ContentKey) -> io::Result<bool> {
            self.disk.contains(key).await
        }
        async fn put_manifest(&self, digest: &Digest, m: &StoredManifest) -> io::Result<u64> {
            self.disk.put_manifest(digest, m).await
        }
        async fn remove(&self, key: &ContentKey) -> io::Result<()> {
            if self.fail_remove {
                return Err(io::Error::new(io::ErrorKind::PermissionDenied, "test"));
            }
            self.disk.remove(key).await
        }
        async fn scan(&self) -> io::Result<Vec<Found>> {
            let listed = self.disk.scan().await?;
            let during = self.during_scan.lock().unwrap().take();
            if let Some(h) = during {
                let d = commit(&self.disk, h.commit).await;
                h.index.record(&ContentKey::blob(&d), 100, at(30)).await;
                let seen = h.index.entry(&h.evict).await.unwrap();
                assert!(h.index.forget_if(&h.evict, seen).await);
                self.disk.remove(&h.evict).await?;
            }
            Ok(listed)
        }
        async fn temp_bytes(&self) -> io::Result<u64> {
            self.disk.temp_bytes().await
        }
        async fn clean_temp(&self, older_than: Option<Duration>) -> io::Result<usize> {
            self.disk.clean_temp(older_than).await
        }
    }

    /// An item pulled between the evictor's snapshot and its removal is
    /// kept: it is no longer the least recently used.
    #[tokio::test]
    async fn an_item_pulled_after_the_snapshot_is_not_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn BlobStore> = Arc::new(DiskStore::open(dir.path()).unwrap());
        let index = Arc::new(HitAfterSnapshot {
            inner: LocalIndex::in_memory(),
            hit: Mutex::new(None),
        });
        let mut keys = Vec::new();
        for i in 0..4u8 {
            let key = ContentKey::blob(&commit(store.as_ref(), i).await);
            index.record(&key, 100, at(u64::from(i))).await;
            keys.push(key);
        }
        // 400 bytes over a 270 high mark: the three oldest are chosen, but
        // the oldest is pulled once the snapshot is taken.
        *index.hit.lock().unwrap() = Some((keys[0].clone(), at(20)));
        let ev = Evictor::new(store.clone(), index.clone(), budget(300));
        let report = ev.run_once(at(10)).await.unwrap();

        let evicted: Vec<&ContentKey> = report.evicted.iter().map(|(k, _, _)| k).collect();
        assert_eq!(
            evicted,
            vec![&keys[1], &keys[2]],
            "the pulled item was evicted"
        );
        assert_eq!(report.freed(), 200);
        assert_eq!(report.usage_after, 200);
        let pulled = index.entry(&keys[0]).await.unwrap();
        assert_eq!(pulled.last_access, at(20));
        assert!(store.open_blob(&keys[0].digest).await.unwrap().is_some());
        assert_eq!(ev.usage().await.unwrap(), 200);
    }

    /// What pulls recorded for an evicted blob and manifest (memberships,
    /// tags, a tag list) goes with them, from memory and from the snapshot;
    /// the membership of a blob not downloaded yet stays.
    #[tokio::test]
    async fn eviction_drops_the_memberships_and_tags_only_the_evicted_items_had() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn BlobStore> = Arc::new(DiskStore::open(dir.path()).unwrap());
        let path = dir.path().join("index.json");
        let index: Arc<dyn Index> = Arc::new(LocalIndex::load(&path, Vec::new()));
        let blob = commit(store.as_ref(), 1).await;
        let bytes = bytes::Bytes::from_static(b"{}");
        let manifest = digest_of(Algorithm::Sha256, &bytes);
        let m = StoredManifest {
            media_type: "application/vnd.oci.image.manifest.v1+json".to_owned(),
            bytes,
        };
        let size = store.put_manifest(&manifest, &m).await.unwrap();
        index.record(&ContentKey::blob(&blob), 100, at(0)).await;
        index
            .record(&ContentKey::manifest(&manifest), size, at(0))
            .await;
        let not_yet = digest_of(Algorithm::Sha256, b"not downloaded");
        let (app, other) = (
            RepoName::parse("app").unwrap(),
            RepoName::parse("other").unwrap(),
        );
        let latest = Tag::parse("latest").unwrap();
        index
            .add_holds(&app, vec![manifest.clone(), blob.clone(), not_yet.clone()])
            .await;
        index.add_holds(&other, vec![blob.clone()]).await;
        let entry = TagEntry {
            digest: manifest.clone(),
            media_type: None,
            size: None,
            checked_at: at(0),
        };
        index.set_tag(&app, &latest, entry).await;
        index.set_tag_list(&other, vec![latest.clone()]).await;

        let ev = Evictor::new(store.clone(), index.clone(), budget(10));
        let report = ev.run_once(at(10)).await.unwrap();
        assert_eq!(report.evicted.len(), 2, "{report:?}");
        assert!(!index.holds(&app, &blob).await);
        assert!(!index.holds(&app, &manifest).await);
        assert!(!index.holds(&other, &blob).await);
        assert_eq!(index.tag(&app, &latest).await, None);
        assert_eq!(index.tag_list(&other).await, None);
        assert!(index.holds(&app, &not_yet).await);
        assert_eq!(index.repositories().await, vec![app.clone()]);

        index.flush(Flush::Changes).await.unwrap();
        let json = std::fs::read_to_string(&path).unwrap();
        for gone in [&blob, &manifest] {
            assert!(!json.contains(gone.hex()), "{gone} in {json}");
        }
        assert!(!json.contains("\"other\""), "{json}");
        assert!(json.contains(not_yet.hex()), "{json}");
    }

    /// A removal that fails leaves the item indexed (it is still on disk)
    /// and is not reported as evicted.
    #[tokio::test]
    async fn a_failed_removal_keeps_the_entry_and_is_not_reported() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn BlobStore> = Arc::new(Faulty {
            fail_remove: true,
            ..Faulty::new(dir.path())
        });
        let index: Arc<dyn Index> = Arc::new(LocalIndex::in_memory());
        let key = ContentKey::blob(&commit(store.as_ref(), 1).await);
        index.record(&key, 100, at(0)).await;
        let before = index.entry(&key).await;

        let ev = Evictor::new(store.clone(), index.clone(), budget(50));
        let report = ev.run_once(at(10)).await.unwrap();
        assert!(report.evicted.is_empty(), "{report:?}");
        assert_eq!(report.usage_after, 100);
        assert_eq!(index.entry(&key).await, before);
        assert!(store.open_blob(&key.digest).await.unwrap().is_some());
    }

    /// A rescan that lists the store before a commit and an eviction land
    /// keeps the commit indexed and the evicted item forgotten.
    #[tokio::test]
    async fn a_rescan_keeps_what_was_committed_or_evicted_while_it_ran() {
        let dir = tempfile::tempdir().unwrap();
        let faulty = Arc::new(Faulty::new(dir.path()));
        let store: Arc<dyn BlobStore> = faulty.clone();
        let index: Arc<dyn Index> = Arc::new(LocalIndex::in_memory());
        let kept = ContentKey::blob(&commit(store.as_ref(), 1).await);
        let evicted = ContentKey::blob(&commit(store.as_ref(), 2).await);
        for key in [&kept, &evicted] {
            index.record(key, 100, at(0)).await;
        }
        *faulty.during_scan.lock().unwrap() = Some(DuringScan {
            index: index.clone(),
            commit: 3,
            evict: evicted.clone(),
        });
        let ev = Evictor::new(store.clone(), index.clone(), budget(1000));
        ev.rescan().await.unwrap();

        let committed = ContentKey::blob(&digest_of(Algorithm::Sha256, &[3u8; 100]));
        assert!(store.open_blob(&committed.digest).await.unwrap().is_some());
        assert!(
            index.entry(&committed).await.is_some(),
            "a commit made during the scan was forgotten"
        );
        assert!(store.open_blob(&evicted.digest).await.unwrap().is_none());
        assert_eq!(
            index.entry(&evicted).await,
            None,
            "an item evicted during the scan was brought back"
        );
        assert!(index.entry(&kept).await.is_some());
        assert_eq!(ev.usage().await.unwrap(), 200);
    }
}
