//! Hosted repositories on a cluster while a shared part is down: with Redis or Garage
//! stopped, a push is refused with 503 (never a 201 for what was not recorded) and a pull is
//! 503 (never 404); once the part is back, both work.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use crate::cluster::raw_push::{assert_pulls, Client, Pushed, APP, HOSTED};
use crate::cluster::world::{ClusterWorld, Setup};
use crate::cluster::{blob_url, get_blob, Got};
use crate::procs::wait_until;

/// Redis stopped after a first push: each replica answers 503 `UNAVAILABLE`, never 404, for
/// the pushed manifest (by tag and by digest), a blob and the tag list; a push through a
/// replica (chunked, monolithic, or the manifest) is refused with 503, never 201. Once Redis
/// is back (empty: nothing persisted), the push succeeds and every replica serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_while_redis_is_down_is_refused_and_succeeds_once_it_is_back() {
    let mut cluster = ClusterWorld::start(Setup::env(&[HOSTED])).await;
    let before = Pushed::new(200_000, 0x5eed_0010, "before");
    let r0 = Client::new(&cluster.replicas[0].addr());
    for (_, bytes) in before.blobs() {
        r0.blob(APP, bytes, 2).await;
    }
    r0.put_manifest(APP, "v1", &before.manifest)
        .await
        .expect(201, "PUT v1 before Redis stops");

    cluster.redis.kill();
    let (layer_digest, _) = &before.blobs()[0];
    for (i, replica) in cluster.replicas.iter().enumerate() {
        let client = Client::new(&replica.addr());
        for path in [
            format!("/v2/{APP}/manifests/v1"),
            format!("/v2/{APP}/manifests/{}", before.digest()),
            format!("/v2/{APP}/blobs/{layer_digest}"),
            format!("/v2/{APP}/tags/list"),
        ] {
            for method in ["GET", "HEAD"] {
                let got = client.send(method, &path, &[], None).await;
                assert_eq!(
                    got.status,
                    503,
                    "replica {i}: {method} {path} with Redis down: {}",
                    got.text()
                );
                if method == "GET" {
                    assert_eq!(got.code().as_deref(), Some("UNAVAILABLE"), "{}", got.text());
                }
            }
        }
    }

    let during = Pushed::new(150_000, 0x5eed_0011, "during");
    let r1 = Client::new(&cluster.replicas[1].addr());
    let (digest, bytes) = &during.blobs()[0];
    let chunked = r1.chunked(APP, bytes, 2, digest).await;
    assert_eq!(
        chunked.status,
        503,
        "the end of a chunked upload through replica 1 with Redis down: {}",
        chunked.text()
    );
    assert_eq!(chunked.code().as_deref(), Some("UNAVAILABLE"));
    let (digest, bytes) = &during.blobs()[1];
    let monolithic = r1
        .send(
            "POST",
            &format!("/v2/{APP}/blobs/uploads/?digest={digest}"),
            &[("content-type", "application/octet-stream".into())],
            Some(bytes.to_vec()),
        )
        .await;
    assert_eq!(
        monolithic.status,
        503,
        "a monolithic upload through replica 1 with Redis down: {}",
        monolithic.text()
    );
    let manifest = r1.put_manifest(APP, "v2", &during.manifest).await;
    assert_eq!(
        manifest.status,
        503,
        "a manifest PUT through replica 1 with Redis down: {}",
        manifest.text()
    );

    cluster.redis.restart().await;
    // A replica does not ask Redis again for a moment after a failure
    // (`cluster::redis::TIMEOUT`, 2 s), and its first call after that may find the old
    // connection broken: a client retrying a 503 gets through within seconds. Wait until each
    // replica reads the hosted index again (an empty Redis: 404, not 503).
    for (i, replica) in cluster.replicas.iter().enumerate() {
        let client = Client::new(&replica.addr());
        wait_until(
            &format!("replica {i} to read the hosted index once Redis is back"),
            Duration::from_secs(20),
            || async {
                let got = client
                    .send("GET", &format!("/v2/{APP}/tags/list"), &[], None)
                    .await;
                got.status != 503
            },
        )
        .await;
    }
    let front = Client::new(&cluster.front());
    front.blob(APP, &during.layer, 2).await;
    front.blob(APP, &during.config, 1).await;
    front
        .put_manifest(APP, "v2", &during.manifest)
        .await
        .expect(201, "PUT v2 through nginx once Redis is back");
    for (i, replica) in cluster.replicas.iter().enumerate() {
        assert_pulls(&replica.addr(), APP, "v2", &during, &format!("replica {i}")).await;
    }
}

/// Garage stopped after replica 0 took a push's blobs (so its disk holds them): the manifest
/// PUT through replica 0, whose blobs it finds on its own disk but which the bucket cannot
/// take, is 503 `UNAVAILABLE`, never a 201 nor a 500; so is a new upload; replica 0 still
/// serves the blobs its disk holds, replica 1 answers 503 for them (never 404). Once Garage
/// is back, the manifest PUT succeeds and every replica serves the image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_while_garage_is_down_is_refused_and_succeeds_once_it_is_back() {
    let mut cluster = ClusterWorld::start(Setup::env(&[HOSTED])).await;
    let image = Pushed::new(300_000, 0x5eed_0020, "garage");
    let r0 = Client::new(&cluster.replicas[0].addr());
    for (_, bytes) in image.blobs() {
        r0.blob(APP, bytes, 2).await;
    }

    cluster.garage.kill(0);
    let put = r0.put_manifest(APP, "v1", &image.manifest).await;
    assert_eq!(
        (put.status, put.code().as_deref()),
        (503, Some("UNAVAILABLE")),
        "a manifest PUT through replica 0 with Garage down: {}",
        put.text()
    );
    let start = r0
        .send("POST", &format!("/v2/{APP}/blobs/uploads/"), &[], None)
        .await;
    assert_eq!(
        start.status,
        503,
        "the start of an upload with Garage down: {}",
        start.text()
    );
    let none = AtomicU64::new(0);
    let r1 = Client::new(&cluster.replicas[1].addr());
    for (digest, bytes) in image.blobs() {
        let url = blob_url(&cluster.replicas[0].addr(), APP, &digest);
        assert_eq!(
            get_blob(&r0.http, &url, &none).await,
            Got::Body {
                len: bytes.len() as u64,
                digest: digest.clone()
            },
            "replica 0 serves {digest} from its disk with Garage down"
        );
        let got = r1
            .send("GET", &format!("/v2/{APP}/blobs/{digest}"), &[], None)
            .await;
        assert_eq!(
            got.status,
            503,
            "replica 1: {digest}, only in the bucket, with Garage down: {}",
            got.text()
        );
    }

    cluster.garage.restart(0).await;
    r0.put_manifest(APP, "v1", &image.manifest).await.expect(
        201,
        "the manifest PUT through replica 0 once Garage is back",
    );
    for (i, replica) in cluster.replicas.iter().enumerate() {
        assert_pulls(&replica.addr(), APP, "v1", &image, &format!("replica {i}")).await;
    }
}
