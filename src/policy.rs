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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_freshness() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let ttl = Duration::from_secs(300);
        assert!(tag_is_fresh(t0, t0, ttl));
        assert!(tag_is_fresh(t0, t0 + Duration::from_secs(299), ttl));
        assert!(!tag_is_fresh(t0, t0 + Duration::from_secs(300), ttl));
        assert!(!tag_is_fresh(
            t0,
            t0 + Duration::from_secs(1),
            Duration::ZERO
        ));
        assert!(tag_is_fresh(t0, t0 - Duration::from_secs(10), ttl));
    }
}
