//! The registry API's logic: each parsed [`Endpoint`] answered from the cache
//! or the upstream. Owns the rule that a digest is served for a repository
//! only when that repository is known to hold it.

mod blobs;
mod manifests;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, StatusCode};

use crate::config::Config;
use crate::download::Downloads;
use crate::endpoint::{ApiRequest, Endpoint, TagsPage};
use crate::error::Error;
use crate::reference::{Digest, RepoName};
use crate::response::{self, Outcome, Reply};
use crate::store::{disk::DiskStore, memory::MemoryIndex, BlobStore, Index, StoredManifest};
use crate::upstream::Upstream;

/// Bytes of manifests kept in memory (they are also on disk).
const MANIFEST_MEMORY: u64 = 64 * 1024 * 1024;

/// The mirror's state shared by all requests.
pub struct Registry {
    store: Arc<dyn BlobStore>,
    index: Arc<dyn Index>,
    upstream: Arc<Upstream>,
    downloads: Arc<Downloads>,
    /// Manifests by digest, in memory; loading one is single-flight.
    manifests: moka::future::Cache<Digest, Arc<StoredManifest>>,
    tag_ttl: Duration,
}

impl Registry {
    /// Opens the data dir and builds the upstream client.
    pub fn open(config: &Config) -> Result<Self, Error> {
        let store: Arc<dyn BlobStore> =
            Arc::new(DiskStore::open(&config.data_dir).map_err(|e| {
                Error::internal(
                    &format!("opening the data dir {}", config.data_dir.display()),
                    e,
                )
            })?);
        let upstream = Arc::new(Upstream::new(&config.upstream)?);
        Ok(Self {
            downloads: Arc::new(Downloads::new(store.clone(), upstream.read_timeout())),
            store,
            index: Arc::new(MemoryIndex::new()),
            upstream,
            manifests: moka::future::Cache::builder()
                .weigher(|_, m: &Arc<StoredManifest>| {
                    u32::try_from(m.bytes.len()).unwrap_or(u32::MAX)
                })
                .max_capacity(MANIFEST_MEMORY)
                .build(),
            tag_ttl: config.cache.tag_ttl,
        })
    }

    /// Answers one parsed request.
    pub async fn handle(&self, req: &ApiRequest, headers: &HeaderMap) -> Result<Reply, Error> {
        match &req.endpoint {
            Endpoint::Ping => Ok(Reply {
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
            Endpoint::Manifest { name, reference } => {
                self.manifest(name, reference, req.head).await
            }
            Endpoint::Blob { name, digest } => {
                let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
                self.blob(name, digest, req.head, range).await
            }
            Endpoint::TagsList { name, page } => self.tags(name, page, req.head).await,
            Endpoint::Referrers { .. } => Err(Error::NotFound(
                "the referrers API is not served by this mirror yet".into(),
            )),
            Endpoint::Catalog => Err(Error::NotFound(
                "the catalog is not served by this mirror yet".into(),
            )),
        }
    }

    /// `tags/list`, passed through from the upstream with its `Link` header.
    async fn tags(&self, name: &RepoName, page: &TagsPage, head: bool) -> Result<Reply, Error> {
        let query = {
            let mut q = url::form_urlencoded::Serializer::new(String::new());
            if let Some(n) = page.n {
                q.append_pair("n", &n.to_string());
            }
            if let Some(last) = &page.last {
                q.append_pair("last", last.as_str());
            }
            q.finish()
        };
        let doc = self.upstream.get_tags(name, &query).await?;
        let mut b = response::builder(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CONTENT_LENGTH, doc.bytes.len());
        if let Some(link) = doc.headers.get(header::LINK) {
            b = b.header(header::LINK, link);
        }
        let body = if head {
            response::empty()
        } else {
            response::full(doc.bytes)
        };
        Ok(Reply {
            response: b
                .body(body)
                .map_err(|e| Error::internal("building a response", e))?,
            outcome: Outcome::Pass,
        })
    }

    /// Makes sure `repo` may be served `digest`: known locally, or confirmed
    /// by `confirm` (an upstream HEAD), after which it is remembered.
    async fn authorize<F>(&self, repo: &RepoName, digest: &Digest, confirm: F) -> Result<(), Error>
    where
        F: std::future::Future<Output = Result<(), Error>>,
    {
        if self.index.holds(repo, digest).await {
            return Ok(());
        }
        confirm.await?;
        self.index.add_holds(repo, vec![digest.clone()]).await;
        Ok(())
    }
}
