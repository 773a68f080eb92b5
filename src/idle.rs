//! Closes connections that carry no traffic for a while: a wrapper around
//! the socket whose reads, and writes that cannot proceed, fail with
//! `TimedOut` once neither a read nor a write has moved a byte for the idle
//! timeout. A connection that has sent nothing yet gets a shorter first
//! deadline (the header read timeout), so a silent client does not hold a
//! connection slot for the whole idle time.
//!
//! The write side matters as much as the read side: while hyper writes a
//! response it does not always poll reads (not at all when a pipelined
//! request waits in its buffer), so a client that stops reading would
//! otherwise hold its connection, and its slot, for as long as it likes.
//!
//! With a [`SendRule`], a client a response waits on must also take its
//! bytes at a minimum pace (`server.send_timeout`, `server.min_send_rate`):
//! the time writes spend waiting on it is summed from the first wait, and
//! once it reaches the window the bytes it took meanwhile are judged by
//! [`SendRule::verdict`]. Time the writer spends waiting for bytes of its own
//! never counts, so a slow upstream does not get its clients cut.
//!
//! A connection given up on while writing (too slow, or taking nothing) is
//! [`Abandon`]ed: its close becomes a reset, so the kernel drops what it still
//! queues for the client instead of sending it on at the client's pace.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::connections::policy::{SendRule, SendVerdict};

/// A connection the mirror gives up on may still have megabytes of a response
/// queued in the kernel, which a graceful close would go on sending at the
/// client's pace (seen: a reader taking 1 KiB/s still received 20 s after the
/// mirror cut it). `abandon` makes the coming close a reset (`SO_LINGER` 0),
/// so the kernel drops them. Called only on a connection being given up on:
/// a reset on a normal close could cut a response's last bytes.
pub trait Abandon {
    fn abandon(&self);
}

impl Abandon for tokio::net::TcpStream {
    fn abandon(&self) {
        let _ = self.set_zero_linger();
    }
}

impl<S: Abandon> Abandon for tokio_rustls::server::TlsStream<S> {
    fn abandon(&self) {
        self.get_ref().0.abandon();
    }
}

impl Abandon for tokio::io::DuplexStream {
    fn abandon(&self) {}
}

pub struct IdleTimeout<T> {
    inner: T,
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
    send: Option<SendFloor>,
}

/// The minimum pace of a client that writes wait on.
struct SendFloor {
    rule: SendRule,
    /// Waiting summed since the count began, the current wait excluded.
    waited: Duration,
    /// When the current wait began.
    waiting_since: Option<Instant>,
    /// Bytes the client took since the count began.
    taken: u64,
    /// When the current wait completes the window.
    due: Pin<Box<Sleep>>,
}

impl SendFloor {
    fn too_slow() -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            "client takes the response below server.min_send_rate",
        )
    }

    /// `n` bytes taken: a wait ends, and a full window is judged.
    fn took(&mut self, n: usize) -> io::Result<()> {
        self.taken += n as u64;
        if let Some(since) = self.waiting_since.take() {
            self.waited += since.elapsed();
        }
        match self.rule.verdict(self.waited, self.taken) {
            SendVerdict::Cut => Err(Self::too_slow()),
            SendVerdict::Restart => {
                self.waited = Duration::ZERO;
                self.taken = 0;
                Ok(())
            }
            SendVerdict::Continue => Ok(()),
        }
    }

    /// A write waits on the client: `Err` once the window is full and the
    /// client too slow; else the waker is registered for the window's end.
    fn waits(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        loop {
            let since = match self.waiting_since {
                Some(s) => s,
                None => {
                    if self.waited.is_zero() {
                        // A new count judges only what is taken from here.
                        self.taken = 0;
                    }
                    let now = Instant::now();
                    self.waiting_since = Some(now);
                    let left = self.rule.window.saturating_sub(self.waited);
                    self.due.as_mut().reset(now + left);
                    now
                }
            };
            if self.rule.window.is_zero() || self.due.as_mut().poll(cx).is_pending() {
                return Ok(());
            }
            let waited = self.waited + since.elapsed();
            match self.rule.verdict(waited, self.taken) {
                SendVerdict::Cut => return Err(Self::too_slow()),
                SendVerdict::Restart | SendVerdict::Continue => {
                    // The pace was kept: a new count starts with this wait.
                    self.waited = Duration::ZERO;
                    self.taken = 0;
                    self.waiting_since = None;
                }
            }
        }
    }
}

impl<T: Abandon> IdleTimeout<T> {
    /// A write-side error: the connection is given up on.
    fn give_up<R>(&self, r: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        if matches!(r, Poll::Ready(Err(_))) {
            self.inner.abandon();
        }
        r
    }

    /// A write, flush or shutdown that waits on the client: as [`Self::stalled`],
    /// and given up on once the deadline passed.
    fn write_stalled<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        let r = self.stalled(cx);
        self.give_up(r)
    }

    /// A write's result: progress pushes the deadline back, a write the peer
    /// does not make room for counts toward it.
    fn wrote(
        &mut self,
        r: Poll<io::Result<usize>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        match r {
            Poll::Ready(Ok(n)) if n > 0 => {
                self.active();
                if let Some(floor) = &mut self.send {
                    if let Err(e) = floor.took(n) {
                        return self.give_up(Poll::Ready(Err(e)));
                    }
                }
                Poll::Ready(Ok(n))
            }
            Poll::Pending => {
                if let Some(floor) = &mut self.send {
                    if let Err(e) = floor.waits(cx) {
                        return self.give_up(Poll::Ready(Err(e)));
                    }
                }
                self.write_stalled(cx)
            }
            other => other,
        }
    }
}

impl<T> IdleTimeout<T> {
    /// `first` bounds the wait for the first byte, `timeout` every silence after.
    pub fn new(inner: T, first: Duration, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            deadline: Box::pin(tokio::time::sleep(first.min(timeout))),
            send: None,
        }
    }

    /// Adds the minimum pace for a client writes wait on.
    pub fn with_send_rule(mut self, rule: SendRule) -> Self {
        self.send = Some(SendFloor {
            rule,
            waited: Duration::ZERO,
            waiting_since: None,
            taken: 0,
            due: Box::pin(tokio::time::sleep(Duration::ZERO)),
        });
        self
    }

    fn active(&mut self) {
        self.deadline.as_mut().reset(Instant::now() + self.timeout);
    }

    /// What a poll that moved nothing returns: `TimedOut` once the deadline
    /// passed, else `Pending` (the deadline's timer wakes the task then).
    fn stalled<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "connection idle for too long",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleTimeout<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.active();
                }
                Poll::Ready(r)
            }
            Poll::Pending => self.stalled(cx),
        }
    }
}

impl<T: AsyncWrite + Unpin + Abandon> AsyncWrite for IdleTimeout<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        self.wrote(r, cx)
    }

    // A flush or shutdown that waits (TLS records the peer does not take)
    // counts toward the deadline like a write; their progress is not seen
    // here, the next write's or read's is.
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Pending => self.write_stalled(cx),
            done => done,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_shutdown(cx) {
            Poll::Pending => self.write_stalled(cx),
            done => done,
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(r, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn traffic_keeps_it_open_and_silence_closes_it() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut conn = IdleTimeout::new(a, Duration::from_secs(9), Duration::from_secs(10));
        let writer = tokio::spawn(async move {
            for msg in [b"hi", b"yo"] {
                tokio::time::sleep(Duration::from_secs(8)).await;
                tokio::io::AsyncWriteExt::write_all(&mut b, msg)
                    .await
                    .unwrap();
            }
            b
        });
        let mut buf = [0u8; 4];
        // 8 s of silence twice: each under the timeout, so both arrive.
        assert_eq!(conn.read(&mut buf).await.unwrap(), 2);
        assert_eq!(conn.read(&mut buf).await.unwrap(), 2);
        let started = Instant::now();
        let err = conn.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        drop(writer);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_gets_the_first_deadline() {
        let (a, _b) = tokio::io::duplex(64);
        let mut conn = IdleTimeout::new(a, Duration::from_secs(2), Duration::from_secs(120));
        let started = Instant::now();
        let mut buf = [0u8; 4];
        let err = conn.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }

    /// A peer that stops reading: the write blocks on the full pipe and fails
    /// once it made no progress for the idle timeout, though nobody reads.
    #[tokio::test(start_paused = true)]
    async fn a_write_the_peer_never_takes_times_out() {
        let (a, _b) = tokio::io::duplex(64);
        let mut conn = IdleTimeout::new(a, Duration::from_secs(9), Duration::from_secs(10));
        let started = Instant::now();
        // Bounded, so a write that never times out fails the test instead of hanging it.
        let write = tokio::time::timeout(Duration::from_secs(60), conn.write_all(&[7u8; 1024]));
        let err = write.await.expect("still blocked after 60 s").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        // The first 64 bytes went through at once and reset the deadline.
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }

    fn floor(window: u64, rate: u64) -> SendRule {
        SendRule {
            window: Duration::from_secs(window),
            min_rate: rate,
        }
    }

    /// A reader taking 64 bytes every 8 s (8 B/s) under a floor of 16 B/s
    /// over 60 s of waiting is cut after that minute, long before the idle
    /// timeout would (it makes progress every 8 s).
    #[tokio::test(start_paused = true)]
    async fn a_reader_below_the_send_rate_is_cut_after_the_window() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut conn = IdleTimeout::new(a, Duration::from_secs(9), Duration::from_secs(10))
            .with_send_rule(floor(60, 16));
        let _reader = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            loop {
                tokio::time::sleep(Duration::from_secs(8)).await;
                if b.read(&mut buf).await.unwrap_or(0) == 0 {
                    break;
                }
            }
        });
        let started = Instant::now();
        let err = conn.write_all(&[7u8; 1 << 20]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(60) && took <= Duration::from_secs(70),
            "{took:?}"
        );
    }

    /// The same reader under a floor it keeps is not cut, and a writer that
    /// is slow itself (the client always has room) never is.
    #[tokio::test(start_paused = true)]
    async fn a_reader_keeping_the_rate_and_a_slow_writer_are_not_cut() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut conn = IdleTimeout::new(a, Duration::from_secs(9), Duration::from_secs(10))
            .with_send_rule(floor(60, 4));
        let reader = tokio::spawn(async move {
            let mut got = 0;
            let mut buf = [0u8; 64];
            while got < 4096 {
                tokio::time::sleep(Duration::from_secs(8)).await;
                got += b.read(&mut buf).await.unwrap();
            }
            got
        });
        conn.write_all(&[7u8; 4096]).await.unwrap();
        assert_eq!(reader.await.unwrap(), 4096);

        let (a, mut b) = tokio::io::duplex(1 << 16);
        let mut conn = IdleTimeout::new(a, Duration::from_secs(9), Duration::from_secs(10))
            .with_send_rule(floor(1, 1 << 20));
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 1 << 16];
            let mut got = 0;
            while got < 100 {
                got += b.read(&mut buf).await.unwrap();
            }
        });
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_secs(5)).await;
            conn.write_all(&[1]).await.unwrap();
        }
        reader.await.unwrap();
    }

    /// A slow reader is not an idle one: each bit of room it makes pushes
    /// the deadline back, so a write that takes far longer than the timeout
    /// in all still completes.
    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_keeps_the_write_going() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut conn = IdleTimeout::new(a, Duration::from_secs(9), Duration::from_secs(10));
        let reader = tokio::spawn(async move {
            let mut got = 0;
            let mut buf = [0u8; 64];
            while got < 1024 {
                tokio::time::sleep(Duration::from_secs(8)).await;
                got += b.read(&mut buf).await.unwrap();
            }
            got
        });
        let started = Instant::now();
        conn.write_all(&[7u8; 1024]).await.unwrap();
        assert!(started.elapsed() > Duration::from_secs(100));
        assert_eq!(reader.await.unwrap(), 1024);
    }
}
