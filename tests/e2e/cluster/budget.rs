//! The bucket's budget (`storage.max_size`), one LRU for the whole cluster whoever served the
//! hit: images worth 3 times the budget, pulled one after another through the replicas in
//! turn, leave the bucket within the budget, holding the images pulled last; and the first
//! image, pulled again after each of the others from the one replica whose disk holds it (a
//! local hit, which never reads the bucket), is kept too.

use std::time::Duration;

use crate::cluster::world::{ClusterWorld, Setup};
use crate::cluster::{push_image, skopeo_pull};
use crate::push::Pusher;

/// `storage.max_size`.
const BUDGET: u64 = 32 * 1024 * 1024;
/// Each image's one layer; 12 images are 3 budgets.
const LAYER: usize = 8 * 1024 * 1024;
const IMAGES: usize = 12;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bucket_keeps_within_its_budget_and_keeps_the_last_pulled() {
    let mut setup = Setup::env(&[
        ("REGMIRROR_STORAGE_MAX_SIZE", &BUDGET.to_string()),
        ("REGMIRROR_CACHE_TAG_TTL", "1h"),
    ]);
    setup.writable = true;
    let cluster = ClusterWorld::start(setup).await;
    let mut images = Vec::new();
    for i in 0..IMAGES {
        let name = format!("budget-{i}");
        let pusher = Pusher::new(
            cluster.upstream(),
            &cluster.world.issuer,
            &format!("library/{name}"),
        );
        images.push(push_image(&pusher, &name, LAYER, 0xb0d6e7 + i as u64).await);
    }
    let first = cluster.replicas[0].addr();
    for (i, img) in images.iter().enumerate() {
        let replica = &cluster.replicas[i % cluster.replicas.len()];
        skopeo_pull(&cluster.world, &replica.addr(), img, &format!("b{i}")).await;
        if i > 0 {
            skopeo_pull(&cluster.world, &first, &images[0], &format!("again{i}")).await;
        }
    }

    // Eviction runs after the fills (on one replica at a time): wait until it is done. The
    // listing is what counts: Garage's own counters lag behind it.
    let s3 = cluster.garage.s3();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let held = loop {
        let objects = s3.list().await;
        let bytes: u64 = objects.iter().map(|o| o.size).sum();
        if bytes <= BUDGET {
            break objects;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the bucket holds {bytes} bytes 120s after the last pull, over storage.max_size = \
             {BUDGET}: {:?}\n{}",
            objects.iter().map(|o| (&o.key, o.size)).collect::<Vec<_>>(),
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let held: Vec<String> = held.iter().filter_map(|o| o.blob_digest()).collect();
    let kept: Vec<bool> = images
        .iter()
        .map(|img| held.contains(&img.platform("amd64").layers[0]))
        .collect();
    let summary: String = kept.iter().map(|k| if *k { 'K' } else { '-' }).collect();
    eprintln!("[e2e] layers kept in the bucket, in pull order (K = kept): {summary}");
    assert!(
        kept[0],
        "the first image, pulled again from replica 0's disk after every other pull, was \
         evicted from the bucket as the least recently used (K = kept): {summary}"
    );
    let first_kept = 1 + kept[1..].iter().position(|k| *k).unwrap_or(IMAGES - 1);
    assert!(
        kept[first_kept..].iter().all(|k| *k),
        "the bucket kept layers of earlier pulls while it evicted later ones (in pull order, \
         K = kept): {summary}\n{}",
        cluster.logs()
    );
    assert!(
        IMAGES - first_kept >= 2,
        "the bucket should keep at least the last 2 images pulled (16 MiB of a 32 MiB budget), \
         each pulled on another replica; in pull order (K = kept): {summary}"
    );
}
