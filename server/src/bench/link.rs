//! Link emulation on loopback: a TCP proxy per phone that delays each direction by a one-way
//! latency and limits it to a bandwidth, as a mobile link would.
//!
//! Modelled as a pipeline, not a per-chunk sleep: a byte read at `t` starts serialising when the
//! link in its direction is free (not before `t`), takes `len / bandwidth`, and arrives
//! `latency` after its last bit left. Data keeps flowing while earlier data is in flight, so
//! round trips overlap exactly as much as the protocol lets them. The TCP handshake, which
//! loopback completes at once, is charged too: a connection's first bytes up are held one round
//! trip, as if the phone had waited for SYN-ACK.
//!
//! Every proxy also counts the bytes it carries each way, telling the HTTP upgrade from the
//! websocket frames after it, and the turns of the conversation (frame bytes down after frame
//! bytes up): the automerge-repo side-by-side measures its phones here, since its client has
//! no counters of its own. On lan that comparison uses a pass-through proxy ([`LinkProxy::passthrough`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Bytes per emulated packet: data is delivered progressively, one segment at a time.
const SEGMENT: usize = 1448;

/// A link's latency and bandwidth (the same both ways).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Link {
    pub one_way: Duration,
    pub bits_per_sec: u64,
}

impl Link {
    pub fn rtt(&self) -> Duration {
        self.one_way * 2
    }

    /// Time to serialise `bytes` onto the link.
    pub fn serialise(&self, bytes: u64) -> Duration {
        Duration::from_secs_f64(bytes as f64 * 8.0 / self.bits_per_sec as f64)
    }
}

/// The `--link` profiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    /// Loopback as it is: no emulation, no proxy.
    Lan,
    /// 100 ms one way, 1.5 Mbit/s.
    #[value(name = "3g")]
    ThreeG,
    /// 300 ms one way, 250 kbit/s.
    #[value(name = "2g")]
    TwoG,
}

impl Profile {
    pub fn link(self) -> Option<Link> {
        match self {
            Profile::Lan => None,
            Profile::ThreeG => Some(Link { one_way: Duration::from_millis(100), bits_per_sec: 1_500_000 }),
            Profile::TwoG => Some(Link { one_way: Duration::from_millis(300), bits_per_sec: 250_000 }),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Profile::Lan => "lan",
            Profile::ThreeG => "3g",
            Profile::TwoG => "2g",
        }
    }
}

/// When each direction of one phone's link is next free. Shared by all of the phone's
/// connections: it has one radio.
#[derive(Default)]
struct Busy {
    up: Mutex<Option<Instant>>,
    down: Mutex<Option<Instant>>,
}

/// What a proxy has carried so far, over all its connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Bytes after each connection's HTTP upgrade (websocket frames, headers included), each way.
    pub up: u64,
    pub down: u64,
    /// The HTTP upgrade request and response.
    pub upgrade_up: u64,
    pub upgrade_down: u64,
    /// Times frame bytes came down after frame bytes had gone up: the round trips the
    /// conversation took, as seen on the wire (pings included).
    pub turns: u64,
}

impl Counts {
    /// What was carried between `before` and `self`.
    pub fn since(&self, before: &Counts) -> Counts {
        Counts {
            up: self.up - before.up,
            down: self.down - before.down,
            upgrade_up: self.upgrade_up - before.upgrade_up,
            upgrade_down: self.upgrade_down - before.upgrade_down,
            turns: self.turns - before.turns,
        }
    }
}

#[derive(Default)]
struct Tally {
    up: AtomicU64,
    down: AtomicU64,
    upgrade_up: AtomicU64,
    upgrade_down: AtomicU64,
    turns: AtomicU64,
    /// The last frame bytes went up.
    last_up: AtomicBool,
}

impl Tally {
    fn frames(&self, up: bool, n: u64) {
        if up {
            self.up.fetch_add(n, Relaxed);
            self.last_up.store(true, Relaxed);
        } else {
            self.down.fetch_add(n, Relaxed);
            if self.last_up.swap(false, Relaxed) {
                self.turns.fetch_add(1, Relaxed);
            }
        }
    }

    fn upgrade(&self, up: bool, n: u64) {
        (if up { &self.upgrade_up } else { &self.upgrade_down }).fetch_add(n, Relaxed);
    }
}

/// Where a direction of one connection is in its HTTP upgrade: bytes up to and including the
/// blank line ending the head are upgrade bytes, the rest frames.
#[derive(Default)]
struct Head {
    done: bool,
    /// How much of "\r\n\r\n" the last bytes matched.
    matched: usize,
}

impl Head {
    /// How many of `data`'s first bytes still belong to the HTTP head.
    fn take(&mut self, data: &[u8]) -> usize {
        if self.done {
            return 0;
        }
        const END: &[u8] = b"\r\n\r\n";
        for (i, b) in data.iter().enumerate() {
            self.matched = if *b == END[self.matched] { self.matched + 1 } else { usize::from(*b == b'\r') };
            if self.matched == END.len() {
                self.done = true;
                return i + 1;
            }
        }
        data.len()
    }
}

/// One phone's emulated link to `upstream`. Dropping it closes the listener and every
/// connection through it.
pub struct LinkProxy {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    tally: Arc<Tally>,
}

impl LinkProxy {
    pub async fn start(upstream: SocketAddr, link: Link) -> std::io::Result<LinkProxy> {
        Self::open(upstream, Some(link)).await
    }

    /// A proxy that only counts: loopback as it is, for measuring a client that cannot count.
    pub async fn passthrough(upstream: SocketAddr) -> std::io::Result<LinkProxy> {
        Self::open(upstream, None).await
    }

    /// What it has carried so far.
    pub fn counts(&self) -> Counts {
        let t = &self.tally;
        Counts {
            up: t.up.load(Relaxed),
            down: t.down.load(Relaxed),
            upgrade_up: t.upgrade_up.load(Relaxed),
            upgrade_down: t.upgrade_down.load(Relaxed),
            turns: t.turns.load(Relaxed),
        }
    }

    async fn open(upstream: SocketAddr, link: Option<Link>) -> std::io::Result<LinkProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let busy = Arc::new(Busy::default());
        let tally = Arc::new(Tally::default());
        let counting = tally.clone();
        let task = tokio::spawn(async move {
            // Connections live in this set, so aborting the proxy ends them too.
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((client, _)) = accepted else { return };
                        conns.spawn(connection(client, upstream, link, busy.clone(), counting.clone()));
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Ok(LinkProxy { addr, task, tally })
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn connection(client: TcpStream, upstream: SocketAddr, link: Option<Link>, busy: Arc<Busy>, tally: Arc<Tally>) {
    let accepted = Instant::now();
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let busy2 = busy.clone();
    let handshake = link.map_or(Duration::ZERO, |l| l.rtt());
    let up = pipe(cr, sw, link, accepted + handshake, move |t| slot(&busy.up, t), Direction { up: true, tally: tally.clone() });
    let down = pipe(sr, cw, link, accepted, move |t| slot(&busy2.down, t), Direction { up: false, tally });
    tokio::join!(up, down);
}

/// Reserve the link for `d` from the earliest of `now` or when it frees; returns when the
/// last bit leaves.
fn slot(free: &Mutex<Option<Instant>>, (now, d): (Instant, Duration)) -> Instant {
    let mut f = free.lock().unwrap_or_else(|p| p.into_inner());
    let start = f.map_or(now, |f| f.max(now));
    let end = start + d;
    *f = Some(end);
    end
}

/// Which way a pipe carries, for counting.
struct Direction {
    up: bool,
    tally: Arc<Tally>,
}

/// Carry one direction: read eagerly, stamp each segment with its arrival time, deliver in
/// order at that time (at once without a link). The sender's close is passed on after the
/// last delivery.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    link: Option<Link>,
    not_before: Instant,
    reserve: impl Fn((Instant, Duration)) -> Instant + Send,
    dir: Direction,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = async move {
        while let Some((at, data)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&data).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut head = Head::default();
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let upgrade = head.take(&buf[..n]);
            if upgrade > 0 {
                dir.tally.upgrade(dir.up, upgrade as u64);
            }
            if n > upgrade {
                dir.tally.frames(dir.up, (n - upgrade) as u64);
            }
            let Some(link) = link else {
                if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                    return;
                }
                continue;
            };
            let now = Instant::now().max(not_before);
            for seg in buf[..n].chunks(SEGMENT) {
                let left = reserve((now, link.serialise(seg.len() as u64)));
                if tx.send((left + link.one_way, seg.to_vec())).is_err() {
                    return;
                }
            }
        }
        // Dropping `tx` here lets the writer finish and close.
    };
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loopback server that sends back whatever one connection sends it.
    async fn echo_server() -> SocketAddr {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.unwrap();
            let mut buf = vec![0u8; 65536];
            loop {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    return;
                }
                s.write_all(&buf[..n]).await.unwrap();
            }
        });
        addr
    }

    #[tokio::test]
    async fn latency_and_bandwidth_are_a_pipeline() {
        let upstream = echo_server().await;
        // 50 ms one way, 800 kbit/s: 100,000 bytes take 1 s to serialise.
        let link = Link { one_way: Duration::from_millis(50), bits_per_sec: 800_000 };
        let proxy = LinkProxy::start(upstream, link).await.unwrap();
        let mut c = TcpStream::connect(proxy.addr).await.unwrap();
        let t = std::time::Instant::now();
        let (mut r, mut w) = c.split();
        let send = async { w.write_all(&[7u8; 100_000]).await.unwrap() };
        let mut got = vec![0u8; 100_000];
        let receive = async { r.read_exact(&mut got).await.unwrap() };
        tokio::join!(send, receive);
        let took = t.elapsed();
        // Handshake 100 ms + up (1 s + 50 ms) + down, pipelined behind up: a segment and 50 ms
        // more, about 1.2 s. Had the link sent the echo only once it was all in, down would
        // add another second: the ceiling between them leaves half a second for a busy machine.
        assert!(took >= Duration::from_millis(1150), "{took:?}");
        assert!(took < Duration::from_millis(1700), "{took:?}");
        assert!(got.iter().all(|b| *b == 7));
    }

    #[test]
    fn the_http_head_ends_at_the_blank_line_across_reads() {
        let mut h = Head::default();
        assert_eq!(h.take(b"GET / HTTP/1.1\r\nHost: x\r"), 24);
        assert_eq!(h.take(b"\n\r\nframe"), 3);
        assert_eq!(h.take(b"more"), 0);
    }

    #[tokio::test]
    async fn a_passthrough_counts_upgrade_frames_and_turns() {
        let upstream = echo_server().await;
        let proxy = LinkProxy::passthrough(upstream).await.unwrap();
        let mut c = TcpStream::connect(proxy.addr).await.unwrap();
        let head = b"GET / HTTP/1.1\r\n\r\n";
        for msg in [&head[..], b"hello", b"again"] {
            c.write_all(msg).await.unwrap();
            let mut got = vec![0u8; msg.len()];
            c.read_exact(&mut got).await.unwrap();
        }
        // The echoed head is the "response" head; each echoed frame is one turn.
        let n = proxy.counts();
        assert_eq!((n.upgrade_up, n.upgrade_down, n.up, n.down, n.turns), (18, 18, 10, 10, 2), "{n:?}");
    }
}
