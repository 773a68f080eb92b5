//! Blob uploads in progress ([`UploadArea`]), and those of one mirror on its
//! own disk ([`DiskUploads`]): one directory per upload under
//! `hosted/uploads/`, holding the bytes received so far (`data`) and the
//! repository it is for (`repo`). The bytes are hashed as they arrive; after
//! a restart (the hash state is not on disk) the file is hashed again when
//! the upload completes. An upload's requests are served one at a time.
//! Mechanism only: what may be uploaded where, and the quota, are the
//! caller's.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::BodyExt;
use tokio::io::AsyncWriteExt;

use crate::cache::store::Spool;
use crate::error::Error;
use crate::hashing::Hasher;
use crate::reference::{Algorithm, Digest, RepoName, UploadId};
use crate::response::Body;

const DATA: &str = "data";
const WRITE_SIZE: usize = 1 << 20;
const REPO: &str = "repo";

/// Checks the quota, given the bytes every upload in progress holds once
/// the chunk about to be written is counted (the area reserves the chunk's
/// bytes first, so uploads racing for the last room cannot both pass).
pub type Room<'a> = &'a (dyn Fn(u64) -> Result<(), Error> + Send + Sync);

/// Where uploads in progress live: one mirror's disk, or (for replicas) the
/// bucket. Each is answered for the repository it was started for only.
#[async_trait::async_trait]
pub trait UploadArea: Send + Sync + 'static {
    /// Bytes held by uploads in progress (this process's view).
    fn bytes(&self) -> u64;
    /// A new, empty upload for `repo`.
    async fn create(&self, repo: &RepoName) -> Result<UploadId, Error>;
    /// How far the upload got.
    async fn status(&self, id: &UploadId, repo: &RepoName) -> Result<Status, Error>;
    /// Appends a request body. `expected` is where the client says the
    /// chunk starts (416 otherwise); `room` refuses bytes past the quota,
    /// and the upload is then removed whole.
    async fn append(
        &self,
        id: &UploadId,
        repo: &RepoName,
        expected: Expected,
        body: Option<Body>,
        room: Room<'_>,
    ) -> Result<Status, Error>;
    /// Appends a last body, then checks the whole upload against `digest`.
    /// The upload is gone afterwards either way: its bytes handed over in a
    /// spool to commit, or removed when they do not match.
    async fn complete(
        &self,
        id: &UploadId,
        repo: &RepoName,
        digest: &Digest,
        body: Option<Body>,
        room: Room<'_>,
    ) -> Result<Completed, Error>;
    /// Abandons an upload.
    async fn cancel(&self, id: &UploadId, repo: &RepoName) -> Result<(), Error>;
    /// Removes uploads nobody touched for `ttl`; returns how many.
    async fn expire(&self, ttl: Duration) -> usize;
}

/// The uploads under one directory.
pub struct DiskUploads {
    dir: PathBuf,
    /// Uploads a request is working on or has worked on since the start;
    /// each entry's lock serialises that upload's requests.
    open: Mutex<HashMap<UploadId, Arc<tokio::sync::Mutex<Progress>>>>,
    /// Bytes held by uploads in progress, for the quota.
    bytes: AtomicU64,
}

/// How far an upload got, and its hash so far when this process saw every
/// byte of it.
#[derive(Default)]
struct Progress {
    received: u64,
    hasher: Option<Hasher>,
    /// Known on disk (read or created by this process).
    known: bool,
}

/// What a client learns of an upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub received: u64,
}

/// An upload's bytes, verified and ready to commit.
pub struct Completed {
    pub spool: Spool,
    pub size: u64,
}

/// Where a chunk must start, when the client says (`Content-Range`).
pub type Expected = Option<u64>;

impl DiskUploads {
    /// Opens (creating) the uploads directory; counts what is there.
    pub fn open(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut bytes = 0;
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if let Ok(meta) = std::fs::metadata(entry.path().join(DATA)) {
                bytes += meta.len();
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            open: Mutex::new(HashMap::new()),
            bytes: AtomicU64::new(bytes),
        })
    }

    fn path(&self, id: &UploadId) -> PathBuf {
        // An UploadId is a parsed UUID: no separator, no `..`.
        self.dir.join(id.as_str())
    }

    fn slot(&self, id: &UploadId) -> Arc<tokio::sync::Mutex<Progress>> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.entry(id.clone()).or_default().clone()
    }

    fn release(&self, id: &UploadId) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.remove(id);
    }

    /// Reads what the disk says of an upload of `repo` into `p`, once.
    async fn load(&self, id: &UploadId, repo: &RepoName, p: &mut Progress) -> Result<(), Error> {
        let dir = self.path(id);
        let unknown = || Error::BlobUploadUnknown(format!("no upload {id} for {repo}"));
        let owner = tokio::fs::read_to_string(dir.join(REPO))
            .await
            .map_err(|_| unknown())?;
        if owner != repo.as_str() {
            return Err(unknown());
        }
        if !p.known {
            let meta = tokio::fs::metadata(dir.join(DATA))
                .await
                .map_err(|_| unknown())?;
            *p = Progress {
                received: meta.len(),
                // Bytes this process did not see: hashed again at the end.
                hasher: None,
                known: true,
            };
        }
        Ok(())
    }

    async fn remove_locked(&self, id: &UploadId, p: &mut Progress) {
        let _ = tokio::fs::remove_dir_all(self.path(id)).await;
        self.bytes
            .fetch_sub(p.received.min(self.bytes()), Ordering::Relaxed);
        *p = Progress::default();
        self.release(id);
    }
}

#[async_trait::async_trait]
impl UploadArea for DiskUploads {
    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    async fn create(&self, repo: &RepoName) -> Result<UploadId, Error> {
        let id = UploadId::new();
        let dir = self.path(&id);
        let repo = repo.as_str().to_owned();
        let made = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || -> io::Result<()> {
                std::fs::create_dir(&dir)?;
                std::fs::write(dir.join(REPO), repo)?;
                std::fs::File::create(dir.join(DATA))?.sync_all()?;
                Ok(())
            })
            .await
        };
        flatten(made).map_err(|e| Error::internal("creating an upload", e))?;
        let slot = self.slot(&id);
        let mut p = slot.lock().await;
        *p = Progress {
            received: 0,
            hasher: Some(Hasher::new(Algorithm::Sha256)),
            known: true,
        };
        Ok(id)
    }

    async fn status(&self, id: &UploadId, repo: &RepoName) -> Result<Status, Error> {
        let slot = self.slot(id);
        let mut p = slot.lock().await;
        self.load(id, repo, &mut p).await?;
        Ok(Status {
            received: p.received,
        })
    }

    async fn append(
        &self,
        id: &UploadId,
        repo: &RepoName,
        expected: Expected,
        body: Option<Body>,
        room: Room<'_>,
    ) -> Result<Status, Error> {
        let slot = self.slot(id);
        let mut p = slot.lock().await;
        self.load(id, repo, &mut p).await?;
        if let Some(start) = expected {
            if start != p.received {
                return Err(Error::UploadRangeInvalid {
                    received: p.received,
                });
            }
        }
        let Some(body) = body else {
            return Ok(Status {
                received: p.received,
            });
        };
        let path = self.path(id).join(DATA);
        let file = tokio::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .await
            .map_err(|e| Error::internal("opening an upload", e))?;
        // Frames are small (16 KiB from hyper): written in writes of 1 MiB.
        let mut file = tokio::io::BufWriter::with_capacity(WRITE_SIZE, file);
        let mut frames = body.into_data_stream();
        let result: Result<(), Error> = async {
            while let Some(chunk) = frames.next().await {
                let chunk: Bytes = chunk.map_err(|e| {
                    Error::BlobUploadInvalid(format!("the request body broke off: {e}"))
                })?;
                let len = chunk.len() as u64;
                let reserved = self.bytes.fetch_add(len, Ordering::Relaxed) + len;
                if let Err(e) = room(reserved) {
                    self.bytes.fetch_sub(len, Ordering::Relaxed);
                    return Err(e);
                }
                if let Err(e) = file.write_all(&chunk).await {
                    self.bytes.fetch_sub(len, Ordering::Relaxed);
                    return Err(Error::internal("writing an upload", e));
                }
                if let Some(h) = &mut p.hasher {
                    h.update(&chunk);
                }
                p.received += len;
            }
            file.flush()
                .await
                .map_err(|e| Error::internal("writing an upload", e))?;
            file.get_ref()
                .sync_data()
                .await
                .map_err(|e| Error::internal("writing an upload", e))
        }
        .await;
        match result {
            Ok(()) => Ok(Status {
                received: p.received,
            }),
            Err(e @ Error::Denied(_)) => {
                drop(file);
                self.remove_locked(id, &mut p).await;
                Err(e)
            }
            Err(e) => {
                // What landed stays (a client resumes from the Range it is
                // told); what this process hashed may not match the file.
                p.hasher = None;
                if let Ok(meta) = tokio::fs::metadata(&path).await {
                    let landed = meta.len();
                    self.bytes.fetch_sub(
                        p.received.saturating_sub(landed).min(self.bytes()),
                        Ordering::Relaxed,
                    );
                    p.received = landed;
                }
                Err(e)
            }
        }
    }

    async fn complete(
        &self,
        id: &UploadId,
        repo: &RepoName,
        digest: &Digest,
        body: Option<Body>,
        room: Room<'_>,
    ) -> Result<Completed, Error> {
        self.append(id, repo, None, body, room).await?;
        let slot = self.slot(id);
        let mut p = slot.lock().await;
        self.load(id, repo, &mut p).await?;
        let path = self.path(id).join(DATA);
        let actual = match p.hasher.take() {
            Some(h) if digest.algorithm() == Algorithm::Sha256 => h.finish(),
            _ => hash_file(&path, digest.algorithm()).await?,
        };
        if actual != *digest {
            self.remove_locked(id, &mut p).await;
            return Err(Error::DigestInvalid(format!(
                "the upload's {} bytes hash to {actual}, not {digest}",
                p.received
            )));
        }
        // The data file moves into the store on commit (a rename), so it
        // leaves the upload's directory, which is removed now.
        let file = std::fs::File::open(&path).map_err(|e| Error::internal("an upload", e))?;
        let size = p.received;
        let spool = Spool::new(file, self.dir.join(format!("{id}.done")));
        std::fs::rename(&path, spool.path()).map_err(|e| Error::internal("an upload", e))?;
        self.remove_locked(id, &mut p).await;
        Ok(Completed { spool, size })
    }

    async fn cancel(&self, id: &UploadId, repo: &RepoName) -> Result<(), Error> {
        let slot = self.slot(id);
        let mut p = slot.lock().await;
        self.load(id, repo, &mut p).await?;
        self.remove_locked(id, &mut p).await;
        Ok(())
    }

    async fn expire(&self, ttl: Duration) -> usize {
        let dir = self.dir.clone();
        let listed = tokio::task::spawn_blocking(move || -> io::Result<Vec<(PathBuf, u64)>> {
            let now = SystemTime::now();
            let mut old = Vec::new();
            for entry in std::fs::read_dir(&dir)? {
                let path = entry?.path();
                let probe = if path.is_dir() {
                    path.join(DATA)
                } else {
                    path.clone()
                };
                let meta = match std::fs::metadata(&probe) {
                    Ok(m) => m,
                    Err(_) => std::fs::metadata(&path)?,
                };
                let age = now
                    .duration_since(meta.modified()?)
                    .unwrap_or(Duration::ZERO);
                if age >= ttl {
                    let bytes = if probe != path { meta.len() } else { 0 };
                    old.push((path, bytes));
                }
            }
            Ok(old)
        })
        .await;
        let old = match flatten(listed) {
            Ok(old) => old,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list uploads");
                return 0;
            }
        };
        let mut removed = 0;
        for (path, bytes) in old {
            let id = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| UploadId::parse(n).ok());
            if let Some(id) = &id {
                // Not while a request works on it.
                let slot = self.slot(id);
                let Ok(mut p) = slot.try_lock() else {
                    continue;
                };
                let _ = tokio::fs::remove_dir_all(&path).await;
                self.bytes
                    .fetch_sub(bytes.min(self.bytes()), Ordering::Relaxed);
                *p = Progress::default();
                drop(p);
                self.release(id);
            } else {
                let _ = tokio::fs::remove_file(&path).await;
            }
            removed += 1;
        }
        removed
    }
}

/// Hashes a file on the blocking pool.
async fn hash_file(path: &Path, algorithm: Algorithm) -> Result<Digest, Error> {
    let path = path.to_path_buf();
    let hashed = tokio::task::spawn_blocking(move || -> io::Result<Digest> {
        use std::io::Read;
        let mut file = std::fs::File::open(&path)?;
        let mut h = Hasher::new(algorithm);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                return Ok(h.finish());
            }
            h.update(&buf[..n]);
        }
    })
    .await;
    flatten(hashed).map_err(|e| Error::internal("hashing an upload", e))
}

fn flatten<T>(r: Result<io::Result<T>, tokio::task::JoinError>) -> io::Result<T> {
    r.map_err(io::Error::other).and_then(|r| r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hashing::digest_of;
    use crate::response;

    fn body(bytes: &'static [u8]) -> Option<Body> {
        Some(response::full(Bytes::from_static(bytes)))
    }

    fn any(_: u64) -> Result<(), Error> {
        Ok(())
    }

    fn repo(s: &str) -> RepoName {
        RepoName::parse(s).unwrap()
    }

    /// A restart loses the hash state but not the bytes: the upload resumes
    /// where the disk says, and its completion hashes the file.
    #[tokio::test]
    async fn an_upload_resumes_after_a_restart_and_is_hashed_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let app = repo("myorg/app");
        let id = {
            let uploads = DiskUploads::open(dir.path()).unwrap();
            let id = uploads.create(&app).await.unwrap();
            let s = uploads
                .append(&id, &app, Some(0), body(b"hello "), &any)
                .await
                .unwrap();
            assert_eq!(s.received, 6);
            id
        };
        let uploads = DiskUploads::open(dir.path()).unwrap();
        assert_eq!(uploads.bytes(), 6);
        assert_eq!(uploads.status(&id, &app).await.unwrap().received, 6);
        // Another repository's request does not see it.
        assert!(matches!(
            uploads.status(&id, &repo("other/app")).await,
            Err(Error::BlobUploadUnknown(_))
        ));
        // A chunk that does not continue it is refused with how far it got.
        assert!(matches!(
            uploads.append(&id, &app, Some(3), body(b"x"), &any).await,
            Err(Error::UploadRangeInvalid { received: 6 })
        ));
        let digest = digest_of(Algorithm::Sha256, b"hello world");
        let done = uploads
            .complete(&id, &app, &digest, body(b"world"), &any)
            .await
            .unwrap();
        assert_eq!(done.size, 11);
        assert_eq!(std::fs::read(done.spool.path()).unwrap(), b"hello world");
        assert_eq!(uploads.bytes(), 0);
        assert!(matches!(
            uploads.status(&id, &app).await,
            Err(Error::BlobUploadUnknown(_))
        ));
    }

    #[tokio::test]
    async fn bytes_that_do_not_match_the_digest_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let uploads = DiskUploads::open(dir.path()).unwrap();
        let app = repo("myorg/app");
        let id = uploads.create(&app).await.unwrap();
        let wrong = digest_of(Algorithm::Sha256, b"something else");
        assert!(matches!(
            uploads
                .complete(&id, &app, &wrong, body(b"abc"), &any)
                .await,
            Err(Error::DigestInvalid(_))
        ));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert_eq!(uploads.bytes(), 0);
    }

    #[tokio::test]
    async fn a_chunk_past_the_quota_removes_the_upload() {
        let dir = tempfile::tempdir().unwrap();
        let uploads = DiskUploads::open(dir.path()).unwrap();
        let app = repo("myorg/app");
        let id = uploads.create(&app).await.unwrap();
        let full = |_: u64| Err(Error::Denied("quota exceeded".into()));
        assert!(matches!(
            uploads.append(&id, &app, None, body(b"abc"), &full).await,
            Err(Error::Denied(_))
        ));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn untouched_uploads_expire() {
        let dir = tempfile::tempdir().unwrap();
        let uploads = DiskUploads::open(dir.path()).unwrap();
        let app = repo("myorg/app");
        let id = uploads.create(&app).await.unwrap();
        uploads
            .append(&id, &app, None, body(b"abc"), &any)
            .await
            .unwrap();
        assert_eq!(uploads.expire(Duration::from_secs(3600)).await, 0);
        assert_eq!(uploads.expire(Duration::ZERO).await, 1);
        assert_eq!(uploads.bytes(), 0);
        assert!(matches!(
            uploads.status(&id, &app).await,
            Err(Error::BlobUploadUnknown(_))
        ));
    }
}
