//! A gate in front of the upstream: a TCP proxy in this process that passes every byte both
//! ways, and on demand holds each connection's upstream-to-replica stream once it has carried
//! a number of bytes, until released. It makes "in the middle of a fill" a state the test
//! waits for rather than a moment it guesses: the fill's connection stops at a known byte,
//! the test acts (kills the replica that fills, or a Garage node), then releases the rest.
//! It also names the process on the far end of a held connection (`ss -tnp`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::watch;

use crate::procs::{run_ok, wait_until};

/// What the connections share: the limit, whether it holds, who waits at it.
struct Shared {
    /// Upstream-to-replica bytes a connection passes before it waits (while holding).
    hold_after: AtomicU64,
    /// `true` while connections past `hold_after` must wait.
    holding: watch::Sender<bool>,
    /// The replica-side addresses of connections that are waiting at the gate.
    held: Mutex<Vec<SocketAddr>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

pub struct Gate {
    pub port: u16,
    shared: Arc<Shared>,
}

impl Gate {
    /// A gate on a free loopback port in front of `127.0.0.1:target`; open until told to hold.
    pub async fn start(target: u16) -> Gate {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind gate");
        let port = listener.local_addr().expect("gate addr").port();
        let shared = Arc::new(Shared {
            hold_after: AtomicU64::new(u64::MAX),
            holding: watch::channel(false).0,
            held: Mutex::new(Vec::new()),
            tasks: Mutex::new(Vec::new()),
        });
        let accepting = Arc::clone(&shared);
        let task = tokio::spawn(async move {
            while let Ok((client, peer)) = listener.accept().await {
                let shared = Arc::clone(&accepting);
                let conn = tokio::spawn(async move {
                    if let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    {
                        pass(client, server, peer, &shared).await;
                    }
                });
                accepting.tasks.lock().expect("gate tasks").push(conn);
            }
        });
        shared.tasks.lock().expect("gate tasks").push(task);
        Gate { port, shared }
    }

    /// `http://127.0.0.1:PORT`: the upstream URL the replicas are given.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// From now on, each connection stops passing upstream bytes to the replica once it has
    /// passed `bytes` of them, until [`Gate::release`].
    pub fn hold_after(&self, bytes: u64) {
        self.shared.hold_after.store(bytes, Ordering::SeqCst);
        self.shared.holding.send_replace(true);
    }

    /// Lets every held connection go on, and holds no more.
    pub fn release(&self) {
        self.shared.hold_after.store(u64::MAX, Ordering::SeqCst);
        self.shared.holding.send_replace(false);
    }

    /// Waits until a connection is held; returns the pid of the process on its far end (the
    /// replica that is filling from the upstream).
    pub async fn wait_held(&self, limit: Duration) -> u32 {
        wait_until("a fill to reach the gate's limit", limit, || async {
            !self.shared.held.lock().expect("gate held").is_empty()
        })
        .await;
        let peer = self.shared.held.lock().expect("gate held")[0];
        pid_of(peer.port(), self.port).await
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.shared.holding.send_replace(false);
        for task in self.shared.tasks.lock().expect("gate tasks").drain(..) {
            task.abort();
        }
    }
}

/// Copies both ways; the upstream-to-replica way waits at the limit while the gate holds.
async fn pass(
    client: tokio::net::TcpStream,
    server: tokio::net::TcpStream,
    peer: SocketAddr,
    shared: &Shared,
) {
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut server_rx, mut server_tx) = server.into_split();
    let up = async {
        let _ = tokio::io::copy(&mut client_rx, &mut server_tx).await;
        let _ = server_tx.shutdown().await;
    };
    let down = async {
        let mut passed = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match server_rx.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut chunk = &buf[..n];
            loop {
                let limit = shared.hold_after.load(Ordering::SeqCst);
                let room = limit.saturating_sub(passed);
                if room as usize >= chunk.len() {
                    break;
                }
                let (now, later) = chunk.split_at(room as usize);
                if client_tx.write_all(now).await.is_err() {
                    return;
                }
                passed += now.len() as u64;
                chunk = later;
                shared.held.lock().expect("gate held").push(peer);
                let mut holding = shared.holding.subscribe();
                let _ = holding.wait_for(|h| !*h).await;
                shared
                    .held
                    .lock()
                    .expect("gate held")
                    .retain(|p| *p != peer);
            }
            if client_tx.write_all(chunk).await.is_err() {
                return;
            }
            passed += chunk.len() as u64;
        }
        let _ = client_tx.shutdown().await;
    };
    tokio::join!(up, down);
}

/// The pid of the process whose socket on local port `port` is connected to `gate_port`.
async fn pid_of(port: u16, gate_port: u16) -> u32 {
    let mut cmd = tokio::process::Command::new("ss");
    cmd.args(["-tnpH", "state", "established"])
        .arg(format!("( sport = :{port} and dport = :{gate_port} )"));
    let out = run_ok(&mut cmd, Duration::from_secs(10)).await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split("pid=")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no process found on port {port} connected to the gate:\n{text}"))
}
