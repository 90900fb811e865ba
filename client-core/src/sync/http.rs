//! A minimal HTTP/1.1 client for the few JSON calls made outside the sync socket: a device's
//! enrollment, and the admin and report calls of `peersync replay`. One request per
//! connection; every response is bounded by the caller's limit.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use super::{SyncError, SyncOptions};

/// Largest response a device accepts (enrollment answers are a few hundred bytes).
const DEVICE_MAX_RESPONSE: usize = 64 << 10;

/// POST `body` as JSON to `path`; returns the status and the JSON reply.
pub(crate) async fn post_json(opts: &SyncOptions, path: &str, body: &serde_json::Value, timeout: Duration) -> Result<(u16, serde_json::Value), SyncError> {
    request(opts, "POST", path, None, Some(body), timeout, DEVICE_MAX_RESPONSE).await
}

/// A JSON request to the server's HTTP API (`bearer`: an admin token), over the same
/// connection rules as sync (TLS verified, plain HTTP only on loopback). Returns the status
/// and the JSON reply (`Null` for an empty body). A response over `max_response` bytes is
/// refused with `ProtocolError::TooLarge`.
pub async fn request(
    opts: &SyncOptions,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&serde_json::Value>,
    timeout: Duration,
    max_response: usize,
) -> Result<(u16, serde_json::Value), SyncError> {
    let (status, reply) = request_bytes(opts, method, path, bearer, body, timeout, max_response).await?;
    let json = if reply.is_empty() { serde_json::Value::Null } else { serde_json::from_slice(&reply).map_err(|_| garbled("body is not JSON"))? };
    Ok((status, json))
}

/// As [`request`], for a reply that is not JSON (`/metrics`' text): returns its body as sent.
pub async fn request_bytes(
    opts: &SyncOptions,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&serde_json::Value>,
    timeout: Duration,
    max_response: usize,
) -> Result<(u16, Vec<u8>), SyncError> {
    let url = format!("{}{path}", opts.server.trim_end_matches('/'));
    let e = super::transport::endpoint(&url)?;
    let (host, port) = (e.host, e.port);
    let work = async {
        let (mut s, _) = super::transport::connect(&url, opts, timeout).await?;
        let payload = body.map(|b| serde_json::to_vec(b).expect("JSON value serializes")).unwrap_or_default();
        let auth = bearer.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            payload.len()
        );
        s.write_all(head.as_bytes()).await.map_err(|_| SyncError::Dropped)?;
        s.write_all(&payload).await.map_err(|_| SyncError::Dropped)?;
        let mut buf = Vec::new();
        (&mut s).take(max_response as u64 + 1).read_to_end(&mut buf).await.map_err(|_| SyncError::Dropped)?;
        if buf.len() > max_response {
            return Err(SyncError::Protocol(crate::protocol::ProtocolError::TooLarge { size: buf.len(), limit: max_response }));
        }
        parse_response(&buf)
    };
    tokio::time::timeout(timeout, work).await.map_err(|_| SyncError::Timeout(timeout))?
}

fn garbled(r: &str) -> SyncError {
    SyncError::Protocol(crate::protocol::ProtocolError::Garbled(format!("HTTP response: {r}")))
}

/// A whole response: its status and its body, de-chunked.
fn parse_response(buf: &[u8]) -> Result<(u16, Vec<u8>), SyncError> {
    // No whole header: the connection closed before the answer (a server that went down
    // after acting, perhaps) — a network fault, to try again, not an incompatible server.
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n").ok_or(SyncError::Dropped)?;
    let head = std::str::from_utf8(&buf[..split]).map_err(|_| garbled("header not UTF-8"))?;
    let status: u16 = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| garbled("no status"))?;
    let mut body = &buf[split + 4..];
    let chunked = head.lines().any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding:") && l.to_ascii_lowercase().contains("chunked"));
    let mut joined = Vec::new();
    if chunked {
        loop {
            let end = body.windows(2).position(|w| w == b"\r\n").ok_or_else(|| garbled("bad chunk"))?;
            let size = usize::from_str_radix(std::str::from_utf8(&body[..end]).map_err(|_| garbled("bad chunk"))?.trim(), 16).map_err(|_| garbled("bad chunk size"))?;
            body = &body[end + 2..];
            if size == 0 || body.len() < size {
                break;
            }
            joined.extend_from_slice(&body[..size]);
            body = &body[(size + 2).min(body.len())..];
        }
        body = &joined;
    }
    Ok((status, body.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_responses() {
        let (s, b) = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n{\"a\":1}\n ").unwrap();
        assert_eq!((s, b.as_slice()), (200, &b"{\"a\":1}\n "[..]));
        let (s, b) = parse_response(b"HTTP/1.1 401 Unauthorized\r\ntransfer-encoding: chunked\r\n\r\n7\r\n{\"a\":2}\r\n5\r\n text\r\n0\r\n\r\n").unwrap();
        assert_eq!((s, b.as_slice()), (401, &b"{\"a\":2} text"[..]));
        assert!(parse_response(b"garbage").is_err());
    }

    /// A large answer (an organisation's document list, a report) is read whole under a
    /// large enough limit, and refused, not cut, over it.
    #[tokio::test]
    async fn responses_are_bounded_by_the_callers_limit() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let body = format!("[{}0]", "1234567,".repeat(20_000));
        let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let answer = answer.clone();
                tokio::spawn(async move {
                    let mut head = [0u8; 4096];
                    let _ = s.read(&mut head).await;
                    let _ = s.write_all(answer.as_bytes()).await;
                });
            }
        });
        let opts = SyncOptions::new(format!("ws://{addr}"));
        let t = Duration::from_secs(10);
        let (status, json) = request(&opts, "GET", "/big", None, None, t, 1 << 20).await.unwrap();
        assert_eq!((status, json.as_array().map(|a| a.len())), (200, Some(20_001)));
        let refused = request(&opts, "GET", "/big", None, None, t, DEVICE_MAX_RESPONSE).await;
        assert!(matches!(refused, Err(SyncError::Protocol(crate::protocol::ProtocolError::TooLarge { .. }))), "{refused:?}");
    }
}
