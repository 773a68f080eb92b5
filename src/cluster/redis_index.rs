//! [`RedisIndex`]: the [`Index`] of the shared tier, kept entirely in Redis:
//! tags, tag lists, repositories and memberships every replica sees, and the
//! bucket's items (size and last access of each) for the bucket's evictor.
//!
//! Keys, all under a prefix (`P`, [`DEFAULT_PREFIX`](super::redis::DEFAULT_PREFIX) unless
//! configured otherwise):
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `P:tags:<repo>` | hash | tag → JSON [`TagEntry`] |
//! | `P:tagged:<digest>` | set | `<repo> <tag>` of the tags pointing at it |
//! | `P:taglist:<repo>` | string | JSON list of tags |
//! | `P:holds:<repo>` | set | digests the repository holds |
//! | `P:heldby:<digest>` | set | repositories holding it |
//! | `P:repos` | set | repositories with a tag, a membership or a tag list |
//! | `P:sizes` | hash | `<kind>:<digest>` → bytes |
//! | `P:access` | sorted set | `<kind>:<digest>` by last access (Unix ms) |
//! | `P:total` | string | the sum of `P:sizes` |
//! | `P:scans`, `P:scan:mark`, `P:scan:changed` | | see below |
//!
//! Every change that touches more than one key is one Lua script (or a
//! `MULTI` transaction), so replicas never see half of one: `forget` and
//! `forget_if` remove an item and prune what only existed for it as
//! [`LocalIndex`](crate::cache::store::local_index::LocalIndex) does. The
//! scripts build key names from the prefix, so this needs a standalone Redis
//! (or a primary with replicas), not Redis Cluster.
//!
//! Access times are kept to the millisecond: an entry read back has its
//! `last_access` truncated, and [`Index::forget_if`] compares at that
//! precision.
//!
//! Scans (a simplification of the local index's bookkeeping): one bucket
//! scan runs at a time cluster-wide (its evictor's lock holder runs it).
//! `begin_scan` increments the counter `P:scans` and stores it as
//! `P:scan:mark` (expiring after an hour); while a mark is set, every
//! record, touch and forget adds its item to `P:scan:changed`, and
//! `reconcile` leaves those items alone. A newer `begin_scan` supersedes the
//! mark (and empties the set); a reconcile whose mark is no longer the
//! current one, or lapsed, does nothing.
//!
//! The [`Index`] methods return plain values: on a Redis error (reported to
//! [`Health`]) reads answer empty (`None`, `false`, nothing) and writes are
//! dropped.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ::redis::Script;
use async_trait::async_trait;

use super::redis::RedisConn;
use super::{Health, SharedError};
use crate::cache::store::{
    ContentEntry, ContentKey, Flush, Found, Index, Kind, ScanMark, TagEntry,
};
use crate::reference::{Digest, RepoName, Tag};

/// How long a scan mark lasts: a scan that takes longer is not reconciled.
const SCAN_MARK_SECS: u64 = 3600;

/// Items per reconcile script call, so no single call blocks Redis long.
const RECONCILE_BATCH: usize = 500;

/// What the scripts share. `ARGV[1]` is always the prefix.
const PRELUDE: &str = r"
local P = ARGV[1]
local SIZES = P .. ':sizes'
local ACCESS = P .. ':access'
local TOTAL = P .. ':total'
local REPOS = P .. ':repos'
local MARK = P .. ':scan:mark'
local CHANGED = P .. ':scan:changed'

-- Notes a recorded, touched or forgotten item for the scan in progress.
local function changed(field)
  local ttl = redis.call('PTTL', MARK)
  if ttl > 0 then
    redis.call('SADD', CHANGED, field)
    redis.call('PEXPIRE', CHANGED, ttl)
  end
end

local function digest_of_tag(json)
  local ok, entry = pcall(cjson.decode, json)
  if ok and type(entry) == 'table' then return entry.digest end
  return nil
end

-- Drops the repository from P:repos when nothing of it is left.
local function tidy(repo)
  if redis.call('EXISTS', P .. ':tags:' .. repo) == 0
    and redis.call('EXISTS', P .. ':holds:' .. repo) == 0
    and redis.call('EXISTS', P .. ':taglist:' .. repo) == 0 then
    redis.call('SREM', REPOS, repo)
  end
end

-- Forgets an item and what only existed for it: its digest's memberships
-- (unless stored as the other kind), the tags pointing at a manifest, the
-- tag list of a repository left with no tag and no membership.
local function forget(kind, digest)
  local field = kind .. ':' .. digest
  local old = redis.call('HGET', SIZES, field)
  if old then
    redis.call('HDEL', SIZES, field)
    redis.call('DECRBY', TOTAL, old)
  end
  redis.call('ZREM', ACCESS, field)
  changed(field)
  local other = (kind == 'blob' and 'manifest' or 'blob') .. ':' .. digest
  local visited = {}
  if redis.call('HEXISTS', SIZES, other) == 0 then
    local heldby = P .. ':heldby:' .. digest
    for _, repo in ipairs(redis.call('SMEMBERS', heldby)) do
      redis.call('SREM', P .. ':holds:' .. repo, digest)
      table.insert(visited, repo)
    end
    redis.call('DEL', heldby)
  end
  if kind == 'manifest' then
    local tagged = P .. ':tagged:' .. digest
    for _, m in ipairs(redis.call('SMEMBERS', tagged)) do
      local sp = string.find(m, ' ', 1, true)
      if sp then
        local repo = string.sub(m, 1, sp - 1)
        local tag = string.sub(m, sp + 1)
        local tags = P .. ':tags:' .. repo
        local v = redis.call('HGET', tags, tag)
        if v and digest_of_tag(v) == digest then
          redis.call('HDEL', tags, tag)
        end
        table.insert(visited, repo)
      end
    end
    redis.call('DEL', tagged)
  end
  for _, repo in ipairs(visited) do
    if redis.call('EXISTS', P .. ':tags:' .. repo) == 0
      and redis.call('EXISTS', P .. ':holds:' .. repo) == 0 then
      redis.call('DEL', P .. ':taglist:' .. repo)
      redis.call('SREM', REPOS, repo)
    end
  end
end
";

fn script(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}\n{body}"))
}

/// ARGV: prefix, field, size, ms.
static RECORD: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
local old = redis.call('HGET', SIZES, ARGV[2])
redis.call('HSET', SIZES, ARGV[2], ARGV[3])
redis.call('ZADD', ACCESS, ARGV[4], ARGV[2])
redis.call('INCRBY', TOTAL, ARGV[3])
if old then redis.call('DECRBY', TOTAL, old) end
changed(ARGV[2])
return 1",
    )
});

/// ARGV: prefix, field, ms.
static TOUCH: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
if redis.call('HEXISTS', SIZES, ARGV[2]) == 0 then return 0 end
redis.call('ZADD', ACCESS, ARGV[3], ARGV[2])
changed(ARGV[2])
return 1",
    )
});

/// ARGV: prefix, kind, digest.
static FORGET: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
forget(ARGV[2], ARGV[3])
return 1",
    )
});

/// ARGV: prefix, kind, digest, size seen, ms seen.
static FORGET_IF: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
local field = ARGV[2] .. ':' .. ARGV[3]
local size = redis.call('HGET', SIZES, field)
if not size or size ~= ARGV[4] then return 0 end
local ms = redis.call('ZSCORE', ACCESS, field)
if not ms or tonumber(ms) ~= tonumber(ARGV[5]) then return 0 end
forget(ARGV[2], ARGV[3])
return 1",
    )
});

/// ARGV: prefix, n. Flat `field, ms, size` of the n least recently accessed.
static OLDEST: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
local r = redis.call('ZRANGE', ACCESS, 0, tonumber(ARGV[2]) - 1, 'WITHSCORES')
local out = {}
for i = 1, #r, 2 do
  local size = redis.call('HGET', SIZES, r[i])
  if size then
    table.insert(out, r[i])
    table.insert(out, r[i + 1])
    table.insert(out, size)
  end
end
return out",
    )
});

/// ARGV: prefix, repo, tag, JSON entry, digest.
static SET_TAG: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
local repo, tag, digest = ARGV[2], ARGV[3], ARGV[5]
local tags = P .. ':tags:' .. repo
local old = redis.call('HGET', tags, tag)
redis.call('HSET', tags, tag, ARGV[4])
if old then
  local was = digest_of_tag(old)
  if was and was ~= digest then
    redis.call('SREM', P .. ':tagged:' .. was, repo .. ' ' .. tag)
  end
end
redis.call('SADD', P .. ':tagged:' .. digest, repo .. ' ' .. tag)
redis.call('SADD', REPOS, repo)
return 1",
    )
});

/// ARGV: prefix, repo, tag.
static REMOVE_TAG: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
local repo, tag = ARGV[2], ARGV[3]
local tags = P .. ':tags:' .. repo
local old = redis.call('HGET', tags, tag)
if not old then return 0 end
redis.call('HDEL', tags, tag)
local was = digest_of_tag(old)
if was then redis.call('SREM', P .. ':tagged:' .. was, repo .. ' ' .. tag) end
tidy(repo)
return 1",
    )
});

/// ARGV: prefix, mark lifetime (s). Returns the new mark.
static BEGIN_SCAN: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
local n = redis.call('INCR', P .. ':scans')
redis.call('SET', MARK, n, 'EX', ARGV[2])
redis.call('DEL', CHANGED)
return n",
    )
});

/// ARGV: prefix, mark, then `field, size, ms` per item found. Adds those
/// unknown and not changed since the mark; -1 when the mark is not current.
static RECONCILE_ADD: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
if redis.call('GET', MARK) ~= ARGV[2] then return -1 end
local added = 0
for i = 3, #ARGV, 3 do
  local field = ARGV[i]
  if redis.call('SISMEMBER', CHANGED, field) == 0
    and redis.call('HSETNX', SIZES, field, ARGV[i + 1]) == 1 then
    redis.call('ZADD', ACCESS, ARGV[i + 2], field)
    redis.call('INCRBY', TOTAL, ARGV[i + 1])
    added = added + 1
  end
end
return added",
    )
});

/// ARGV: prefix, mark, then `kind, digest` per item the scan did not find.
/// Forgets those still known and not changed since the mark.
static RECONCILE_GONE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
if redis.call('GET', MARK) ~= ARGV[2] then return -1 end
local gone = 0
for i = 3, #ARGV, 2 do
  local field = ARGV[i] .. ':' .. ARGV[i + 1]
  if redis.call('SISMEMBER', CHANGED, field) == 0
    and redis.call('HEXISTS', SIZES, field) == 1 then
    forget(ARGV[i], ARGV[i + 1])
    gone = gone + 1
  end
end
return gone",
    )
});

/// ARGV: prefix, mark. Ends the scan if it is still the current one.
static END_SCAN: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
if redis.call('GET', MARK) ~= ARGV[2] then return 0 end
redis.call('DEL', MARK, CHANGED)
return 1",
    )
});

/// The shared tier's [`Index`] in Redis; clones share the connection.
#[derive(Debug, Clone)]
pub struct RedisIndex {
    conn: RedisConn,
    prefix: String,
}

/// `<kind>:<digest>`, the member naming an item in `P:sizes` and `P:access`.
fn field(key: &ContentKey) -> String {
    format!("{}:{}", key.kind.as_str(), key.digest)
}

fn parse_field(field: &str) -> Option<ContentKey> {
    let (kind, digest) = field.split_once(':')?;
    let kind = match kind {
        "blob" => Kind::Blob,
        "manifest" => Kind::Manifest,
        _ => return None,
    };
    Some(ContentKey {
        kind,
        digest: Digest::parse(digest).ok()?,
    })
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn from_ms(ms: f64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0.0) as u64)
}

/// A read's answer, or the empty one after a failure (already reported to
/// [`Health`] by the connection).
fn or_empty<T: Default>(r: Result<T, SharedError>) -> T {
    r.unwrap_or_default()
}

/// A write's outcome: dropped on failure (already reported).
fn dropped<T>(what: &str, r: Result<T, SharedError>) {
    if let Err(e) = r {
        tracing::debug!(what, error = %e, "shared index write dropped");
    }
}

impl RedisIndex {
    /// Uses `conn`, with every key under `<prefix>:`.
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

    fn key(&self, parts: &[&str]) -> String {
        let mut k = self.prefix.clone();
        for p in parts {
            k.push(':');
            k.push_str(p);
        }
        k
    }

    /// The bytes of every item known, as `P:total` counts them.
    pub async fn total_bytes(&self) -> Result<u64, SharedError> {
        let total: Option<i64> = self
            .conn
            .query(::redis::cmd("GET").arg(self.key(&["total"])))
            .await?;
        Ok(total.map_or(0, |t| u64::try_from(t).unwrap_or(0)))
    }

    /// The `n` least recently accessed items, oldest first (for the
    /// bucket's eviction).
    pub async fn oldest(&self, n: usize) -> Result<Vec<(ContentKey, ContentEntry)>, SharedError> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let flat: Vec<String> = self.conn.invoke(OLDEST.arg(&self.prefix).arg(n)).await?;
        let mut out = Vec::with_capacity(flat.len() / 3);
        for item in flat.chunks_exact(3) {
            let (Some(key), Ok(ms), Ok(size)) = (
                parse_field(&item[0]),
                item[1].parse::<f64>(),
                item[2].parse::<u64>(),
            ) else {
                continue;
            };
            out.push((
                key,
                ContentEntry {
                    size,
                    last_access: from_ms(ms),
                },
            ));
        }
        Ok(out)
    }

    async fn try_tag(&self, repo: &RepoName, tag: &Tag) -> Result<Option<TagEntry>, SharedError> {
        let json: Option<String> = self
            .conn
            .query(
                ::redis::cmd("HGET")
                    .arg(self.key(&["tags", repo.as_str()]))
                    .arg(tag.as_str()),
            )
            .await?;
        Ok(json.and_then(|j| parse_json(&j)))
    }

    async fn try_tags(&self) -> Result<Vec<(RepoName, Tag, TagEntry)>, SharedError> {
        let repos = self.try_repositories().await?;
        if repos.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = ::redis::pipe();
        for repo in &repos {
            pipe.cmd("HGETALL").arg(self.key(&["tags", repo.as_str()]));
        }
        let all: Vec<HashMap<String, String>> = self.conn.pipe(&pipe).await?;
        let mut out = Vec::new();
        for (repo, tags) in repos.into_iter().zip(all) {
            for (tag, json) in tags {
                if let (Ok(tag), Some(entry)) = (Tag::parse(&tag), parse_json::<TagEntry>(&json)) {
                    out.push((repo.clone(), tag, entry));
                }
            }
        }
        Ok(out)
    }

    async fn try_repositories(&self) -> Result<Vec<RepoName>, SharedError> {
        let names: Vec<String> = self
            .conn
            .query(::redis::cmd("SMEMBERS").arg(self.key(&["repos"])))
            .await?;
        let mut repos: Vec<RepoName> = names
            .iter()
            .filter_map(|n| RepoName::parse(n).ok())
            .collect();
        repos.sort();
        Ok(repos)
    }

    async fn try_entry(&self, key: &ContentKey) -> Result<Option<ContentEntry>, SharedError> {
        let f = field(key);
        let mut pipe = ::redis::pipe();
        pipe.atomic()
            .cmd("HGET")
            .arg(self.key(&["sizes"]))
            .arg(&f)
            .cmd("ZSCORE")
            .arg(self.key(&["access"]))
            .arg(&f);
        let (size, ms): (Option<u64>, Option<f64>) = self.conn.pipe(&pipe).await?;
        Ok(size.map(|size| ContentEntry {
            size,
            last_access: from_ms(ms.unwrap_or(0.0)),
        }))
    }

    async fn try_contents(&self) -> Result<Vec<(ContentKey, ContentEntry)>, SharedError> {
        let mut pipe = ::redis::pipe();
        pipe.atomic()
            .cmd("HGETALL")
            .arg(self.key(&["sizes"]))
            .cmd("ZRANGE")
            .arg(self.key(&["access"]))
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES");
        let (sizes, access): (HashMap<String, u64>, Vec<(String, f64)>) =
            self.conn.pipe(&pipe).await?;
        let access: HashMap<String, f64> = access.into_iter().collect();
        Ok(sizes
            .into_iter()
            .filter_map(|(f, size)| {
                let last_access = from_ms(access.get(&f).copied().unwrap_or(0.0));
                Some((parse_field(&f)?, ContentEntry { size, last_access }))
            })
            .collect())
    }

    async fn try_reconcile(&self, mark: ScanMark, found: Vec<Found>) -> Result<(), SharedError> {
        let current: Option<u64> = self
            .conn
            .query(::redis::cmd("GET").arg(self.key(&["scan", "mark"])))
            .await?;
        if current != Some(mark.0) {
            tracing::debug!(mark = mark.0, "reconcile of a superseded scan skipped");
            return Ok(());
        }
        let known: Vec<String> = self
            .conn
            .query(::redis::cmd("HKEYS").arg(self.key(&["sizes"])))
            .await?;
        let found_fields: HashSet<String> = found.iter().map(|f| field(&f.key)).collect();
        let known: HashSet<String> = known.into_iter().collect();
        // Additions first: a digest gone as one kind and found as the other
        // keeps its memberships when the gone one is pruned.
        let new: Vec<&Found> = found
            .iter()
            .filter(|f| !known.contains(&field(&f.key)))
            .collect();
        for batch in new.chunks(RECONCILE_BATCH) {
            let mut inv = RECONCILE_ADD.prepare_invoke();
            inv.arg(&self.prefix).arg(mark.0);
            for f in batch {
                inv.arg(field(&f.key)).arg(f.size).arg(unix_ms(f.modified));
            }
            let n: i64 = self.conn.invoke(&inv).await?;
            if n < 0 {
                return Ok(());
            }
        }
        let gone: Vec<ContentKey> = known
            .iter()
            .filter(|f| !found_fields.contains(*f))
            .filter_map(|f| parse_field(f))
            .collect();
        for batch in gone.chunks(RECONCILE_BATCH) {
            let mut inv = RECONCILE_GONE.prepare_invoke();
            inv.arg(&self.prefix).arg(mark.0);
            for key in batch {
                inv.arg(key.kind.as_str()).arg(key.digest.to_string());
            }
            let n: i64 = self.conn.invoke(&inv).await?;
            if n < 0 {
                return Ok(());
            }
        }
        let _: i64 = self
            .conn
            .invoke(END_SCAN.arg(&self.prefix).arg(mark.0))
            .await?;
        Ok(())
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(json: &str) -> Option<T> {
    match serde_json::from_str(json) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(error = %e, "unreadable entry in the shared index ignored");
            None
        }
    }
}

#[async_trait]
impl Index for RedisIndex {
    async fn tag(&self, repo: &RepoName, tag: &Tag) -> Option<TagEntry> {
        or_empty(self.try_tag(repo, tag).await)
    }

    async fn set_tag(&self, repo: &RepoName, tag: &Tag, entry: TagEntry) {
        let Ok(json) = serde_json::to_string(&entry) else {
            return;
        };
        let r: Result<i64, _> = self
            .conn
            .invoke(
                SET_TAG
                    .arg(&self.prefix)
                    .arg(repo.as_str())
                    .arg(tag.as_str())
                    .arg(json)
                    .arg(entry.digest.to_string()),
            )
            .await;
        dropped("set_tag", r);
    }

    async fn remove_tag(&self, repo: &RepoName, tag: &Tag) {
        let r: Result<i64, _> = self
            .conn
            .invoke(
                REMOVE_TAG
                    .arg(&self.prefix)
                    .arg(repo.as_str())
                    .arg(tag.as_str()),
            )
            .await;
        dropped("remove_tag", r);
    }

    async fn tags(&self) -> Vec<(RepoName, Tag, TagEntry)> {
        or_empty(self.try_tags().await)
    }

    async fn tag_list(&self, repo: &RepoName) -> Option<Vec<Tag>> {
        let json: Option<String> = or_empty(
            self.conn
                .query(::redis::cmd("GET").arg(self.key(&["taglist", repo.as_str()])))
                .await,
        );
        json.and_then(|j| parse_json(&j))
    }

    async fn set_tag_list(&self, repo: &RepoName, tags: Vec<Tag>) {
        let Ok(json) = serde_json::to_string(&tags) else {
            return;
        };
        let mut pipe = ::redis::pipe();
        pipe.atomic()
            .cmd("SET")
            .arg(self.key(&["taglist", repo.as_str()]))
            .arg(json)
            .ignore()
            .cmd("SADD")
            .arg(self.key(&["repos"]))
            .arg(repo.as_str())
            .ignore();
        let r: Result<(), _> = self.conn.pipe(&pipe).await;
        dropped("set_tag_list", r);
    }

    async fn repositories(&self) -> Vec<RepoName> {
        or_empty(self.try_repositories().await)
    }

    async fn holds(&self, repo: &RepoName, digest: &Digest) -> bool {
        or_empty(
            self.conn
                .query(
                    ::redis::cmd("SISMEMBER")
                        .arg(self.key(&["holds", repo.as_str()]))
                        .arg(digest.to_string()),
                )
                .await,
        )
    }

    async fn add_holds(&self, repo: &RepoName, digests: Vec<Digest>) {
        if digests.is_empty() {
            return;
        }
        let mut pipe = ::redis::pipe();
        pipe.atomic();
        let holds = self.key(&["holds", repo.as_str()]);
        for d in &digests {
            let d = d.to_string();
            pipe.cmd("SADD").arg(&holds).arg(&d).ignore();
            pipe.cmd("SADD")
                .arg(self.key(&["heldby", &d]))
                .arg(repo.as_str())
                .ignore();
        }
        pipe.cmd("SADD")
            .arg(self.key(&["repos"]))
            .arg(repo.as_str())
            .ignore();
        let r: Result<(), _> = self.conn.pipe(&pipe).await;
        dropped("add_holds", r);
    }

    async fn held(&self, repo: &RepoName) -> Vec<Digest> {
        let members: Vec<String> = or_empty(
            self.conn
                .query(::redis::cmd("SMEMBERS").arg(self.key(&["holds", repo.as_str()])))
                .await,
        );
        members
            .iter()
            .filter_map(|d| Digest::parse(d).ok())
            .collect()
    }

    async fn drop_hold(&self, repo: &RepoName, digest: &Digest) {
        let mut pipe = ::redis::pipe();
        pipe.atomic();
        let d = digest.to_string();
        pipe.cmd("SREM")
            .arg(self.key(&["holds", repo.as_str()]))
            .arg(&d)
            .ignore();
        pipe.cmd("SREM")
            .arg(self.key(&["heldby", &d]))
            .arg(repo.as_str())
            .ignore();
        let r: Result<(), _> = self.conn.pipe(&pipe).await;
        dropped("drop_hold", r);
    }

    async fn record(&self, key: &ContentKey, size: u64, now: SystemTime) {
        let r: Result<i64, _> = self
            .conn
            .invoke(
                RECORD
                    .arg(&self.prefix)
                    .arg(field(key))
                    .arg(size)
                    .arg(unix_ms(now)),
            )
            .await;
        dropped("record", r);
    }

    async fn touch(&self, key: &ContentKey, now: SystemTime) {
        let r: Result<i64, _> = self
            .conn
            .invoke(TOUCH.arg(&self.prefix).arg(field(key)).arg(unix_ms(now)))
            .await;
        dropped("touch", r);
    }

    async fn entry(&self, key: &ContentKey) -> Option<ContentEntry> {
        or_empty(self.try_entry(key).await)
    }

    async fn forget(&self, key: &ContentKey) {
        let r: Result<i64, _> = self
            .conn
            .invoke(
                FORGET
                    .arg(&self.prefix)
                    .arg(key.kind.as_str())
                    .arg(key.digest.to_string()),
            )
            .await;
        dropped("forget", r);
    }

    async fn forget_if(&self, key: &ContentKey, seen: ContentEntry) -> bool {
        let r: Result<i64, _> = self
            .conn
            .invoke(
                FORGET_IF
                    .arg(&self.prefix)
                    .arg(key.kind.as_str())
                    .arg(key.digest.to_string())
                    .arg(seen.size)
                    .arg(unix_ms(seen.last_access)),
            )
            .await;
        or_empty(r) == 1
    }

    async fn contents(&self) -> Vec<(ContentKey, ContentEntry)> {
        or_empty(self.try_contents().await)
    }

    async fn begin_scan(&self) -> ScanMark {
        // Marks start at 1: 0, the answer of a failure, is never current.
        let r: Result<u64, _> = self
            .conn
            .invoke(BEGIN_SCAN.arg(&self.prefix).arg(SCAN_MARK_SECS))
            .await;
        ScanMark(or_empty(r))
    }

    async fn reconcile(&self, mark: ScanMark, found: Vec<Found>) {
        if mark.0 == 0 {
            return;
        }
        dropped("reconcile", self.try_reconcile(mark, found).await);
    }

    async fn flush(&self, _what: Flush) -> io::Result<()> {
        // Redis persists by itself (or not: it is a cache's metadata).
        Ok(())
    }
}
