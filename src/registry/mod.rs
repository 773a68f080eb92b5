//! The registry API's logic: each parsed [`Endpoint`] answered from the cache
//! or the upstream. Owns the rule that a digest is served for a repository
//! only when that repository is known to hold it, and the cache's upkeep
//! (eviction, index flushes; the hosted repositories' expired uploads and
//! collections) through [`Registry::maintain`].

mod blobs;
mod cluster;
mod hosted;
mod listings;
mod manifests;
mod warm;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, HeaderMap, StatusCode};
use tokio::sync::Notify;

use crate::cache::download::{Downloads, Verifier};
use crate::cache::evictor::{Evictor, Limits};
use crate::cache::policy::TagTtlRule;
use crate::cache::store::Kind;
use crate::cache::store::{
    disk::DiskStore, local_index::LocalIndex, BlobStore, ContentKey, Flush, Index, StoredManifest,
};
use crate::config::{CacheConfig, Config, UpstreamConfig};
use crate::endpoint::{Action, ApiRequest, Endpoint};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::reference::{Digest, Reference, RepoName};
use crate::response::{self, Outcome, Reply};
use crate::routing::{Route, Router};
use crate::upstream::{Upstream, What};

pub use warm::Warmed;

/// Bytes of manifests kept in memory (they are also on disk).
const MANIFEST_MEMORY: u64 = 64 * 1024 * 1024;
/// How long a readiness probe's answer stands.
const READY_PROBE_EVERY: Duration = Duration::from_secs(1);
/// Bytes of referrers answers, and of fetched tag lists, kept in memory.
const LISTINGS_MEMORY: u64 = 16 * 1024 * 1024;

/// A tag list as the upstream gave it, and when.
type FetchedTags = (std::time::Instant, Arc<Vec<crate::reference::Tag>>);
/// How often eviction and the index flush run without being woken.
const UPKEEP_EVERY: Duration = Duration::from_secs(10);
/// Every this many upkeep runs, the index is reconciled with a store scan.
const RESCAN_EVERY: u32 = 60;
/// Every this many upkeep runs (about a minute), the index snapshot is
/// written for access times alone: hits change them all the time, and the
/// snapshot is the whole index.
const ACCESS_TIMES_EVERY: u32 = 6;
/// The header naming the registry a `?ns=` request was routed to.
const OCI_NAMESPACE: &str = "OCI-Namespace";
/// Name of the index snapshot in the data dir.
pub const INDEX_FILE: &str = "index.json";

/// One configured upstream: its client and its policy.
struct Slot {
    client: Arc<Upstream>,
    config: UpstreamConfig,
}

/// The mirror's state shared by all requests.
pub struct Registry {
    store: Arc<dyn BlobStore>,
    index: Arc<dyn Index>,
    /// The upstreams, the default first; `router` picks one per request.
    upstreams: Vec<Slot>,
    router: Router,
    downloads: Arc<Downloads>,
    evictor: Evictor,
    /// Woken when disk use changed enough to run eviction now.
    space_changed: Arc<Notify>,
    /// Manifests by digest, in memory; loading one is single-flight.
    manifests: moka::future::Cache<Digest, Arc<StoredManifest>>,
    /// Checks each committed blob once per process, as it streams.
    verifier: Arc<Verifier>,
    /// Referrers answers by (repository key, subject), kept for a tag TTL.
    referrer_cache: moka::future::Cache<(RepoName, Digest), Bytes>,
    /// Tag lists fetched from the upstream, by repository key, with when:
    /// served while younger than the route's tag TTL (a list may be many
    /// upstream pages).
    fetched_tag_lists: moka::future::Cache<RepoName, FetchedTags>,
    tag_ttl: Duration,
    tag_rules: Vec<TagTtlRule>,
    offline: bool,
    pub metrics: Arc<Metrics>,
    max_size: u64,
    /// The last readiness probe and when it ran.
    readiness: tokio::sync::Mutex<Option<(std::time::Instant, Result<(), String>)>>,
    /// The shared parts, when this is one replica of several.
    cluster: Option<cluster::Cluster>,
    /// The repositories that live here rather than upstream (none when
    /// `hosted.repos` is empty).
    hosted: Option<Arc<crate::hosted::Hosted>>,
    /// The data dir's lock, held while this registry lives.
    _lock: Option<std::fs::File>,
}

impl Registry {
    /// Opens the data dir: removes temp files left by a crash, loads the
    /// index and reconciles it with what is on disk.
    pub async fn open(config: &Config) -> Result<Self, Error> {
        let dir = &config.data_dir;
        let ctx = |what: &str| format!("{what} in {}", dir.display());
        let disk =
            DiskStore::open(dir).map_err(|e| Error::internal(&ctx("opening the cache"), e))?;
        let lock = disk
            .try_lock()
            .map_err(|e| Error::internal(&ctx("locking the cache"), e))?
            .ok_or_else(|| {
                Error::Internal(format!(
                    "{} is in use by another regmirror process",
                    dir.display()
                ))
            })?;
        let cleaned = disk
            .clean_temp(None)
            .await
            .map_err(|e| Error::internal(&ctx("removing temp files"), e))?;
        if cleaned > 0 {
            tracing::info!(
                files = cleaned,
                "removed temp files of interrupted downloads"
            );
        }
        let found = disk
            .scan()
            .await
            .map_err(|e| Error::internal(&ctx("scanning the cache"), e))?;
        let index: Arc<dyn Index> = Arc::new(LocalIndex::load(&dir.join(INDEX_FILE), found));
        let store: Arc<dyn BlobStore> = Arc::new(disk);
        let metrics = Arc::new(Metrics::new());
        let (store, index, cluster) = cluster::open(config, store, index, &metrics).await?;
        let mut registry = Self::assemble(config, store, index, metrics)?;
        registry.cluster = cluster;
        registry._lock = Some(lock);
        if !config.hosted.repos.is_empty() {
            let hosted = match &registry.cluster {
                None => crate::hosted::Hosted::open(dir, &config.hosted).await,
                Some(c) => {
                    let redis = match (&c.hosted_index, &c.redis) {
                        (Some(index), Some(health)) => {
                            Some((index.clone() as Arc<dyn Index>, health.clone()))
                        }
                        _ => None,
                    };
                    let bucket = c.tiers.bucket.under(crate::hosted::DIR);
                    let holder = c.tiers.advertise.clone();
                    crate::hosted::Hosted::open_shared(dir, &config.hosted, bucket, redis, holder)
                        .await
                }
            }
            .map_err(|e| Error::internal(&ctx("opening the hosted repositories"), e))?;
            registry.hosted = Some(Arc::new(hosted));
        }
        if registry.cluster.is_some() {
            registry.cluster_upkeep(true).await;
        }
        Ok(registry)
    }

    /// Builds the registry over a given store and index.
    pub fn with_parts(
        config: &Config,
        store: Arc<dyn BlobStore>,
        index: Arc<dyn Index>,
    ) -> Result<Self, Error> {
        Self::assemble(config, store, index, Arc::new(Metrics::new()))
    }

    fn assemble(
        config: &Config,
        store: Arc<dyn BlobStore>,
        index: Arc<dyn Index>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, Error> {
        for warning in config.exposure_warnings() {
            tracing::warn!("{warning}");
        }
        let mut upstreams = Vec::new();
        for u in config.all_upstreams() {
            upstreams.push(Slot {
                client: Arc::new(Upstream::new(u, metrics.clone())?),
                config: u.clone(),
            });
        }
        let router = Router::new(upstreams.iter().map(|s| s.config.name.clone()).collect());
        let space_changed = Arc::new(Notify::new());
        let verifier =
            Arc::new(Verifier::new(store.clone(), index.clone()).counting(metrics.clone()));
        Ok(Self {
            downloads: Arc::new(
                Downloads::new(
                    store.clone(),
                    index.clone(),
                    config.cache.max_size.0,
                    config.cache.max_downloads,
                    space_changed.clone(),
                    verifier.clone(),
                    metrics.clone(),
                )
                .with_min_free(config.cache.min_free),
            ),
            evictor: Evictor::new(store.clone(), index.clone(), limits(&config.cache)),
            space_changed,
            store,
            index,
            upstreams,
            router,
            referrer_cache: referrers_memory(config.cache.tag_ttl),
            fetched_tag_lists: tag_lists_memory(longest_tag_ttl(config)),
            manifests: moka::future::Cache::builder()
                .weigher(|_, m: &Arc<StoredManifest>| {
                    u32::try_from(m.bytes.len()).unwrap_or(u32::MAX)
                })
                .max_capacity(MANIFEST_MEMORY)
                .build(),
            verifier,
            tag_ttl: config.cache.tag_ttl,
            tag_rules: config.cache.tag_rules(),
            offline: config.offline,
            metrics,
            max_size: config.cache.max_size.0,
            readiness: tokio::sync::Mutex::new(None),
            cluster: None,
            hosted: None,
            _lock: None,
        })
    }

    /// Answers one parsed request; `body` is the request's (the push API
    /// reads it).
    pub async fn handle(
        &self,
        req: &ApiRequest,
        headers: &HeaderMap,
        body: Option<response::Body>,
    ) -> Result<Reply, Error> {
        if let Some(name) = req.endpoint.name() {
            if req.namespace.is_none() && self.hosted.as_ref().is_some_and(|h| h.hosts(name)) {
                return self.hosted(req, headers, body).await;
            }
            if req.endpoint.action() != Action::Pull {
                return Err(Error::Denied(format!(
                    "{name} is mirrored, not hosted here: pushes and deletes go only to the \
                     repositories hosted.repos names"
                )));
            }
        }
        let (name, route) = match req.endpoint.name() {
            Some(name) => (name, self.route(name, req.namespace.as_deref())?),
            None => {
                return match &req.endpoint {
                    Endpoint::Catalog { page } => self.catalog(page, req.head).await,
                    _ => Ok(Reply {
                        response: response::builder(StatusCode::OK)
                            .header(header::CONTENT_TYPE, "application/json")
                            .header(header::CONTENT_LENGTH, 2)
                            .body(if req.head {
                                response::empty()
                            } else {
                                response::full(Bytes::from_static(b"{}"))
                            })
                            .map_err(|e| Error::internal("building a response", e))?,
                        outcome: Outcome::None,
                    }),
                };
            }
        };
        let mut reply = match &req.endpoint {
            Endpoint::Manifest { reference, .. } => {
                self.manifest(&route, reference, req.head).await
            }
            Endpoint::Blob { digest, .. } => {
                let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
                self.blob(&route, digest, req.head, range).await
            }
            Endpoint::TagsList { page, .. } => {
                self.tags(&route, name, req.namespace.as_deref(), page, req.head)
                    .await
            }
            Endpoint::Referrers {
                digest,
                artifact_type,
                ..
            } => {
                self.referrers(&route, digest, artifact_type.as_deref(), req.head)
                    .await
            }
            Endpoint::Ping
            | Endpoint::Catalog { .. }
            | Endpoint::StartUpload { .. }
            | Endpoint::Upload { .. }
            | Endpoint::PutManifest { .. }
            | Endpoint::DeleteManifest { .. }
            | Endpoint::DeleteBlob { .. } => Err(Error::Internal(format!(
                "{} request routed to an upstream",
                req.endpoint.label()
            ))),
        }?;
        if req.namespace.is_some() {
            if let Ok(v) = http::HeaderValue::from_str(self.router.name(route.upstream)) {
                reply.response.headers_mut().insert(OCI_NAMESPACE, v);
            }
        }
        Ok(reply)
    }

    /// Routes a name to its upstream and checks that upstream's allow/deny.
    fn route(&self, name: &RepoName, ns: Option<&str>) -> Result<Route, Error> {
        let route = self.router.route(name, ns)?;
        let slot = &self.upstreams[route.upstream];
        if !slot.config.permits(route.repo.as_str()) {
            return Err(Error::Denied(format!(
                "{} is not mirrored from {} by this mirror's configuration",
                route.repo, slot.config.name
            )));
        }
        Ok(route)
    }

    /// The upstream client of a route.
    fn upstream(&self, route: &Route) -> &Arc<Upstream> {
        &self.upstreams[route.upstream].client
    }

    /// The tag TTL that applies on a route's upstream.
    fn default_tag_ttl(&self, route: &Route) -> Duration {
        self.upstreams[route.upstream]
            .config
            .tag_ttl
            .unwrap_or(self.tag_ttl)
    }

    /// Runs eviction and index flushes until the process ends: every
    /// [`UPKEEP_EVERY`], and at once when a download changed disk use.
    pub async fn maintain(self: Arc<Self>) {
        let mut runs: u32 = 0;
        // At once: a smaller budget than last time takes effect at start.
        self.evict_now().await;
        loop {
            tokio::select! {
                () = self.space_changed.notified() => {}
                () = tokio::time::sleep(UPKEEP_EVERY) => {}
            }
            runs = runs.wrapping_add(1);
            if runs.is_multiple_of(RESCAN_EVERY) {
                if let Err(e) = self.evictor.rescan().await {
                    tracing::warn!(error = %e, "cannot rescan the cache");
                }
            }
            self.evict_now().await;
            self.cluster_upkeep(false).await;
            self.hosted_upkeep(runs).await;
            let what = if runs.is_multiple_of(ACCESS_TIMES_EVERY) {
                Flush::All
            } else {
                Flush::Changes
            };
            if let Err(e) = self.index.flush(what).await {
                tracing::warn!(error = %e, "cannot write the index snapshot");
            }
        }
    }

    /// One eviction run; evicted manifests also leave the memory cache.
    pub async fn evict_now(&self) {
        match self.evictor.run_once(SystemTime::now()).await {
            Ok(report) => {
                for (key, _, _) in &report.evicted {
                    self.manifests.invalidate(&key.digest).await;
                    self.verifier.forget(&key.digest).await;
                }
                for (_, size, reason) in &report.evicted {
                    self.metrics.eviction(reason.as_str(), *size);
                }
                let (mut blobs, mut manifests) = (0, 0);
                for (key, _) in self.index.contents().await {
                    match key.kind {
                        Kind::Blob => blobs += 1,
                        Kind::Manifest => manifests += 1,
                    }
                }
                self.metrics
                    .cache_size(report.usage_after, blobs, manifests);
            }
            Err(e) => tracing::warn!(error = %e, "eviction failed"),
        }
    }

    /// The cache's byte budget.
    pub fn max_size(&self) -> u64 {
        self.max_size
    }

    /// Blob downloads running now (each followed by its coalesced clients).
    pub fn downloads_in_flight(&self) -> usize {
        self.downloads.in_flight()
    }

    /// Whether the mirror can serve: the data dir takes a write. Probed at
    /// most once a second (`/readyz` needs no credentials, and each probe
    /// creates and removes a file).
    pub async fn ready(&self) -> Result<Vec<String>, String> {
        self.writable().await?;
        Ok(self.cluster_detail())
    }

    async fn writable(&self) -> Result<(), String> {
        let mut last = self.readiness.lock().await;
        if let Some((at, answer)) = &*last {
            if at.elapsed() < READY_PROBE_EVERY {
                return answer.clone();
            }
        }
        let answer = match self.store.spool().await {
            Ok(spool) => {
                drop(spool);
                Ok(())
            }
            Err(e) => Err(format!("the cache cannot be written: {e}")),
        };
        *last = Some((std::time::Instant::now(), answer.clone()));
        answer
    }

    /// Persists the index, access times included (at shutdown).
    pub async fn flush(&self) -> std::io::Result<()> {
        self.index.flush(Flush::All).await
    }

    /// Waits for verified downloads to finish their commits.
    pub async fn settle(&self) {
        self.downloads.settle().await
    }

    /// Makes sure `repo` may be served `digest`: known locally, or confirmed
    /// by an upstream HEAD, after which it is remembered. Offline, only what
    /// is known counts.
    async fn authorize(&self, route: &Route, digest: &Digest, what: What) -> Result<(), Error> {
        if self.index.holds(&route.key, digest).await {
            return Ok(());
        }
        if self.offline {
            return Err(offline_miss(what, &format!("{}@{digest}", route.key)));
        }
        let upstream = self.upstream(route);
        match what {
            What::Blob => upstream.head_blob(&route.repo, digest).await.map(drop)?,
            _ => upstream
                .head_manifest(&route.repo, &Reference::Digest(digest.clone()))
                .await
                .map(drop)?,
        }
        self.index.add_holds(&route.key, vec![digest.clone()]).await;
        Ok(())
    }

    /// Records a cache hit for eviction's sake (a no-op for an item evicted
    /// meanwhile).
    async fn touch(&self, key: ContentKey) {
        let now = SystemTime::now();
        if let Some(bucket) = self.cluster.as_ref().and_then(|c| c.bucket_index.clone()) {
            // The bucket's one LRU counts the hits every replica serves from
            // its own disk too; not awaited, a hit does not wait for Redis.
            let key = key.clone();
            tokio::spawn(async move { bucket.touch(&key, now).await });
        }
        self.index.touch(&key, now).await;
    }

    /// Records an item just stored.
    async fn record(&self, key: ContentKey, size: u64) {
        self.index.record(&key, size, SystemTime::now()).await;
    }
}

/// The error for something an offline mirror does not have.
fn offline_miss(what: What, name: &str) -> Error {
    let detail = format!("the mirror is offline and has not cached {name}");
    match what {
        What::Blob => Error::BlobUnknown(detail),
        What::Manifest => Error::ManifestUnknown(detail),
        What::Tags => Error::NameUnknown(detail),
    }
}

/// Referrers answers by (repository key, subject), weighed in bytes: any
/// client can ask for any subject.
fn referrers_memory(ttl: Duration) -> moka::future::Cache<(RepoName, Digest), Bytes> {
    moka::future::Cache::builder()
        .weigher(|_, b: &Bytes| u32::try_from(b.len()).unwrap_or(u32::MAX))
        .max_capacity(LISTINGS_MEMORY)
        .time_to_live(ttl.max(Duration::from_secs(1)))
        .build()
}

/// Fetched tag lists by repository key, weighed in bytes.
fn tag_lists_memory(ttl: Duration) -> moka::future::Cache<RepoName, FetchedTags> {
    moka::future::Cache::builder()
        .weigher(|_, (_, tags): &FetchedTags| {
            let bytes: usize = tags.iter().map(|t| t.as_str().len() + 8).sum();
            u32::try_from(bytes).unwrap_or(u32::MAX)
        })
        .max_capacity(LISTINGS_MEMORY)
        .time_to_live(ttl)
        .build()
}

/// The longest tag TTL of any upstream: how long a fetched tag list may be
/// worth keeping in memory at all.
fn longest_tag_ttl(config: &Config) -> Duration {
    config
        .all_upstreams()
        .filter_map(|u| u.tag_ttl)
        .chain([config.cache.tag_ttl])
        .max()
        .unwrap_or_default()
        .max(Duration::from_secs(1))
}

/// The eviction limits a cache configuration sets.
pub fn limits(cache: &CacheConfig) -> Limits {
    Limits {
        budget: cache.budget(),
        blob_idle_ttl: CacheConfig::idle_ttl(cache.blob_idle_ttl),
        manifest_idle_ttl: CacheConfig::idle_ttl(cache.manifest_idle_ttl),
        min_free: cache.min_free,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::Tag;

    fn repo(i: usize) -> RepoName {
        RepoName::parse(&format!("flood/r{i}")).unwrap()
    }

    /// 100,000 distinct referrers answers of 4 KiB (400 MB unweighed) stay
    /// within the listings' memory.
    #[tokio::test]
    async fn referrers_answers_are_bounded_in_bytes() {
        let cache = referrers_memory(Duration::from_secs(300));
        let answer = Bytes::from(vec![b'x'; 4096]);
        let subject = crate::hashing::digest_of(crate::reference::Algorithm::Sha256, b"s");
        for i in 0..100_000 {
            cache
                .insert((repo(i), subject.clone()), answer.clone())
                .await;
        }
        cache.run_pending_tasks().await;
        let kept: u64 = cache.iter().map(|(_, b)| b.len() as u64).sum();
        assert!(kept <= LISTINGS_MEMORY, "{kept} bytes kept");
    }

    /// Likewise 100,000 distinct tag lists of 100 tags.
    #[tokio::test]
    async fn fetched_tag_lists_are_bounded_in_bytes() {
        let cache = tag_lists_memory(Duration::from_secs(300));
        let tags: Arc<Vec<Tag>> = Arc::new(
            (0..100)
                .map(|t| Tag::parse(&format!("v1.{t}.0-build")).unwrap())
                .collect(),
        );
        for i in 0..100_000 {
            cache
                .insert(repo(i), (std::time::Instant::now(), tags.clone()))
                .await;
        }
        cache.run_pending_tasks().await;
        let kept: u64 = cache
            .iter()
            .map(|(_, (_, tags))| {
                tags.iter()
                    .map(|t| t.as_str().len() as u64 + 8)
                    .sum::<u64>()
            })
            .sum();
        assert!(kept <= LISTINGS_MEMORY, "{kept} bytes kept");
    }
}
