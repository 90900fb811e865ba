//! A small W3C WebDriver client for driving Debian's headless Chromium through chromedriver:
//! just the commands the dashboard test needs, over the loopback HTTP helper.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
}

impl Browser {
    /// Start chromedriver and a headless Chromium at 1280x800 that downloads into `downloads`.
    pub async fn start(profile: &Path, downloads: &Path) -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver runs (scripts/test installs Debian's chromium-driver)");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1280,800", "--disable-background-networking", "--disable-component-update",
                         "--disable-sync", "--no-first-run", "--disable-quic", format!("--user-data-dir={}", profile.display())],
                "prefs": { "download.default_directory": downloads.display().to_string(), "download.prompt_for_download": false }
            }
        }}});
        let (status, v) = crate::http(addr, "POST", "/session", &[], Some(caps)).await;
        assert_eq!(status, 200, "new session: {v}");
        let session = v["value"]["sessionId"].as_str().expect("session id").to_string();
        let b = Browser { driver, addr, session };
        b.cmd("POST", "/window/rect", Some(json!({ "width": 1280, "height": 800 }))).await;
        // The window's size includes the browser's own bars; the page's is what screenshots
        // show, and what the README promises: 1280x800.
        let viewport = json!({ "cmd": "Emulation.setDeviceMetricsOverride",
                               "params": { "width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": false } });
        b.cmd("POST", "/goog/cdp/execute", Some(viewport)).await;
        b
    }

    async fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let body = if method == "POST" { body.or(Some(json!({}))) } else { None };
        let (status, v) = crate::http(self.addr, method, &format!("/session/{}{path}", self.session), &[], body).await;
        assert_eq!(status, 200, "{method} {path}: {v}");
        v["value"].clone()
    }

    pub async fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({ "url": url }))).await;
    }

    /// The element matching `css`, waiting up to 10 s for it to appear.
    pub async fn find(&self, css: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (status, v) = crate::http(self.addr, "POST", &format!("/session/{}/element", self.session), &[], Some(json!({ "using": "css selector", "value": css }))).await;
            if status == 200 {
                return v["value"][ELEMENT].as_str().unwrap().to_string();
            }
            assert!(Instant::now() < deadline, "no element {css}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        self.cmd("POST", &format!("/element/{e}/value"), Some(json!({ "text": text }))).await;
    }

    pub async fn click(&self, css: &str) {
        let e = self.find(css).await;
        self.cmd("POST", &format!("/element/{e}/click"), None).await;
    }

    pub async fn text(&self, css: &str) -> String {
        let e = self.find(css).await;
        self.cmd("GET", &format!("/element/{e}/text"), None).await.as_str().unwrap_or_default().to_string()
    }

    pub async fn script(&self, script: &str) -> Value {
        self.cmd("POST", "/execute/sync", Some(json!({ "script": script, "args": [] }))).await
    }

    /// Wait until `script` (a JS expression) is truthy.
    pub async fn wait_for(&self, what: &str, script: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let v = self.script(&format!("return !!({script});")).await;
            if v == json!(true) {
                return;
            }
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A PNG of the viewport, 1280x800.
    pub async fn screenshot(&self, to: &Path) {
        use base64::Engine as _;
        let b64 = self.cmd("GET", "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD.decode(b64.as_str().unwrap()).unwrap();
        // The PNG header's width and height, big-endian, after the signature and IHDR's tag.
        let size = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().unwrap());
        assert_eq!((size(16), size(20)), (1280, 800), "screenshot size for {}", to.display());
        std::fs::write(to, png).unwrap();
    }

    pub async fn quit(mut self) {
        let _ = crate::http(self.addr, "DELETE", &format!("/session/{}", self.session), &[], None).await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
    }
}
