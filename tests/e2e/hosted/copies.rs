//! Images copied into hosted repositories and back out by skopeo (streamed `PATCH` uploads, a
//! multi-arch index with `--all`) and by containerd (`ctr image push`, monolithic `PUT`s),
//! compared digest for digest and byte for byte with what was pushed.

use std::path::Path;
use std::time::Duration;

use crate::containerd::Containerd;
use crate::hosted::{
    assert_same_blobs, assert_upstream_never_asked, file_digest, hosted_world, small_image,
};
use crate::oci::{Content, Flavor, Layout, OCI_INDEX};
use crate::procs::run_ok;
use crate::skopeo::{dir_manifest_digest, Skopeo};

/// skopeo copies an image (a 2 MiB layer among them) and a two-platform index into `myorg/`
/// and back: each copy back has the pushed digest and the pushed bytes; the index comes back
/// whole (both platforms' manifests and blobs), and without `--all` the amd64 image of it;
/// the upstream never hears of `myorg/`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_copies_an_image_and_an_index_in_and_out() {
    let world = hosted_world(&[], "", &[], 200).await;
    let addr = world.mirror().addr();
    let skopeo = Skopeo::plain(&world.dir("skopeo"));

    let app_layout = world.dir("app-layout");
    let app = small_image(&app_layout, "v1", "myorg/app", 2 << 20);
    skopeo
        .push(
            &format!("oci:{}:v1", app_layout.display()),
            &format!("{addr}/myorg/app:v1"),
        )
        .await;
    let out = world.dir("app-out");
    let got = skopeo
        .pull_to_dir(&format!("{addr}/myorg/app:v1"), &out, false)
        .await;
    assert_eq!(
        got, app.blob.digest,
        "the digest of myorg/app:v1 copied back"
    );
    let mut blobs = app
        .layers
        .iter()
        .map(|b| b.digest.clone())
        .collect::<Vec<_>>();
    blobs.push(app.config.digest.clone());
    assert_same_blobs(&app_layout, &out, &blobs, "myorg/app:v1");

    // A two-platform index whose images share a base layer.
    let multi_layout = world.dir("multi-layout");
    let mut layout = Layout::create(&multi_layout);
    let base = layout.add_layer(&[("etc/base", Content::Text("shared base layer\n".into()))]);
    let mut manifests = Vec::new();
    for arch in ["amd64", "arm64"] {
        let own = layout.add_layer(&[(
            "etc/arch",
            Content::Text(format!("the {arch} image of myorg/multi\n")),
        )]);
        manifests.push(layout.add_image(Flavor::Oci, "linux", arch, &[base.clone(), own]));
    }
    let index = layout.add_index(&[
        (&manifests[0], "linux", "amd64"),
        (&manifests[1], "linux", "arm64"),
    ]);
    layout.tag("v1", OCI_INDEX, &index);
    layout.finish();
    skopeo
        .push(
            &format!("oci:{}:v1", multi_layout.display()),
            &format!("{addr}/myorg/multi:v1"),
        )
        .await;
    let out = world.dir("multi-out");
    let got = skopeo
        .pull_to_dir(&format!("{addr}/myorg/multi:v1"), &out, true)
        .await;
    assert_eq!(got, index.digest, "the digest of the index copied back");
    let blobs: Vec<String> = manifests
        .iter()
        .flat_map(|m| m.layers.iter().chain([&m.config]))
        .map(|b| b.digest.clone())
        .collect();
    assert_same_blobs(&multi_layout, &out, &blobs, "myorg/multi:v1 --all");
    for m in &manifests {
        let hex = m.blob.digest.trim_start_matches("sha256:");
        let path = out.join(format!("{hex}.manifest.json"));
        assert_eq!(
            file_digest(&path),
            m.blob.digest,
            "the platform manifest {} copied back with the index",
            m.blob.digest
        );
    }
    let out = world.dir("multi-amd64");
    let got = skopeo
        .pull_to_dir(&format!("{addr}/myorg/multi:v1"), &out, false)
        .await;
    assert_eq!(
        got, manifests[0].blob.digest,
        "the amd64 image of myorg/multi:v1"
    );

    assert_upstream_never_asked(&world, "myorg/app");
    assert_upstream_never_asked(&world, "myorg/multi");
}

/// Writes the layout at `layout` as an OCI archive (a tar of the layout), what
/// `ctr image import` reads.
fn oci_archive(layout: &Path, archive: &Path) {
    let file = std::fs::File::create(archive).expect("create archive");
    let mut tar = tar::Builder::new(file);
    tar.append_dir_all(".", layout).expect("tar the layout");
    tar.into_inner().expect("finish the archive");
}

/// containerd imports an OCI archive and `ctr image push`es it into `myorg/tools` (containerd
/// uploads each blob with one `PUT`); skopeo copies it back with the same digest and bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pushes_and_skopeo_pulls_back() {
    let world = hosted_world(&["containerd", "ctr"], "", &[], 200).await;
    let addr = world.mirror().addr();
    let layout = world.dir("layout");
    let image = small_image(&layout, "v1", "myorg/tools", 1 << 20);
    let archive = world.dir("archive").join("tools.tar");
    oci_archive(&layout, &archive);

    let ctr = Containerd::start(&world.dir("ct"), None).await;
    let reference = format!("{addr}/myorg/tools:v1");
    let mut import = ctr.ctr();
    import
        .args(["image", "import", "--no-unpack", "--base-name"])
        .arg(format!("{addr}/myorg/tools"))
        .arg(&archive);
    run_ok(&mut import, Duration::from_secs(60)).await;
    assert_eq!(
        ctr.image_digest(&reference).await,
        image.blob.digest,
        "the digest of the image ctr imported"
    );
    let mut push = ctr.ctr();
    push.args(["image", "push", "--plain-http", &reference]);
    run_ok(&mut push, Duration::from_secs(120)).await;

    let skopeo = Skopeo::plain(&world.dir("skopeo"));
    let out = world.dir("out");
    let got = skopeo.pull_to_dir(&reference, &out, false).await;
    assert_eq!(got, image.blob.digest, "the digest skopeo copied back");
    assert_eq!(dir_manifest_digest(&out), image.blob.digest);
    let mut blobs: Vec<String> = image.layers.iter().map(|b| b.digest.clone()).collect();
    blobs.push(image.config.digest.clone());
    assert_same_blobs(&layout, &out, &blobs, "myorg/tools:v1");
    assert_upstream_never_asked(&world, "myorg/tools");
}
