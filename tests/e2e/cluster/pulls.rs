//! Pulls through a cluster as its users make them: skopeo, dockerd and containerd through
//! nginx in front of 3 replicas; a fourth replica started on an empty disk (a range of a blob
//! it lacks read from the bucket); one tag pulled through each replica within its TTL.

use crate::cluster::replicas::{names, value};
use crate::cluster::skopeo_pull;
use crate::cluster::world::{ClusterWorld, Setup};
use crate::containerd::Containerd;
use crate::dockerd::{Dockerd, DOCKER};
use crate::fixture::Image;

/// skopeo, dockerd and containerd each pull the lab images through nginx (round-robin over 3
/// replicas, so one pull's requests land on several of them): each gets the upstream's
/// digests and bytes, and the upstream serves each blob once for the whole cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_pull_through_nginx_in_front_of_three_replicas() {
    let cluster = ClusterWorld::start(Setup {
        tools: vec!["dockerd", DOCKER, "containerd", "ctr"],
        ..Setup::default()
    })
    .await;
    let front = cluster.front();
    let world = &cluster.world;

    for short in ["small", "many", "big", "multi"] {
        skopeo_pull(world, &front, cluster.image(short), short).await;
    }

    let dockerd = Dockerd::start(
        &world.dir("dk"),
        &["--registry-mirror".into(), format!("http://{front}")],
    )
    .await;
    for short in ["small", "multi", "big"] {
        let img = cluster.image(short);
        dockerd.pull(&img.docker_io()).await;
        let digests = dockerd.repo_digests(&img.docker_io()).await;
        let want = format!("{}@{}", img.name.trim_start_matches("library/"), img.digest);
        assert_eq!(digests, vec![want], "RepoDigests of {}", img.docker_io());
    }

    let ctr = Containerd::start(&world.dir("ct"), Some(&front)).await;
    for short in ["small", "multi", "many"] {
        let img = cluster.image(short);
        ctr.pull(&img.docker_io(), &[]).await;
        let got = ctr.image_digest(&img.docker_io()).await;
        crate::assert_digest("ctr via nginx", img, &got, &img.digest);
    }

    for short in ["small", "many", "big", "multi"] {
        let img = cluster.image(short);
        cluster.assert_fetched_once(img, &img.blobs(), "after skopeo, dockerd and ctr pulls");
    }
}

/// A fourth replica started on an empty disk, after the other three pulled every image,
/// serves every image (skopeo, every platform) without one request to the upstream: what it
/// has not got locally, the bucket has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_on_an_empty_disk_serves_the_bucket_without_the_upstream() {
    let mut cluster = ClusterWorld::start(Setup::env(&[("REGMIRROR_CACHE_TAG_TTL", "1h")])).await;
    let front = cluster.front();
    let images = ["small", "many", "big", "multi"].map(|s| cluster.image(s));
    pull_each(&cluster, &front, &images, "warm").await;
    for img in images {
        cluster.wait_in_bucket(&img.blobs()).await;
    }
    let before = cluster.upstream().access_lines().len();

    let fourth = cluster.start_replica(&[]).await;
    let addr = cluster.replicas[fourth].addr();

    // A range of a layer the fourth replica lacks locally is a ranged read of the bucket's
    // object: the bytes of the whole layer (checked against its digest, from replica 0) at
    // that range, and the layer is not filled into the fourth replica's disk for it.
    let many = cluster.image("many");
    let layer = many.platform("amd64").layers[0].clone();
    let client = reqwest::Client::new();
    let whole = client
        .get(crate::cluster::blob_url(
            &cluster.replicas[0].addr(),
            &many.name,
            &layer,
        ))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let mut hash = crate::cluster::FastSha256::start();
    hash.update(&whole);
    assert_eq!(hash.finish(), layer, "replica 0's copy of {layer}");
    let (first, last) = (whole.len() / 4, whole.len() / 2);
    let resp = client
        .get(crate::cluster::blob_url(&addr, &many.name, &layer))
        .header("Range", format!("bytes={first}-{last}"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        206,
        "a range of a blob of {} bytes in the bucket",
        whole.len()
    );
    assert_eq!(
        resp.headers()["content-range"].to_str().unwrap(),
        format!("bytes {first}-{last}/{}", whole.len())
    );
    // A fill this request started would say "miss".
    assert_eq!(
        resp.headers()["x-cache"],
        "hit",
        "the range was not read from the bucket"
    );
    assert_eq!(&resp.bytes().await.unwrap()[..], &whole[first..=last]);
    assert!(
        !cluster.replicas[fourth].blob_path(&layer).exists(),
        "a range filled the whole layer into the fourth replica's disk"
    );

    pull_each(&cluster, &addr, &images, "fourth").await;
    let new: Vec<String> = cluster.upstream().access_lines()[before..].to_vec();
    assert!(
        new.is_empty(),
        "the fourth replica (empty disk) asked the upstream, although the bucket held every \
         image:\n  {}\n{}",
        new.join("\n  "),
        cluster.logs()
    );
    let replica = &cluster.replicas[fourth];
    let hits = value(replica, names::TIER_HITS, &[("tier", "bucket")]).await
        + value(replica, names::TIER_HITS, &[("tier", "peer")]).await;
    assert!(
        hits > 0.0,
        "the fourth replica served every image with no upstream request, yet counts no \
         {}{{tier=\"bucket\"}} nor {{tier=\"peer\"}}:\n{}",
        names::TIER_HITS,
        crate::cluster::replicas::metrics(replica).await
    );
}

/// skopeo pulls each image via `addr`, into directories named after `what`.
async fn pull_each(cluster: &ClusterWorld, addr: &str, images: &[&Image], what: &str) {
    for img in images {
        let dir = format!("{what}-{}", img.name.replace('/', "-"));
        skopeo_pull(&cluster.world, addr, img, &dir).await;
    }
}

/// One tag pulled through each of the 3 replicas directly, within its TTL: the upstream is
/// asked for that tag once (a GET or HEAD answered 2xx) for the whole cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_is_checked_once_per_ttl_for_the_whole_cluster() {
    let cluster = ClusterWorld::start(Setup::env(&[("REGMIRROR_CACHE_TAG_TTL", "1h")])).await;
    let small = cluster.image("small");
    for (i, replica) in cluster.replicas.iter().enumerate() {
        skopeo_pull(&cluster.world, &replica.addr(), small, &format!("r{i}")).await;
    }
    let path = format!("/v2/{}/manifests/{}", small.name, small.tag);
    let checks: Vec<_> = cluster
        .upstream()
        .served()
        .into_iter()
        .filter(|s| {
            s.path == path
                && (s.method == "GET" || s.method == "HEAD")
                && (200..300).contains(&s.status)
        })
        .collect();
    assert_eq!(
        checks.len(),
        1,
        "the upstream should have been asked for {}:{} once by the whole cluster within its \
         TTL; it answered {checks:?}\n{}\n{}",
        small.name,
        small.tag,
        cluster.upstream().logs(),
        cluster.logs()
    );
}

/// The peer endpoint, as a stranger and as a replica see it: unsigned or signed with another
/// secret, refused (403); signed with the cluster's secret, the blob the replica holds, with
/// its digest; a blob it neither holds nor fetches, 404, and the upstream is not asked for it
/// (the endpoint never fetches: no proxy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_endpoint_serves_only_signed_requests_for_what_the_replica_has() {
    use regmirror::cluster::peer::{self, PeerClient};
    use regmirror::config::Secret;
    use regmirror::reference::Digest;
    use std::time::Duration;

    let cluster = ClusterWorld::start(Setup::default()).await;
    let small = cluster.image("small");
    let addr = cluster.replicas[0].addr();
    skopeo_pull(&cluster.world, &addr, small, "peer-small").await;
    let layer = small.platform("amd64").layers[0].clone();
    let digest = Digest::parse(&layer).unwrap();
    let url = url::Url::parse(&format!("http://{addr}/")).unwrap();

    let unsigned = reqwest::get(format!("http://{addr}{}", peer::path(&digest)))
        .await
        .unwrap();
    assert_eq!(unsigned.status(), 403, "an unsigned peer request");
    let stranger = PeerClient::new(
        Secret::new("not the cluster's secret"),
        Duration::from_secs(5),
    )
    .unwrap();
    let e = stranger.get_blob(&url, &digest).await.unwrap_err();
    assert!(
        e.to_string().contains("403"),
        "another secret's request: {e}"
    );

    let replica = PeerClient::new(Secret::new(cluster.secret()), Duration::from_secs(5)).unwrap();
    let body = replica
        .get_blob(&url, &digest)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let mut hash = crate::cluster::FastSha256::start();
    hash.update(&body);
    assert_eq!(
        hash.finish(),
        layer,
        "the blob a replica gets from its peer"
    );

    let before = cluster.upstream().access_lines().len();
    let nowhere = Digest::parse(&format!("sha256:{}", "ab".repeat(32))).unwrap();
    let e = replica.get_blob(&url, &nowhere).await.unwrap_err();
    assert!(
        matches!(e, regmirror::error::Error::BlobUnknown(_)),
        "a blob nobody has: {e:?}"
    );
    let asked: Vec<String> = cluster.upstream().access_lines()[before..].to_vec();
    assert!(
        asked.is_empty(),
        "the peer endpoint asked the upstream: {asked:?}"
    );
}
