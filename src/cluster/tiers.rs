//! How a replica fills a blob its local tier lacks: from the shared bucket
//! when it holds the blob; else from the replica that holds the digest's
//! lease (it is fetching it), as a follower; else, holding the lease, from
//! the upstream, uploading to the bucket as the bytes stream and completing
//! the upload only once they verified. Every fill goes through the same
//! verified download as an upstream one, so bytes from the bucket or a peer
//! are checked like the upstream's.
//!
//! Redis unreachable: no leases, the replica fetches on its own (its own
//! single-flight still holds). Bucket unreachable: the miss is refused with
//! 503, never 404, since the blob may well be there.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use url::Url;

use super::bucket::{Bucket, Upload};
use super::coordinator::{Coordinator, Lease, Taken};
use super::peer::PeerClient;
use super::{Health, SharedError};
use crate::cache::download::{Fill, Origin, Sink};
use crate::cache::store::{ContentKey, Index};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::reference::Digest;
use crate::upstream::BlobBody;

/// How long a lease lasts without renewal: a dead holder's followers wait
/// at most this long before one of them takes over (a holder that refuses
/// connections is taken over at once).
pub const LEASE_TTL: Duration = Duration::from_secs(15);
/// How often a holder renews its lease.
const RENEW_EVERY: Duration = Duration::from_secs(5);
/// Times a fill asks for the lease before fetching on its own.
const LEASE_TRIES: usize = 3;

/// The shared tiers behind a replica's local disk.
pub struct Tiers {
    pub bucket: Arc<Bucket>,
    pub bucket_health: Arc<Health>,
    pub coordinator: Arc<dyn Coordinator>,
    /// The bucket's sizes and access times (Redis); `None` on one node
    /// without Redis.
    pub shared: Option<Arc<dyn Index>>,
    /// This replica's advertised URL: what its leases name.
    pub advertise: String,
    pub peers: Option<PeerClient>,
    pub metrics: Arc<Metrics>,
}

impl Tiers {
    /// The client hears that the bucket is unreachable, not where it is or
    /// what its client said (that is logged, once per outage).
    fn bucket_error(&self, e: SharedError) -> Error {
        let e = self.bucket_health.failed(e);
        tracing::debug!(error = %e, "bucket read failed");
        Error::SharedUnavailable("the shared bucket cannot be reached".into())
    }

    /// The fill of `digest`, missing from the local tier; `upstream` sends
    /// the upstream GET, only if this replica is to fetch it.
    pub async fn fill<F>(self: Arc<Self>, digest: Digest, upstream: F) -> Result<Fill, Error>
    where
        F: Future<Output = Result<BlobBody, Error>> + Send,
    {
        if let Some(fill) = self.from_bucket(&digest).await? {
            return Ok(fill);
        }
        for _ in 0..LEASE_TRIES {
            let taken = self
                .coordinator
                .take(&digest, &self.advertise, LEASE_TTL)
                .await;
            let (holder, token) = match taken {
                Ok(Taken::Mine(lease)) => {
                    return self.from_upstream(digest, Some(lease), upstream).await
                }
                Ok(Taken::Held { holder, token }) => (holder, token),
                Err(e) => {
                    tracing::debug!(%digest, error = %e, "no lease (Redis unreachable); fetching on this replica's own");
                    return self.from_upstream(digest, None, upstream).await;
                }
            };
            match self.via_peer(&holder, &digest).await {
                Ok(fill) => return Ok(fill),
                Err(PeerMiss::Gone) => {
                    // The holder finished (the bucket has it) or failed (the
                    // lease is free again): look again.
                    if let Some(fill) = self.from_bucket(&digest).await? {
                        return Ok(fill);
                    }
                }
                Err(PeerMiss::Unreachable(why)) => {
                    match self
                        .coordinator
                        .take_over(&digest, &token, &self.advertise, LEASE_TTL)
                        .await
                    {
                        Ok(Some(lease)) => {
                            tracing::warn!(%digest, %holder, error = %why, "lease holder unreachable; took its lease over");
                            self.metrics.lease_takeover();
                            return self.from_upstream(digest, Some(lease), upstream).await;
                        }
                        Ok(None) => {}
                        Err(_) => return self.from_upstream(digest, None, upstream).await,
                    }
                }
            }
        }
        tracing::warn!(%digest, "could not follow the lease holder; fetching on this replica's own");
        self.from_upstream(digest, None, upstream).await
    }

    /// The bucket's copy, if it has one; its bytes are verified by the
    /// download like any other (a damaged object fails it, and is removed).
    async fn from_bucket(self: &Arc<Self>, digest: &Digest) -> Result<Option<Fill>, Error> {
        let read = match self.bucket.read(digest, None).await {
            Ok(Some(read)) => read,
            Ok(None) => {
                self.bucket_health.ok();
                return Ok(None);
            }
            Err(e) => return Err(self.bucket_error(e)),
        };
        self.bucket_health.ok();
        if let Some(shared) = &self.shared {
            shared
                .touch(&ContentKey::blob(digest), SystemTime::now())
                .await;
        }
        let body = read
            .stream
            .map_err(|e| {
                tracing::warn!(error = %e, "bucket read cut");
                Error::SharedUnavailable("the shared bucket stopped sending".into())
            })
            .boxed();
        Ok(Some(Fill {
            origin: Origin::Bucket,
            size: Some(read.size),
            body,
            sink: Some(Box::new(BucketCheck {
                tiers: self.clone(),
                digest: digest.clone(),
            })),
        }))
    }

    async fn via_peer(&self, holder: &str, digest: &Digest) -> Result<Fill, PeerMiss> {
        if holder == self.advertise {
            // This replica's own lease from before a restart: nobody serves it.
            return Err(PeerMiss::Unreachable(
                "the lease is this replica's own, from before".into(),
            ));
        }
        let Some(peers) = &self.peers else {
            return Err(PeerMiss::Unreachable("no peer client".into()));
        };
        let url = Url::parse(holder)
            .map_err(|_| PeerMiss::Unreachable(format!("{holder:?} is not a URL")))?;
        match peers.get_blob(&url, digest).await {
            Ok(resp) => Ok(Fill::response(Origin::Peer, resp)),
            Err(Error::BlobUnknown(_)) => Err(PeerMiss::Gone),
            Err(e) => Err(PeerMiss::Unreachable(e.to_string())),
        }
    }

    async fn from_upstream<F>(
        self: Arc<Self>,
        digest: Digest,
        lease: Option<Lease>,
        upstream: F,
    ) -> Result<Fill, Error>
    where
        F: Future<Output = Result<BlobBody, Error>>,
    {
        let renewal = lease.clone().map(|lease| {
            let coordinator = self.coordinator.clone();
            let digest = digest.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(RENEW_EVERY);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    match coordinator.renew(&lease, LEASE_TTL).await {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::warn!(%digest, "lost the download lease (expired or taken over)");
                            return;
                        }
                        Err(_) => {}
                    }
                }
            })
        });
        let mut sink = UploadSink {
            tiers: self.clone(),
            digest: digest.clone(),
            upload: None,
            lease,
            renewal,
        };
        let resp = match upstream.await {
            Ok(resp) => resp,
            Err(e) => {
                sink.end().await;
                return Err(e);
            }
        };
        match self.bucket.upload(&digest, &self.advertise).await {
            Ok(upload) => {
                self.bucket_health.ok();
                sink.upload = Some(upload);
            }
            Err(e) => {
                let e = self.bucket_health.failed(e);
                tracing::warn!(%digest, error = %e, "cannot start the bucket upload; the blob is served but not shared");
            }
        }
        Ok(Fill::upstream(resp).with_sink(Box::new(sink)))
    }
}

/// Why the lease holder did not stream a blob.
enum PeerMiss {
    /// It answered that it has no such blob (any more).
    Gone,
    /// It could not be reached, or failed.
    Unreachable(String),
}

/// Uploads an upstream fill to the bucket as it streams, keeps the lease
/// renewed, and completes the upload (then records the blob and frees the
/// lease) only once the download verified.
struct UploadSink {
    tiers: Arc<Tiers>,
    digest: Digest,
    upload: Option<Upload>,
    lease: Option<Lease>,
    renewal: Option<tokio::task::JoinHandle<()>>,
}

impl UploadSink {
    /// Stops renewing and frees the lease.
    async fn end(&mut self) {
        if let Some(renewal) = self.renewal.take() {
            renewal.abort();
        }
        if let Some(lease) = self.lease.take() {
            let _ = self.tiers.coordinator.release(&lease).await;
        }
    }
}

impl Drop for UploadSink {
    fn drop(&mut self) {
        if let Some(renewal) = self.renewal.take() {
            renewal.abort();
        }
    }
}

#[async_trait]
impl Sink for UploadSink {
    async fn push(&mut self, chunk: &Bytes) {
        let Some(upload) = &mut self.upload else {
            return;
        };
        if let Err(e) = upload.push(chunk.clone()).await {
            let e = self.tiers.bucket_health.failed(e);
            tracing::warn!(digest = %self.digest, error = %e, "bucket upload failed; the blob is served but not shared");
            if let Some(upload) = self.upload.take() {
                upload.abort().await;
            }
        }
    }

    async fn verified(mut self: Box<Self>, size: u64) {
        if let Some(upload) = self.upload.take() {
            match upload.complete().await {
                Ok(()) => {
                    self.tiers.bucket_health.ok();
                    if let Some(shared) = &self.tiers.shared {
                        shared
                            .record(&ContentKey::blob(&self.digest), size, SystemTime::now())
                            .await;
                    }
                }
                Err(e) => {
                    let e = self.tiers.bucket_health.failed(e);
                    tracing::warn!(digest = %self.digest, error = %e, "cannot complete the bucket upload; the blob is not shared");
                }
            }
        }
        self.end().await;
    }

    async fn failed(mut self: Box<Self>, _error: &Error) {
        if let Some(upload) = self.upload.take() {
            upload.abort().await;
        }
        self.end().await;
    }
}

/// Removes a bucket object whose bytes failed the download's check, so the
/// next request fetches the blob again instead of reading the damage.
struct BucketCheck {
    tiers: Arc<Tiers>,
    digest: Digest,
}

#[async_trait]
impl Sink for BucketCheck {
    async fn push(&mut self, _chunk: &Bytes) {}

    async fn verified(self: Box<Self>, _size: u64) {}

    async fn failed(self: Box<Self>, error: &Error) {
        // Only the download's own checks (size, digest) say the object is
        // damaged; a read the network cut says nothing of it.
        if !matches!(error, Error::UpstreamFailed(_)) {
            return;
        }
        let key = ContentKey::blob(&self.digest);
        tracing::warn!(digest = %self.digest, "blob read from the bucket failed its check; removing the object");
        if let Err(e) = self.tiers.bucket.remove(&key).await {
            tracing::warn!(digest = %self.digest, error = %e, "cannot remove the damaged object");
        }
        if let Some(shared) = &self.tiers.shared {
            shared.forget(&key).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use futures_util::StreamExt;

    use super::*;
    use crate::cache::download::{Downloads, Joined};
    use crate::cache::store::disk::DiskStore;
    use crate::cache::store::local_index::LocalIndex;
    use crate::cache::store::BlobStore;
    use crate::cluster::coordinator::MemoryCoordinator;
    use crate::hashing::digest_of;
    use crate::reference::Algorithm;

    /// What replicas share: the bucket, the coordinator, the bucket's index.
    #[derive(Clone)]
    struct Shared {
        bucket: Arc<Bucket>,
        coordinator: Arc<MemoryCoordinator>,
        index: Arc<LocalIndex>,
    }

    impl Shared {
        fn new() -> Self {
            Self {
                bucket: Arc::new(Bucket::in_memory()),
                coordinator: Arc::new(MemoryCoordinator::new()),
                index: Arc::new(LocalIndex::in_memory()),
            }
        }
    }

    /// One replica: its own disk and downloads over the shared parts, and
    /// an upstream that counts its GETs and sends `upstream_body`.
    struct Replica {
        tiers: Arc<Tiers>,
        downloads: Arc<Downloads>,
        upstream_gets: Arc<AtomicUsize>,
        metrics: Arc<Metrics>,
        _dir: tempfile::TempDir,
    }

    fn replica(shared: &Shared, advertise: &str) -> Replica {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn BlobStore> = Arc::new(DiskStore::open(dir.path()).unwrap());
        let index: Arc<dyn Index> = Arc::new(LocalIndex::in_memory());
        let metrics = Arc::new(Metrics::new());
        let downloads = Downloads::for_tests(store, index, metrics.clone());
        let tiers = Arc::new(Tiers {
            bucket: shared.bucket.clone(),
            bucket_health: Arc::new(Health::new("bucket")),
            coordinator: shared.coordinator.clone(),
            shared: Some(shared.index.clone()),
            advertise: advertise.to_owned(),
            peers: Some(
                PeerClient::new(Secret::new("a secret of twenty"), Duration::from_secs(1)).unwrap(),
            ),
            metrics: metrics.clone(),
        });
        Replica {
            tiers,
            downloads,
            upstream_gets: Arc::new(AtomicUsize::new(0)),
            metrics,
            _dir: dir,
        }
    }

    use crate::config::Secret;

    impl Replica {
        /// Pulls `digest` the way the registry does; the upstream, if asked,
        /// sends `body`. The bytes, or the error the body ended with.
        async fn pull(&self, digest: &Digest, body: &'static [u8]) -> Result<Vec<u8>, String> {
            let gets = self.upstream_gets.clone();
            let upstream = async move {
                gets.fetch_add(1, Ordering::SeqCst);
                Ok(BlobBody::plain(reqwest::Response::from(
                    http::Response::builder()
                        .header(http::header::CONTENT_LENGTH, body.len())
                        .body(body.to_vec())
                        .unwrap(),
                )))
            };
            let fill = self.tiers.clone().fill(digest.clone(), upstream);
            let joined = self
                .downloads
                .join_or_start(digest, Duration::from_secs(5), fill)
                .await
                .map_err(|e| e.to_string())?;
            let Joined::Download {
                download, source, ..
            } = joined
            else {
                panic!("nothing was cached locally");
            };
            let size = download.size().await.map_err(|e| e.to_string())?;
            let mut stream = Box::pin(source.stream(0, size));
            let mut got = Vec::new();
            while let Some(chunk) = stream.next().await {
                got.extend_from_slice(&chunk.map_err(|e| e.to_string())?);
            }
            self.downloads.settle().await;
            Ok(got)
        }

        fn gets(&self) -> usize {
            self.upstream_gets.load(Ordering::SeqCst)
        }

        fn metric(&self, line: &str) -> bool {
            self.metrics.encode().lines().any(|l| l == line)
        }
    }

    /// More than one part of the bucket's upload.
    fn big_blob() -> &'static [u8] {
        let bytes: Vec<u8> = (0..20 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        Box::leak(bytes.into_boxed_slice())
    }

    #[tokio::test]
    async fn a_blob_one_replica_fetched_is_served_to_another_from_the_bucket() {
        let shared = Shared::new();
        let body = big_blob();
        let digest = digest_of(Algorithm::Sha256, body);
        let a = replica(&shared, "http://a.test:5000/");
        assert_eq!(a.pull(&digest, body).await.unwrap(), body);
        assert_eq!(a.gets(), 1);
        let stored = shared
            .bucket
            .head(&ContentKey::blob(&digest))
            .await
            .unwrap();
        assert_eq!(stored, Some(body.len() as u64));
        let entry = shared.index.entry(&ContentKey::blob(&digest)).await;
        assert_eq!(
            entry.map(|e| e.size),
            Some(body.len() as u64),
            "the bucket's index records it"
        );
        assert!(shared.bucket.pending_uploads().await.unwrap().is_empty());

        let b = replica(&shared, "http://b.test:5000/");
        assert_eq!(b.pull(&digest, b"not asked").await.unwrap(), body);
        assert_eq!(b.gets(), 0, "the second replica asked the upstream");
        assert!(b.metric(r#"regmirror_tier_hits_total{tier="bucket"} 1"#));
        // The lease was freed: the next taker gets it.
        let taken = shared
            .coordinator
            .take(&digest, "http://c.test/", LEASE_TTL)
            .await
            .unwrap();
        assert!(matches!(taken, Taken::Mine(_)), "{taken:?}");
    }

    #[tokio::test]
    async fn wrong_upstream_bytes_leave_nothing_in_the_bucket_and_free_the_lease() {
        let shared = Shared::new();
        let digest = digest_of(Algorithm::Sha256, b"the right bytes");
        let a = replica(&shared, "http://a.test:5000/");
        let e = a.pull(&digest, b"the wrong bytes").await.unwrap_err();
        assert!(e.contains("digest"), "{e}");
        assert_eq!(
            shared
                .bucket
                .head(&ContentKey::blob(&digest))
                .await
                .unwrap(),
            None
        );
        assert!(
            shared.bucket.pending_uploads().await.unwrap().is_empty(),
            "the upload was not aborted"
        );
        assert!(shared
            .index
            .entry(&ContentKey::blob(&digest))
            .await
            .is_none());
        assert_eq!(
            a.pull(&digest, b"the right bytes").await.unwrap(),
            b"the right bytes"
        );
        assert_eq!(a.gets(), 2);
    }

    #[tokio::test]
    async fn a_damaged_object_in_the_bucket_is_never_served_whole_and_is_fetched_again() {
        let shared = Shared::new();
        let body: &'static [u8] = b"layer bytes, as the upstream has them";
        let digest = digest_of(Algorithm::Sha256, body);
        // The bucket holds other bytes of the same length under the digest.
        let mut upload = shared
            .bucket
            .upload(&digest, "http://x.test/")
            .await
            .unwrap();
        upload
            .push(Bytes::from_static(b"LAYER BYTES, AS THE UPSTREAM HAS THEM"))
            .await
            .unwrap();
        upload.complete().await.unwrap();
        let a = replica(&shared, "http://a.test:5000/");
        let e = a.pull(&digest, body).await.unwrap_err();
        assert!(e.contains("digest"), "{e}");
        assert_eq!(a.gets(), 0);
        assert_eq!(
            shared
                .bucket
                .head(&ContentKey::blob(&digest))
                .await
                .unwrap(),
            None,
            "the damaged object is still there"
        );
        assert_eq!(a.pull(&digest, body).await.unwrap(), body);
        assert_eq!(a.gets(), 1);
    }

    #[tokio::test]
    async fn a_lease_whose_holder_cannot_be_reached_is_taken_over() {
        let shared = Shared::new();
        let body: &'static [u8] = b"a layer";
        let digest = digest_of(Algorithm::Sha256, body);
        // A holder that died: nothing listens on its port.
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let holder = format!("http://{}/", dead.local_addr().unwrap());
        drop(dead);
        let taken = shared
            .coordinator
            .take(&digest, &holder, LEASE_TTL)
            .await
            .unwrap();
        assert!(matches!(taken, Taken::Mine(_)));
        let a = replica(&shared, "http://a.test:5000/");
        assert_eq!(a.pull(&digest, body).await.unwrap(), body);
        assert_eq!(a.gets(), 1);
        assert!(
            a.metric("regmirror_lease_takeovers_total 1"),
            "{}",
            a.metrics.encode()
        );
    }

    #[tokio::test]
    async fn uploads_of_dead_replicas_are_aborted_and_live_ones_kept() {
        let shared = Shared::new();
        let a = replica(&shared, "http://a.test:5000/");
        let dead = digest_of(Algorithm::Sha256, b"dead");
        let alive = digest_of(Algorithm::Sha256, b"alive");
        let own = digest_of(Algorithm::Sha256, b"own");
        // Dropped without completing or aborting: what a crash leaves.
        drop(
            shared
                .bucket
                .upload(&dead, "http://gone.test/")
                .await
                .unwrap(),
        );
        drop(
            shared
                .bucket
                .upload(&alive, "http://b.test:5000/")
                .await
                .unwrap(),
        );
        drop(
            shared
                .bucket
                .upload(&own, "http://a.test:5000/")
                .await
                .unwrap(),
        );
        let later = SystemTime::now() + Duration::from_secs(3600);
        let peers = vec![("http://b.test:5000/".to_owned(), later)];
        let none_live = |_: &Digest| false;
        let aborted = upkeep::abort_dead_uploads(&a.tiers, &peers, true, &none_live, later).await;
        assert_eq!(aborted, 2);
        let left: Vec<Digest> = shared
            .bucket
            .pending_uploads()
            .await
            .unwrap()
            .into_iter()
            .map(|p| p.digest)
            .collect();
        assert_eq!(left, vec![alive]);
    }

    use crate::cluster::upkeep;

    #[tokio::test]
    async fn a_miss_while_the_bucket_is_down_is_503_and_asks_no_upstream() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let s3 = crate::config::S3Config {
            endpoint: Some(url::Url::parse(&format!("http://127.0.0.1:{port}")).unwrap()),
            bucket: Some("b".into()),
            path_style: true,
            access_key_id: Some(Secret::new("GKkey")),
            secret_access_key: Some(Secret::new("secret-key")),
            ..crate::config::S3Config::default()
        };
        let shared = Shared {
            bucket: Arc::new(Bucket::from_config(&s3).unwrap()),
            ..Shared::new()
        };
        let a = replica(&shared, "http://a.test:5000/");
        let digest = digest_of(Algorithm::Sha256, b"x");
        let e = a
            .tiers
            .clone()
            .fill(digest, async {
                Err(Error::Internal("the upstream was asked".into()))
            })
            .await
            .unwrap_err();
        assert_eq!(
            e.wire().status,
            http::StatusCode::SERVICE_UNAVAILABLE,
            "{e:?}"
        );
        assert!(
            !e.detail().contains("127.0.0.1"),
            "the bucket's address reached the client: {e}"
        );
        assert!(!a.tiers.bucket_health.is_up());
    }
}
