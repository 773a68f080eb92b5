//! Test images: real Docker v2 / OCI image manifests, configs and image indexes built
//! from layer bytes, with their digests. Pure data; serving them is `fake_upstream`'s job.

use bytes::Bytes;
use serde_json::json;
use sha2::{Digest as _, Sha256};

pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Which manifest flavour an image is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Docker,
    Oci,
}

/// One image as the upstream holds it.
#[derive(Debug, Clone)]
pub struct ImageInfo {
    pub manifest_digest: String,
    pub manifest: Bytes,
    pub media_type: &'static str,
    pub config_digest: String,
    pub config: Bytes,
    pub layer_digests: Vec<String>,
    pub layers: Vec<Bytes>,
}

impl ImageInfo {
    /// Config and layers, each with its digest.
    pub fn blobs(&self) -> Vec<(String, Bytes)> {
        let mut out = vec![(self.config_digest.clone(), self.config.clone())];
        out.extend(
            self.layer_digests
                .iter()
                .cloned()
                .zip(self.layers.iter().cloned()),
        );
        out
    }
}

/// A multi-platform image index and its children.
#[derive(Debug, Clone)]
pub struct IndexInfo {
    pub digest: String,
    pub bytes: Bytes,
    pub media_type: &'static str,
    /// (architecture, image) in index order.
    pub children: Vec<(String, ImageInfo)>,
}

impl IndexInfo {
    pub fn child(&self, arch: &str) -> &ImageInfo {
        &self
            .children
            .iter()
            .find(|(a, _)| a == arch)
            .unwrap_or_else(|| panic!("no {arch} child in the index"))
            .1
    }
}

/// Builds an image manifest (and its config) over `layers` for `arch`.
pub fn build_image(layers: Vec<Vec<u8>>, format: Format, arch: &str) -> ImageInfo {
    let (manifest_type, config_type, layer_type) = match format {
        Format::Docker => (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER),
        Format::Oci => (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER),
    };
    let layers: Vec<Bytes> = layers.into_iter().map(Bytes::from).collect();
    let layer_digests: Vec<String> = layers.iter().map(|l| sha256_digest(l)).collect();
    let config = json!({
        "architecture": arch,
        "os": "linux",
        "config": {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": layer_digests},
    });
    let config = Bytes::from(serde_json::to_vec(&config).unwrap_or_default());
    let config_digest = sha256_digest(&config);
    let layer_descs: Vec<_> = layers
        .iter()
        .zip(&layer_digests)
        .map(|(l, d)| json!({"mediaType": layer_type, "size": l.len(), "digest": d}))
        .collect();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": {"mediaType": config_type, "size": config.len(), "digest": config_digest},
        "layers": layer_descs,
    });
    // Pretty-printed like Docker Hub's: the bytes, not the JSON value, are what is digested.
    let manifest = Bytes::from(serde_json::to_vec_pretty(&manifest).unwrap_or_default());
    ImageInfo {
        manifest_digest: sha256_digest(&manifest),
        manifest,
        media_type: manifest_type,
        config_digest,
        config,
        layer_digests,
        layers,
    }
}

/// Builds an OCI image index over `children` (architecture, image).
pub fn build_index(children: Vec<(String, ImageInfo)>) -> IndexInfo {
    let descs: Vec<_> = children
        .iter()
        .map(|(arch, img)| {
            json!({
                "mediaType": img.media_type,
                "size": img.manifest.len(),
                "digest": img.manifest_digest,
                "platform": {"architecture": arch, "os": "linux"},
            })
        })
        .collect();
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descs});
    let bytes = Bytes::from(serde_json::to_vec_pretty(&index).unwrap_or_default());
    IndexInfo {
        digest: sha256_digest(&bytes),
        bytes,
        media_type: OCI_INDEX,
        children,
    }
}
