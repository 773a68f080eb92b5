//! The chunks a download received last, kept in memory so that clients
//! keeping up with it are served without reading the spool back. A chunk
//! stays at least until its spool write has landed, so every received byte
//! is either here or in the spool; beyond that, the window bounds memory.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;

/// Bytes kept once their writes have landed (more while writes lag).
const WINDOW: u64 = 1 << 20;

#[derive(Debug, Default)]
pub struct Recent {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Contiguous chunks by offset, oldest first.
    chunks: VecDeque<(u64, Bytes)>,
    bytes: u64,
    /// The spool holds every byte before this offset.
    landed: u64,
}

impl Recent {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `chunk`, received at `offset`, right after the previous one.
    pub fn push(&self, offset: u64, chunk: Bytes) {
        let mut inner = self.lock();
        inner.bytes += chunk.len() as u64;
        inner.chunks.push_back((offset, chunk));
        inner.trim();
    }

    /// Records that the spool holds every byte before `offset`.
    pub fn landed(&self, offset: u64) {
        let mut inner = self.lock();
        inner.landed = inner.landed.max(offset);
        inner.trim();
    }

    /// Bytes from `pos` up to `limit` (exclusive) out of the chunk that
    /// holds `pos`, if it is still kept; no copy.
    pub fn get(&self, pos: u64, limit: u64) -> Option<Bytes> {
        let inner = self.lock();
        let i = inner
            .chunks
            .partition_point(|(offset, _)| *offset <= pos)
            .checked_sub(1)?;
        let (offset, chunk) = &inner.chunks[i];
        let end = limit.min(offset + chunk.len() as u64);
        if pos >= end {
            return None;
        }
        Some(chunk.slice((pos - offset) as usize..(end - offset) as usize))
    }
}

impl Inner {
    /// Drops the oldest chunks beyond the window, never one not yet landed.
    fn trim(&mut self) {
        while self.bytes > WINDOW {
            let Some((offset, chunk)) = self.chunks.front() else {
                break;
            };
            let len = chunk.len() as u64;
            if offset + len > self.landed {
                break;
            }
            self.bytes -= len;
            self.chunks.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(len: usize, fill: u8) -> Bytes {
        Bytes::from(vec![fill; len])
    }

    #[test]
    fn serves_slices_of_the_chunk_holding_a_position() {
        let r = Recent::default();
        r.push(0, chunk(100, 1));
        r.push(100, chunk(50, 2));
        assert_eq!(r.get(10, 40).unwrap(), chunk(30, 1));
        // Up to the end of the chunk holding `pos`, never across chunks.
        assert_eq!(r.get(90, 150).unwrap(), chunk(10, 1));
        assert_eq!(r.get(100, 1000).unwrap(), chunk(50, 2));
        assert!(r.get(150, 200).is_none(), "not received yet");
        assert!(r.get(20, 20).is_none(), "empty range");
    }

    #[test]
    fn keeps_unlanded_chunks_past_the_window() {
        let r = Recent::default();
        let size = (WINDOW / 4) as usize;
        for i in 0..8u64 {
            r.push(i * size as u64, chunk(size, i as u8));
        }
        // Nothing landed: all eight chunks (twice the window) are still kept.
        assert_eq!(r.get(0, 1).unwrap(), chunk(1, 0));
        r.landed(3 * size as u64);
        // Three landed chunks may go; the window keeps the last four.
        assert!(r.get(0, 1).is_none());
        assert!(r.get(2 * size as u64, 1 + 2 * size as u64).is_none());
        assert_eq!(
            r.get(3 * size as u64, 1 + 3 * size as u64).unwrap(),
            chunk(1, 3)
        );
        r.landed(8 * size as u64);
        assert!(r.get(3 * size as u64, 1 + 3 * size as u64).is_none());
        assert_eq!(
            r.get(4 * size as u64, 1 + 4 * size as u64).unwrap(),
            chunk(1, 4)
        );
    }
}
