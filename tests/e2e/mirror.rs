//! The mirror under test: the `regmirror` binary cargo built, started on a free port with a
//! data directory of its own and no `REGMIRROR_*` variables from the environment.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::procs::{serve_on_free_port, Proc};

pub struct Mirror {
    pub port: u16,
    pub data_dir: PathBuf,
    proc: Proc,
}

impl Mirror {
    /// Starts `regmirror serve` in `dir` in front of `upstream` (a URL), with `env` as its
    /// only `REGMIRROR_*` variables; ready once `GET /v2/` answers 200.
    pub async fn start(dir: &Path, upstream: &str, env: &[(&str, &str)]) -> Mirror {
        std::fs::create_dir_all(dir).expect("create mirror dir");
        let data_dir = dir.join("data");
        let log = dir.join("regmirror.log");
        let spawn = |port: u16| {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_regmirror"));
            cmd.arg("serve")
                .arg("--listen")
                .arg(format!("127.0.0.1:{port}"))
                .arg("--data-dir")
                .arg(&data_dir)
                .arg("--upstream")
                .arg(upstream)
                .current_dir(dir)
                .env("RUST_BACKTRACE", "1");
            if std::env::var_os("RUST_LOG").is_none() {
                cmd.env("RUST_LOG", "regmirror=debug,info");
            }
            for (key, _) in std::env::vars_os() {
                if key.to_string_lossy().starts_with("REGMIRROR_") {
                    cmd.env_remove(key);
                }
            }
            cmd.envs(env.iter().copied());
            Proc::spawn("regmirror", &mut cmd, &log, &log, Duration::from_secs(5))
        };
        let (port, proc) = serve_on_free_port("/v2/", 200, spawn).await;
        Mirror {
            port,
            data_dir,
            proc,
        }
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

    /// The mirror's log so far.
    pub fn log(&self) -> String {
        self.proc.log_text()
    }
}
