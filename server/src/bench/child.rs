//! The server under test as a child process (this same executable running `peersync serve`),
//! so that its memory is its own and can be read from `/proc`.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::BenchError;

/// A running `peersync serve`. Killed when dropped, whatever path the bench leaves by; and it
/// stops by itself if the bench dies without dropping it (its stdin closes).
pub struct ServerChild {
    child: Child,
    pub addr: SocketAddr,
    pub admin_token: String,
}

impl ServerChild {
    pub async fn start(data: &Path) -> Result<ServerChild, BenchError> {
        let exe = std::env::current_exe().map_err(|e| BenchError::Server(format!("cannot find this executable: {e}")))?;
        let admin_token = uuid::Uuid::new_v4().to_string();
        let mut child = Command::new(exe)
            .args(["serve", "--listen", "127.0.0.1:0", "--stop-on-stdin-eof", "--data"])
            .arg(data)
            .env("PEERSYNC_ADMIN_TOKEN", &admin_token)
            .env("PEERSYNC_LOG", std::env::var("PEERSYNC_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| BenchError::Server(format!("cannot start the server: {e}")))?;
        let stdout = child.stdout.take();
        // From here on `server` owns the child: any early return kills it.
        let mut server = ServerChild { child, addr: SocketAddr::from(([127, 0, 0, 1], 0)), admin_token };
        let stdout = stdout.ok_or_else(|| BenchError::Server("no server output".into()))?;
        let read = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            std::io::BufReader::new(stdout).read_line(&mut line).map(|_| line)
        });
        let line = match tokio::time::timeout(Duration::from_secs(30), read).await {
            Ok(Ok(Ok(line))) => line,
            Ok(Ok(Err(e))) => {
                return Err(BenchError::Server(format!("cannot read the server's output: {e}")));
            }
            Ok(Err(e)) => return Err(BenchError::Server(e.to_string())),
            Err(_) => {
                return Err(BenchError::Server("the server did not start within 30 s".into()));
            }
        };
        // "peersync listening on http://127.0.0.1:PORT (data in …)"
        server.addr = line
            .split("http://")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| BenchError::Server(format!("unexpected server output: {line:?}")))?;
        Ok(server)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
