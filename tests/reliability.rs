//! The reliability suite (issue 12): each fault provoked for real on loopback, what clients got
//! counted and asserted, and the figures printed for docs/RELIABILITY.md.
//!
//! Two sizes. By default (CI, `cargo test --test reliability`) each fault is provoked at a
//! scale that runs in seconds; `REGMIRROR_RELIABILITY=full` (set by `bench/reliability.sh`)
//! runs the sizes the issue names (10,000 connections, 100 crash rounds, a 30-minute soak) and
//! measures Debian's docker-registry in proxy mode under the same fault where it can be run
//! too ([`distribution`]). Every test asserts on regmirror in both sizes; figures go to
//! [`report`], never into an assertion on time.
//!
//! # Layout
//! - `scale`: the two sizes; `report`: the figure lines the script collects;
//!   `distribution`: docker-registry as a pull-through proxy, for the comparison;
//!   `clients`: clients that hash every body they get, and the tally of what they got.
//! - `flood`: thousands of dripping and silent connections while a client pulls (item 1).
//! - `slow_readers`: clients taking a blob at 1 KiB/s beside a normal one: cut after
//!   `server.send_timeout`, the normal client unhindered, memory bounded (item 1).
//! - `framing`: hostile HTTP/1.1 framing and HTTP/2 floods, no smuggling (item 6).
//! - `fault_proxy`: a TCP proxy between the mirror and the fake upstream whose fault (cut,
//!   silence, headers only, trickle) the test switches at runtime, and the rig of the three.
//! - `resume`: a blob cut mid-body resumed with `Range` (also through an expired redirect or
//!   token), an upstream that cannot continue at the offset, resumes running out.
//! - `stalls`: an upstream that says nothing, sends headers only, or trickles: each ends within
//!   its timeout, descriptors come back, the next pull fetches again.
//! - `crash_loop` (item 5): `regmirror serve` killed with SIGKILL at random moments under
//!   pulls, evictions and imports; the cache whole after each restart.
//! - `soak` (item 7): 64 clients under a small budget, moving tags and upstream faults
//!   switched on and off; every byte checked, memory and descriptors flat.
//! - `full_disk` (item 2): the data dir on a small tmpfs the test mounts (root only): a blob larger
//!   than the disk, or than its free space, reaches every client whole; the cache goes
//!   without it, keeps its hits, evicts, keeps a parsable index; `cache.min_free` keeps
//!   the cache below the filesystem's size minus it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

/// Taken by every test of the suite: they run one at a time, because each measures what
/// another's load in the same process would move (the process's descriptors, a mirror's
/// memory, latencies).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Waits for the tests before this one to end; hold the guard for the whole test.
async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

#[path = "reliability/clients.rs"]
mod clients;
#[path = "reliability/crash_loop.rs"]
mod crash_loop;
#[path = "reliability/distribution.rs"]
mod distribution;
#[path = "reliability/fault_proxy.rs"]
mod fault_proxy;
#[path = "reliability/flood.rs"]
mod flood;
#[path = "reliability/framing.rs"]
mod framing;
#[path = "reliability/full_disk.rs"]
mod full_disk;
#[path = "reliability/report.rs"]
mod report;
#[path = "reliability/resume.rs"]
mod resume;
#[path = "reliability/scale.rs"]
mod scale;
#[path = "reliability/slow_readers.rs"]
mod slow_readers;
#[path = "reliability/soak.rs"]
mod soak;
#[path = "reliability/stalls.rs"]
mod stalls;
