//! Digest hashing as downloads and cache checks do it: `regmirror::hashing::Hasher` over 1 MiB
//! and 64 MiB buffers, sha256 and sha512, fed in 256 KiB pieces (the size the mirror reads
//! cached blobs in). Quick by default: `cargo bench --bench digest`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use regmirror::hashing::Hasher;
use regmirror::reference::Algorithm;

const PIECE: usize = 256 * 1024;

fn digest(c: &mut Criterion) {
    let mut group = c.benchmark_group("digest");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let mut sizes = vec![1usize << 20, support::big_size()];
    sizes.dedup();
    for size in sizes {
        let label = format!("{}MiB", size >> 20);
        let data = support::noise(size, 0x5eed_0fd1_6e57);
        group.throughput(Throughput::Bytes(size as u64));
        for (name, alg) in [("sha256", Algorithm::Sha256), ("sha512", Algorithm::Sha512)] {
            group.bench_with_input(BenchmarkId::new(name, &label), &data, |b, data| {
                b.iter(|| {
                    let mut hasher = Hasher::new(alg);
                    for piece in data.chunks(PIECE) {
                        hasher.update(piece);
                    }
                    black_box(hasher.finish())
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, digest);
criterion_main!(benches);
