//! Closes connections that carry no traffic for a while: a wrapper around
//! the socket whose reads fail with `TimedOut` once neither a read nor a
//! write has moved a byte for the idle timeout. A connection that has sent
//! nothing yet gets a shorter first deadline (the header read timeout), so a
//! silent client does not hold a connection slot for the whole idle time.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

pub struct IdleTimeout<T> {
    inner: T,
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl<T> IdleTimeout<T> {
    /// `first` bounds the wait for the first byte, `timeout` every silence after.
    pub fn new(inner: T, first: Duration, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            deadline: Box::pin(tokio::time::sleep(first.min(timeout))),
        }
    }

    fn active(&mut self) {
        self.deadline.as_mut().reset(Instant::now() + self.timeout);
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
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connection idle for too long",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleTimeout<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.active();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.active();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

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
}
