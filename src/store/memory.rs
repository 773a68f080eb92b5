//! An in-process [`Index`]: tags and repository membership in hash maps.
//!
//! It forgets everything on restart; blobs and manifests on disk survive and
//! are re-associated with repositories through the upstream (a HEAD).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use async_trait::async_trait;

use super::{Index, TagEntry};
use crate::reference::{Digest, RepoName, Tag};

#[derive(Debug, Default)]
pub struct MemoryIndex {
    tags: Mutex<HashMap<(RepoName, Tag), TagEntry>>,
    holds: Mutex<HashMap<RepoName, HashSet<Digest>>>,
}

impl MemoryIndex {
    pub fn new() -> Self {
        Self::default()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain maps that are still valid.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[async_trait]
impl Index for MemoryIndex {
    async fn tag(&self, repo: &RepoName, tag: &Tag) -> Option<TagEntry> {
        lock(&self.tags).get(&(repo.clone(), tag.clone())).cloned()
    }

    async fn set_tag(&self, repo: &RepoName, tag: &Tag, entry: TagEntry) {
        lock(&self.tags).insert((repo.clone(), tag.clone()), entry);
    }

    async fn holds(&self, repo: &RepoName, digest: &Digest) -> bool {
        lock(&self.holds)
            .get(repo)
            .is_some_and(|set| set.contains(digest))
    }

    async fn add_holds(&self, repo: &RepoName, digests: Vec<Digest>) {
        lock(&self.holds)
            .entry(repo.clone())
            .or_default()
            .extend(digests);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn holds_is_per_repository() {
        let idx = MemoryIndex::new();
        let a = RepoName::parse("a").unwrap();
        let b = RepoName::parse("b").unwrap();
        let d = Digest::parse(&format!("sha256:{}", "1".repeat(64))).unwrap();
        idx.add_holds(&a, vec![d.clone()]).await;
        assert!(idx.holds(&a, &d).await);
        assert!(!idx.holds(&b, &d).await);
    }
}
