//! `streamingConnectionIdleTimeout`: a streaming connection on which nothing was read or
//! written for that long is closed, as the kubelet's streaming server closes it (its default
//! is 4 h). `Activity` records the last time bytes moved; `IdleIo` records it for a byte
//! stream (a SPDY connection, a tunnel), the WebSocket paths touch it per message. Each
//! connection's watchdog waits on `Activity::idle` next to the session it guards.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// When a connection last moved bytes.
#[derive(Clone)]
pub struct Activity {
    last: Arc<Mutex<Instant>>,
    timeout: Duration,
}

impl Activity {
    pub fn new(timeout: Duration) -> Self {
        Activity {
            last: Arc::new(Mutex::new(Instant::now())),
            timeout,
        }
    }

    pub fn touch(&self) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    /// Completes once nothing touched it for the timeout.
    pub async fn idle(&self) {
        loop {
            let deadline = *self.last.lock().unwrap_or_else(|p| p.into_inner()) + self.timeout;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// A byte stream that touches its `Activity` whenever bytes are read or written.
pub struct IdleIo<IO> {
    io: IO,
    activity: Activity,
}

impl<IO> IdleIo<IO> {
    pub fn new(io: IO, activity: Activity) -> Self {
        IdleIo { io, activity }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for IdleIo<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for IdleIo<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn bytes_either_way_put_the_idle_end_off() {
        let activity = Activity::new(Duration::from_secs(10));
        let (a, mut b) = tokio::io::duplex(64);
        let mut io = IdleIo::new(a, activity.clone());
        let start = Instant::now();
        tokio::time::sleep(Duration::from_secs(6)).await;
        io.write_all(b"x").await.unwrap();
        tokio::time::sleep(Duration::from_secs(6)).await;
        b.write_all(b"y").await.unwrap();
        let mut byte = [0u8];
        io.read_exact(&mut byte).await.unwrap();
        activity.idle().await;
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(22),
            "10 s after the last read"
        );
    }
}
