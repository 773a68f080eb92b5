//! Configuration: one serde struct with documented defaults, loaded from
//! `mirror.toml` (embedded when no file is given), overridden by
//! `REGMIRROR_*` environment variables, then by command-line flags.
//!
//! Errors name the key, where its value came from, and the value.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use crate::cache::policy::{self, Budget, TagTtlRule};

mod cluster;
mod hosted;
mod load;
mod size;
mod warm;

pub use cluster::{Backend, ClusterConfig, S3Config, StorageConfig, MIN_SECRET_LEN};
pub use hosted::HostedConfig;
pub use load::{env_name, load, ConfigError, Flags};
pub use size::{ByteSize, MinFree};
pub use warm::{WarmConfig, MIN_EVERY as WARM_MIN_EVERY};

/// The commented default configuration shipped with the binary.
pub const EMBEDDED: &str = include_str!("../../mirror.toml");

/// Prefix of the environment variables that override keys.
pub const ENV_PREFIX: &str = "REGMIRROR_";

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the registry API listens on.
    pub listen: SocketAddr,
    /// Directory holding the cache (blobs, manifests, temp files).
    pub data_dir: PathBuf,
    /// The default registry mirrored: what dockerd's `registry-mirrors`
    /// reaches, and any request that names no other upstream.
    pub upstream: UpstreamConfig,
    /// More registries, picked by containerd's `?ns=<name>` or a first path
    /// segment equal to their `name` (`/v2/ghcr.io/org/image/...`).
    pub upstreams: Vec<UpstreamConfig>,
    /// Never contact the upstream: serve what is cached, answer misses with
    /// a clear error.
    pub offline: bool,
    /// Cache budget and freshness.
    pub cache: CacheConfig,
    /// HTTPS for the listener.
    pub tls: TlsConfig,
    /// Client authentication.
    pub auth: AuthConfig,
    /// Limits on what clients may send.
    pub server: ServerConfig,
    /// Where the operator endpoints are served besides the main listener.
    pub metrics: MetricsConfig,
    /// Where the shared content lives (`disk`: nowhere but the local disk).
    pub storage: StorageConfig,
    /// Replicas of one cache: shared metadata, leases, peers.
    pub cluster: ClusterConfig,
    /// Repositories that live here: pushed to, never fetched upstream.
    pub hosted: HostedConfig,
    /// Images kept warm on a schedule while serving (`[[warm]]`).
    pub warm: Vec<WarmConfig>,
}

/// The operator endpoints (`/metrics`, `/healthz`, `/readyz`, `/_/status`)
/// are on the main listener (metrics and status behind `auth` when it is
/// on); `listen` adds a listener of their own, without auth, for scrapers.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub listen: Option<SocketAddr>,
}

/// HTTPS: both files, or neither for plain HTTP.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate (chain allowed, leaf first).
    pub cert: Option<PathBuf>,
    /// PEM private key (RSA or ECDSA) of the certificate.
    pub key: Option<PathBuf>,
}

/// Client authentication with HTTP Basic.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// htpasswd file of bcrypt users (`htpasswd -Bbn user password`);
    /// unset: no authentication.
    pub htpasswd: Option<PathBuf>,
    /// The realm named in the `WWW-Authenticate` challenge.
    pub realm: String,
    /// bcrypt checks run at once, on threads of their own (never the
    /// blocking pool that reads the disk), so wrong passwords cost a bounded
    /// share of the CPU.
    pub bcrypt_threads: usize,
    /// Failed checks a client address (an IPv6 /64) may cause within
    /// `failure_window`; past them it gets 429 without a check until the
    /// window ends. Credentials verified before still pass. 0: no limit.
    pub max_failures: u32,
    /// The window of `max_failures`, from the address's first check in it.
    #[serde(with = "humantime_serde_compat")]
    pub failure_window: Duration,
    /// Clients without credentials may pull (never push or delete); a
    /// client that sends credentials must still send right ones.
    pub anonymous_pull: bool,
    /// Who may do what where. Empty: every user may pull, push and delete
    /// (where the configuration allows those at all). Otherwise a user may
    /// do an action on a repository only when a rule grants it.
    pub access: Vec<AccessRule>,
}

/// `[[auth.access]]`: `users` may do `actions` on `repos`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AccessRule {
    /// htpasswd user names (`*` matches every user).
    pub users: Vec<String>,
    /// Repository globs, as the client names them (`myorg/*`).
    pub repos: Vec<String>,
    /// `pull`, `push`, `delete`.
    pub actions: Vec<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            htpasswd: None,
            realm: "regmirror".to_owned(),
            bcrypt_threads: 2,
            max_failures: 10,
            failure_window: Duration::from_secs(60),
            anonymous_pull: false,
            access: Vec::new(),
        }
    }
}

/// Limits against slow, large or numerous requests.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Largest request head (request line and headers) accepted.
    pub max_header_size: ByteSize,
    /// Longest request URL (path and query) accepted.
    pub max_url_length: usize,
    /// Connections held at once (served, or waiting for a slot of their
    /// address; each holds a descriptor). At the cap a new client is still
    /// accepted and the cheapest connection is closed for it (an idle
    /// keep-alive one, else the one waiting longest for its request head);
    /// only when every connection has a request in flight do new ones wait
    /// in the listen backlog. High by default: an idle or waiting
    /// connection costs a descriptor and a few KiB, while a cap a flood
    /// reaches makes every new connection close another, which reconnects
    /// (a storm). Lowered at start to what the open-file limit allows.
    pub max_connections: usize,
    /// Connections one client address (an IPv6 /64) may hold; past it the
    /// address's idle keep-alive connection is closed for the new one, or
    /// else the new one waits (up to `header_grace`, nothing read) for one
    /// of the address's connections to end. 0: no cap. Behind a load
    /// balancer every client has its address: set 0 there.
    pub max_connections_per_address: usize,
    /// Time a client has at most to send a request head (and to finish a
    /// TLS handshake).
    #[serde(with = "humantime_serde_compat")]
    pub header_read_timeout: Duration,
    /// With `header_min_rate`, Apache's `RequestReadTimeout
    /// header=grace-max,MinRate=rate`: a request head must be complete
    /// within `header_grace`, extended by one second for every
    /// `header_min_rate` bytes of it received, up to `header_read_timeout`.
    #[serde(with = "humantime_serde_compat")]
    pub header_grace: Duration,
    /// Bytes per second a request head's deadline grows by (0: the head has
    /// `header_read_timeout`, whatever its pace).
    pub header_min_rate: ByteSize,
    /// With `min_send_rate`: once a response waits on its client (the socket
    /// takes no more), the client must take at least `min_send_rate` bytes
    /// per second over each `send_timeout` of such waiting, counted from
    /// the first wait and summed over the waits until it is reached; a
    /// client that takes less (nothing at all included) is disconnected.
    /// Time the mirror spends waiting for the bytes itself never counts.
    #[serde(with = "humantime_serde_compat")]
    pub send_timeout: Duration,
    /// See `send_timeout` (0: only a client that takes nothing for
    /// `send_timeout` is cut).
    pub min_send_rate: ByteSize,
    /// A connection with no traffic for this long is closed.
    #[serde(with = "humantime_serde_compat")]
    pub idle_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_header_size: ByteSize(64 * 1024),
            max_url_length: 8192,
            max_connections: 16384,
            max_connections_per_address: 512,
            header_read_timeout: Duration::from_secs(30),
            header_grace: Duration::from_secs(10),
            header_min_rate: ByteSize(500),
            send_timeout: Duration::from_secs(60),
            min_send_rate: ByteSize(8 * 1024),
            idle_timeout: Duration::from_secs(120),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 5000)),
            data_dir: PathBuf::from("./data"),
            upstream: UpstreamConfig::default(),
            upstreams: Vec::new(),
            offline: false,
            cache: CacheConfig::default(),
            tls: TlsConfig::default(),
            auth: AuthConfig::default(),
            server: ServerConfig::default(),
            metrics: MetricsConfig::default(),
            storage: StorageConfig::default(),
            hosted: HostedConfig::default(),
            cluster: ClusterConfig::default(),
            warm: Vec::new(),
        }
    }
}

impl Config {
    /// Every upstream, the default first.
    pub fn all_upstreams(&self) -> impl Iterator<Item = &UpstreamConfig> {
        std::iter::once(&self.upstream).chain(&self.upstreams)
    }

    /// What the configuration exposes that the operator should hear about
    /// at startup: upstream credentials on a mirror without `[auth]`, which
    /// lends them to anyone who reaches the listener.
    pub fn exposure_warnings(&self) -> Vec<String> {
        let mut warnings = self.storage.warnings();
        if self.auth.htpasswd.is_some() {
            return warnings;
        }
        let credentials = self
            .all_upstreams()
            .filter(|u| u.username.is_some() && u.password.is_some())
            .map(|u| {
                let scope = if u.credentials_for.is_empty() {
                    "every repository".to_owned()
                } else {
                    format!("the repositories {}", u.credentials_for.join(", "))
                };
                format!(
                    "upstream {} has credentials and [auth] is off: anyone who reaches {} pulls \
                     what they can read, private repositories included ({scope}); set \
                     auth.htpasswd, or limit them with credentials_for",
                    u.name, self.listen
                )
            })
            .collect::<Vec<_>>();
        warnings.extend(credentials);
        if !self.hosted.repos.is_empty() {
            warnings.push(format!(
                "hosted.repos is set and [auth] is off: anyone who reaches {} may push to {} \
                 (as to distribution's registry without auth); set auth.htpasswd, or listen on \
                 a private address",
                self.listen,
                self.hosted.repos.join(", ")
            ));
        }
        warnings
    }

    pub(crate) fn check(&self) -> Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        for (i, u) in self.all_upstreams().enumerate() {
            let key = if i == 0 {
                "upstream.name".to_owned()
            } else {
                format!("upstreams[{}].name", i - 1)
            };
            if !valid_upstream_name(&u.name) {
                return Err(format!(
                    "key {key}: {:?} is not a registry host name (like \"ghcr.io\", no port)",
                    u.name
                ));
            }
            if !seen.insert(u.name.as_str()) {
                return Err(format!(
                    "key {key}: {:?} names two upstreams (give each [[upstreams]] entry its own name)",
                    u.name
                ));
            }
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return Err("keys tls.cert and tls.key: give both files, or neither".into());
        }
        if self.cache.max_downloads == 0 {
            return Err("key cache.max_downloads: must be at least 1".into());
        }
        if self.auth.bcrypt_threads == 0 {
            return Err("key auth.bcrypt_threads: must be at least 1".into());
        }
        if self.auth.max_failures > 0 && self.auth.failure_window.is_zero() {
            return Err(
                "key auth.failure_window: must be longer than 0s (or set auth.max_failures = 0)"
                    .into(),
            );
        }
        for (i, rule) in self.auth.access.iter().enumerate() {
            if let Some(bad) = rule
                .actions
                .iter()
                .find(|a| crate::endpoint::Action::parse(a).is_none())
            {
                return Err(format!(
                    "key auth.access[{i}].actions: {bad:?} is not pull, push or delete"
                ));
            }
        }
        self.hosted.check(self.all_upstreams())?;
        for (i, w) in self.warm.iter().enumerate() {
            w.check(i)?;
        }
        if self.server.max_connections == 0 {
            return Err("key server.max_connections: must be at least 1".into());
        }
        if self.server.max_header_size.0 < 8192 {
            return Err(format!(
                "key server.max_header_size: {} bytes is below the 8 KiB minimum",
                self.server.max_header_size.0
            ));
        }
        Ok(())
    }
}

/// Where the mirror fetches from, and how patiently.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// The registry host clients name (`docker.io`, `ghcr.io`): matched
    /// against `?ns=` and the first path segment.
    pub name: String,
    /// Base URL of the upstream registry (scheme and host, no path).
    #[serde(deserialize_with = "de_url")]
    pub url: Url,
    /// User for the upstream's token realm; anonymous when unset.
    pub username: Option<String>,
    /// Password or access token for `username`.
    pub password: Option<Secret>,
    /// Time allowed to open a connection to the upstream.
    #[serde(with = "humantime_serde_compat")]
    pub connect_timeout: Duration,
    /// Time allowed until the upstream answers with response headers.
    #[serde(with = "humantime_serde_compat")]
    pub timeout: Duration,
    /// Longest pause allowed between two chunks of an upstream body.
    #[serde(with = "humantime_serde_compat")]
    pub read_timeout: Duration,
    /// Resumes (`Range: bytes=<received>-`) of one blob download whose
    /// upstream connection broke, stalled or trickled; then it fails.
    pub retries: u32,
    /// Wait before the first resume, doubled for each next one (at most 30 s).
    #[serde(with = "humantime_serde_compat")]
    pub retry_backoff: Duration,
    /// Slowest upstream blob body accepted, in bytes per second over
    /// `min_rate_window` of waiting for it (0: any rate); slower counts as a
    /// broken connection (resumed within `retries`).
    pub min_rate: ByteSize,
    /// The window `min_rate` is measured over.
    #[serde(with = "humantime_serde_compat")]
    pub min_rate_window: Duration,
    /// Hosts besides the upstream's own that may receive the credentials
    /// at a token realm (Docker Hub's `auth.docker.io` is always allowed
    /// for `registry-1.docker.io`).
    pub credential_hosts: Vec<String>,
    /// Repository globs `username`/`password` are used for (all when
    /// empty); other repositories are fetched anonymously. Without `[auth]`
    /// anyone reaching the mirror pulls what the credentials can read.
    pub credentials_for: Vec<String>,
    /// This upstream's tag TTL, instead of `cache.tag_ttl`.
    #[serde(with = "humantime_serde_compat::option")]
    pub tag_ttl: Option<Duration>,
    /// Repository globs that may be pulled (all when empty).
    pub allow: Vec<String>,
    /// Repository globs that may not be pulled (checked after `allow`).
    pub deny: Vec<String>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            name: "docker.io".to_owned(),
            url: docker_hub(),
            username: None,
            password: None,
            connect_timeout: Duration::from_secs(10),
            timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(60),
            retries: 5,
            retry_backoff: Duration::from_millis(500),
            min_rate: ByteSize(1024),
            min_rate_window: Duration::from_secs(30),
            credential_hosts: Vec::new(),
            credentials_for: Vec::new(),
            tag_ttl: None,
            allow: Vec::new(),
            deny: Vec::new(),
        }
    }
}

impl UpstreamConfig {
    /// Whether `repo` may be pulled from this upstream.
    pub fn permits(&self, repo: &str) -> bool {
        let allowed =
            self.allow.is_empty() || self.allow.iter().any(|p| policy::glob_match(p, repo));
        allowed && !self.deny.iter().any(|p| policy::glob_match(p, repo))
    }
}

/// A registry name usable as a path segment: `[a-z0-9]+([.-][a-z0-9]+)*`.
fn valid_upstream_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split(['.', '-']).all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
}

fn docker_hub() -> Url {
    // A literal that always parses; `Url` has no const constructor.
    Url::parse("https://registry-1.docker.io").unwrap_or_else(|_| unreachable!())
}

/// Cache budget and freshness policy.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Bytes the cache may take on disk, temp files of downloads included.
    pub max_size: ByteSize,
    /// Percent of `max_size` at which eviction starts.
    pub high_watermark: u8,
    /// Percent of `max_size` eviction brings the cache down to.
    pub low_watermark: u8,
    /// A blob nobody pulled for this long is evicted (`0s`: never).
    #[serde(with = "humantime_serde_compat")]
    pub blob_idle_ttl: Duration,
    /// A manifest nobody pulled for this long is evicted (`0s`: never).
    #[serde(with = "humantime_serde_compat")]
    pub manifest_idle_ttl: Duration,
    /// How long a tag → digest mapping is trusted before a HEAD revalidates it.
    #[serde(with = "humantime_serde_compat")]
    pub tag_ttl: Duration,
    /// Per-pattern tag TTLs; the first matching rule wins over `tag_ttl`.
    pub tag_ttl_rules: Vec<TagTtlRuleConfig>,
    /// Blob downloads from the upstream at once; past it a miss is refused
    /// with 503 until one ends (each holds a spool file and a connection).
    pub max_downloads: usize,
    /// Space left free on the data dir's filesystem: eviction keeps the
    /// cache below the filesystem's size minus this, whatever `max_size`
    /// says, and a blob that could not fit beside it is not kept.
    pub min_free: MinFree,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_size: ByteSize(20 * 1024 * 1024 * 1024),
            high_watermark: 90,
            low_watermark: 80,
            blob_idle_ttl: Duration::from_secs(30 * 86400),
            manifest_idle_ttl: Duration::from_secs(30 * 86400),
            tag_ttl: Duration::from_secs(5 * 60),
            tag_ttl_rules: Vec::new(),
            max_downloads: 512,
            // ext4 reserves 5 % for root by default: the same margin, for
            // the index snapshot, logs, hosted pushes and other tenants.
            min_free: MinFree::PerTenThousand(500),
        }
    }
}

impl CacheConfig {
    /// The watermarks in bytes.
    pub fn budget(&self) -> Budget {
        Budget::new(self.max_size.0, self.high_watermark, self.low_watermark)
    }

    /// The tag TTL rules as policy sees them.
    pub fn tag_rules(&self) -> Vec<TagTtlRule> {
        self.tag_ttl_rules
            .iter()
            .map(|r| TagTtlRule {
                pattern: r.pattern.clone(),
                ttl: r.ttl,
            })
            .collect()
    }

    /// An idle TTL of zero means "never idle out".
    pub fn idle_ttl(ttl: Duration) -> Option<Duration> {
        (!ttl.is_zero()).then_some(ttl)
    }

    pub(crate) fn check(&self) -> Result<(), String> {
        if self.high_watermark == 0 || self.high_watermark > 100 {
            return Err(format!(
                "key cache.high_watermark: {} is not a percentage in 1..=100",
                self.high_watermark
            ));
        }
        if self.low_watermark > self.high_watermark {
            return Err(format!(
                "key cache.low_watermark: {} is above cache.high_watermark ({})",
                self.low_watermark, self.high_watermark
            ));
        }
        Ok(())
    }
}

/// A `[[cache.tag_ttl_rules]]` entry: `pattern` is `repo-glob:tag-glob` or
/// `repo-glob`, with `*` matching anything.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TagTtlRuleConfig {
    pub pattern: String,
    #[serde(with = "humantime_serde_compat")]
    pub ttl: Duration,
}

/// A secret string: never printed by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// humantime durations (`"5m"`, `"30d"`) with errors that quote the value.
pub(crate) mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).map_err(serde::de::Error::custom)
    }

    fn parse(s: &str) -> Result<Duration, String> {
        humantime::parse_duration(s).map_err(|e| {
            format!("invalid duration {s:?} ({e}); write e.g. \"30s\", \"5m\", \"30d\"")
        })
    }

    /// An optional duration: absent, or a humantime string.
    pub mod option {
        use std::time::Duration;

        use serde::{Deserialize, Deserializer};

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            match Option::<String>::deserialize(d)? {
                None => Ok(None),
                Some(s) => super::parse(&s).map(Some).map_err(serde::de::Error::custom),
            }
        }
    }
}

fn de_url<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Url, D::Error> {
    let s = String::deserialize(d)?;
    parse_upstream_url(&s).map_err(serde::de::Error::custom)
}

/// An upstream URL: http or https, a host, no path, query or credentials.
/// Errors quote the URL without its `user:password@`, which is refused
/// precisely because it is a secret.
pub fn parse_upstream_url(s: &str) -> Result<Url, String> {
    let shown = without_userinfo(s);
    let url = Url::parse(s).map_err(|e| format!("invalid URL {shown:?}: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(format!(
            "invalid URL {shown:?}: must be http:// or https:// with a host"
        ));
    }
    if url.path() != "/" || url.query().is_some() || !url.username().is_empty() {
        return Err(format!(
            "invalid URL {shown:?}: give scheme, host and port only (credentials go in upstream.username/password)"
        ));
    }
    Ok(url)
}

/// `s` with whatever precedes the last `@` of its authority replaced, so a
/// URL (even one that does not parse) can be quoted in an error.
pub(crate) fn without_userinfo(s: &str) -> String {
    let start = s.find("://").map_or(0, |i| i + 3);
    let end = s[start..]
        .find(['/', '?', '#'])
        .map_or(s.len(), |i| start + i);
    match s[start..end].rfind('@') {
        Some(at) => format!("{}<redacted>{}", &s[..start], &s[start + at..]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_in_errors_lose_their_userinfo() {
        for (url, shown) in [
            (
                "https://bot:hunter2@r.example",
                "https://<redacted>@r.example",
            ),
            (
                "https://bot:hunter2@r.example/v2?x",
                "https://<redacted>@r.example/v2?x",
            ),
            ("bot:hunter2@r.example", "<redacted>@r.example"),
            ("https://r.example/a@b", "https://r.example/a@b"),
            ("https://a@b:pw@r.example", "https://<redacted>@r.example"),
        ] {
            assert_eq!(without_userinfo(url), shown);
        }
        for bad in [
            "https://bot:hunter2@r.example",
            "ftp://bot:hunter2@r.example",
            "https://bot:hunter2@",
            "https://bot:hunter2@r.example/path",
        ] {
            let e = parse_upstream_url(bad).unwrap_err();
            assert!(!e.contains("hunter2") && e.contains("<redacted>"), "{e}");
        }
    }

    #[test]
    fn credentials_without_auth_are_warned_about() {
        let mut c = Config::default();
        assert!(
            c.exposure_warnings().is_empty(),
            "anonymous: nothing to lend"
        );
        c.upstream.username = Some("bot".into());
        c.upstream.password = Some(Secret::new("pw"));
        let w = c.exposure_warnings();
        assert_eq!(w.len(), 1);
        for what in [
            "docker.io",
            "0.0.0.0:5000",
            "auth.htpasswd",
            "credentials_for",
        ] {
            assert!(w[0].contains(what), "{what} in {}", w[0]);
        }
        assert!(!w[0].contains("pw"), "{}", w[0]);
        c.upstream.credentials_for = vec!["myorg/*".into()];
        assert!(c.exposure_warnings()[0].contains("myorg/*"));
        c.auth.htpasswd = Some(PathBuf::from("/h"));
        assert!(c.exposure_warnings().is_empty());
    }

    #[test]
    fn hosted_repositories_without_auth_are_warned_about() {
        let mut c = Config::default();
        c.hosted.repos = vec!["myorg/*".into()];
        let w = c.exposure_warnings();
        assert_eq!(w.len(), 1);
        assert!(
            w[0].contains("myorg/*") && w[0].contains("auth.htpasswd"),
            "{}",
            w[0]
        );
        c.auth.htpasswd = Some(PathBuf::from("/h"));
        assert!(c.exposure_warnings().is_empty());
    }
}
