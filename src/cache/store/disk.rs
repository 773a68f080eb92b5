//! [`BlobStore`] on a local filesystem.
//!
//! Layout under the data dir: `blobs/<alg>/<hex[..2]>/<hex>`,
//! `manifests/<alg>/<hex[..2]>/<hex>` (first line the media type, then the
//! bytes), `tmp/` for downloads in progress. Paths come only from parsed
//! digests. Everything is written to `tmp/`, fsynced, renamed into place and
//! the directory fsynced, so a crash never leaves a half-written committed file.
//! Directories are created 0700 and files 0600 whatever the umask.

use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;

use super::{BlobFile, BlobStore, ContentKey, Found, Kind, Spool, StoredManifest};
use crate::cache::policy::FsSpace;
use crate::hashing::digest_of;
use crate::reference::{Algorithm, Digest};

/// The cache holds what was pulled with the mirror's upstream credentials
/// (private images among them) and its index names them: it is the mirror's
/// alone, not every local user's, whatever umask the service started with.
const DIR_MODE: u32 = 0o700;
const FILE_MODE: u32 = 0o600;

/// Creates `dir` and its missing ancestors with the private mode.
fn private_dirs(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
}

/// Options that create a file with the private mode (an existing file keeps
/// its own).
pub(super) fn private_file() -> std::fs::OpenOptions {
    let mut options = std::fs::OpenOptions::new();
    options.mode(FILE_MODE);
    options
}

#[derive(Debug, Clone)]
pub struct DiskStore {
    root: PathBuf,
}

impl DiskStore {
    /// Opens (creating) the store under `root`.
    pub fn open(root: &Path) -> io::Result<Self> {
        for dir in ["blobs", "manifests", "tmp"] {
            private_dirs(&root.join(dir))?;
        }
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Takes the data dir's lock, held by a serving mirror for its lifetime.
    /// `None` when another process holds it.
    pub fn try_lock(&self) -> io::Result<Option<std::fs::File>> {
        let file = private_file()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.root.join("lock"))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(file)),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    }

    fn path(&self, kind: Kind, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.root
            .join(area(kind))
            .join(digest.algorithm().as_str())
            .join(&hex[..2])
            .join(hex)
    }

    fn temp_path(&self) -> PathBuf {
        let name: u128 = rand::random();
        self.root.join("tmp").join(format!("{name:032x}.part"))
    }
}

fn area(kind: Kind) -> &'static str {
    match kind {
        Kind::Blob => "blobs",
        Kind::Manifest => "manifests",
    }
}

/// Every item under `area/<alg>/<xx>/<hex>` whose name is a valid digest.
fn scan_area(root: &Path, kind: Kind) -> io::Result<Vec<Found>> {
    let mut out = Vec::new();
    for alg in [Algorithm::Sha256, Algorithm::Sha512] {
        let dir = root.join(area(kind)).join(alg.as_str());
        let shards = match std::fs::read_dir(&dir) {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for shard in shards {
            let shard = shard?;
            if !shard.file_type()?.is_dir() {
                continue;
            }
            for file in std::fs::read_dir(shard.path())? {
                let file = file?;
                let meta = file.metadata()?;
                let name = file.file_name();
                let Some(digest) = name
                    .to_str()
                    .and_then(|hex| Digest::parse(&format!("{}:{hex}", alg.as_str())).ok())
                else {
                    continue;
                };
                if !meta.is_file() {
                    continue;
                }
                out.push(Found {
                    key: ContentKey { kind, digest },
                    size: meta.len(),
                    modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                });
            }
        }
    }
    Ok(out)
}

/// A spool written, fsynced and closed: a file in `tmp/` and no descriptor,
/// so an import can stage any number of them. Removed when dropped unless
/// committed with [`DiskStore::commit_parked`].
#[derive(Debug)]
pub struct Parked {
    path: PathBuf,
    committed: bool,
}

impl Parked {
    /// Its bytes.
    pub fn read(&self) -> io::Result<Vec<u8>> {
        std::fs::read(&self.path)
    }

    fn disarm(&mut self) {
        self.committed = true;
    }
}

impl Drop for Parked {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl DiskStore {
    /// Fsyncs and closes `spool`, keeping its file (the caller holds no
    /// other handle to it).
    pub async fn park(&self, mut spool: Spool) -> io::Result<Parked> {
        blocking(move || {
            spool.file.sync_all()?;
            spool.disarm();
            Ok(Parked {
                path: spool.path().to_owned(),
                committed: false,
            })
        })
        .await
    }

    /// Installs a parked spool, whose bytes the caller has verified, as blob
    /// `digest`.
    pub async fn commit_parked(&self, mut parked: Parked, digest: &Digest) -> io::Result<()> {
        let dest = self.path(Kind::Blob, digest);
        blocking(move || {
            install(&parked.path, &dest)?;
            parked.disarm();
            Ok(())
        })
        .await
    }
}

/// Renames a fully written, fsynced temp file into place and fsyncs the directory.
fn install(temp: &Path, dest: &Path) -> io::Result<()> {
    let parent = dest
        .parent()
        .ok_or_else(|| io::Error::other("destination has no parent"))?;
    create_dirs_durably(parent)?;
    std::fs::rename(temp, dest)?;
    sync_dir(parent)
}

/// Creates `dir` and its missing ancestors, fsyncing the parent of each:
/// the fsync after a rename makes the file's entry durable, not the entry
/// of a directory created for it (a new `<alg>` or shard directory).
fn create_dirs_durably(dir: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut level = dir;
    while !level.is_dir() {
        missing.push(level);
        level = level
            .parent()
            .ok_or_else(|| io::Error::other(format!("no directory above {}", dir.display())))?;
    }
    for level in missing.into_iter().rev() {
        match std::fs::DirBuilder::new().mode(DIR_MODE).create(level) {
            Ok(()) => {}
            // Created meanwhile by another commit, which may not have
            // fsynced its parent yet: this one does it too.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && level.is_dir() => {}
            Err(e) => return Err(e),
        }
        if let Some(parent) = level.parent() {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io::Error::other(format!("blocking task failed: {e}")))?
}

#[async_trait]
impl BlobStore for DiskStore {
    async fn open_blob(&self, digest: &Digest) -> io::Result<Option<BlobFile>> {
        let path = self.path(Kind::Blob, digest);
        blocking(move || match std::fs::File::open(&path) {
            Ok(file) => {
                let size = file.metadata()?.len();
                Ok(Some(BlobFile {
                    file: Arc::new(file),
                    size,
                }))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        })
        .await
    }

    async fn spool(&self) -> io::Result<Spool> {
        let path = self.temp_path();
        blocking(move || {
            let file = private_file()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)?;
            Ok(Spool::new(file, path))
        })
        .await
    }

    async fn commit_blob(&self, mut spool: Spool, digest: &Digest) -> io::Result<()> {
        let dest = self.path(Kind::Blob, digest);
        blocking(move || {
            spool.file.sync_all()?;
            install(spool.path(), &dest)?;
            spool.disarm();
            Ok(())
        })
        .await
    }

    async fn get_manifest(&self, digest: &Digest) -> io::Result<Option<StoredManifest>> {
        let path = self.path(Kind::Manifest, digest);
        let raw = match tokio::fs::read(&path).await {
            Ok(raw) => raw,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let parsed = raw.iter().position(|&b| b == b'\n').and_then(|nl| {
            let media_type = std::str::from_utf8(&raw[..nl]).ok()?.to_owned();
            let bytes = Bytes::copy_from_slice(&raw[nl + 1..]);
            (digest_of(digest.algorithm(), &bytes) == *digest)
                .then_some(StoredManifest { media_type, bytes })
        });
        if parsed.is_none() {
            // Damaged on disk: forget it so it is fetched again, never served.
            tracing::warn!(%digest, "cached manifest is damaged; removing it");
            let _ = tokio::fs::remove_file(&path).await;
        }
        Ok(parsed)
    }

    async fn put_manifest(&self, digest: &Digest, manifest: &StoredManifest) -> io::Result<u64> {
        if manifest.media_type.contains('\n') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "media type contains a newline",
            ));
        }
        let dest = self.path(Kind::Manifest, digest);
        let temp = self.temp_path();
        let manifest = manifest.clone();
        blocking(move || {
            let result = (|| {
                let mut f = private_file().write(true).create_new(true).open(&temp)?;
                f.write_all(manifest.media_type.as_bytes())?;
                f.write_all(b"\n")?;
                f.write_all(&manifest.bytes)?;
                f.sync_all()?;
                install(&temp, &dest)?;
                Ok(manifest.stored_size())
            })();
            if result.is_err() {
                let _ = std::fs::remove_file(&temp);
            }
            result
        })
        .await
    }

    async fn contains(&self, key: &ContentKey) -> io::Result<bool> {
        match tokio::fs::metadata(self.path(key.kind, &key.digest)).await {
            Ok(meta) => Ok(meta.is_file()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn remove(&self, key: &ContentKey) -> io::Result<()> {
        match tokio::fs::remove_file(self.path(key.kind, &key.digest)).await {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    async fn scan(&self) -> io::Result<Vec<Found>> {
        let root = self.root.clone();
        blocking(move || {
            let mut found = scan_area(&root, Kind::Blob)?;
            found.extend(scan_area(&root, Kind::Manifest)?);
            Ok(found)
        })
        .await
    }

    async fn temp_bytes(&self) -> io::Result<u64> {
        let dir = self.root.join("tmp");
        blocking(move || {
            let mut total = 0;
            for entry in std::fs::read_dir(dir)? {
                // A file may vanish while listed: it was just committed or removed.
                if let Ok(meta) = entry?.metadata() {
                    total += meta.len();
                }
            }
            Ok(total)
        })
        .await
    }

    async fn clean_temp(&self, older_than: Option<Duration>) -> io::Result<usize> {
        let dir = self.root.join("tmp");
        blocking(move || {
            let now = SystemTime::now();
            let mut removed = 0;
            for entry in std::fs::read_dir(dir)? {
                let entry = entry?;
                let Ok(meta) = entry.metadata() else { continue };
                let stale = match older_than {
                    None => true,
                    Some(age) => meta
                        .modified()
                        .ok()
                        .and_then(|m| now.duration_since(m).ok())
                        .is_some_and(|d| d >= age),
                };
                if meta.is_file() && stale && std::fs::remove_file(entry.path()).is_ok() {
                    removed += 1;
                }
            }
            Ok(removed)
        })
        .await
    }

    async fn fs_space(&self) -> io::Result<Option<FsSpace>> {
        let root = self.root.clone();
        blocking(move || {
            let st = rustix::fs::statvfs(&root)?;
            Ok(Some(FsSpace {
                size: st.f_blocks.saturating_mul(st.f_frsize),
                free: st.f_bavail.saturating_mul(st.f_frsize),
            }))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::reference::Algorithm;

    #[tokio::test]
    async fn spool_commit_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path()).unwrap();
        let data = b"hello blob";
        let digest = digest_of(Algorithm::Sha256, data);
        assert!(store.open_blob(&digest).await.unwrap().is_none());
        let spool = store.spool().await.unwrap();
        spool.file.write_all_at(data, 0).unwrap();
        store.commit_blob(spool, &digest).await.unwrap();
        let blob = store.open_blob(&digest).await.unwrap().unwrap();
        assert_eq!(blob.size, data.len() as u64);
        let mut buf = vec![0; data.len()];
        blob.file.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf, data);
        let expected = dir
            .path()
            .join("blobs/sha256")
            .join(&digest.hex()[..2])
            .join(digest.hex());
        assert!(expected.is_file());
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
        let found = store.scan().await.unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].key, ContentKey::blob(&digest));
        assert_eq!(found[0].size, data.len() as u64);
        store.remove(&ContentKey::blob(&digest)).await.unwrap();
        store.remove(&ContentKey::blob(&digest)).await.unwrap();
        assert!(store.open_blob(&digest).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn dropped_spool_leaves_nothing_and_restart_cleans_tmp() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path()).unwrap();
        drop(store.spool().await.unwrap());
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
        std::fs::write(dir.path().join("tmp/leftover.part"), b"x").unwrap();
        assert_eq!(store.temp_bytes().await.unwrap(), 1);
        let store = DiskStore::open(dir.path()).unwrap();
        let hour = Some(Duration::from_secs(3600));
        assert_eq!(store.clean_temp(hour).await.unwrap(), 0);
        assert_eq!(store.clean_temp(None).await.unwrap(), 1);
        assert_eq!(store.temp_bytes().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn parked_spools_hold_no_descriptor_and_commit_or_vanish() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path()).unwrap();
        let tmp_files = || std::fs::read_dir(dir.path().join("tmp")).unwrap().count();
        let data = b"parked bytes".to_vec();
        let digest = digest_of(Algorithm::Sha256, &data);

        let spool = store.spool().await.unwrap();
        spool.file.write_all_at(&data, 0).unwrap();
        let weak = Arc::downgrade(&spool.file);
        let parked = store.park(spool).await.unwrap();
        assert!(
            weak.upgrade().is_none(),
            "a parked spool keeps its file open"
        );
        assert_eq!(parked.read().unwrap(), data);
        store.commit_parked(parked, &digest).await.unwrap();
        let blob = store.open_blob(&digest).await.unwrap().expect("committed");
        assert_eq!(blob.size, data.len() as u64);
        assert_eq!(tmp_files(), 0);

        let spool = store.spool().await.unwrap();
        spool.file.write_all_at(&data, 0).unwrap();
        drop(store.park(spool).await.unwrap());
        assert_eq!(tmp_files(), 0, "a dropped parked spool stays in tmp/");
    }

    #[test]
    fn install_creates_the_missing_directories() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path()).unwrap();
        let put = |name: &str, dest: &Path| {
            let temp = dir.path().join("tmp").join(name);
            std::fs::write(&temp, name).unwrap();
            install(&temp, dest).unwrap();
            assert_eq!(std::fs::read(dest).unwrap(), name.as_bytes());
            assert!(!temp.exists());
        };
        // Neither `blobs/sha256` nor its shard exists yet.
        let first = digest_of(Algorithm::Sha256, b"first");
        assert!(!dir.path().join("blobs/sha256").exists());
        put("first", &store.path(Kind::Blob, &first));
        // The `<alg>` directory exists; a new shard beside it.
        let other = (0..)
            .map(|i: u32| digest_of(Algorithm::Sha256, &i.to_le_bytes()))
            .find(|d| d.hex()[..2] != first.hex()[..2])
            .unwrap();
        put("other", &store.path(Kind::Blob, &other));
        // Everything exists.
        let again = store.path(Kind::Blob, &first);
        put("again", &again);
        // A file where a directory goes is an error, not an overwrite.
        let blocked = dir.path().join("blobs/sha512");
        std::fs::write(&blocked, b"in the way").unwrap();
        let temp = dir.path().join("tmp/blocked");
        std::fs::write(&temp, b"x").unwrap();
        assert!(install(&temp, &blocked.join("ab/abcd")).is_err());
        assert_eq!(std::fs::read(&blocked).unwrap(), b"in the way");
    }

    #[tokio::test]
    async fn damaged_manifest_is_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path()).unwrap();
        let bytes = Bytes::from_static(b"{\"schemaVersion\":2}");
        let digest = digest_of(Algorithm::Sha256, &bytes);
        let m = StoredManifest {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            bytes,
        };
        let key = ContentKey::manifest(&digest);
        assert!(!store.contains(&key).await.unwrap());
        store.put_manifest(&digest, &m).await.unwrap();
        assert!(store.contains(&key).await.unwrap());
        assert!(!store.contains(&ContentKey::blob(&digest)).await.unwrap());
        assert_eq!(store.get_manifest(&digest).await.unwrap(), Some(m));
        let path = store.path(Kind::Manifest, &digest);
        std::fs::write(&path, b"application/json\n{\"tampered\":1}").unwrap();
        assert_eq!(store.get_manifest(&digest).await.unwrap(), None);
        assert!(!path.exists());
    }
}
