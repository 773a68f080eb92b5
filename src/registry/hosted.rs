//! Requests for hosted repositories: the pull API answered from the hosted
//! store alone (never the upstream), and the push API (uploads, mounts,
//! manifests, deletes), as distribution-spec v1.1 describes it.

use bytes::Bytes;
use http::{header, HeaderMap, StatusCode};
use http_body_util::BodyExt;

use super::blobs::blob_reply;
use super::listings::{json_reply, tags_reply};
use super::manifests::manifest_reply;
use super::Registry;
use crate::cache::store::{ContentKey, StoredManifest, TagEntry};
use crate::endpoint::{ApiRequest, Endpoint, UploadOp, UploadStart};
use crate::error::Error;
use crate::hosted::gc::Report;
use crate::hosted::Hosted;
use crate::manifest::{self, OCI_INDEX};
use crate::reference::{Digest, Reference, RepoName, UploadId};
use crate::response::{self, Body, Outcome, Reply, CONTENT_DIGEST};

/// The largest manifest a client may push (as an import takes).
const MAX_MANIFEST: usize = 4 * 1024 * 1024;
const UPLOAD_UUID: &str = "Docker-Upload-UUID";
const OCI_SUBJECT: &str = "OCI-Subject";
/// Upkeep runs between scheduled collections of hosted content (about ten
/// minutes); a delete or `regmirror gc` asks for one sooner.
const COLLECT_EVERY: u32 = 60;
/// Upkeep runs between looks for expired uploads (about a minute: on
/// replicas each look lists the bucket's uploads).
const EXPIRE_UPLOADS_EVERY: u32 = 6;

impl Registry {
    /// A request for a hosted repository.
    pub(super) async fn hosted(
        &self,
        req: &ApiRequest,
        headers: &HeaderMap,
        body: Option<Body>,
    ) -> Result<Reply, Error> {
        let Some(h) = &self.hosted else {
            return Err(Error::Internal("no hosted store is open".into()));
        };
        let name = req
            .endpoint
            .name()
            .ok_or_else(|| Error::Internal("a hosted request without a name".into()))?;
        let head = req.head;
        match &req.endpoint {
            Endpoint::Manifest { reference, .. } => {
                let digest = resolve(h, name, reference).await?;
                let m = h
                    .manifest(name, &digest)
                    .await?
                    .ok_or_else(|| h.unknown(manifest_unknown(name, reference)))?;
                manifest_reply(&digest, &m, head, Outcome::Hit)
            }
            Endpoint::Blob { digest, .. } => {
                // Before the check: a client that finds the blob here may
                // send a manifest naming it next (hosted::gc's grace).
                h.seen(name, digest).await;
                let unknown = || h.unknown(Error::BlobUnknown(format!("{name}@{digest}")));
                let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
                if head {
                    // Without reading bytes: on a replica, a HEAD (each
                    // push asks one per layer) copies nothing from the bucket.
                    let size = h.blob_size(name, digest).await?.ok_or_else(unknown)?;
                    return blob_reply(digest, size, None, true, range, Outcome::Hit);
                }
                let blob = h.blob(name, digest).await?.ok_or_else(unknown)?;
                let size = blob.size;
                let source = h.verifier.source(digest, blob).await;
                blob_reply(digest, size, Some(source), false, range, Outcome::Hit)
            }
            Endpoint::TagsList { page, .. } => {
                let mut tags: Vec<_> = h
                    .index
                    .tags()
                    .await
                    .into_iter()
                    .filter(|(r, _, _)| r == name)
                    .map(|(_, t, _)| t)
                    .collect();
                if tags.is_empty() && h.index.held(name).await.is_empty() {
                    return Err(h.unknown(Error::NameUnknown(format!("{name} has nothing pushed"))));
                }
                tags.sort();
                tags_reply(name, None, &tags, page, head, Outcome::Hit)
            }
            Endpoint::Referrers {
                digest,
                artifact_type,
                ..
            } => referrers(h, name, digest, artifact_type.clone(), head).await,
            Endpoint::StartUpload { start, .. } => self.start_upload(h, name, start, body).await,
            Endpoint::Upload { id, op, .. } => upload(h, name, id, op, headers, body).await,
            Endpoint::PutManifest { reference, .. } => {
                put_manifest(h, name, reference, headers, body).await
            }
            Endpoint::DeleteManifest { reference, .. } => {
                deletes_allowed(h)?;
                delete_manifest(h, name, reference).await
            }
            Endpoint::DeleteBlob { digest, .. } => {
                deletes_allowed(h)?;
                if h.blob_size(name, digest).await?.is_none() {
                    return Err(Error::BlobUnknown(format!("{name}@{digest}")));
                }
                let mark = h.write_mark();
                h.index.drop_hold(name, digest).await;
                h.persist(mark).await?;
                h.collect_soon();
                accepted()
            }
            Endpoint::Ping | Endpoint::Catalog { .. } => {
                Err(Error::Internal("endpoint without a name".into()))
            }
        }
    }

    /// The hosted repositories' share of the upkeep (`runs` counts its
    /// runs): uploads untouched for `hosted.upload_ttl` removed, and a
    /// collection on the schedule, after a delete, or when `regmirror gc`
    /// asked for one.
    pub(super) async fn hosted_upkeep(&self, runs: u32) {
        let Some(h) = &self.hosted else {
            return;
        };
        if runs.is_multiple_of(EXPIRE_UPLOADS_EVERY) {
            let expired = h.uploads.expire(h.config.upload_ttl).await;
            if expired > 0 {
                tracing::info!(uploads = expired, "removed expired uploads");
            }
        }
        let wanted = h.collection_wanted();
        if h.collects() && (wanted || runs.is_multiple_of(COLLECT_EVERY)) {
            let _ = self.collect_hosted().await;
        }
    }

    /// Collects hosted content now (see [`crate::hosted::gc`]), logging what
    /// it removed; `None` without hosted repositories.
    pub async fn collect_hosted(&self) -> Option<std::io::Result<Report>> {
        let h = self.hosted.as_ref()?;
        let result = h.collect().await;
        match &result {
            Ok(r) if r.removed() > 0 => tracing::info!(
                manifests = r.manifests,
                blobs = r.blobs,
                bytes = r.bytes,
                kept = r.kept,
                "collected hosted content nothing references"
            ),
            Ok(r) => tracing::debug!(kept = r.kept, "hosted content: nothing to collect"),
            Err(e) => tracing::warn!(error = %e, "cannot collect hosted content"),
        }
        h.collection_done();
        Some(result)
    }

    /// `POST .../blobs/uploads/`: an open upload, a whole blob, or a mount.
    async fn start_upload(
        &self,
        h: &Hosted,
        name: &RepoName,
        start: &UploadStart,
        body: Option<Body>,
    ) -> Result<Reply, Error> {
        match start {
            UploadStart::Open => {
                let id = h.uploads.create(name).await?;
                upload_reply(StatusCode::ACCEPTED, name, &id, 0)
            }
            UploadStart::Monolithic(digest) => {
                let id = h.uploads.create(name).await?;
                finish(h, name, &id, digest, body).await
            }
            UploadStart::Mount { digest, from } => {
                if let Some(from) = from {
                    if self.mount(h, name, digest, from).await? {
                        return created_blob(name, digest);
                    }
                }
                // Nothing to mount: the client uploads instead.
                let id = h.uploads.create(name).await?;
                upload_reply(StatusCode::ACCEPTED, name, &id, 0)
            }
        }
    }

    /// Links `digest` of `from` into `name` when `from` holds it: a hosted
    /// repository's blob by its link, a mirrored one's from the cache (copied,
    /// so the cache's eviction cannot take it). Whether the client may read
    /// `from` was decided at the front door.
    async fn mount(
        &self,
        h: &Hosted,
        name: &RepoName,
        digest: &Digest,
        from: &RepoName,
    ) -> Result<bool, Error> {
        if h.hosts(from) {
            // A collection never runs between the check and the link.
            let _link = h.commits.read().await;
            let Some(size) = h.blob_size(from, digest).await? else {
                return Ok(false);
            };
            h.link(name, ContentKey::blob(digest), size).await?;
            return Ok(true);
        }
        let Ok(route) = self.route(from, None) else {
            return Ok(false);
        };
        if !self.index.holds(&route.key, digest).await {
            return Ok(false);
        }
        let Some(blob) = self.cached_blob(digest).await? else {
            // A replica's disk holds a share of the cache, the bucket all of it.
            return match &self.cluster {
                Some(c) => h.adopt_from_bucket(name, digest, &c.tiers.bucket).await,
                None => Ok(false),
            };
        };
        h.adopt(name, digest, blob).await?;
        Ok(true)
    }
}

/// The digest a reference names in `name`.
async fn resolve(h: &Hosted, name: &RepoName, reference: &Reference) -> Result<Digest, Error> {
    match reference {
        Reference::Digest(d) => Ok(d.clone()),
        Reference::Tag(t) => h
            .index
            .tag(name, t)
            .await
            .map(|e| e.digest)
            .ok_or_else(|| h.unknown(manifest_unknown(name, reference))),
    }
}

fn manifest_unknown(name: &RepoName, reference: &Reference) -> Error {
    Error::ManifestUnknown(format!("{name}:{reference}"))
}

/// The requests to an upload.
async fn upload(
    h: &Hosted,
    name: &RepoName,
    id: &UploadId,
    op: &UploadOp,
    headers: &HeaderMap,
    body: Option<Body>,
) -> Result<Reply, Error> {
    match op {
        UploadOp::Status => {
            let status = h.uploads.status(id, name).await?;
            upload_reply(StatusCode::NO_CONTENT, name, id, status.received)
        }
        UploadOp::Append => {
            let start = content_range_start(headers)?;
            let committed = h.committed().await;
            let room = |uploads: u64| h.room(committed, uploads);
            let status = h.uploads.append(id, name, start, body, &room).await?;
            upload_reply(StatusCode::ACCEPTED, name, id, status.received)
        }
        UploadOp::Finish(digest) => finish(h, name, id, digest, body).await,
        UploadOp::Cancel => {
            h.uploads.cancel(id, name).await?;
            no_content()
        }
    }
}

/// Completes an upload as `digest`: verified, committed, linked.
async fn finish(
    h: &Hosted,
    name: &RepoName,
    id: &UploadId,
    digest: &Digest,
    body: Option<Body>,
) -> Result<Reply, Error> {
    let committed = h.committed().await;
    let room = |uploads: u64| h.room(committed, uploads);
    let done = h.uploads.complete(id, name, digest, body, &room).await?;
    let key = ContentKey::blob(digest);
    // A collection never runs between the check and the link (hosted::gc).
    let _link = h.commits.read().await;
    let present = h.store.contains(&key).await.map_err(|e| h.storage(e))?;
    if !present {
        h.store
            .commit_blob(done.spool, digest)
            .await
            .map_err(|e| h.storage(e))?;
    }
    h.link(name, key, done.size).await?;
    created_blob(name, digest)
}

/// Where a `PATCH` says its chunk starts (`Content-Range: <start>-<end>`).
fn content_range_start(headers: &HeaderMap) -> Result<Option<u64>, Error> {
    let Some(value) = headers.get(header::CONTENT_RANGE) else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or_default();
    let range = text.strip_prefix("bytes=").unwrap_or(text);
    let start = range
        .split_once('-')
        .and_then(|(s, e)| Some((s.trim().parse::<u64>().ok()?, e.trim().parse::<u64>().ok()?)))
        .filter(|(s, e)| s <= e)
        .map(|(s, _)| s);
    match start {
        Some(s) => Ok(Some(s)),
        None => Err(Error::BlobUploadInvalid(format!(
            "Content-Range {:?} is not <start>-<end>",
            text.chars().take(64).collect::<String>()
        ))),
    }
}

/// `PUT .../manifests/<reference>`: checked, its references present in the
/// repository, stored, linked and tagged.
async fn put_manifest(
    h: &Hosted,
    name: &RepoName,
    reference: &Reference,
    headers: &HeaderMap,
    body: Option<Body>,
) -> Result<Reply, Error> {
    let bytes = read_manifest(body).await?;
    let pushed = check(headers, &bytes)?;
    let digest = match reference {
        Reference::Digest(d) => {
            let actual = crate::hashing::digest_of(d.algorithm(), &bytes);
            if actual != *d {
                return Err(Error::DigestInvalid(format!(
                    "the manifest hashes to {actual}, not {d}"
                )));
            }
            d.clone()
        }
        Reference::Tag(_) => crate::hashing::digest_of(crate::reference::Algorithm::Sha256, &bytes),
    };
    // A collection's mark waits for this commit, and this one for it.
    let _commit = h.commits.read().await;
    for blob in &pushed.blobs {
        if h.blob_size(name, blob).await?.is_none() {
            return Err(h.unknown(Error::ManifestBlobUnknown(format!(
                "{name} holds no blob {blob}; push it (or mount it) first"
            ))));
        }
    }
    for child in &pushed.children {
        if h.manifest(name, child).await?.is_none() {
            return Err(h.unknown(Error::ManifestBlobUnknown(format!(
                "{name} holds no manifest {child}; push it first"
            ))));
        }
    }
    let stored = StoredManifest {
        media_type: pushed.media_type.clone(),
        bytes,
    };
    h.room(h.usage().await, stored.stored_size())?;
    let size = h
        .store
        .put_manifest(&digest, &stored)
        .await
        .map_err(|e| h.storage(e))?;
    let mark = h.write_mark();
    h.index
        .record(
            &ContentKey::manifest(&digest),
            size,
            std::time::SystemTime::now(),
        )
        .await;
    h.index.add_holds(name, vec![digest.clone()]).await;
    if let Reference::Tag(tag) = reference {
        let entry = TagEntry {
            digest: digest.clone(),
            media_type: Some(stored.media_type.clone()),
            size: Some(stored.bytes.len() as u64),
            checked_at: std::time::SystemTime::now(),
        };
        h.index.set_tag(name, tag, entry).await;
    }
    h.persist(mark).await?;
    let mut b = response::builder(StatusCode::CREATED)
        .header(header::LOCATION, format!("/v2/{name}/manifests/{digest}"))
        .header(CONTENT_DIGEST, digest.to_string())
        .header(header::CONTENT_LENGTH, 0);
    if let Some(subject) = &pushed.subject {
        b = b.header(OCI_SUBJECT, subject.to_string());
    }
    build(b, Outcome::None)
}

/// The pushed manifest checked, with the `Content-Type` it came with.
fn check(headers: &HeaderMap, bytes: &[u8]) -> Result<manifest::Pushed, Error> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    manifest::check_pushed(content_type, bytes).map_err(Error::ManifestInvalid)
}

/// A manifest body, bounded.
async fn read_manifest(body: Option<Body>) -> Result<Bytes, Error> {
    use futures_util::StreamExt;
    let Some(body) = body else {
        return Err(Error::ManifestInvalid("no manifest in the request".into()));
    };
    let mut frames = body.into_data_stream();
    let mut bytes = bytes::BytesMut::new();
    while let Some(chunk) = frames.next().await {
        let chunk = chunk
            .map_err(|e| Error::ManifestInvalid(format!("the request body broke off: {e}")))?;
        if bytes.len() + chunk.len() > MAX_MANIFEST {
            return Err(Error::TooLarge(format!(
                "a manifest may be {MAX_MANIFEST} bytes at most"
            )));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes.freeze())
}

/// `DELETE .../manifests/<reference>`: a tag is untagged; a digest is
/// unlinked from the repository with every tag pointing at it. The bytes
/// go when a collection finds nothing else references them (see
/// [`crate::hosted::gc`]).
async fn delete_manifest(
    h: &Hosted,
    name: &RepoName,
    reference: &Reference,
) -> Result<Reply, Error> {
    let mark = h.write_mark();
    match reference {
        Reference::Tag(tag) => {
            if h.index.tag(name, tag).await.is_none() {
                return Err(manifest_unknown(name, reference));
            }
            h.index.remove_tag(name, tag).await;
        }
        Reference::Digest(digest) => {
            if h.manifest(name, digest).await?.is_none() {
                return Err(manifest_unknown(name, reference));
            }
            for (repo, tag, entry) in h.index.tags().await {
                if repo == *name && entry.digest == *digest {
                    h.index.remove_tag(name, &tag).await;
                }
            }
            h.index.drop_hold(name, digest).await;
            h.collect_soon();
        }
    }
    h.persist(mark).await?;
    accepted()
}

fn deletes_allowed(h: &Hosted) -> Result<(), Error> {
    if h.config.delete {
        Ok(())
    } else {
        Err(Error::Unsupported(
            "deletes are turned off for hosted repositories (hosted.delete = false)".into(),
        ))
    }
}

/// `referrers/<digest>` of a hosted repository: the manifests it holds
/// whose subject is `digest`, as an OCI image index.
async fn referrers(
    h: &Hosted,
    name: &RepoName,
    subject: &Digest,
    artifact_type: Option<String>,
    head: bool,
) -> Result<Reply, Error> {
    let mut found = Vec::new();
    for digest in h.index.held(name).await {
        let Some(m) = h
            .store
            .get_manifest(&digest)
            .await
            .map_err(|e| h.storage(e))?
        else {
            continue;
        };
        let Ok(pushed) = manifest::check_pushed(Some(&m.media_type), &m.bytes) else {
            continue;
        };
        if pushed.subject.as_ref() != Some(subject) {
            continue;
        }
        if artifact_type.is_some() && pushed.artifact_type != artifact_type {
            continue;
        }
        let mut d = serde_json::json!({
            "mediaType": m.media_type,
            "digest": digest.to_string(),
            "size": m.bytes.len(),
        });
        if let Some(a) = &pushed.artifact_type {
            d["artifactType"] = a.clone().into();
        }
        if let Some(a) = &pushed.annotations {
            d["annotations"] = a.clone();
        }
        found.push(d);
    }
    found.sort_by_key(|d| d["digest"].to_string());
    let body = serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": found})
        .to_string();
    let mut reply = json_reply(body, None, head, Outcome::Hit)?;
    let headers = reply.response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(OCI_INDEX),
    );
    if artifact_type.is_some() {
        headers.insert(
            "OCI-Filters-Applied",
            http::HeaderValue::from_static("artifactType"),
        );
    }
    Ok(reply)
}

/// 202/204 for an upload: where to send the next request, and how far it got.
fn upload_reply(
    status: StatusCode,
    name: &RepoName,
    id: &UploadId,
    received: u64,
) -> Result<Reply, Error> {
    build(
        response::builder(status)
            .header(header::LOCATION, format!("/v2/{name}/blobs/uploads/{id}"))
            .header(UPLOAD_UUID, id.as_str())
            .header(header::RANGE, response::upload_range(received))
            .header(header::CONTENT_LENGTH, 0),
        Outcome::None,
    )
}

/// 201 for a blob now in the repository.
fn created_blob(name: &RepoName, digest: &Digest) -> Result<Reply, Error> {
    build(
        response::builder(StatusCode::CREATED)
            .header(header::LOCATION, format!("/v2/{name}/blobs/{digest}"))
            .header(CONTENT_DIGEST, digest.to_string())
            .header(header::CONTENT_LENGTH, 0),
        Outcome::None,
    )
}

fn accepted() -> Result<Reply, Error> {
    build(
        response::builder(StatusCode::ACCEPTED).header(header::CONTENT_LENGTH, 0),
        Outcome::None,
    )
}

fn no_content() -> Result<Reply, Error> {
    build(response::builder(StatusCode::NO_CONTENT), Outcome::None)
}

fn build(b: http::response::Builder, outcome: Outcome) -> Result<Reply, Error> {
    let response = b
        .body(response::empty())
        .map_err(|e| Error::internal("building a response", e))?;
    Ok(Reply { response, outcome })
}

#[cfg(test)]
mod tests;
