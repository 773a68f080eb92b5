//! A `regmirror serve` process of the binary under test, for the tests that kill or
//! restart one: started on a port of its choosing and found through its log.

use std::io::BufRead as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A `regmirror serve` process listening on a port of its choosing (`--listen 127.0.0.1:0`,
/// read back from its log), killed when dropped.
pub struct Served {
    pub child: Child,
    pub url: String,
    log: Arc<Mutex<Vec<String>>>,
    pub client: reqwest::Client,
}

impl Served {
    pub async fn start(data_dir: &Path, upstream: &str) -> Served {
        Self::start_with(data_dir, upstream, &[]).await
    }

    /// With more environment (config keys as `REGMIRROR_*`).
    pub async fn start_with(data_dir: &Path, upstream: &str, env: &[(String, &str)]) -> Served {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_regmirror"));
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(["--upstream", upstream])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        hermetic(&mut cmd);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start regmirror serve");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = tokio::sync::oneshot::channel::<String>();
        let lines = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("regmirror listening") {
                    let addr = line
                        .split_whitespace()
                        .find_map(|w| w.strip_prefix("addr="))
                        .map(str::to_owned);
                    if let (Some(tx), Some(addr)) = (tx.take(), addr) {
                        let _ = tx.send(addr);
                    }
                }
                lines.lock().unwrap().push(line);
            }
        });
        let addr = match tokio::time::timeout(Duration::from_secs(20), rx).await {
            Ok(Ok(addr)) => addr,
            _ => {
                let _ = child.kill();
                let status = child.wait();
                panic!(
                    "regmirror serve did not start listening ({status:?}); log:\n{}",
                    log.lock().unwrap().join("\n")
                );
            }
        };
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("client");
        Served {
            child,
            url: format!("http://{addr}"),
            log,
            client,
        }
    }

    pub fn url_for(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// SIGTERM, as systemd or `docker stop` sends it, then the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM failed");
        self.child.wait().expect("reap regmirror")
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Keeps the caller's `REGMIRROR_*` environment away from the process.
pub fn hermetic(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("REGMIRROR_") {
            cmd.env_remove(k);
        }
    }
}
