//! Distribution's pull-through proxy (Debian's `docker-registry`, `proxy.remoteurl`) on a free
//! port, for measuring it under the same fault as regmirror. Killed when dropped.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Distribution {
    pub child: Child,
    /// `http://127.0.0.1:PORT`
    pub url: String,
}

/// Whether `docker-registry` is on the PATH.
pub fn installed() -> bool {
    Command::new("sh")
        .args(["-c", "command -v docker-registry"])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Distribution {
    /// A proxy of `upstream` (with `credentials` for its token realm, if any) storing under
    /// `dir`; `extra` is more of its YAML configuration.
    pub async fn proxy(
        dir: &Path,
        upstream: &str,
        credentials: Option<(&str, &str)>,
        extra: &str,
    ) -> Distribution {
        std::fs::create_dir_all(dir.join("storage")).expect("storage dir");
        let mut last_log = String::new();
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let creds = credentials
                .map(|(u, p)| format!("  username: {u}\n  password: {p}\n"))
                .unwrap_or_default();
            let config = format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  \
                 delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: reliability\n\
                 proxy:\n  remoteurl: {upstream}\n{creds}{extra}",
                dir.join("storage").display()
            );
            let path = dir.join("registry.yml");
            std::fs::write(&path, config).expect("write registry.yml");
            let log = dir.join("registry.log");
            let child = Command::new("docker-registry")
                .arg("serve")
                .arg(&path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).expect("log file"))
                .spawn()
                .expect("start docker-registry");
            let mut d = Distribution {
                child,
                url: format!("http://127.0.0.1:{port}"),
            };
            let client = reqwest::Client::builder().no_proxy().build().unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = d.child.try_wait() {
                    break;
                }
                if client.get(format!("{}/v2/", d.url)).send().await.is_ok() {
                    return d;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = d.child.kill();
            let _ = d.child.wait();
            last_log = std::fs::read_to_string(&log).unwrap_or_default();
        }
        panic!("docker-registry (proxy) did not start; its log:\n{last_log}");
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Distribution {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
