//! Proves the cluster harness without the feature: each part answers as the tests expect, and
//! what the tests read off it (bucket listings and counters, unfinished uploads, the gate's
//! holder, restarts on the same directories and ports) reads what it should. When this fails,
//! the harness or the machine is at fault, not regmirror's cluster mode.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use crate::cluster::world::{ClusterWorld, Setup};
use crate::cluster::{blob_url, get_blob, noise, Got};
use crate::procs::wait_until;
use crate::push::{sha256, Pusher};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_cluster_parts_answer() {
    let mut cluster = ClusterWorld::start(Setup {
        writable: true,
        gate: true,
        ..Setup::default()
    })
    .await;

    // The bucket: a signed put, list and read; an unfinished multipart upload is seen both in
    // the listing and in Garage's counters, and is gone once aborted.
    let s3 = cluster.garage.s3();
    let bytes = noise(3 * 1024 * 1024 + 5, 7);
    let digest = sha256(&bytes);
    let key = format!(
        "harness/blobs/sha256/{}",
        digest.trim_start_matches("sha256:")
    );
    s3.put(&key, &bytes).await;
    let listed = s3.list().await;
    let object = listed
        .iter()
        .find(|o| o.key == key)
        .unwrap_or_else(|| panic!("{key} not listed: {listed:?}"));
    assert_eq!(object.blob_digest(), Some(digest.clone()));
    assert_eq!(object.size, bytes.len() as u64);
    assert_eq!(s3.read(&key).await, (bytes.len() as u64, digest.clone()));
    let upload = s3.begin_multipart("harness/unfinished").await;
    assert_eq!(s3.multipart_uploads().await, vec!["harness/unfinished"]);
    let garage = &cluster.garage;
    wait_until(
        "Garage to count the unfinished upload",
        Duration::from_secs(30),
        || async { garage.bucket_info().await.unfinished_multipart_uploads == 1 },
    )
    .await;
    s3.abort_multipart("harness/unfinished", &upload).await;
    assert!(s3.multipart_uploads().await.is_empty());
    wait_until(
        "Garage to count no unfinished upload",
        Duration::from_secs(30),
        || async { garage.bucket_info().await.unfinished_multipart_uploads == 0 },
    )
    .await;
    // Its counters are those of the listing (the replicas, idle, write nothing meanwhile).
    wait_until(
        "Garage's counters to match the listing",
        Duration::from_secs(30),
        || async {
            let listed = s3.list().await;
            let info = garage.bucket_info().await;
            info.objects == listed.len() as u64
                && info.bytes == listed.iter().map(|o| o.size).sum::<u64>()
        },
    )
    .await;

    // Garage killed and started again on its directories and ports keeps the object.
    cluster.garage.kill(0);
    cluster.garage.restart(0).await;
    assert_eq!(
        cluster.garage.s3().read(&key).await,
        (bytes.len() as u64, digest)
    );

    // Redis killed and started again on its port.
    cluster.redis.kill();
    cluster.redis.restart().await;

    // The gate holds a replica's fill mid-way and names the replica; nginx proxies a blob.
    let pusher = Pusher::new(cluster.upstream(), &cluster.world.issuer, "library/harness");
    let blob = noise(8 * 1024 * 1024, 11);
    let blob_digest = pusher.blob(&blob).await;
    let gate = cluster.gate.as_ref().expect("gate");
    gate.hold_after(1024 * 1024);
    let client = reqwest::Client::new();
    let none = AtomicU64::new(0);
    let url = blob_url(&cluster.replicas[1].addr(), "library/harness", &blob_digest);
    let fetch = get_blob(&client, &url, &none);
    let held = async {
        let pid = gate.wait_held(Duration::from_secs(60)).await;
        gate.release();
        pid
    };
    let (got, pid) = tokio::join!(fetch, held);
    assert_eq!(
        cluster.replica_by_pid(pid),
        1,
        "the replica behind the held fill"
    );
    let want = Got::Body {
        len: blob.len() as u64,
        digest: blob_digest.clone(),
    };
    assert_eq!(got, want, "GET through replica 1 across the gate");
    let url = blob_url(&cluster.front(), "library/harness", &blob_digest);
    assert_eq!(
        get_blob(&client, &url, &none).await,
        want,
        "GET through nginx"
    );
}
