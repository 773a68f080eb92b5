//! The [`Index`] of one mirror process: hash maps in memory, persisted as a
//! JSON snapshot (`index.json` in the data dir) written atomically when it
//! changed, on a timer and at shutdown, on the blocking pool. At start the snapshot is loaded and
//! reconciled with a scan of the store, so a crash loses at most the access
//! times since the last flush, never the truth about what is on disk.

use std::collections::{HashMap, HashSet};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{ContentEntry, ContentKey, Found, Index, ScanMark, TagEntry};
use crate::reference::{Digest, RepoName, Tag};

/// The snapshot format's version; a snapshot of another version is ignored.
const VERSION: u32 = 1;

#[derive(Debug, Default)]
struct State {
    contents: HashMap<ContentKey, ContentEntry>,
    tags: HashMap<(RepoName, Tag), TagEntry>,
    holds: HashMap<RepoName, HashSet<Digest>>,
    tag_lists: HashMap<RepoName, Vec<Tag>>,
    /// How many scans have begun: the number of the latest mark.
    scans_begun: u64,
    /// The scan in progress, if any.
    scan: Option<Scan>,
}

/// A store scan in progress: the items whose presence changed since it began.
#[derive(Debug)]
struct Scan {
    mark: u64,
    changed: HashSet<ContentKey>,
}

impl State {
    /// Notes that `key` was recorded or forgotten, for the scan in progress.
    fn changed(&mut self, key: &ContentKey) {
        if let Some(scan) = &mut self.scan {
            scan.changed.insert(key.clone());
        }
    }

    /// Makes the contents match `found`, except the items in `keep`.
    fn reconcile(&mut self, found: Vec<Found>, keep: &HashSet<ContentKey>) {
        let present: HashSet<&ContentKey> = found.iter().map(|f| &f.key).collect();
        self.contents
            .retain(|k, _| present.contains(k) || keep.contains(k));
        // A known item keeps its recorded size: a file whose size changed on
        // disk is then caught as damaged before it is served.
        for f in found {
            if !keep.contains(&f.key) {
                self.contents.entry(f.key).or_insert(ContentEntry {
                    size: f.size,
                    last_access: f.modified,
                });
            }
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Snapshot {
    version: u32,
    contents: Vec<(ContentKey, ContentEntry)>,
    tags: Vec<(RepoName, Tag, TagEntry)>,
    holds: Vec<(RepoName, Vec<Digest>)>,
    #[serde(default)]
    tag_lists: Vec<(RepoName, Vec<Tag>)>,
}

#[derive(Debug, Default)]
pub struct LocalIndex {
    /// Shared with a flush running on the blocking pool.
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    path: Option<PathBuf>,
    state: Mutex<State>,
    dirty: AtomicBool,
    /// Held by a flush from its snapshot to its rename: two at once would
    /// write the same temp file, or put an older snapshot over a newer one.
    writing: Mutex<()>,
}

impl LocalIndex {
    /// An index that is never persisted.
    pub fn in_memory() -> Self {
        Self::default()
    }

    /// Loads the snapshot at `path` (missing or unreadable: start empty, with
    /// a warning) and reconciles it with what the store holds.
    pub fn load(path: &Path, found: Vec<Found>) -> Self {
        let mut state = match std::fs::read(path) {
            Ok(raw) => match serde_json::from_slice::<Snapshot>(&raw) {
                Ok(s) if s.version == VERSION => State {
                    contents: s.contents.into_iter().collect(),
                    tags: s.tags.into_iter().map(|(r, t, e)| ((r, t), e)).collect(),
                    holds: s
                        .holds
                        .into_iter()
                        .map(|(r, d)| (r, d.into_iter().collect()))
                        .collect(),
                    tag_lists: s.tag_lists.into_iter().collect(),
                    ..State::default()
                },
                Ok(_) | Err(_) => {
                    tracing::warn!(path = %path.display(), "index snapshot unreadable; rebuilding from the store");
                    State::default()
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => State::default(),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the index snapshot; rebuilding from the store");
                State::default()
            }
        };
        // Nothing else runs yet: the scan is the truth.
        state.reconcile(found, &HashSet::new());
        Self {
            inner: Arc::new(Inner {
                path: Some(path.to_path_buf()),
                state: Mutex::new(state),
                dirty: AtomicBool::new(true),
                writing: Mutex::new(()),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state()
    }

    fn changed(&self) {
        self.inner.changed();
    }

    /// Writes the snapshot if anything changed since the last write, on the
    /// calling thread (for synchronous callers; [`Index::flush`] uses the
    /// blocking pool).
    pub fn flush_now(&self) -> io::Result<()> {
        self.inner.flush_now()
    }
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        // The maps stay valid if a holder panicked.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn changed(&self) {
        self.dirty.store(true, Ordering::Relaxed);
    }

    fn flush_now(&self) -> io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        // Guards no data, so a panicked holder leaves nothing to repair.
        let _writing = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        let snapshot = {
            let st = self.state();
            Snapshot {
                version: VERSION,
                contents: st.contents.iter().map(|(k, v)| (k.clone(), *v)).collect(),
                tags: st
                    .tags
                    .iter()
                    .map(|((r, t), e)| (r.clone(), t.clone(), e.clone()))
                    .collect(),
                holds: st
                    .holds
                    .iter()
                    .map(|(r, d)| (r.clone(), d.iter().cloned().collect()))
                    .collect(),
                tag_lists: st
                    .tag_lists
                    .iter()
                    .map(|(r, t)| (r.clone(), t.clone()))
                    .collect(),
            }
        };
        let result = write_atomically(path, &snapshot);
        if result.is_err() {
            // Written by the next flush; index.json keeps the last good one.
            self.changed();
        }
        result
    }
}

#[cfg(test)]
thread_local! {
    /// Whether this thread wrote a snapshot (to test where flushes run).
    static WROTE_HERE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn write_atomically(path: &Path, snapshot: &Snapshot) -> io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let write = || -> io::Result<()> {
        #[cfg(test)]
        WROTE_HERE.with(|w| w.set(true));
        // Private like the rest of the cache: it names every repository
        // pulled. Created anew, so a leftover of a crash does not lend it its mode.
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let file = super::disk::private_file()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        let mut f = io::BufWriter::new(file);
        serde_json::to_writer(&mut f, snapshot)?;
        f.flush()?;
        let f = f.into_inner().map_err(io::IntoInnerError::into_error)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    let result = write();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[async_trait]
impl Index for LocalIndex {
    async fn tag(&self, repo: &RepoName, tag: &Tag) -> Option<TagEntry> {
        self.state().tags.get(&(repo.clone(), tag.clone())).cloned()
    }

    async fn set_tag(&self, repo: &RepoName, tag: &Tag, entry: TagEntry) {
        self.state().tags.insert((repo.clone(), tag.clone()), entry);
        self.changed();
    }

    async fn remove_tag(&self, repo: &RepoName, tag: &Tag) {
        self.state().tags.remove(&(repo.clone(), tag.clone()));
        self.changed();
    }

    async fn tags(&self) -> Vec<(RepoName, Tag, TagEntry)> {
        self.state()
            .tags
            .iter()
            .map(|((r, t), e)| (r.clone(), t.clone(), e.clone()))
            .collect()
    }

    async fn tag_list(&self, repo: &RepoName) -> Option<Vec<Tag>> {
        self.state().tag_lists.get(repo).cloned()
    }

    async fn set_tag_list(&self, repo: &RepoName, tags: Vec<Tag>) {
        let mut st = self.state();
        if st.tag_lists.get(repo) != Some(&tags) {
            st.tag_lists.insert(repo.clone(), tags);
            drop(st);
            self.changed();
        }
    }

    async fn repositories(&self) -> Vec<RepoName> {
        let st = self.state();
        let mut repos: Vec<RepoName> = st
            .tags
            .keys()
            .map(|(r, _)| r.clone())
            .chain(st.holds.keys().cloned())
            .chain(st.tag_lists.keys().cloned())
            .collect();
        repos.sort();
        repos.dedup();
        repos
    }

    async fn holds(&self, repo: &RepoName, digest: &Digest) -> bool {
        self.state()
            .holds
            .get(repo)
            .is_some_and(|set| set.contains(digest))
    }

    async fn add_holds(&self, repo: &RepoName, digests: Vec<Digest>) {
        let mut st = self.state();
        let set = st.holds.entry(repo.clone()).or_default();
        let before = set.len();
        set.extend(digests);
        if set.len() != before {
            drop(st);
            self.changed();
        }
    }

    async fn record(&self, key: &ContentKey, size: u64, now: SystemTime) {
        let mut st = self.state();
        st.contents.insert(
            key.clone(),
            ContentEntry {
                size,
                last_access: now,
            },
        );
        st.changed(key);
        drop(st);
        self.changed();
    }

    async fn touch(&self, key: &ContentKey, now: SystemTime) {
        let touched = match self.state().contents.get_mut(key) {
            Some(entry) => {
                entry.last_access = now;
                true
            }
            None => false,
        };
        if touched {
            self.changed();
        }
    }

    async fn entry(&self, key: &ContentKey) -> Option<ContentEntry> {
        self.state().contents.get(key).copied()
    }

    async fn forget(&self, key: &ContentKey) {
        let mut st = self.state();
        st.contents.remove(key);
        st.changed(key);
        drop(st);
        self.changed();
    }

    async fn forget_if(&self, key: &ContentKey, seen: ContentEntry) -> bool {
        let mut st = self.state();
        if st.contents.get(key) != Some(&seen) {
            return false;
        }
        st.contents.remove(key);
        st.changed(key);
        drop(st);
        self.changed();
        true
    }

    async fn contents(&self) -> Vec<(ContentKey, ContentEntry)> {
        self.state()
            .contents
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    async fn begin_scan(&self) -> ScanMark {
        let mut st = self.state();
        st.scans_begun += 1;
        let mark = st.scans_begun;
        st.scan = Some(Scan {
            mark,
            changed: HashSet::new(),
        });
        ScanMark(mark)
    }

    async fn reconcile(&self, mark: ScanMark, found: Vec<Found>) {
        let mut st = self.state();
        let scan = match st.scan.take() {
            Some(scan) if scan.mark == mark.0 => scan,
            other => {
                // Superseded: the newer scan's reconcile will do.
                st.scan = other;
                tracing::debug!(mark = mark.0, "reconcile of a superseded scan skipped");
                return;
            }
        };
        st.reconcile(found, &scan.changed);
        drop(st);
        self.changed();
    }

    async fn flush(&self) -> io::Result<()> {
        if self.inner.path.is_none() {
            return Ok(());
        }
        // A large cache's snapshot is megabytes of JSON and an fsync: work
        // for the blocking pool, not an async worker serving requests.
        let inner = self.inner.clone();
        match tokio::task::spawn_blocking(move || inner.flush_now()).await {
            Ok(result) => result,
            Err(e) => {
                // It may have died between taking the dirty flag and writing.
                self.changed();
                Err(io::Error::other(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn digest(c: char) -> Digest {
        Digest::parse(&format!("sha256:{}", c.to_string().repeat(64))).unwrap()
    }

    fn found(c: char, size: u64) -> Found {
        Found {
            key: ContentKey::blob(&digest(c)),
            size,
            modified: SystemTime::UNIX_EPOCH + Duration::from_secs(5),
        }
    }

    #[tokio::test]
    async fn survives_a_restart_and_reconciles_with_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.json");
        let repo = RepoName::parse("library/a").unwrap();
        let tag = Tag::parse("1").unwrap();
        let t1 = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        {
            let idx = LocalIndex::load(&path, vec![found('a', 10), found('b', 20)]);
            idx.record(&ContentKey::blob(&digest('a')), 10, t1).await;
            idx.add_holds(&repo, vec![digest('a')]).await;
            let entry = TagEntry {
                digest: digest('f'),
                media_type: None,
                size: Some(3),
                checked_at: t1,
            };
            idx.set_tag(&repo, &tag, entry).await;
            idx.flush().await.unwrap();
        }
        // 'b' vanished from disk, 'c' appeared.
        let idx = LocalIndex::load(&path, vec![found('a', 10), found('c', 30)]);
        let a = idx.entry(&ContentKey::blob(&digest('a'))).await.unwrap();
        assert_eq!(a.last_access, t1, "access time kept across restart");
        assert!(idx.entry(&ContentKey::blob(&digest('b'))).await.is_none());
        let c = idx.entry(&ContentKey::blob(&digest('c'))).await.unwrap();
        assert_eq!(c.size, 30);
        assert!(idx.holds(&repo, &digest('a')).await);
        assert_eq!(idx.tag(&repo, &tag).await.unwrap().digest, digest('f'));
    }

    #[tokio::test]
    async fn touch_updates_only_present_entries_and_forget_if_only_what_was_seen() {
        let idx = LocalIndex::in_memory();
        let key = ContentKey::blob(&digest('a'));
        let t = |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        idx.touch(&key, t(1)).await;
        assert_eq!(idx.entry(&key).await, None, "a hit never inserts");

        idx.record(&key, 10, t(2)).await;
        let seen = idx.entry(&key).await.unwrap();
        idx.touch(&key, t(3)).await;
        assert!(
            !idx.forget_if(&key, seen).await,
            "touched since it was seen"
        );
        assert_eq!(idx.entry(&key).await.unwrap().last_access, t(3));

        let seen = idx.entry(&key).await.unwrap();
        assert!(idx.forget_if(&key, seen).await);
        assert_eq!(idx.entry(&key).await, None);
        assert!(!idx.forget_if(&key, seen).await, "already gone");
    }

    /// A scan lists the store while commits and evictions go on: its
    /// reconcile must not forget a commit it missed, nor bring back an item
    /// forgotten after it listed the file.
    #[tokio::test]
    async fn reconcile_leaves_alone_what_changed_since_the_scan_began() {
        let idx = LocalIndex::in_memory();
        let key = |c| ContentKey::blob(&digest(c));
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        for c in ['a', 'b', 'e'] {
            idx.record(&key(c), 10, t).await;
        }
        let mark = idx.begin_scan().await;
        // The scan lists a, b and an unknown d; e was removed by hand.
        let listed = vec![found('a', 10), found('b', 10), found('d', 40)];
        idx.record(&key('c'), 30, t).await; // committed after the listing
        idx.forget(&key('b')).await; // evicted after the listing
        idx.reconcile(mark, listed).await;

        let mut have: Vec<ContentKey> = idx.contents().await.into_iter().map(|(k, _)| k).collect();
        have.sort();
        assert_eq!(have, vec![key('a'), key('c'), key('d')]);

        // Changes before the next scan began are the scan's to judge.
        let mark = idx.begin_scan().await;
        idx.reconcile(mark, vec![found('a', 10)]).await;
        let have: Vec<ContentKey> = idx.contents().await.into_iter().map(|(k, _)| k).collect();
        assert_eq!(have, vec![key('a')]);
    }

    #[tokio::test]
    async fn the_reconcile_of_a_superseded_scan_does_nothing() {
        let idx = LocalIndex::in_memory();
        let key = ContentKey::blob(&digest('a'));
        let old = idx.begin_scan().await;
        idx.record(&key, 10, SystemTime::UNIX_EPOCH).await;
        let new = idx.begin_scan().await;
        // The older scan may have missed the commit, and the newer one no
        // longer tracks what changed before it: the older one is dropped.
        idx.reconcile(old, Vec::new()).await;
        assert!(idx.entry(&key).await.is_some());
        idx.reconcile(new, vec![found('a', 10)]).await;
        assert!(idx.entry(&key).await.is_some());
    }

    /// `flush` serialises and fsyncs on the blocking pool; `flush_now` on
    /// its caller's thread. A current-thread runtime runs this test's
    /// futures on the test's own thread.
    #[tokio::test]
    async fn flush_writes_the_snapshot_off_the_async_worker() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.json");
        let idx = LocalIndex::load(&path, vec![found('a', 10)]);
        idx.flush().await.unwrap();
        assert!(path.is_file());
        assert!(
            !WROTE_HERE.with(|w| w.get()),
            "the snapshot was written on the async worker"
        );
        idx.record(&ContentKey::blob(&digest('b')), 20, SystemTime::UNIX_EPOCH)
            .await;
        idx.flush_now().unwrap();
        assert!(WROTE_HERE.with(|w| w.get()));
    }

    #[tokio::test]
    async fn a_failed_flush_keeps_the_last_snapshot_and_is_retried() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.json");
        let idx = LocalIndex::load(&path, vec![found('a', 10)]);
        idx.flush().await.unwrap();
        let good = std::fs::read(&path).unwrap();

        // A directory where the temp file goes: creating it fails.
        let tmp = path.with_extension("json.tmp");
        std::fs::create_dir(&tmp).unwrap();
        let b = ContentKey::blob(&digest('b'));
        idx.record(&b, 99, SystemTime::UNIX_EPOCH).await;
        assert!(idx.flush().await.is_err());
        assert_eq!(std::fs::read(&path).unwrap(), good, "index.json changed");

        std::fs::remove_dir(&tmp).unwrap();
        idx.flush().await.unwrap();
        // The snapshot has b's recorded size, not the one a scan would give.
        let idx = LocalIndex::load(&path, vec![found('a', 10), found('b', 20)]);
        assert_eq!(idx.entry(&b).await.unwrap().size, 99);
    }

    #[tokio::test]
    async fn damaged_snapshot_rebuilds_from_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.json");
        std::fs::write(&path, b"{not json").unwrap();
        let idx = LocalIndex::load(&path, vec![found('a', 10)]);
        assert_eq!(idx.contents().await.len(), 1);
    }
}
