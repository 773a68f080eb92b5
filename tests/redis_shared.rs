//! The Redis parts of cluster mode against a real `redis-server` (Debian's,
//! started per test on a free loopback port, killed when the test ends; a
//! missing `redis-server` fails the test): the index contract run against both
//! `LocalIndex` and `RedisIndex`, two `RedisCoordinator`s acting as two
//! replicas, and a Redis killed mid-way and restarted on the same port.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use regmirror::cache::store::local_index::LocalIndex;
use regmirror::cache::store::{ContentEntry, ContentKey, Found, Index, TagEntry};
use regmirror::cluster::coordinator::{Coordinator, Lease, RedisCoordinator, Taken};
use regmirror::cluster::redis::RedisConn;
use regmirror::cluster::redis_index::RedisIndex;
use regmirror::config::Secret;
use regmirror::reference::{Digest, RepoName, Tag};

const REDIS_SERVER: &str = "/usr/bin/redis-server";
const PASSWORD: &str = "s3cret-redis-pass";

/// A `redis-server` on a loopback port, with a password, killed on drop.
struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl RedisServer {
    fn start() -> Self {
        // A port the kernel says is free; released for redis-server to bind.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = Self {
            child: None,
            port,
            dir: tempfile::tempdir().unwrap(),
        };
        server.restart();
        server
    }

    /// Starts it (again) on its port and waits until it answers.
    fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new(REDIS_SERVER)
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--requirepass", PASSWORD])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {REDIS_SERVER} (apt-get install redis-server): {e}")
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.answers() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("redis-server on port {} exited: {status}", self.port);
            }
            assert!(Instant::now() < deadline, "redis-server did not answer");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether it answers an authenticated PING.
    fn answers(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        if s.write_all(format!("AUTH {PASSWORD}\r\nPING\r\n").as_bytes())
            .is_err()
        {
            return false;
        }
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while !got.ends_with(b"+PONG\r\n") {
            match s.read(&mut buf) {
                Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
                _ => return false,
            }
        }
        true
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self) -> Secret {
        Secret::new(format!("redis://:{PASSWORD}@127.0.0.1:{}/", self.port))
    }

    async fn conn(&self) -> RedisConn {
        RedisConn::connect(&self.url()).await.unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Fails the test if `f` does not return at all within a generous bound
/// (the calls themselves time out after 2 s).
async fn returns<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .expect("the call never returned")
}

fn digest(n: u8) -> Digest {
    Digest::parse(&format!("sha256:{}", format!("{n:02x}").repeat(32))).unwrap()
}

fn repo(s: &str) -> RepoName {
    RepoName::parse(s).unwrap()
}

fn tag(s: &str) -> Tag {
    Tag::parse(s).unwrap()
}

/// Whole milliseconds: the Redis index keeps access times to the ms.
fn at(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(1_700_000_000_000 + ms)
}

fn tag_entry(d: &Digest, checked: u64) -> TagEntry {
    TagEntry {
        digest: d.clone(),
        media_type: Some("application/vnd.oci.image.manifest.v1+json".into()),
        size: Some(1234),
        checked_at: at(checked),
    }
}

fn entry(size: u64, ms: u64) -> ContentEntry {
    ContentEntry {
        size,
        last_access: at(ms),
    }
}

async fn sorted_contents(idx: &dyn Index) -> Vec<(ContentKey, ContentEntry)> {
    let mut c = idx.contents().await;
    c.sort_by(|a, b| a.0.cmp(&b.0));
    c
}

/// What every `Index` must do, whatever keeps it.
async fn contract(idx: &dyn Index) {
    let r = repo("docker/library/alpine");
    let blob = ContentKey::blob(&digest(1));

    // record, touch, entry; touch never inserts; record replaces.
    idx.record(&blob, 10, at(1)).await;
    assert_eq!(idx.entry(&blob).await, Some(entry(10, 1)));
    idx.touch(&blob, at(2)).await;
    assert_eq!(idx.entry(&blob).await, Some(entry(10, 2)));
    let absent = ContentKey::blob(&digest(99));
    idx.touch(&absent, at(2)).await;
    assert_eq!(idx.entry(&absent).await, None, "a touch added an entry");
    idx.record(&blob, 20, at(3)).await;
    assert_eq!(idx.entry(&blob).await, Some(entry(20, 3)));

    // forget_if only while the entry is exactly the one seen.
    assert!(!idx.forget_if(&blob, entry(20, 2)).await);
    assert!(!idx.forget_if(&blob, entry(10, 3)).await);
    assert!(!idx.forget_if(&absent, entry(20, 3)).await);
    assert!(idx.forget_if(&blob, entry(20, 3)).await);
    assert_eq!(idx.entry(&blob).await, None);
    assert!(idx.contents().await.is_empty());

    // Forgetting a manifest takes its memberships and tags; others stay.
    let (m, layer) = (digest(2), digest(3));
    idx.add_holds(&r, vec![m.clone(), layer.clone()]).await;
    idx.record(&ContentKey::manifest(&m), 500, at(4)).await;
    idx.record(&ContentKey::blob(&layer), 7000, at(5)).await;
    idx.set_tag(&r, &tag("latest"), tag_entry(&m, 4)).await;
    idx.set_tag_list(&r, vec![tag("latest"), tag("3")]).await;
    assert!(idx.holds(&r, &m).await);
    assert!(!idx.holds(&repo("other"), &m).await);
    assert_eq!(idx.tag(&r, &tag("latest")).await, Some(tag_entry(&m, 4)));
    assert_eq!(
        idx.tags().await,
        vec![(r.clone(), tag("latest"), tag_entry(&m, 4))]
    );
    assert_eq!(idx.repositories().await, vec![r.clone()]);
    assert_eq!(
        sorted_contents(idx).await,
        vec![
            (ContentKey::blob(&layer), entry(7000, 5)),
            (ContentKey::manifest(&m), entry(500, 4)),
        ]
    );

    idx.forget(&ContentKey::manifest(&m)).await;
    assert!(!idx.holds(&r, &m).await);
    assert_eq!(idx.tag(&r, &tag("latest")).await, None);
    assert!(
        idx.holds(&r, &layer).await,
        "another digest's membership stays"
    );
    assert_eq!(
        idx.tag_list(&r).await,
        Some(vec![tag("latest"), tag("3")]),
        "kept while the repository holds something"
    );
    idx.forget(&ContentKey::blob(&layer)).await;
    assert!(!idx.holds(&r, &layer).await);
    assert_eq!(
        idx.tag_list(&r).await,
        None,
        "nothing left of the repository"
    );
    assert!(idx.repositories().await.is_empty());

    // A digest stored as both kinds keeps its memberships until both go.
    let both = digest(4);
    let r2 = repo("ghcr/org/app");
    idx.record(&ContentKey::blob(&both), 1, at(6)).await;
    idx.record(&ContentKey::manifest(&both), 2, at(6)).await;
    idx.add_holds(&r2, vec![both.clone()]).await;
    idx.forget(&ContentKey::manifest(&both)).await;
    assert!(idx.holds(&r2, &both).await);
    idx.forget(&ContentKey::blob(&both)).await;
    assert!(!idx.holds(&r2, &both).await);

    // A tag moved to another manifest is not the old one's to take.
    let (old, new) = (digest(5), digest(6));
    idx.record(&ContentKey::manifest(&old), 3, at(7)).await;
    idx.set_tag(&r2, &tag("v1"), tag_entry(&old, 7)).await;
    idx.set_tag(&r2, &tag("v1"), tag_entry(&new, 8)).await;
    idx.forget(&ContentKey::manifest(&old)).await;
    assert_eq!(idx.tag(&r2, &tag("v1")).await, Some(tag_entry(&new, 8)));
    idx.remove_tag(&r2, &tag("v1")).await;
    assert_eq!(idx.tag(&r2, &tag("v1")).await, None);
    assert!(idx.repositories().await.is_empty());

    // A tag list alone makes a repository known.
    idx.set_tag_list(&r2, vec![tag("v2")]).await;
    assert_eq!(idx.repositories().await, vec![r2.clone()]);

    // A scan: what was recorded meanwhile stays, unknown items are added,
    // known items the scan did not find are forgotten.
    let (kept, gone, during, found) = (digest(7), digest(8), digest(9), digest(10));
    idx.record(&ContentKey::blob(&kept), 100, at(10)).await;
    idx.record(&ContentKey::blob(&gone), 200, at(10)).await;
    let mark = idx.begin_scan().await;
    idx.record(&ContentKey::blob(&during), 300, at(11)).await;
    let scan = vec![
        Found {
            key: ContentKey::blob(&kept),
            size: 100,
            modified: at(0),
        },
        Found {
            key: ContentKey::blob(&found),
            size: 400,
            modified: at(9),
        },
    ];
    idx.reconcile(mark, scan.clone()).await;
    assert_eq!(
        sorted_contents(idx).await,
        vec![
            // Known: keeps what was recorded, not the scan's size and time.
            (ContentKey::blob(&kept), entry(100, 10)),
            (ContentKey::blob(&during), entry(300, 11)),
            (ContentKey::blob(&found), entry(400, 9)),
        ],
        "{gone} should be forgotten"
    );

    // A superseded mark's reconcile does nothing.
    let first = idx.begin_scan().await;
    let second = idx.begin_scan().await;
    idx.reconcile(first, Vec::new()).await;
    assert_eq!(idx.contents().await.len(), 3);
    idx.reconcile(second, scan).await;
    assert_eq!(
        sorted_contents(idx).await,
        vec![
            (ContentKey::blob(&kept), entry(100, 10)),
            (ContentKey::blob(&found), entry(400, 9)),
        ]
    );
}

#[tokio::test]
async fn the_index_contract_holds_for_the_local_index() {
    contract(&LocalIndex::in_memory()).await;
}

#[tokio::test]
async fn the_index_contract_holds_for_the_redis_index() {
    let server = RedisServer::start();
    let idx = RedisIndex::new(server.conn().await, "test-contract");
    contract(&idx).await;
    assert!(idx.health().is_up());
    assert_eq!(idx.health().errors(), 0);
}

#[tokio::test]
async fn the_redis_index_counts_total_bytes_and_lists_the_oldest() {
    let server = RedisServer::start();
    let conn = server.conn().await;
    let idx = RedisIndex::new(conn.clone(), "test-total");
    let other = RedisIndex::new(conn, "test-total-other");
    let (a, b, c) = (
        ContentKey::blob(&digest(1)),
        ContentKey::manifest(&digest(2)),
        ContentKey::blob(&digest(3)),
    );
    idx.record(&a, 100, at(30)).await;
    idx.record(&b, 20, at(10)).await;
    idx.record(&c, 3, at(20)).await;
    assert_eq!(idx.total_bytes().await.unwrap(), 123);
    idx.record(&a, 50, at(40)).await;
    assert_eq!(idx.total_bytes().await.unwrap(), 73, "a record replaces");
    idx.touch(&b, at(50)).await;
    assert_eq!(
        idx.oldest(2).await.unwrap(),
        vec![(c.clone(), entry(3, 20)), (a.clone(), entry(50, 40))]
    );
    assert_eq!(idx.oldest(10).await.unwrap().len(), 3);
    assert!(idx.oldest(0).await.unwrap().is_empty());
    assert!(idx.forget_if(&c, entry(3, 20)).await);
    idx.forget(&a).await;
    idx.forget(&a).await;
    assert_eq!(idx.total_bytes().await.unwrap(), 20);
    let sum: u64 = idx.contents().await.iter().map(|(_, e)| e.size).sum();
    assert_eq!(sum, 20);
    // Another prefix is another index.
    assert_eq!(other.total_bytes().await.unwrap(), 0);
    assert!(other.contents().await.is_empty());
}

#[tokio::test]
async fn two_replicas_share_tags_and_memberships_through_redis() {
    use regmirror::cluster::shared_index::SharedIndex;
    use std::sync::Arc;

    let server = RedisServer::start();
    let shared_a: Arc<dyn Index> = Arc::new(RedisIndex::new(server.conn().await, "test-replicas"));
    let shared_b: Arc<dyn Index> = Arc::new(RedisIndex::new(server.conn().await, "test-replicas"));
    let a = SharedIndex::new(Arc::new(LocalIndex::in_memory()), shared_a);
    let b = SharedIndex::new(Arc::new(LocalIndex::in_memory()), shared_b);
    let (r, t) = (repo("docker/library/alpine"), tag("3"));
    b.set_tag(&r, &t, tag_entry(&digest(1), 0)).await;
    a.set_tag(&r, &t, tag_entry(&digest(2), 100)).await;
    assert_eq!(b.tag(&r, &t).await, Some(tag_entry(&digest(2), 100)));
    a.add_holds(&r, vec![digest(2)]).await;
    assert!(b.holds(&r, &digest(2)).await);
    a.set_tag_list(&r, vec![t.clone()]).await;
    assert_eq!(b.tag_list(&r).await, Some(vec![t.clone()]));
    assert_eq!(b.repositories().await, vec![r]);
}

fn mine(t: Taken) -> Lease {
    match t {
        Taken::Mine(lease) => lease,
        Taken::Held { holder, .. } => panic!("held by {holder}"),
    }
}

#[tokio::test]
async fn two_replicas_coordinate_over_redis() {
    let server = RedisServer::start();
    // Two replicas: each its own connection.
    let a = RedisCoordinator::new(server.conn().await, "test-coord");
    let b = RedisCoordinator::new(server.conn().await, "test-coord");
    let ttl = Duration::from_secs(30);
    let d = digest(1);

    let la = mine(a.take(&d, "http://a:5000", ttl).await.unwrap());
    match b.take(&d, "http://b:5000", ttl).await.unwrap() {
        Taken::Held { holder, token } => {
            assert_eq!(holder, "http://a:5000");
            assert_eq!(token, la.token);
        }
        Taken::Mine(_) => panic!("taken twice"),
    }
    assert!(a.renew(&la, ttl).await.unwrap());
    // Another digest, another prefix: other leases.
    mine(b.take(&digest(2), "http://b:5000", ttl).await.unwrap());
    let elsewhere = RedisCoordinator::new(server.conn().await, "test-coord-other");
    mine(elsewhere.take(&d, "http://c:5000", ttl).await.unwrap());

    // Takeover only with the token still the one seen.
    assert_eq!(
        b.take_over(&d, "not-it", "http://b:5000", ttl)
            .await
            .unwrap(),
        None
    );
    let lb = b
        .take_over(&d, &la.token, "http://b:5000", ttl)
        .await
        .unwrap()
        .unwrap();
    assert_ne!(lb.token, la.token);
    assert_eq!(
        a.take_over(&d, &la.token, "http://a:5000", ttl)
            .await
            .unwrap(),
        None
    );
    // The old holder can neither renew nor release it.
    assert!(!a.renew(&la, ttl).await.unwrap());
    a.release(&la).await.unwrap();
    match a.take(&d, "http://a:5000", ttl).await.unwrap() {
        Taken::Held { holder, .. } => assert_eq!(holder, "http://b:5000"),
        Taken::Mine(_) => panic!("a stale release freed the lease"),
    }
    b.release(&lb).await.unwrap();
    let again = mine(a.take(&d, "http://a:5000", ttl).await.unwrap());
    assert_ne!(again.token, la.token);

    // An expired lease is free to take, and its old token is stale.
    let d3 = digest(3);
    let short = mine(
        a.take(&d3, "http://a:5000", Duration::from_millis(100))
            .await
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let taken = loop {
        if let Taken::Mine(lease) = b.take(&d3, "http://b:5000", ttl).await.unwrap() {
            break lease;
        }
        assert!(Instant::now() < deadline, "the lease never expired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(!a.renew(&short, ttl).await.unwrap());
    a.release(&short).await.unwrap();
    assert!(b.renew(&taken, ttl).await.unwrap());

    // A lock has one holder at a time.
    let lock = a
        .lock("evict", "http://a:5000", ttl)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(b.lock("evict", "http://b:5000", ttl).await.unwrap(), None);
    assert!(b
        .lock("other", "http://b:5000", ttl)
        .await
        .unwrap()
        .is_some());
    assert!(a.renew(&lock, ttl).await.unwrap());
    a.release(&lock).await.unwrap();
    assert!(b
        .lock("evict", "http://b:5000", ttl)
        .await
        .unwrap()
        .is_some());

    // Peers: those announced within the window.
    let now = SystemTime::now();
    a.announce("http://a:5000", now - Duration::from_secs(120))
        .await
        .unwrap();
    b.announce("http://b:5000", now).await.unwrap();
    let peers = a.peers(now, Duration::from_secs(60)).await.unwrap();
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].0, "http://b:5000");
    a.announce("http://a:5000", now).await.unwrap();
    let names: Vec<String> = b
        .peers(now, Duration::from_secs(60))
        .await
        .unwrap()
        .into_iter()
        .map(|(h, _)| h)
        .collect();
    assert_eq!(names, ["http://a:5000", "http://b:5000"]);
    assert!(a.health().is_up() && b.health().is_up());
}

#[tokio::test]
async fn a_stopped_redis_costs_answers_not_hangs_and_a_restart_is_picked_up() {
    let mut server = RedisServer::start();
    let conn = server.conn().await;
    let idx = RedisIndex::new(conn.clone(), "test-outage");
    let coord = RedisCoordinator::new(conn, "test-outage");
    let health = idx.health();
    let (r, d) = (repo("r"), digest(1));
    idx.add_holds(&r, vec![d.clone()]).await;
    idx.record(&ContentKey::blob(&d), 5, at(1)).await;
    assert!(idx.holds(&r, &d).await);
    assert!(health.is_up());

    server.stop();

    // Every call returns, reads answer empty, writes are dropped.
    assert!(!returns(idx.holds(&r, &d)).await);
    assert_eq!(returns(idx.entry(&ContentKey::blob(&d))).await, None);
    assert!(returns(idx.contents()).await.is_empty());
    assert!(returns(idx.repositories()).await.is_empty());
    assert_eq!(returns(idx.tag(&r, &tag("x"))).await, None);
    returns(idx.set_tag(&r, &tag("x"), tag_entry(&d, 1))).await;
    assert!(!returns(idx.forget_if(&ContentKey::blob(&d), entry(5, 1))).await);
    assert!(returns(idx.total_bytes()).await.is_err());
    let e = returns(coord.take(&d, "http://a", Duration::from_secs(30)))
        .await
        .unwrap_err();
    assert_eq!(e.part, "redis");
    assert!(!e.message.contains(PASSWORD), "{}", e.message);

    assert!(!health.is_up());
    // The first failed call counts; those right after it are not sent to
    // a Redis that just failed (see the silent-Redis test).
    assert!(
        coord.health().errors() >= 1,
        "errors counted: {}",
        health.errors()
    );
    let last = health.last_error().unwrap();
    assert!(!last.contains(PASSWORD), "{last}");

    server.restart();

    // The connection manager reconnects: the next calls succeed.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answered = returns(idx.total_bytes()).await.is_ok();
        if answered {
            break;
        }
        assert!(Instant::now() < deadline, "Redis never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(health.is_up());
    // A fresh Redis (nothing was saved): writes land again.
    idx.add_holds(&r, vec![d.clone()]).await;
    assert!(idx.holds(&r, &d).await);
    mine(
        coord
            .take(&d, "http://a", Duration::from_secs(30))
            .await
            .unwrap(),
    );
}

#[tokio::test]
async fn a_redis_that_stops_answering_times_calls_out() {
    let server = RedisServer::start();
    let idx = RedisIndex::new(server.conn().await, "test-silent");
    let (r, d) = (repo("r"), digest(1));
    idx.add_holds(&r, vec![d.clone()]).await;
    assert!(idx.holds(&r, &d).await);

    // SIGSTOP: connections stay open, nothing answers.
    let pid = server.child.as_ref().unwrap().id().to_string();
    let signal = |sig: &str| {
        let status = Command::new("kill").args([sig, &pid]).status().unwrap();
        assert!(status.success());
    };
    signal("-STOP");
    assert!(!returns(idx.holds(&r, &d)).await);
    assert!(!idx.health().is_up());
    let e = returns(idx.total_bytes()).await.unwrap_err();
    assert!(!e.message.contains(PASSWORD), "{}", e.message);
    // Right after a timeout, calls are refused without asking a Redis that
    // does not answer: one timeout, not one per call.
    let errors = idx.health().errors();
    let e = returns(idx.total_bytes()).await.unwrap_err();
    assert!(e.message.starts_with("not asked"), "{}", e.message);
    assert_eq!(
        idx.health().errors(),
        errors,
        "a call not sent counted as a failure"
    );
    signal("-CONT");

    let deadline = Instant::now() + Duration::from_secs(30);
    while !returns(idx.holds(&r, &d)).await {
        assert!(Instant::now() < deadline, "Redis never answered again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(idx.health().is_up());
}
