//! When a shared part fails: Redis stopped mid-run (pulls go on, each replica on its own,
//! and says so), Garage stopped (local-tier hits served, misses 503 until it is back), and one
//! node of a three-node Garage lost during a pull (the pull completes).

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use crate::cluster::replicas::{gauge_is, names, readyz, value};
use crate::cluster::world::{ClusterWorld, Setup};
use crate::cluster::{blob_url, get_blob, skopeo_pull, Got};
use crate::procs::wait_until;

/// Redis killed after a first pull: pulls through nginx and through each replica keep
/// working with the right digests; every replica's `/readyz` stays 200 and names Redis as
/// unreachable, and its `regmirror_shared_up{part="redis"}` is 0. Once Redis is back (empty),
/// pulls work and the replicas count it up again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_go_on_while_redis_is_down() {
    let mut cluster = ClusterWorld::start(Setup::default()).await;
    let front = cluster.front();
    skopeo_pull(&cluster.world, &front, cluster.image("small"), "before").await;

    cluster.redis.kill();
    skopeo_pull(&cluster.world, &front, cluster.image("multi"), "down-nginx").await;
    for (i, replica) in cluster.replicas.iter().enumerate() {
        let via = replica.addr();
        skopeo_pull(
            &cluster.world,
            &via,
            cluster.image("many"),
            &format!("down-r{i}"),
        )
        .await;
    }
    for (i, replica) in cluster.replicas.iter().enumerate() {
        wait_until(
            &format!(
                "replica {i} to count Redis down ({}{{part=\"redis\"}} 0)",
                names::SHARED_UP
            ),
            Duration::from_secs(60),
            || gauge_is(replica, names::SHARED_UP, &[("part", "redis")], 0.0),
        )
        .await;
        let errors = value(replica, names::SHARED_ERRORS, &[("part", "redis")]).await;
        assert!(
            errors > 0.0,
            "replica {i} served pulls with Redis down but counts no {}{{part=\"redis\"}}",
            names::SHARED_ERRORS
        );
        let (status, body) = readyz(replica).await;
        assert_eq!(
            status, 200,
            "replica {i}'s /readyz with Redis down (it serves on its own): {body}"
        );
        assert!(
            body.to_lowercase().contains("redis"),
            "replica {i}'s /readyz should name Redis as unreachable; it says: {body}"
        );
    }

    cluster.redis.restart().await;
    skopeo_pull(&cluster.world, &front, cluster.image("big"), "back").await;
    for (i, replica) in cluster.replicas.iter().enumerate() {
        wait_until(
            &format!("replica {i} to count Redis up again"),
            Duration::from_secs(60),
            || gauge_is(replica, names::SHARED_UP, &[("part", "redis")], 1.0),
        )
        .await;
    }
}

/// Garage killed: replica 0 still serves a blob its local tier holds (pulled through it
/// before), and answers 503, never 404, for a blob only the bucket (and another replica's
/// local tier) holds; once Garage is back on its directories, replica 0 serves that blob too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_hits_are_served_and_misses_are_503_while_garage_is_down() {
    let mut cluster = ClusterWorld::start(Setup::default()).await;
    let (small, many) = (cluster.image("small"), cluster.image("many"));
    let (r0, r1) = (cluster.replicas[0].addr(), cluster.replicas[1].addr());
    skopeo_pull(&cluster.world, &r0, small, "small-r0").await;
    skopeo_pull(&cluster.world, &r1, many, "many-r1").await;
    cluster.wait_in_bucket(&small.blobs()).await;
    cluster.wait_in_bucket(&many.blobs()).await;
    let local = small.platform("amd64").layers[0].clone();
    let remote = many.platform("amd64").layers[0].clone();
    let replica0 = &cluster.replicas[0];
    wait_until(
        "replica 0's local tier to hold the small image's layer it served",
        Duration::from_secs(10),
        || async { replica0.blob_path(&local).is_file() },
    )
    .await;
    assert!(
        !replica0.blob_path(&remote).exists(),
        "replica 0 holds {remote} locally, though only replica 1 served it"
    );

    cluster.garage.kill(0);
    let client = reqwest::Client::new();
    let none = AtomicU64::new(0);
    let got = get_blob(&client, &blob_url(&r0, &small.name, &local), &none).await;
    assert!(
        matches!(&got, Got::Body { digest, .. } if *digest == local),
        "replica 0 should serve {local} from its local tier while Garage is down; got {got:?}"
    );
    let got = get_blob(&client, &blob_url(&r0, &many.name, &remote), &none).await;
    assert!(
        matches!(got, Got::Status(503, _)),
        "replica 0 should answer 503 (never 404) for {remote}, which only the bucket holds, \
         while Garage is down; got {got:?}"
    );

    cluster.garage.restart(0).await;
    let url = blob_url(&r0, &many.name, &remote);
    wait_until(
        "replica 0 to serve the bucket's blob once Garage is back",
        Duration::from_secs(60),
        || async { matches!(get_blob(&client, &url, &none).await, Got::Body { .. }) },
    )
    .await;
    let got = get_blob(&client, &url, &none).await;
    assert!(
        matches!(&got, Got::Body { digest, .. } if *digest == remote),
        "replica 0 after Garage came back, for {remote}: {got:?}"
    );
}

/// On a three-node Garage (replication factor 3), one node (not the one the replicas talk to)
/// is killed while the 100 MiB image streams through nginx (its fill held at the gate after
/// 32 MiB until the node is gone): the pull completes with the right digest, and so do pulls of
/// the other images afterwards; the two nodes left hold every blob in the bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_completes_when_a_garage_node_is_lost() {
    let mut cluster = ClusterWorld::start(Setup {
        gate: true,
        garage_nodes: 3,
        ..Setup::default()
    })
    .await;
    let front = cluster.front();
    let big = cluster.image("big");
    let ClusterWorld {
        world,
        garage,
        gate,
        ..
    } = &mut cluster;
    let gate = gate.as_ref().expect("gate");
    gate.hold_after(32 * 1024 * 1024);
    let pull = skopeo_pull(world, &front, big, "big");
    let lose_a_node = async {
        gate.wait_held(Duration::from_secs(120)).await;
        eprintln!("[e2e] killing Garage node 2 mid-pull");
        garage.kill(2);
        gate.release();
    };
    tokio::join!(pull, lose_a_node);
    for short in ["small", "many", "multi"] {
        skopeo_pull(&cluster.world, &front, cluster.image(short), short).await;
    }
    for short in ["big", "small", "many", "multi"] {
        cluster.wait_in_bucket(&cluster.image(short).blobs()).await;
    }
}
