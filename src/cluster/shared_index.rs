//! [`SharedIndex`]: the [`Index`] a replica's registry uses in cluster mode.
//! It composes the replica's own index of its local disk tier (`local`, a
//! `LocalIndex`) with the index every replica shares (`shared`, a
//! [`RedisIndex`](super::redis_index::RedisIndex)):
//!
//! - contents (`record`, `touch`, `entry`, `forget`, `forget_if`,
//!   `contents`, scans, `flush`) are the local tier's: `local` only. The
//!   bucket's items are kept by the caller on the `RedisIndex` directly.
//! - tags, tag lists and memberships are written to both (`local` always,
//!   `shared` best effort: it drops a write Redis does not take) and read
//!   from both: a membership either knows counts; of two tag entries the one
//!   checked upstream later wins, so a tag one replica checked is fresh on
//!   all; the shared tag list wins over the local one; listings are the
//!   union. With Redis down, `shared` answers empty and the replica carries
//!   on with what it knows itself.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;

use crate::cache::store::{ContentEntry, ContentKey, Flush, Found, Index, ScanMark, TagEntry};
use crate::reference::{Digest, RepoName, Tag};

/// A replica's index in cluster mode: its own tier and the shared one.
#[derive(Clone)]
pub struct SharedIndex {
    local: Arc<dyn Index>,
    shared: Arc<dyn Index>,
}

impl std::fmt::Debug for SharedIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedIndex").finish_non_exhaustive()
    }
}

impl SharedIndex {
    pub fn new(local: Arc<dyn Index>, shared: Arc<dyn Index>) -> Self {
        Self { local, shared }
    }

    /// The replica's own index.
    pub fn local(&self) -> &Arc<dyn Index> {
        &self.local
    }

    /// The index every replica shares.
    pub fn shared(&self) -> &Arc<dyn Index> {
        &self.shared
    }
}

/// The entry checked upstream later; `a` on a tie.
fn fresher(a: Option<TagEntry>, b: Option<TagEntry>) -> Option<TagEntry> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if b.checked_at > a.checked_at { b } else { a }),
        (a, b) => a.or(b),
    }
}

#[async_trait]
impl Index for SharedIndex {
    async fn tag(&self, repo: &RepoName, tag: &Tag) -> Option<TagEntry> {
        let (shared, local) = tokio::join!(self.shared.tag(repo, tag), self.local.tag(repo, tag));
        fresher(shared, local)
    }

    async fn set_tag(&self, repo: &RepoName, tag: &Tag, entry: TagEntry) {
        self.local.set_tag(repo, tag, entry.clone()).await;
        self.shared.set_tag(repo, tag, entry).await;
    }

    async fn remove_tag(&self, repo: &RepoName, tag: &Tag) {
        self.local.remove_tag(repo, tag).await;
        self.shared.remove_tag(repo, tag).await;
    }

    async fn tags(&self) -> Vec<(RepoName, Tag, TagEntry)> {
        let (shared, local) = tokio::join!(self.shared.tags(), self.local.tags());
        let mut all: BTreeMap<(RepoName, Tag), TagEntry> = BTreeMap::new();
        for (repo, tag, entry) in shared.into_iter().chain(local) {
            let slot = all.entry((repo, tag));
            match slot {
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(entry);
                }
                std::collections::btree_map::Entry::Occupied(mut o) => {
                    // The shared one came first: it stays unless the local
                    // one was checked later.
                    if entry.checked_at > o.get().checked_at {
                        o.insert(entry);
                    }
                }
            }
        }
        all.into_iter().map(|((r, t), e)| (r, t, e)).collect()
    }

    async fn tag_list(&self, repo: &RepoName) -> Option<Vec<Tag>> {
        match self.shared.tag_list(repo).await {
            Some(list) => Some(list),
            None => self.local.tag_list(repo).await,
        }
    }

    async fn set_tag_list(&self, repo: &RepoName, tags: Vec<Tag>) {
        self.local.set_tag_list(repo, tags.clone()).await;
        self.shared.set_tag_list(repo, tags).await;
    }

    async fn repositories(&self) -> Vec<RepoName> {
        let (shared, local) = tokio::join!(self.shared.repositories(), self.local.repositories());
        let all: BTreeSet<RepoName> = shared.into_iter().chain(local).collect();
        all.into_iter().collect()
    }

    async fn holds(&self, repo: &RepoName, digest: &Digest) -> bool {
        // The local answer first: no round trip when it knows.
        self.local.holds(repo, digest).await || self.shared.holds(repo, digest).await
    }

    async fn add_holds(&self, repo: &RepoName, digests: Vec<Digest>) {
        self.local.add_holds(repo, digests.clone()).await;
        self.shared.add_holds(repo, digests).await;
    }

    async fn held(&self, repo: &RepoName) -> Vec<Digest> {
        let mut all = self.local.held(repo).await;
        all.extend(self.shared.held(repo).await);
        all.sort();
        all.dedup();
        all
    }

    async fn drop_hold(&self, repo: &RepoName, digest: &Digest) {
        self.local.drop_hold(repo, digest).await;
        self.shared.drop_hold(repo, digest).await;
    }

    async fn record(&self, key: &ContentKey, size: u64, now: SystemTime) {
        self.local.record(key, size, now).await;
    }

    async fn touch(&self, key: &ContentKey, now: SystemTime) {
        self.local.touch(key, now).await;
    }

    async fn entry(&self, key: &ContentKey) -> Option<ContentEntry> {
        self.local.entry(key).await
    }

    async fn forget(&self, key: &ContentKey) {
        self.local.forget(key).await;
    }

    async fn forget_if(&self, key: &ContentKey, seen: ContentEntry) -> bool {
        self.local.forget_if(key, seen).await
    }

    async fn contents(&self) -> Vec<(ContentKey, ContentEntry)> {
        self.local.contents().await
    }

    async fn begin_scan(&self) -> ScanMark {
        self.local.begin_scan().await
    }

    async fn reconcile(&self, mark: ScanMark, found: Vec<Found>) {
        self.local.reconcile(mark, found).await;
    }

    async fn flush(&self, what: Flush) -> io::Result<()> {
        self.local.flush(what).await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::cache::store::local_index::LocalIndex;

    fn repo(s: &str) -> RepoName {
        RepoName::parse(s).unwrap()
    }

    fn tag(s: &str) -> Tag {
        Tag::parse(s).unwrap()
    }

    fn digest(n: u8) -> Digest {
        Digest::parse(&format!("sha256:{}", format!("{n:02x}").repeat(32))).unwrap()
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn entry(d: u8, checked: u64) -> TagEntry {
        TagEntry {
            digest: digest(d),
            media_type: None,
            size: None,
            checked_at: at(checked),
        }
    }

    /// Two replicas, each with its own local index, sharing one "shared".
    fn replicas() -> (SharedIndex, SharedIndex, Arc<LocalIndex>, Arc<LocalIndex>) {
        let shared: Arc<dyn Index> = Arc::new(LocalIndex::in_memory());
        let la = Arc::new(LocalIndex::in_memory());
        let lb = Arc::new(LocalIndex::in_memory());
        let a = SharedIndex::new(la.clone(), shared.clone());
        let b = SharedIndex::new(lb.clone(), shared);
        (a, b, la, lb)
    }

    #[tokio::test]
    async fn a_tag_checked_by_one_replica_is_fresh_on_the_other() {
        let (a, b, _, lb) = replicas();
        let (r, t) = (repo("docker/library/alpine"), tag("3"));
        // B checked it long ago and keeps that locally.
        b.set_tag(&r, &t, entry(1, 0)).await;
        // A checks it now: the upstream moved it.
        a.set_tag(&r, &t, entry(2, 100)).await;
        assert_eq!(b.tag(&r, &t).await, Some(entry(2, 100)));
        // B's own memory keeps what B saw; the merge picks the later check.
        assert_eq!(lb.tag(&r, &t).await, Some(entry(1, 0)));
    }

    #[tokio::test]
    async fn the_later_check_wins_whichever_part_has_it() {
        let shared = Arc::new(LocalIndex::in_memory());
        let local = Arc::new(LocalIndex::in_memory());
        let idx = SharedIndex::new(local.clone(), shared.clone());
        let (r, t) = (repo("r"), tag("latest"));
        shared.set_tag(&r, &t, entry(1, 10)).await;
        local.set_tag(&r, &t, entry(2, 20)).await;
        assert_eq!(idx.tag(&r, &t).await, Some(entry(2, 20)));
        shared.set_tag(&r, &t, entry(3, 30)).await;
        assert_eq!(idx.tag(&r, &t).await, Some(entry(3, 30)));
        let tags = idx.tags().await;
        assert_eq!(tags, vec![(r.clone(), t.clone(), entry(3, 30))]);
        // Only the local part knows another tag: still listed.
        local.set_tag(&r, &tag("old"), entry(4, 5)).await;
        assert_eq!(idx.tags().await.len(), 2);
    }

    #[tokio::test]
    async fn memberships_either_part_knows_count_and_writes_reach_both() {
        let (a, b, la, _) = replicas();
        let r = repo("r");
        a.add_holds(&r, vec![digest(1)]).await;
        assert!(la.holds(&r, &digest(1)).await);
        assert!(b.holds(&r, &digest(1)).await, "through the shared part");
        assert!(!b.holds(&r, &digest(2)).await);
        assert!(!b.holds(&repo("other"), &digest(1)).await);
        assert_eq!(b.repositories().await, vec![r.clone()]);
    }

    #[tokio::test]
    async fn the_shared_tag_list_wins_and_the_local_one_stands_in() {
        let shared = Arc::new(LocalIndex::in_memory());
        let local = Arc::new(LocalIndex::in_memory());
        let idx = SharedIndex::new(local.clone(), shared.clone());
        let r = repo("r");
        assert_eq!(idx.tag_list(&r).await, None);
        local.set_tag_list(&r, vec![tag("a")]).await;
        assert_eq!(idx.tag_list(&r).await, Some(vec![tag("a")]));
        shared.set_tag_list(&r, vec![tag("b")]).await;
        assert_eq!(idx.tag_list(&r).await, Some(vec![tag("b")]));
        idx.set_tag_list(&r, vec![tag("c")]).await;
        assert_eq!(local.tag_list(&r).await, Some(vec![tag("c")]));
        assert_eq!(shared.tag_list(&r).await, Some(vec![tag("c")]));
        local.set_tag_list(&repo("s"), vec![]).await;
        assert_eq!(idx.repositories().await, vec![r, repo("s")]);
    }

    #[tokio::test]
    async fn contents_are_the_local_tiers_only() {
        let shared = Arc::new(LocalIndex::in_memory());
        let local = Arc::new(LocalIndex::in_memory());
        let idx = SharedIndex::new(local.clone(), shared.clone());
        let key = ContentKey::blob(&digest(1));
        idx.record(&key, 10, at(0)).await;
        assert!(local.entry(&key).await.is_some());
        assert_eq!(shared.entry(&key).await, None);
        shared.record(&ContentKey::blob(&digest(2)), 5, at(0)).await;
        assert_eq!(idx.contents().await.len(), 1);
        let seen = idx.entry(&key).await.unwrap();
        idx.touch(&key, at(1)).await;
        assert!(!idx.forget_if(&key, seen).await, "touched since");
        let seen = idx.entry(&key).await.unwrap();
        assert!(idx.forget_if(&key, seen).await);
        assert_eq!(local.entry(&key).await, None);
    }

    #[tokio::test]
    async fn remove_tag_reaches_both_parts() {
        let (a, b, la, _) = replicas();
        let (r, t) = (repo("r"), tag("x"));
        a.set_tag(&r, &t, entry(1, 1)).await;
        b.remove_tag(&r, &t).await;
        assert_eq!(a.shared().tag(&r, &t).await, None);
        // A's own memory still has it until A hears otherwise.
        assert_eq!(la.tag(&r, &t).await, Some(entry(1, 1)));
    }
}
