//! `regmirror import` of hostile bundles, OCI layout tars written by hand: an `index.json` or a
//! manifest over the 4 MiB cap, indexes naming one child thousands of times at every level
//! (imported in bounded time: each manifest walked once), a manifest media type outside the
//! allowlist (`text/html`), and a tag for a registry that is not a configured upstream. A refused
//! bundle commits nothing and leaves nothing in `tmp/`.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::images::{sha256_digest, OCI_CONFIG, OCI_INDEX, OCI_LAYER, OCI_MANIFEST};
use crate::common::{count_files, random_bytes};
use crate::prefetch::{regmirror, Run};
use crate::MIB;

/// A file of the bundle, under `blobs/sha256/`.
#[derive(Clone)]
struct Blob {
    digest: String,
    bytes: Vec<u8>,
}

impl Blob {
    fn new(bytes: Vec<u8>) -> Self {
        Self {
            digest: sha256_digest(&bytes),
            bytes,
        }
    }

    fn json(v: Value) -> Self {
        Self::new(v.to_string().into_bytes())
    }

    fn descriptor(&self, media_type: &str) -> Value {
        json!({"mediaType": media_type, "digest": self.digest, "size": self.bytes.len()})
    }
}

/// A one-layer image.
struct Image {
    manifest: Blob,
    config: Blob,
    layer: Blob,
}

impl Image {
    fn new(seed: u64) -> Self {
        let config = Blob::json(json!({"architecture": "amd64", "os": "linux", "seed": seed}));
        let layer = Blob::new(random_bytes(300, seed));
        let manifest = Blob::json(json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config.descriptor(OCI_CONFIG),
            "layers": [layer.descriptor(OCI_LAYER)],
        }));
        Self {
            manifest,
            config,
            layer,
        }
    }

    fn blobs(&self) -> Vec<&Blob> {
        vec![&self.manifest, &self.config, &self.layer]
    }
}

/// The `index.json` entry tagging `target` as `image` (`<registry>/<repo>:<tag>`), as `export`
/// writes it.
fn tagged(target: &Blob, media_type: &str, image: &str) -> Value {
    let tag = image.rsplit_once(':').unwrap().1;
    let mut d = target.descriptor(media_type);
    d["annotations"] = json!({
        "io.regmirror.image": image,
        "org.opencontainers.image.ref.name": tag,
    });
    d
}

fn index_json(descriptors: Vec<Value>) -> Vec<u8> {
    json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors})
        .to_string()
        .into_bytes()
}

/// Writes an OCI layout tar at `path`: `oci-layout`, `index.json` and `blobs`.
fn write_bundle(path: &Path, index: &[u8], blobs: &[&Blob]) {
    let mut tar = tar::Builder::new(std::fs::File::create(path).unwrap());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, name, data).unwrap();
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    add("index.json", index);
    for b in blobs {
        let hex = b.digest.trim_start_matches("sha256:");
        add(&format!("blobs/sha256/{hex}"), &b.bytes);
    }
    tar.into_inner().unwrap();
}

/// `regmirror import BUNDLE --data-dir DATA`, configured by `env` alone.
async fn import(data: &Path, bundle: &Path, env: &[(&str, &str)]) -> Run {
    let (data, bundle) = (data.to_str().unwrap(), bundle.to_str().unwrap());
    regmirror(&["import", "--data-dir", data, bundle], env).await
}

/// The import failed saying `why`, and left no blob, manifest, temp file or index in `data`.
fn assert_refused(run: &Run, data: &Path, why: &str) {
    assert!(!run.ok, "the bundle was imported:\n{}", run.show());
    assert!(
        run.stderr.contains(why) && run.stderr.contains("nothing was imported"),
        "the error does not say {why:?} and that nothing was imported:\n{}",
        run.show()
    );
    for sub in ["blobs", "manifests", "tmp"] {
        assert_eq!(
            count_files(&data.join(sub)),
            0,
            "files in {sub}/ after a refused import:\n{}",
            run.show()
        );
    }
    assert!(
        !data.join("index.json").exists(),
        "a refused import wrote the index"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_json_or_a_manifest_over_4_mib_is_refused_and_nothing_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let img = Image::new(900);
    let good = index_json(vec![tagged(
        &img.manifest,
        OCI_MANIFEST,
        "docker.io/team/app:v1",
    )]);
    // The hand-written bundle is sound: what the cases below change is what is refused.
    let bundle = dir.path().join("good.tar");
    write_bundle(&bundle, &good, &img.blobs());
    let run = import(&dir.path().join("good"), &bundle, &[]).await;
    assert!(
        run.ok && run.stdout.contains("imported docker.io/team/app:v1"),
        "{}",
        run.show()
    );

    // Valid JSON, padded past the cap: the old import read and parsed it whole.
    let mut huge = good.clone();
    huge.splice(1..1, vec![b' '; 4 * MIB]);
    let bundle = dir.path().join("huge-index.tar");
    write_bundle(&bundle, &huge, &img.blobs());
    let data = dir.path().join("huge-index");
    let run = import(&data, &bundle, &[]).await;
    assert_refused(&run, &data, "index.json is over 4 MiB");

    // The cap the mirror applies to an upstream's manifests holds for a bundle's.
    let mut m: Value = serde_json::from_slice(&img.manifest.bytes).unwrap();
    m["annotations"] = json!({"padding": "x".repeat(4 * MIB)});
    let big = Blob::json(m);
    let index = index_json(vec![tagged(&big, OCI_MANIFEST, "docker.io/team/app:v1")]);
    let bundle = dir.path().join("huge-manifest.tar");
    write_bundle(&bundle, &index, &[&big, &img.config, &img.layer]);
    let data = dir.path().join("huge-manifest");
    let run = import(&data, &bundle, &[]).await;
    assert_refused(
        &run,
        &data,
        &format!("manifest {} is over 4 MiB", big.digest),
    );
}

/// Six levels of indexes, each naming the one below 32 times: 32^6 (about 10^9) paths down to
/// one image manifest. The old import walked every path (a file read and a JSON parse each)
/// and did not finish; walked digest by digest it is 7 manifests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexes_naming_one_child_thousands_of_times_nested_import_in_bounded_time() {
    let dir = tempfile::tempdir().unwrap();
    let img = Image::new(910);
    let mut blobs = vec![img.manifest.clone(), img.config.clone(), img.layer.clone()];
    let mut child = img.manifest.descriptor(OCI_MANIFEST);
    for _ in 0..6 {
        let index = Blob::json(json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": vec![child; 32],
        }));
        child = index.descriptor(OCI_INDEX);
        blobs.push(index);
    }
    let top = blobs.last().unwrap();
    let index = index_json(vec![tagged(top, OCI_INDEX, "docker.io/team/app:nested")]);
    let bundle = dir.path().join("nested.tar");
    write_bundle(&bundle, &index, &blobs.iter().collect::<Vec<_>>());

    let data = dir.path().join("data");
    let run = tokio::time::timeout(Duration::from_secs(20), import(&data, &bundle, &[]))
        .await
        .unwrap_or_else(|_| {
            panic!("the import of 7 small manifests ran for over 20 s: its walk is unbounded")
        });
    assert!(
        run.ok && run.stdout.contains("imported docker.io/team/app:nested"),
        "{}",
        run.show()
    );
    assert_eq!(count_files(&data.join("manifests")), 7, "{}", run.show());
    assert_eq!(count_files(&data.join("blobs")), 2, "{}", run.show());
    assert_eq!(count_files(&data.join("tmp")), 0, "{}", run.show());
}

/// A manifest's media type is its `Content-Type` when served: only manifest types are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_media_type_outside_the_allowlist_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = Image::new(920);
    let why = format!(
        "manifest {} has media type \"text/html\"",
        img.manifest.digest
    );

    // The type the tag and the manifest would be served with.
    let index = index_json(vec![tagged(
        &img.manifest,
        "text/html",
        "docker.io/team/app:v1",
    )]);
    let bundle = dir.path().join("top.tar");
    write_bundle(&bundle, &index, &img.blobs());
    let data = dir.path().join("top");
    let run = import(&data, &bundle, &[]).await;
    assert_refused(&run, &data, &why);

    // The type a child of an index would be stored and served with.
    let parent = Blob::json(json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [img.manifest.descriptor("text/html")],
    }));
    let index = index_json(vec![tagged(&parent, OCI_INDEX, "docker.io/team/app:v1")]);
    let bundle = dir.path().join("child.tar");
    let mut blobs = img.blobs();
    blobs.push(&parent);
    write_bundle(&bundle, &index, &blobs);
    let data = dir.path().join("child");
    let run = import(&data, &bundle, &[]).await;
    assert_refused(&run, &data, &why);
}

/// Tags are keyed `<upstream>/<repo>`: a bundle may set them only for the registries this
/// mirror is configured for, and one image outside them refuses the whole bundle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_for_a_registry_that_is_not_configured_is_refused_whole() {
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs) = (Image::new(930), Image::new(931));
    let index = index_json(vec![
        tagged(&ours.manifest, OCI_MANIFEST, "docker.io/team/app:v1"),
        tagged(&theirs.manifest, OCI_MANIFEST, "ghcr.io/team/app:v1"),
    ]);
    let bundle = dir.path().join("two.tar");
    let mut blobs = ours.blobs();
    blobs.extend(theirs.blobs());
    write_bundle(&bundle, &index, &blobs);
    let data = dir.path().join("data");
    let run = import(&data, &bundle, &[]).await;
    assert_refused(
        &run,
        &data,
        "ghcr.io/team/app:v1 names registry \"ghcr.io\", which is not a configured upstream",
    );

    // A name with no registry in front is refused too.
    let index = index_json(vec![tagged(&ours.manifest, OCI_MANIFEST, "app:v1")]);
    let bundle = dir.path().join("bare.tar");
    write_bundle(&bundle, &index, &ours.blobs());
    let data = dir.path().join("bare");
    let run = import(&data, &bundle, &[]).await;
    assert_refused(&run, &data, "app:v1 names no registry");

    // Once ghcr.io is configured, the first bundle imports whole.
    let upstreams = r#"[{name = "ghcr.io", url = "https://ghcr.io"}]"#;
    let data = dir.path().join("both");
    let run = import(
        &data,
        &dir.path().join("two.tar"),
        &[("REGMIRROR_UPSTREAMS", upstreams)],
    )
    .await;
    assert!(run.ok, "{}", run.show());
    for image in ["docker.io/team/app:v1", "ghcr.io/team/app:v1"] {
        assert!(
            run.stdout.contains(&format!("imported {image}")),
            "{}",
            run.show()
        );
    }
}
