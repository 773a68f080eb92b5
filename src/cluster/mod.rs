//! Several replicas, one cache: the shared parts and how a replica uses them.
//!
//! - [`bucket`]: the content every replica shares, in an S3-compatible
//!   bucket (`object_store`): blobs uploaded while they stream and completed
//!   only once verified, manifests, ranged reads, cleanup of abandoned uploads.
//! - [`coordinator`]: what replicas must agree on at once: download leases
//!   (one upstream fetch per blob for the whole cluster), locks (one evictor
//!   at a time) and the replicas seen; in Redis, or in memory for one process.
//! - [`peer`]: signed requests between replicas for a blob one of them
//!   holds or is fetching.
//! - [`redis_index`]: the [`Index`](crate::cache::store::Index) kept in Redis:
//!   tags, memberships, tag lists and the bucket's sizes and access times.
//!
//! Mechanism only: the cache decides when to use them.

pub mod bucket;
pub mod coordinator;
pub mod hosted_store;
pub mod hosted_uploads;
pub mod open;
pub mod peer;
pub mod redis;
pub mod redis_index;
pub mod shared_index;
pub mod tiered_store;
pub mod tiers;
pub mod upkeep;

/// A shared part (Redis, the bucket) failed: the caller carries on without it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{part}: {message}")]
pub struct SharedError {
    /// `"redis"` or `"bucket"`.
    pub part: &'static str,
    /// What failed; never a credential.
    pub message: String,
}

impl SharedError {
    pub fn redis(message: impl std::fmt::Display) -> Self {
        Self {
            part: "redis",
            message: message.to_string(),
        }
    }

    pub fn bucket(message: impl std::fmt::Display) -> Self {
        Self {
            part: "bucket",
            message: message.to_string(),
        }
    }
}

/// Whether a shared part answers, as its users last found it: read by
/// `/readyz`, the status page and the metrics; written by the part's client
/// on every success and failure (the first failure after a success, and the
/// first success after failures, are logged once, not every call).
#[derive(Debug)]
pub struct Health {
    part: &'static str,
    up: std::sync::atomic::AtomicBool,
    errors: std::sync::atomic::AtomicU64,
    last_error: std::sync::Mutex<Option<String>>,
}

impl Health {
    pub fn new(part: &'static str) -> Self {
        Self {
            part,
            up: std::sync::atomic::AtomicBool::new(true),
            errors: std::sync::atomic::AtomicU64::new(0),
            last_error: std::sync::Mutex::new(None),
        }
    }

    pub fn part(&self) -> &'static str {
        self.part
    }

    pub fn is_up(&self) -> bool {
        self.up.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Failures counted since start.
    pub fn errors(&self) -> u64 {
        self.errors.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A call succeeded.
    pub fn ok(&self) {
        if !self.up.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(part = self.part, "shared part reachable again");
        }
    }

    /// A call failed; returns the error for the caller to pass on.
    pub fn failed(&self, e: SharedError) -> SharedError {
        self.errors
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.message.clone());
        if self.up.swap(false, std::sync::atomic::Ordering::Relaxed) {
            tracing::error!(part = self.part, error = %e, "shared part unreachable; serving without it");
        }
        e
    }
}
