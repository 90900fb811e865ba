//! Link emulation on loopback: a TCP proxy per phone that delays each direction by a one-way
//! latency and limits it to a bandwidth, as a mobile link would.
//!
//! Modelled as a pipeline, not a per-chunk sleep: a byte read at `t` starts serialising when the
//! link in its direction is free (not before `t`), takes `len / bandwidth`, and arrives
//! `latency` after its last bit left. Data keeps flowing while earlier data is in flight, so
//! round trips overlap exactly as much as the protocol lets them. The TCP handshake, which
//! loopback completes at once, is charged too: a connection's first bytes up are held one round
//! trip, as if the phone had waited for SYN-ACK.

use std::net::SocketAddr;
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

/// One phone's emulated link to `upstream`. Dropping it closes the listener and every
/// connection through it.
pub struct LinkProxy {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl LinkProxy {
    pub async fn start(upstream: SocketAddr, link: Link) -> std::io::Result<LinkProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let busy = Arc::new(Busy::default());
        let task = tokio::spawn(async move {
            // Connections live in this set, so aborting the proxy ends them too.
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((client, _)) = accepted else { return };
                        conns.spawn(connection(client, upstream, link, busy.clone()));
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Ok(LinkProxy { addr, task })
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn connection(client: TcpStream, upstream: SocketAddr, link: Link, busy: Arc<Busy>) {
    let accepted = Instant::now();
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let busy2 = busy.clone();
    let up = pipe(cr, sw, link, accepted + link.rtt(), move |t| slot(&busy.up, t));
    let down = pipe(sr, cw, link, accepted, move |t| slot(&busy2.down, t));
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

/// Carry one direction: read eagerly, stamp each segment with its arrival time, deliver in
/// order at that time. The sender's close is passed on after the last delivery.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    link: Link,
    not_before: Instant,
    reserve: impl Fn((Instant, Duration)) -> Instant + Send,
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
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
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

    #[tokio::test]
    async fn latency_and_bandwidth_are_a_pipeline() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = echo.local_addr().unwrap();
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
        // 50 ms one way, 800 kbit/s: 10,000 bytes take 100 ms to serialise.
        let link = Link { one_way: Duration::from_millis(50), bits_per_sec: 800_000 };
        let proxy = LinkProxy::start(upstream, link).await.unwrap();
        let mut c = TcpStream::connect(proxy.addr).await.unwrap();
        let t = std::time::Instant::now();
        c.write_all(&[7u8; 10_000]).await.unwrap();
        let mut got = vec![0u8; 10_000];
        c.read_exact(&mut got).await.unwrap();
        let took = t.elapsed();
        // Handshake 100 ms + up (100 ms + 50 ms) + down (pipelined behind up: ~1 segment + 50 ms).
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took < Duration::from_millis(450), "{took:?}");
        assert!(got.iter().all(|b| *b == 7));
    }
}
