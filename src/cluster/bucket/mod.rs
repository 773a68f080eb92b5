//! The content every replica shares, in an S3-compatible bucket
//! (`object_store`): blobs uploaded in parts while they stream and completed
//! only once the caller verified them, manifests checked against their digest
//! when read, ranged reads, a scan of what is committed, and the markers that
//! let abandoned multipart uploads be found and aborted.
//!
//! Layout under the configured prefix: `blobs/<alg>/<hex>`,
//! `manifests/<alg>/<hex>` (first line the media type, then the bytes, as on
//! disk), and one marker per multipart upload in progress,
//! `uploads/<alg>-<hex>-<random>.json` (the upload's path and id, who holds it
//! and since when): S3 has no cheap way to list one prefix's unfinished
//! uploads that every implementation shares, so the markers are the record.
//! Object names come only from parsed digests. Content is addressed by its
//! digest, so a duplicate write of the same name is harmless and no
//! conditional put is relied on.
//!
//! Mechanism only: when to upload, read, scan or clean up is the cache's.

mod chunks;
mod upload;

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::stream::{self, BoxStream, StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
use object_store::memory::InMemory;
use object_store::multipart::MultipartStore;
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload,
    RetryConfig,
};
use serde::{Deserialize, Serialize};

pub use chunks::{Chunk, ChunkWriter, UploadObjects};
pub use upload::Upload;

use super::SharedError;
use crate::cache::store::{ContentKey, Found, Kind, StoredManifest};
use crate::config::S3Config;
use crate::hashing::digest_of;
use crate::reference::Digest;

const BLOBS: &str = "blobs";
const MANIFESTS: &str = "manifests";
const UPLOADS: &str = "uploads";

/// A connection that does not open within this is down.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Whole requests other than reads: a part (8 MiB), a manifest, a listing
/// page, a marker.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// A read's body streams at its client's pace, for as long as a large blob
/// takes: no overall limit, but a stall this long ends it.
const READ_STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The shared content, in one bucket under one prefix. Cheap to clone.
#[derive(Clone)]
pub struct Bucket {
    inner: Arc<Inner>,
}

struct Inner {
    /// Everything but reads.
    store: Arc<dyn ObjectStore>,
    /// The same bucket for reads, whose bodies may stream for long.
    reader: Arc<dyn ObjectStore>,
    multipart: Arc<dyn MultipartStore>,
    /// Root of every name (`Path::ROOT` for none).
    prefix: Path,
    description: String,
    /// Strings never to appear in an error (the credentials), in case the
    /// service quotes one back.
    redact: Vec<String>,
}

impl fmt::Debug for Bucket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the stores: the S3 client's Debug shows its access key id.
        f.debug_struct("Bucket")
            .field("at", &self.inner.description)
            .finish_non_exhaustive()
    }
}

/// Bytes of a blob as read from the bucket.
pub struct BucketRead {
    /// The whole object's size, whatever range was asked for.
    pub size: u64,
    pub stream: BoxStream<'static, Result<Bytes, SharedError>>,
}

impl fmt::Debug for BucketRead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BucketRead")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// A multipart upload some replica started and has not completed or
/// aborted, as its marker tells.
#[derive(Debug, Clone)]
pub struct PendingUpload {
    pub digest: Digest,
    /// The advertised URL of the replica that started it.
    pub holder: String,
    pub started: SystemTime,
    path: Path,
    multipart_id: String,
    marker: Path,
}

/// The body of a marker object.
#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    path: String,
    multipart_id: String,
    holder: String,
    /// Unix seconds.
    started: u64,
}

impl Bucket {
    /// The bucket `[storage.s3]` names. Builds the client only: no request
    /// is made until the first call. Without configured credentials the
    /// client asks the AWS instance metadata service for some (an IAM role);
    /// nothing is read from the environment here. On Garage, `region` must
    /// be its `s3_region` (the signature's scope is checked), and path style
    /// needs no DNS for `<bucket>.<root_domain>`.
    pub fn from_config(s3: &S3Config) -> Result<Self, SharedError> {
        let bucket = s3
            .bucket
            .as_deref()
            .filter(|b| !b.is_empty())
            .ok_or_else(|| SharedError::bucket("storage.s3.bucket is not set"))?;
        let prefix = Path::parse(&s3.prefix).map_err(|_| {
            SharedError::bucket(format!(
                "storage.s3.prefix {:?} is not a valid object name prefix",
                s3.prefix
            ))
        })?;
        let mut redact = Vec::new();
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(&s3.region)
            .with_virtual_hosted_style_request(!s3.path_style)
            // Garage ignores If-None-Match on PUT, and content-addressed
            // names make an overwrite harmless: never asked for.
            .with_conditional_put(S3ConditionalPut::Disabled)
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(2),
                    base: 2.0,
                },
                max_retries: 2,
                retry_timeout: Duration::from_secs(30),
            });
        if let (Some(id), Some(secret)) = (&s3.access_key_id, &s3.secret_access_key) {
            builder = builder
                .with_access_key_id(id.expose())
                .with_secret_access_key(secret.expose());
            redact.extend(
                [id.expose(), secret.expose()]
                    .into_iter()
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned),
            );
        }
        let mut allow_http = false;
        let at = match &s3.endpoint {
            Some(url) => {
                if !url.username().is_empty() || url.password().is_some() {
                    return Err(SharedError::bucket(
                        "storage.s3.endpoint carries credentials (the URL is not shown); \
                         give them as the access key id and secret instead",
                    ));
                }
                allow_http = url.scheme() == "http";
                let shown = url.as_str().trim_end_matches('/').to_owned();
                let endpoint = if s3.path_style {
                    shown.clone()
                } else {
                    // Virtual-hosted style: the client takes the endpoint
                    // with the bucket already in its host name.
                    let mut url = url.clone();
                    let host = match url.host() {
                        Some(url::Host::Domain(d)) => d.to_owned(),
                        _ => {
                            return Err(SharedError::bucket(format!(
                                "storage.s3.endpoint {shown} has no host name to put the bucket in \
                                 (virtual-hosted style); set storage.s3.path_style = true"
                            )))
                        }
                    };
                    url.set_host(Some(&format!("{bucket}.{host}")))
                        .map_err(|e| SharedError::bucket(format!("storage.s3.endpoint: {e}")))?;
                    url.as_str().trim_end_matches('/').to_owned()
                };
                builder = builder.with_endpoint(endpoint);
                format!("at {shown}")
            }
            None => format!("in AWS region {}", s3.region),
        };
        let client = |options: ClientOptions| {
            builder
                .clone()
                .with_client_options(
                    options
                        .with_allow_http(allow_http)
                        .with_connect_timeout(CONNECT_TIMEOUT),
                )
                .build()
                .map_err(|e| fail(&redact, "building the S3 client", e))
        };
        let store = Arc::new(client(ClientOptions::new().with_timeout(REQUEST_TIMEOUT))?);
        let reader = Arc::new(client(
            ClientOptions::new()
                .with_timeout_disabled()
                .with_read_timeout(READ_STALL_TIMEOUT),
        )?);
        let description = format!("s3://{bucket}/{} {at}", shown_prefix(&prefix));
        Ok(Self {
            inner: Arc::new(Inner {
                store: store.clone(),
                reader,
                multipart: store,
                prefix,
                description,
                redact,
            }),
        })
    }

    /// A bucket in memory, for tests and a single process.
    pub fn in_memory() -> Self {
        Self::on_memory(Arc::new(InMemory::new()), Path::ROOT)
    }

    fn on_memory(store: Arc<InMemory>, prefix: Path) -> Self {
        let description = format!("memory:///{}", shown_prefix(&prefix));
        Self {
            inner: Arc::new(Inner {
                store: store.clone(),
                reader: store.clone(),
                multipart: store,
                prefix,
                description,
                redact: Vec::new(),
            }),
        }
    }

    /// The same bucket with every name under `<prefix>/<sub>`: an area of
    /// its own (the hosted repositories'), which the cache's scans, which
    /// list its own areas only, never see.
    pub fn under(&self, sub: &str) -> Bucket {
        let inner = &self.inner;
        let prefix = inner.prefix.clone().join(sub);
        let description = format!("{} (area {sub}/)", inner.description);
        Bucket {
            inner: Arc::new(Inner {
                store: inner.store.clone(),
                reader: inner.reader.clone(),
                multipart: inner.multipart.clone(),
                prefix,
                description,
                redact: inner.redact.clone(),
            }),
        }
    }

    /// Where the bucket is, for logs and the status page; never a secret.
    pub fn describe(&self) -> String {
        self.inner.description.clone()
    }

    /// Whether the bucket answers, with credentials it accepts: lists the
    /// markers of uploads in progress (a handful), which a missing bucket or
    /// refused credentials fail.
    pub async fn ping(&self) -> Result<(), SharedError> {
        let inner = &self.inner;
        inner
            .store
            .list_with_delimiter(Some(&inner.prefix.clone().join(UPLOADS)))
            .await
            .map(|_| ())
            .map_err(|e| inner.fail("ping", e))
    }

    /// The size of a committed item (a manifest's as stored, media type line
    /// included), `None` if absent.
    pub async fn head(&self, key: &ContentKey) -> Result<Option<u64>, SharedError> {
        let inner = &self.inner;
        match inner.store.head(&inner.path(key.kind, &key.digest)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(inner.fail(format_args!("head {} {}", key.kind.as_str(), key.digest), e)),
        }
    }

    /// Bytes `range` of the blob `digest` (the whole blob for `None`); `None`
    /// if absent. The range must lie within the blob.
    pub async fn read(
        &self,
        digest: &Digest,
        range: Option<Range<u64>>,
    ) -> Result<Option<BucketRead>, SharedError> {
        let inner = &self.inner;
        let what = || format!("read blob {digest}");
        let mut options = GetOptions::new();
        if let Some(r) = &range {
            if r.start > r.end {
                return Err(SharedError::bucket(format!(
                    "{}: range {r:?} is backwards",
                    what()
                )));
            }
            if r.is_empty() {
                // HTTP has no empty range: the size tells whether it fits.
                return match self.head(&ContentKey::blob(digest)).await? {
                    None => Ok(None),
                    Some(size) if r.end <= size => Ok(Some(BucketRead {
                        size,
                        stream: stream::empty().boxed(),
                    })),
                    Some(size) => Err(past_the_end(&what(), r, size)),
                };
            }
            options = options.with_range(Some(GetRange::Bounded(r.clone())));
        }
        let got = match inner
            .reader
            .get_opts(&inner.path(Kind::Blob, digest), options)
            .await
        {
            Ok(got) => got,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(inner.fail(what(), e)),
        };
        let size = got.meta.size;
        if let Some(r) = &range {
            if got.range != *r {
                return Err(past_the_end(&what(), r, size));
            }
        }
        let (inner, what) = (self.inner.clone(), what());
        let stream = got
            .into_stream()
            .map_err(move |e| inner.fail(&what, e))
            .boxed();
        Ok(Some(BucketRead { size, stream }))
    }

    /// The manifest `digest`, if present and intact. One whose bytes do not
    /// hash to `digest` (or that lacks its media type line) is deleted,
    /// logged, and reported absent.
    pub async fn get_manifest(
        &self,
        digest: &Digest,
    ) -> Result<Option<StoredManifest>, SharedError> {
        let inner = &self.inner;
        let what = || format!("read manifest {digest}");
        let path = inner.path(Kind::Manifest, digest);
        let body = match inner.reader.get(&path).await {
            Ok(got) => got.bytes().await.map_err(|e| inner.fail(what(), e))?,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(inner.fail(what(), e)),
        };
        if let Some(manifest) = parse_manifest(&body) {
            if digest_of(digest.algorithm(), &manifest.bytes) == *digest {
                return Ok(Some(manifest));
            }
        }
        tracing::warn!(%digest, bucket = %inner.description, "damaged manifest in the bucket; deleting it");
        self.remove(&ContentKey::manifest(digest)).await?;
        Ok(None)
    }

    /// Stores a manifest whose bytes were verified against `digest`; returns
    /// the bytes it takes in the bucket.
    pub async fn put_manifest(
        &self,
        digest: &Digest,
        manifest: &StoredManifest,
    ) -> Result<u64, SharedError> {
        let inner = &self.inner;
        if manifest.media_type.contains('\n') {
            return Err(SharedError::bucket(format!(
                "manifest {digest}: its media type holds a line break"
            )));
        }
        let mut body = Vec::with_capacity(manifest.stored_size() as usize);
        body.extend_from_slice(manifest.media_type.as_bytes());
        body.push(b'\n');
        body.extend_from_slice(&manifest.bytes);
        inner
            .store
            .put(&inner.path(Kind::Manifest, digest), PutPayload::from(body))
            .await
            .map_err(|e| inner.fail(format_args!("put manifest {digest}"), e))?;
        Ok(manifest.stored_size())
    }

    /// Starts a multipart upload of the blob `digest` for `holder` (the
    /// replica's advertised URL), with its marker.
    pub async fn upload(&self, digest: &Digest, holder: &str) -> Result<Upload, SharedError> {
        Upload::start(self.inner.clone(), digest, holder).await
    }

    /// Deletes an item; absent is fine.
    pub async fn remove(&self, key: &ContentKey) -> Result<(), SharedError> {
        let inner = &self.inner;
        inner
            .delete(&inner.path(key.kind, &key.digest))
            .await
            .map_err(|e| {
                inner.fail(
                    format_args!("remove {} {}", key.kind.as_str(), key.digest),
                    e,
                )
            })
    }

    /// Every committed blob and manifest with its size and last
    /// modification; names that are not digests are skipped.
    pub async fn scan(&self) -> Result<Vec<Found>, SharedError> {
        let inner = &self.inner;
        let mut out = Vec::new();
        for kind in [Kind::Blob, Kind::Manifest] {
            let area = inner.prefix.clone().join(area(kind));
            let listed: Vec<_> = inner
                .store
                .list(Some(&area))
                .try_collect()
                .await
                .map_err(|e| inner.fail(format_args!("scan {}", area.as_ref()), e))?;
            for meta in listed {
                let Some(digest) = digest_under(&meta.location, &area) else {
                    continue;
                };
                out.push(Found {
                    key: ContentKey { kind, digest },
                    size: meta.size,
                    modified: SystemTime::from(meta.last_modified),
                });
            }
        }
        Ok(out)
    }

    /// The uploads whose markers are in the bucket: in progress, or left by
    /// a replica that crashed. A marker that cannot be read is skipped
    /// (logged).
    pub async fn pending_uploads(&self) -> Result<Vec<PendingUpload>, SharedError> {
        let inner = &self.inner;
        let area = inner.prefix.clone().join(UPLOADS);
        let listed: Vec<_> = inner
            .store
            .list(Some(&area))
            .try_collect()
            .await
            .map_err(|e| inner.fail("list upload markers", e))?;
        let mut out = Vec::new();
        for meta in listed {
            let Some(digest) = marker_digest(&meta.location, &area) else {
                continue;
            };
            let body = match inner.store.get(&meta.location).await {
                Ok(got) => got.bytes().await,
                Err(e) => Err(e),
            };
            let body = match body {
                Ok(body) => body,
                // Completed or aborted since the listing.
                Err(e) if is_not_found(&e) => continue,
                Err(e) => return Err(inner.fail(format_args!("read {}", meta.location), e)),
            };
            let path = inner.path(Kind::Blob, &digest);
            match serde_json::from_slice::<Marker>(&body) {
                Ok(m) if m.path == path.as_ref() => out.push(PendingUpload {
                    digest,
                    holder: m.holder,
                    started: SystemTime::UNIX_EPOCH + Duration::from_secs(m.started),
                    path,
                    multipart_id: m.multipart_id,
                    marker: meta.location,
                }),
                _ => {
                    tracing::warn!(marker = %meta.location, bucket = %inner.description,
                        "upload marker that does not parse or names another object; skipped");
                }
            }
        }
        Ok(out)
    }

    /// Aborts a pending upload (one already gone is fine), then deletes its
    /// marker.
    pub async fn abort_pending(&self, p: &PendingUpload) -> Result<(), SharedError> {
        let inner = &self.inner;
        match inner
            .multipart
            .abort_multipart(&p.path, &p.multipart_id)
            .await
        {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => {
                return Err(inner.fail(format_args!("abort the upload of blob {}", p.digest), e))
            }
        }
        inner
            .delete(&p.marker)
            .await
            .map_err(|e| inner.fail(format_args!("delete {}", p.marker), e))
    }
}

impl Inner {
    fn path(&self, kind: Kind, digest: &Digest) -> Path {
        self.prefix
            .clone()
            .join(area(kind))
            .join(digest.algorithm().as_str())
            .join(digest.hex())
    }

    fn marker_path(&self, digest: &Digest) -> Path {
        let random: u64 = rand::random();
        self.prefix.clone().join(UPLOADS).join(format!(
            "{}-{}-{random:016x}.json",
            digest.algorithm().as_str(),
            digest.hex()
        ))
    }

    /// Deletes an object; absent is fine.
    async fn delete(&self, path: &Path) -> Result<(), object_store::Error> {
        match self.store.delete(path).await {
            Err(e) if !is_not_found(&e) => Err(e),
            _ => Ok(()),
        }
    }

    fn fail(&self, what: impl fmt::Display, e: object_store::Error) -> SharedError {
        fail(&self.redact, what, e)
    }
}

/// `what: e`, without the credentials should the service have quoted them.
fn fail(redact: &[String], what: impl fmt::Display, e: object_store::Error) -> SharedError {
    let mut message = format!("{what}: {e}");
    for secret in redact {
        message = message.replace(secret.as_str(), "<redacted>");
    }
    SharedError::bucket(message)
}

fn is_not_found(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. })
}

fn past_the_end(what: &str, r: &Range<u64>, size: u64) -> SharedError {
    SharedError::bucket(format!(
        "{what}: range {r:?} is not within its {size} bytes"
    ))
}

fn area(kind: Kind) -> &'static str {
    match kind {
        Kind::Blob => BLOBS,
        Kind::Manifest => MANIFESTS,
    }
}

/// `""` or `"a/b/"`.
fn shown_prefix(prefix: &Path) -> String {
    if prefix.as_ref().is_empty() {
        String::new()
    } else {
        format!("{prefix}/")
    }
}

/// The digest of `<area>/<alg>/<hex>`, if that is what `location` is.
fn digest_under(location: &Path, area: &Path) -> Option<Digest> {
    let parts: Vec<_> = location.prefix_match(area)?.collect();
    match parts.as_slice() {
        [alg, hex] => Digest::parse(&format!("{}:{}", alg.as_ref(), hex.as_ref())).ok(),
        _ => None,
    }
}

/// The digest of `<uploads>/<alg>-<hex>-<random>.json`, if that is what
/// `location` is.
fn marker_digest(location: &Path, area: &Path) -> Option<Digest> {
    let parts: Vec<_> = location.prefix_match(area)?.collect();
    let [name] = parts.as_slice() else {
        return None;
    };
    let (named, _random) = name.as_ref().strip_suffix(".json")?.rsplit_once('-')?;
    let (alg, hex) = named.split_once('-')?;
    Digest::parse(&format!("{alg}:{hex}")).ok()
}

/// A stored manifest's body: its media type line, then its bytes.
fn parse_manifest(body: &Bytes) -> Option<StoredManifest> {
    let newline = body.iter().position(|&b| b == b'\n')?;
    let media_type = std::str::from_utf8(&body[..newline]).ok()?.to_owned();
    Some(StoredManifest {
        media_type,
        bytes: body.slice(newline + 1..),
    })
}

#[cfg(test)]
mod tests;
