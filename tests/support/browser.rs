//! Headless Chromium driven over WebDriver (W3C protocol, spoken with the crate's own reqwest: a session is a
//! handful of JSON calls, which does not justify a WebDriver crate and its HTTP stack). `chromedriver` (Debian's
//! `chromium-driver`) is started on a free loopback port for each [`Browser`] with a fresh profile directory,
//! and stopped, with its browser, when the `Browser` is dropped. Every wait is bounded.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

/// The W3C name of an element reference in replies.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// The Chromium binary: `ECHO_TEST_CHROMIUM`, else Debian's (the real binary, not its wrapper script).
fn chromium() -> String {
    std::env::var("ECHO_TEST_CHROMIUM").unwrap_or_else(|_| {
        ["/usr/lib/chromium/chromium", "/usr/bin/chromium"]
            .into_iter()
            .find(|path| Path::new(path).exists())
            .unwrap_or("chromium")
            .to_string()
    })
}

/// A headless browser session.
pub struct Browser {
    driver: Child,
    base: String,
    client: reqwest::Client,
    _profile: tempfile::TempDir,
    /// Where screenshots go (`target/dashboard-screenshots/`).
    pub shots: PathBuf,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium; panics with what to install when they are missing.
    pub async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/dashboard-screenshots");
        std::fs::create_dir_all(&shots).unwrap();
        let driver = Command::new(std::env::var("ECHO_TEST_CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into()))
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", shots.join(format!("chromedriver-{port}.log")).display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start chromedriver (apt-get install chromium chromium-driver): {e}"));
        let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let profile = tempfile::tempdir().unwrap();
        let mut browser = Self { driver, base, client, _profile: profile, shots };
        let ready = Instant::now();
        loop {
            let status = browser.client.get(format!("{}/status", browser.base)).send().await;
            if let Ok(reply) = status
                && reply.json::<Value>().await.is_ok_and(|body| body["value"]["ready"] == true)
            {
                break;
            }
            assert!(ready.elapsed() < Duration::from_secs(20), "chromedriver did not answer within 20 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1280,1000",
            &format!("--user-data-dir={}", browser._profile.path().display()),
        ];
        let capabilities = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "pageLoadStrategy": "normal",
            "timeouts": { "pageLoad": 30_000, "script": 30_000, "implicit": 0 },
            "goog:chromeOptions": { "binary": chromium(), "args": args },
        } } });
        let reply = browser.client.post(format!("{}/session", browser.base)).json(&capabilities).send().await.unwrap();
        let body: Value = reply.json().await.unwrap();
        let id = body["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no browser session: {body}"));
        browser.base = format!("{}/session/{id}", browser.base);
        browser
    }

    async fn command(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let reply: Value = request.send().await.unwrap().json().await.unwrap();
        if reply["value"]["error"].is_string() {
            panic!("WebDriver {path}: {}", reply["value"]);
        }
        reply["value"].clone()
    }

    /// Opens `url` and waits for it to load.
    pub async fn goto(&self, url: &str) {
        self.command(reqwest::Method::POST, "/url", Some(json!({ "url": url }))).await;
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page and returns its value.
    pub async fn run(&self, script: &str, args: Value) -> Value {
        self.command(reqwest::Method::POST, "/execute/sync", Some(json!({ "script": script, "args": args }))).await
    }

    /// Waits (at most `limit`) until `script` returns a truthy value, and returns it; on timeout, saves a
    /// screenshot named `name` and panics saying what was awaited.
    pub async fn until(&self, name: &str, limit: Duration, script: &str, args: Value) -> Value {
        let start = Instant::now();
        loop {
            let value = self.run(script, args.clone()).await;
            let truthy = match &value {
                Value::Null | Value::Bool(false) => false,
                Value::String(s) => !s.is_empty(),
                Value::Number(n) => n.as_f64() != Some(0.0),
                _ => true,
            };
            if truthy {
                return value;
            }
            if start.elapsed() > limit {
                let shot = self.screenshot(&format!("timeout-{name}")).await;
                let text = self.run("return document.body.innerText", json!([])).await;
                panic!("waited {limit:?} for {name} (screenshot {}):\n{}", shot.display(), text.as_str().unwrap_or(""));
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }

    /// The element matching `css` (the first); panics when there is none.
    pub async fn find(&self, css: &str) -> String {
        let found = self
            .command(reqwest::Method::POST, "/element", Some(json!({ "using": "css selector", "value": css })))
            .await;
        found[ELEMENT].as_str().unwrap_or_else(|| panic!("no element {css}: {found}")).to_string()
    }

    /// Clicks the element matching `css` as a user would (it must be shown and not covered).
    pub async fn click(&self, css: &str) {
        let element = self.find(css).await;
        self.command(reqwest::Method::POST, &format!("/element/{element}/click"), Some(json!({}))).await;
    }

    /// Types `text` into the element matching `css`.
    pub async fn type_into(&self, css: &str, text: &str) {
        let element = self.find(css).await;
        self.command(reqwest::Method::POST, &format!("/element/{element}/value"), Some(json!({ "text": text }))).await;
    }

    /// Saves a PNG of the window as `target/dashboard-screenshots/{name}.png` and returns its path.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let data = self.command(reqwest::Method::GET, "/screenshot", None).await;
        let bytes = base64::engine::general_purpose::STANDARD.decode(data.as_str().unwrap_or("")).unwrap();
        let path = self.shots.join(format!("{name}.png"));
        std::fs::write(&path, bytes).unwrap();
        path
    }

    /// Sets the window size (a narrow window for the narrow-layout check).
    pub async fn resize(&self, width: u32, height: u32) {
        self.command(reqwest::Method::POST, "/window/rect", Some(json!({ "width": width, "height": height }))).await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ends the session (and its Chromium) in a thread of its own, since drop cannot await; then stops the driver.
        let url = self.base.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
            if let Ok(runtime) = runtime {
                runtime.block_on(async {
                    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build();
                    if let Ok(client) = client {
                        let _ = client.delete(url).send().await;
                    }
                });
            }
        })
        .join();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
