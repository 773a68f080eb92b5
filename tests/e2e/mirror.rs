//! The mirror under test: the `regmirror` binary cargo built, started on a free port with a
//! data directory of its own and no `REGMIRROR_*` variables from the environment; stopped
//! with SIGTERM and started again on the same data directory; and its access log parsed so
//! tests can tell what the mirror itself served.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::procs::{serve_on_free_port_via, serve_on_port_via, Proc};

/// How a mirror is started besides its listen address, data dir and upstream (always flags).
#[derive(Clone)]
pub struct Options {
    /// Its only `REGMIRROR_*` variables.
    pub env: Vec<(String, String)>,
    /// `--config FILE`.
    pub config: Option<PathBuf>,
    /// `--offline`.
    pub offline: bool,
    /// For a mirror with `[tls]`: a client that trusts its certificate, to see it is ready.
    pub https: Option<reqwest::Client>,
    /// What `GET /v2/` answers once it is ready: 200, or 401 when it requires users.
    pub ready_status: u16,
    /// A variable set to the mirror's own URL, `http://127.0.0.1:PORT` (its port is known only
    /// once it is picked): `REGMIRROR_CLUSTER_ADVERTISE` for a replica of a cluster.
    pub own_url_env: Option<String>,
    /// Listen on this port rather than a free one (started again on the address it had).
    pub port: Option<u16>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            env: Vec::new(),
            config: None,
            offline: false,
            https: None,
            ready_status: 200,
            own_url_env: None,
            port: None,
        }
    }
}

impl Options {
    /// Default options with `env` as the mirror's `REGMIRROR_*` variables.
    pub fn env(env: &[(&str, &str)]) -> Options {
        Options {
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Options::default()
        }
    }
}

pub struct Mirror {
    pub port: u16,
    pub data_dir: PathBuf,
    log: PathBuf,
    proc: Proc,
}

/// One line of the mirror's access log (`regmirror::access`): a request it answered.
#[derive(Clone, Debug)]
pub struct Served {
    pub method: String,
    pub path: String,
    pub status: u16,
    /// `hit`, `miss`, `coalesced` or `-`.
    pub cache: String,
    /// `complete`, `client-gone` or `aborted`.
    pub body: String,
}

impl Mirror {
    /// Starts `regmirror serve` in `dir` (data in `dir/data`, log appended to
    /// `dir/regmirror.log`) in front of `upstream`, as `opts` say.
    pub async fn start_with(dir: &Path, upstream: &str, opts: &Options) -> Mirror {
        std::fs::create_dir_all(dir).expect("create mirror dir");
        let data_dir = dir.join("data");
        let log = dir.join("regmirror.log");
        let spawn = |port: u16| {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_regmirror"));
            cmd.arg("serve");
            if let Some(config) = &opts.config {
                cmd.arg("--config").arg(config);
            }
            cmd.arg("--listen")
                .arg(format!("127.0.0.1:{port}"))
                .arg("--data-dir")
                .arg(&data_dir)
                .arg("--upstream")
                .arg(upstream)
                .current_dir(dir)
                .env("RUST_BACKTRACE", "1");
            if opts.offline {
                cmd.arg("--offline");
            }
            if std::env::var_os("RUST_LOG").is_none() {
                cmd.env("RUST_LOG", "regmirror=debug,info");
            }
            for (key, _) in std::env::vars_os() {
                if key.to_string_lossy().starts_with("REGMIRROR_") {
                    cmd.env_remove(key);
                }
            }
            cmd.envs(opts.env.iter().map(|(k, v)| (k, v)));
            if let Some(key) = &opts.own_url_env {
                cmd.env(key, format!("http://127.0.0.1:{port}"));
            }
            Proc::spawn("regmirror", &mut cmd, &log, &log, Duration::from_secs(5))
        };
        let (scheme, client) = match &opts.https {
            Some(client) => ("https", client.clone()),
            None => ("http", reqwest::Client::new()),
        };
        let (port, proc) = match opts.port {
            Some(port) => {
                serve_on_port_via(&client, scheme, "/v2/", opts.ready_status, port, spawn).await
            }
            None => serve_on_free_port_via(&client, scheme, "/v2/", opts.ready_status, spawn).await,
        };
        Mirror {
            port,
            data_dir,
            log,
            proc,
        }
    }

    /// Stops the mirror as a service manager does (SIGTERM) and asserts that it exited
    /// cleanly within 20 s, which is when it writes its index.
    pub async fn terminate(&mut self) {
        let status = self.proc.terminate(Duration::from_secs(20)).await;
        assert!(
            status.is_some_and(|s| s.success()),
            "the mirror did not exit cleanly within 20s of SIGTERM (status {status:?}); \
             its log:\n{}",
            crate::procs::tail(&self.proc.own_log(), 60)
        );
    }

    /// Kills the mirror with SIGKILL, as `kill -9` or a lost machine does: no cleanup of any
    /// kind. Its log stays readable.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// The mirror's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// `127.0.0.1:PORT`, as clients name the mirror.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Where the mirror keeps blob `digest`: `DATA/blobs/sha256/<2 hex>/<64 hex>`.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        self.data_dir.join("blobs/sha256").join(&hex[..2]).join(hex)
    }

    /// The mirror's log so far, earlier runs on the same directory included.
    pub fn log(&self) -> String {
        self.proc.log_text()
    }

    /// What this process of the mirror logged (not earlier runs on the same directory).
    pub fn own_log(&self) -> String {
        self.proc.own_log()
    }

    /// A mark in the log: [`Mirror::served_since`] returns what was served after it.
    pub fn log_mark(&self) -> usize {
        std::fs::metadata(&self.log).map_or(0, |m| m.len() as usize)
    }

    /// The requests the mirror logged after `mark`.
    pub fn served_since(&self, mark: usize) -> Vec<Served> {
        let text = self.log();
        text.get(mark..)
            .unwrap_or_default()
            .lines()
            .filter_map(parse_access_line)
            .collect()
    }

    /// Asserts that since `mark` the mirror answered `GET /v2/<name>/blobs/<digest>` with 200
    /// and a complete body, for each of `blobs`; with `cache`, that each was such a hit/miss.
    pub fn assert_served_blobs(&self, mark: usize, name: &str, blobs: &[String], cache: &str) {
        let served = self.served_since(mark);
        let missing: Vec<&String> = blobs
            .iter()
            .filter(|b| {
                let path = format!("/v2/{name}/blobs/{b}");
                !served.iter().any(|s| {
                    s.method == "GET"
                        && s.path == path
                        && s.status == 200
                        && s.body == "complete"
                        && (cache.is_empty() || s.cache == cache)
                })
            })
            .collect();
        assert!(
            missing.is_empty(),
            "the mirror's log shows no complete `GET /v2/{name}/blobs/..` 200 \
             (cache={cache:?}) for {missing:?}; what it served:\n{}",
            served
                .iter()
                .map(|s| format!("  {s:?}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// Parses `... INFO regmirror::access: request method=GET path=/v2/ status=200 bytes=2
/// cache="-" body="complete" ms=9`.
fn parse_access_line(line: &str) -> Option<Served> {
    let (_, fields) = line.split_once("regmirror::access: request ")?;
    let field = |key: &str| {
        fields
            .split_whitespace()
            .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
            .map(|v| v.trim_matches('"').to_owned())
    };
    Some(Served {
        method: field("method")?,
        path: field("path")?,
        status: field("status")?.parse().ok()?,
        cache: field("cache").unwrap_or_default(),
        body: field("body").unwrap_or_default(),
    })
}

#[test]
fn parses_access_lines() {
    let line = "2026-11-23T12:51:19.307208Z  INFO regmirror::access: request method=GET \
                path=/v2/library/a/blobs/sha256:ab status=200 bytes=2 cache=\"hit\" \
                body=\"complete\" ms=9";
    let s = parse_access_line(line).expect("parsed");
    assert_eq!(
        (s.method.as_str(), s.path.as_str(), s.status),
        ("GET", "/v2/library/a/blobs/sha256:ab", 200)
    );
    assert_eq!((s.cache.as_str(), s.body.as_str()), ("hit", "complete"));
    assert!(parse_access_line("INFO regmirror::server: regmirror listening").is_none());
}
