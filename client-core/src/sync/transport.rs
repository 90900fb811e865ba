//! Opening a byte stream to the server: TCP, with TLS for `wss://`/`https://` (rustls on ring,
//! certificates verified against the Mozilla roots plus any CA the app adds), counting every
//! byte at the socket. Plain `ws://` is refused unless the server is on loopback or the app
//! explicitly allows it.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::{SyncError, SyncOptions};

#[derive(Default)]
pub(crate) struct Counters {
    pub up: AtomicU64,
    pub down: AtomicU64,
}

/// A TCP stream that counts the bytes crossing it.
pub(crate) struct Counting {
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

/// The connection to the server, plain or TLS.
pub(crate) enum Stream {
    Plain(Counting),
    Tls(Box<tokio_rustls::client::TlsStream<Counting>>),
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Where a server URL points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Endpoint {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

pub(crate) fn endpoint(url: &str) -> Result<Endpoint, SyncError> {
    let err = |r: &str| SyncError::BadUrl { url: url.to_string(), reason: r.to_string() };
    let (tls, rest) = if let Some(r) = url.strip_prefix("wss://").or_else(|| url.strip_prefix("https://")) {
        (true, r)
    } else if let Some(r) = url.strip_prefix("ws://").or_else(|| url.strip_prefix("http://")) {
        (false, r)
    } else {
        return Err(err("the server URL must start with wss:// (or ws:// on loopback)"));
    };
    let hostport = rest.split('/').next().unwrap_or_default();
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, p) = v6.split_once(']').ok_or_else(|| err("bad IPv6 address"))?;
        (h.to_string(), p.strip_prefix(':').map(|p| p.parse()).transpose().map_err(|_| err("bad port"))?)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p.parse().map_err(|_| err("bad port"))?)),
            None => (hostport.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err(err("no host in the URL"));
    }
    Ok(Endpoint { port: port.unwrap_or(if tls { 443 } else { 80 }), host, tls })
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Refuse plain connections off loopback unless the app explicitly allows them: the records
/// must never cross a network unencrypted by accident.
pub(crate) fn check_plain_allowed(url: &str, opts: &SyncOptions) -> Result<Endpoint, SyncError> {
    let e = endpoint(url)?;
    if !e.tls && !is_loopback(&e.host) && !opts.allow_insecure {
        return Err(SyncError::BadUrl {
            url: url.to_string(),
            reason: "plain ws:// is allowed only on loopback; use wss:// (or allow insecure connections explicitly)".into(),
        });
    }
    Ok(e)
}

fn tls_config(opts: &SyncOptions) -> Result<rustls::ClientConfig, SyncError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(pem) = &opts.ca_pem {
        use rustls_pki_types::pem::PemObject;
        for cert in rustls_pki_types::CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| SyncError::Untrusted { url: opts.server.clone(), reason: format!("bad CA certificate: {e}") })?;
            roots.add(cert).map_err(|e| SyncError::Untrusted { url: opts.server.clone(), reason: format!("bad CA certificate: {e}") })?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| SyncError::Connect { url: opts.server.clone(), reason: e.to_string() })?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Connect to `url`'s host, with TLS where the URL asks for it.
pub(crate) async fn connect(url: &str, opts: &SyncOptions, timeout: Duration) -> Result<(Stream, Arc<Counters>), SyncError> {
    let e = check_plain_allowed(url, opts)?;
    let connect_err = |reason: String| SyncError::Connect { url: url.to_string(), reason };
    let tcp = tokio::time::timeout(timeout, TcpStream::connect((e.host.as_str(), e.port)))
        .await
        .map_err(|_| SyncError::Timeout(timeout))?
        .map_err(|err| connect_err(err.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let counters = Arc::new(Counters::default());
    let counting = Counting { inner: tcp, counters: counters.clone() };
    if !e.tls {
        return Ok((Stream::Plain(counting), counters));
    }
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_config(opts)?));
    let name = rustls_pki_types::ServerName::try_from(e.host.clone()).map_err(|err| connect_err(err.to_string()))?;
    let tls = tokio::time::timeout(timeout, connector.connect(name, counting))
        .await
        .map_err(|_| SyncError::Timeout(timeout))?
        .map_err(|err| {
            // A certificate that does not verify fails the same way on every try; anything else
            // in the handshake may be the network.
            let certificate = err.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()).is_some_and(|e| matches!(e, rustls::Error::InvalidCertificate(_)));
            if certificate { SyncError::Untrusted { url: url.to_string(), reason: format!("TLS: {err}") } } else { connect_err(format!("TLS: {err}")) }
        })?;
    Ok((Stream::Tls(Box::new(tls)), counters))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_the_loopback_rule() {
        assert_eq!(endpoint("wss://sync.example.org").unwrap(), Endpoint { host: "sync.example.org".into(), port: 443, tls: true });
        assert_eq!(endpoint("ws://127.0.0.1:8080/x").unwrap(), Endpoint { host: "127.0.0.1".into(), port: 8080, tls: false });
        assert_eq!(endpoint("ws://[::1]:9").unwrap(), Endpoint { host: "::1".into(), port: 9, tls: false });
        assert!(endpoint("ftp://x").is_err());
        let opts = SyncOptions::new("ws://sync.example.org");
        assert!(check_plain_allowed("ws://sync.example.org", &opts).is_err());
        assert!(check_plain_allowed("ws://localhost:8080", &opts).is_ok());
        assert!(check_plain_allowed("ws://[::1]:8080", &opts).is_ok());
        assert!(check_plain_allowed("wss://sync.example.org", &opts).is_ok());
        let mut opts = opts;
        opts.allow_insecure = true;
        assert!(check_plain_allowed("ws://sync.example.org", &opts).is_ok());
    }
}
