//! The chunks a download received last, kept in memory so that clients
//! keeping up with it are served without reading the spool back. A chunk
//! stays at least until its spool write has landed, so every received byte
//! is either here or in the spool; beyond that, the window bounds memory.
//!
//! A download of a blob too large to keep has no spool: its chunks stay
//! until every attached reader has passed them, and the download waits for
//! room, so the slowest client sets the pace and memory stays bounded. A
//! download whose spool write failed (a full disk) switches to that mode
//! mid-way: what landed stays readable from the spool, and every chunk past
//! it stays until every reader passed it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use bytes::Bytes;
use tokio::sync::Notify;

/// Bytes kept once their writes have landed (more while writes lag).
const WINDOW: u64 = 1 << 20;
/// Without a spool, the download waits while more than this is kept.
const UNSPOOLED_LIMIT: u64 = 4 * WINDOW;

#[derive(Debug, Default)]
pub struct Recent {
    inner: Mutex<Inner>,
    /// Woken when chunks were dropped or a reader moved or left.
    room: Notify,
    /// `Inner::unspooled`, readable without the lock: with a spool, readers'
    /// positions decide nothing, so a reader's move costs no lock per chunk.
    unspooled: AtomicBool,
}

#[derive(Debug, Default)]
struct Inner {
    /// Contiguous chunks by offset, oldest first.
    chunks: VecDeque<(u64, Bytes)>,
    bytes: u64,
    /// The spool holds every byte before this offset.
    landed: u64,
    /// No more spool writes: chunks past `landed` are dropped only once
    /// every reader passed them.
    unspooled: bool,
    /// Where each attached reader is.
    readers: Vec<Weak<AtomicU64>>,
    /// Whether a chunk past `landed` has been dropped: a reader from the
    /// start could not be served any more.
    lost: bool,
}

/// A client's position in a download, which an unspooled download waits for.
#[derive(Debug)]
pub struct Reader {
    pos: Arc<AtomicU64>,
    recent: Arc<Recent>,
}

impl Reader {
    /// The client has every byte before `pos`.
    pub fn advance(&self, pos: u64) {
        self.pos.store(pos, Ordering::Relaxed);
        if self.recent.unspooled.load(Ordering::Relaxed) {
            self.recent.moved();
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        // The download may be waiting for this reader only.
        self.pos.store(u64::MAX, Ordering::Relaxed);
        self.recent.moved();
    }
}

impl Recent {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A reader from the blob's start, unless this download has dropped a
    /// chunk that is not in the spool: nobody can be served from the start
    /// any more.
    pub fn attach(self: &Arc<Self>) -> Option<Reader> {
        let mut inner = self.lock();
        if inner.lost {
            return None;
        }
        let pos = Arc::new(AtomicU64::new(0));
        inner.readers.push(Arc::downgrade(&pos));
        Some(Reader {
            pos,
            recent: self.clone(),
        })
    }

    /// From now on nothing more lands in the spool (the blob is too large
    /// to keep, or the spool cannot be written): chunks past the landed
    /// offset stay until every reader passed them.
    pub fn unspool(&self) {
        self.lock().unspooled = true;
        self.unspooled.store(true, Ordering::Relaxed);
    }

    fn moved(&self) {
        self.lock().trim();
        self.room.notify_waiters();
    }

    /// Without a spool: waits until the kept chunks are within their
    /// limit; `false` when no reader is left to wait for.
    pub async fn room(&self) -> bool {
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut inner = self.lock();
                inner.trim();
                if inner.readers.is_empty() {
                    return false;
                }
                if inner.bytes <= UNSPOOLED_LIMIT {
                    return true;
                }
            }
            notified.await;
        }
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

    /// Where bytes from `pos` up to `limit` (exclusive) are now: a slice of
    /// the kept chunk that holds `pos` (no copy), else the range of the spool
    /// that has landed, which never reaches past what was written.
    pub fn lookup(&self, pos: u64, limit: u64) -> Lookup {
        if limit <= pos {
            return Lookup::Nowhere;
        }
        let inner = self.lock();
        let kept = inner
            .chunks
            .partition_point(|(offset, _)| *offset <= pos)
            .checked_sub(1)
            .map(|i| &inner.chunks[i])
            .filter(|(offset, chunk)| pos < offset + chunk.len() as u64);
        if let Some((offset, chunk)) = kept {
            let end = limit.min(offset + chunk.len() as u64);
            return Lookup::Memory(chunk.slice((pos - offset) as usize..(end - offset) as usize));
        }
        // Past the window: landed, since no unlanded chunk is dropped.
        match limit.min(inner.landed) {
            end if end > pos => Lookup::Spool { end },
            _ => Lookup::Nowhere,
        }
    }
}

/// Where a range of a download's bytes can be read.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    Memory(Bytes),
    /// In the spool, from the position asked up to `end`.
    Spool {
        end: u64,
    },
    /// Not received yet, an empty range, or (without a spool) dropped.
    Nowhere,
}

impl Inner {
    /// Drops the oldest chunks beyond the window: never one not yet landed,
    /// unless spool writes stopped and every attached reader passed it.
    fn trim(&mut self) {
        self.readers.retain(|r| r.strong_count() > 0);
        let floor = if self.unspooled {
            let passed = self
                .readers
                .iter()
                .filter_map(Weak::upgrade)
                .map(|p| p.load(Ordering::Relaxed))
                .min()
                .unwrap_or(u64::MAX);
            passed.max(self.landed)
        } else {
            self.landed
        };
        while self.bytes > WINDOW {
            let Some((offset, chunk)) = self.chunks.front() else {
                break;
            };
            let (end, len) = (offset + chunk.len() as u64, chunk.len() as u64);
            if end > floor {
                break;
            }
            self.bytes -= len;
            self.chunks.pop_front();
            if end > self.landed {
                self.lost = true;
            }
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
        assert_eq!(r.lookup(10, 40), Lookup::Memory(chunk(30, 1)));
        // Up to the end of the chunk holding `pos`, never across chunks.
        assert_eq!(r.lookup(90, 150), Lookup::Memory(chunk(10, 1)));
        assert_eq!(r.lookup(100, 1000), Lookup::Memory(chunk(50, 2)));
        assert_eq!(r.lookup(150, 200), Lookup::Nowhere, "not received yet");
        assert_eq!(r.lookup(20, 20), Lookup::Nowhere, "empty range");
    }

    #[test]
    fn keeps_unlanded_chunks_past_the_window() {
        let r = Recent::default();
        let size = (WINDOW / 4) as usize;
        for i in 0..8u64 {
            r.push(i * size as u64, chunk(size, i as u8));
        }
        let at = |i: u64| i * size as u64;
        // Nothing landed: all eight chunks (twice the window) are still kept.
        assert_eq!(r.lookup(0, 1), Lookup::Memory(chunk(1, 0)));
        r.landed(at(3));
        // Three landed chunks may go; the window keeps the last four.
        assert_eq!(r.lookup(0, 1), Lookup::Spool { end: 1 });
        assert_eq!(r.lookup(at(3), at(3) + 1), Lookup::Memory(chunk(1, 3)));
        r.landed(at(8));
        assert_eq!(r.lookup(at(3), at(3) + 1), Lookup::Spool { end: at(3) + 1 });
        assert_eq!(r.lookup(at(4), at(4) + 1), Lookup::Memory(chunk(1, 4)));
    }

    /// Once spool writes stop (a full disk), what landed stays readable from
    /// the spool and each chunk past it stays until every reader passed it;
    /// a reader from the start may attach until one of those is dropped.
    #[test]
    fn after_spool_writes_stop_unlanded_chunks_wait_for_every_reader() {
        let r = Arc::new(Recent::default());
        let size = WINDOW / 2;
        let reader = r.attach().unwrap();
        for i in 0..4u64 {
            r.push(i * size, chunk(size as usize, i as u8));
        }
        r.landed(2 * size);
        r.unspool();
        assert_eq!(r.lookup(0, 1), Lookup::Spool { end: 1 });
        r.push(4 * size, chunk(size as usize, 4));
        // Past the window and not landed, but the reader has not passed it.
        assert_eq!(
            r.lookup(2 * size, 2 * size + 1),
            Lookup::Memory(chunk(1, 2))
        );
        assert!(r.attach().is_some(), "every byte is in the spool or memory");
        reader.advance(4 * size);
        assert_eq!(r.lookup(2 * size, 2 * size + 1), Lookup::Nowhere);
        assert!(r.attach().is_none(), "a byte from the start is gone");
        assert_eq!(r.lookup(size, size + 1), Lookup::Spool { end: size + 1 });
    }

    /// A reader past the window is sent to the spool only as far as it has
    /// landed, however far the download has received.
    #[test]
    fn spool_reads_stop_at_the_landed_offset() {
        let r = Recent::default();
        let size = WINDOW / 2;
        for i in 0..4u64 {
            r.push(i * size, chunk(size as usize, i as u8));
        }
        r.landed(size + 100);
        // Chunk 0 left the window; chunk 1 landed only in part.
        assert_eq!(r.lookup(10, 4 * size), Lookup::Spool { end: size + 100 });
        r.landed(2 * size);
        assert_eq!(
            r.lookup(size - 10, 4 * size),
            Lookup::Spool { end: 2 * size }
        );
    }
}
