//! Debian's `redis-server` holding the replicas' shared metadata and leases: on a free loopback
//! port, nothing persisted (`--save "" --appendonly no`), so a restart comes back empty, as a
//! lost Redis without persistence does. Stopped with SIGKILL and started again on its port.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::procs::{free_port, tail, Proc};

pub struct Redis {
    pub port: u16,
    dir: PathBuf,
    proc: Option<Proc>,
}

impl Redis {
    /// Starts redis-server in `dir` and waits until it answers `PING`.
    pub async fn start(dir: &Path) -> Redis {
        std::fs::create_dir_all(dir).expect("create redis dir");
        for _ in 0..3 {
            let mut redis = Redis {
                port: free_port(),
                dir: dir.to_owned(),
                proc: None,
            };
            match redis.spawn().await {
                Ok(()) => return redis,
                Err(log) if log.to_lowercase().contains("address already in use") => {
                    eprintln!("[e2e] redis lost its port; trying another");
                }
                Err(log) => panic!("redis-server exited before it answered PING:\n{log}"),
            }
        }
        panic!("redis-server lost its port three times");
    }

    async fn spawn(&mut self) -> Result<(), String> {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir);
        let log = self.dir.join("redis.log");
        let proc = self.proc.insert(Proc::spawn(
            "redis-server",
            &mut cmd,
            &log,
            &log,
            Duration::from_secs(5),
        ));
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = proc.exited() {
                let log = format!("(exit {status})\n{}", tail(&proc.own_log(), 40));
                self.proc = None;
                return Err(log);
            }
            if ping(self.port).await {
                return Ok(());
            }
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not answer PING on port {} within 30s:\n{}",
                self.port,
                tail(&proc.own_log(), 40)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `redis://127.0.0.1:PORT/0`, as the replicas' `cluster.redis`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills redis-server with SIGKILL: connections to its port are refused from now on.
    pub fn kill(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill();
        }
    }

    /// Starts redis-server again on the same port (empty: nothing was persisted).
    pub async fn restart(&mut self) {
        assert!(self.proc.is_none(), "redis-server still runs");
        if let Err(log) = self.spawn().await {
            panic!(
                "redis-server did not start again on port {}: {log}",
                self.port
            );
        }
    }
}

/// Whether a Redis on `port` answers an inline `PING` with `+PONG`.
async fn ping(port: u16) -> bool {
    let attempt = async {
        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        conn.write_all(b"PING\r\n").await?;
        let mut buf = [0u8; 7];
        conn.read_exact(&mut buf).await?;
        Ok::<_, std::io::Error>(&buf == b"+PONG\r\n")
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), attempt).await,
        Ok(Ok(true))
    )
}
