//! Cache policy as plain functions of their inputs and `now`: no I/O, no
//! clocks read here, so every rule is unit-tested without sleeping.

use std::time::{Duration, SystemTime};

/// Whether a tag checked upstream at `checked_at` may be trusted at `now`
/// without asking again. A check time in the future (the clock went
/// backwards) is treated as just checked.
pub fn tag_is_fresh(checked_at: SystemTime, now: SystemTime, ttl: Duration) -> bool {
    match now.duration_since(checked_at) {
        Ok(age) => age < ttl,
        Err(_) => true,
    }
}

/// A tag TTL for repositories and tags matching `pattern` (`repo-glob:tag-glob`,
/// or `repo-glob` for every tag; `*` matches any run of characters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagTtlRule {
    pub pattern: String,
    pub ttl: Duration,
}

/// The tag TTL for `repo:tag`: the first matching rule's, else `default`.
pub fn tag_ttl_for(repo: &str, tag: &str, rules: &[TagTtlRule], default: Duration) -> Duration {
    rules
        .iter()
        .find(|r| match r.pattern.split_once(':') {
            Some((rp, tp)) => glob_match(rp, repo) && glob_match(tp, tag),
            None => glob_match(&r.pattern, repo),
        })
        .map_or(default, |r| r.ttl)
}

/// `*` matches any (possibly empty) run of characters; everything else is literal.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// What the cache may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Bytes on disk that start an eviction.
    pub high: u64,
    /// Bytes on disk an eviction brings usage down to.
    pub low: u64,
}

impl Budget {
    /// Watermarks as percentages of `max_size`.
    pub fn new(max_size: u64, high_percent: u8, low_percent: u8) -> Self {
        let pct = |p: u8| (u128::from(max_size) * u128::from(p) / 100) as u64;
        Self {
            high: pct(high_percent),
            low: pct(low_percent.min(high_percent)),
        }
    }
}

/// The filesystem the cache lives on, as `statvfs` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsSpace {
    /// The filesystem's size.
    pub size: u64,
    /// Bytes an unprivileged writer may still take.
    pub free: u64,
}

impl Budget {
    /// This budget on a filesystem with `space`, of which the cache (now
    /// `usage` bytes) must leave `min_free` free: the cache may take what
    /// it holds plus what is free beyond `min_free`, and no more. Past that
    /// room the high watermark comes down to it, the low one in proportion,
    /// so an eviction runs before the disk fills, not after a write failed.
    pub fn on_disk(self, usage: u64, space: FsSpace, min_free: u64) -> Budget {
        let room = usage.saturating_add(space.free).saturating_sub(min_free);
        if room >= self.high {
            return self;
        }
        let low = if self.high == 0 {
            0
        } else {
            (u128::from(self.low) * u128::from(room) / u128::from(self.high)) as u64
        };
        Budget { high: room, low }
    }
}

/// Whether a blob of `size` bytes could be kept on a filesystem with
/// `space` that must keep `min_free` free, were everything else on it
/// gone: if not, a download of it is not spooled at all.
pub fn fits_disk(size: u64, space: FsSpace, min_free: u64) -> bool {
    size <= space.size.saturating_sub(min_free)
}

/// Why an entry was chosen for eviction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvictReason {
    /// Nobody pulled it for longer than its idle TTL.
    Idle,
    /// The cache was over its high watermark and this was least recently used.
    Size,
}

impl EvictReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EvictReason::Idle => "idle",
            EvictReason::Size => "size",
        }
    }
}

/// One cached item as eviction sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate<K> {
    pub key: K,
    pub size: u64,
    pub last_access: SystemTime,
    /// Its idle TTL (`None`: never expires for idleness).
    pub idle_ttl: Option<Duration>,
}

/// Chooses what to evict: everything idle past its TTL, then, if `usage`
/// (bytes really on disk, temp files included) is still above the high
/// watermark, the least recently used until it is at or below the low one.
pub fn select_evictions<K: Clone>(
    candidates: &[Candidate<K>],
    usage: u64,
    budget: Budget,
    now: SystemTime,
) -> Vec<(K, EvictReason)> {
    let mut out = Vec::new();
    let mut usage = usage;
    let mut rest: Vec<&Candidate<K>> = Vec::new();
    for c in candidates {
        let idle = c.idle_ttl.is_some_and(|ttl| {
            now.duration_since(c.last_access)
                .is_ok_and(|age| age >= ttl)
        });
        if idle {
            out.push((c.key.clone(), EvictReason::Idle));
            usage = usage.saturating_sub(c.size);
        } else {
            rest.push(c);
        }
    }
    if usage > budget.high {
        rest.sort_by_key(|c| c.last_access);
        for c in rest {
            if usage <= budget.low {
                break;
            }
            out.push((c.key.clone(), EvictReason::Size));
            usage = usage.saturating_sub(c.size);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
    }

    const MB: u64 = 1_000_000;

    /// The case: a 20 GB budget on a 300 MB filesystem.
    #[test]
    fn min_free_brings_the_budget_within_the_filesystem() {
        let budget = Budget::new(20_000 * MB, 90, 80);
        let disk = |free| FsSpace {
            size: 300 * MB,
            free,
        };
        // 100 MB cached, 200 MB free, 15 MB to leave: room for 285 MB.
        let b = budget.on_disk(100 * MB, disk(200 * MB), 15 * MB);
        assert_eq!(b.high, 285 * MB);
        assert_eq!(b.low, 285 * MB * 80 / 90);
        assert!(select_evictions::<u8>(&[], 100 * MB, b, t(0)).is_empty());
        // Full: 290 MB cached, 10 MB free, so usage is past the room.
        let b = budget.on_disk(290 * MB, disk(10 * MB), 15 * MB);
        assert_eq!(b.high, 285 * MB);
        let items: Vec<Candidate<u8>> = (0..29)
            .map(|i| Candidate {
                key: i,
                size: 10 * MB,
                last_access: t(u64::from(i)),
                idle_ttl: None,
            })
            .collect();
        let evicted = select_evictions(&items, 290 * MB, b, t(100));
        let left = 290 * MB - 10 * MB * evicted.len() as u64;
        assert!(left <= b.low, "{left} left");
        assert_eq!(evicted[0], (0, EvictReason::Size), "oldest first");
        // Free space beyond min_free and the budget: the budget alone.
        let big = FsSpace {
            size: 1_000_000 * MB,
            free: 900_000 * MB,
        };
        assert_eq!(budget.on_disk(5 * MB, big, 50_000 * MB), budget);
        // Less free than min_free and nothing cached: nothing may be kept.
        let b = budget.on_disk(0, disk(5 * MB), 15 * MB);
        assert_eq!((b.high, b.low), (0, 0));
        assert!(fits_disk(285 * MB, disk(0), 15 * MB));
        assert!(!fits_disk(285 * MB + 1, disk(300 * MB), 15 * MB));
        assert!(!fits_disk(1, disk(300 * MB), 400 * MB));
    }

    #[test]
    fn tag_freshness() {
        let ttl = Duration::from_secs(300);
        assert!(tag_is_fresh(t(0), t(0), ttl));
        assert!(tag_is_fresh(t(0), t(299), ttl));
        assert!(!tag_is_fresh(t(0), t(300), ttl));
        assert!(!tag_is_fresh(t(0), t(1), Duration::ZERO));
        assert!(tag_is_fresh(t(10), t(0), ttl));
    }

    #[test]
    fn globs() {
        assert!(glob_match("*", ""));
        assert!(glob_match("library/*", "library/alpine"));
        assert!(!glob_match("library/*", "bitnami/redis"));
        assert!(glob_match("*latest", "latest"));
        assert!(glob_match("a*b*c", "a-x-b-y-c"));
        assert!(!glob_match("a*b*c", "a-x-b-y"));
        assert!(glob_match("3.*", "3.19"));
        assert!(!glob_match("3.*", "4.0"));
    }

    #[test]
    fn tag_ttl_rules_first_match_wins() {
        let rules = vec![
            TagTtlRule {
                pattern: "*:latest".into(),
                ttl: Duration::from_secs(60),
            },
            TagTtlRule {
                pattern: "library/*".into(),
                ttl: Duration::from_secs(600),
            },
        ];
        let d = Duration::from_secs(300);
        assert_eq!(
            tag_ttl_for("library/alpine", "latest", &rules, d).as_secs(),
            60
        );
        assert_eq!(
            tag_ttl_for("library/alpine", "3.19", &rules, d).as_secs(),
            600
        );
        assert_eq!(tag_ttl_for("bitnami/redis", "7", &rules, d).as_secs(), 300);
    }

    fn c(key: &'static str, size: u64, last: u64) -> Candidate<&'static str> {
        Candidate {
            key,
            size,
            last_access: t(last),
            idle_ttl: Some(Duration::from_secs(1000)),
        }
    }

    #[test]
    fn evicts_least_recently_used_down_to_low_watermark() {
        let budget = Budget::new(100, 90, 70);
        assert_eq!(budget, Budget { high: 90, low: 70 });
        let cands = [c("old", 30, 10), c("new", 30, 30), c("mid", 30, 20)];
        // 90 is not above the high watermark: nothing to do.
        assert!(select_evictions(&cands, 90, budget, t(40)).is_empty());
        // 95 on disk (5 of it temp files): evict oldest until <= 70.
        let out = select_evictions(&cands, 95, budget, t(40));
        assert_eq!(out, vec![("old", EvictReason::Size)]);
        let out = select_evictions(&cands, 125, budget, t(40));
        assert_eq!(
            out,
            vec![("old", EvictReason::Size), ("mid", EvictReason::Size)]
        );
    }

    #[test]
    fn idle_entries_go_first_whatever_the_usage() {
        let budget = Budget::new(1000, 90, 80);
        let mut stale = c("stale", 10, 0);
        stale.idle_ttl = Some(Duration::from_secs(50));
        let mut keep = c("keep", 10, 0);
        keep.idle_ttl = None;
        let out = select_evictions(&[stale, keep], 20, budget, t(60));
        assert_eq!(out, vec![("stale", EvictReason::Idle)]);
    }

    #[test]
    fn newest_entry_is_never_the_first_victim() {
        let budget = Budget::new(100, 90, 50);
        let cands = [c("fresh", 60, 100), c("a", 20, 1), c("b", 20, 2)];
        let out = select_evictions(&cands, 100, budget, t(100));
        assert_eq!(out[0].0, "a");
        assert_eq!(out.iter().filter(|(k, _)| *k == "fresh").count(), 1);
        assert_eq!(out.last().map(|o| o.0), Some("fresh"));
    }
}
