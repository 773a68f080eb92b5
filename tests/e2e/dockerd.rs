//! dockerd as users run it with `--registry-mirror`: a private daemon (vfs storage, no
//! networking of its own) under a temporary directory, driven with `/usr/bin/docker`. On drop
//! the daemon's whole process group is stopped and anything it left mounted is unmounted.
//! Also its trust of an HTTPS registry: one `/etc/docker/certs.d/HOST:PORT` entry, removed on drop.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::procs::{probe, run, run_ok, unmount_under, wait_until, Proc};

/// The Debian client; `/usr/local/bin/docker` on this machine is something else.
pub const DOCKER: &str = "/usr/bin/docker";

pub struct Dockerd {
    root: PathBuf,
    socket: PathBuf,
    proc: Proc,
}

impl Dockerd {
    /// Starts dockerd in `dir` (keep it short: the socket path is limited to 108 bytes), with
    /// `args` such as `--registry-mirror http://127.0.0.1:PORT` or `--insecure-registry ADDR`.
    pub async fn start(dir: &Path, args: &[String]) -> Dockerd {
        std::fs::create_dir_all(dir.join("cfg")).expect("create dockerd dir");
        let config = dir.join("daemon.json");
        std::fs::write(&config, "{}").expect("write daemon.json");
        std::fs::write(dir.join("cfg/config.json"), "{}").expect("write client config");
        let socket = dir.join("d.sock");
        let mut cmd = Command::new("dockerd");
        cmd.arg("--config-file")
            .arg(&config)
            .arg("--data-root")
            .arg(dir.join("root"))
            .arg("--exec-root")
            .arg(dir.join("x"))
            .arg("-H")
            .arg(format!("unix://{}", socket.display()))
            .arg("--pidfile")
            .arg(dir.join("d.pid"))
            .args(["--iptables=false", "--ip6tables=false", "--bridge=none"])
            .args(["--storage-driver=vfs", "--max-concurrent-downloads=3"])
            .args(args);
        let log = dir.join("dockerd.log");
        let proc = Proc::spawn("dockerd", &mut cmd, &log, &log, Duration::from_secs(20));
        // Built before waiting, so that a daemon that never comes up is still cleaned up.
        let mut daemon = Dockerd {
            root: dir.to_owned(),
            socket,
            proc,
        };
        let (root, socket) = (daemon.root.clone(), daemon.socket.clone());
        wait_until("dockerd to answer", Duration::from_secs(60), || {
            daemon.proc.assert_running();
            let mut version = docker(&root, &socket);
            version.args(["version", "--format", "{{.Server.Version}}"]);
            async move { probe(&mut version, Duration::from_secs(10)).await }
        })
        .await;
        daemon
    }

    /// The client's `DOCKER_CONFIG` directory (holding `config.json`), private to this daemon.
    pub fn config_dir(&self) -> PathBuf {
        self.root.join("cfg")
    }

    /// `/usr/bin/docker -H unix://SOCKET` with a client config dir of its own.
    pub fn docker(&self) -> tokio::process::Command {
        docker(&self.root, &self.socket)
    }

    /// `docker pull REFERENCE`; panics when it fails.
    pub async fn pull(&self, reference: &str) {
        let mut cmd = self.docker();
        cmd.args(["pull", reference]);
        let out = run(&mut cmd, Duration::from_secs(240)).await;
        assert!(
            out.status.success(),
            "docker pull {reference} failed (its daemon's and the mirror's logs follow): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
    }

    /// `RepoDigests` of a pulled image, e.g. `["small@sha256:..."]`.
    pub async fn repo_digests(&self, reference: &str) -> Vec<String> {
        let mut cmd = self.docker();
        cmd.args([
            "image",
            "inspect",
            "--format",
            "{{json .RepoDigests}}",
            reference,
        ]);
        let out = run_ok(&mut cmd, Duration::from_secs(30)).await;
        serde_json::from_slice(&out.stdout).expect("RepoDigests json")
    }
}

/// dockerd's trust for one registry host: `/etc/docker/certs.d/HOST:PORT/ca.crt`. dockerd reads
/// only that directory, so the harness creates exactly its own `HOST:PORT` entry (the free port
/// makes it unique) and removes that entry, and nothing else, on drop.
pub struct CertsD {
    dir: PathBuf,
}

impl CertsD {
    /// Trusts the PEM certificate `ca` for the registry at `addr` (`127.0.0.1:PORT`).
    pub fn install(addr: &str, ca: &Path) -> CertsD {
        let dir = Path::new("/etc/docker/certs.d").join(addr);
        if dir.exists() {
            // Left by a run that was killed: the port is ours now, so nobody else uses it.
            eprintln!("[e2e] replacing the stale {}", dir.display());
            let _ = std::fs::remove_dir_all(&dir);
        }
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let guard = CertsD { dir };
        std::fs::copy(ca, guard.dir.join("ca.crt")).expect("copy ca.crt into certs.d");
        guard
    }
}

impl Drop for CertsD {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn docker(root: &Path, socket: &Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(DOCKER);
    cmd.arg("-H")
        .arg(format!("unix://{}", socket.display()))
        .env("DOCKER_CONFIG", root.join("cfg"));
    cmd
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        self.proc.stop();
        unmount_under(&self.root);
    }
}
