//! The websocket transport (tokio-tungstenite), counting every byte at the socket.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use super::engine::FrameConn;
use super::transport::{Counters, Stream};
use super::{SyncError, SyncOptions, SyncReport};
use crate::protocol::MAX_FRAME_BYTES;

pub struct WsConn {
    ws: WebSocketStream<Stream>,
    counters: Arc<Counters>,
    upgrade_up: u64,
    upgrade_down: u64,
    frames_up: u64,
    frames_down: u64,
    timeout: Duration,
}

impl WsConn {
    /// Open `{server}/v1/sync`, proving the device's identity with `authorization`.
    pub(crate) async fn connect(opts: &SyncOptions, authorization: &str) -> Result<WsConn, SyncError> {
        let timeout = opts.frame_timeout;
        let url = format!("{}/v1/sync", opts.server.trim_end_matches('/'));
        let connect_err = |reason: String| SyncError::Connect { url: url.clone(), reason };
        let mut request = url.as_str().into_client_request().map_err(|e| connect_err(e.to_string()))?;
        request.headers_mut().insert(
            tungstenite::http::header::AUTHORIZATION,
            authorization.parse().map_err(|_| connect_err("bad authorization header".into()))?,
        );
        let (stream, counters) = super::transport::connect(&url, opts, timeout).await?;
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
            // Something that is not HTTP answered: typically ws:// to a server that speaks TLS.
            Ok(Err(e @ (tungstenite::Error::HttpFormat(_) | tungstenite::Error::Protocol(tungstenite::error::ProtocolError::HttparseError(_))))) => {
                return Err(SyncError::BadUrl { url, reason: format!("the server did not answer as a peersync server ({e}); a server with TLS needs wss://") });
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
        // Send our close frame and go: everything the sync did is durable by now, and waiting
        // for the server's answering close would cost the user one more round trip (600 ms on
        // 2G) for nothing. Dropping the stream then closes the TCP connection.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.ws.close(None)).await;
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
