//! Per-address backoff of failed logins: each client address may cause at
//! most `limit` failed bcrypt checks within a window, then its checks are
//! refused without running until the window ends. Bounded memory: the table
//! keeps at most [`ADDRESSES`] addresses, forgotten a window after their
//! first check. Mechanism only: it does not know users, passwords or what a
//! refusal looks like on the wire.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How many client addresses are tracked at once. An attacker with more
/// addresses than this can push others out; the bcrypt threads still bound
/// what they cost.
const ADDRESSES: u64 = 65_536;

/// Checks of one address in its current window.
#[derive(Debug)]
struct Window {
    started: Instant,
    /// Checks started and not (yet) succeeded: failures and checks in flight.
    charged: AtomicU32,
}

/// The failures of recent client addresses.
pub struct Backoff {
    limit: u32,
    window: Duration,
    table: moka::future::Cache<IpAddr, Arc<Window>>,
}

/// A check charged to an address; it counts as a failure unless
/// [`Charge::succeeded`] is called (a check abandoned midway included).
#[must_use]
pub struct Charge(Option<Arc<Window>>);

impl Charge {
    /// The check verified the credentials: it is not held against the address.
    pub fn succeeded(self) {
        if let Some(w) = &self.0 {
            w.charged.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Backoff {
    /// `limit` 0: no limit.
    pub fn new(limit: u32, window: Duration) -> Self {
        Self {
            limit,
            window,
            table: moka::future::Cache::builder()
                .max_capacity(ADDRESSES)
                .time_to_live(window)
                .build(),
        }
    }

    /// Charges one check to `client`, or refuses it with how long until its
    /// window ends. Charged before the check runs, so many checks at once
    /// from one address cannot all slip under the limit.
    pub async fn charge(&self, client: IpAddr) -> Result<Charge, Duration> {
        if self.limit == 0 {
            return Ok(Charge(None));
        }
        let window = self
            .table
            .get_with(key(client), async {
                Arc::new(Window {
                    started: Instant::now(),
                    charged: AtomicU32::new(0),
                })
            })
            .await;
        let limit = self.limit;
        match window
            .charged
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            }) {
            Ok(_) => Ok(Charge(Some(window))),
            Err(_) => Err(self.window.saturating_sub(window.started.elapsed())),
        }
    }
}

/// The address a client is known by: IPv4 as it is (an IPv4-mapped IPv6
/// address too), IPv6 by its /64, since one host commonly holds a whole /64.
fn key(client: IpAddr) -> IpAddr {
    match client {
        IpAddr::V4(_) => client,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !u128::from(u64::MAX);
                IpAddr::V6(prefix.into())
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn an_address_past_its_failures_is_refused_and_others_are_not() {
        let b = Backoff::new(3, Duration::from_secs(60));
        for _ in 0..3 {
            drop(b.charge(ip("192.0.2.1")).await.unwrap());
        }
        let wait = b.charge(ip("192.0.2.1")).await.err().unwrap();
        assert!(wait > Duration::from_secs(50) && wait <= Duration::from_secs(60));
        assert!(b.charge(ip("192.0.2.2")).await.is_ok());
        // Its IPv4-mapped IPv6 form is the same client.
        assert!(b.charge(ip("::ffff:192.0.2.1")).await.is_err());
    }

    #[tokio::test]
    async fn successes_are_not_held_against_an_address() {
        let b = Backoff::new(2, Duration::from_secs(60));
        for _ in 0..10 {
            b.charge(ip("192.0.2.1")).await.unwrap().succeeded();
        }
        drop(b.charge(ip("192.0.2.1")).await.unwrap());
        drop(b.charge(ip("192.0.2.1")).await.unwrap());
        assert!(b.charge(ip("192.0.2.1")).await.is_err());
    }

    #[tokio::test]
    async fn an_ipv6_64_is_one_client() {
        let b = Backoff::new(1, Duration::from_secs(60));
        drop(b.charge(ip("2001:db8:1:2::1")).await.unwrap());
        assert!(b.charge(ip("2001:db8:1:2:ffff::9")).await.is_err());
        assert!(b.charge(ip("2001:db8:1:3::1")).await.is_ok());
    }

    #[tokio::test]
    async fn the_window_ends_and_zero_means_no_limit() {
        let b = Backoff::new(1, Duration::from_millis(50));
        drop(b.charge(ip("192.0.2.1")).await.unwrap());
        assert!(b.charge(ip("192.0.2.1")).await.is_err());
        tokio::time::sleep(Duration::from_millis(120)).await;
        b.table.run_pending_tasks().await;
        assert!(b.charge(ip("192.0.2.1")).await.is_ok());
        let off = Backoff::new(0, Duration::from_secs(60));
        for _ in 0..100 {
            drop(off.charge(ip("192.0.2.1")).await.unwrap());
        }
    }
}
