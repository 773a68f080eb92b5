//! The front door's decisions about connections, as pure functions of what
//! the table saw and the time: which connection to close for a new client,
//! when a request head is overdue (a minimum rate, as Apache's
//! mod_reqtimeout), and whether a client a response waits on takes its
//! bytes fast enough. No clock, no I/O: the table and the stream apply them.

use std::time::Duration;

/// What a connection is doing, as far as shedding cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// A request is in flight: never shed.
    Busy,
    /// A keep-alive connection between requests, nothing of the next one
    /// received: the cheapest to close (the client reconnects).
    Idle,
    /// Waiting for a request head that has not arrived whole (or for the
    /// first byte of a new connection).
    Head,
}

/// One connection as the shedding sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    pub phase: Phase,
    /// When its current phase began, as time since any fixed origin.
    pub since: Duration,
}

/// Where a connection stands in the order of closing for a new client:
/// the smallest key goes first. Idle keep-alive connections come first, the
/// longest idle of them; then the one waiting longest for its request head
/// (a dripping client has been at it longest: a legitimate one sends its
/// head in one piece right after connecting). Busy ones have no key: they
/// are never closed for another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ShedKey {
    rank: u8,
    since: Duration,
}

impl ShedKey {
    /// Below every key.
    pub const FIRST: Self = Self {
        rank: 0,
        since: Duration::ZERO,
    };
    /// Above every key.
    pub const LAST: Self = Self {
        rank: u8::MAX,
        since: Duration::MAX,
    };

    /// Whether it is an idle keep-alive connection's.
    pub fn is_idle(&self) -> bool {
        self.rank == 0
    }

    /// The key of a connection seen as `view`; `None` when it is busy.
    pub fn of(view: View) -> Option<Self> {
        let rank = match view.phase {
            Phase::Busy => return None,
            Phase::Idle => 0,
            Phase::Head => 1,
        };
        Some(Self {
            rank,
            since: view.since,
        })
    }
}

/// How long a request head may take: `grace`, plus a second for every
/// `min_rate` bytes received, up to `max` (Apache's
/// `header=grace-max,MinRate=min_rate`). `min_rate` 0: `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadRule {
    pub grace: Duration,
    pub min_rate: u64,
    pub max: Duration,
}

impl HeadRule {
    /// The time a head that has `bytes` so far may take in all, from its start.
    pub fn allowed(&self, bytes: u64) -> Duration {
        if self.min_rate == 0 {
            return self.max;
        }
        let earned = Duration::from_secs_f64(bytes as f64 / self.min_rate as f64);
        (self.grace.min(self.max) + earned).min(self.max)
    }
}

/// How fast a client a response waits on must take its bytes: at least
/// `min_rate` bytes per second over each `window` of waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendRule {
    pub window: Duration,
    pub min_rate: u64,
}

/// What to do after a client kept writes waiting for `waited` in all and
/// took `taken` bytes meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendVerdict {
    /// Not a whole window of waiting yet.
    Continue,
    /// A window passed and the client kept the pace: count afresh.
    Restart,
    /// Too slow (or took nothing): disconnect.
    Cut,
}

impl SendRule {
    pub fn verdict(&self, waited: Duration, taken: u64) -> SendVerdict {
        if self.window.is_zero() || waited < self.window {
            return SendVerdict::Continue;
        }
        let needed = (self.min_rate as f64 * waited.as_secs_f64()).max(1.0);
        if (taken as f64) < needed {
            SendVerdict::Cut
        } else {
            SendVerdict::Restart
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(phase: Phase, secs: u64) -> View {
        View {
            phase,
            since: Duration::from_secs(secs),
        }
    }

    /// The connection the order closes first among `conns`.
    fn victim<K: Copy>(conns: &[(K, View)]) -> Option<K> {
        conns
            .iter()
            .filter_map(|&(k, v)| ShedKey::of(v).map(|key| (key, k)))
            .min_by_key(|(key, _)| *key)
            .map(|(_, k)| k)
    }

    #[test]
    fn idle_keep_alive_goes_first_then_the_oldest_head_and_busy_never() {
        let conns = [
            ("busy-oldest", v(Phase::Busy, 1)),
            ("head-old", v(Phase::Head, 2)),
            ("idle-new", v(Phase::Idle, 9)),
            ("idle-old", v(Phase::Idle, 5)),
        ];
        assert_eq!(victim(&conns), Some("idle-old"));
        let heads = [
            ("busy", v(Phase::Busy, 0)),
            ("head-new", v(Phase::Head, 8)),
            ("head-old", v(Phase::Head, 3)),
        ];
        assert_eq!(victim(&heads), Some("head-old"));
        assert_eq!(
            victim(&[("a", v(Phase::Busy, 0)), ("b", v(Phase::Busy, 1))]),
            None
        );
        assert_eq!(victim::<u8>(&[]), None);
        for (_, view) in conns.iter().chain(&heads) {
            if let Some(key) = ShedKey::of(*view) {
                assert!(ShedKey::FIRST <= key && key <= ShedKey::LAST);
            }
        }
    }

    #[test]
    fn a_head_earns_a_second_per_min_rate_bytes_up_to_the_max() {
        let rule = HeadRule {
            grace: Duration::from_secs(10),
            min_rate: 500,
            max: Duration::from_secs(30),
        };
        assert_eq!(rule.allowed(0), Duration::from_secs(10));
        assert_eq!(rule.allowed(1000), Duration::from_secs(12));
        assert_eq!(rule.allowed(1_000_000), Duration::from_secs(30));
        // A header line of 30 bytes a second: cut when 10 s + 30t/500 s is
        // reached, at about 10.6 s.
        let t = 10.64;
        assert!(rule.allowed((30.0 * t) as u64).as_secs_f64() < t);
        let off = HeadRule {
            min_rate: 0,
            ..rule
        };
        assert_eq!(off.allowed(0), Duration::from_secs(30));
        let short = HeadRule {
            max: Duration::from_secs(2),
            ..rule
        };
        assert_eq!(short.allowed(0), Duration::from_secs(2));
    }

    #[test]
    fn a_client_below_the_send_rate_is_cut_after_a_window_of_waiting() {
        let rule = SendRule {
            window: Duration::from_secs(60),
            min_rate: 8192,
        };
        let w = Duration::from_secs(60);
        assert_eq!(
            rule.verdict(Duration::from_secs(59), 0),
            SendVerdict::Continue
        );
        // 1 KiB/s for a minute of waiting.
        assert_eq!(rule.verdict(w, 60 * 1024), SendVerdict::Cut);
        assert_eq!(rule.verdict(w, 0), SendVerdict::Cut);
        assert_eq!(rule.verdict(w, 60 * 8192), SendVerdict::Restart);
        let stall_only = SendRule {
            min_rate: 0,
            ..rule
        };
        assert_eq!(stall_only.verdict(w, 0), SendVerdict::Cut);
        assert_eq!(stall_only.verdict(w, 1), SendVerdict::Restart);
        let off = SendRule {
            window: Duration::ZERO,
            ..rule
        };
        assert_eq!(off.verdict(w, 0), SendVerdict::Continue);
    }
}
