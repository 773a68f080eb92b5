//! The connection to Redis that the coordinator and the index share: one
//! reconnecting [`ConnectionManager`], a timeout on every call (and on every
//! connection attempt) so a dead or silent Redis never hangs a request, and
//! the [`Health`] every call reports to. Errors never carry the URL's
//! password: the URL is a [`Secret`], exposed only to connect, and any error
//! text that quotes the password has it replaced.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{Client, Cmd, FromRedisValue, Pipeline, RedisResult, ScriptInvocation};

use super::{Health, SharedError};
use crate::config::Secret;

/// The key prefix of a mirror's Redis keys, unless configured otherwise.
pub const DEFAULT_PREFIX: &str = "regmirror";

/// How long one call (or one connection attempt) may take.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// A handle on Redis; clones share the connection and the [`Health`].
#[derive(Clone)]
pub struct RedisConn {
    manager: ConnectionManager,
    health: Arc<Health>,
    timeout: Duration,
    /// Strings no error message may contain (the password, raw and decoded).
    redact: Arc<Vec<String>>,
    /// When the last call that asked Redis failed: for one `timeout` after
    /// it, calls fail at once without asking (a Redis that stopped
    /// answering costs one timeout per `timeout`, not one per call).
    failed_at: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

impl fmt::Debug for RedisConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the manager: its client's connection info holds the password.
        f.debug_struct("RedisConn")
            .field("timeout", &self.timeout)
            .field("up", &self.health.is_up())
            .finish_non_exhaustive()
    }
}

impl RedisConn {
    /// Connects to `url` (`redis://[:password@]host:port[/db]`), with
    /// [`TIMEOUT`] for the connection and for every call.
    pub async fn connect(url: &Secret) -> Result<Self, SharedError> {
        Self::connect_with_timeout(url, TIMEOUT).await
    }

    /// [`connect`](Self::connect) with another timeout.
    pub async fn connect_with_timeout(
        url: &Secret,
        timeout: Duration,
    ) -> Result<Self, SharedError> {
        let (client, redact) = client(url)?;
        let health = Arc::new(Health::new("redis"));
        let connecting = ConnectionManager::new_with_config(client, config(timeout));
        let manager = match tokio::time::timeout(timeout, connecting).await {
            Ok(Ok(manager)) => manager,
            Ok(Err(e)) => return Err(health.failed(SharedError::redis(redacted(&redact, &e)))),
            Err(_) => return Err(health.failed(timed_out(timeout))),
        };
        Ok(Self {
            manager,
            health,
            timeout,
            redact: Arc::new(redact),
            failed_at: Arc::default(),
        })
    }

    /// A handle that connects at its first call, so a mirror can start
    /// while Redis is down; fails only for a URL that is not one.
    pub fn lazy(url: &Secret, timeout: Duration) -> Result<Self, SharedError> {
        let (client, redact) = client(url)?;
        let manager = ConnectionManager::new_lazy_with_config(client, config(timeout))
            .map_err(|e| SharedError::redis(redacted(&redact, &e)))?;
        Ok(Self {
            manager,
            health: Arc::new(Health::new("redis")),
            timeout,
            redact: Arc::new(redact),
            failed_at: Arc::default(),
        })
    }

    /// How Redis last answered, for every user of this connection.
    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// Runs one command.
    pub(crate) async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, SharedError> {
        let mut conn = self.manager.clone();
        self.finish(cmd.query_async(&mut conn)).await
    }

    /// Runs a pipeline (a transaction when built with `.atomic()`).
    pub(crate) async fn pipe<T: FromRedisValue>(&self, pipe: &Pipeline) -> Result<T, SharedError> {
        let mut conn = self.manager.clone();
        self.finish(pipe.query_async(&mut conn)).await
    }

    /// Runs a Lua script (`EVALSHA`, loading it once when Redis lacks it).
    pub(crate) async fn invoke<T: FromRedisValue>(
        &self,
        script: &ScriptInvocation<'_>,
    ) -> Result<T, SharedError> {
        let mut conn = self.manager.clone();
        self.finish(script.invoke_async(&mut conn)).await
    }

    async fn finish<T>(
        &self,
        call: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, SharedError> {
        if let Some(at) = self.recently_failed() {
            return Err(SharedError::redis(format!(
                "not asked: Redis failed {} ms ago",
                at.elapsed().as_millis()
            )));
        }
        let result = match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(v)) => {
                self.health.ok();
                return Ok(v);
            }
            Ok(Err(e)) => SharedError::redis(redacted(&self.redact, &e)),
            Err(_) => timed_out(self.timeout),
        };
        *self.failed_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(std::time::Instant::now());
        Err(self.health.failed(result))
    }
}

impl RedisConn {
    /// When a call failed within the last `timeout`, if one did.
    fn recently_failed(&self) -> Option<std::time::Instant> {
        let at = (*self.failed_at.lock().unwrap_or_else(|p| p.into_inner()))?;
        (at.elapsed() < self.timeout).then_some(at)
    }
}

fn config(timeout: Duration) -> ConnectionManagerConfig {
    // Few quick retries: a call waits at most `timeout` anyway, and the next
    // call after a failed reconnect starts another one.
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(100))
        .set_max_delay(Duration::from_millis(500))
}

fn client(url: &Secret) -> Result<(Client, Vec<String>), SharedError> {
    let redact = secrets_of(url.expose());
    // The crate's own message could quote the URL: ours names no part of it.
    let client = Client::open(url.expose()).map_err(|e| {
        let kind = redact_in(&redact, format!("{:?}", e.kind()));
        SharedError::redis(format!("invalid Redis URL ({kind})"))
    })?;
    Ok((client, redact))
}

/// The password of a URL as written and percent-decoded.
fn secrets_of(url: &str) -> Vec<String> {
    let Ok(parsed) = url::Url::parse(url) else {
        return Vec::new();
    };
    let Some(raw) = parsed.password().filter(|p| !p.is_empty()) else {
        return Vec::new();
    };
    let decoded = percent_decode(raw);
    let mut out = vec![raw.to_owned()];
    if decoded != raw && !decoded.is_empty() {
        out.push(decoded);
    }
    out
}

fn percent_decode(s: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 3 <= bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn redacted(secrets: &[String], e: &dyn fmt::Display) -> String {
    redact_in(secrets, e.to_string())
}

fn redact_in(secrets: &[String], mut message: String) -> String {
    for s in secrets {
        message = message.replace(s.as_str(), "<redacted>");
    }
    message
}

fn timed_out(timeout: Duration) -> SharedError {
    SharedError::redis(format!("no answer within {timeout:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_is_redacted_raw_and_decoded() {
        let secrets = secrets_of("redis://user:p%40ss@localhost:6379/0");
        assert_eq!(secrets, vec!["p%40ss".to_owned(), "p@ss".to_owned()]);
        assert_eq!(
            redact_in(&secrets, "auth p@ss failed for p%40ss".into()),
            "auth <redacted> failed for <redacted>"
        );
        assert!(secrets_of("redis://localhost:6379").is_empty());
    }

    #[tokio::test]
    async fn an_invalid_url_is_refused_without_quoting_it() {
        let e = RedisConn::lazy(&Secret::new("nonsense://:hunter22@x"), TIMEOUT).unwrap_err();
        assert_eq!(e.part, "redis");
        assert!(!e.message.contains("hunter22"), "{}", e.message);
    }

    #[tokio::test]
    async fn a_refused_connection_fails_within_the_timeout_without_the_password() {
        // Port 1 on loopback: nothing listens there.
        let url = Secret::new("redis://:hunter22@127.0.0.1:1/");
        let e = RedisConn::connect_with_timeout(&url, Duration::from_millis(500))
            .await
            .unwrap_err();
        assert!(!e.message.contains("hunter22"), "{}", e.message);
    }
}
