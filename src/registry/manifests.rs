//! Manifests: tags resolved with an upstream HEAD once their TTL is over
//! (served stale when the upstream is down, never resolved when offline),
//! manifests fetched by digest only when not cached, verified, and kept byte
//! for byte with their media type.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use http::{header, StatusCode};

use super::{offline_miss, Registry};
use crate::cache::policy::{tag_is_fresh, tag_ttl_for};
use crate::cache::store::{ContentKey, StoredManifest, TagEntry};
use crate::error::Error;
use crate::hashing::digest_of;
use crate::manifest;
use crate::reference::{Algorithm, Digest, Reference, RepoName, Tag};
use crate::response::{self, Outcome, Reply, CONTENT_DIGEST};
use crate::routing::Route;
use crate::upstream::{Document, What};

impl Registry {
    pub(super) async fn manifest(
        &self,
        route: &Route,
        reference: &Reference,
        head: bool,
    ) -> Result<Reply, Error> {
        match reference {
            Reference::Digest(digest) => {
                let (m, outcome) = self.manifest_by_digest(route, digest).await?;
                manifest_reply(digest, &m, head, outcome)
            }
            Reference::Tag(tag) => self.manifest_by_tag(route, tag, head).await,
        }
    }

    async fn manifest_by_tag(&self, route: &Route, tag: &Tag, head: bool) -> Result<Reply, Error> {
        let target = self.tag_target(route, tag).await?;
        // Every client resolves the tag once per pull (dockerd and containerd
        // with a HEAD, skopeo with a GET): that is what counts as a pull.
        self.metrics.pulled(&format!("{}:{tag}", route.key));
        let entry = match target {
            Resolved::Entry(e) => e,
            // The upstream sent no digest on HEAD: the GET by tag was the answer.
            Resolved::Fetched(digest, m) => {
                return manifest_reply(&digest, &m, head, Outcome::Miss)
            }
        };
        // A HEAD needs no bytes: answer it from what the upstream's HEAD said.
        if head && !self.has_manifest(&entry.digest).await {
            if let (Some(media_type), Some(size)) = (&entry.media_type, entry.size) {
                return head_reply(&entry.digest, media_type, size);
            }
        }
        let (m, outcome) = self.manifest_by_digest(route, &entry.digest).await?;
        manifest_reply(&entry.digest, &m, head, outcome)
    }

    /// The manifest a tag points to, as `manifest_by_tag` would serve it.
    pub(super) async fn manifest_for_tag(
        &self,
        route: &Route,
        tag: &Tag,
    ) -> Result<(Digest, Arc<StoredManifest>), Error> {
        match self.tag_target(route, tag).await? {
            Resolved::Entry(e) => {
                let (m, _) = self.manifest_by_digest(route, &e.digest).await?;
                Ok((e.digest, m))
            }
            Resolved::Fetched(digest, m) => Ok((digest, m)),
        }
    }

    /// Where a tag points: the index's answer while fresh (always, offline),
    /// else the upstream's, else (upstream down) the stale one.
    async fn tag_target(&self, route: &Route, tag: &Tag) -> Result<Resolved, Error> {
        let now = SystemTime::now();
        let known = self.index.tag(&route.key, tag).await;
        let ttl = tag_ttl_for(
            route.repo.as_str(),
            tag.as_str(),
            &self.tag_rules,
            self.default_tag_ttl(route),
        );
        match known {
            Some(e) if self.offline || tag_is_fresh(e.checked_at, now, ttl) => {
                Ok(Resolved::Entry(e))
            }
            None if self.offline => Err(offline_miss(
                What::Manifest,
                &format!("{}:{tag}", route.key),
            )),
            stale => match self.resolve_tag(route, tag, now).await {
                Err(Error::ManifestUnknown(d)) => {
                    // A definite answer: the tag is gone upstream.
                    self.index.remove_tag(&route.key, tag).await;
                    Err(Error::ManifestUnknown(d))
                }
                Err(e) => match stale {
                    Some(old) if e.is_upstream_outage() && self.has_manifest(&old.digest).await => {
                        tracing::warn!(repo = %route.key, %tag, digest = %old.digest, error = %e, "upstream unavailable; serving the tag from cache");
                        self.metrics.stale_serve();
                        Ok(Resolved::Entry(old))
                    }
                    _ => Err(e),
                },
                ok => ok,
            },
        }
    }

    /// Whether the manifest is in memory or on disk: a yes or no, so the
    /// file is not read (it is verified when served).
    async fn has_manifest(&self, digest: &Digest) -> bool {
        self.manifests.contains_key(digest)
            || matches!(
                self.store.contains(&ContentKey::manifest(digest)).await,
                Ok(true)
            )
    }

    /// The manifest from the store. One missing, or damaged (which the store
    /// removes), is forgotten by the index too; the entry is read before the
    /// store is, so a commit that lands in between is not forgotten.
    async fn stored_manifest(&self, digest: &Digest) -> std::io::Result<Option<StoredManifest>> {
        let key = ContentKey::manifest(digest);
        let entry = self.index.entry(&key).await;
        let m = self.store.get_manifest(digest).await?;
        if let (None, Some(seen)) = (&m, entry) {
            self.index.forget_if(&key, seen).await;
        }
        Ok(m)
    }

    /// Asks the upstream where a tag points now, and records it.
    pub(super) async fn resolve_tag(
        &self,
        route: &Route,
        tag: &Tag,
        now: SystemTime,
    ) -> Result<Resolved, Error> {
        let reference = Reference::Tag(tag.clone());
        let found = self
            .upstream(route)
            .head_manifest(&route.repo, &reference)
            .await?;
        let (digest, media_type, size) = match found.digest {
            Some(d) => (d, found.media_type, found.size),
            None => {
                let doc = self
                    .upstream(route)
                    .get_manifest(&route.repo, &reference)
                    .await?;
                let digest = digest_of(Algorithm::Sha256, &doc.bytes);
                let (m, _) = self.keep_manifest(route, &digest, doc).await?;
                let entry = TagEntry {
                    digest: digest.clone(),
                    media_type: Some(m.media_type.clone()),
                    size: Some(m.bytes.len() as u64),
                    checked_at: now,
                };
                self.index.set_tag(&route.key, tag, entry).await;
                return Ok(Resolved::Fetched(digest, m));
            }
        };
        // The upstream just said this repository has the digest.
        self.index.add_holds(&route.key, vec![digest.clone()]).await;
        let entry = TagEntry {
            digest,
            media_type,
            size,
            checked_at: now,
        };
        self.index.set_tag(&route.key, tag, entry.clone()).await;
        Ok(Resolved::Entry(entry))
    }

    /// A manifest by digest: from memory or disk when the repository is known
    /// to hold it, else fetched (once, however many ask) and verified.
    ///
    /// Concurrent callers share one load whatever their repository. Its
    /// manifest is theirs too (verified by digest; `authorize` still checks
    /// each caller's repository), but its error belongs to the loader's
    /// repository: another repository's caller loads again for itself.
    pub(super) async fn manifest_by_digest(
        &self,
        route: &Route,
        digest: &Digest,
    ) -> Result<(Arc<StoredManifest>, Outcome), Error> {
        let own = Arc::new(OwnLoad::default());
        let m = loop {
            let loaded = self
                .manifests
                .try_get_with(digest.clone(), {
                    let own = own.clone();
                    async move {
                        self.load_manifest(route, digest, &own)
                            .await
                            .map_err(|error| LoadFailed {
                                repo: route.key.clone(),
                                error,
                            })
                    }
                })
                .await;
            match loaded {
                Ok(m) => break m,
                Err(failed) if failed.repo == route.key => return Err(failed.error.clone()),
                // Each retry follows a load that ended, so it ends as soon as
                // no other repository's load is in flight for the digest.
                Err(_) => continue,
            }
        };
        if own.unstored.load(Ordering::Relaxed) {
            // Memory holds only what the disk does: the next request fetches
            // it again and tries to store it again.
            self.manifests.invalidate(digest).await;
        }
        let fetched = own.fetched.load(Ordering::Relaxed);
        self.authorize(route, digest, What::Manifest).await?;
        if !fetched {
            self.touch(ContentKey::manifest(digest)).await;
        }
        let outcome = if fetched { Outcome::Miss } else { Outcome::Hit };
        Ok((m, outcome))
    }

    /// One load of a manifest for `route`: from disk, else from the upstream
    /// (recorded in `own`).
    async fn load_manifest(
        &self,
        route: &Route,
        digest: &Digest,
        own: &OwnLoad,
    ) -> Result<Arc<StoredManifest>, Error> {
        if let Some(m) = self
            .stored_manifest(digest)
            .await
            .map_err(|e| Error::internal("reading a cached manifest", e))?
        {
            return Ok(Arc::new(m));
        }
        if self.offline {
            return Err(offline_miss(
                What::Manifest,
                &format!("{}@{digest}", route.key),
            ));
        }
        let doc = self
            .upstream(route)
            .get_manifest(&route.repo, &Reference::Digest(digest.clone()))
            .await?;
        own.fetched.store(true, Ordering::Relaxed);
        let (m, stored) = self.keep_manifest(route, digest, doc).await?;
        own.unstored.store(!stored, Ordering::Relaxed);
        Ok(m)
    }

    /// Verifies a manifest from the upstream against `digest` and stores it,
    /// saying whether the store took it; `repo` then holds it and everything
    /// it references.
    async fn keep_manifest(
        &self,
        route: &Route,
        digest: &Digest,
        doc: Document,
    ) -> Result<(Arc<StoredManifest>, bool), Error> {
        let got = digest_of(digest.algorithm(), &doc.bytes);
        if got != *digest {
            self.metrics.verification_failure("manifest");
            return Err(Error::UpstreamFailed(format!(
                "upstream sent a manifest with digest {got} for {digest}"
            )));
        }
        let content_type = doc
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        let m = StoredManifest {
            media_type: manifest::media_type(content_type, &doc.bytes),
            bytes: doc.bytes,
        };
        let stored = match self.store.put_manifest(digest, &m).await {
            Ok(size) => {
                self.record(ContentKey::manifest(digest), size).await;
                true
            }
            Err(e) => {
                // Verified bytes are served even so (as a blob whose commit
                // fails): the cache loses the manifest, the client does not.
                // A full disk is the likely cause: eviction makes room.
                tracing::warn!(%digest, error = %e, "cannot store a manifest; serving it uncached");
                self.space_changed.notify_one();
                false
            }
        };
        let mut held = manifest::references(&m.bytes);
        held.push(digest.clone());
        self.index.add_holds(&route.key, held).await;
        Ok((Arc::new(m), stored))
    }
}

/// What a caller's own load did, when it was the one that ran.
#[derive(Default)]
struct OwnLoad {
    /// The manifest came from the upstream.
    fetched: AtomicBool,
    /// It was fetched, and the store did not take it.
    unstored: AtomicBool,
}

/// A failed manifest load, with the repository whose load it was.
struct LoadFailed {
    repo: RepoName,
    error: Error,
}

pub(super) enum Resolved {
    Entry(TagEntry),
    Fetched(Digest, Arc<StoredManifest>),
}

pub(super) fn manifest_reply(
    digest: &Digest,
    m: &StoredManifest,
    head: bool,
    outcome: Outcome,
) -> Result<Reply, Error> {
    let body = if head {
        response::empty()
    } else {
        response::full(m.bytes.clone())
    };
    let response = response::builder(StatusCode::OK)
        .header(header::CONTENT_TYPE, &m.media_type)
        .header(header::CONTENT_LENGTH, m.bytes.len())
        .header(CONTENT_DIGEST, digest.to_string())
        .header(header::ETAG, format!("\"{digest}\""))
        .body(body)
        .map_err(|e| Error::internal("building a response", e))?;
    Ok(Reply { response, outcome })
}

fn head_reply(digest: &Digest, media_type: &str, size: u64) -> Result<Reply, Error> {
    let response = response::builder(StatusCode::OK)
        .header(header::CONTENT_TYPE, media_type)
        .header(header::CONTENT_LENGTH, size)
        .header(CONTENT_DIGEST, digest.to_string())
        .header(header::ETAG, format!("\"{digest}\""))
        .body(response::empty())
        .map_err(|e| Error::internal("building a response", e))?;
    Ok(Reply {
        response,
        outcome: Outcome::Pass,
    })
}
