//! The real binary started as a deployment starts it: its command line with container paths
//! mapped to temp dirs, a port of its choosing, and HTTP(S) requests to it.

use std::io::BufRead as _;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use crate::run_ok;

/// Container paths and the host files or directories standing in for them.
pub struct Mounts(Vec<(String, PathBuf)>);

impl Mounts {
    pub fn new(mut pairs: Vec<(String, PathBuf)>) -> Mounts {
        pairs.sort_by_key(|(c, _)| std::cmp::Reverse(c.len()));
        Mounts(pairs)
    }

    /// The host path for a container path; anything else as it is.
    pub fn map(&self, s: &str) -> String {
        for (container, host) in &self.0 {
            if s == container {
                return host.display().to_string();
            }
            if let Some(rest) = s
                .strip_prefix(container.as_str())
                .filter(|r| r.starts_with('/'))
            {
                return format!("{}{rest}", host.display());
            }
        }
        s.to_owned()
    }

    /// A configuration file's quoted container paths, as host paths.
    pub fn map_toml(&self, text: &str) -> String {
        self.0.iter().fold(text.to_owned(), |t, (container, host)| {
            t.replace(&format!("\"{container}"), &format!("\"{}", host.display()))
        })
    }
}

/// A `regmirror serve` process on a port of its choosing, killed when dropped.
pub struct Mirror {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Mirror {
    /// Runs the binary with `argv` (container paths mapped) plus `--listen 127.0.0.1:0`.
    pub fn start(argv: &[String], mounts: &Mounts, env: &[(String, String)]) -> Mirror {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_regmirror"));
        cmd.args(argv.iter().map(|a| mounts.map(a)))
            .args(["--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("REGMIRROR_") {
                cmd.env_remove(key);
            }
        }
        cmd.envs(env.iter().cloned());
        let mut child = cmd.spawn().expect("start regmirror");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if line.contains("regmirror listening") {
                    let addr = line
                        .split_whitespace()
                        .find_map(|w| w.strip_prefix("addr="));
                    let _ = tx.send(addr.unwrap_or_default().to_owned());
                }
                lines.lock().unwrap().push(line);
            }
        });
        let mut mirror = Mirror {
            child,
            addr: String::new(),
            log,
        };
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(addr) => mirror.addr = addr,
            Err(_) => panic!("{cmd:?} did not start listening; log:\n{}", mirror.log()),
        }
        mirror
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub fn signal(&self, signal: &str) {
        run_ok(Command::new("kill").args(["-s", signal, &self.child.id().to_string()]));
    }

    /// SIGTERM, as `docker stop`, the kubelet and systemd send; the exit within `limit`.
    /// Async, so that the test's clients can answer the mirror's shutdown (HTTP/2 GOAWAY).
    pub async fn terminate(&mut self, limit: Duration) -> Option<ExitStatus> {
        self.signal("TERM");
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// Runs a health check command written for port 5000 against this process.
    pub fn run_check(&self, argv: &[String]) {
        let argv: Vec<String> = argv
            .iter()
            .map(|a| a.replace("127.0.0.1:5000", &self.addr))
            .collect();
        let out = Command::new(&argv[0]).args(&argv[1..]).output().unwrap();
        assert!(
            out.status.success(),
            "{argv:?} failed: {}\nlog:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .danger_accept_invalid_certs(true)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// `GET url`, with Basic credentials if given: the status.
pub async fn status(url: &str, user: Option<(&str, &str)>) -> u16 {
    let mut req = client().get(url);
    if let Some((name, password)) = user {
        req = req.basic_auth(name, Some(password));
    }
    req.send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .status()
        .as_u16()
}

/// The registry API answers; `/v2/` says so with its version header.
pub async fn assert_serves_v2(base: &str, user: Option<(&str, &str)>) {
    let mut req = client().get(format!("{base}/v2/"));
    if let Some((name, password)) = user {
        req = req.basic_auth(name, Some(password));
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200, "GET {base}/v2/");
    let version = resp
        .headers()
        .get("docker-distribution-api-version")
        .map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(version.as_deref(), Some("registry/2.0"));
}

/// Waits until `/readyz` answers 200, as a readiness probe would; panics after 10 s.
pub async fn wait_ready(base: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = status(&format!("{base}/readyz"), None).await;
        if got == 200 {
            return;
        }
        assert!(Instant::now() < deadline, "{base}/readyz: {got} for 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
