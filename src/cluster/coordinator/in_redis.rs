//! [`RedisCoordinator`]: leases, locks and peers in a Redis the replicas
//! share. A lease is the key `<prefix>:lease:<digest>` (a lock
//! `<prefix>:lock:<name>`) holding `<token> <holder>` with a millisecond
//! expiry: taken with `SET NX PX`; renewed, released and taken over by Lua
//! scripts that compare the token first, so each change is one atomic
//! compare-and-set. Replicas announce themselves in the sorted set
//! `<prefix>:peers`, scored by the announcement's Unix milliseconds.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ::redis::Script;
use async_trait::async_trait;

use super::{lease_key, lock_key, new_token, Coordinator, Lease, Taken, PEERS_KEPT};
use crate::cluster::redis::RedisConn;
use crate::cluster::{Health, SharedError};
use crate::reference::Digest;

/// `SET NX PX`, or the value already there: nil when taken.
static TAKE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return false end
return redis.call('GET', KEYS[1])
",
    )
});

/// The value of `KEYS[1]` starts with the token `ARGV[1]` and a space.
const OWNS: &str = r"
local function owns(key, token)
  local v = redis.call('GET', key)
  return v and string.sub(v, 1, string.len(token) + 1) == token .. ' '
end
";

static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{OWNS}
if owns(KEYS[1], ARGV[1]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0"
    ))
});

static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{OWNS}
if owns(KEYS[1], ARGV[1]) then redis.call('DEL', KEYS[1]) return 1 end
return 0"
    ))
});

static TAKE_OVER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{OWNS}
if owns(KEYS[1], ARGV[1]) then redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) return 1 end
return 0"
    ))
});

/// The [`Coordinator`] over Redis; clones share the connection.
#[derive(Debug, Clone)]
pub struct RedisCoordinator {
    conn: RedisConn,
    prefix: String,
}

impl RedisCoordinator {
    /// Uses `conn`, with every key under `<prefix>:` (several mirrors, or
    /// tests, can share one Redis with prefixes of their own).
    pub fn new(conn: RedisConn, prefix: impl Into<String>) -> Self {
        Self {
            conn,
            prefix: prefix.into(),
        }
    }

    /// How Redis last answered.
    pub fn health(&self) -> Arc<Health> {
        self.conn.health()
    }

    fn key(&self, key: &str) -> String {
        format!("{}:{key}", self.prefix)
    }

    fn peers_key(&self) -> String {
        self.key("peers")
    }

    async fn take_key(
        &self,
        key: String,
        holder: &str,
        ttl: Duration,
    ) -> Result<Taken, SharedError> {
        let token = new_token();
        let held: Option<String> = self
            .conn
            .invoke(
                TAKE.key(self.key(&key))
                    .arg(format!("{token} {holder}"))
                    .arg(millis(ttl)),
            )
            .await?;
        Ok(match held {
            None => Taken::Mine(Lease { key, token }),
            Some(value) => {
                let (token, holder) = value.split_once(' ').unwrap_or((value.as_str(), ""));
                Taken::Held {
                    holder: holder.to_owned(),
                    token: token.to_owned(),
                }
            }
        })
    }
}

/// A TTL in milliseconds, at least 1 (`PX 0` is an error).
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[async_trait]
impl Coordinator for RedisCoordinator {
    async fn take(
        &self,
        digest: &Digest,
        holder: &str,
        ttl: Duration,
    ) -> Result<Taken, SharedError> {
        self.take_key(lease_key(digest), holder, ttl).await
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, SharedError> {
        let n: i64 = self
            .conn
            .invoke(
                RENEW
                    .key(self.key(&lease.key))
                    .arg(&lease.token)
                    .arg(millis(ttl)),
            )
            .await?;
        Ok(n == 1)
    }

    async fn release(&self, lease: &Lease) -> Result<(), SharedError> {
        let _: i64 = self
            .conn
            .invoke(RELEASE.key(self.key(&lease.key)).arg(&lease.token))
            .await?;
        Ok(())
    }

    async fn take_over(
        &self,
        digest: &Digest,
        seen: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, SharedError> {
        let key = lease_key(digest);
        let token = new_token();
        let n: i64 = self
            .conn
            .invoke(
                TAKE_OVER
                    .key(self.key(&key))
                    .arg(seen)
                    .arg(format!("{token} {holder}"))
                    .arg(millis(ttl)),
            )
            .await?;
        Ok((n == 1).then_some(Lease { key, token }))
    }

    async fn lock(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, SharedError> {
        match self.take_key(lock_key(name), holder, ttl).await? {
            Taken::Mine(lease) => Ok(Some(lease)),
            Taken::Held { .. } => Ok(None),
        }
    }

    async fn announce(&self, holder: &str, now: SystemTime) -> Result<(), SharedError> {
        let _: i64 = self
            .conn
            .query(
                ::redis::cmd("ZADD")
                    .arg(self.peers_key())
                    .arg(unix_ms(now))
                    .arg(holder),
            )
            .await?;
        Ok(())
    }

    async fn peers(
        &self,
        now: SystemTime,
        within: Duration,
    ) -> Result<Vec<(String, SystemTime)>, SharedError> {
        let since = unix_ms(now).saturating_sub(millis(within));
        let keep = since.saturating_sub(millis(PEERS_KEPT));
        let key = self.peers_key();
        let mut pipe = ::redis::pipe();
        pipe.atomic()
            .cmd("ZREMRANGEBYSCORE")
            .arg(&key)
            .arg("-inf")
            .arg(format!("({keep}"))
            .ignore()
            .cmd("ZRANGEBYSCORE")
            .arg(&key)
            .arg(since)
            .arg("+inf")
            .arg("WITHSCORES");
        let (seen,): (Vec<(String, f64)>,) = self.conn.pipe(&pipe).await?;
        let mut peers: Vec<(String, SystemTime)> = seen
            .into_iter()
            .map(|(holder, ms)| {
                (
                    holder,
                    UNIX_EPOCH + Duration::from_millis(ms.max(0.0) as u64),
                )
            })
            .collect();
        peers.sort();
        Ok(peers)
    }
}
