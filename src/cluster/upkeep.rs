//! The shared store's upkeep, run by every replica (and `regmirror gc`):
//! aborting the uploads that dead replicas left, and keeping the bucket
//! within `storage.max_size`, least recently used first, by the one replica
//! that holds the eviction lock.

use std::time::{Duration, SystemTime};

use super::bucket::Bucket;
use super::redis_index::RedisIndex;
use super::tiers::{Tiers, LEASE_TTL};
use super::Health;
use crate::cache::policy::Budget;
use crate::cache::store::{ContentKey, Index};
use crate::reference::Digest;

/// How often a replica says it is alive; a replica silent for three times
/// this is taken for dead.
pub const ANNOUNCE_EVERY: Duration = Duration::from_secs(10);
/// An upload of a replica not known dead is aborted only once it is this
/// old (Redis down: nobody knows who is alive).
pub const UPLOAD_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// Bucket items evicted per batch.
const EVICT_BATCH: usize = 256;
/// How long the eviction lock lasts (a replica that dies holding it delays
/// the next eviction by at most this).
const EVICT_LOCK: Duration = Duration::from_secs(60);

/// Aborts the uploads whose replica is gone: this replica's own that no
/// download of it runs (`live` says which do), another's that has not
/// announced itself lately (Redis up), or any older than a day. Returns how
/// many it aborted.
pub async fn abort_dead_uploads(
    tiers: &Tiers,
    peers: &[(String, SystemTime)],
    redis_up: bool,
    live: &(dyn Fn(&Digest) -> bool + Sync),
    now: SystemTime,
) -> usize {
    let area = Area {
        bucket: &tiers.bucket,
        health: &tiers.bucket_health,
        advertise: &tiers.advertise,
    };
    abort_dead_uploads_in(area, peers, redis_up, live, now).await
}

/// A bucket area whose uploads a replica looks after: the cache's, or the
/// hosted repositories' (`bucket.under("hosted")`).
#[derive(Clone, Copy)]
pub struct Area<'a> {
    pub bucket: &'a Bucket,
    pub health: &'a Health,
    /// This replica, as its markers name it.
    pub advertise: &'a str,
}

/// [`abort_dead_uploads`] in one area.
pub async fn abort_dead_uploads_in(
    area: Area<'_>,
    peers: &[(String, SystemTime)],
    redis_up: bool,
    live: &(dyn Fn(&Digest) -> bool + Sync),
    now: SystemTime,
) -> usize {
    let Area {
        bucket,
        health,
        advertise,
    } = area;
    let pending = match bucket.pending_uploads().await {
        Ok(p) => p,
        Err(e) => {
            health.failed(e);
            return 0;
        }
    };
    let mut aborted = 0;
    for upload in pending {
        let age = now.duration_since(upload.started).unwrap_or_default();
        let dead = if upload.holder == advertise {
            !live(&upload.digest)
        } else if redis_up {
            age > LEASE_TTL && !peers.iter().any(|(p, _)| *p == upload.holder)
        } else {
            age > UPLOAD_MAX_AGE
        };
        if !dead {
            continue;
        }
        tracing::info!(digest = %upload.digest, holder = %upload.holder, "aborting an upload its replica abandoned");
        match bucket.abort_pending(&upload).await {
            Ok(()) => aborted += 1,
            Err(e) => {
                tracing::warn!(digest = %upload.digest, error = %e, "cannot abort an abandoned upload");
            }
        }
    }
    aborted
}

/// Brings the bucket under `budget` if this replica gets the eviction lock;
/// returns what it evicted, with sizes.
pub async fn evict_bucket(
    tiers: &Tiers,
    index: &RedisIndex,
    budget: &Budget,
) -> Vec<(ContentKey, u64)> {
    let mut evicted = Vec::new();
    let Ok(mut total) = index.total_bytes().await else {
        return evicted;
    };
    if total <= budget.high {
        return evicted;
    }
    let Ok(Some(lock)) = tiers
        .coordinator
        .lock("evict", &tiers.advertise, EVICT_LOCK)
        .await
    else {
        return evicted;
    };
    'batches: while total > budget.low {
        let Ok(oldest) = index.oldest(EVICT_BATCH).await else {
            break;
        };
        if oldest.is_empty() {
            break;
        }
        let mut progressed = false;
        for (key, entry) in oldest {
            if total <= budget.low {
                break 'batches;
            }
            // Forgotten first: a replica that reads the index meanwhile
            // fetches it again rather than trusting a vanishing object.
            if !index.forget_if(&key, entry).await {
                continue;
            }
            if let Err(e) = tiers.bucket.remove(&key).await {
                tracing::warn!(digest = %key.digest, error = %e, "cannot remove an evicted object from the bucket");
                index.record(&key, entry.size, entry.last_access).await;
                break 'batches;
            }
            progressed = true;
            total = total.saturating_sub(entry.size);
            evicted.push((key, entry.size));
        }
        if !progressed {
            break;
        }
    }
    let _ = tiers.coordinator.release(&lock).await;
    if !evicted.is_empty() {
        tracing::info!(items = evicted.len(), "evicted from the bucket");
    }
    evicted
}
