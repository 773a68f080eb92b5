//! regmirror: a pull-through caching mirror for container registries.
//!
//! # Layout
//! - [`server`]: the front door (limits, [`tls`], [`auth`], [`idle`]);
//!   [`access_log`] its per-request log line.
//! - [`endpoint`]: `/v2/` requests parsed into a typed [`endpoint::Endpoint`];
//!   [`routing`] picks the upstream it is for.
//! - [`reference`]: names, tags and digests as parsed newtypes; [`range`]: `Range`.
//! - [`registry`]: the API logic (manifests, blobs, tags) over the parts below.
//! - [`upstream`]: the upstream client (token auth, redirects, error mapping).
//! - [`cache`]: the store and index interfaces and backends, single-flight
//!   downloads, eviction and its policy.
//! - [`cluster`]: the parts replicas share (bucket, Redis) and their use.
//! - [`config`]: `mirror.toml`, environment overrides, flags.
//! - [`admin`]: the `gc`, `ls` and `du` commands.
//! - [`warm`]: the scheduled warm-up of `[[warm]]` images inside `serve`.
//! - [`error`] / [`response`]: the one error type and its HTTP rendering.
//!
//! See ARCHITECTURE.md for the invariants.

pub mod access_log;
pub mod admin;
pub mod auth;
pub mod bundle;
pub mod cache;
pub mod cluster;
pub mod config;
pub mod connections;
pub mod endpoint;
pub mod error;
pub mod hashing;
pub mod hosted;
pub mod idle;
pub mod imageref;
pub mod manifest;
pub mod metrics;
pub mod ops;
pub mod prefetch;
pub mod range;
pub mod reference;
pub mod registry;
pub mod request_body;
pub mod response;
pub mod routing;
pub mod server;
pub mod tls;
pub mod units;
pub mod upstream;
pub mod warm;
