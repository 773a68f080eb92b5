//! Spawned processes and ports: a guard that kills what the harness started (even when a test
//! panics), free loopback ports, tool checks, and running client commands with a deadline.
//! It knows nothing about registries.

use std::fs::{File, OpenOptions};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// Binds port 0 on 127.0.0.1, reads the port, and releases it for a child to bind.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// Fails the test (never skips it) when it cannot run here: not root, or a tool is missing.
pub fn require_tools(tools: &[&str]) {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        })
        .unwrap_or_default();
    assert_eq!(
        uid, "0",
        "the e2e tests must run as root (dockerd and containerd need it)"
    );
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| {
            let path = Path::new(t);
            !(path.is_absolute() && path.is_file() || !path.is_absolute() && which(t).is_some())
        })
        .collect();
    assert!(
        missing.is_empty(),
        "e2e tests need these tools, which are missing: {missing:?} \
         (Debian packages: docker-registry skopeo docker.io containerd openssl apache2-utils)"
    );
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

fn append(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open log {}: {e}", path.display()))
}

/// A long-running child in its own process group; the group is terminated on drop, and the
/// child's log is printed when the thread is panicking, so a failed test shows what it said.
pub struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
    /// Length of the log when the child started: what it wrote begins there.
    log_start: usize,
    grace: Duration,
}

impl Proc {
    /// Spawns `cmd` with stdout to `stdout` and stderr to `log` (they may be the same file).
    pub fn spawn(
        name: &str,
        cmd: &mut Command,
        stdout: &Path,
        log: &Path,
        grace: Duration,
    ) -> Proc {
        let log_start = std::fs::metadata(log).map_or(0, |m| m.len() as usize);
        cmd.stdin(Stdio::null())
            .stdout(append(stdout))
            .stderr(append(log))
            .process_group(0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name} ({cmd:?}): {e}"));
        Proc {
            name: name.to_owned(),
            child: Some(child),
            log: log.to_owned(),
            log_start,
            grace,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// What this child wrote to its log (which earlier children may have written to too).
    pub fn own_log(&self) -> String {
        self.log_text()
            .get(self.log_start..)
            .unwrap_or_default()
            .to_owned()
    }

    /// The exit status, once the child has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Panics with the child's log if it has exited.
    pub fn assert_running(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "{} exited early with {status}; its log:\n{}",
                    self.name,
                    tail(&self.log_text(), 80)
                );
            }
        }
    }

    /// Sends SIGTERM to the child alone and waits up to `limit` for it to exit, as a service
    /// manager stops a daemon; returns its exit status, or `None` if it outlived `limit` (then
    /// its group is killed). Either way the child is gone afterwards.
    pub async fn terminate(&mut self, limit: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        signal("TERM", &child.id().to_string());
        let deadline = Instant::now() + limit;
        let mut status = None;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = child.try_wait() {
                status = Some(s);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        signal("KILL", &format!("-{}", child.id()));
        let _ = child.kill();
        let _ = child.wait();
        status
    }

    /// The child's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the process group at once (SIGKILL, as `kill -9` or a lost node does) and reaps
    /// the child. Its log stays readable.
    pub fn kill(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        signal("KILL", &format!("-{}", child.id()));
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Terminates the process group: SIGTERM, then SIGKILL once the grace period is over.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let group = format!("-{}", child.id());
        if !self.grace.is_zero() {
            signal("TERM", &group);
            let deadline = Instant::now() + self.grace;
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        // The leader may be gone while others of its group live on: kill the group regardless.
        signal("KILL", &group);
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn signal(sig: &str, target: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), "--", target])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- {} log ({}) -----\n{}\n----- end of {} log -----",
                self.name,
                self.log.display(),
                tail(&self.log_text(), 200),
                self.name
            );
        }
        self.stop();
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Unmounts (lazily, deepest first) whatever is still mounted under `root`: what a killed
/// dockerd or containerd can leave behind.
pub fn unmount_under(root: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let root = root.to_string_lossy().into_owned();
    let mut points: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .filter(|p| p.starts_with(&root))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = Command::new("umount")
            .args(["-l", &p])
            .stderr(Stdio::null())
            .status();
    }
}

/// Starts a server with `spawn(port)` on a free port and waits until
/// `GET http://127.0.0.1:PORT{path}` answers `status`. A child that lost its port to another
/// process before it could bind it is started again on another port.
pub async fn serve_on_free_port(
    path: &str,
    status: u16,
    spawn: impl FnMut(u16) -> Proc,
) -> (u16, Proc) {
    serve_on_free_port_via(&reqwest::Client::new(), "http", path, status, spawn).await
}

/// Like [`serve_on_free_port`], asking with `client` over `scheme` (`https` with a client that
/// trusts the server's certificate).
pub async fn serve_on_free_port_via(
    client: &reqwest::Client,
    scheme: &str,
    path: &str,
    status: u16,
    spawn: impl FnMut(u16) -> Proc,
) -> (u16, Proc) {
    serve_via(client, scheme, path, status, None, spawn).await
}

/// Like [`serve_on_free_port_via`] on `port`, once (a server started again on the address it
/// had).
pub async fn serve_on_port_via(
    client: &reqwest::Client,
    scheme: &str,
    path: &str,
    status: u16,
    port: u16,
    spawn: impl FnMut(u16) -> Proc,
) -> (u16, Proc) {
    serve_via(client, scheme, path, status, Some(port), spawn).await
}

async fn serve_via(
    client: &reqwest::Client,
    scheme: &str,
    path: &str,
    status: u16,
    fixed: Option<u16>,
    mut spawn: impl FnMut(u16) -> Proc,
) -> (u16, Proc) {
    let attempts: u32 = if fixed.is_some() { 1 } else { 4 };
    for attempt in 1..=attempts {
        let port = fixed.unwrap_or_else(free_port);
        let mut proc = spawn(port);
        let url = format!("{scheme}://127.0.0.1:{port}{path}");
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut answered = false;
        loop {
            if let Some(exit) = proc.exited() {
                let log = proc.own_log();
                if log.to_lowercase().contains("address already in use") && attempt < attempts {
                    eprintln!("[e2e] {} lost port {port}; trying another", proc.name);
                    break;
                }
                panic!(
                    "{} exited with {exit} before it was ready; its log:\n{}",
                    proc.name,
                    tail(&log, 80)
                );
            }
            if answered {
                // Still alive a moment after answering: the answer was its own, not that of
                // another server that got the port first.
                return (port, proc);
            }
            answered = matches!(client.get(&url).send().await, Ok(r) if r.status() == status);
            assert!(
                Instant::now() < deadline,
                "{} did not answer GET {url} with {status} within 30s; its log:\n{}",
                proc.name,
                tail(&proc.own_log(), 80)
            );
            let pause = if answered { 200 } else { 100 };
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
    }
    unreachable!("the last attempt returns or panics")
}

/// Runs a client command to completion (killed if it outlives `limit`), returning its output.
pub async fn run(cmd: &mut tokio::process::Command, limit: Duration) -> Output {
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let what = format!("{:?}", cmd.as_std());
    let started = Instant::now();
    let out = tokio::time::timeout(limit, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("timed out after {limit:?}: {what}"))
        .unwrap_or_else(|e| panic!("could not run {what}: {e}"));
    eprintln!(
        "[e2e] {:.1}s exit={} {what}",
        started.elapsed().as_secs_f64(),
        out.status
    );
    out
}

/// Like [`run`], writing `input` to the command's standard input first (e.g. a password for
/// `--password-stdin`).
pub async fn run_with_input(
    cmd: &mut tokio::process::Command,
    input: &str,
    limit: Duration,
) -> Output {
    use tokio::io::AsyncWriteExt as _;
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let what = format!("{:?}", cmd.as_std());
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("could not run {what}: {e}"));
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin
        .write_all(input.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("write to the stdin of {what}: {e}"));
    drop(stdin);
    let out = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("timed out after {limit:?}: {what}"))
        .unwrap_or_else(|e| panic!("could not run {what}: {e}"));
    eprintln!(
        "[e2e] {:.1}s exit={} {what}",
        started.elapsed().as_secs_f64(),
        out.status
    );
    out
}

/// Whether `cmd` exits 0 within `limit`; says nothing (for polling a daemon until it is up).
pub async fn probe(cmd: &mut tokio::process::Command, limit: Duration) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    matches!(tokio::time::timeout(limit, cmd.status()).await, Ok(Ok(s)) if s.success())
}

/// Like [`run`], and panics with the command's output unless it succeeded.
pub async fn run_ok(cmd: &mut tokio::process::Command, limit: Duration) -> Output {
    let out = run(cmd, limit).await;
    assert!(
        out.status.success(),
        "command failed ({}): {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        cmd.as_std(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Polls `probe` every 100 ms until it returns true or `limit` passes.
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if probe().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out after {limit:?} waiting for {what}");
}
