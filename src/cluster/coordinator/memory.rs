//! [`MemoryCoordinator`]: leases, locks and peers in this process's memory,
//! for a mirror that runs alone (its replicas are itself) and for tests.
//! Expiry is measured on [`tokio::time::Instant`], so tests drive it with
//! `tokio::time::pause()` and `advance()`.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::time::Instant;

use super::{lease_key, lock_key, new_token, Coordinator, Lease, Taken};
use crate::cluster::SharedError;
use crate::reference::Digest;

/// Leases and locks in a map, each with its token, holder and expiry.
#[derive(Debug, Default)]
pub struct MemoryCoordinator {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// By [`Lease::key`]; an expired entry counts as absent.
    leases: HashMap<String, Entry>,
    peers: HashMap<String, SystemTime>,
}

#[derive(Debug)]
struct Entry {
    token: String,
    holder: String,
    expires: Instant,
}

impl State {
    /// The live entry of `key`, dropping expired ones on the way.
    fn live(&mut self, key: &str, now: Instant) -> Option<&mut Entry> {
        self.leases.retain(|_, e| e.expires > now);
        self.leases.get_mut(key)
    }

    /// Takes `key` for `holder` if nobody holds it; else who does.
    fn take(&mut self, key: String, holder: &str, ttl: Duration) -> Taken {
        let now = Instant::now();
        if let Some(e) = self.live(&key, now) {
            return Taken::Held {
                holder: e.holder.clone(),
                token: e.token.clone(),
            };
        }
        let token = new_token();
        self.leases.insert(
            key.clone(),
            Entry {
                token: token.clone(),
                holder: holder.to_owned(),
                expires: now + ttl,
            },
        );
        Taken::Mine(Lease { key, token })
    }
}

impl MemoryCoordinator {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The map stays valid if a holder panicked.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Coordinator for MemoryCoordinator {
    async fn take(
        &self,
        digest: &Digest,
        holder: &str,
        ttl: Duration,
    ) -> Result<Taken, SharedError> {
        Ok(self.state().take(lease_key(digest), holder, ttl))
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, SharedError> {
        let now = Instant::now();
        let mut st = self.state();
        match st.live(&lease.key, now) {
            Some(e) if e.token == lease.token => {
                e.expires = now + ttl;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn release(&self, lease: &Lease) -> Result<(), SharedError> {
        let now = Instant::now();
        let mut st = self.state();
        if st
            .live(&lease.key, now)
            .is_some_and(|e| e.token == lease.token)
        {
            st.leases.remove(&lease.key);
        }
        Ok(())
    }

    async fn take_over(
        &self,
        digest: &Digest,
        seen: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, SharedError> {
        let now = Instant::now();
        let key = lease_key(digest);
        let mut st = self.state();
        match st.live(&key, now) {
            Some(e) if e.token == seen => {
                let token = new_token();
                *e = Entry {
                    token: token.clone(),
                    holder: holder.to_owned(),
                    expires: now + ttl,
                };
                Ok(Some(Lease { key, token }))
            }
            _ => Ok(None),
        }
    }

    async fn lock(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, SharedError> {
        match self.state().take(lock_key(name), holder, ttl) {
            Taken::Mine(lease) => Ok(Some(lease)),
            Taken::Held { .. } => Ok(None),
        }
    }

    async fn announce(&self, holder: &str, now: SystemTime) -> Result<(), SharedError> {
        self.state().peers.insert(holder.to_owned(), now);
        Ok(())
    }

    async fn peers(
        &self,
        now: SystemTime,
        within: Duration,
    ) -> Result<Vec<(String, SystemTime)>, SharedError> {
        let since = now.checked_sub(within).unwrap_or(SystemTime::UNIX_EPOCH);
        let mut st = self.state();
        // Those gone for long are forgotten, as in Redis.
        let keep = since
            .checked_sub(super::PEERS_KEPT)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        st.peers.retain(|_, t| *t >= keep);
        let mut peers: Vec<(String, SystemTime)> = st
            .peers
            .iter()
            .filter(|(_, t)| **t >= since)
            .map(|(h, t)| (h.clone(), *t))
            .collect();
        peers.sort();
        Ok(peers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(30);

    fn digest(n: u8) -> Digest {
        Digest::parse(&format!("sha256:{}", format!("{n:02x}").repeat(32))).unwrap()
    }

    fn mine(t: Taken) -> Lease {
        match t {
            Taken::Mine(lease) => lease,
            Taken::Held { holder, .. } => panic!("held by {holder}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn take_held_renew_release() {
        let c = MemoryCoordinator::new();
        let d = digest(1);
        let lease = mine(c.take(&d, "http://a", TTL).await.unwrap());
        match c.take(&d, "http://b", TTL).await.unwrap() {
            Taken::Held { holder, token } => {
                assert_eq!(holder, "http://a");
                assert_eq!(token, lease.token);
            }
            Taken::Mine(_) => panic!("taken twice"),
        }
        // Renewed at 20 s, it outlives its first expiry.
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(c.renew(&lease, TTL).await.unwrap());
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(matches!(
            c.take(&d, "http://b", TTL).await.unwrap(),
            Taken::Held { .. }
        ));
        c.release(&lease).await.unwrap();
        let again = mine(c.take(&d, "http://b", TTL).await.unwrap());
        assert_ne!(again.token, lease.token, "each taking has its own token");
        // Another digest is another lease.
        mine(c.take(&digest(2), "http://a", TTL).await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stale_token_neither_renews_nor_releases() {
        let c = MemoryCoordinator::new();
        let d = digest(1);
        let old = mine(c.take(&d, "http://a", TTL).await.unwrap());
        tokio::time::advance(TTL + Duration::from_secs(1)).await;
        assert!(!c.renew(&old, TTL).await.unwrap(), "expired");
        let new = mine(c.take(&d, "http://b", TTL).await.unwrap());
        assert!(!c.renew(&old, TTL).await.unwrap());
        c.release(&old).await.unwrap();
        match c.take(&d, "http://c", TTL).await.unwrap() {
            Taken::Held { holder, token } => {
                assert_eq!(holder, "http://b");
                assert_eq!(token, new.token);
            }
            Taken::Mine(_) => panic!("a stale release freed the new lease"),
        }
        assert!(c.renew(&new, TTL).await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn take_over_only_while_the_token_is_the_one_seen() {
        let c = MemoryCoordinator::new();
        let d = digest(1);
        let a = mine(c.take(&d, "http://a", TTL).await.unwrap());
        assert_eq!(
            c.take_over(&d, "not-it", "http://b", TTL).await.unwrap(),
            None
        );
        let b = c
            .take_over(&d, &a.token, "http://b", TTL)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(b.key, a.key);
        assert_ne!(b.token, a.token);
        // A second replica that saw the same token is too late.
        assert_eq!(
            c.take_over(&d, &a.token, "http://c", TTL).await.unwrap(),
            None
        );
        assert!(!c.renew(&a, TTL).await.unwrap());
        assert!(c.renew(&b, TTL).await.unwrap());
        match c.take(&d, "http://c", TTL).await.unwrap() {
            Taken::Held { holder, .. } => assert_eq!(holder, "http://b"),
            Taken::Mine(_) => panic!("free after a takeover"),
        }
        // Nothing to take over once it expired.
        tokio::time::advance(TTL * 2).await;
        assert_eq!(
            c.take_over(&d, &b.token, "http://c", TTL).await.unwrap(),
            None
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lock_excludes_a_second_holder_until_it_expires() {
        let c = MemoryCoordinator::new();
        let a = c.lock("evict", "http://a", TTL).await.unwrap().unwrap();
        assert_eq!(c.lock("evict", "http://b", TTL).await.unwrap(), None);
        assert!(c.lock("other", "http://b", TTL).await.unwrap().is_some());
        tokio::time::advance(TTL - Duration::from_secs(1)).await;
        assert_eq!(c.lock("evict", "http://b", TTL).await.unwrap(), None);
        tokio::time::advance(Duration::from_secs(2)).await;
        let b = c.lock("evict", "http://b", TTL).await.unwrap().unwrap();
        assert!(!c.renew(&a, TTL).await.unwrap());
        c.release(&b).await.unwrap();
        assert!(c.lock("evict", "http://a", TTL).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn peers_are_those_announced_within_the_window() {
        let c = MemoryCoordinator::new();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        c.announce("http://a", t0).await.unwrap();
        c.announce("http://b", t0 + Duration::from_secs(50))
            .await
            .unwrap();
        let now = t0 + Duration::from_secs(60);
        let within = Duration::from_secs(30);
        assert_eq!(
            c.peers(now, within).await.unwrap(),
            vec![("http://b".to_owned(), t0 + Duration::from_secs(50))]
        );
        // Announcing again brings it back.
        c.announce("http://a", now).await.unwrap();
        let names: Vec<String> = c
            .peers(now, within)
            .await
            .unwrap()
            .into_iter()
            .map(|(h, _)| h)
            .collect();
        assert_eq!(names, ["http://a", "http://b"]);
    }
}
