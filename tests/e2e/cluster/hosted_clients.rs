//! Hosted repositories on a cluster as several clients, and dockerd, push to them: parallel
//! pushes of the same layer through nginx, and the guides' `docker push` and `docker pull`.

use std::time::Duration;

use crate::cluster::raw_push::{assert_pulls, upload_chunks, Client, Pushed, HOSTED};
use crate::cluster::world::{ClusterWorld, Setup};
use crate::oci::{Content, Flavor, Layout};
use crate::push::sha256;
use crate::skopeo::Skopeo;

/// Six clients push the same image at once through nginx (round-robin: the same blobs
/// committed concurrently through every replica, each blob's final `PUT ?digest=` sent by all
/// six together), three into `myorg/c0` and three into
/// `myorg/c1`, as parallel CI jobs sharing a base layer do: every blob upload and manifest
/// PUT is 201 (a commit that finds the bucket already completed by another is no failure),
/// every replica serves both, and no upload is left in the bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pushes_of_the_same_blobs_all_succeed() {
    let cluster = ClusterWorld::start(Setup::env(&[HOSTED])).await;
    let image = Pushed::new(3 * 1024 * 1024, 0x5eed_0030, "concurrent");
    let front = cluster.front();
    let together = std::sync::Arc::new(tokio::sync::Barrier::new(6));
    let pushes: Vec<_> = (0..6)
        .map(|k| {
            let client = Client::new(&front);
            let (layer, config) = (image.layer.clone(), image.config.clone());
            let manifest = image.manifest.clone();
            let together = together.clone();
            tokio::spawn(async move {
                let name = format!("myorg/c{}", k % 2);
                let mut got = Vec::new();
                for (bytes, chunks) in [(&layer, 3), (&config, 1)] {
                    let location = client.patched(&name, bytes, chunks).await;
                    // Every client's commit of the blob at once.
                    together.wait().await;
                    let done = client.finish(&location, &sha256(bytes)).await;
                    got.push((done.asked.clone(), done.status, done.text()));
                }
                let put = client.put_manifest(&name, "1", &manifest).await;
                got.push((put.asked.clone(), put.status, put.text()));
                got
            })
        })
        .collect();
    let mut failed = Vec::new();
    for push in pushes {
        let answers = push.await.expect("a push task");
        failed.extend(answers.into_iter().filter(|(_, status, _)| *status != 201));
    }
    assert!(
        failed.is_empty(),
        "concurrent pushes of the same blobs through nginx; these were not 201:\n{}\n{}",
        failed
            .iter()
            .map(|(asked, status, text)| format!("  {asked}: {status} {text}"))
            .collect::<Vec<_>>()
            .join("\n"),
        cluster.logs()
    );
    for (i, replica) in cluster.replicas.iter().enumerate() {
        for name in ["myorg/c0", "myorg/c1"] {
            assert_pulls(&replica.addr(), name, "1", &image, &format!("replica {i}")).await;
        }
    }
    let left = upload_chunks(&cluster).await;
    assert!(left.is_empty(), "upload chunks left: {left:?}");
    let multipart = cluster.garage.s3().multipart_uploads().await;
    assert!(
        multipart.is_empty(),
        "multipart uploads left: {multipart:?}"
    );
}

/// dockerd, as the guides push: an image `docker load`ed (made from an OCI layout the test
/// writes, two layers), `docker push 127.0.0.1:<nginx>/myorg/hello:1` through nginx (its
/// streamed `PATCH`es round-robin over the replicas), `docker image rm`, then `docker pull`
/// from replica 2 directly: the pulled image's digest is the one the push reported, and each
/// replica answers the tag with that digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_pushes_through_nginx_and_pulls_from_a_replica() {
    use crate::dockerd::{Dockerd, DOCKER};
    use crate::procs::run_ok;

    let cluster = ClusterWorld::start(Setup {
        tools: vec!["dockerd", DOCKER],
        ..Setup::env(&[HOSTED])
    })
    .await;
    let world = &cluster.world;
    let layout = Layout::create(&world.dir("hello-layout"));
    let layers = [
        layout.add_layer(&[("hello.txt", Content::Text("hello from a cluster\n".into()))]),
        layout.add_layer(&[(
            "blob.bin",
            Content::Random {
                len: 2 * 1024 * 1024,
                seed: 0x5eed_0040,
            },
        )]),
    ];
    let manifest = layout.add_image(Flavor::Docker, "linux", "amd64", &layers);
    let exported = world.dir("hello-dir");
    layout.export_dir(&manifest, &exported);
    let front = cluster.front();
    let pushed_ref = format!("{front}/myorg/hello:1");
    let archive = world.dir("hello-archive").join("hello.tar");
    let skopeo = Skopeo::plain(&world.dir("skopeo-hello"));
    let mut copy = skopeo.command("copy");
    copy.arg(format!("dir:{}", exported.display()))
        .arg(format!("docker-archive:{}:{pushed_ref}", archive.display()));
    run_ok(&mut copy, Duration::from_secs(120)).await;

    let dockerd = Dockerd::start(&world.dir("dk"), &[]).await;
    let mut load = dockerd.docker();
    load.arg("load").arg("-i").arg(&archive);
    run_ok(&mut load, Duration::from_secs(120)).await;
    let mut push = dockerd.docker();
    push.args(["push", &pushed_ref]);
    let out = run_ok(&mut push, Duration::from_secs(240)).await;
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    let digest = said
        .split_whitespace()
        .skip_while(|w| *w != "digest:")
        .nth(1)
        .unwrap_or_else(|| panic!("no digest in docker push's output:\n{said}"))
        .to_owned();
    let mut rm = dockerd.docker();
    rm.args(["image", "rm", &pushed_ref]);
    run_ok(&mut rm, Duration::from_secs(60)).await;

    let r2 = cluster.replicas[2].addr();
    let pulled_ref = format!("{r2}/myorg/hello:1");
    dockerd.pull(&pulled_ref).await;
    assert_eq!(
        dockerd.repo_digests(&pulled_ref).await,
        vec![format!("{r2}/myorg/hello@{digest}")],
        "the image docker pulled from replica 2 after pushing it through nginx"
    );
    for (i, replica) in cluster.replicas.iter().enumerate() {
        let got = Client::new(&replica.addr())
            .send(
                "HEAD",
                "/v2/myorg/hello/manifests/1",
                &[(
                    "accept",
                    "application/vnd.docker.distribution.manifest.v2+json, \
                     application/vnd.oci.image.manifest.v1+json"
                        .into(),
                )],
                None,
            )
            .await
            .expect(200, &format!("replica {i}: myorg/hello:1"));
        assert_eq!(
            got.header("docker-content-digest"),
            Some(digest.clone()),
            "replica {i}: myorg/hello:1"
        );
    }
}
