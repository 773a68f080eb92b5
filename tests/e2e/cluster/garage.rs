//! Garage, the S3-compatible store the replicas share: one node (`garage server --single-node
//! --default-bucket`, the bucket and its key made from `GARAGE_DEFAULT_*`), or three nodes on
//! loopback joined with `garage node connect` and `garage layout assign`/`apply` (replication
//! factor 3). A node is killed with SIGKILL and restarted on the same directories and ports;
//! the bucket's counters are read with `garage json-api GetBucketInfo`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::cluster::s3::S3;
use crate::procs::{free_port, run, run_ok, tail, wait_until, Proc};

/// The bucket every replica shares.
pub const BUCKET: &str = "regmirror";
/// The region Garage's S3 API names (`s3_region`), which requests are signed for.
pub const REGION: &str = "garage";

/// One Garage node: its configuration, ports and process.
pub struct Node {
    pub dir: PathBuf,
    toml: PathBuf,
    pub s3_port: u16,
    /// `server --single-node --default-bucket` with the `GARAGE_DEFAULT_*` variables.
    single: Option<(String, String)>,
    proc: Option<Proc>,
}

/// What `GetBucketInfo` says of the bucket (Garage updates these counters asynchronously).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BucketInfo {
    /// Bytes of the complete objects.
    pub bytes: u64,
    pub objects: u64,
    /// Multipart uploads begun and neither completed nor aborted.
    pub unfinished_multipart_uploads: u64,
}

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

impl Node {
    fn write_config(dir: &Path, rpc_secret: &str, replication: u8) -> Node {
        std::fs::create_dir_all(dir).expect("create garage dir");
        let (rpc_port, s3_port, admin_port) = (free_port(), free_port(), free_port());
        let toml = dir.join("garage.toml");
        std::fs::write(
            &toml,
            format!(
                r#"metadata_dir = "{meta}"
data_dir = "{data}"
db_engine = "sqlite"
replication_factor = {replication}
rpc_bind_addr = "127.0.0.1:{rpc_port}"
rpc_public_addr = "127.0.0.1:{rpc_port}"
rpc_secret = "{rpc_secret}"

[s3_api]
api_bind_addr = "127.0.0.1:{s3_port}"
s3_region = "{REGION}"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:{admin_port}"
"#,
                meta = dir.join("meta").display(),
                data = dir.join("data").display(),
            ),
        )
        .expect("write garage.toml");
        Node {
            dir: dir.to_owned(),
            toml,
            s3_port,
            single: None,
            proc: None,
        }
    }

    /// Writes a configuration in `dir` on free ports and starts the node on it, on other
    /// ports if one of them was taken meanwhile.
    async fn start(
        dir: &Path,
        rpc_secret: &str,
        replication: u8,
        single: Option<(String, String)>,
    ) -> Node {
        for _ in 0..3 {
            let mut node = Node::write_config(dir, rpc_secret, replication);
            node.single = single.clone();
            match node.spawn().await {
                Ok(()) => return node,
                Err(log) if log.to_lowercase().contains("address already in use") => {
                    eprintln!("[e2e] garage lost a port; trying others");
                }
                Err(log) => panic!("garage exited before its S3 API answered; its log:\n{log}"),
            }
        }
        panic!("garage lost one of its ports three times");
    }

    /// Spawns `garage server` on this node's configuration and waits until its S3 API answers
    /// (an unsigned request gets an S3 XML error); `Err` with its log when it exited first.
    async fn spawn(&mut self) -> Result<(), String> {
        let mut cmd = Command::new("garage");
        cmd.arg("-c").arg(&self.toml).arg("server");
        if let Some((key, secret)) = &self.single {
            cmd.args(["--single-node", "--default-bucket"])
                .env("GARAGE_DEFAULT_ACCESS_KEY", key)
                .env("GARAGE_DEFAULT_SECRET_KEY", secret)
                .env("GARAGE_DEFAULT_BUCKET", BUCKET);
        }
        cmd.env("RUST_LOG", "garage=info,netapp=warn");
        let log = self.dir.join("garage.log");
        self.proc = Some(Proc::spawn(
            "garage",
            &mut cmd,
            &log,
            &log,
            Duration::from_secs(5),
        ));
        let url = format!("http://127.0.0.1:{}/", self.s3_port);
        let client = reqwest::Client::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let proc = self.proc.as_mut().expect("garage runs");
            if let Some(status) = proc.exited() {
                let log = tail(&proc.own_log(), 60);
                self.proc = None;
                return Err(format!("(exit {status})\n{log}"));
            }
            if let Ok(resp) = client.get(&url).send().await {
                if resp.text().await.unwrap_or_default().contains("<Error>") {
                    return Ok(());
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "garage's S3 API did not answer GET {url} within 30s; its log:\n{}",
                tail(&proc.own_log(), 60)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `garage -c TOML ARGS`, which reaches the node over its RPC port.
    fn cli(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("garage");
        cmd.arg("-c").arg(&self.toml).args(args);
        cmd
    }

    /// Kills the node with SIGKILL. Its directories stay for a restart.
    pub fn kill(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill();
        }
    }

    /// `json-api ENDPOINT [PAYLOAD]` on this node, parsed; `None` when the call failed (an
    /// endpoint without a request body, such as `GetClusterHealth`, refuses even `{}`).
    async fn json_api(&self, endpoint: &str, payload: Option<&str>) -> Option<Value> {
        let mut cmd = self.cli(&["json-api", endpoint]);
        cmd.args(payload);
        let out = run(&mut cmd, Duration::from_secs(30)).await;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// The bucket's counters, or `None` while the node cannot say.
    async fn try_bucket_info(&self) -> Option<BucketInfo> {
        let v = self
            .json_api(
                "GetBucketInfo",
                Some(&format!(r#"{{"globalAlias":"{BUCKET}"}}"#)),
            )
            .await?;
        let n = |key: &str| v.get(key).and_then(Value::as_u64);
        Some(BucketInfo {
            bytes: n("bytes")?,
            objects: n("objects")?,
            unfinished_multipart_uploads: n("unfinishedMultipartUploads")?,
        })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("garage.log")).unwrap_or_default()
    }
}

/// A running Garage (one node, or three) and the key its bucket grants.
pub struct Garage {
    pub nodes: Vec<Node>,
    pub access_key: String,
    pub secret_key: String,
}

impl Garage {
    /// One node in `dir`: `server --single-node --default-bucket`, waited for until its S3 API
    /// answers and the bucket exists.
    pub async fn single(dir: &Path) -> Garage {
        let access_key = format!("GK{}", random_hex(12));
        let secret_key = random_hex(32);
        let single = Some((access_key.clone(), secret_key.clone()));
        let node = Node::start(dir, &random_hex(32), 1, single).await;
        let garage = Garage {
            nodes: vec![node],
            access_key,
            secret_key,
        };
        garage.wait_for_bucket().await;
        garage
    }

    /// Three nodes in `dir/n0..n2` with replication factor 3: connected to node 0, each given
    /// a role in zone `dc1`, the layout applied; then a key imported and the bucket created
    /// and granted to it. The replicas talk to node 0's S3 API.
    pub async fn three_nodes(dir: &Path) -> Garage {
        let secret = random_hex(32);
        let mut garage = Garage {
            nodes: Vec::new(),
            access_key: format!("GK{}", random_hex(12)),
            secret_key: random_hex(32),
        };
        for i in 0..3 {
            let node = Node::start(&dir.join(format!("n{i}")), &secret, 3, None).await;
            garage.nodes.push(node);
        }
        let mut ids = Vec::new();
        for node in &garage.nodes {
            let out = run_ok(
                &mut node.cli(&["node", "id", "-q"]),
                Duration::from_secs(30),
            )
            .await;
            ids.push(String::from_utf8_lossy(&out.stdout).trim().to_owned());
        }
        let first = &garage.nodes[0];
        for id in &ids[1..] {
            run_ok(
                &mut first.cli(&["node", "connect", id]),
                Duration::from_secs(30),
            )
            .await;
        }
        for id in &ids {
            let short = id.split('@').next().unwrap_or_default();
            run_ok(
                &mut first.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", short]),
                Duration::from_secs(30),
            )
            .await;
        }
        run_ok(
            &mut first.cli(&["layout", "apply", "--version", "1"]),
            Duration::from_secs(30),
        )
        .await;
        wait_until(
            "the Garage cluster to be healthy",
            Duration::from_secs(60),
            || async {
                let health = first.json_api("GetClusterHealth", None).await;
                health.is_some_and(|h| h["status"] == "healthy")
            },
        )
        .await;
        run_ok(
            &mut first.cli(&[
                "key",
                "import",
                "--yes",
                "-n",
                "regmirror",
                &garage.access_key,
                &garage.secret_key,
            ]),
            Duration::from_secs(30),
        )
        .await;
        run_ok(
            &mut first.cli(&["bucket", "create", BUCKET]),
            Duration::from_secs(30),
        )
        .await;
        run_ok(
            &mut first.cli(&[
                "bucket",
                "allow",
                "--read",
                "--write",
                "--owner",
                BUCKET,
                "--key",
                &garage.access_key,
            ]),
            Duration::from_secs(30),
        )
        .await;
        garage.wait_for_bucket().await;
        garage
    }

    /// Waits until node 0 knows the bucket.
    async fn wait_for_bucket(&self) {
        let node = &self.nodes[0];
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while node.try_bucket_info().await.is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "garage did not show bucket {BUCKET} within 30s; its log:\n{}",
                tail(&node.log(), 60)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `http://127.0.0.1:PORT` of node 0's S3 API.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.nodes[0].s3_port)
    }

    /// Kills node `i` with SIGKILL (`kill -9`).
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Starts node `i` again on the same directories and ports, and waits until the bucket
    /// answers again.
    pub async fn restart(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        assert!(node.proc.is_none(), "garage node {i} still runs");
        if let Err(log) = node.spawn().await {
            panic!("garage node {i} did not start again on its directories and ports: {log}");
        }
        self.wait_for_bucket().await;
    }

    /// The bucket's counters as node 0 has them now.
    pub async fn bucket_info(&self) -> BucketInfo {
        self.nodes[0]
            .try_bucket_info()
            .await
            .unwrap_or_else(|| panic!("garage json-api GetBucketInfo {BUCKET} failed"))
    }

    /// A signed S3 client for the bucket, on node 0.
    pub fn s3(&self) -> S3 {
        S3::new(
            &self.endpoint(),
            BUCKET,
            REGION,
            &self.access_key,
            &self.secret_key,
        )
    }

    /// Every replica's `REGMIRROR_STORAGE_*` variables for this bucket.
    pub fn storage_env(&self) -> Vec<(String, String)> {
        [
            ("REGMIRROR_STORAGE_BACKEND", "s3".to_owned()),
            ("REGMIRROR_STORAGE_S3_ENDPOINT", self.endpoint()),
            ("REGMIRROR_STORAGE_S3_BUCKET", BUCKET.to_owned()),
            ("REGMIRROR_STORAGE_S3_REGION", REGION.to_owned()),
            ("REGMIRROR_STORAGE_S3_PATH_STYLE", "true".to_owned()),
            (
                "REGMIRROR_STORAGE_S3_ACCESS_KEY_ID",
                self.access_key.clone(),
            ),
            (
                "REGMIRROR_STORAGE_S3_SECRET_ACCESS_KEY",
                self.secret_key.clone(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }
}
