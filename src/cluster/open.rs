//! The shared parts a configuration names, opened for a replica or for the
//! admin commands: the bucket, the coordinator (Redis, or this process's
//! memory) and the bucket's index in Redis. Nothing here connects yet:
//! Redis at its first call, the bucket at its first request.

use std::sync::Arc;

use super::bucket::Bucket;
use super::coordinator::{Coordinator, MemoryCoordinator, RedisCoordinator};
use super::peer::PeerClient;
use super::redis::{self, RedisConn};
use super::redis_index::RedisIndex;
use super::tiers::Tiers;
use super::Health;
use crate::cache::policy::Budget;
use crate::cache::store::Index;
use crate::config::{Backend, Config};
use crate::error::Error;
use crate::metrics::Metrics;

/// What `open` gives.
pub struct Shared {
    pub tiers: Arc<Tiers>,
    /// The bucket's sizes and access times, tags and memberships: with Redis.
    pub index: Option<Arc<RedisIndex>>,
    /// The hosted repositories' tags and links, with Redis (keys of their
    /// own, beside the cache's).
    pub hosted_index: Option<Arc<RedisIndex>>,
    pub redis: Option<Arc<Health>>,
    /// `storage.max_size` as watermarks (the cache's percentages).
    pub budget: Option<Budget>,
}

/// The shared parts of `config`; `None` for the disk backend.
pub fn open(config: &Config, metrics: &Arc<Metrics>) -> Result<Option<Shared>, Error> {
    if config.storage.backend != Backend::S3 {
        return Ok(None);
    }
    let bucket = Arc::new(
        Bucket::from_config(&config.storage.s3)
            .map_err(|e| Error::Internal(format!("opening the bucket: {e}")))?,
    );
    let advertise = config
        .cluster
        .advertise
        .as_ref()
        .map_or_else(|| format!("http://{}/", config.listen), |u| u.to_string());
    let (coordinator, index, hosted_index, redis): (Arc<dyn Coordinator>, _, _, _) =
        match &config.cluster.redis {
            Some(url) => {
                // Connects at the first call: a replica starts, and serves on
                // its own, while Redis is down.
                let conn = RedisConn::lazy(url, redis::TIMEOUT)
                    .map_err(|e| Error::Internal(format!("cluster.redis: {e}")))?;
                let health = conn.health();
                let coordinator = RedisCoordinator::new(conn.clone(), redis::DEFAULT_PREFIX);
                let index = Arc::new(RedisIndex::new(conn.clone(), redis::DEFAULT_PREFIX));
                let hosted = Arc::new(RedisIndex::new(
                    conn,
                    format!("{}:{}", redis::DEFAULT_PREFIX, crate::hosted::DIR),
                ));
                (
                    Arc::new(coordinator),
                    Some(index),
                    Some(hosted),
                    Some(health),
                )
            }
            None => (Arc::new(MemoryCoordinator::new()), None, None, None),
        };
    let peers = match &config.cluster.secret {
        Some(secret) => Some(PeerClient::new(
            secret.clone(),
            config.upstream.connect_timeout,
        )?),
        None => None,
    };
    let tiers = Arc::new(Tiers {
        bucket,
        bucket_health: Arc::new(Health::new("bucket")),
        coordinator,
        shared: index.clone().map(|i| i as Arc<dyn Index>),
        advertise,
        peers,
        metrics: metrics.clone(),
    });
    let budget = config.storage.max_size.map(|max| {
        Budget::new(
            max.0,
            config.cache.high_watermark,
            config.cache.low_watermark,
        )
    });
    Ok(Some(Shared {
        tiers,
        index,
        hosted_index,
        redis,
        budget,
    }))
}
