//! Tests of the hosted collection: what a delete makes collectable, what
//! stays, the grace period, and that a collection waits for a
//! check-and-link in progress.

use std::io::Write as _;
use std::time::{Duration, SystemTime};

use super::*;
use crate::cache::store::{StoredManifest, TagEntry};
use crate::config::HostedConfig;
use crate::hashing::digest_of;
use crate::manifest::{OCI_INDEX, OCI_MANIFEST};
use crate::reference::{Algorithm, Tag};

async fn open() -> (tempfile::TempDir, Hosted) {
    let tmp = tempfile::tempdir().unwrap();
    let h = Hosted::open(tmp.path(), &HostedConfig::default())
        .await
        .unwrap();
    (tmp, h)
}

fn repo(name: &str) -> RepoName {
    RepoName::parse(name).unwrap()
}

/// Commits `bytes` as a blob without linking it anywhere.
async fn commit(h: &Hosted, bytes: &[u8]) -> Digest {
    let digest = digest_of(Algorithm::Sha256, bytes);
    let spool = h.store.spool().await.unwrap();
    (&*spool.file).write_all(bytes).unwrap();
    h.store.commit_blob(spool, &digest).await.unwrap();
    h.index
        .record(
            &ContentKey::blob(&digest),
            bytes.len() as u64,
            SystemTime::now(),
        )
        .await;
    digest
}

/// Uploads `bytes` into `repo`: committed and linked.
async fn upload(h: &Hosted, repo: &RepoName, bytes: &[u8]) -> Digest {
    let digest = commit(h, bytes).await;
    h.link(repo, ContentKey::blob(&digest), bytes.len() as u64)
        .await
        .unwrap();
    digest
}

/// Pushes a manifest to `repo`, tagged `tag` when given.
async fn push(
    h: &Hosted,
    repo: &RepoName,
    tag: Option<&str>,
    media_type: &str,
    json: String,
) -> Digest {
    let bytes = bytes::Bytes::from(json);
    let digest = digest_of(Algorithm::Sha256, &bytes);
    let stored = StoredManifest {
        media_type: media_type.into(),
        bytes,
    };
    let size = h.store.put_manifest(&digest, &stored).await.unwrap();
    h.link(repo, ContentKey::manifest(&digest), size)
        .await
        .unwrap();
    if let Some(tag) = tag {
        let entry = TagEntry {
            digest: digest.clone(),
            media_type: Some(media_type.into()),
            size: None,
            checked_at: SystemTime::now(),
        };
        h.index
            .set_tag(repo, &Tag::parse(tag).unwrap(), entry)
            .await;
    }
    digest
}

fn descriptor(d: &Digest) -> String {
    format!(r#"{{"mediaType":"application/octet-stream","digest":"{d}","size":1}}"#)
}

/// An image manifest of `config` and `layers`, pushed.
async fn image(
    h: &Hosted,
    repo: &RepoName,
    tag: Option<&str>,
    config: &Digest,
    layers: &[&Digest],
) -> Digest {
    let layers: Vec<String> = layers.iter().map(|d| descriptor(d)).collect();
    let json = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{},"layers":[{}]}}"#,
        descriptor(config),
        layers.join(",")
    );
    push(h, repo, tag, OCI_MANIFEST, json).await
}

/// An index of `children`, pushed.
async fn index(h: &Hosted, repo: &RepoName, tag: Option<&str>, children: &[&Digest]) -> Digest {
    let children: Vec<String> = children.iter().map(|d| descriptor(d)).collect();
    let json = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{}]}}"#,
        children.join(",")
    );
    push(h, repo, tag, OCI_INDEX, json).await
}

async fn stored(h: &Hosted, kind: Kind, d: &Digest) -> bool {
    let key = ContentKey {
        kind,
        digest: d.clone(),
    };
    let on_disk = h.store.contains(&key).await.unwrap();
    assert_eq!(
        on_disk,
        h.index.entry(&key).await.is_some(),
        "{key:?}: index and disk agree"
    );
    on_disk
}

/// `DELETE` of a manifest by digest, as the API does it: its tags and its
/// link go.
async fn delete(h: &Hosted, repo: &RepoName, digest: &Digest) {
    for (r, tag, e) in h.index.tags().await {
        if r == *repo && e.digest == *digest {
            h.index.remove_tag(repo, &tag).await;
        }
    }
    h.index.drop_hold(repo, digest).await;
    h.collect_soon();
}

const GRACE: Duration = Duration::from_secs(3600);

/// Past the grace period of everything linked now.
fn later() -> SystemTime {
    SystemTime::now() + GRACE + Duration::from_secs(1)
}

#[tokio::test]
async fn a_deleted_manifests_unique_layers_go_after_the_grace_and_a_layer_shared_with_a_kept_manifest_stays(
) {
    let (_tmp, h) = open().await;
    let app = repo("team/app");
    let shared = upload(&h, &app, b"shared layer").await;
    let kept_layer = upload(&h, &app, b"kept layer").await;
    let kept_config = upload(&h, &app, b"kept config").await;
    let gone_layer = upload(&h, &app, b"gone layer").await;
    let gone_config = upload(&h, &app, b"gone config").await;
    let kept = image(
        &h,
        &app,
        Some("keep"),
        &kept_config,
        &[&shared, &kept_layer],
    )
    .await;
    let gone = image(&h, &app, Some("old"), &gone_config, &[&shared, &gone_layer]).await;
    let report = h.collect_at(later(), GRACE).await.unwrap();
    assert_eq!(report.removed(), 0, "everything is referenced: {report:?}");

    delete(&h, &app, &gone).await;
    assert!(h
        .index
        .tag(&app, &Tag::parse("old").unwrap())
        .await
        .is_none());
    let report = h.collect_at(SystemTime::now(), GRACE).await.unwrap();
    assert_eq!(
        (report.manifests, report.blobs),
        (1, 0),
        "its layers, linked just now, stay for the grace period: {report:?}"
    );
    assert!(h.blob(&app, &gone_layer).await.unwrap().is_some());

    let report = h.collect_at(later(), GRACE).await.unwrap();
    assert_eq!((report.manifests, report.blobs), (0, 2), "{report:?}");
    assert_eq!(report.kept, 4);
    assert!(report.bytes > 0);
    assert!(!stored(&h, Kind::Manifest, &gone).await);
    assert!(!stored(&h, Kind::Blob, &gone_layer).await);
    assert!(!stored(&h, Kind::Blob, &gone_config).await);
    assert!(
        !h.index.holds(&app, &gone_layer).await,
        "its link went with it"
    );
    assert!(stored(&h, Kind::Manifest, &kept).await);
    for d in [&shared, &kept_layer, &kept_config] {
        assert!(stored(&h, Kind::Blob, d).await);
        assert!(
            h.blob(&app, d).await.unwrap().is_some(),
            "the kept image's {d} is served"
        );
    }
    assert_eq!(
        h.collect_at(later(), GRACE).await.unwrap().removed(),
        0,
        "a second collection finds nothing"
    );
}

#[tokio::test]
async fn an_index_keeps_its_children_while_it_is_held() {
    let (_tmp, h) = open().await;
    let multi = repo("team/multi");
    let amd_layer = upload(&h, &multi, b"amd64 layer").await;
    let amd_config = upload(&h, &multi, b"amd64 config").await;
    let arm_layer = upload(&h, &multi, b"arm64 layer").await;
    let arm_config = upload(&h, &multi, b"arm64 config").await;
    let amd = image(&h, &multi, None, &amd_config, &[&amd_layer]).await;
    let arm = image(&h, &multi, None, &arm_config, &[&arm_layer]).await;
    let top = index(&h, &multi, Some("latest"), &[&amd, &arm]).await;
    // A child deleted while the index is held: it, and what it references, stay.
    delete(&h, &multi, &amd).await;
    assert_eq!(h.collect_at(later(), GRACE).await.unwrap().removed(), 0);
    for d in [&amd, &arm, &top] {
        assert!(stored(&h, Kind::Manifest, d).await);
    }

    // The index deleted too: the child nothing holds goes, the one held stays.
    delete(&h, &multi, &top).await;
    let report = h.collect_at(later(), GRACE).await.unwrap();
    assert_eq!((report.manifests, report.blobs), (2, 2), "{report:?}");
    assert!(!stored(&h, Kind::Manifest, &top).await);
    assert!(!stored(&h, Kind::Manifest, &amd).await);
    assert!(!stored(&h, Kind::Blob, &amd_layer).await);
    assert!(!stored(&h, Kind::Blob, &amd_config).await);
    assert!(h.manifest(&multi, &arm).await.unwrap().is_some());
    for d in [&arm_layer, &arm_config] {
        assert!(
            h.blob(&multi, d).await.unwrap().is_some(),
            "{d} of the child still held is served"
        );
    }
}

#[tokio::test]
async fn a_blob_only_linked_stays_for_the_grace_and_one_nothing_links_goes() {
    let (_tmp, h) = open().await;
    let app = repo("team/app");
    // Uploaded, its manifest not pushed yet.
    let pending = upload(&h, &app, b"a layer whose manifest comes next").await;
    // Committed and never linked (a crash between the two, found by a scan).
    let orphan = commit(&h, b"nothing links this").await;
    let report = h.collect_at(SystemTime::now(), GRACE).await.unwrap();
    assert_eq!(
        (report.manifests, report.blobs, report.kept),
        (0, 1, 1),
        "{report:?}"
    );
    assert!(stored(&h, Kind::Blob, &pending).await);
    assert!(h.blob(&app, &pending).await.unwrap().is_some());
    assert!(!stored(&h, Kind::Blob, &orphan).await);
    // A push abandoned for longer than the grace period.
    let report = h.collect_at(later(), GRACE).await.unwrap();
    assert_eq!(report.blobs, 1, "{report:?}");
    assert!(h.blob(&app, &pending).await.unwrap().is_none());
}

#[tokio::test]
async fn a_blob_found_by_a_head_is_kept_for_another_grace_period() {
    let (_tmp, h) = open().await;
    let app = repo("team/app");
    let layer = upload(&h, &app, b"a layer of a deleted image").await;
    let old = SystemTime::now() - 2 * GRACE;
    h.index.record(&ContentKey::blob(&layer), 26, old).await;
    // A client pushing an image with this layer checks it first...
    h.seen(&repo("team/other"), &layer).await;
    let report = h.collect_at(SystemTime::now(), GRACE).await.unwrap();
    assert_eq!(
        report.blobs, 1,
        "a check in another repository keeps nothing: {report:?}"
    );
    let layer = upload(&h, &app, b"a layer of a deleted image").await;
    h.index.record(&ContentKey::blob(&layer), 26, old).await;
    h.seen(&app, &layer).await;
    // ...so a collection before its manifest arrives keeps it.
    let report = h.collect_at(SystemTime::now(), GRACE).await.unwrap();
    assert_eq!(report.removed(), 0, "{report:?}");
    assert!(h.blob(&app, &layer).await.unwrap().is_some());
    // Unchecked, the same link would have gone.
    h.index.record(&ContentKey::blob(&layer), 26, old).await;
    let report = h.collect_at(SystemTime::now(), GRACE).await.unwrap();
    assert_eq!(report.blobs, 1, "{report:?}");
}

#[tokio::test]
async fn a_layer_another_repositorys_manifest_references_stays() {
    let (_tmp, h) = open().await;
    let (app, other) = (repo("team/app"), repo("team/other"));
    let layer = upload(&h, &app, b"mounted elsewhere").await;
    let config = upload(&h, &app, b"config").await;
    let m = image(&h, &app, Some("v1"), &config, &[&layer]).await;
    h.link(&other, ContentKey::blob(&layer), 17).await.unwrap();
    let other_config = upload(&h, &other, b"other config").await;
    image(&h, &other, Some("v1"), &other_config, &[&layer]).await;
    delete(&h, &app, &m).await;
    let report = h.collect_at(later(), GRACE).await.unwrap();
    assert_eq!((report.manifests, report.blobs), (1, 1), "{report:?}");
    assert!(h.blob(&other, &layer).await.unwrap().is_some());
    assert!(!stored(&h, Kind::Blob, &config).await);
}

#[tokio::test]
async fn the_index_written_after_a_collection_survives_a_restart() {
    let (tmp, h) = open().await;
    let app = repo("team/app");
    let layer = upload(&h, &app, b"layer").await;
    let m = image(&h, &app, Some("v1"), &layer, &[&layer]).await;
    delete(&h, &app, &m).await;
    assert_eq!(h.collect_at(later(), GRACE).await.unwrap().removed(), 2);
    drop(h);
    let again = Hosted::open(tmp.path(), &HostedConfig::default())
        .await
        .unwrap();
    assert!(again.index.contents().await.is_empty());
    assert!(again.index.repositories().await.is_empty());
}

#[tokio::test]
async fn a_collection_waits_for_a_check_and_link_in_progress() {
    let (_tmp, h) = open().await;
    let h = std::sync::Arc::new(h);
    let app = repo("team/app");
    // An upload's completion: the check (not stored) and the commit made...
    let link = h.commits.read().await;
    let digest = commit(&h, b"just uploaded").await;
    let collection = tokio::spawn({
        let h = h.clone();
        async move { h.collect().await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!collection.is_finished(), "the sweep waits for the link");
    // ...then the link, and only then the collection, which finds it linked.
    h.link(&app, ContentKey::blob(&digest), 13).await.unwrap();
    drop(link);
    let report = collection.await.unwrap().unwrap();
    assert_eq!(report.removed(), 0, "{report:?}");
    assert!(h.blob(&app, &digest).await.unwrap().is_some());
}

#[tokio::test]
async fn a_delete_or_a_request_asks_for_a_collection() {
    let (tmp, h) = open().await;
    assert!(!h.collection_wanted());
    let app = repo("team/app");
    let layer = upload(&h, &app, b"layer").await;
    let m = image(&h, &app, None, &layer, &[&layer]).await;
    delete(&h, &app, &m).await;
    assert!(h.collection_wanted());
    assert!(!h.collection_wanted(), "a delete asks once");
    Hosted::request_collection(tmp.path()).unwrap();
    assert!(h.collection_wanted());
    assert!(
        h.collection_wanted(),
        "a request stands until a collection ran"
    );
    h.collection_done();
    assert!(!h.collection_wanted());
}
