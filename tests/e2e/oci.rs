//! An OCI image layout written from scratch: gzipped tar layers, image configs, manifests
//! (OCI or Docker schema 2 media types) and image indexes, tagged in `index.json` so that
//! `skopeo copy oci:DIR:TAG` can push them. It does not talk to any registry.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use flate2::write::GzEncoder;
use flate2::Compression;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// Fixed so that the same inputs always give the same digests.
const MTIME: u64 = 1_700_000_000;

/// A blob as a descriptor names it.
#[derive(Clone, Debug)]
pub struct Blob {
    pub digest: String,
    pub size: u64,
}

/// A layer: its compressed blob and the digest of its uncompressed tar.
#[derive(Clone, Debug)]
pub struct Layer {
    pub blob: Blob,
    pub diff_id: String,
}

/// What goes into a layer.
pub enum Content {
    Text(String),
    /// `len` pseudo-random bytes from `seed`: incompressible, and cheap to make.
    Random {
        len: u64,
        seed: u64,
    },
}

/// Which family of media types a manifest uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    Oci,
    Docker,
}

/// A manifest written to the layout.
#[derive(Clone, Debug)]
pub struct Manifest {
    pub blob: Blob,
    pub media_type: &'static str,
    pub config: Blob,
    pub layers: Vec<Blob>,
}

pub struct Layout {
    dir: PathBuf,
    tags: Vec<Value>,
}

impl Layout {
    pub fn create(dir: &Path) -> Layout {
        std::fs::create_dir_all(dir.join("blobs/sha256")).expect("create layout");
        Layout {
            dir: dir.to_owned(),
            tags: Vec::new(),
        }
    }

    fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        self.dir.join("blobs/sha256").join(hex)
    }

    pub fn add_blob(&self, bytes: &[u8]) -> Blob {
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
        std::fs::write(self.blob_path(&digest), bytes).expect("write blob");
        Blob {
            digest,
            size: bytes.len() as u64,
        }
    }

    /// Writes a gzipped tar holding `files` (paths relative to the root, parents created),
    /// streaming it through both digests. Layers with random data are stored at gzip level 0:
    /// compressing them would only burn time.
    pub fn add_layer(&self, files: &[(&str, Content)]) -> Layer {
        let tmp = self
            .dir
            .join(format!("layer-{:016x}.tmp", rand::random::<u64>()));
        let file = BufWriter::with_capacity(1 << 20, File::create(&tmp).expect("create layer"));
        let level = if files
            .iter()
            .any(|(_, c)| matches!(c, Content::Random { .. }))
        {
            Compression::none()
        } else {
            Compression::default()
        };
        let gz = GzEncoder::new(Hashing::new(file), level);
        let mut tar = tar::Builder::new(Hashing::new(gz));
        let mut dirs: Vec<String> = Vec::new();
        for (path, content) in files {
            let mut parent = String::new();
            for part in path
                .split('/')
                .collect::<Vec<_>>()
                .split_last()
                .expect("path")
                .1
            {
                parent = format!("{parent}{part}/");
                if !dirs.contains(&parent) {
                    dirs.push(parent.clone());
                    let mut h = header(tar::EntryType::Directory, 0o755, 0);
                    tar.append_data(&mut h, &parent, io::empty())
                        .expect("tar dir");
                }
            }
            let mut h;
            match content {
                Content::Text(text) => {
                    h = header(tar::EntryType::Regular, 0o644, text.len() as u64);
                    tar.append_data(&mut h, path, text.as_bytes())
                }
                Content::Random { len, seed } => {
                    h = header(tar::EntryType::Regular, 0o644, *len);
                    tar.append_data(&mut h, path, Random::new(*seed).take(*len))
                }
            }
            .expect("tar file");
        }
        let uncompressed = tar.into_inner().expect("finish tar");
        let diff_id = uncompressed.digest();
        let gz = uncompressed.inner;
        let compressed = gz.finish().expect("finish gzip");
        let blob = Blob {
            digest: compressed.digest(),
            size: compressed.len,
        };
        let mut file = compressed.inner;
        file.flush().expect("flush layer");
        drop(file);
        std::fs::rename(&tmp, self.blob_path(&blob.digest)).expect("place layer");
        Layer { blob, diff_id }
    }

    /// Writes an image config and its manifest for `os`/`arch` over `layers`.
    pub fn add_image(&self, flavor: Flavor, os: &str, arch: &str, layers: &[Layer]) -> Manifest {
        let (manifest_type, config_type, layer_type) = match flavor {
            Flavor::Oci => (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER),
            Flavor::Docker => (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER),
        };
        let history: Vec<Value> = (0..layers.len())
            .map(|i| json!({"created": "2023-11-14T22:13:20Z", "created_by": format!("regmirror e2e layer {i}")}))
            .collect();
        let config = json!({
            "architecture": arch,
            "os": os,
            "created": "2023-11-14T22:13:20Z",
            "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
            "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()},
            "history": history,
        });
        let config = self.add_blob(&serde_json::to_vec(&config).expect("config json"));
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": {"mediaType": config_type, "digest": config.digest, "size": config.size},
            "layers": layers.iter().map(|l| json!({
                "mediaType": layer_type, "digest": l.blob.digest, "size": l.blob.size,
            })).collect::<Vec<_>>(),
        });
        let blob = self.add_blob(&serde_json::to_vec_pretty(&manifest).expect("manifest json"));
        Manifest {
            blob,
            media_type: manifest_type,
            config,
            layers: layers.iter().map(|l| l.blob.clone()).collect(),
        }
    }

    /// Writes an OCI image index over `(manifest, os, arch)` entries.
    pub fn add_index(&self, entries: &[(&Manifest, &str, &str)]) -> Blob {
        let index = json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": entries.iter().map(|(m, os, arch)| json!({
                "mediaType": m.media_type, "digest": m.blob.digest, "size": m.blob.size,
                "platform": {"architecture": arch, "os": os},
            })).collect::<Vec<_>>(),
        });
        self.add_blob(&serde_json::to_vec_pretty(&index).expect("index json"))
    }

    /// Names `blob` (of `media_type`) `tag` in `index.json`.
    pub fn tag(&mut self, tag: &str, media_type: &str, blob: &Blob) {
        self.tags.push(json!({
            "mediaType": media_type, "digest": blob.digest, "size": blob.size,
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }));
    }

    /// Writes `manifest` and its blobs as skopeo's `dir:` transport lays them out: the way to
    /// push Docker media types, which skopeo's `oci:` transport does not read.
    pub fn export_dir(&self, manifest: &Manifest, out: &Path) {
        std::fs::create_dir_all(out).expect("create dir: export");
        std::fs::write(out.join("version"), "Directory Transport Version: 1.1\n")
            .expect("write version");
        std::fs::copy(
            self.blob_path(&manifest.blob.digest),
            out.join("manifest.json"),
        )
        .expect("copy manifest");
        for blob in std::iter::once(&manifest.config).chain(&manifest.layers) {
            let hex = blob.digest.trim_start_matches("sha256:");
            std::fs::copy(self.blob_path(&blob.digest), out.join(hex)).expect("copy blob");
        }
    }

    /// Writes `oci-layout` and `index.json`.
    pub fn finish(&self) {
        std::fs::write(
            self.dir.join("oci-layout"),
            r#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .expect("write oci-layout");
        let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": self.tags});
        std::fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec_pretty(&index).expect("index"),
        )
        .expect("write index.json");
    }
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(MTIME);
    h.set_uid(0);
    h.set_gid(0);
    h
}

/// A writer that hashes and counts what passes through it.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W> Hashing<W> {
    fn new(inner: W) -> Self {
        Hashing {
            inner,
            hasher: Sha256::new(),
            len: 0,
        }
    }

    fn digest(&self) -> String {
        format!("sha256:{}", hex::encode(self.hasher.clone().finalize()))
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// xorshift64* bytes: deterministic, fast even in a debug build, and incompressible enough.
struct Random(u64);

impl Random {
    fn new(seed: u64) -> Self {
        Random(seed | 1)
    }
}

impl Read for Random {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        Ok(buf.len())
    }
}
