//! Configuration: one serde struct with documented defaults, loaded from
//! `mirror.toml` (embedded when no file is given), overridden by
//! `REGMIRROR_*` environment variables, then by command-line flags.
//!
//! Errors name the key, where its value came from, and the value.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use crate::policy::{Budget, TagTtlRule};

/// The commented default configuration shipped with the binary.
pub const EMBEDDED: &str = include_str!("../mirror.toml");

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
    /// The registry mirrored.
    pub upstream: UpstreamConfig,
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
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            htpasswd: None,
            realm: "regmirror".to_owned(),
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
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Time a client has to send its request headers (and finish a TLS handshake).
    #[serde(with = "humantime_serde_compat")]
    pub header_read_timeout: Duration,
    /// A connection with no traffic for this long is closed.
    #[serde(with = "humantime_serde_compat")]
    pub idle_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_header_size: ByteSize(64 * 1024),
            max_url_length: 8192,
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(30),
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
            offline: false,
            cache: CacheConfig::default(),
            tls: TlsConfig::default(),
            auth: AuthConfig::default(),
            server: ServerConfig::default(),
        }
    }
}

impl Config {
    fn check(&self) -> Result<(), String> {
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return Err("keys tls.cert and tls.key: give both files, or neither".into());
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
    /// Hosts besides the upstream's own that may receive the credentials
    /// at a token realm (Docker Hub's `auth.docker.io` is always allowed
    /// for `registry-1.docker.io`).
    pub credential_hosts: Vec<String>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            url: docker_hub(),
            username: None,
            password: None,
            connect_timeout: Duration::from_secs(10),
            timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(60),
            credential_hosts: Vec::new(),
        }
    }
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

    fn check(&self) -> Result<(), String> {
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

/// A size in bytes, written `"20GiB"`, `"500 MB"` or as a plain number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses a number with an optional unit: B, KB/KiB, MB/MiB, GB/GiB, TB/TiB.
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let bad =
            || format!("invalid size {s:?}; write e.g. \"20GiB\", \"500MB\" or a number of bytes");
        let value: f64 = num.parse().map_err(|_| bad())?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kb" | "k" => 1000,
            "kib" => 1 << 10,
            "mb" | "m" => 1000 * 1000,
            "mib" => 1 << 20,
            "gb" | "g" => 1000 * 1000 * 1000,
            "gib" => 1 << 30,
            "tb" | "t" => 1000 * 1000 * 1000 * 1000,
            "tib" => 1 << 40,
            _ => return Err(bad()),
        };
        let bytes = value * mult as f64;
        if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
            return Err(bad());
        }
        Ok(ByteSize(bytes as u64))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(ByteSize(n)),
            Raw::Text(s) => ByteSize::parse(&s).map_err(serde::de::Error::custom),
        }
    }
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
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {s:?} ({e}); write e.g. \"30s\", \"5m\", \"30d\""
            ))
        })
    }
}

fn de_url<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Url, D::Error> {
    let s = String::deserialize(d)?;
    parse_upstream_url(&s).map_err(serde::de::Error::custom)
}

/// An upstream URL: http or https, a host, no path, query or credentials.
pub fn parse_upstream_url(s: &str) -> Result<Url, String> {
    let url = Url::parse(s).map_err(|e| format!("invalid URL {s:?}: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(format!(
            "invalid URL {s:?}: must be http:// or https:// with a host"
        ));
    }
    if url.path() != "/" || url.query().is_some() || !url.username().is_empty() {
        return Err(format!(
            "invalid URL {s:?}: give scheme, host and port only (credentials go in upstream.username/password)"
        ));
    }
    Ok(url)
}

/// The type of a key's value, to read it from an environment variable.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// Taken as it is.
    Str,
    /// A TOML value: a number, a boolean, or an inline array of tables.
    Toml,
}

/// Every key, as a path; the environment variable is its upper snake case.
const KEYS: &[(&str, Kind)] = &[
    ("listen", Kind::Str),
    ("data_dir", Kind::Str),
    ("upstream.url", Kind::Str),
    ("upstream.username", Kind::Str),
    ("upstream.password", Kind::Str),
    ("upstream.connect_timeout", Kind::Str),
    ("upstream.timeout", Kind::Str),
    ("upstream.read_timeout", Kind::Str),
    ("offline", Kind::Toml),
    ("cache.max_size", Kind::Str),
    ("cache.high_watermark", Kind::Toml),
    ("cache.low_watermark", Kind::Toml),
    ("cache.blob_idle_ttl", Kind::Str),
    ("cache.manifest_idle_ttl", Kind::Str),
    ("cache.tag_ttl", Kind::Str),
    ("cache.tag_ttl_rules", Kind::Toml),
    ("upstream.credential_hosts", Kind::Toml),
    ("tls.cert", Kind::Str),
    ("tls.key", Kind::Str),
    ("auth.htpasswd", Kind::Str),
    ("auth.realm", Kind::Str),
    ("server.max_header_size", Kind::Str),
    ("server.max_url_length", Kind::Toml),
    ("server.max_connections", Kind::Toml),
    ("server.header_read_timeout", Kind::Str),
    ("server.idle_timeout", Kind::Str),
];

/// Environment variables that are not config keys but belong to the binary.
const ENV_NOT_KEYS: &[&str] = &["REGMIRROR_CONFIG"];

/// `cache.tag_ttl` → `REGMIRROR_CACHE_TAG_TTL`.
pub fn env_name(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.replace('.', "_").to_ascii_uppercase())
}

/// A configuration that cannot be used; the message names key and value.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

/// Overrides from command-line flags, the highest precedence.
#[derive(Debug, Default, Clone)]
pub struct Flags {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub upstream: Option<Url>,
    pub offline: bool,
}

/// Loads the configuration: file (or the embedded defaults) < env < flags.
pub fn load(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
    flags: &Flags,
) -> Result<Config, ConfigError> {
    let (source, text) = match file {
        Some(path) => (
            path.display().to_string(),
            std::fs::read_to_string(path).map_err(|e| {
                ConfigError(format!("cannot read config file {}: {e}", path.display()))
            })?,
        ),
        None => ("embedded mirror.toml".to_owned(), EMBEDDED.to_owned()),
    };
    let mut table: toml::Table = toml::from_str(&text)
        .map_err(|e| ConfigError(format!("{source}: {}", e.to_string().trim_end())))?;
    let from_env = overlay_env(&mut table, env)?;
    let mut config: Config =
        serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            let path = e.path().to_string();
            let origin = from_env
                .get(&path)
                .map_or_else(|| source.clone(), |var| format!("environment {var}"));
            ConfigError(format!("{origin}: key {path}: {}", e.inner()))
        })?;
    if let Some(l) = flags.listen {
        config.listen = l;
    }
    if let Some(d) = &flags.data_dir {
        config.data_dir = d.clone();
    }
    if let Some(u) = &flags.upstream {
        config.upstream.url = u.clone();
    }
    if flags.offline {
        config.offline = true;
    }
    config.cache.check().map_err(ConfigError)?;
    config.check().map_err(ConfigError)?;
    Ok(config)
}

/// Writes each `REGMIRROR_*` variable into the table; returns key → variable.
fn overlay_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<BTreeMap<String, String>, ConfigError> {
    let known: BTreeMap<String, (&str, Kind)> = KEYS
        .iter()
        .map(|&(key, kind)| (env_name(key), (key, kind)))
        .collect();
    let mut applied = BTreeMap::new();
    for (var, value) in env {
        if !var.starts_with(ENV_PREFIX) || ENV_NOT_KEYS.contains(&var.as_str()) {
            continue;
        }
        let Some(&(key, kind)) = known.get(&var) else {
            return Err(ConfigError(format!(
                "environment {var}: no such config key (known: {})",
                known.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        };
        let value = match kind {
            Kind::Str => toml::Value::String(value),
            Kind::Toml => parse_toml_value(&value).ok_or_else(|| {
                ConfigError(format!(
                    "environment {var}: {value:?} is not a valid value for {key}"
                ))
            })?,
        };
        insert_path(table, key, value);
        applied.insert(key.to_owned(), var);
    }
    Ok(applied)
}

/// A TOML value written alone, e.g. `true`, `90` or `[{pattern = "*", ttl = "1m"}]`.
fn parse_toml_value(s: &str) -> Option<toml::Value> {
    let table: toml::Table = toml::from_str(&format!("v = {s}")).ok()?;
    table.get("v").cloned()
}

fn insert_path(table: &mut toml::Table, key: &str, value: toml::Value) {
    let mut parts: Vec<&str> = key.split('.').collect();
    let Some(leaf) = parts.pop() else { return };
    let mut cur = table;
    for p in parts {
        let entry = cur
            .entry(p.to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        let toml::Value::Table(t) = entry else { return };
        cur = t;
    }
    cur.insert(leaf.to_owned(), value);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn embedded_file_is_the_default() {
        let c = load(None, env(&[]), &Flags::default()).unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn precedence_flag_env_file_default() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("m.toml");
        std::fs::write(
            &f,
            "listen = \"127.0.0.1:1\"\n[cache]\ntag_ttl = \"1m\"\n[upstream]\nurl = \"http://a.example\"\n",
        )
        .unwrap();
        let e = env(&[
            ("REGMIRROR_LISTEN", "127.0.0.1:2"),
            ("REGMIRROR_UPSTREAM_PASSWORD", "hunter2"),
            ("PATH", "/bin"),
        ]);
        let flags = Flags {
            upstream: Some(Url::parse("http://b.example").unwrap()),
            ..Flags::default()
        };
        let c = load(Some(&f), e, &flags).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:2");
        assert_eq!(c.cache.tag_ttl, Duration::from_secs(60));
        assert_eq!(c.upstream.url.as_str(), "http://b.example/");
        assert_eq!(c.upstream.password.as_ref().unwrap().expose(), "hunter2");
        assert_eq!(c.upstream.timeout, Duration::from_secs(30));
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn every_key_can_come_from_the_environment() {
        let values = [
            ("listen", "127.0.0.1:9"),
            ("data_dir", "/tmp/x"),
            ("upstream.url", "https://r.example:8443"),
            ("upstream.username", "u"),
            ("upstream.password", "p"),
            ("upstream.connect_timeout", "1s"),
            ("upstream.timeout", "2s"),
            ("upstream.read_timeout", "3s"),
            ("offline", "true"),
            ("cache.max_size", "1.5GiB"),
            ("cache.high_watermark", "95"),
            ("cache.low_watermark", "50"),
            ("cache.blob_idle_ttl", "1d"),
            ("cache.manifest_idle_ttl", "0s"),
            ("cache.tag_ttl", "30d"),
            (
                "cache.tag_ttl_rules",
                r#"[{pattern = "*:latest", ttl = "1m"}]"#,
            ),
            ("upstream.credential_hosts", r#"["auth.example"]"#),
            ("tls.cert", "/c.pem"),
            ("tls.key", "/k.pem"),
            ("auth.htpasswd", "/h"),
            ("auth.realm", "r"),
            ("server.max_header_size", "16KiB"),
            ("server.max_url_length", "4096"),
            ("server.max_connections", "10"),
            ("server.header_read_timeout", "5s"),
            ("server.idle_timeout", "1m"),
        ];
        assert_eq!(values.len(), KEYS.len());
        let e: Vec<_> = values
            .iter()
            .map(|(k, v)| (env_name(k), v.to_string()))
            .collect();
        let c = load(None, e, &Flags::default()).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.upstream.read_timeout, Duration::from_secs(3));
        assert_eq!(c.cache.tag_ttl, Duration::from_secs(30 * 86400));
        assert_eq!(c.upstream.username.as_deref(), Some("u"));
        assert!(c.offline);
        assert_eq!(c.cache.max_size, ByteSize(3 << 29));
        assert_eq!(c.cache.budget().low, 3 << 28);
        assert_eq!(CacheConfig::idle_ttl(c.cache.manifest_idle_ttl), None);
        assert_eq!(c.cache.tag_rules()[0].ttl, Duration::from_secs(60));
        assert_eq!(c.upstream.credential_hosts, vec!["auth.example".to_owned()]);
        assert_eq!(c.tls.key, Some(PathBuf::from("/k.pem")));
        assert_eq!(c.server.max_connections, 10);
        assert_eq!(c.server.max_header_size, ByteSize(16384));
    }

    #[test]
    fn sizes() {
        assert_eq!(ByteSize::parse("20GiB"), Ok(ByteSize(20 << 30)));
        assert_eq!(ByteSize::parse("500 MB"), Ok(ByteSize(500_000_000)));
        assert_eq!(ByteSize::parse("1024"), Ok(ByteSize(1024)));
        assert_eq!(ByteSize::parse("1kib"), Ok(ByteSize(1024)));
        for bad in ["", "GiB", "-1GiB", "1 parsec", "1e99TiB"] {
            assert!(ByteSize::parse(bad).is_err(), "{bad}");
        }
        let e = load(
            None,
            env(&[("REGMIRROR_CACHE_MAX_SIZE", "lots")]),
            &Flags::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("cache.max_size") && e.contains("lots"), "{e}");
        let e = load(
            None,
            env(&[("REGMIRROR_CACHE_LOW_WATERMARK", "99")]),
            &Flags::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("cache.low_watermark"), "{e}");
    }

    #[test]
    fn errors_name_key_origin_and_value() {
        let e = load(
            None,
            env(&[("REGMIRROR_CACHE_TAG_TTL", "5x")]),
            &Flags::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("cache.tag_ttl"), "{e}");
        assert!(e.contains("REGMIRROR_CACHE_TAG_TTL"), "{e}");
        assert!(e.contains("\"5x\""), "{e}");

        let e = load(None, env(&[("REGMIRROR_NOPE", "1")]), &Flags::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("REGMIRROR_NOPE"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("m.toml");
        std::fs::write(&f, "[cache]\ntag_tl = \"1m\"\n").unwrap();
        let e = load(Some(&f), env(&[]), &Flags::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("tag_tl"), "{e}");

        std::fs::write(&f, "[upstream]\nurl = \"ftp://x\"\n").unwrap();
        let e = load(Some(&f), env(&[]), &Flags::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("upstream.url") && e.contains("ftp://x"), "{e}");

        let missing = dir.path().join("missing.toml");
        let e = load(Some(&missing), env(&[]), &Flags::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.toml"), "{e}");
    }
}
