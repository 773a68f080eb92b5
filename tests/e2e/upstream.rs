//! The upstream: Debian's `docker-registry` (distribution 2.8) with token auth from our issuer,
//! and its access log parsed so tests can count what the upstream served. It does not build
//! images; it serves a storage directory it is given.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::issuer::{Issuer, KeyPair, ISSUER, SERVICE};
use crate::procs::{serve_on_free_port, Proc};

/// A running docker-registry; it is killed when dropped.
pub struct Upstream {
    pub port: u16,
    access_log: PathBuf,
    proc: Proc,
}

/// One line of the access log: a request the upstream answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Served {
    pub method: String,
    /// The path without its query.
    pub path: String,
    pub status: u16,
}

impl Upstream {
    /// Starts docker-registry in `dir` serving `storage`; read-only unless `writable`.
    pub async fn start(
        dir: &Path,
        storage: &Path,
        issuer: &Issuer,
        keys: &KeyPair,
        writable: bool,
    ) -> Upstream {
        std::fs::create_dir_all(dir).expect("create upstream dir");
        let access_log = dir.join("access.log");
        let spawn = |port: u16| {
            let config = format!(
                r#"version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: false
  maintenance:
    uploadpurging:
      enabled: false
    readonly:
      enabled: {readonly}
http:
  addr: 127.0.0.1:{port}
  secret: regmirror-e2e-upstream-secret
auth:
  token:
    realm: {realm}
    service: {SERVICE}
    issuer: {ISSUER}
    rootcertbundle: {cert}
"#,
                storage = storage.display(),
                readonly = !writable,
                realm = issuer.realm(),
                cert = keys.cert.display(),
            );
            let config_path = dir.join("registry.yml");
            std::fs::write(&config_path, config).expect("write registry config");
            let mut cmd = Command::new("docker-registry");
            cmd.arg("serve").arg(&config_path);
            Proc::spawn(
                "upstream docker-registry",
                &mut cmd,
                &access_log,
                &dir.join("registry.log"),
                Duration::from_secs(5),
            )
        };
        // Without a token, /v2/ answers 401 with the Bearer challenge.
        let (port, proc) = serve_on_free_port("/v2/", 401, spawn).await;
        Upstream {
            port,
            access_log,
            proc,
        }
    }

    /// Stops docker-registry for good: the upstream is down from now on (connections to its
    /// port are refused). Its access log stays readable.
    pub fn stop(&mut self) {
        self.proc.stop();
    }

    /// `127.0.0.1:PORT`, as clients name the registry.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every line of the access log so far: one per request the upstream answered.
    pub fn access_lines(&self) -> Vec<String> {
        let text = std::fs::read_to_string(&self.access_log).unwrap_or_default();
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// Everything the upstream served so far, in order.
    pub fn served(&self) -> Vec<Served> {
        let text = std::fs::read_to_string(&self.access_log).unwrap_or_default();
        text.lines().filter_map(parse_access_line).collect()
    }

    /// How many times the upstream answered `GET /v2/<name>/blobs/<digest>` with 2xx.
    pub fn blob_gets(&self, name: &str, digest: &str) -> usize {
        let path = format!("/v2/{name}/blobs/{digest}");
        self.served()
            .iter()
            .filter(|s| s.method == "GET" && s.path == path && (200..300).contains(&s.status))
            .count()
    }

    /// The access log and the registry's own log, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "--- upstream access log ---\n{}\n--- upstream registry log ---\n{}",
            crate::procs::tail(
                &std::fs::read_to_string(&self.access_log).unwrap_or_default(),
                200
            ),
            crate::procs::tail(&self.proc.log_text(), 60)
        )
    }
}

/// Parses a combined-log-format line such as
/// `127.0.0.1 - - [date] "GET /v2/x/blobs/sha256:.. HTTP/1.1" 200 123 "" "ua"`.
fn parse_access_line(line: &str) -> Option<Served> {
    let (_, rest) = line.split_once('"')?;
    let (request, after) = rest.split_once('"')?;
    let mut parts = request.split(' ');
    let method = parts.next()?.to_owned();
    let target = parts.next()?;
    let path = target.split('?').next()?.to_owned();
    let status = after.split_whitespace().next()?.parse().ok()?;
    Some(Served {
        method,
        path,
        status,
    })
}

#[test]
fn parses_combined_log_lines() {
    let line = r#"127.0.0.1 - - [01/Jan/2024:00:00:00 +0000] "GET /v2/library/a/blobs/sha256:ab?x=1 HTTP/1.1" 200 12 "" "skopeo/1.9.3""#;
    assert_eq!(
        parse_access_line(line),
        Some(Served {
            method: "GET".into(),
            path: "/v2/library/a/blobs/sha256:ab".into(),
            status: 200
        })
    );
}
