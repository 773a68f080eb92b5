//! The push paths' side of the collection's lock: a completion and a mount
//! that find a blob present while a collection is under way wait for it,
//! and link what is there after it.

use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::*;
use crate::config::HostedConfig;
use crate::hashing::digest_of;
use crate::reference::Algorithm;

async fn open(dir: &std::path::Path) -> Arc<Hosted> {
    Arc::new(Hosted::open(dir, &HostedConfig::default()).await.unwrap())
}

/// Commits `bytes` and records them, linked to nothing: garbage.
async fn garbage(h: &Hosted, bytes: &[u8]) -> Digest {
    let digest = digest_of(Algorithm::Sha256, bytes);
    let spool = h.store.spool().await.unwrap();
    (&*spool.file).write_all(bytes).unwrap();
    h.store.commit_blob(spool, &digest).await.unwrap();
    let key = ContentKey::blob(&digest);
    h.index
        .record(&key, bytes.len() as u64, SystemTime::now())
        .await;
    digest
}

/// What a collection's sweep does to an unmarked item.
async fn sweep(h: &Hosted, digest: &Digest) {
    let key = ContentKey::blob(digest);
    h.index.forget(&key).await;
    h.store.remove(&key).await.unwrap();
}

async fn read(h: &Hosted, repo: &RepoName, digest: &Digest) -> Vec<u8> {
    use std::io::Read as _;
    let blob = h.blob(repo, digest).await.unwrap().expect("served");
    let mut out = Vec::new();
    blob.reader().read_to_end(&mut out).unwrap();
    out
}

#[tokio::test]
async fn an_upload_completing_during_a_collection_links_after_its_sweep() {
    let tmp = tempfile::tempdir().unwrap();
    let h = open(tmp.path()).await;
    let repo = RepoName::parse("team/app").unwrap();
    let bytes = b"a layer another push left behind".to_vec();
    let digest = garbage(&h, &bytes).await;
    let id = h.uploads.create(&repo).await.unwrap();

    let collection = h.commits.write().await;
    let finishing = tokio::spawn({
        let (h, repo, digest) = (h.clone(), repo.clone(), digest.clone());
        let body = response::full(Bytes::from(bytes.clone()));
        async move { finish(&h, &repo, &id, &digest, Some(body)).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !finishing.is_finished(),
        "the completion waits for the collection"
    );
    sweep(&h, &digest).await;
    drop(collection);

    let reply = finishing.await.unwrap().unwrap();
    assert_eq!(reply.response.status(), StatusCode::CREATED);
    assert_eq!(
        read(&h, &repo, &digest).await,
        bytes,
        "committed again and linked"
    );
}

#[tokio::test]
async fn a_mount_from_the_cache_during_a_collection_links_after_its_sweep() {
    let tmp = tempfile::tempdir().unwrap();
    let h = open(tmp.path()).await;
    // The cache's copy, in a store of its own.
    let cache = open(&tmp.path().join("cache")).await;
    let repo = RepoName::parse("team/app").unwrap();
    let bytes = b"a cached layer".to_vec();
    let digest = garbage(&cache, &bytes).await;
    let cached = cache.store.open_blob(&digest).await.unwrap().unwrap();
    garbage(&h, &bytes).await;

    let collection = h.commits.write().await;
    let adopting = tokio::spawn({
        let (h, repo, digest) = (h.clone(), repo.clone(), digest.clone());
        async move { h.adopt(&repo, &digest, cached).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !adopting.is_finished(),
        "the mount waits for the collection"
    );
    sweep(&h, &digest).await;
    drop(collection);

    adopting.await.unwrap().unwrap();
    assert_eq!(
        read(&h, &repo, &digest).await,
        bytes,
        "copied again and linked"
    );
}
