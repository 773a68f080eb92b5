//! The registry as a replica: its shared parts opened from the
//! configuration, the peer endpoint, and the cluster's upkeep (announcing
//! itself, evicting from the bucket one replica at a time, aborting uploads
//! that crashed replicas left).

use std::sync::Arc;
use std::time::SystemTime;

use http::{header, HeaderMap, StatusCode};

use super::Registry;
use crate::cache::download::Joined;
use crate::cache::policy::Budget;
use crate::cache::store::{BlobStore, Index};
use crate::cluster::peer;
use crate::cluster::redis_index::RedisIndex;
use crate::cluster::shared_index::SharedIndex;
use crate::cluster::tiered_store::TieredStore;
use crate::cluster::tiers::Tiers;
use crate::cluster::upkeep::{self, ANNOUNCE_EVERY};
use crate::cluster::Health;
use crate::config::{Config, Secret};
use crate::error::Error;
use crate::reference::Digest;
use crate::response::{self, Outcome, Reply, CONTENT_DIGEST};

/// What a replica shares with the others.
pub(super) struct Cluster {
    pub tiers: Arc<Tiers>,
    pub secret: Option<Secret>,
    pub redis: Option<Arc<Health>>,
    /// The bucket's own index (sizes, access times), with Redis.
    pub bucket_index: Option<Arc<RedisIndex>>,
    /// `storage.max_size` as watermarks.
    pub budget: Option<Budget>,
    /// The hosted repositories' index in Redis.
    pub hosted_index: Option<Arc<RedisIndex>>,
}

/// The store and index a registry runs on: the local disk's, or those
/// tiered over the shared parts, and the shared parts.
pub(super) type Parts = (Arc<dyn BlobStore>, Arc<dyn Index>, Option<Cluster>);

/// Opens the shared parts `config` names around the local store and index.
pub(super) async fn open(
    config: &Config,
    local: Arc<dyn BlobStore>,
    index: Arc<dyn Index>,
    metrics: &Arc<crate::metrics::Metrics>,
) -> Result<Parts, Error> {
    let Some(shared) = crate::cluster::open::open(config, metrics)? else {
        return Ok((local, index, None));
    };
    let tiers = shared.tiers;
    if let Err(e) = tiers.bucket.ping().await {
        // Served from the local tier meanwhile; misses get 503 until it answers.
        tiers.bucket_health.failed(e);
    }
    let index: Arc<dyn Index> = match &shared.index {
        Some(redis) => Arc::new(SharedIndex::new(index, redis.clone())),
        None => index,
    };
    let store: Arc<dyn BlobStore> = Arc::new(TieredStore {
        local,
        bucket: tiers.bucket.clone(),
        bucket_health: tiers.bucket_health.clone(),
        shared: tiers.shared.clone(),
        keep_locally: true,
    });
    tracing::info!(bucket = %tiers.bucket.describe(), redis = shared.redis.is_some(), advertise = %tiers.advertise, "sharing the cache");
    Ok((
        store,
        index,
        Some(Cluster {
            tiers,
            secret: config.cluster.secret.clone(),
            redis: shared.redis,
            bucket_index: shared.index,
            budget: shared.budget,
            hosted_index: shared.hosted_index,
        }),
    ))
}

impl Registry {
    /// A replica's `GET /_cluster/blobs/<digest>`: the blob from the local
    /// tier or from a download in flight, never fetched for the asker.
    pub async fn peer_blob(
        &self,
        method: &str,
        path: &str,
        headers: &HeaderMap,
        digest: Digest,
    ) -> Result<Reply, Error> {
        let Some(secret) = self.cluster.as_ref().and_then(|c| c.secret.as_ref()) else {
            return Err(Error::NotFound("this mirror is not in a cluster".into()));
        };
        peer::verify(secret, method, path, headers, SystemTime::now())?;
        if let Some(blob) = self.store.open_blob(&digest).await.map_err(storage)? {
            let size = blob.size;
            let source = self.verifier.source(&digest, blob).await;
            return peer_reply(&digest, Some(size), source.stream(0, Some(size)));
        }
        match self.downloads.join(&digest) {
            Some(Joined::Download {
                download, source, ..
            }) => {
                let size = download.size().await?;
                let end = size;
                peer_reply(&digest, size, source.stream(0, end))
            }
            _ => Err(Error::BlobUnknown(format!(
                "{digest} is neither kept nor being fetched here"
            ))),
        }
    }

    /// A `Range` request for a blob the local tier lacks, answered by a
    /// ranged read of the bucket's object (as distribution and zot answer
    /// ranges from S3), without filling the whole blob. `None` when this is
    /// not a replica, the bucket lacks the blob, or the range is the whole
    /// blob: the caller then fills it as usual. The bytes of a range are
    /// not hashed (a range cannot be); the whole blob was when it was
    /// uploaded, and is again whenever a replica fills it.
    pub(super) async fn bucket_range(
        &self,
        route: &crate::routing::Route,
        digest: &Digest,
        range_header: &str,
    ) -> Result<Option<Reply>, Error> {
        use crate::range::{self, RangeRequest};
        let Some(cluster) = &self.cluster else {
            return Ok(None);
        };
        let tiers = &cluster.tiers;
        let unreachable = |e| {
            tiers.bucket_health.failed(e);
            Error::SharedUnavailable("the shared bucket cannot be reached".into())
        };
        let key = crate::cache::store::ContentKey::blob(digest);
        let Some(size) = tiers.bucket.head(&key).await.map_err(unreachable)? else {
            return Ok(None);
        };
        let r = match range::parse(Some(range_header), size) {
            RangeRequest::Full => return Ok(None),
            RangeRequest::Unsatisfiable => return Err(Error::RangeNotSatisfiable { size }),
            RangeRequest::Partial(r) => r,
        };
        self.authorize(route, digest, crate::upstream::What::Blob)
            .await?;
        let Some(read) = tiers
            .bucket
            .read(digest, Some(r.start..r.end + 1))
            .await
            .map_err(unreachable)?
        else {
            // Evicted in between: fill it as usual.
            return Ok(None);
        };
        tiers.bucket_health.ok();
        self.metrics.tier_hit("bucket");
        let digest_shown = digest.clone();
        let body = futures_util::StreamExt::map(read.stream, move |chunk| {
            chunk.map_err(|e| {
                tracing::warn!(digest = %digest_shown, error = %e, "ranged bucket read cut");
                std::io::Error::other("the shared bucket stopped sending")
            })
        });
        let response = response::builder(StatusCode::PARTIAL_CONTENT)
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(CONTENT_DIGEST, digest.to_string())
            .header(header::ACCEPT_RANGES, "bytes")
            .header(header::CONTENT_RANGE, r.content_range(size))
            .header(header::CONTENT_LENGTH, r.len())
            .body(response::stream(body))
            .map_err(|e| Error::internal("building a response", e))?;
        Ok(Some(Reply {
            response,
            outcome: Outcome::Hit,
        }))
    }

    /// Announces this replica, evicts from the bucket when it holds the
    /// eviction lock, aborts uploads of dead replicas, and copies the shared
    /// parts' state into the metrics.
    pub(super) async fn cluster_upkeep(&self, first: bool) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        let tiers = &cluster.tiers;
        let now = SystemTime::now();
        let _ = tiers.coordinator.announce(&tiers.advertise, now).await;
        let peers = tiers
            .coordinator
            .peers(now, ANNOUNCE_EVERY * 3)
            .await
            .unwrap_or_default();
        let redis_up = cluster.redis.as_ref().is_some_and(|h| h.is_up());
        let live = |digest: &Digest| !first && self.downloads.is_running(digest);
        upkeep::abort_dead_uploads(tiers, &peers, redis_up, &live, now).await;
        if self.hosted.is_some() {
            // The hosted area's commits: this replica's own are in flight
            // unless it just started.
            let bucket = tiers.bucket.under(crate::hosted::DIR);
            let area = upkeep::Area {
                bucket: &bucket,
                health: &tiers.bucket_health,
                advertise: &tiers.advertise,
            };
            let live = |_: &Digest| !first;
            upkeep::abort_dead_uploads_in(area, &peers, redis_up, &live, now).await;
        }
        self.metrics.peers_seen(peers);
        if let (Some(index), Some(budget)) = (&cluster.bucket_index, &cluster.budget) {
            for (key, size) in upkeep::evict_bucket(tiers, index, budget).await {
                self.metrics.eviction("bucket", size);
                if key.kind == crate::cache::store::Kind::Manifest {
                    self.manifests.invalidate(&key.digest).await;
                }
            }
        }
        self.refresh_shared_metrics();
    }

    /// Copies the shared parts' state into the metrics.
    pub fn refresh_shared_metrics(&self) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        let bucket = &cluster.tiers.bucket_health;
        self.metrics
            .shared("bucket", bucket.is_up(), bucket.errors());
        if let Some(redis) = &cluster.redis {
            self.metrics.shared("redis", redis.is_up(), redis.errors());
        }
    }

    /// What `/readyz` says of the shared parts (the replica stays ready:
    /// it serves what it can without them).
    pub(super) fn cluster_detail(&self) -> Vec<String> {
        let Some(cluster) = &self.cluster else {
            return Vec::new();
        };
        let mut lines = Vec::new();
        for health in [Some(&cluster.tiers.bucket_health), cluster.redis.as_ref()]
            .into_iter()
            .flatten()
        {
            lines.push(if health.is_up() {
                format!("{}: ok", health.part())
            } else {
                format!(
                    "{}: unreachable ({}); serving without it",
                    health.part(),
                    health.last_error().unwrap_or_default()
                )
            });
        }
        lines
    }

    /// Whether this registry is one replica of several.
    pub fn is_replica(&self) -> bool {
        self.cluster.is_some()
    }
}

fn storage(e: std::io::Error) -> Error {
    Error::internal("cache storage", e)
}

fn peer_reply(
    digest: &Digest,
    size: Option<u64>,
    stream: impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static,
) -> Result<Reply, Error> {
    let mut b = response::builder(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(CONTENT_DIGEST, digest.to_string());
    if let Some(size) = size {
        b = b.header(header::CONTENT_LENGTH, size);
    }
    let response = b
        .body(response::stream(stream))
        .map_err(|e| Error::internal("building a response", e))?;
    Ok(Reply {
        response,
        outcome: Outcome::None,
    })
}
