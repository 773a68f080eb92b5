//! The [`Index`] of one mirror process: hash maps in memory, persisted as a
//! JSON snapshot (`index.json` in the data dir) written atomically on the
//! blocking pool: at the next flush after a change of what is stored, tagged
//! or held; after hits alone (access times) only when the caller asks for
//! [`Flush::All`] (every few upkeep runs, and at shutdown). At start the
//! snapshot is loaded and reconciled with a scan of the store, so a crash
//! loses at most the access times since the last snapshot that had them,
//! never the truth about what is on disk. Forgetting an item also drops what
//! only existed for it: its digest's memberships, the tags pointing at it
//! (a manifest), and the kept tag list of a repository left with neither.

use std::collections::{HashMap, HashSet};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{ContentEntry, ContentKey, Flush, Found, Index, Kind, ScanMark, TagEntry};
use crate::reference::{Digest, RepoName, Tag};

/// The snapshot format's version; a snapshot of another version is ignored.
const VERSION: u32 = 1;

#[derive(Debug, Default)]
struct State {
    contents: HashMap<ContentKey, ContentEntry>,
    /// By repository, so a prune sees at once whether one has tags left.
    tags: HashMap<RepoName, HashMap<Tag, TagEntry>>,
    holds: HashMap<RepoName, HashSet<Digest>>,
    tag_lists: HashMap<RepoName, Vec<Tag>>,
    /// `holds` the other way round, so forgetting a digest visits only the
    /// repositories that hold it, not every one. Memory only: rebuilt from
    /// `holds` on load.
    held_by: HashMap<Digest, HashSet<RepoName>>,
    /// The tags pointing at each digest, for the same reason. Memory only.
    tagged: HashMap<Digest, HashSet<(RepoName, Tag)>>,
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
    fn from_snapshot(s: Snapshot) -> Self {
        let mut state = State {
            contents: s.contents.into_iter().collect(),
            tag_lists: s.tag_lists.into_iter().collect(),
            ..State::default()
        };
        for (repo, tag, entry) in s.tags {
            state.set_tag(&repo, &tag, entry);
        }
        for (repo, digests) in s.holds {
            state.add_holds(&repo, digests);
        }
        state
    }

    /// Notes that `key` was recorded or forgotten, for the scan in progress.
    fn changed(&mut self, key: &ContentKey) {
        if let Some(scan) = &mut self.scan {
            scan.changed.insert(key.clone());
        }
    }

    fn set_tag(&mut self, repo: &RepoName, tag: &Tag, entry: TagEntry) {
        let target = entry.digest.clone();
        let old = self
            .tags
            .entry(repo.clone())
            .or_default()
            .insert(tag.clone(), entry);
        if let Some(old) = old {
            if old.digest != target {
                self.untag(&old.digest, repo, tag);
            }
        }
        self.tagged
            .entry(target)
            .or_default()
            .insert((repo.clone(), tag.clone()));
    }

    fn remove_tag(&mut self, repo: &RepoName, tag: &Tag) {
        let Some(tags) = self.tags.get_mut(repo) else {
            return;
        };
        let old = tags.remove(tag);
        if tags.is_empty() {
            self.tags.remove(repo);
        }
        if let Some(old) = old {
            self.untag(&old.digest, repo, tag);
        }
    }

    /// Takes `repo:tag` out of the reverse map of `digest`.
    fn untag(&mut self, digest: &Digest, repo: &RepoName, tag: &Tag) {
        if let Some(set) = self.tagged.get_mut(digest) {
            set.remove(&(repo.clone(), tag.clone()));
            if set.is_empty() {
                self.tagged.remove(digest);
            }
        }
    }

    /// Returns whether anything was new.
    fn add_holds(&mut self, repo: &RepoName, digests: Vec<Digest>) -> bool {
        let set = self.holds.entry(repo.clone()).or_default();
        let mut added = Vec::new();
        for d in digests {
            if set.insert(d.clone()) {
                added.push(d);
            }
        }
        if set.is_empty() {
            // An empty list of digests leaves no empty set behind.
            self.holds.remove(repo);
        }
        let new = !added.is_empty();
        for d in added {
            self.held_by.entry(d).or_default().insert(repo.clone());
        }
        new
    }

    fn forget(&mut self, key: &ContentKey) {
        self.contents.remove(key);
        self.changed(key);
        self.prune(key);
    }

    /// Drops what only existed for the forgotten item `key`: the digest's
    /// memberships (unless the digest is still stored as the other kind),
    /// the tags pointing at it when it was a manifest (the next pull
    /// resolves them again; stale serving needs the manifest anyway), then
    /// the kept tag list of each repository this left with no tag and no
    /// membership. Memberships of other digests stay, stored or not: a
    /// repository holds a manifest's references before their blobs arrive.
    fn prune(&mut self, key: &ContentKey) {
        let digest = &key.digest;
        let other = ContentKey {
            kind: match key.kind {
                Kind::Blob => Kind::Manifest,
                Kind::Manifest => Kind::Blob,
            },
            digest: digest.clone(),
        };
        let mut visited = Vec::new();
        if !self.contents.contains_key(&other) {
            for repo in self.held_by.remove(digest).unwrap_or_default() {
                if let Some(set) = self.holds.get_mut(&repo) {
                    set.remove(digest);
                    if set.is_empty() {
                        self.holds.remove(&repo);
                    }
                }
                visited.push(repo);
            }
        }
        if key.kind == Kind::Manifest {
            for (repo, tag) in self.tagged.remove(digest).unwrap_or_default() {
                if let Some(tags) = self.tags.get_mut(&repo) {
                    tags.remove(&tag);
                    if tags.is_empty() {
                        self.tags.remove(&repo);
                    }
                }
                visited.push(repo);
            }
        }
        for repo in visited {
            if !self.tags.contains_key(&repo) && !self.holds.contains_key(&repo) {
                self.tag_lists.remove(&repo);
            }
        }
    }

    /// Makes the contents match `found`, except the items in `keep`.
    fn reconcile(&mut self, found: Vec<Found>, keep: &HashSet<ContentKey>) {
        let present: HashSet<&ContentKey> = found.iter().map(|f| &f.key).collect();
        let gone: Vec<ContentKey> = self
            .contents
            .keys()
            .filter(|k| !present.contains(k) && !keep.contains(k))
            .cloned()
            .collect();
        drop(present);
        for key in &gone {
            self.contents.remove(key);
        }
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
        // After the additions: a digest gone as one kind and found as the
        // other keeps its memberships.
        for key in &gone {
            self.prune(key);
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            version: VERSION,
            contents: self.contents.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            tags: self
                .tags
                .iter()
                .flat_map(|(r, tags)| {
                    tags.iter()
                        .map(move |(t, e)| (r.clone(), t.clone(), e.clone()))
                })
                .collect(),
            holds: self
                .holds
                .iter()
                .map(|(r, d)| (r.clone(), d.iter().cloned().collect()))
                .collect(),
            tag_lists: self
                .tag_lists
                .iter()
                .map(|(r, t)| (r.clone(), t.clone()))
                .collect(),
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
    /// Something a crash must not lose changed: what is stored, tagged or
    /// held.
    dirty: AtomicBool,
    /// Only access times changed (hits): written with [`Flush::All`] only,
    /// since under traffic every flush would rewrite the whole snapshot.
    touched: AtomicBool,
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
                Ok(s) if s.version == VERSION => State::from_snapshot(s),
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
                touched: AtomicBool::new(false),
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

    /// Writes the snapshot if anything changed since the last write, access
    /// times included, on the calling thread (for synchronous callers;
    /// [`Index::flush`] uses the blocking pool).
    pub fn flush_now(&self) -> io::Result<()> {
        self.inner.flush_now(Flush::All)
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

    fn flush_now(&self, what: Flush) -> io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        // Guards no data, so a panicked holder leaves nothing to repair.
        let _writing = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        // Both flags are taken before the snapshot: a change after it sets
        // them again for the next flush. Any write carries the access times.
        let dirty = self.dirty.swap(false, Ordering::Relaxed);
        let touched = (dirty || what == Flush::All) && self.touched.swap(false, Ordering::Relaxed);
        if !dirty && !touched {
            return Ok(());
        }
        let snapshot = self.state().snapshot();
        let result = write_atomically(path, &snapshot);
        if result.is_err() {
            // Written by the next flush; index.json keeps the last good one.
            if dirty {
                self.changed();
            }
            if touched {
                self.touched.store(true, Ordering::Relaxed);
            }
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
    async fn held(&self, repo: &RepoName) -> Vec<Digest> {
        self.state()
            .holds
            .get(repo)
            .map(|set| set.iter().cloned().collect())
            .unwrap_or_default()
    }

    async fn drop_hold(&self, repo: &RepoName, digest: &Digest) {
        let mut state = self.state();
        let Some(set) = state.holds.get_mut(repo) else {
            return;
        };
        if !set.remove(digest) {
            return;
        }
        if set.is_empty() {
            state.holds.remove(repo);
        }
        if let Some(repos) = state.held_by.get_mut(digest) {
            repos.remove(repo);
            if repos.is_empty() {
                state.held_by.remove(digest);
            }
        }
        drop(state);
        self.changed();
    }

    async fn tag(&self, repo: &RepoName, tag: &Tag) -> Option<TagEntry> {
        self.state().tags.get(repo)?.get(tag).cloned()
    }

    async fn set_tag(&self, repo: &RepoName, tag: &Tag, entry: TagEntry) {
        self.state().set_tag(repo, tag, entry);
        self.changed();
    }

    async fn remove_tag(&self, repo: &RepoName, tag: &Tag) {
        self.state().remove_tag(repo, tag);
        self.changed();
    }

    async fn tags(&self) -> Vec<(RepoName, Tag, TagEntry)> {
        let st = self.state();
        st.tags
            .iter()
            .flat_map(|(r, tags)| {
                tags.iter()
                    .map(move |(t, e)| (r.clone(), t.clone(), e.clone()))
            })
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
            .cloned()
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
        if self.state().add_holds(repo, digests) {
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
            // Not `changed`: access times alone wait for a `Flush::All`.
            self.inner.touched.store(true, Ordering::Relaxed);
        }
    }

    async fn entry(&self, key: &ContentKey) -> Option<ContentEntry> {
        self.state().contents.get(key).copied()
    }

    async fn forget(&self, key: &ContentKey) {
        self.state().forget(key);
        self.changed();
    }

    async fn forget_if(&self, key: &ContentKey, seen: ContentEntry) -> bool {
        let mut st = self.state();
        if st.contents.get(key) != Some(&seen) {
            return false;
        }
        st.forget(key);
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

    async fn flush(&self, what: Flush) -> io::Result<()> {
        if self.inner.path.is_none() {
            return Ok(());
        }
        // A large cache's snapshot is megabytes of JSON and an fsync: work
        // for the blocking pool, not an async worker serving requests.
        let inner = self.inner.clone();
        match tokio::task::spawn_blocking(move || inner.flush_now(what)).await {
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
mod tests;
