//! The websocket transport (tokio-tungstenite), counting every byte at the socket.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use super::engine::FrameConn;
use super::{SyncError, SyncReport};
use crate::protocol::MAX_FRAME_BYTES;

#[derive(Default)]
struct Counters {
    up: AtomicU64,
    down: AtomicU64,
}

/// A TCP stream that counts the bytes crossing it.
struct Counting {
    inner: TcpStream,
    counters: Arc<Counters>,
}

impl AsyncRead for Counting {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.counters.down.fetch_add((buf.filled().len() - before) as u64, Relaxed);
        r
    }
}

impl AsyncWrite for Counting {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.counters.up.fetch_add(*n as u64, Relaxed);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

pub struct WsConn {
    ws: WebSocketStream<Counting>,
    counters: Arc<Counters>,
    upgrade_up: u64,
    upgrade_down: u64,
    frames_up: u64,
    frames_down: u64,
    timeout: Duration,
}

impl WsConn {
    /// Open `{server}/v1/sync`, proving the device's identity with `authorization`.
    pub async fn connect(server: &str, authorization: &str, timeout: Duration) -> Result<WsConn, SyncError> {
        let url = format!("{}/v1/sync", server.trim_end_matches('/'));
        let connect_err = |reason: String| SyncError::Connect { url: url.clone(), reason };
        let mut request = url.as_str().into_client_request().map_err(|e| connect_err(e.to_string()))?;
        request.headers_mut().insert(
            tungstenite::http::header::AUTHORIZATION,
            authorization.parse().map_err(|_| connect_err("bad authorization header".into()))?,
        );
        let host = request.uri().host().ok_or_else(|| connect_err("no host in the URL".into()))?.to_string();
        let port = request.uri().port_u16().unwrap_or(80);
        if request.uri().scheme_str() != Some("ws") {
            return Err(connect_err("only ws:// URLs are supported by this build".into()));
        }
        let tcp = tokio::time::timeout(timeout, TcpStream::connect((host.as_str(), port)))
            .await
            .map_err(|_| SyncError::Timeout(timeout))?
            .map_err(|e| connect_err(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let counters = Arc::new(Counters::default());
        let stream = Counting { inner: tcp, counters: counters.clone() };
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_FRAME_BYTES + (1 << 20)))
            .max_frame_size(Some(MAX_FRAME_BYTES + (1 << 20)));
        let handshake = tokio_tungstenite::client_async_with_config(request, stream, Some(config));
        let (ws, _response) = match tokio::time::timeout(timeout, handshake).await {
            Err(_) => return Err(SyncError::Timeout(timeout)),
            Ok(Err(tungstenite::Error::Http(resp))) => {
                let server_time = resp.headers().get("x-peersync-time").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
                if let (401, Some(server_time)) = (resp.status().as_u16(), server_time) {
                    return Err(SyncError::ClockSkew { server_time });
                }
                let message = resp.body().as_ref().map(|b| String::from_utf8_lossy(b).trim().to_string()).unwrap_or_default();
                return Err(SyncError::Rejected { status: resp.status().as_u16(), message });
            }
            Ok(Err(e)) => return Err(connect_err(e.to_string())),
            Ok(Ok(pair)) => pair,
        };
        let upgrade_up = counters.up.load(Relaxed);
        let upgrade_down = counters.down.load(Relaxed);
        Ok(WsConn { ws, counters, upgrade_up, upgrade_down, frames_up: 0, frames_down: 0, timeout })
    }
}

fn dropped(e: tungstenite::Error) -> SyncError {
    tracing::debug!(error = %e, "websocket failed");
    SyncError::Dropped
}

impl FrameConn for WsConn {
    async fn send(&mut self, frame: Vec<u8>) -> Result<(), SyncError> {
        self.frames_up += 1;
        match tokio::time::timeout(self.timeout, self.ws.send(Message::Binary(frame.into()))).await {
            Err(_) => Err(SyncError::Timeout(self.timeout)),
            Ok(r) => r.map_err(dropped),
        }
    }

    async fn recv(&mut self) -> Result<Vec<u8>, SyncError> {
        loop {
            let next = tokio::time::timeout(self.timeout, self.ws.next()).await.map_err(|_| SyncError::Timeout(self.timeout))?;
            match next {
                Some(Ok(Message::Binary(b))) => {
                    self.frames_down += 1;
                    return Ok(b.to_vec());
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Ok(Message::Text(_))) => return Err(SyncError::Protocol(crate::protocol::ProtocolError::Garbled("text frame from the server".into()))),
                Some(Ok(Message::Close(_))) | None => return Err(SyncError::Dropped),
                Some(Err(e)) => return Err(dropped(e)),
            }
        }
    }

    async fn close(&mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = self.ws.close(None).await;
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }

    fn account(&self, r: &mut SyncReport) {
        r.upgrade_bytes_up = self.upgrade_up;
        r.upgrade_bytes_down = self.upgrade_down;
        r.bytes_up = self.counters.up.load(Relaxed) - self.upgrade_up;
        r.bytes_down = self.counters.down.load(Relaxed) - self.upgrade_down;
        r.frames_up = self.frames_up;
        r.frames_down = self.frames_down;
    }
}
