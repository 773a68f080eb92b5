//! Tests of the local index: restarts, reconciles with scans in progress,
//! pruning on forget, and where and when snapshots are written.

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
        idx.flush(Flush::All).await.unwrap();
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
    idx.flush(Flush::All).await.unwrap();
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
    idx.flush(Flush::All).await.unwrap();
    let good = std::fs::read(&path).unwrap();

    // A directory where the temp file goes: creating it fails.
    let tmp = path.with_extension("json.tmp");
    std::fs::create_dir(&tmp).unwrap();
    let b = ContentKey::blob(&digest('b'));
    idx.record(&b, 99, SystemTime::UNIX_EPOCH).await;
    assert!(idx.flush(Flush::All).await.is_err());
    assert_eq!(std::fs::read(&path).unwrap(), good, "index.json changed");

    std::fs::remove_dir(&tmp).unwrap();
    idx.flush(Flush::All).await.unwrap();
    // The snapshot has b's recorded size, not the one a scan would give.
    let idx = LocalIndex::load(&path, vec![found('a', 10), found('b', 20)]);
    assert_eq!(idx.entry(&b).await.unwrap().size, 99);
}

fn tag_at(d: &Digest) -> TagEntry {
    TagEntry {
        digest: d.clone(),
        media_type: None,
        size: None,
        checked_at: SystemTime::UNIX_EPOCH,
    }
}

fn repo(name: &str) -> RepoName {
    RepoName::parse(name).unwrap()
}

fn tag(name: &str) -> Tag {
    Tag::parse(name).unwrap()
}

/// The snapshot on disk, as plain JSON.
fn written(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// Anyone may make the mirror record memberships, tags and tag lists by
/// pulling; forgetting an item must take with it what only existed for
/// it, in memory and in the snapshot, and nothing else.
#[tokio::test]
async fn forgetting_an_item_drops_the_memberships_tags_and_tag_lists_only_it_had() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("index.json");
    let idx = LocalIndex::load(&path, Vec::new());
    let (manifest, blob, unstored, other) = (digest('a'), digest('b'), digest('c'), digest('d'));
    let t = SystemTime::UNIX_EPOCH;
    idx.record(&ContentKey::manifest(&manifest), 10, t).await;
    idx.record(&ContentKey::blob(&blob), 10, t).await;
    idx.record(&ContentKey::manifest(&other), 10, t).await;
    // `app` pulled the manifest, which references the blob and a blob
    // not downloaded yet; `only` holds just the blob; `keep` the blob
    // and the undownloaded one; `mirror` tags the same manifest.
    let (app, only, keep, mirror) = (repo("app"), repo("only"), repo("keep"), repo("mirror"));
    idx.add_holds(&app, vec![manifest.clone(), blob.clone(), unstored.clone()])
        .await;
    idx.add_holds(&only, vec![blob.clone()]).await;
    idx.add_holds(&keep, vec![blob.clone(), unstored.clone()])
        .await;
    idx.set_tag(&app, &tag("1"), tag_at(&manifest)).await;
    idx.set_tag(&mirror, &tag("1"), tag_at(&manifest)).await;
    idx.set_tag(&mirror, &tag("2"), tag_at(&other)).await;
    for r in [&app, &only, &keep, &mirror] {
        idx.set_tag_list(r, vec![tag("1")]).await;
    }

    idx.forget(&ContentKey::blob(&blob)).await;
    for r in [&app, &only, &keep] {
        assert!(
            !idx.holds(r, &blob).await,
            "{r} still holds the forgotten blob"
        );
    }
    assert_eq!(idx.tag_list(&only).await, None, "nothing is left of `only`");
    assert!(
        idx.holds(&keep, &unstored).await,
        "another digest's membership was dropped"
    );
    assert!(idx.tag_list(&keep).await.is_some());

    let seen = idx.entry(&ContentKey::manifest(&manifest)).await.unwrap();
    assert!(idx.forget_if(&ContentKey::manifest(&manifest), seen).await);
    assert!(!idx.holds(&app, &manifest).await);
    assert_eq!(
        idx.tag(&app, &tag("1")).await,
        None,
        "a tag of an evicted manifest"
    );
    assert_eq!(idx.tag(&mirror, &tag("1")).await, None);
    assert_eq!(idx.tag(&mirror, &tag("2")).await.unwrap().digest, other);
    assert!(
        idx.holds(&app, &unstored).await,
        "a reference not downloaded yet was dropped"
    );
    assert!(
        idx.tag_list(&app).await.is_some(),
        "`app` still holds a digest"
    );
    assert!(
        idx.tag_list(&mirror).await.is_some(),
        "`mirror` still has a tag"
    );
    let mut repos = idx.repositories().await;
    repos.sort();
    assert_eq!(repos, vec![app.clone(), keep.clone(), mirror.clone()]);

    idx.flush(Flush::All).await.unwrap();
    let json = written(&path).to_string();
    for gone in [&blob, &manifest] {
        assert!(
            !json.contains(gone.hex()),
            "the snapshot still names {gone}"
        );
    }
    assert!(
        !json.contains("\"only\""),
        "the snapshot still names `only`: {json}"
    );
    let idx = LocalIndex::load(
        &path,
        vec![Found {
            key: ContentKey::manifest(&other),
            size: 10,
            modified: t,
        }],
    );
    assert!(idx.holds(&keep, &unstored).await);
    assert!(idx.holds(&app, &unstored).await);
    assert_eq!(idx.tag(&mirror, &tag("2")).await.unwrap().digest, other);
    assert_eq!(idx.tag(&app, &tag("1")).await, None);
}

/// A file gone at start, or gone by a rescan, is forgotten like an
/// eviction; a digest still stored as the other kind keeps its members.
#[tokio::test]
async fn a_file_found_gone_takes_its_memberships_and_tags_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("index.json");
    let (app, t) = (repo("app"), SystemTime::UNIX_EPOCH);
    {
        let idx = LocalIndex::load(&path, vec![found('a', 10), found('b', 10)]);
        idx.record(&ContentKey::manifest(&digest('e')), 10, t).await;
        idx.add_holds(&app, vec![digest('a'), digest('b'), digest('e')])
            .await;
        idx.set_tag(&app, &tag("1"), tag_at(&digest('e'))).await;
        idx.set_tag_list(&app, vec![tag("1")]).await;
        idx.flush(Flush::All).await.unwrap();
    }
    // The manifest's file and blob a are gone; b is there.
    let idx = LocalIndex::load(&path, vec![found('b', 10)]);
    assert!(!idx.holds(&app, &digest('a')).await);
    assert!(!idx.holds(&app, &digest('e')).await);
    assert_eq!(idx.tag(&app, &tag("1")).await, None);
    assert!(idx.holds(&app, &digest('b')).await);

    // A rescan finds b gone as a blob but stored as a manifest.
    let mark = idx.begin_scan().await;
    idx.reconcile(
        mark,
        vec![Found {
            key: ContentKey::manifest(&digest('b')),
            size: 10,
            modified: t,
        }],
    )
    .await;
    assert!(
        idx.holds(&app, &digest('b')).await,
        "still stored, as a manifest"
    );
    let mark = idx.begin_scan().await;
    idx.reconcile(mark, Vec::new()).await;
    assert!(!idx.holds(&app, &digest('b')).await);
    assert_eq!(idx.tag_list(&app).await, None, "nothing is left of `app`");
    assert!(idx.repositories().await.is_empty());
}

/// Hits change access times all the time: they alone do not rewrite the
/// snapshot at every flush, only at a `Flush::All` (every few upkeep
/// runs, and at shutdown), or with the next real change.
#[tokio::test]
async fn hits_alone_wait_for_a_full_flush() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("index.json");
    let key = ContentKey::blob(&digest('a'));
    let idx = LocalIndex::load(&path, vec![found('a', 10)]);
    idx.flush(Flush::Changes).await.unwrap();
    let last_access = |path: &Path| written(path)["contents"][0][1]["last_access"].clone();
    let before = last_access(&path);

    let t = |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
    idx.touch(&key, t(100)).await;
    std::fs::remove_file(&path).unwrap();
    idx.flush(Flush::Changes).await.unwrap();
    assert!(!path.exists(), "a hit alone rewrote the snapshot");
    idx.flush(Flush::All).await.unwrap();
    let touched = last_access(&path);
    assert_ne!(touched, before, "the access time was not written");

    // A real change writes at once, with the access times since.
    idx.touch(&key, t(200)).await;
    idx.add_holds(&repo("app"), vec![digest('a')]).await;
    idx.flush(Flush::Changes).await.unwrap();
    let both = last_access(&path);
    assert_ne!(both, touched);
    std::fs::remove_file(&path).unwrap();
    idx.flush(Flush::All).await.unwrap();
    assert!(!path.exists(), "written again with nothing new");

    // Synchronous callers (import, admin) write access times too.
    idx.touch(&key, t(300)).await;
    idx.flush_now().unwrap();
    assert_ne!(last_access(&path), both);
}

#[tokio::test]
async fn damaged_snapshot_rebuilds_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("index.json");
    std::fs::write(&path, b"{not json").unwrap();
    let idx = LocalIndex::load(&path, vec![found('a', 10)]);
    assert_eq!(idx.contents().await.len(), 1);
}
