//! A `regmirror serve` process hosting `myorg/*` killed (SIGKILL) in the middle of a chunked
//! upload: what it acknowledged is there after the restart, the upload's status tells how
//! far it got (a chunk cut off mid-body included), and the client finishes from there.

use std::io::BufRead as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::Method;

use crate::common::images::sha256_digest;
use crate::common::{random_bytes, FakeUpstream};
use crate::push::{get, open_upload, patch, path_of, put_upload, Feed, Target, APP};

/// A `regmirror serve` process hosting `myorg/*`, listening on a port of its choosing (read
/// back from its log); killed when dropped.
struct Served {
    child: Child,
    url: String,
    log: Arc<Mutex<Vec<String>>>,
    client: reqwest::Client,
}

impl Target for Served {
    fn base(&self) -> &str {
        &self.url
    }

    fn http(&self) -> &reqwest::Client {
        &self.client
    }
}

impl Served {
    async fn start(data_dir: &Path, upstream: &str) -> Served {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_regmirror"));
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("REGMIRROR_") {
                cmd.env_remove(k);
            }
        }
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(["--upstream", upstream])
            .env(
                regmirror::config::env_name("hosted.repos"),
                r#"["myorg/*"]"#,
            )
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
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
        let Ok(Ok(addr)) = tokio::time::timeout(Duration::from_secs(20), rx).await else {
            let _ = child.kill();
            let status = child.wait();
            panic!(
                "regmirror serve did not start listening ({status:?}); log:\n{}",
                log.lock().unwrap().join("\n")
            );
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

    /// SIGKILL, then reap.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_upload_resumes_after_the_mirror_is_killed() {
    let fake = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let bytes = random_bytes(3 << 20, 80);
    let digest = sha256_digest(&bytes);
    let first = 1 << 20;

    let mut s = Served::start(dir.path(), &fake.url()).await;
    let loc = open_upload(&s, APP).await;
    let a = patch(&s, &loc, &bytes[..first], Some((0, first as u64 - 1)))
        .await
        .expect(202);
    let loc = path_of(&a.location(&s));
    // The second chunk is cut off: the process dies with part of it sent.
    let feed = Feed::start(
        &s,
        Method::PATCH,
        &loc,
        &[
            ("content-type", "application/octet-stream"),
            ("content-range", &format!("{first}-{}", bytes.len() - 1)),
        ],
    );
    for piece in bytes[first..first + (1 << 20)].chunks(64 << 10) {
        assert!(feed.piece(piece).await, "the mirror stopped reading");
    }
    s.kill();
    let _ = feed.finish().await;

    let s = Served::start(dir.path(), &fake.url()).await;
    let status = get(&s, &loc).await;
    assert_eq!(status.status, 204, "{}; log:\n{}", status.text(), s.log());
    let range = status.header("range");
    let got: usize = range
        .strip_prefix("0-")
        .and_then(|end| end.parse::<usize>().ok())
        .map(|end| end + 1)
        .unwrap_or_else(|| panic!("Range {range:?}"));
    assert!(
        (first..bytes.len()).contains(&got),
        "after the kill the upload holds {got} bytes; the first chunk ({first}) was acknowledged"
    );
    let b = patch(
        &s,
        &status.location(&s),
        &bytes[got..],
        Some((got as u64, bytes.len() as u64 - 1)),
    )
    .await
    .expect(202);
    assert_eq!(b.header("range"), format!("0-{}", bytes.len() - 1));
    let put = put_upload(&s, &b.location(&s), &digest, b"").await;
    assert_eq!(put.status, 201, "{}; log:\n{}", put.text(), s.log());
    let served = get(&s, &format!("/v2/{APP}/blobs/{digest}"))
        .await
        .expect(200);
    assert!(
        served.body[..] == bytes[..],
        "the resumed blob has other bytes"
    );
}
