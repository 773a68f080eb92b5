//! The herd: many clients on one cold blob at once, across the replicas. The blob is
//! generated and pushed to a writable upstream: 256 MiB of noise (the figure is 1 GiB;
//! 48 bodies of 256 MiB are 12 GiB hashed by this test on a 2-core machine, which keeps each
//! test near a minute). Clients are plain HTTP GETs (reqwest), hashing what they get.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::cluster::replicas::{names, value};
use crate::cluster::s3::Kind;
use crate::cluster::world::{ClusterWorld, Setup};
use crate::cluster::{blob_url, get_blob, noise, Got};
use crate::procs::wait_until;
use crate::push::{sha256, Pusher};

/// Size of the herd's blob.
const BLOB_BYTES: usize = 256 * 1024 * 1024;
const CLIENTS: usize = 48;
const REPO: &str = "library/herd";

/// Held by each herd test throughout: two herds at once would share 2 cores among 96 clients.
static ONE_HERD_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A cluster in front of a writable upstream (through a gate when `gate`), holding one cold
/// blob of [`BLOB_BYTES`]; returns it with the blob's digest.
async fn cluster_with_cold_blob(gate: bool) -> (ClusterWorld, String) {
    let cluster = ClusterWorld::start(Setup {
        writable: true,
        gate,
        ..Setup::default()
    })
    .await;
    let pusher = Pusher::new(cluster.upstream(), &cluster.world.issuer, REPO);
    let blob = tokio::task::spawn_blocking(|| noise(BLOB_BYTES, 0x4e5d))
        .await
        .expect("noise");
    let digest = pusher.blob(&blob).await;
    (cluster, digest)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("herd client")
}

/// 48 clients through nginx ask for one cold blob at once: each gets all of it with the right
/// digest, and the upstream serves it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_herd_on_one_cold_blob_costs_one_upstream_get() {
    let _one = ONE_HERD_AT_A_TIME.lock().await;
    let (cluster, digest) = cluster_with_cold_blob(false).await;
    let url = blob_url(&cluster.front(), REPO, &digest);
    let client = client();
    // A task each: both of the runtime's threads read and hash.
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move { get_blob(&client, &url, &AtomicU64::new(0)).await })
        })
        .collect();
    let mut got = Vec::new();
    for task in tasks {
        got.push(task.await.expect("client task"));
    }
    let want = Got::Body {
        len: BLOB_BYTES as u64,
        digest: digest.clone(),
    };
    let wrong: Vec<String> = got
        .iter()
        .enumerate()
        .filter(|(_, g)| **g != want)
        .map(|(i, g)| format!("client {i}: {g:?}"))
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {CLIENTS} clients did not get the blob whole:\n  {}\n{}",
        wrong.len(),
        wrong.join("\n  "),
        cluster.logs()
    );
    let gets = cluster.upstream().blob_gets(REPO, &digest);
    assert_eq!(
        gets,
        1,
        "the upstream served the herd's blob {gets} times\n{}\n{}",
        cluster.upstream().logs(),
        cluster.logs()
    );
}

/// One client's outcome: how many requests it made, and what the last one got.
struct Outcome {
    replica: usize,
    attempts: usize,
    got: Got,
}

/// 48 clients, 16 on each replica directly, ask for one cold blob; the replica filling it
/// from the upstream (the lease holder, found as the process on the far end of the fill's
/// connection, held at the gate after 64 MiB) is killed with SIGKILL once every client has
/// received bytes. Every client of the other replicas then has the whole blob with the right
/// digest after at most one retry; the killed replica's clients retry on the next replica, as a
/// load balancer would send them, and get it within two retries (their first retry may join
/// that replica's follow of the killed holder just as it fails). The upstream serves the blob
/// at most twice, and after the killed replica starts again
/// (its start-up cleanup) no multipart upload is left and every blob object in the bucket has
/// the content its name says, read back directly and through a fresh replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_lease_holder_mid_herd_loses_no_client() {
    let _one = ONE_HERD_AT_A_TIME.lock().await;
    let (mut cluster, digest) = cluster_with_cold_blob(true).await;
    let gate = cluster.gate.as_ref().expect("gate");
    gate.hold_after(64 * 1024 * 1024);
    let addrs: Vec<String> = cluster.replicas.iter().map(|r| r.addr()).collect();
    let progress: Arc<Vec<AtomicU64>> = Arc::new((0..CLIENTS).map(|_| AtomicU64::new(0)).collect());
    // Which replica was killed, once it is (`usize::MAX` before).
    let killed = Arc::new(AtomicUsize::new(usize::MAX));
    let client = client();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|k| {
            let (client, addrs, progress, killed, digest) = (
                client.clone(),
                addrs.clone(),
                Arc::clone(&progress),
                Arc::clone(&killed),
                digest.clone(),
            );
            tokio::spawn(async move {
                let replica = k % addrs.len();
                let mut attempts = 0;
                loop {
                    attempts += 1;
                    let to = if killed.load(Ordering::SeqCst) == replica {
                        (replica + 1) % addrs.len()
                    } else {
                        replica
                    };
                    let url = blob_url(&addrs[to], REPO, &digest);
                    let got = get_blob(&client, &url, &progress[k]).await;
                    let whole = matches!(&got, Got::Body { .. });
                    let limit = if killed.load(Ordering::SeqCst) == replica {
                        3
                    } else {
                        2
                    };
                    if whole || attempts >= limit {
                        return Outcome {
                            replica,
                            attempts,
                            got,
                        };
                    }
                    // A retry starts the count of its bytes again.
                    progress[k].store(0, Ordering::SeqCst);
                }
            })
        })
        .collect();

    let pid = gate.wait_held(Duration::from_secs(120)).await;
    let holder = cluster.replica_by_pid(pid);
    wait_until(
        "every client to receive bytes while the fill is held mid-way",
        Duration::from_secs(60),
        || async { progress.iter().all(|p| p.load(Ordering::SeqCst) > 0) },
    )
    .await;
    eprintln!("[e2e] killing replica {holder} (pid {pid}), the lease holder, mid-fill");
    killed.store(holder, Ordering::SeqCst);
    cluster.replicas[holder].kill();
    gate.release();

    let mut outcomes = Vec::new();
    for task in tasks {
        let outcome = tokio::time::timeout(Duration::from_secs(300), task)
            .await
            .expect("a client still waits 300s after the kill")
            .expect("client task");
        outcomes.push(outcome);
    }
    for (who, of_holder) in [("the killed replica's", true), ("the others'", false)] {
        let counts: Vec<usize> = outcomes
            .iter()
            .filter(|o| (o.replica == holder) == of_holder)
            .map(|o| o.attempts)
            .collect();
        eprintln!("[e2e] requests made by each of {who} clients: {counts:?}");
    }
    let want = Got::Body {
        len: BLOB_BYTES as u64,
        digest: digest.clone(),
    };
    let wrong: Vec<String> = outcomes
        .iter()
        .enumerate()
        .filter(|(_, o)| o.got != want)
        .map(|(k, o)| {
            format!(
                "client {k} of replica {} after {} request(s): {:?}",
                o.replica, o.attempts, o.got
            )
        })
        .collect();
    let mut takeovers = 0.0;
    for (i, replica) in cluster.replicas.iter().enumerate() {
        if i != holder {
            takeovers += value(replica, names::LEASE_TAKEOVERS, &[]).await;
        }
    }
    assert!(
        wrong.is_empty(),
        "after the lease holder (replica {holder}) was killed, {} clients did not get the \
         blob whole within one retry (two for the killed replica's; lease takeovers \
         counted: {takeovers}):\n  {}\n{}",
        wrong.len(),
        wrong.join("\n  "),
        cluster.logs()
    );
    let gets = cluster.upstream().blob_gets(REPO, &digest);
    assert!(
        gets <= 2,
        "the upstream served the blob {gets} times (at most 2: the killed fill and one \
         takeover)\n{}",
        cluster.upstream().logs()
    );

    cluster.restart_replica(holder).await;
    let s3 = cluster.garage.s3();
    let garage = &cluster.garage;
    wait_until(
        "no multipart upload (nor its marker) left after the killed replica's restart",
        Duration::from_secs(120),
        || async {
            garage.bucket_info().await.unfinished_multipart_uploads == 0
                && s3.multipart_uploads().await.is_empty()
                && !s3
                    .list()
                    .await
                    .iter()
                    .any(|o| o.kind() == Kind::UploadMarker)
        },
    )
    .await;

    // Every object has the content its name says: blobs hash to their name, manifests (after
    // their media-type line) too; a fresh replica reads each blob back whole.
    let objects = s3.list().await;
    let blobs: Vec<(u64, String)> = objects
        .iter()
        .filter_map(|o| Some((o.size, o.blob_digest()?)))
        .collect();
    assert!(
        blobs.iter().any(|(_, d)| *d == digest),
        "the bucket does not hold the herd's blob {digest}; it holds {objects:?}"
    );
    let mut damaged = Vec::new();
    for object in &objects {
        match object.kind() {
            Kind::Blob(named) => {
                let (len, got) = s3.read(&object.key).await;
                if got != named || len != object.size {
                    damaged.push(format!(
                        "{} ({} bytes listed): read {len} bytes, {got}",
                        object.key, object.size
                    ));
                }
            }
            Kind::Manifest(named) => {
                let bytes = s3.read_bytes(&object.key).await;
                let body = bytes
                    .iter()
                    .position(|b| *b == b'\n')
                    .map_or(&bytes[..0], |n| &bytes[n + 1..]);
                if sha256(body) != named {
                    damaged.push(format!("{}: its bytes are {}", object.key, sha256(body)));
                }
            }
            Kind::UploadMarker | Kind::Other => {}
        }
    }
    assert!(
        damaged.is_empty(),
        "objects in the bucket whose content is not what their name says:\n  {}",
        damaged.join("\n  ")
    );
    let fresh = cluster.start_replica(&[]).await;
    let fresh_addr = cluster.replicas[fresh].addr();
    let none = AtomicU64::new(0);
    for (size, named) in &blobs {
        let got = get_blob(&client, &blob_url(&fresh_addr, REPO, named), &none).await;
        let want = Got::Body {
            len: *size,
            digest: named.clone(),
        };
        assert_eq!(got, want, "a fresh replica reading back {named}");
    }
}
