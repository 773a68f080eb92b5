//! The minimum transfer rate of an upstream body, measured over a window
//! of the time spent waiting for it (like curl's `--speed-limit` and
//! `--speed-time`): a body that trickles a byte a second never pauses for
//! `read_timeout`, yet is as good as stalled. Pure: the caller passes the
//! time it waited for each chunk, so time spent by the download itself
//! (waiting for a slow disk or client) never counts against the upstream.

use std::collections::VecDeque;
use std::time::Duration;

/// Samples kept per window: boundaries are at most `window / GRAIN` late.
const GRAIN: u32 = 16;

/// Bytes and waiting time of one connection's body.
#[derive(Debug, Clone)]
pub struct RateWindow {
    /// Bytes per second; 0: any rate passes.
    min_rate: u64,
    window: Duration,
    /// (waited, bytes) totals at some earlier chunks, oldest first; the
    /// first one at or before `waited - window` once that is past.
    samples: VecDeque<(Duration, u64)>,
    waited: Duration,
    bytes: u64,
}

impl RateWindow {
    /// A window of `window` in which at least `min_rate` bytes per second
    /// must arrive; `min_rate` or `window` zero turns the check off.
    pub fn new(min_rate: u64, window: Duration) -> Self {
        let mut w = Self {
            min_rate,
            window,
            samples: VecDeque::new(),
            waited: Duration::ZERO,
            bytes: 0,
        };
        w.reset();
        w
    }

    /// Starts over (a new connection).
    pub fn reset(&mut self) {
        self.samples.clear();
        self.samples.push_back((Duration::ZERO, 0));
        self.waited = Duration::ZERO;
        self.bytes = 0;
    }

    /// `bytes` arrived after a wait of `waited`. `Err(rate)`, in bytes per
    /// second, when the last full window of waiting brought less than
    /// `min_rate` a second.
    pub fn record(&mut self, waited: Duration, bytes: u64) -> Result<(), u64> {
        if self.min_rate == 0 || self.window.is_zero() {
            return Ok(());
        }
        self.waited += waited;
        self.bytes += bytes;
        let last = self.samples.back().map_or(Duration::ZERO, |s| s.0);
        if self.waited.saturating_sub(last) >= self.window / GRAIN {
            self.samples.push_back((self.waited, self.bytes));
        }
        let Some(edge) = self.waited.checked_sub(self.window) else {
            return Ok(());
        };
        // Keep the newest sample at or before the window's start.
        while self.samples.get(1).is_some_and(|s| s.0 <= edge) {
            self.samples.pop_front();
        }
        let Some(&(w0, b0)) = self.samples.front() else {
            return Ok(());
        };
        let span = (self.waited - w0).as_secs_f64();
        let rate = (self.bytes - b0) as f64 / span.max(f64::MIN_POSITIVE);
        if rate < self.min_rate as f64 {
            Err(rate as u64)
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_trickle_is_too_slow_once_a_window_has_passed() {
        let mut w = RateWindow::new(1024, 5 * S);
        for _ in 0..4 {
            assert_eq!(w.record(S, 1), Ok(()), "within the first window");
        }
        assert_eq!(w.record(S, 1), Err(1));
    }

    #[test]
    fn a_fast_body_passes_and_a_slowdown_is_caught_within_a_window() {
        let mut w = RateWindow::new(1000, 4 * S);
        for _ in 0..100 {
            assert_eq!(w.record(S / 10, 64 * 1024), Ok(()));
        }
        // Slow from here: caught once the fast part left the window.
        let mut seconds = 0;
        while w.record(S, 10).is_ok() {
            seconds += 1;
            assert!(seconds < 6, "a trickle after a fast start was not caught");
        }
        assert!(
            seconds >= 3,
            "caught after {seconds} s, before a window passed"
        );
    }

    #[test]
    fn one_long_wait_that_brings_enough_passes() {
        let mut w = RateWindow::new(1000, 2 * S);
        assert_eq!(w.record(10 * S, 20_000), Ok(()));
        assert_eq!(w.record(10 * S, 100), Err(10));
    }

    #[test]
    fn reset_starts_a_new_window_and_zero_turns_it_off() {
        let mut w = RateWindow::new(1000, 2 * S);
        assert!(w.record(3 * S, 0).is_err());
        w.reset();
        assert_eq!(w.record(S, 0), Ok(()));
        let mut off = RateWindow::new(0, 2 * S);
        assert_eq!(off.record(100 * S, 0), Ok(()));
        let mut off = RateWindow::new(1000, Duration::ZERO);
        assert_eq!(off.record(100 * S, 0), Ok(()));
    }

    #[test]
    fn samples_stay_few_however_many_chunks_arrive() {
        let mut w = RateWindow::new(1, 10 * S);
        for _ in 0..100_000 {
            assert_eq!(w.record(Duration::from_millis(1), 16 * 1024), Ok(()));
        }
        assert!(w.samples.len() <= GRAIN as usize + 2, "{}", w.samples.len());
    }
}
