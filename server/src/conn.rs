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
/// How long an HTTP connection may wait for a request to start: after it opens, and after each
/// answer (a keep-alive connection between a dashboard's requests).
pub const HTTP_IDLE: Duration = Duration::from_secs(90);
/// How long a request may take from its first byte to the start of its answer: sending it,
/// and the server working on it. Bytes the client sends do not extend it, so dripping a header
/// a byte at a time holds a connection this long at most. Phones sync over websockets; HTTP
/// requests are small (login, enrollment) or the dashboard's.
pub const REQUEST_BUDGET: Duration = Duration::from_secs(300);
// A sync session, once upgraded, keeps its own timeouts (`session::IDLE_TIMEOUT`, and TCP
// keepalive for a live phone that waits quietly): neither deadline applies to it.

/// A listener whose connections are counted and timed out when idle.
pub struct Limited<L> {
    inner: L,
    slots: Arc<Semaphore>,
    idle: Duration,
    budget: Duration,
    warned: bool,
}

impl<L> Limited<L> {
    /// At most `max` connections; `idle` to start a request, `budget` to have it answered.
    pub fn new(inner: L, max: usize, idle: Duration, budget: Duration) -> Self {
        Self { inner, slots: Arc::new(Semaphore::new(max)), idle, budget, warned: false }
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
        (Guarded { io, _slot: permit, idle: self.idle, budget: self.budget, deadline: Box::pin(tokio::time::sleep(self.idle)), awaiting: true, upgraded: false }, addr)
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
/// `TimedOut` when a request is slow to start or to be answered (see [`HTTP_IDLE`],
/// [`REQUEST_BUDGET`]), until it has upgraded to a websocket.
pub struct Guarded<T> {
    io: T,
    _slot: OwnedSemaphorePermit,
    idle: Duration,
    budget: Duration,
    deadline: Pin<Box<Sleep>>,
    /// Waiting for a request to start (opened, or answered the last one).
    awaiting: bool,
    upgraded: bool,
}

impl<T> Guarded<T> {
    /// The server wrote (an answer, or part of one): the next request may take its time to start.
    fn answered(&mut self) {
        if !self.upgraded {
            self.awaiting = true;
            let next = Instant::now() + self.idle;
            self.deadline.as_mut().reset(next);
        }
    }

    /// Bytes came in: if they start a request, it has its budget from now.
    fn received(&mut self) {
        if !self.upgraded && self.awaiting {
            self.awaiting = false;
            let next = Instant::now() + self.budget;
            self.deadline.as_mut().reset(next);
        }
    }

    /// Called when the inner IO is not ready: fail once the deadline has passed.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        !self.upgraded && self.deadline.as_mut().poll(cx).is_ready()
    }

    /// The server's answer switching protocols: from here the session times itself.
    fn note_upgrade(&mut self, first: &[u8]) {
        if !self.upgraded && first.len() >= 12 && first.starts_with(b"HTTP/1.") && &first[8..12] == b" 101" {
            self.upgraded = true;
        }
    }
}

impl<T> Guarded<T> {
    /// After a write was polled: written bytes are (part of) an answer; a write that cannot
    /// go out fails once the deadline has passed.
    fn wrote(&mut self, cx: &mut Context<'_>, polled: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        match polled {
            Poll::Ready(Ok(n)) => {
                self.answered();
                Poll::Ready(Ok(n))
            }
            Poll::Pending if self.expired(cx) => Poll::Ready(Err(timed_out())),
            other => other,
        }
    }
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "connection idle too long")
}

impl<T: AsyncRead + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            // What the client sends starts a request's budget, never extends it.
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    this.received();
                }
                Poll::Ready(r)
            }
            Poll::Pending if this.expired(cx) => Poll::Ready(Err(timed_out())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.note_upgrade(buf);
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.wrote(cx, polled)
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(first) = bufs.iter().find(|b| !b.is_empty()) {
            this.note_upgrade(first);
        }
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.wrote(cx, polled)
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
    /// A request being worked on (the client silent, the server not yet answering) has its
    /// budget, not the shorter wait for a request to start; after the answer, the short one.
    #[tokio::test]
    async fn a_request_in_progress_has_its_budget() {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let mut listener = Limited::new(tcp, 4, Duration::from_millis(300), Duration::from_millis(900));
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut server, _) = listener.accept().await;
        client.write_all(b"GET /v1/report HTTP/1.1\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        assert!(server.read(&mut buf).await.unwrap() > 0);
        // The handler works for longer than the idle wait: the connection stays.
        let working = tokio::time::timeout(Duration::from_millis(500), server.read(&mut buf)).await;
        assert!(working.is_err(), "cut while the server was working: {working:?}");
        server.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await.unwrap();
        // Answered: the next request must start within the idle wait.
        let started = std::time::Instant::now();
        let err = server.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_millis(600), "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn idle_connections_close_and_the_cap_holds() {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let mut listener = Limited::new(tcp, 2, Duration::from_millis(300), Duration::from_millis(600));
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
            for _ in 0..20 {
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
        assert!(after < Duration::from_millis(1100), "bytes from the client did not extend the request's budget: {after:?}");
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
