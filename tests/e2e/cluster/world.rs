//! One cluster test's world: the e2e [`World`] (temporary directory, token issuer,
//! docker-registry upstream), Garage, Redis, N replicas sharing them and nginx round-robin in
//! front of the replicas. The upstream is the fixture's, or (`writable`) a second, empty
//! registry the test pushes its own content to; with `gate`, the replicas reach it through a
//! [`Gate`]. Dropping it stops nginx, the replicas, Redis, Garage, then the upstream.

use std::time::Duration;

use crate::cluster::garage::Garage;
use crate::cluster::gate::Gate;
use crate::cluster::nginx::Nginx;
use crate::cluster::redis::Redis;
use crate::cluster::replicas;
use crate::fixture::Image;
use crate::mirror::Mirror;
use crate::upstream::Upstream;
use crate::world::World;

/// How a test's cluster is made.
pub struct Setup {
    pub replicas: usize,
    /// Replicas in front of a second, writable registry (empty) instead of the fixture's.
    pub writable: bool,
    /// Replicas reach the upstream through a [`Gate`].
    pub gate: bool,
    /// Three Garage nodes (replication factor 3) instead of one.
    pub garage_nodes: usize,
    /// More `REGMIRROR_*` variables for every replica (e.g. `REGMIRROR_STORAGE_MAX_SIZE`).
    pub env: Vec<(String, String)>,
    /// Client tools the test uses besides skopeo (e.g. dockerd).
    pub tools: Vec<&'static str>,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            replicas: 3,
            writable: false,
            gate: false,
            garage_nodes: 1,
            env: Vec::new(),
            tools: Vec::new(),
        }
    }
}

impl Setup {
    /// Default setup plus `env` for every replica.
    pub fn env(env: &[(&str, &str)]) -> Setup {
        Setup {
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Setup::default()
        }
    }
}

pub struct ClusterWorld {
    // Fields drop in this order: the front first, the shared parts after the replicas that use
    // them, the upstream and the files (`world`) last.
    pub nginx: Option<Nginx>,
    pub replicas: Vec<Mirror>,
    pub redis: Redis,
    pub garage: Garage,
    pub gate: Option<Gate>,
    /// Every replica's variables: bucket, Redis, secret, the setup's.
    env: Vec<(String, String)>,
    /// The upstream URL the replicas are given (the gate's, with one).
    upstream_url: String,
    pub world: World,
}

impl ClusterWorld {
    /// The `cluster.secret` every replica was given.
    pub fn secret(&self) -> String {
        self.env
            .iter()
            .find(|(k, _)| k == "REGMIRROR_CLUSTER_SECRET")
            .map(|(_, v)| v.clone())
            .expect("the replicas' secret")
    }

    /// Starts everything `setup` says, replicas and nginx included, and waits until each
    /// answers.
    pub async fn start(setup: Setup) -> ClusterWorld {
        let mut tools = vec!["garage", "redis-server", "nginx", "ss"];
        tools.extend_from_slice(&setup.tools);
        let mut world = World::upstream_only(&tools).await;
        if setup.writable {
            world.start_second_upstream().await;
        }
        let upstream = if setup.writable {
            world.second()
        } else {
            &world.upstream
        };
        let gate = if setup.gate {
            Some(Gate::start(upstream.port).await)
        } else {
            None
        };
        let upstream_url = gate.as_ref().map_or_else(|| upstream.url(), |g| g.url());
        let garage = match setup.garage_nodes {
            1 => Garage::single(&world.dir("garage")).await,
            3 => Garage::three_nodes(&world.dir("garage")).await,
            n => panic!("a Garage of {n} nodes is not set up here (1 or 3)"),
        };
        let redis = Redis::start(&world.dir("redis")).await;
        let secret: String = (0..32)
            .map(|_| char::from(b'a' + rand::random::<u8>() % 26))
            .collect();
        let mut env = garage.storage_env();
        env.push(("REGMIRROR_CLUSTER_REDIS".into(), redis.url()));
        env.push(("REGMIRROR_CLUSTER_SECRET".into(), secret));
        env.extend(setup.env.iter().cloned());
        let mut cluster = ClusterWorld {
            nginx: None,
            replicas: Vec::new(),
            redis,
            garage,
            gate,
            env,
            upstream_url,
            world,
        };
        for _ in 0..setup.replicas {
            cluster.start_replica(&[]).await;
        }
        let ports: Vec<u16> = cluster.replicas.iter().map(|r| r.port).collect();
        cluster.nginx = Some(Nginx::start(&cluster.world.dir("nginx"), &ports).await);
        cluster
    }

    /// Starts one more replica on an empty data directory of its own, with `extra` variables;
    /// returns its index (it is not behind nginx).
    pub async fn start_replica(&mut self, extra: &[(&str, &str)]) -> usize {
        let i = self.replicas.len();
        let mut env = self.env.clone();
        env.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        let dir = self.world.dir(&format!("replica{i}"));
        let replica = replicas::start(&dir, &self.upstream_url, &env, None).await;
        self.replicas.push(replica);
        i
    }

    /// Starts replica `i` again (after a kill) on its data directory and port: the same
    /// replica to nginx and to its peers, as a restarted service is.
    pub async fn restart_replica(&mut self, i: usize) {
        let dir = self.world.dir(&format!("replica{i}"));
        let port = Some(self.replicas[i].port);
        self.replicas[i] = replicas::start(&dir, &self.upstream_url, &self.env, port).await;
    }

    /// The replica whose process is `pid`.
    pub fn replica_by_pid(&self, pid: u32) -> usize {
        self.replicas
            .iter()
            .position(|r| r.pid() == Some(pid))
            .unwrap_or_else(|| panic!("process {pid} is none of the replicas"))
    }

    /// `127.0.0.1:PORT` of nginx, the cluster's one address.
    pub fn front(&self) -> String {
        self.nginx.as_ref().expect("nginx runs").addr()
    }

    /// The registry the replicas fill from (the fixture's, or the writable one).
    pub fn upstream(&self) -> &Upstream {
        self.world.second.as_ref().unwrap_or(&self.world.upstream)
    }

    pub fn image(&self, short: &str) -> &'static Image {
        self.world.image(short)
    }

    /// Every replica's log (the last lines of each), for failure messages.
    pub fn logs(&self) -> String {
        self.replicas
            .iter()
            .enumerate()
            .map(|(i, r)| {
                format!(
                    "--- replica {i} ({}) ---\n{}",
                    r.addr(),
                    crate::procs::tail(&r.log(), 40)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Asserts that the upstream answered a GET for each of `blobs` exactly once, for the
    /// whole cluster.
    pub fn assert_fetched_once(&self, image: &Image, blobs: &[String], when: &str) {
        let wrong: Vec<String> = blobs
            .iter()
            .map(|b| (b, self.upstream().blob_gets(&image.name, b)))
            .filter(|(_, n)| *n != 1)
            .map(|(b, n)| format!("{b}: {n}"))
            .collect();
        assert!(
            wrong.is_empty(),
            "{when}: the upstream should have served each blob of {} once for the whole \
             cluster; these were off:\n  {}\n{}\n{}",
            image.name,
            wrong.join("\n  "),
            self.upstream().logs(),
            self.logs()
        );
    }

    /// Waits until each of `blobs` is in the bucket (a fill's upload completes after its last
    /// byte went out), listing it as its operator would.
    pub async fn wait_in_bucket(&self, blobs: &[String]) {
        let s3 = self.garage.s3();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let held: Vec<String> = s3
                .list()
                .await
                .iter()
                .filter_map(|o| o.blob_digest())
                .collect();
            let missing: Vec<&String> = blobs.iter().filter(|b| !held.contains(b)).collect();
            if missing.is_empty() {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the bucket lacks blobs the cluster served, 30s after: {missing:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
