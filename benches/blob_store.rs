//! The disk blob store (`regmirror::cache::store::disk::DiskStore`) on the paths a blob takes: a
//! download's spool written and committed (fsync, rename, directory fsync), and a cached blob
//! opened and read back in 256 KiB positional reads: plain reads, one `spawn_blocking` per
//! read (how the server read until it tried the page cache first), and the server's own
//! stream (`regmirror::cache::download::Source`, `preadv2(RWF_NOWAIT)` on the worker). 64 MiB blobs
//! in a temp dir under `target/`; quick by default: `cargo bench --bench blob_store`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use futures_util::StreamExt as _;
use regmirror::cache::download::Source;
use regmirror::cache::store::disk::DiskStore;
use regmirror::cache::store::BlobStore;
use regmirror::hashing::digest_of;
use regmirror::reference::Algorithm;

const WRITE_PIECE: usize = 1 << 20;
const READ_PIECE: usize = 256 * 1024;

/// A temp dir on the same filesystem as the build (not a tmpfs `/tmp`), so fsync is real.
fn scratch() -> tempfile::TempDir {
    let base = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target");
    std::fs::create_dir_all(&base).expect("create target/");
    tempfile::Builder::new()
        .prefix("bench-blob-store-")
        .tempdir_in(base)
        .expect("temp dir")
}

fn blob_store(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = scratch();
    let store = DiskStore::open(dir.path()).expect("open store");
    let size = support::big_size();
    let mib = size >> 20;
    let data = Arc::new(support::noise(size, 0x0b10_b570_4e00_0001));
    let digest = digest_of(Algorithm::Sha256, &data);

    let mut group = c.benchmark_group("blob_store");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Bytes(size as u64));

    // Every iteration commits the same digest again: the rename replaces the previous file.
    group.bench_function(format!("spool_write_commit/{mib}MiB"), |b| {
        b.iter(|| {
            rt.block_on(async {
                let spool = store.spool().await.expect("spool");
                let file = Arc::clone(&spool.file);
                let bytes = Arc::clone(&data);
                tokio::task::spawn_blocking(move || {
                    for (i, piece) in bytes.chunks(WRITE_PIECE).enumerate() {
                        file.write_all_at(piece, (i * WRITE_PIECE) as u64)?;
                    }
                    Ok::<_, std::io::Error>(())
                })
                .await
                .expect("join")
                .expect("write spool");
                store.commit_blob(spool, &digest).await.expect("commit");
            })
        })
    });

    group.bench_function(format!("open_read_sync/{mib}MiB"), |b| {
        let mut buf = vec![0u8; READ_PIECE];
        b.iter(|| {
            let blob = rt
                .block_on(store.open_blob(&digest))
                .expect("open")
                .expect("cached");
            let mut pos = 0u64;
            while pos < blob.size {
                let n = blob.file.read_at(&mut buf, pos).expect("read");
                assert!(n > 0, "blob shorter than its size");
                pos += n as u64;
            }
            black_box(pos)
        })
    });

    group.bench_function(format!("open_read_spawn_blocking/{mib}MiB"), |b| {
        b.iter(|| {
            rt.block_on(async {
                let blob = store
                    .open_blob(&digest)
                    .await
                    .expect("open")
                    .expect("cached");
                let mut pos = 0u64;
                while pos < blob.size {
                    let file = Arc::clone(&blob.file);
                    let len = (blob.size - pos).min(READ_PIECE as u64) as usize;
                    let chunk = tokio::task::spawn_blocking(move || {
                        let mut buf = vec![0u8; len];
                        file.read_exact_at(&mut buf, pos).map(|()| buf)
                    })
                    .await
                    .expect("join")
                    .expect("read");
                    pos += black_box(chunk).len() as u64;
                }
                pos
            })
        })
    });
    group.bench_function(format!("open_stream_source/{mib}MiB"), |b| {
        b.iter(|| {
            rt.block_on(async {
                let blob = store
                    .open_blob(&digest)
                    .await
                    .expect("open")
                    .expect("cached");
                let size = blob.size;
                let mut body = std::pin::pin!(Source::from(blob).stream(0, Some(size)));
                let mut pos = 0u64;
                while let Some(chunk) = body.next().await {
                    pos += black_box(chunk.expect("read")).len() as u64;
                }
                assert_eq!(pos, size, "stream shorter than the blob");
                pos
            })
        })
    });
    group.finish();
}

criterion_group!(benches, blob_store);
criterion_main!(benches);
