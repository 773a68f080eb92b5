//! Leases, locks and the replicas seen: what replicas agree on at once.
//!
//! A lease on a digest says which replica fetches it from the upstream; the
//! others follow that replica. It is taken if absent with an expiry, renewed
//! while the fill runs, released at its end, and taken over when its holder
//! cannot be reached. Every change is a compare-and-set on the lease's token,
//! so a holder whose lease expired and was taken can no longer renew or
//! release it.
//!
//! Two implementations: [`MemoryCoordinator`] (one process: the single-node
//! default and tests) and [`RedisCoordinator`] (replicas sharing a Redis).

use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use super::SharedError;
use crate::reference::Digest;

mod in_redis;
mod memory;

pub use in_redis::RedisCoordinator;
pub use memory::MemoryCoordinator;

/// The lease key of a digest, as [`Lease::key`] names it.
fn lease_key(digest: &Digest) -> String {
    format!("lease:{digest}")
}

/// The key of a named lock, as [`Lease::key`] names it.
fn lock_key(name: &str) -> String {
    format!("lock:{name}")
}

/// How long past the window asked for an announcement is kept: a replica
/// gone for longer is dropped from the list at the next `peers`.
const PEERS_KEPT: Duration = Duration::from_secs(3600);

/// A token unique to one taking: 128 random bits.
fn new_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// A lease this replica holds: its token is unique to this taking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub key: String,
    pub token: String,
}

/// The outcome of asking for a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Taken {
    /// This replica holds it now.
    Mine(Lease),
    /// Another holds it: its advertised URL, and the token seen (for a
    /// takeover when it cannot be reached).
    Held { holder: String, token: String },
}

/// Leases, locks and membership. Implemented over Redis and in memory.
#[async_trait]
pub trait Coordinator: Send + Sync + 'static {
    /// Takes the lease on `digest` for `holder` (this replica's advertised
    /// URL) if nobody holds it, for `ttl`.
    async fn take(
        &self,
        digest: &Digest,
        holder: &str,
        ttl: Duration,
    ) -> Result<Taken, SharedError>;
    /// Extends a lease still held; `false` when it expired or was taken over.
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, SharedError>;
    /// Gives a lease up, if still held by this taking.
    async fn release(&self, lease: &Lease) -> Result<(), SharedError>;
    /// Replaces the lease on `digest`, if its token is still `seen`, by one
    /// for `holder`: its holder could not be reached.
    async fn take_over(
        &self,
        digest: &Digest,
        seen: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, SharedError>;
    /// A named lock (`"evict"`): held by at most one replica for `ttl`.
    async fn lock(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, SharedError>;
    /// Says this replica is alive (at start and periodically).
    async fn announce(&self, holder: &str, now: SystemTime) -> Result<(), SharedError>;
    /// The replicas that announced themselves within `within` of `now`.
    async fn peers(
        &self,
        now: SystemTime,
        within: Duration,
    ) -> Result<Vec<(String, SystemTime)>, SharedError>;
}
