//! containerd as users point it at a mirror: a private daemon (root, state and sockets in a
//! temporary directory, CRI off) and `ctr image pull --hosts-dir` with a `docker.io/hosts.toml`
//! naming the mirror. On drop the daemon is stopped and its leftover mounts are removed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::procs::{probe, run, run_ok, unmount_under, wait_until, Proc};

pub struct Containerd {
    root: PathBuf,
    socket: PathBuf,
    hosts_dir: PathBuf,
    proc: Proc,
}

impl Containerd {
    /// Starts containerd in `dir`; with `mirror` (host:port), docker.io pulls go to it.
    pub async fn start(dir: &Path, mirror: Option<&str>) -> Containerd {
        std::fs::create_dir_all(dir).expect("create containerd dir");
        let socket = dir.join("c.sock");
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.aufs"]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{ttrpc}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
"#,
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            socket = socket.display(),
            ttrpc = dir.join("t.sock").display(),
            opt = dir.join("opt").display(),
        );
        let config_path = dir.join("config.toml");
        std::fs::write(&config_path, config).expect("write containerd config");
        let hosts_dir = dir.join("hosts");
        std::fs::create_dir_all(hosts_dir.join("docker.io")).expect("create hosts dir");
        if let Some(mirror) = mirror {
            std::fs::write(
                hosts_dir.join("docker.io/hosts.toml"),
                format!(
                    "server = \"https://registry-1.docker.io\"\n\n\
                     [host.\"http://{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
                ),
            )
            .expect("write hosts.toml");
        }
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(&config_path);
        let log = dir.join("containerd.log");
        let proc = Proc::spawn("containerd", &mut cmd, &log, &log, Duration::from_secs(10));
        let mut daemon = Containerd {
            root: dir.to_owned(),
            socket,
            hosts_dir,
            proc,
        };
        let socket = daemon.socket.clone();
        wait_until("containerd to answer", Duration::from_secs(30), || {
            daemon.proc.assert_running();
            let mut version = ctr(&socket);
            version.arg("version");
            async move { probe(&mut version, Duration::from_secs(10)).await }
        })
        .await;
        daemon
    }

    /// Replaces `hosts.toml` of `registry` (e.g. `docker.io`) in the hosts dir `ctr` is given;
    /// `ctr` reads it at every pull, so this takes effect at once.
    pub fn write_hosts(&self, registry: &str, toml: &str) {
        let dir = self.hosts_dir.join(registry);
        std::fs::create_dir_all(&dir).expect("create hosts dir");
        std::fs::write(dir.join("hosts.toml"), toml).expect("write hosts.toml");
    }

    /// `ctr --address SOCKET --namespace e2e`.
    pub fn ctr(&self) -> tokio::process::Command {
        ctr(&self.socket)
    }

    /// `ctr image pull --snapshotter native --hosts-dir DIR REFERENCE` (the host's platform),
    /// plus `extra` flags such as `--plain-http`; panics on failure.
    pub async fn pull(&self, reference: &str, extra: &[&str]) {
        let mut cmd = self.ctr();
        cmd.args(["image", "pull", "--snapshotter", "native", "--hosts-dir"])
            .arg(&self.hosts_dir)
            .args(extra)
            .arg(reference);
        let out = run(&mut cmd, Duration::from_secs(240)).await;
        assert!(
            out.status.success(),
            "ctr image pull {reference} failed (its daemon's and the mirror's logs follow): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
    }

    /// The target digest containerd recorded for image `reference` (`ctr image ls`).
    pub async fn image_digest(&self, reference: &str) -> String {
        let mut cmd = self.ctr();
        cmd.args(["image", "ls"]);
        let out = run_ok(&mut cmd, Duration::from_secs(30)).await;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|cols| cols.first() == Some(&reference))
            .and_then(|cols| cols.get(2).map(|d| (*d).to_owned()))
            .unwrap_or_else(|| panic!("{reference} not in `ctr image ls`:\n{text}"))
    }
}

fn ctr(socket: &Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("ctr");
    cmd.arg("--address")
        .arg(socket)
        .args(["--namespace", "e2e"]);
    cmd
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.proc.stop();
        unmount_under(&self.root);
    }
}
