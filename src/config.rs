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
    /// Cache freshness.
    pub cache: CacheConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 5000)),
            data_dir: PathBuf::from("./data"),
            upstream: UpstreamConfig::default(),
            cache: CacheConfig::default(),
        }
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
        }
    }
}

fn docker_hub() -> Url {
    // A literal that always parses; `Url` has no const constructor.
    Url::parse("https://registry-1.docker.io").unwrap_or_else(|_| unreachable!())
}

/// Cache freshness policy.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// How long a tag → digest mapping is trusted before a HEAD revalidates it.
    #[serde(with = "humantime_serde_compat")]
    pub tag_ttl: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            tag_ttl: Duration::from_secs(5 * 60),
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
    Str,
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
    ("cache.tag_ttl", Kind::Str),
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
        };
        insert_path(table, key, value);
        applied.insert(key.to_owned(), var);
    }
    Ok(applied)
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
            ("cache.tag_ttl", "30d"),
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
