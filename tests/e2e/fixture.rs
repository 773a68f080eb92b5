//! The test images, built once: generated as an OCI layout, pushed with skopeo into a
//! docker-registry storage directory, checked, and kept under `CARGO_TARGET_TMPDIR` keyed by
//! a hash of the code that makes them. Each test then serves that storage read-only from its
//! own upstream, so upstream counters start at zero in every test.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::issuer::{Issuer, KeyPair};
use crate::oci::{Content, Flavor, Layer, Layout, Manifest, OCI_INDEX};
use crate::skopeo::Skopeo;
use crate::upstream::Upstream;

/// Size of the one layer of `library/big:1`.
pub const BIG_LAYER_BYTES: u64 = 100 * 1024 * 1024;

/// One platform's image: its manifest and the blobs it names.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Platform {
    pub os: String,
    pub arch: String,
    pub digest: String,
    pub config: String,
    pub layers: Vec<String>,
}

impl Platform {
    /// The config and layer digests.
    pub fn blobs(&self) -> Vec<String> {
        let mut blobs = vec![self.config.clone()];
        blobs.extend(self.layers.iter().cloned());
        blobs
    }
}

/// An image in the upstream: `name:tag` resolves to `digest` (an index when multi-arch).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Image {
    pub name: String,
    pub tag: String,
    pub digest: String,
    pub media_type: String,
    pub platforms: Vec<Platform>,
}

impl Image {
    /// How users name it: `docker.io/library/small:1`.
    pub fn docker_io(&self) -> String {
        format!("docker.io/{}:{}", self.name, self.tag)
    }

    pub fn platform(&self, arch: &str) -> &Platform {
        self.platforms
            .iter()
            .find(|p| p.arch == arch)
            .unwrap_or_else(|| panic!("{} has no {arch} image", self.name))
    }

    /// Whether the tag names a multi-platform index.
    pub fn is_index(&self) -> bool {
        self.media_type == OCI_INDEX
    }

    /// Every blob of every platform.
    pub fn blobs(&self) -> Vec<String> {
        let mut blobs: Vec<String> = self.platforms.iter().flat_map(Platform::blobs).collect();
        blobs.sort();
        blobs.dedup();
        blobs
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Fixture {
    /// The docker-registry storage root holding every image.
    #[serde(skip)]
    pub storage: PathBuf,
    pub images: Vec<Image>,
}

impl Fixture {
    /// `small`, `multi`, `many` or `big`.
    pub fn image(&self, short: &str) -> &Image {
        let name = format!("library/{short}");
        self.images
            .iter()
            .find(|i| i.name == name)
            .unwrap_or_else(|| panic!("no fixture image {name}"))
    }
}

/// The fixture, built on first use by whichever test asks first.
pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        // Building needs a runtime of its own: the caller's may be single-threaded and busy.
        std::thread::spawn(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("fixture runtime")
                .block_on(load_or_build())
        })
        .join()
        .unwrap_or_else(|_| panic!("building the e2e fixture images failed (see above)"))
    })
}

async fn load_or_build() -> Fixture {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let key = {
        let mut h = Sha256::new();
        h.update(include_str!("fixture.rs"));
        h.update(include_str!("oci.rs"));
        hex::encode(h.finalize())[..16].to_owned()
    };
    let done = base.join(format!("e2e-fixture-{key}"));
    if let Some(fixture) = load(&done) {
        return fixture;
    }
    remove_stale(&base, &done);
    let started = std::time::Instant::now();
    let build = base.join(format!("e2e-fixture-build-{:016x}", rand::random::<u64>()));
    let images = build_into(&build).await;
    let _ = std::fs::remove_dir_all(build.join("layout"));
    let _ = std::fs::remove_dir_all(build.join("layout-small"));
    std::fs::write(
        build.join("fixture.json"),
        serde_json::to_vec_pretty(&Fixture {
            storage: PathBuf::new(),
            images,
        })
        .expect("fixture json"),
    )
    .expect("write fixture.json");
    // Another test process may have finished first: then use its copy and drop ours.
    if std::fs::rename(&build, &done).is_err() {
        let _ = std::fs::remove_dir_all(&build);
    }
    eprintln!(
        "[e2e] built the fixture images in {:.1}s into {}",
        started.elapsed().as_secs_f64(),
        done.display()
    );
    load(&done).expect("load the fixture just built")
}

fn load(dir: &Path) -> Option<Fixture> {
    let bytes = std::fs::read(dir.join("fixture.json")).ok()?;
    let mut fixture: Fixture = serde_json::from_slice(&bytes).ok()?;
    fixture.storage = dir.join("storage");
    Some(fixture)
}

/// Removes fixtures of older versions of this code, and builds abandoned over an hour ago.
fn remove_stale(base: &Path, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > Duration::from_secs(3600));
        let stale = (name.starts_with("e2e-fixture-build-") && old)
            || (name.starts_with("e2e-fixture-") && !name.contains("build") && path != keep);
        if stale {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

/// Text files for layer `i` of `image`: a couple of small regular files per layer.
fn text_layer(layout: &Layout, image: &str, i: usize) -> Layer {
    layout.add_layer(&[
        (
            &format!("regmirror-e2e/{image}/layer-{i}.txt"),
            Content::Text(format!("{image} layer {i}\n")),
        ),
        (
            &format!("etc/regmirror-e2e/{image}-{i}"),
            Content::Text(format!("made by the regmirror e2e fixture: {image} #{i}\n")),
        ),
    ])
}

fn platform(m: &Manifest, os: &str, arch: &str) -> Platform {
    Platform {
        os: os.into(),
        arch: arch.into(),
        digest: m.blob.digest.clone(),
        config: m.config.digest.clone(),
        layers: m.layers.iter().map(|l| l.digest.clone()).collect(),
    }
}

fn image(
    tag_in_layout: &str,
    name: &str,
    digest: &str,
    media_type: &str,
    p: Vec<Platform>,
) -> (String, Image) {
    (
        tag_in_layout.to_owned(),
        Image {
            name: format!("library/{name}"),
            tag: "1".into(),
            digest: digest.to_owned(),
            media_type: media_type.to_owned(),
            platforms: p,
        },
    )
}

/// Generates the images into `dir/layout`, pushes them into `dir/storage`, checks the
/// upstream's digests, and returns what was pushed.
async fn build_into(dir: &Path) -> Vec<Image> {
    let layout_dir = dir.join("layout");
    let mut layout = Layout::create(&layout_dir);
    let mut images = Vec::new();
    let oci = |tag: &str| format!("oci:{}:{tag}", layout_dir.display());

    let small = [
        text_layer(&layout, "small", 0),
        text_layer(&layout, "small", 1),
    ];
    let m = layout.add_image(Flavor::Docker, "linux", "amd64", &small);
    let small_dir = dir.join("layout-small");
    layout.export_dir(&m, &small_dir);
    images.push(image(
        &format!("dir:{}", small_dir.display()),
        "small",
        &m.blob.digest,
        m.media_type,
        vec![platform(&m, "linux", "amd64")],
    ));

    let amd = [
        text_layer(&layout, "multi-amd64", 0),
        text_layer(&layout, "multi-amd64", 1),
    ];
    let arm = [
        text_layer(&layout, "multi-arm64", 0),
        text_layer(&layout, "multi-arm64", 1),
    ];
    let m_amd = layout.add_image(Flavor::Oci, "linux", "amd64", &amd);
    let m_arm = layout.add_image(Flavor::Oci, "linux", "arm64", &arm);
    let index = layout.add_index(&[(&m_amd, "linux", "amd64"), (&m_arm, "linux", "arm64")]);
    layout.tag("multi", OCI_INDEX, &index);
    images.push(image(
        &oci("multi"),
        "multi",
        &index.digest,
        OCI_INDEX,
        vec![
            platform(&m_amd, "linux", "amd64"),
            platform(&m_arm, "linux", "arm64"),
        ],
    ));

    let many: Vec<Layer> = (0..25).map(|i| text_layer(&layout, "many", i)).collect();
    let m = layout.add_image(Flavor::Oci, "linux", "amd64", &many);
    layout.tag("many", m.media_type, &m.blob);
    images.push(image(
        &oci("many"),
        "many",
        &m.blob.digest,
        m.media_type,
        vec![platform(&m, "linux", "amd64")],
    ));

    let big = layout.add_layer(&[
        (
            "regmirror-e2e/big/README",
            Content::Text("100 MiB of noise follows\n".into()),
        ),
        (
            "regmirror-e2e/big/noise.bin",
            Content::Random {
                len: BIG_LAYER_BYTES,
                seed: 0x05ee_db16,
            },
        ),
    ]);
    let m = layout.add_image(Flavor::Oci, "linux", "amd64", &[big]);
    layout.tag("big", m.media_type, &m.blob);
    images.push(image(
        &oci("big"),
        "big",
        &m.blob.digest,
        m.media_type,
        vec![platform(&m, "linux", "amd64")],
    ));
    layout.finish();

    let keys = KeyPair::generate(dir);
    let issuer = Issuer::start(&keys, None).await;
    let upstream = Upstream::start(
        &dir.join("upstream"),
        &dir.join("storage"),
        &issuer,
        &keys,
        true,
    )
    .await;
    let skopeo = Skopeo::plain(&dir.join("skopeo"));
    for (source, img) in &images {
        let dest = format!("{}/{}:{}", upstream.addr(), img.name, img.tag);
        skopeo.push(source, &dest).await;
        let got = manifest_digest(&upstream, &issuer, img).await;
        assert_eq!(
            got, img.digest,
            "the upstream's digest for {} differs from the one generated (skopeo rewrote it?)",
            img.name
        );
    }
    images.into_iter().map(|(_, i)| i).collect()
}

/// Asks the upstream for the digest of `image`'s tag, as a registry client would.
pub async fn manifest_digest(upstream: &Upstream, issuer: &Issuer, image: &Image) -> String {
    let resp = reqwest::Client::new()
        .get(format!(
            "{}/v2/{}/manifests/{}",
            upstream.url(),
            image.name,
            image.tag
        ))
        .bearer_auth(issuer.token_for(&image.name, &["pull"]))
        .header(
            "Accept",
            "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
             application/vnd.docker.distribution.manifest.list.v2+json, \
             application/vnd.docker.distribution.manifest.v2+json",
        )
        .send()
        .await
        .expect("GET manifest from upstream");
    assert!(
        resp.status().is_success(),
        "upstream manifest GET for {}: {}",
        image.name,
        resp.status()
    );
    let header = resp
        .headers()
        .get("Docker-Content-Digest")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = resp.bytes().await.expect("manifest body");
    let computed = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
    assert_eq!(
        header.as_deref(),
        Some(computed.as_str()),
        "upstream Docker-Content-Digest"
    );
    computed
}
