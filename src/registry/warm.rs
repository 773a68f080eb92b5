//! One warm-up of one image, for `crate::warm`'s schedule: where its tag
//! points now (an upstream HEAD, whatever the tag TTL says), then what the
//! cache lacks of it pulled through the same manifest and blob paths a
//! client's pull takes (verified, committed, recorded), so the next client
//! pull asks the upstream nothing. Owns no schedule and counts no client
//! metrics (no request passes the front door).

use std::sync::Arc;
use std::time::SystemTime;

use http_body_util::BodyExt;

use super::manifests::Resolved;
use super::Registry;
use crate::cache::store::StoredManifest;
use crate::cluster::coordinator::Coordinator;
use crate::error::Error;
use crate::imageref::ImageRef;
use crate::prefetch::{plan, Plan, Platforms};
use crate::reference::{Digest, Reference};
use crate::response::Outcome;
use crate::routing::Route;

/// What one warm-up of an image did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Warmed {
    /// The digest the reference points to now.
    pub digest: Option<Digest>,
    /// The tag pointed elsewhere before (or was not known).
    pub moved: bool,
    /// Manifests and blobs of the image.
    pub items: usize,
    /// Of them, fetched from the upstream by this warm-up (or a download it
    /// followed).
    pub fetched_items: usize,
    /// Their bytes.
    pub fetched_bytes: u64,
}

impl Registry {
    /// Checks `image` with the upstream and pulls what the cache lacks of
    /// the platforms asked for.
    pub async fn warm(&self, image: &ImageRef, platforms: &[Platforms]) -> Result<Warmed, Error> {
        if self.offline {
            return Err(Error::Unsupported(
                "the mirror is offline: nothing is warmed".into(),
            ));
        }
        if image.registry.is_none() && self.hosted.as_ref().is_some_and(|h| h.hosts(&image.repo)) {
            return Err(Error::Unsupported(format!(
                "{image} is hosted here, not mirrored: nothing to warm"
            )));
        }
        let route = self.route(&image.repo, image.registry.as_deref())?;
        let mut warmed = Warmed::default();
        let digest = match &image.reference {
            Reference::Digest(d) => d.clone(),
            Reference::Tag(tag) => {
                let before = self.index.tag(&route.key, tag).await.map(|e| e.digest);
                let digest = match self.resolve_tag(&route, tag, SystemTime::now()).await? {
                    Resolved::Entry(e) => e.digest,
                    Resolved::Fetched(digest, m) => {
                        warmed.fetched_items += 1;
                        warmed.fetched_bytes += m.bytes.len() as u64;
                        digest
                    }
                };
                warmed.moved = before.as_ref() != Some(&digest);
                digest
            }
        };
        warmed.digest = Some(digest.clone());
        let top = self.warm_manifest(&route, &digest, &mut warmed).await?;
        let blobs = match plan(&top.bytes, platforms).map_err(Error::ManifestInvalid)? {
            Plan::Blobs(b) => b,
            Plan::Children(children) => {
                let mut blobs = Vec::new();
                for child in children {
                    let m = self.warm_manifest(&route, &child, &mut warmed).await?;
                    match plan(&m.bytes, &[]).map_err(Error::ManifestInvalid)? {
                        Plan::Blobs(b) => blobs.extend(b),
                        Plan::Children(_) => {
                            return Err(Error::ManifestInvalid(format!(
                                "{child} is an index inside an index"
                            )))
                        }
                    }
                }
                blobs
            }
        };
        for digest in blobs {
            warmed.items += 1;
            if self.cached_blob(&digest).await?.is_some() {
                continue;
            }
            let reply = self.blob(&route, &digest, false, None).await?;
            let fetched = reply.outcome != Outcome::Hit;
            let mut body = reply.response.into_body();
            let mut n = 0u64;
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| {
                    Error::UpstreamFailed(format!("downloading {digest} failed: {e}"))
                })?;
                if let Some(data) = frame.data_ref() {
                    n += data.len() as u64;
                }
            }
            if fetched {
                warmed.fetched_items += 1;
                warmed.fetched_bytes += n;
            }
        }
        Ok(warmed)
    }

    /// A manifest by digest through the client's path, counted when it
    /// came from the upstream.
    async fn warm_manifest(
        &self,
        route: &Route,
        digest: &Digest,
        warmed: &mut Warmed,
    ) -> Result<Arc<StoredManifest>, Error> {
        let (m, outcome) = self.manifest_by_digest(route, digest).await?;
        warmed.items += 1;
        if outcome != Outcome::Hit {
            warmed.fetched_items += 1;
            warmed.fetched_bytes += m.bytes.len() as u64;
        }
        Ok(m)
    }

    /// The coordinator and this replica's name, when this is one replica of
    /// several (one of them warms at a time).
    pub fn coordinator(&self) -> Option<(Arc<dyn Coordinator>, String)> {
        let c = self.cluster.as_ref()?;
        Some((c.tiers.coordinator.clone(), c.tiers.advertise.clone()))
    }
}
