//! Loading: the file (or the embedded defaults), then `REGMIRROR_*`
//! environment variables, then flags. Errors name the key, where its value
//! came from, and the value.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use url::Url;

use super::{Config, EMBEDDED, ENV_PREFIX};

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
    ("upstream.name", Kind::Str),
    ("upstream.url", Kind::Str),
    ("upstream.username", Kind::Str),
    ("upstream.password", Kind::Str),
    ("upstream.connect_timeout", Kind::Str),
    ("upstream.timeout", Kind::Str),
    ("upstream.read_timeout", Kind::Str),
    ("upstream.retries", Kind::Toml),
    ("upstream.retry_backoff", Kind::Str),
    ("upstream.min_rate", Kind::Str),
    ("upstream.min_rate_window", Kind::Str),
    ("offline", Kind::Toml),
    ("cache.max_size", Kind::Str),
    ("cache.high_watermark", Kind::Toml),
    ("cache.low_watermark", Kind::Toml),
    ("cache.blob_idle_ttl", Kind::Str),
    ("cache.manifest_idle_ttl", Kind::Str),
    ("cache.tag_ttl", Kind::Str),
    ("cache.tag_ttl_rules", Kind::Toml),
    ("cache.max_downloads", Kind::Toml),
    ("cache.min_free", Kind::Str),
    ("upstream.credential_hosts", Kind::Toml),
    ("upstream.credentials_for", Kind::Toml),
    ("upstream.tag_ttl", Kind::Str),
    ("upstream.allow", Kind::Toml),
    ("upstream.deny", Kind::Toml),
    ("upstreams", Kind::Toml),
    ("tls.cert", Kind::Str),
    ("tls.key", Kind::Str),
    ("auth.htpasswd", Kind::Str),
    ("auth.realm", Kind::Str),
    ("auth.bcrypt_threads", Kind::Toml),
    ("auth.max_failures", Kind::Toml),
    ("auth.failure_window", Kind::Str),
    ("auth.anonymous_pull", Kind::Toml),
    ("auth.access", Kind::Toml),
    ("server.max_header_size", Kind::Str),
    ("server.max_url_length", Kind::Toml),
    ("server.max_connections", Kind::Toml),
    ("server.max_connections_per_address", Kind::Toml),
    ("server.header_read_timeout", Kind::Str),
    ("server.header_grace", Kind::Str),
    ("server.header_min_rate", Kind::Str),
    ("server.send_timeout", Kind::Str),
    ("server.min_send_rate", Kind::Str),
    ("server.idle_timeout", Kind::Str),
    ("metrics.listen", Kind::Str),
    ("storage.backend", Kind::Str),
    ("storage.max_size", Kind::Str),
    ("storage.s3.endpoint", Kind::Str),
    ("storage.s3.bucket", Kind::Str),
    ("storage.s3.region", Kind::Str),
    ("storage.s3.prefix", Kind::Str),
    ("storage.s3.path_style", Kind::Toml),
    ("storage.s3.allow_http", Kind::Toml),
    ("storage.s3.access_key_id", Kind::Str),
    ("storage.s3.secret_access_key", Kind::Str),
    ("cluster.redis", Kind::Str),
    ("cluster.advertise", Kind::Str),
    ("cluster.secret", Kind::Str),
    ("hosted.repos", Kind::Toml),
    ("hosted.max_size", Kind::Str),
    ("hosted.delete", Kind::Toml),
    ("hosted.upload_ttl", Kind::Str),
    ("hosted.shadowing", Kind::Toml),
    ("warm", Kind::Toml),
];

/// AWS's own names for the bucket's credentials, read when the
/// `REGMIRROR_STORAGE_S3_*` ones are not set.
const AWS_CREDENTIALS: &[(&str, &str)] = &[
    ("AWS_ACCESS_KEY_ID", "storage.s3.access_key_id"),
    ("AWS_SECRET_ACCESS_KEY", "storage.s3.secret_access_key"),
];

/// Environment variables that are not config keys but belong to the binary.
const ENV_NOT_KEYS: &[&str] = &["REGMIRROR_CONFIG", crate::prefetch::PASSWORD_ENV];

/// Kubernetes puts `REGMIRROR_SERVICE_HOST`, `REGMIRROR_PORT_5000_TCP` and
/// the like into every pod of a namespace with a Service named `regmirror`.
/// No config key starts with `service` or `port`, so these are never keys.
fn is_service_link(var: &str) -> bool {
    let rest = &var[ENV_PREFIX.len()..];
    rest.starts_with("SERVICE_") || rest == "PORT" || rest.starts_with("PORT_")
}

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
                .or_else(|| {
                    path.starts_with("upstreams")
                        .then(|| from_env.get("upstreams"))?
                })
                .or_else(|| path.starts_with("warm").then(|| from_env.get("warm"))?)
                .map_or_else(|| source.clone(), |var| format!("environment {var}"));
            if is_secret(&path) {
                // serde quotes the value it refused; this one is a secret.
                return ConfigError(format!(
                    "{origin}: key {path}: not a string (the value is not shown)"
                ));
            }
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
    config.storage.check().map_err(ConfigError)?;
    config.cluster.check(&config.storage).map_err(ConfigError)?;
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
    let mut aws = Vec::new();
    for (var, value) in env {
        if let Some(&(_, key)) = AWS_CREDENTIALS.iter().find(|(name, _)| *name == var) {
            aws.push((key, var, value));
            continue;
        }
        if !var.starts_with(ENV_PREFIX)
            || ENV_NOT_KEYS.contains(&var.as_str())
            || is_service_link(&var)
        {
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
            Kind::Toml => parse_toml_value(&value).map_err(|e| {
                // `upstreams` carries passwords: name where it broke, not the value
                // (nor the TOML error's snippet of it).
                ConfigError(if may_hold_secrets(key) {
                    format!(
                        "environment {var}: not a valid value for {key} ({} at character {}; \
                         the value is not shown, it may hold passwords)",
                        e.message().trim_end(),
                        e.span().map_or(0, |s| s.start.saturating_sub(VALUE_AT) + 1),
                    )
                } else {
                    format!("environment {var}: {value:?} is not a valid value for {key}")
                })
            })?,
        };
        insert_path(table, key, value);
        applied.insert(key.to_owned(), var);
    }
    for (key, var, value) in aws {
        if !applied.contains_key(key) && lookup_path(table, key).is_none() {
            insert_path(table, key, toml::Value::String(value));
            applied.insert(key.to_owned(), var);
        }
    }
    Ok(applied)
}

/// Where the value starts in the document [`parse_toml_value`] parses.
const VALUE_AT: usize = "v = ".len();

/// A TOML value written alone, e.g. `true`, `90` or `[{pattern = "*", ttl = "1m"}]`.
fn parse_toml_value(s: &str) -> Result<toml::Value, toml::de::Error> {
    let mut table: toml::Table = toml::from_str(&format!("v = {s}"))?;
    // The document has exactly the key `v`.
    Ok(table.remove("v").unwrap_or(toml::Value::Boolean(false)))
}

/// Keys whose values may carry credentials, never quoted in an error.
fn may_hold_secrets(key: &str) -> bool {
    key == "upstreams" || is_secret(key)
}

/// Keys whose values are secrets (a Redis URL may carry a password).
fn is_secret(key: &str) -> bool {
    key.ends_with("password")
        || key.ends_with("secret")
        || key.ends_with("access_key_id")
        || key.ends_with("secret_access_key")
        || key == "cluster.redis"
}

fn lookup_path<'a>(table: &'a toml::Table, key: &str) -> Option<&'a toml::Value> {
    let mut parts = key.split('.');
    let mut value = table.get(parts.next()?)?;
    for p in parts {
        value = value.as_table()?.get(p)?;
    }
    Some(value)
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
    use std::time::Duration;

    use super::*;
    use crate::config::{ByteSize, CacheConfig};

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
            ("upstream.retries", "2"),
            ("upstream.retry_backoff", "250ms"),
            ("upstream.min_rate", "4KiB"),
            ("upstream.min_rate_window", "10s"),
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
            ("cache.max_downloads", "7"),
            ("cache.min_free", "2.5%"),
            ("upstream.credential_hosts", r#"["auth.example"]"#),
            ("upstream.credentials_for", r#"["myorg/*"]"#),
            ("upstream.name", "docker.io"),
            ("upstream.tag_ttl", "2m"),
            ("upstream.allow", r#"["library/*"]"#),
            ("upstream.deny", r#"["library/bad"]"#),
            (
                "upstreams",
                r#"[{name = "ghcr.io", url = "https://ghcr.io", tag_ttl = "1m"}]"#,
            ),
            ("tls.cert", "/c.pem"),
            ("tls.key", "/k.pem"),
            ("auth.htpasswd", "/h"),
            ("auth.realm", "r"),
            ("auth.bcrypt_threads", "3"),
            ("auth.max_failures", "0"),
            ("auth.failure_window", "5m"),
            ("auth.anonymous_pull", "true"),
            (
                "auth.access",
                r#"[{users = ["ci"], repos = ["myorg/*"], actions = ["pull", "push"]}]"#,
            ),
            ("server.max_header_size", "16KiB"),
            ("server.max_url_length", "4096"),
            ("server.max_connections", "10"),
            ("server.max_connections_per_address", "4"),
            ("server.header_read_timeout", "5s"),
            ("server.header_grace", "2s"),
            ("server.header_min_rate", "1KiB"),
            ("server.send_timeout", "20s"),
            ("server.min_send_rate", "4KiB"),
            ("server.idle_timeout", "1m"),
            ("metrics.listen", "127.0.0.1:9090"),
            ("storage.backend", "s3"),
            ("storage.max_size", "1TiB"),
            ("storage.s3.endpoint", "http://127.0.0.1:3900"),
            ("storage.s3.bucket", "cache"),
            ("storage.s3.region", "garage"),
            ("storage.s3.prefix", "m1/"),
            ("storage.s3.path_style", "true"),
            ("storage.s3.allow_http", "true"),
            ("storage.s3.access_key_id", "GK1"),
            ("storage.s3.secret_access_key", "s3cret"),
            ("cluster.redis", "redis://:pw@127.0.0.1:6379/0"),
            ("cluster.advertise", "http://10.0.0.7:5000"),
            ("cluster.secret", "0123456789abcdef"),
            ("hosted.repos", r#"["myorg/*"]"#),
            ("hosted.max_size", "2GiB"),
            ("hosted.delete", "true"),
            ("hosted.upload_ttl", "1h"),
            ("hosted.shadowing", "[]"),
            (
                "warm",
                r#"[{images = ["library/alpine:3"], every = "1h", platforms = ["all"]}]"#,
            ),
        ];
        assert_eq!(values.len(), KEYS.len());
        let e: Vec<_> = values
            .iter()
            .map(|(k, v)| (env_name(k), v.to_string()))
            .collect();
        let c = load(None, e, &Flags::default()).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.upstream.read_timeout, Duration::from_secs(3));
        assert_eq!(c.upstream.retries, 2);
        assert_eq!(c.upstream.retry_backoff, Duration::from_millis(250));
        assert_eq!(c.upstream.min_rate, ByteSize(4096));
        assert_eq!(c.upstream.min_rate_window, Duration::from_secs(10));
        assert_eq!(c.cache.tag_ttl, Duration::from_secs(30 * 86400));
        assert_eq!(c.upstream.username.as_deref(), Some("u"));
        assert!(c.offline);
        assert_eq!(c.cache.max_size, ByteSize(3 << 29));
        assert_eq!(c.cache.budget().low, 3 << 28);
        assert_eq!(CacheConfig::idle_ttl(c.cache.manifest_idle_ttl), None);
        assert_eq!(c.cache.tag_rules()[0].ttl, Duration::from_secs(60));
        assert_eq!(c.cache.max_downloads, 7);
        assert_eq!(
            c.cache.min_free,
            crate::config::MinFree::PerTenThousand(250)
        );
        assert_eq!(c.upstream.credential_hosts, vec!["auth.example".to_owned()]);
        assert_eq!(c.upstream.credentials_for, vec!["myorg/*".to_owned()]);
        assert_eq!(c.tls.key, Some(PathBuf::from("/k.pem")));
        assert!(c.auth.anonymous_pull);
        assert_eq!(c.auth.access[0].users, vec!["ci".to_owned()]);
        assert_eq!(c.hosted.repos, vec!["myorg/*".to_owned()]);
        assert_eq!(c.hosted.max_size, Some(ByteSize(2 << 30)));
        assert!(c.hosted.delete);
        assert_eq!(c.hosted.upload_ttl, Duration::from_secs(3600));
        assert_eq!(c.warm[0].images, vec!["library/alpine:3".to_owned()]);
        assert_eq!(c.warm[0].every, Duration::from_secs(3600));
        assert_eq!(c.warm[0].platforms, vec!["all".to_owned()]);
        assert_eq!(c.server.max_connections, 10);
        assert_eq!(c.server.max_connections_per_address, 4);
        assert_eq!(c.server.header_grace, Duration::from_secs(2));
        assert_eq!(c.server.header_min_rate, ByteSize(1024));
        assert_eq!(c.server.send_timeout, Duration::from_secs(20));
        assert_eq!(c.server.min_send_rate, ByteSize(4096));
        assert_eq!(c.auth.bcrypt_threads, 3);
        assert_eq!(c.auth.max_failures, 0);
        assert_eq!(c.auth.failure_window, Duration::from_secs(300));
        assert_eq!(c.server.max_header_size, ByteSize(16384));
        assert_eq!(c.upstream.tag_ttl, Some(Duration::from_secs(120)));
        assert!(c.upstream.permits("library/alpine"));
        assert!(!c.upstream.permits("library/bad"));
        assert!(!c.upstream.permits("bitnami/redis"));
        assert_eq!(c.upstreams[0].name, "ghcr.io");
        assert_eq!(c.upstreams[0].url.as_str(), "https://ghcr.io/");
        assert_eq!(c.upstreams[0].timeout, Duration::from_secs(30));
        assert_eq!(c.storage.backend, crate::config::Backend::S3);
        assert_eq!(c.storage.max_size, Some(ByteSize(1 << 40)));
        assert_eq!(c.storage.s3.bucket.as_deref(), Some("cache"));
        assert_eq!(c.storage.s3.region, "garage");
        assert_eq!(c.storage.s3.prefix, "m1/");
        assert!(c.storage.s3.path_style);
        assert!(c.storage.s3.allow_http);
        assert_eq!(
            c.storage.s3.secret_access_key.as_ref().unwrap().expose(),
            "s3cret"
        );
        assert_eq!(
            c.cluster.advertise.as_ref().unwrap().as_str(),
            "http://10.0.0.7:5000/"
        );
        assert_eq!(
            c.cluster.secret.as_ref().unwrap().expose(),
            "0123456789abcdef"
        );
        assert!(c.cluster.enabled());
        let debug = format!("{c:?}");
        for secret in ["s3cret", ":pw@", "0123456789abcdef", "GK1"] {
            assert!(!debug.contains(secret), "{secret} in {debug}");
        }
    }

    #[test]
    fn bucket_credentials_fall_back_to_aws_names() {
        let base = [
            ("REGMIRROR_STORAGE_BACKEND", "s3"),
            ("REGMIRROR_STORAGE_S3_BUCKET", "b"),
            ("AWS_ACCESS_KEY_ID", "aws-id"),
            ("AWS_SECRET_ACCESS_KEY", "aws-key"),
        ];
        let c = load(None, env(&base), &Flags::default()).unwrap();
        assert_eq!(
            c.storage.s3.access_key_id.as_ref().unwrap().expose(),
            "aws-id"
        );
        let mut ours = base.to_vec();
        ours.push(("REGMIRROR_STORAGE_S3_ACCESS_KEY_ID", "ours"));
        ours.push(("REGMIRROR_STORAGE_S3_SECRET_ACCESS_KEY", "ours-key"));
        let c = load(None, env(&ours), &Flags::default()).unwrap();
        assert_eq!(
            c.storage.s3.access_key_id.as_ref().unwrap().expose(),
            "ours"
        );
        assert_eq!(
            c.storage.s3.secret_access_key.as_ref().unwrap().expose(),
            "ours-key"
        );
    }

    #[test]
    fn cluster_settings_are_checked_without_quoting_secrets() {
        let s3 = [
            ("REGMIRROR_STORAGE_BACKEND", "s3"),
            ("REGMIRROR_STORAGE_S3_BUCKET", "b"),
        ];
        let fails = |extra: &[(&str, &str)]| {
            let mut all = s3.to_vec();
            all.extend_from_slice(extra);
            load(None, env(&all), &Flags::default())
                .unwrap_err()
                .to_string()
        };
        let e = load(
            None,
            env(&[("REGMIRROR_STORAGE_BACKEND", "s3")]),
            &Flags::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("storage.s3.bucket"), "{e}");
        let e = fails(&[("REGMIRROR_STORAGE_S3_ENDPOINT", "http://s3.example.com")]);
        assert!(e.contains("plain HTTP") && e.contains("allow_http"), "{e}");
        let asked = [
            ("REGMIRROR_STORAGE_BACKEND", "s3"),
            ("REGMIRROR_STORAGE_S3_BUCKET", "b"),
            ("REGMIRROR_STORAGE_S3_ENDPOINT", "http://garage:3900"),
            ("REGMIRROR_STORAGE_S3_ALLOW_HTTP", "true"),
        ];
        let c = load(None, env(&asked), &Flags::default()).unwrap();
        assert_eq!(c.storage.warnings().len(), 1, "plain HTTP is warned about");
        let e = fails(&[("REGMIRROR_CLUSTER_REDIS", "http://:hunter2@r")]);
        assert!(e.contains("cluster.redis") && !e.contains("hunter2"), "{e}");
        let e = fails(&[("REGMIRROR_CLUSTER_REDIS", "redis://r:6379")]);
        assert!(e.contains("cluster.advertise"), "{e}");
        let e = fails(&[("REGMIRROR_CLUSTER_REDIS", "rediss://:hunter2@r:6380")]);
        assert!(e.contains("not supported") && !e.contains("hunter2"), "{e}");
        let e = fails(&[
            ("REGMIRROR_CLUSTER_REDIS", "redis://r:6379"),
            ("REGMIRROR_CLUSTER_ADVERTISE", "http://10.0.0.7:5000"),
            ("REGMIRROR_CLUSTER_SECRET", "short"),
        ]);
        assert!(e.contains("cluster.secret") && !e.contains("short"), "{e}");
        let e = load(
            None,
            env(&[("REGMIRROR_CLUSTER_REDIS", "redis://r:6379")]),
            &Flags::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("storage.backend"), "{e}");
    }

    #[test]
    fn upstream_names_are_hosts_and_unique() {
        for (bad, why) in [
            (
                r#"[{name = "docker.io", url = "https://x.example"}]"#,
                "two upstreams",
            ),
            (r#"[{url = "https://x.example"}]"#, "two upstreams"),
            (
                r#"[{name = "Bad_Host", url = "https://x.example"}]"#,
                "not a registry host",
            ),
            (
                r#"[{name = "h.example:5000", url = "https://x.example"}]"#,
                "not a registry host",
            ),
        ] {
            let e = load(
                None,
                env(&[("REGMIRROR_UPSTREAMS", bad)]),
                &Flags::default(),
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains("upstreams[0].name") && e.contains(why), "{e}");
        }
    }

    #[test]
    fn errors_never_quote_upstream_passwords() {
        let cases = [
            ("REGMIRROR_UPSTREAM_URL", "https://bot:hunter2@r.example"),
            (
                "REGMIRROR_UPSTREAMS",
                r#"[{name = "ghcr.io", url = "https://ghcr.io", password = "hunter2"#,
            ),
            (
                "REGMIRROR_UPSTREAMS",
                r#"[{name = "ghcr.io", url = "https://bot:hunter2@ghcr.io"}]"#,
            ),
            (
                "REGMIRROR_UPSTREAMS",
                r#"[{name = "ghcr.io", url = "https://ghcr.io", password = 4242}]"#,
            ),
        ];
        for (var, value) in cases {
            let e = load(None, env(&[(var, value)]), &Flags::default())
                .unwrap_err()
                .to_string();
            assert!(!e.contains("hunter2") && !e.contains("4242"), "{e}");
            assert!(e.contains(var), "the error names its origin: {e}");
        }
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("m.toml");
        std::fs::write(&f, "[upstream]\npassword = 4242\n").unwrap();
        let e = load(Some(&f), env(&[]), &Flags::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("upstream.password") && !e.contains("4242"),
            "{e}"
        );
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

        let k8s = env(&[
            ("REGMIRROR_SERVICE_HOST", "10.0.0.1"),
            ("REGMIRROR_PORT", "tcp://10.0.0.1:5000"),
            ("REGMIRROR_PORT_5000_TCP_ADDR", "10.0.0.1"),
            // prefetch's password, not a key of the mirror.
            ("REGMIRROR_PREFETCH_PASSWORD", "gordon"),
        ]);
        assert!(load(None, k8s, &Flags::default()).is_ok());
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
