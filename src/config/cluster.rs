//! `[storage]` (where the shared content lives) and `[cluster]` (what
//! replicas agree on and how they reach each other).

use serde::Deserialize;
use url::Url;

use super::{parse_upstream_url, ByteSize, Secret};

/// Where content is kept besides the local disk.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The local disk only (`cache.*`): one machine, nothing else to run.
    #[default]
    Disk,
    /// An S3-compatible bucket shared by every replica, the local disk in
    /// front of it as a hot tier.
    S3,
}

/// `[storage]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub backend: Backend,
    /// Bytes the bucket may hold (`s3` only); unset: no limit.
    pub max_size: Option<ByteSize>,
    pub s3: S3Config,
}

/// `[storage.s3]`. Credentials come from the environment
/// (`REGMIRROR_STORAGE_S3_ACCESS_KEY_ID`/`_SECRET_ACCESS_KEY`, else
/// `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`) and are never logged.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    /// The service's URL; unset: AWS S3 of `region`.
    #[serde(deserialize_with = "de_opt_url")]
    pub endpoint: Option<Url>,
    pub bucket: Option<String>,
    pub region: String,
    /// Prepended to every object name (`team-a/` keeps two mirrors apart
    /// in one bucket).
    pub prefix: String,
    /// `https://endpoint/bucket/key` rather than `https://bucket.endpoint/key`.
    pub path_style: bool,
    /// Plain HTTP to an endpoint that is not loopback (a Garage or MinIO on
    /// a private network with no TLS): credentials and bytes cross that
    /// network unencrypted, so it must be asked for.
    pub allow_http: bool,
    pub access_key_id: Option<Secret>,
    pub secret_access_key: Option<Secret>,
}

impl Default for S3Config {
    fn default() -> Self {
        Self {
            endpoint: None,
            bucket: None,
            region: "us-east-1".into(),
            prefix: String::new(),
            path_style: false,
            allow_http: false,
            access_key_id: None,
            secret_access_key: None,
        }
    }
}

/// `[cluster]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// `redis://[user:password@]host:port[/db]` (no TLS yet): tags,
    /// memberships, the bucket's sizes and access times, download leases.
    pub redis: Option<Secret>,
    /// The URL other replicas reach this one at (`http://10.0.0.7:5000`).
    #[serde(deserialize_with = "de_opt_url")]
    pub advertise: Option<Url>,
    /// Shared by every replica: peer requests are signed with it.
    pub secret: Option<Secret>,
}

/// The shortest `cluster.secret` accepted.
pub const MIN_SECRET_LEN: usize = 16;

impl StorageConfig {
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.backend != Backend::S3 {
            return Ok(());
        }
        let s3 = &self.s3;
        if s3.bucket.as_deref().is_none_or(str::is_empty) {
            return Err("key storage.s3.bucket: required when storage.backend = \"s3\"".into());
        }
        if let Some(url) = &s3.endpoint {
            if !matches!(url.scheme(), "http" | "https") {
                return Err(format!(
                    "key storage.s3.endpoint: {url} is not an http(s) URL"
                ));
            }
            if url.scheme() == "http" && !is_loopback(url) && !s3.allow_http {
                return Err(format!(
                    "key storage.s3.endpoint: {url} is plain HTTP to a host that is not loopback; \
                     the bucket's requests and bytes would cross the network unencrypted (use https, \
                     or set storage.s3.allow_http = true on a network you trust)"
                ));
            }
        }
        if s3.access_key_id.is_some() != s3.secret_access_key.is_some() {
            return Err(
                "keys storage.s3.access_key_id and storage.s3.secret_access_key: set both or neither"
                    .into(),
            );
        }
        Ok(())
    }
}

impl StorageConfig {
    /// What an operator should hear at start about this configuration.
    pub fn warnings(&self) -> Vec<String> {
        match &self.s3.endpoint {
            Some(url)
                if self.backend == Backend::S3 && url.scheme() == "http" && !is_loopback(url) =>
            {
                vec![format!(
                    "the bucket at {url} is reached over plain HTTP (storage.s3.allow_http): its \
                     requests and blobs cross the network unencrypted"
                )]
            }
            _ => Vec::new(),
        }
    }
}

impl ClusterConfig {
    /// Whether replicas coordinate (a Redis is configured).
    pub fn enabled(&self) -> bool {
        self.redis.is_some()
    }

    pub(crate) fn check(&self, storage: &StorageConfig) -> Result<(), String> {
        let Some(redis) = &self.redis else {
            return Ok(());
        };
        match Url::parse(redis.expose()) {
            Ok(u) if u.scheme() == "redis" => {}
            Ok(u) if u.scheme() == "rediss" => {
                return Err(
                    "key cluster.redis: rediss:// (TLS to Redis) is not supported yet; use \
                     redis:// on a network you trust"
                        .into(),
                )
            }
            // The URL may carry a password: not quoted.
            _ => {
                return Err("key cluster.redis: not a redis:// URL (the value is not shown)".into())
            }
        }
        if storage.backend != Backend::S3 {
            return Err(
                "key cluster.redis: replicas share a cache only on storage.backend = \"s3\"".into(),
            );
        }
        match &self.advertise {
            None => {
                return Err(
                    "key cluster.advertise: required with cluster.redis (the URL peers reach this replica at)"
                        .into(),
                )
            }
            Some(u) if !matches!(u.scheme(), "http" | "https") || u.host().is_none() => {
                return Err(format!("key cluster.advertise: {u} is not an http(s) URL"))
            }
            Some(_) => {}
        }
        match &self.secret {
            Some(s) if s.expose().len() >= MIN_SECRET_LEN => Ok(()),
            _ => Err(format!(
                "key cluster.secret: required with cluster.redis, at least {MIN_SECRET_LEN} characters"
            )),
        }
    }
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// An http(s) URL with a host and no credentials (errors never quote them).
fn de_opt_url<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Url>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|s| parse_upstream_url(&s))
        .transpose()
        .map_err(serde::de::Error::custom)
}
