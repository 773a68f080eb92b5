//! `gc`, `ls` and `du` on the shared store of a cluster (`storage.backend
//! = "s3"`): what the bucket holds, the tags the cluster knows (with Redis),
//! and the upkeep a replica runs, now: dead replicas' uploads aborted, the
//! bucket's index reconciled with a scan, the bucket brought under
//! `storage.max_size`.

use std::io;
use std::sync::Arc;
use std::time::SystemTime;

use super::{list_from, TagRow, Tally};
use crate::cache::store::disk::DiskStore;
use crate::cache::store::Index;
use crate::cluster::open::{self, Shared};
use crate::cluster::tiered_store::TieredStore;
use crate::cluster::upkeep;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::reference::Digest;

fn shared(config: &Config) -> io::Result<Option<Shared>> {
    open::open(config, &Arc::new(Metrics::new())).map_err(io::Error::other)
}

fn bucket_error(e: crate::cluster::SharedError) -> io::Error {
    io::Error::other(e.to_string())
}

/// Fails when Redis was asked and did not answer: the command's answer
/// would be an empty one, not the truth.
fn redis_answered(shared: &Shared) -> io::Result<()> {
    match &shared.redis {
        Some(redis) if !redis.is_up() => Err(io::Error::other(format!(
            "Redis cannot be reached: {}",
            redis.last_error().unwrap_or_default()
        ))),
        _ => Ok(()),
    }
}

/// What the bucket holds, for `du`.
#[derive(Debug, Clone, Default)]
pub struct BucketUsage {
    pub description: String,
    pub items: Tally,
    /// Uploads not completed (in flight, or left by a crash).
    pub pending_uploads: usize,
    pub max_size: Option<u64>,
}

/// The bucket's contents by a scan; `None` for the disk backend.
pub async fn usage(config: &Config) -> io::Result<Option<BucketUsage>> {
    let Some(shared) = shared(config)? else {
        return Ok(None);
    };
    let bucket = &shared.tiers.bucket;
    let mut u = BucketUsage {
        description: bucket.describe(),
        pending_uploads: bucket.pending_uploads().await.map_err(bucket_error)?.len(),
        max_size: config.storage.max_size.map(|m| m.0),
        ..BucketUsage::default()
    };
    for found in bucket.scan().await.map_err(bucket_error)? {
        u.items.add(found.key.kind, found.size);
    }
    Ok(Some(u))
}

/// The tags the cluster knows (Redis), sized by what the bucket holds;
/// `None` without Redis (each replica's disk then says, as on one node).
pub async fn list(config: &Config) -> io::Result<Option<Vec<TagRow>>> {
    let Some(shared) = shared(config)? else {
        return Ok(None);
    };
    let Some(index) = shared.index.clone() else {
        return Ok(None);
    };
    let store = TieredStore {
        local: Arc::new(DiskStore::open(&config.data_dir)?),
        bucket: shared.tiers.bucket.clone(),
        bucket_health: shared.tiers.bucket_health.clone(),
        shared: None,
        keep_locally: false,
    };
    let rows = list_from(&store, index.as_ref()).await?;
    redis_answered(&shared)?;
    Ok(Some(rows))
}

/// What `gc` did to the shared store.
#[derive(Debug, Clone, Default)]
pub struct SharedGc {
    pub uploads_aborted: usize,
    pub evicted: usize,
    pub evicted_bytes: u64,
    /// Whether the bucket's index (Redis) was reconciled with a scan.
    pub reconciled: bool,
}

/// Runs the shared store's upkeep now; `None` for the disk backend.
/// `mirror_running`: a replica serves this data dir, so uploads in its
/// name may be live and are left to it.
pub async fn gc(config: &Config, mirror_running: bool) -> io::Result<Option<SharedGc>> {
    let Some(shared) = shared(config)? else {
        return Ok(None);
    };
    let tiers = &shared.tiers;
    let now = SystemTime::now();
    let peers = tiers
        .coordinator
        .peers(now, upkeep::ANNOUNCE_EVERY * 3)
        .await
        .unwrap_or_default();
    // `peers` was the first call to Redis: it says whether Redis answers.
    let redis_up = shared.redis.as_ref().is_some_and(|h| h.is_up());
    let live = |_: &Digest| mirror_running;
    let mut report = SharedGc {
        uploads_aborted: upkeep::abort_dead_uploads(tiers, &peers, redis_up, &live, now).await,
        ..SharedGc::default()
    };
    if let (Some(index), true) = (&shared.index, redis_up) {
        let mark = index.begin_scan().await;
        let found = tiers.bucket.scan().await.map_err(bucket_error)?;
        index.reconcile(mark, found).await;
        report.reconciled = true;
        if let Some(budget) = &shared.budget {
            for (_, size) in upkeep::evict_bucket(tiers, index, budget).await {
                report.evicted += 1;
                report.evicted_bytes += size;
            }
        }
    }
    redis_answered(&shared)?;
    Ok(Some(report))
}
