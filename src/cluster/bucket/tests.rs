//! Tests of the bucket on `object_store`'s in-memory store (which keeps
//! multipart uploads like S3: invisible until completed).

use std::collections::BTreeSet;

use futures_util::TryStreamExt;
use object_store::ObjectStoreExt;

use super::upload::PART_SIZE;
use super::*;
use crate::config::Secret;

fn digest(n: u8) -> Digest {
    Digest::parse(&format!("sha256:{}", hex::encode([n; 32]))).unwrap()
}

/// Deterministic bytes that differ from part to part.
fn data(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

async fn collect(read: BucketRead) -> Vec<u8> {
    let chunks: Vec<Bytes> = read.stream.try_collect().await.unwrap();
    chunks.concat()
}

/// Every object in the store, markers included.
async fn objects(bucket: &Bucket) -> Vec<String> {
    let all: Vec<_> = bucket.inner.store.list(None).try_collect().await.unwrap();
    all.into_iter().map(|m| m.location.to_string()).collect()
}

async fn put_blob(bucket: &Bucket, d: &Digest, bytes: &[u8]) {
    let mut upload = bucket.upload(d, "http://replica-a:5000").await.unwrap();
    upload.push(Bytes::copy_from_slice(bytes)).await.unwrap();
    upload.complete().await.unwrap();
}

#[tokio::test]
async fn a_blob_pushed_in_odd_chunks_across_parts_reads_back_exactly_and_by_range() {
    let bucket = Bucket::in_memory();
    let d = digest(1);
    let blob = data(2 * PART_SIZE + 12_345);
    let mut upload = bucket.upload(&d, "http://replica-a:5000").await.unwrap();
    let mut rest = &blob[..];
    for size in [1, 1_000_003, 7, 3 << 20, 4_999_999].into_iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (chunk, tail) = rest.split_at(size.min(rest.len()));
        upload.push(Bytes::copy_from_slice(chunk)).await.unwrap();
        rest = tail;
    }
    assert_eq!(
        upload.parts_started(),
        2,
        "two full parts sent before the last"
    );
    // Not visible before it is completed.
    assert!(bucket.read(&d, None).await.unwrap().is_none());
    upload.complete().await.unwrap();

    let size = blob.len() as u64;
    assert_eq!(
        bucket.head(&ContentKey::blob(&d)).await.unwrap(),
        Some(size)
    );
    let whole = bucket.read(&d, None).await.unwrap().unwrap();
    assert_eq!(whole.size, size);
    assert!(collect(whole).await == blob, "whole blob differs");

    let boundary = PART_SIZE as u64;
    for range in [
        0..1,
        boundary - 3..boundary + 5,
        size - 1..size,
        0..size,
        17..17,
    ] {
        let read = bucket.read(&d, Some(range.clone())).await.unwrap().unwrap();
        assert_eq!(read.size, size, "{range:?}");
        let got = collect(read).await;
        assert!(
            got == blob[range.start as usize..range.end as usize],
            "range {range:?} differs"
        );
    }
    assert!(bucket.read(&d, Some(size - 1..size + 1)).await.is_err());
    assert!(objects(&bucket).await == vec![format!("blobs/sha256/{}", d.hex())]);
}

#[tokio::test]
async fn a_blob_of_whole_parts_and_the_empty_blob_complete() {
    let bucket = Bucket::in_memory();
    let (whole, empty) = (digest(2), digest(3));
    let blob = data(PART_SIZE);
    put_blob(&bucket, &whole, &blob).await;
    let read = bucket.read(&whole, None).await.unwrap().unwrap();
    assert!(collect(read).await == blob);

    let upload = bucket.upload(&empty, "h").await.unwrap();
    upload.complete().await.unwrap();
    let read = bucket.read(&empty, None).await.unwrap().unwrap();
    assert_eq!(read.size, 0);
    assert!(collect(read).await.is_empty());
    assert_eq!(
        bucket.read(&empty, Some(0..0)).await.unwrap().unwrap().size,
        0
    );
    assert!(bucket.pending_uploads().await.unwrap().is_empty());
}

#[tokio::test]
async fn absent_items_are_none() {
    let bucket = Bucket::in_memory();
    let d = digest(4);
    assert!(bucket.read(&d, None).await.unwrap().is_none());
    assert!(bucket.read(&d, Some(0..10)).await.unwrap().is_none());
    assert!(bucket.read(&d, Some(0..0)).await.unwrap().is_none());
    assert_eq!(bucket.head(&ContentKey::blob(&d)).await.unwrap(), None);
    assert!(bucket.get_manifest(&d).await.unwrap().is_none());
    bucket.remove(&ContentKey::manifest(&d)).await.unwrap();
    bucket.ping().await.unwrap();
}

#[tokio::test]
async fn an_aborted_upload_leaves_no_object_and_no_marker() {
    let bucket = Bucket::in_memory();
    let d = digest(5);
    let mut upload = bucket.upload(&d, "h").await.unwrap();
    upload
        .push(Bytes::from(data(PART_SIZE + 10)))
        .await
        .unwrap();
    assert_eq!(bucket.pending_uploads().await.unwrap().len(), 1);
    upload.abort().await;
    assert!(bucket.read(&d, None).await.unwrap().is_none());
    assert!(bucket.pending_uploads().await.unwrap().is_empty());
    assert!(objects(&bucket).await.is_empty());
}

#[tokio::test]
async fn a_dropped_upload_is_pending_until_aborted() {
    let bucket = Bucket::in_memory();
    let d = digest(6);
    let before = SystemTime::now() - Duration::from_secs(1);
    let mut upload = bucket.upload(&d, "http://replica-b:5000").await.unwrap();
    upload
        .push(Bytes::from(data(PART_SIZE + 10)))
        .await
        .unwrap();
    drop(upload);

    let pending = bucket.pending_uploads().await.unwrap();
    let [p] = pending.as_slice() else {
        panic!("{pending:?}")
    };
    assert_eq!(p.digest, d);
    assert_eq!(p.holder, "http://replica-b:5000");
    assert!(p.started >= before && p.started <= SystemTime::now());
    assert!(bucket.scan().await.unwrap().is_empty());

    bucket.abort_pending(p).await.unwrap();
    assert!(bucket.pending_uploads().await.unwrap().is_empty());
    assert!(objects(&bucket).await.is_empty());
    // The multipart upload itself is gone.
    assert!(bucket
        .inner
        .multipart
        .abort_multipart(&p.path, &p.multipart_id)
        .await
        .is_err());
}

#[tokio::test]
async fn a_manifest_round_trips_and_a_damaged_one_is_deleted() {
    let bucket = Bucket::in_memory();
    let bytes = Bytes::from_static(br#"{"schemaVersion":2}"#);
    let d = digest_of(crate::reference::Algorithm::Sha256, &bytes);
    let m = StoredManifest {
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        bytes,
    };
    assert_eq!(bucket.put_manifest(&d, &m).await.unwrap(), m.stored_size());
    assert_eq!(bucket.get_manifest(&d).await.unwrap(), Some(m.clone()));
    assert_eq!(
        bucket.head(&ContentKey::manifest(&d)).await.unwrap(),
        Some(m.stored_size())
    );

    let path = bucket.inner.path(Kind::Manifest, &d);
    for damage in [&b"application/json\n{}"[..], b"no media type line"] {
        bucket
            .inner
            .store
            .put(&path, PutPayload::from(damage.to_vec()))
            .await
            .unwrap();
        assert_eq!(bucket.get_manifest(&d).await.unwrap(), None);
        assert_eq!(bucket.head(&ContentKey::manifest(&d)).await.unwrap(), None);
    }
}

#[tokio::test]
async fn scan_lists_exactly_the_committed_items() {
    let store = Arc::new(InMemory::new());
    let bucket = Bucket::on_memory(store.clone(), Path::from("m1"));
    let (a, empty, pending) = (digest(7), digest(8), digest(9));
    put_blob(&bucket, &a, b"hello").await;
    bucket
        .upload(&empty, "h")
        .await
        .unwrap()
        .complete()
        .await
        .unwrap();
    let bytes = Bytes::from_static(b"{}");
    let m = digest_of(crate::reference::Algorithm::Sha256, &bytes);
    let manifest = StoredManifest {
        media_type: "application/json".into(),
        bytes,
    };
    bucket.put_manifest(&m, &manifest).await.unwrap();
    let mut dropped = bucket.upload(&pending, "h").await.unwrap();
    dropped.push(Bytes::from_static(b"partial")).await.unwrap();
    drop(dropped);
    // Strays: not digests, too deep, another area, outside the prefix.
    for stray in [
        "m1/blobs/sha256/nothex",
        "m1/blobs/md5/00",
        format!("m1/blobs/sha256/{}/x", a.hex()).as_str(),
        "m1/other/x",
        "m1/uploads/garbage.json",
        format!("m2/blobs/sha256/{}", pending.hex()).as_str(),
    ] {
        store
            .put(&Path::from(stray), PutPayload::from_static(b"x"))
            .await
            .unwrap();
    }

    let found: BTreeSet<_> = bucket
        .scan()
        .await
        .unwrap()
        .into_iter()
        .map(|f| (f.key, f.size))
        .collect();
    let expected = BTreeSet::from([
        (ContentKey::blob(&a), 5),
        (ContentKey::blob(&empty), 0),
        (ContentKey::manifest(&m), manifest.stored_size()),
    ]);
    assert_eq!(found, expected);
    let pending_now = bucket.pending_uploads().await.unwrap();
    assert_eq!(pending_now.len(), 1);
    assert_eq!(pending_now[0].digest, pending);
    assert_eq!(bucket.describe(), "memory:///m1/");

    bucket.remove(&ContentKey::blob(&a)).await.unwrap();
    assert_eq!(bucket.scan().await.unwrap().len(), 2);
}

fn s3_config(path_style: bool) -> S3Config {
    S3Config {
        endpoint: Some("http://127.0.0.1:3900".parse().unwrap()),
        bucket: Some("cache".into()),
        region: "garage".into(),
        prefix: "m1/".into(),
        path_style,
        access_key_id: Some(Secret::new("GK0123456789abcdef01234567")),
        secret_access_key: Some(Secret::new("s3cr3t-0f-the-bucket-never-shown")),
        ..S3Config::default()
    }
}

#[test]
fn describe_and_debug_never_show_the_credentials() {
    let bucket = Bucket::from_config(&s3_config(true)).unwrap();
    assert_eq!(bucket.describe(), "s3://cache/m1/ at http://127.0.0.1:3900");
    let shown = format!("{} {bucket:?}", bucket.describe());
    for secret in ["s3cr3t-0f", "GK0123456789"] {
        assert!(!shown.contains(secret), "{shown}");
    }

    let e = bucket.inner.fail(
        "get",
        object_store::Error::Generic {
            store: "S3",
            source: "InvalidAccessKeyId: GK0123456789abcdef01234567 with s3cr3t-0f-the-bucket-never-shown".into(),
        },
    );
    assert!(!e.to_string().contains("GK0123456789"), "{e}");
    assert!(!e.to_string().contains("s3cr3t"), "{e}");
}

#[test]
fn from_config_checks_what_the_client_needs() {
    // Virtual-hosted style needs a host name for the bucket.
    let e = Bucket::from_config(&s3_config(false)).unwrap_err();
    assert!(e.to_string().contains("path_style"), "{e}");
    let mut named = s3_config(false);
    named.endpoint = Some("https://s3.example.com/".parse().unwrap());
    let bucket = Bucket::from_config(&named).unwrap();
    assert_eq!(
        bucket.describe(),
        "s3://cache/m1/ at https://s3.example.com"
    );

    let mut aws = s3_config(false);
    aws.endpoint = None;
    aws.prefix = String::new();
    aws.region = "eu-west-1".into();
    assert_eq!(
        Bucket::from_config(&aws).unwrap().describe(),
        "s3://cache/ in AWS region eu-west-1"
    );

    let mut no_bucket = s3_config(true);
    no_bucket.bucket = None;
    assert!(Bucket::from_config(&no_bucket).is_err());

    let mut userinfo = s3_config(true);
    userinfo.endpoint = Some("http://user:hunter2@127.0.0.1:3900".parse().unwrap());
    let e = Bucket::from_config(&userinfo).unwrap_err();
    assert!(!e.to_string().contains("hunter2"), "{e}");
}
