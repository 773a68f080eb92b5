//! A bounded history of the counters the status page charts (hits, lookups,
//! bytes served from cache, bytes fetched upstream): one sample per
//! [`SAMPLE_EVERY`], a day of them, in memory. Mechanism only: the samples
//! are cumulative counters as read; the page turns them into rates.

use std::collections::VecDeque;
use std::time::{Duration, SystemTime};

/// How often the counters are sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(60);

/// Samples kept: a day of them, and one more so the oldest minute has a
/// start.
pub const SAMPLES_KEPT: usize = 24 * 60 + 1;

/// The counters at one moment (cumulative since the process started).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub at: SystemTime,
    pub hits: u64,
    pub lookups: u64,
    /// Body bytes sent to clients from the cache.
    pub bytes_from_cache: u64,
    /// Blob bytes downloaded from upstreams.
    pub upstream_bytes: u64,
}

/// The last [`SAMPLES_KEPT`] samples, oldest first.
#[derive(Debug, Default)]
pub struct History {
    samples: VecDeque<Sample>,
}

impl History {
    /// Keeps `s`, dropping the oldest sample past the bound.
    pub fn record(&mut self, s: Sample) {
        if self.samples.len() == SAMPLES_KEPT {
            self.samples.pop_front();
        }
        self.samples.push_back(s);
    }

    pub fn samples(&self) -> Vec<Sample> {
        self.samples.iter().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_a_day_of_samples_and_drops_the_oldest() {
        let mut h = History::default();
        let t0 = SystemTime::UNIX_EPOCH;
        for i in 0..(SAMPLES_KEPT as u64 + 10) {
            h.record(Sample {
                at: t0 + SAMPLE_EVERY * u32::try_from(i).unwrap(),
                hits: i,
                lookups: i,
                bytes_from_cache: 0,
                upstream_bytes: 0,
            });
        }
        let s = h.samples();
        assert_eq!(s.len(), SAMPLES_KEPT);
        assert_eq!(s[0].hits, 10, "the ten oldest went");
        assert_eq!(s.last().unwrap().hits, SAMPLES_KEPT as u64 + 9);
    }
}
