//! Eviction mechanism: measures what is on disk, asks [`policy`] what to
//! remove, removes it from the store and the index. Readers that have a file
//! open keep streaming it: removal only unlinks.

use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::policy::{self, Budget, Candidate, EvictReason};
use crate::store::{BlobStore, ContentKey, Index, Kind};

/// The budget and idle TTLs eviction works with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub budget: Budget,
    pub blob_idle_ttl: Option<Duration>,
    pub manifest_idle_ttl: Option<Duration>,
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
        let sizes: std::collections::HashMap<&ContentKey, u64> =
            candidates.iter().map(|c| (&c.key, c.size)).collect();
        let chosen = policy::select_evictions(&candidates, usage_before, self.limits.budget, now);
        let mut report = Report {
            usage_before,
            ..Report::default()
        };
        for (key, reason) in chosen {
            let size = sizes.get(&key).copied().unwrap_or(0);
            if let Err(e) = self.store.remove(&key).await {
                tracing::warn!(kind = key.kind.as_str(), digest = %key.digest, error = %e, "cannot evict");
                continue;
            }
            self.index.forget(&key).await;
            tracing::info!(
                kind = key.kind.as_str(),
                digest = %key.digest,
                size,
                reason = reason.as_str(),
                "evicted"
            );
            report.evicted.push((key, size, reason));
        }
        report.usage_after = usage_before.saturating_sub(report.freed());
        Ok(report)
    }

    /// Brings the index in line with the store (files removed by hand or by
    /// `regmirror gc` while the mirror ran).
    pub async fn rescan(&self) -> io::Result<()> {
        let found = self.store.scan().await?;
        self.index.reconcile(found).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hashing::digest_of;
    use crate::reference::{Algorithm, Digest};
    use crate::store::disk::DiskStore;
    use crate::store::local_index::LocalIndex;
    use std::os::unix::fs::FileExt;

    const T0: Duration = Duration::from_secs(1000);

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + T0 + Duration::from_secs(secs)
    }

    /// Commits 100 bytes of `byte` as a blob; returns its digest.
    async fn commit(store: &Arc<dyn BlobStore>, byte: u8) -> Digest {
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
        }
    }

    #[tokio::test]
    async fn evicts_least_recently_used_files_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn BlobStore> = Arc::new(DiskStore::open(dir.path()).unwrap());
        let index: Arc<dyn Index> = Arc::new(LocalIndex::in_memory());
        let mut digests = Vec::new();
        for i in 0..4u8 {
            let d = commit(&store, i).await;
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
        let d = commit(&store, 1).await;
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
}
