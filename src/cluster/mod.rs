//! Several replicas, one cache: the shared parts and how a replica uses them.
//!
//! - [`bucket`]: the content every replica shares, in an S3-compatible
//!   bucket (`object_store`): blobs uploaded while they stream and completed
//!   only once verified, manifests, ranged reads, cleanup of abandoned uploads.
//! - [`coordinator`]: what replicas must agree on at once: download leases
//!   (one upstream fetch per blob for the whole cluster), locks (one evictor
//!   at a time) and the replicas seen; in Redis, or in memory for one process.
//! - [`redis_index`]: the [`Index`](crate::cache::store::Index) kept in Redis:
//!   tags, memberships, tag lists and the bucket's sizes and access times.
//!
//! Mechanism only: the cache decides when to use them.

pub mod bucket;
pub mod coordinator;
pub mod redis_index;

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
