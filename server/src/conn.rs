//! Limits on the connections the server holds: how many at once, and how long one may go
//! without an answer before it becomes a sync session. Without them a client that opens
//! connections and sends nothing (or a byte of a header now and then) holds memory, file
//! descriptors and finally every slot, for ever.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::serve::Listener;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// Connections held at once. Past it the server accepts the next one only when one closes
/// (the kernel's backlog holds the rest).
pub const MAX_CONNECTIONS: usize = 4096;
/// How long an HTTP connection may go without the server writing to it: each request must be
/// sent (and answered) within this of the connection's start or the last answer. Bytes the
/// client sends do not extend it, so dripping a header a byte at a time does not hold a
/// connection. Requests are small (bodies at most 2 MiB, which even 2G sends in about 70 s;
/// phones sync over websockets). A sync session, once upgraded, keeps its own timeouts
/// (`session::IDLE_TIMEOUT`, and TCP keepalive for a live phone that waits quietly).
pub const HTTP_IDLE: Duration = Duration::from_secs(90);

/// A listener whose connections are counted and timed out when idle.
pub struct Limited<L> {
    inner: L,
    slots: Arc<Semaphore>,
    idle: Duration,
    warned: bool,
}

impl<L> Limited<L> {
    pub fn new(inner: L, max: usize, idle: Duration) -> Self {
        Self { inner, slots: Arc::new(Semaphore::new(max)), idle, warned: false }
    }
}

impl<L> Listener for Limited<L>
where
    L: Listener,
    L::Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Io = Guarded<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let permit = match self.slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if !std::mem::replace(&mut self.warned, true) {
                    tracing::warn!(max = MAX_CONNECTIONS, "the server holds as many connections as it takes; new ones wait until one closes");
                }
                self.slots.clone().acquire_owned().await.expect("the semaphore is never closed")
            }
        };
        let (io, addr) = self.inner.accept().await;
        (Guarded { io, _slot: permit, idle: self.idle, deadline: Box::pin(tokio::time::sleep(self.idle)), upgraded: false }, addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

impl<L: Listener<Addr = SocketAddr>> axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Limited<L>>> for crate::app::Peer
where
    L::Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    fn connect_info(s: axum::serve::IncomingStream<'_, Limited<L>>) -> Self {
        crate::app::Peer(*s.remote_addr())
    }
}

/// A connection that holds one of the listener's slots until it is dropped, and fails with
/// `TimedOut` once the server has not written to it for too long, until it has upgraded to a
/// websocket.
pub struct Guarded<T> {
    io: T,
    _slot: OwnedSemaphorePermit,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
    upgraded: bool,
}

impl<T> Guarded<T> {
    fn touch(&mut self) {
        if !self.upgraded {
            let next = Instant::now() + self.idle;
            self.deadline.as_mut().reset(next);
        }
    }

    /// Called when the inner IO is not ready: fail once the deadline has passed.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        !self.upgraded && self.deadline.as_mut().poll(cx).is_ready()
    }

    /// The server's answer switching protocols: from here the session times itself.
    fn note_upgrade(&mut self, first: &[u8]) {
        if !self.upgraded && first.starts_with(b"HTTP/1.1 101") {
            self.upgraded = true;
        }
    }
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "connection idle too long")
}

impl<T: AsyncRead + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            // What the client sends does not extend the deadline (see `HTTP_IDLE`); an idle
            // wait for it does end there.
            Poll::Ready(r) => Poll::Ready(r),
            Poll::Pending if this.expired(cx) => Poll::Ready(Err(timed_out())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.note_upgrade(buf);
        match Pin::new(&mut this.io).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                this.touch();
                Poll::Ready(Ok(n))
            }
            Poll::Pending if this.expired(cx) => Poll::Ready(Err(timed_out())),
            other => other,
        }
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(first) = bufs.iter().find(|b| !b.is_empty()) {
            this.note_upgrade(first);
        }
        match Pin::new(&mut this.io).poll_write_vectored(cx, bufs) {
            Poll::Ready(Ok(n)) => {
                this.touch();
                Poll::Ready(Ok(n))
            }
            Poll::Pending if this.expired(cx) => Poll::Ready(Err(timed_out())),
            other => other,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An idle connection is closed, and so is one that drips bytes without being answered;
    /// one that upgraded is not; and the cap holds connections back until one closes.
    #[tokio::test]
    async fn idle_connections_close_and_the_cap_holds() {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let mut listener = Limited::new(tcp, 2, Duration::from_millis(300));
        let idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut a, _) = listener.accept().await;
        let mut buf = [0u8; 8];
        let started = std::time::Instant::now();
        let err = a.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(250));
        drop(idle);

        let mut dripping = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut d, _) = listener.accept().await;
        let drip = async {
            for _ in 0..10 {
                if dripping.write_all(b"x").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        let reading = async {
            let started = std::time::Instant::now();
            loop {
                match d.read(&mut buf).await {
                    Ok(_) => continue,
                    Err(e) => return (e.kind(), started.elapsed()),
                }
            }
        };
        let (_, (kind, after)) = tokio::join!(drip, reading);
        assert_eq!(kind, io::ErrorKind::TimedOut);
        assert!(after < Duration::from_millis(700), "bytes from the client did not extend it: {after:?}");
        drop(d);

        let _upgrading = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut b, _) = listener.accept().await;
        b.write_all(b"HTTP/1.1 101 Switching Protocols\r\n\r\n").await.unwrap();
        let quiet = tokio::time::timeout(Duration::from_millis(800), b.read(&mut buf)).await;
        assert!(quiet.is_err(), "an upgraded connection is left to its session: {quiet:?}");

        // Two held (a's slot is still taken until a is dropped): a third waits.
        let _c = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(tokio::time::timeout(Duration::from_millis(300), listener.accept()).await.is_err(), "over the cap");
        drop(a);
        assert!(tokio::time::timeout(Duration::from_secs(2), listener.accept()).await.is_ok(), "a slot freed");
    }
}
