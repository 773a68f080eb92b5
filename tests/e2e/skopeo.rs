//! skopeo as users run it: a `registries.conf` naming the mirror for docker.io (plain HTTP, or
//! HTTPS with a cert dir and `skopeo login`), copying to `dir:` outputs. Also the raw `skopeo` command the fixture pushes with. Each instance keeps
//! its policy, auth file and temporary files in its own directory.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest as _, Sha256};

use crate::procs::{run, run_ok};

/// How long one skopeo copy may take, the 100 MB image included, on a loaded 2-core machine.
const LIMIT: Duration = Duration::from_secs(180);

pub struct Skopeo {
    dir: PathBuf,
    registries_conf: Option<PathBuf>,
    /// Whether sources are plain-HTTP registries named by address (no mirror configuration).
    insecure_sources: bool,
    /// `--src-cert-dir`: CA certificates (`*.crt`) trusted for every source, mirrors included.
    cert_dir: Option<PathBuf>,
}

impl Skopeo {
    /// skopeo with no registries.conf of ours, for plain-HTTP registries named by address.
    pub fn plain(dir: &Path) -> Skopeo {
        std::fs::create_dir_all(dir.join("tmp")).expect("create skopeo dir");
        std::fs::write(
            dir.join("policy.json"),
            r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
        )
        .expect("write policy.json");
        std::fs::write(dir.join("auth.json"), "{}").expect("write auth.json");
        Skopeo {
            dir: dir.to_owned(),
            registries_conf: None,
            insecure_sources: true,
            cert_dir: None,
        }
    }

    /// skopeo whose registries.conf sends docker.io pulls to the mirror at `mirror` (host:port).
    pub fn with_mirror(dir: &Path, mirror: &str) -> Skopeo {
        let mut skopeo = Skopeo::plain(dir);
        let conf = dir.join("registries.conf");
        std::fs::write(
            &conf,
            format!(
                "[[registry]]\nprefix = \"docker.io\"\nlocation = \"docker.io\"\n\n\
                 [[registry.mirror]]\nlocation = \"{mirror}\"\ninsecure = true\n"
            ),
        )
        .expect("write registries.conf");
        skopeo.registries_conf = Some(conf);
        skopeo.insecure_sources = false;
        skopeo
    }

    /// skopeo with `conf` as its registries.conf (e.g. several registries, each with a mirror).
    pub fn with_registries_conf(dir: &Path, conf: &str) -> Skopeo {
        let mut skopeo = Skopeo::plain(dir);
        let path = dir.join("registries.conf");
        std::fs::write(&path, conf).expect("write registries.conf");
        skopeo.registries_conf = Some(path);
        skopeo.insecure_sources = false;
        skopeo
    }

    /// skopeo whose registries.conf sends docker.io pulls to the HTTPS mirror at `mirror`
    /// (host:port, no `insecure`), trusting the PEM certificate `ca` as its CA.
    pub fn with_tls_mirror(dir: &Path, mirror: &str, ca: &Path) -> Skopeo {
        let mut skopeo = Skopeo::plain(dir);
        let conf = dir.join("registries.conf");
        std::fs::write(
            &conf,
            format!(
                "[[registry]]\nprefix = \"docker.io\"\nlocation = \"docker.io\"\n\n\
                 [[registry.mirror]]\nlocation = \"{mirror}\"\n"
            ),
        )
        .expect("write registries.conf");
        let certs = dir.join("certs");
        std::fs::create_dir_all(&certs).expect("create cert dir");
        std::fs::copy(ca, certs.join("ca.crt")).expect("copy ca.crt");
        skopeo.registries_conf = Some(conf);
        skopeo.insecure_sources = false;
        skopeo.cert_dir = Some(certs);
        skopeo
    }

    /// `skopeo login REGISTRY` into this instance's auth file, which later copies read.
    pub async fn login(&self, registry: &str, user: &str, password: &str) {
        let mut cmd = self.command("login");
        if let Some(certs) = &self.cert_dir {
            cmd.arg("--cert-dir").arg(certs);
        }
        cmd.args(["--username", user, "--password", password, registry]);
        run_ok(&mut cmd, Duration::from_secs(60)).await;
    }

    /// `skopeo [--registries-conf F] --policy P SUBCOMMAND` with temporary files kept here.
    pub fn command(&self, subcommand: &str) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("skopeo");
        if let Some(conf) = &self.registries_conf {
            cmd.arg("--registries-conf").arg(conf);
        }
        cmd.arg("--policy")
            .arg(self.dir.join("policy.json"))
            .arg(subcommand)
            .env("TMPDIR", self.dir.join("tmp"))
            .env("REGISTRY_AUTH_FILE", self.dir.join("auth.json"));
        cmd
    }

    /// Pushes `source` (e.g. `oci:LAYOUT:TAG`; every platform of an index) to `docker://DEST`
    /// over plain HTTP.
    pub async fn push(&self, source: &str, dest: &str) {
        let mut cmd = self.command("copy");
        cmd.args(["--all", "--dest-tls-verify=false"])
            .arg(source)
            .arg(format!("docker://{dest}"));
        run_ok(&mut cmd, LIMIT).await;
    }

    /// Copies `docker://REFERENCE` (e.g. `docker.io/library/small:1`) into `dir:OUT` as an
    /// amd64 Linux machine would (`all`: every platform of an index) and returns the digest of
    /// the manifest it stored.
    pub async fn pull_to_dir(&self, reference: &str, out: &Path, all: bool) -> String {
        let mut cmd = self.pull_command(reference, out, all);
        run_ok(&mut cmd, LIMIT).await;
        dir_manifest_digest(out)
    }

    /// Like [`Skopeo::pull_to_dir`], but returns the command's output whether or not it
    /// succeeded.
    pub async fn try_pull_to_dir(&self, reference: &str, out: &Path) -> std::process::Output {
        let mut cmd = self.pull_command(reference, out, false);
        run(&mut cmd, LIMIT).await
    }

    fn pull_command(&self, reference: &str, out: &Path, all: bool) -> tokio::process::Command {
        let mut cmd = self.command("copy");
        cmd.args(["--override-os", "linux", "--override-arch", "amd64"]);
        if all {
            cmd.arg("--all");
        }
        if self.insecure_sources {
            cmd.arg("--src-tls-verify=false");
        }
        if let Some(certs) = &self.cert_dir {
            cmd.arg("--src-cert-dir").arg(certs);
        }
        cmd.arg(format!("docker://{reference}"))
            .arg(format!("dir:{}", out.display()));
        cmd
    }
}

/// The sha256 digest of the top-level manifest skopeo wrote into a `dir:` output.
pub fn dir_manifest_digest(out: &Path) -> String {
    let bytes = std::fs::read(out.join("manifest.json"))
        .unwrap_or_else(|e| panic!("read {}/manifest.json: {e}", out.display()));
    format!("sha256:{}", hex::encode(Sha256::digest(&bytes)))
}

/// The blob digests skopeo stored in a `dir:` output (files named by their hex).
pub fn dir_blobs(out: &Path) -> Vec<String> {
    let mut blobs: Vec<String> = std::fs::read_dir(out)
        .expect("read dir output")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(|n| format!("sha256:{n}"))
        .collect();
    blobs.sort();
    blobs
}
