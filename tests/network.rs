//! Everything that leaves the process over HTTP, against real servers on loopback (and, where an address
//! outside loopback must be named, inside a network namespace the test creates, so no packet can leave):
//! media tools never fetch what a source points at, the `http` plugin obeys the address rules, redirects
//! keep secret headers at home and never carry a `Referer`, and allow-list entries can name a port.

mod support;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use echo_worker::net::{AddressPolicy, HttpClient, Lookup, NetError, Outgoing};
use echo_worker::plugin::Plugin;
use echo_worker::plugin::http::HttpStage;
use echo_worker::source::{Fetcher, SourceError, SourcePolicy};
use echo_worker::stage::builtin::transcode::TranscodeStage;
use echo_worker::stage::builtin::validate::ValidateStage;
use echo_worker::units::ByteSize;
use serde_json::json;
use support::media::{job, run_stage, tone};
use tokio_util::sync::CancellationToken;

/// One request as a server saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

/// A loopback server that records every request and answers from a script keyed by path.
struct Server {
    base: String,
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Server {
    fn hits(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

type Script = Arc<dyn Fn(&str) -> Response + Send + Sync>;

async fn serve_on(address: &str, script: Script) -> Server {
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let state = (seen.clone(), script);
    let app = axum::Router::new().fallback(record).with_state(state);
    let listener = tokio::net::TcpListener::bind((address, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Server { base: format!("http://{address}:{port}"), port, seen }
}

async fn record(
    State((seen, script)): State<(Arc<Mutex<Vec<Seen>>>, Script)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    seen.lock().unwrap().push(Seen { method, path: path.clone(), headers, body });
    script(&path)
}

fn ok(_: &str) -> Response {
    axum::Json(json!({ "ok": true })).into_response()
}

fn redirect(status: StatusCode, to: String) -> Response {
    (status, [(header::LOCATION, to)]).into_response()
}

// ---------------------------------------------------------------------------------------------------------
// Item 2: media tools only read bytes that came through the source policy.

/// An HLS playlist with a non-UTF-8 comment (so that it does not sniff as text), whose one segment is `segment`.
fn playlist(segment: &str) -> Vec<u8> {
    let mut bytes = b"#EXTM3U\n#\xff\xfe\n#EXT-X-TARGETDURATION:10\n#EXT-X-VERSION:3\n#EXTINF:3.0,\n".to_vec();
    bytes.extend_from_slice(segment.as_bytes());
    bytes.extend_from_slice(b"\n#EXT-X-ENDLIST\n");
    bytes
}

/// A server on 127.0.0.2 (still loopback, but not the allow-listed 127.0.0.1) serving a real MP3 segment.
async fn segment_server() -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let audio = Bytes::from(std::fs::read(tone(dir.path(), "seg.mp3", 3)).unwrap());
    let server = serve_on("127.0.0.2", Arc::new(move |_: &str| audio.clone().into_response())).await;
    (server, dir)
}

#[tokio::test]
async fn an_mp3_url_serving_a_playlist_does_not_make_ffprobe_fetch_its_segments() {
    let (segments, _dir) = segment_server().await;
    let list = Bytes::from(playlist(&format!("{}/seg.mp3", segments.base)));
    let source = serve_on("127.0.0.1", Arc::new(move |_: &str| list.clone().into_response())).await;
    let policy =
        SourcePolicy { allow_private: vec!["127.0.0.1".parse().unwrap()], max_redirects: 5, ..Default::default() };
    let validator = ValidateStage::new(Fetcher::new(policy).unwrap(), ByteSize(100 << 20));
    let work = tempfile::tempdir().unwrap();
    let url = format!("{}/files/song.mp3", source.base);
    let result = run_stage(&validator, job(&url, false), json!({}), BTreeMap::new(), work.path()).await;
    assert_eq!(segments.hits(), 0, "ffprobe/ffmpeg never contacted the playlist's host");
    let error = result.expect_err("a playlist is not a recording");
    assert_eq!(error.code, echo_worker::error::ErrorCode::NotMedia, "{}", error.message);
    assert!(!error.retryable);
    assert!(
        error.message.starts_with(&format!(
            "the file is not a recording: it points at other resources (such as {}/seg.mp3)",
            segments.base
        )),
        "{}",
        error.message
    );
}

/// Runs transcode and validate on a local playlist whose one segment is `segment`; both must fail.
async fn refuse_local_playlist(segment: &str) -> Vec<echo_worker::job::StageError> {
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("source-list.m3u8");
    std::fs::write(&list, playlist(segment)).unwrap();
    let work = tempfile::tempdir().unwrap();
    let inputs = BTreeMap::from([("download".to_string(), json!({ "path": list, "bytes": 1 }))]);
    let transcoded = run_stage(&TranscodeStage, job("unused", true), json!({}), inputs, work.path()).await;
    let policy = SourcePolicy { max_redirects: 5, ..Default::default() };
    let validator = ValidateStage::new(Fetcher::new(policy).unwrap(), ByteSize(100 << 20));
    let validated =
        run_stage(&validator, job(list.to_str().unwrap(), true), json!({}), BTreeMap::new(), work.path()).await;
    vec![
        transcoded.map(|o| o.value).expect_err("transcode refuses a playlist"),
        validated.map(|o| o.value).expect_err("validate refuses a playlist"),
    ]
}

#[tokio::test]
async fn a_downloaded_playlist_does_not_make_ffmpeg_read_another_recording_or_host() {
    // Someone else's recording on the same machine, named by absolute path in the playlist.
    let other = tempfile::tempdir().unwrap();
    let secret = tone(other.path(), "someone-elses.mp3", 3);
    for error in refuse_local_playlist(secret.to_str().unwrap()).await {
        assert_eq!(error.code, echo_worker::error::ErrorCode::NotMedia, "{}", error.message);
        assert!(!error.retryable);
        assert!(
            error.message.contains(&format!("points at other resources (such as {})", secret.display())),
            "{}",
            error.message
        );
    }
    let (segments, _dir) = segment_server().await;
    for error in refuse_local_playlist(&format!("{}/seg.mp3", segments.base)).await {
        assert_eq!(error.code, echo_worker::error::ErrorCode::NotMedia, "{}", error.message);
    }
    assert_eq!(segments.hits(), 0, "ffprobe/ffmpeg never contacted the playlist's host");
}

// ---------------------------------------------------------------------------------------------------------
// Item 3: the `http` plugin goes through the checked client.

/// An http plugin with a bearer token and a custom secret header.
fn leaky_plugin() -> Arc<Plugin> {
    let text = r#"
name = "leaky"
kind = "http"
env = ["ECHO_TEST_TOKEN"]

[params]
url = { type = "string", required = true }

[http]
method = "POST"
url = "{{ params.url }}"
headers = { Authorization = "Bearer {{ env.ECHO_TEST_TOKEN }}", "X-Api-Key" = "key-{{ env.ECHO_TEST_TOKEN }}" }
json = { event = "done" }
"#;
    let document = echo_worker::document::Document::new("leaky.toml", text);
    Arc::new(Plugin::load(&document).unwrap_or_else(|diagnostics| panic!("{diagnostics:?}")))
}

fn plugin_client(allow: &[&str]) -> HttpClient {
    HttpClient::new(AddressPolicy::allowing(allow.iter().copied()).unwrap(), 5).unwrap()
}

async fn post_through_plugin(client: HttpClient, url: &str) -> Result<serde_json::Value, echo_worker::job::StageError> {
    let stage = HttpStage::new(leaky_plugin(), client);
    let work = tempfile::tempdir().unwrap();
    run_stage(&stage, job("unused", false), json!({ "url": url }), BTreeMap::new(), work.path())
        .await
        .map(|output| output.value)
}

#[tokio::test]
async fn an_http_plugin_is_refused_an_internal_address_unless_allow_listed() {
    let hook = serve_on("127.0.0.1", Arc::new(ok)).await;
    let url = format!("{}/hook?token=in-the-query", hook.base);
    let error = post_through_plugin(plugin_client(&[]), &url).await.expect_err("loopback is internal");
    assert_eq!(hook.hits(), 0, "the refused request never reached the server");
    assert_eq!(error.code, echo_worker::error::ErrorCode::AddressRefused);
    assert!(!error.retryable);
    assert_eq!(
        error.message,
        "plugin `leaky`: request refused: 127.0.0.1 is an internal address (127.0.0.1) and is not allow-listed"
    );
    assert!(!error.message.contains("in-the-query"));

    let allowed = format!("127.0.0.1:{}", hook.port);
    let output = post_through_plugin(plugin_client(&[&allowed]), &url).await.unwrap();
    assert_eq!(output, json!({ "status": 200, "body": { "ok": true } }));
    assert_eq!(hook.hits(), 1);
}

#[tokio::test]
async fn an_http_plugin_redirect_to_a_non_allowed_address_is_refused() {
    let inner = serve_on("127.0.0.1", Arc::new(ok)).await;
    let target = format!("{}/internal", inner.base);
    let outer =
        serve_on("127.0.0.1", Arc::new(move |_: &str| redirect(StatusCode::TEMPORARY_REDIRECT, target.clone()))).await;
    let allowed = format!("127.0.0.1:{}", outer.port);
    let error = post_through_plugin(plugin_client(&[&allowed]), &format!("{}/hook", outer.base))
        .await
        .expect_err("the redirect leads to a port that is not allowed");
    assert_eq!(outer.hits(), 1);
    assert_eq!(inner.hits(), 0, "the redirect was not followed");
    assert_eq!(error.code, echo_worker::error::ErrorCode::AddressRefused);
    assert!(error.message.ends_with(&format!("not allow-listed on port {}", inner.port)), "{}", error.message);
}

#[tokio::test]
async fn an_http_plugin_redirect_to_another_origin_drops_secret_headers_and_sends_no_referer() {
    let other = serve_on("127.0.0.1", Arc::new(ok)).await;
    let elsewhere = format!("{}/landing", other.base);
    let home = serve_on(
        "127.0.0.1",
        Arc::new(move |path: &str| match path {
            "/same" => redirect(StatusCode::TEMPORARY_REDIRECT, "/hook".into()),
            "/away" => redirect(StatusCode::PERMANENT_REDIRECT, elsewhere.clone()),
            _ => ok(path),
        }),
    )
    .await;
    let client = plugin_client(&["127.0.0.1"]);

    post_through_plugin(client.clone(), &format!("{}/same", home.base)).await.unwrap();
    let seen = home.seen();
    assert_eq!(seen.len(), 2);
    let kept = &seen[1];
    assert_eq!((kept.method.as_str(), kept.path.as_str()), ("POST", "/hook"));
    assert_eq!(kept.headers["authorization"], "Bearer token-123", "the same origin keeps its credentials");
    assert_eq!(kept.headers["x-api-key"], "key-token-123");

    post_through_plugin(client, &format!("{}/away", home.base)).await.unwrap();
    let landed = other.seen();
    assert_eq!(landed.len(), 1);
    let landed = &landed[0];
    assert_eq!((landed.method.as_str(), landed.path.as_str()), ("POST", "/landing"), "308 keeps the method");
    assert_eq!(landed.body, Bytes::from_static(br#"{"event":"done"}"#), "and the body");
    assert_eq!(landed.headers["content-type"], "application/json");
    assert!(!landed.headers.contains_key("authorization"), "{:?}", landed.headers);
    assert!(!landed.headers.contains_key("x-api-key"), "{:?}", landed.headers);
    for request in home.seen().iter().chain(other.seen().iter()) {
        assert!(!request.headers.contains_key("referer"), "no Referer ever: {:?}", request.headers);
    }
}

// ---------------------------------------------------------------------------------------------------------
// Item 4: one resolution, checked; allow entries with ports; every IPv6 form of an internal address.

fn fetcher(allow: &[&str]) -> Fetcher {
    let allow_private = allow.iter().map(|entry| entry.parse().unwrap()).collect();
    Fetcher::new(SourcePolicy { allow_private, max_redirects: 5, ..SourcePolicy::default() }).unwrap()
}

async fn get(fetcher: &Fetcher, url: &str) -> Result<StatusCode, SourceError> {
    let url = reqwest::Url::parse(url).unwrap();
    let cancel = CancellationToken::new();
    fetcher.send(reqwest::Method::GET, url, reqwest::header::HeaderMap::new(), &cancel).await.map(|(r, _)| r.status())
}

#[tokio::test]
async fn allow_listing_a_loopback_port_does_not_open_the_others() {
    let storage = serve_on("127.0.0.1", Arc::new(ok)).await;
    let redis_like = serve_on("127.0.0.1", Arc::new(ok)).await;
    let fetcher = fetcher(&[&format!("127.0.0.1:{}", storage.port)]);
    assert_eq!(get(&fetcher, &format!("{}/object", storage.base)).await.unwrap(), StatusCode::OK);
    let refused = get(&fetcher, &format!("{}/", redis_like.base)).await.unwrap_err();
    assert_eq!(
        refused.to_string(),
        format!(
            "source `{}/` refused: 127.0.0.1 is an internal address (127.0.0.1) and is not allow-listed on port {}",
            redis_like.base, redis_like.port
        )
    );
    // By name too: the name is resolved and checked for the port it is asked on.
    let by_name = get(&fetcher, &format!("http://localhost:{}/", redis_like.port)).await.unwrap_err();
    assert!(matches!(by_name, SourceError::Refused { .. }), "{by_name}");
    assert_eq!(redis_like.hits(), 0, "the other port was never reached");
    assert_eq!(storage.hits(), 1);
}

/// A DNS that answers every name with one address, counting the questions.
#[derive(Debug)]
struct FixedLookup(IpAddr, AtomicUsize);

impl Lookup for FixedLookup {
    fn lookup(
        &self,
        _host: &str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<Vec<IpAddr>>> + Send>> {
        self.1.fetch_add(1, Ordering::SeqCst);
        let answer = vec![self.0];
        Box::pin(async move { Ok(answer) })
    }
}

#[tokio::test]
async fn a_name_is_resolved_once_and_the_connection_goes_to_the_checked_address() {
    let server = serve_on("127.0.0.1", Arc::new(ok)).await;
    let lookup = Arc::new(FixedLookup("127.0.0.1".parse().unwrap(), AtomicUsize::new(0)));
    let send = |client: &HttpClient, port: u16| {
        let request = Outgoing::new(
            reqwest::Method::GET,
            reqwest::Url::parse(&format!("http://media.example:{port}/x")).unwrap(),
            reqwest::header::HeaderMap::new(),
        );
        let client = client.clone();
        async move { client.send(request, &CancellationToken::new()).await.map(|(response, _)| response.status()) }
    };

    // The name answers with an internal address and nothing allows it: refused, and nothing connects.
    let strict = HttpClient::with_lookup(AddressPolicy::default(), 5, lookup.clone()).unwrap();
    let error = send(&strict, server.port).await.unwrap_err();
    let NetError::Refused { reason, .. } = error else { panic!("{error:?}") };
    assert_eq!(reason, "media.example is an internal address (127.0.0.1) and is not allow-listed");
    assert_eq!(server.hits(), 0);
    assert_eq!(lookup.1.load(Ordering::SeqCst), 1, "one lookup, made by the connection itself");

    // Allowed on the server's port: the request connects to the address the resolver checked (there is no
    // real DNS entry for media.example), and to no other port.
    let policy = AddressPolicy::allowing([format!("127.0.0.1:{}", server.port).as_str()]).unwrap();
    let open = HttpClient::with_lookup(policy, 5, lookup.clone()).unwrap();
    assert_eq!(send(&open, server.port).await.unwrap(), StatusCode::OK);
    assert_eq!(server.hits(), 1);
    assert_eq!(lookup.1.load(Ordering::SeqCst), 2);
    assert!(matches!(send(&open, server.port + 1).await, Err(NetError::Refused { .. })));
}

/// Set by the outer test run for the copy of the test binary that runs inside a network namespace.
const IN_NAMESPACE: &str = "ECHO_TEST_IN_NETWORK_NAMESPACE";

#[test]
fn internal_addresses_in_nat64_6to4_compatible_teredo_and_site_local_forms_are_refused() {
    const NAME: &str = "internal_addresses_in_nat64_6to4_compatible_teredo_and_site_local_forms_are_refused";
    if std::env::var_os(IN_NAMESPACE).is_none() {
        // Run this test again in a new network namespace (only a loopback device, down), so that even a
        // broken check cannot send a packet anywhere. No namespace, no test: that is a failure, not a skip.
        let output = std::process::Command::new("unshare")
            .args(["--net", "--map-root-user"])
            .arg(std::env::current_exe().unwrap())
            .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
            .env(IN_NAMESPACE, "1")
            .output()
            .expect("`unshare` (util-linux) runs");
        let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert!(output.status.success(), "in the namespace:\n{text}");
        assert!(text.contains("1 passed"), "the test ran in the namespace:\n{text}");
        return;
    }
    let devices = std::fs::read_to_string("/proc/self/net/dev").unwrap();
    let devices: Vec<&str> = devices.lines().skip(2).filter_map(|line| line.split(':').next()).map(str::trim).collect();
    assert_eq!(devices, ["lo"], "running inside an empty network namespace");

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let fetcher = fetcher(&[]);
        for (url, embedded) in [
            ("http://[64:ff9b::a9fe:a9fe]/latest/meta-data/", "NAT64 of 169.254.169.254"),
            ("http://[64:ff9b::a00:1]:8080/", "NAT64 of 10.0.0.1"),
            ("http://[2002:a00:1::1]/", "6to4 of 10.0.0.1"),
            ("http://[2002:7f00:1::]:6379/", "6to4 of 127.0.0.1"),
            ("http://[::a00:1]/", "IPv4-compatible 10.0.0.1"),
            ("http://[::ffff:0:a00:1]/", "IPv4-translated 10.0.0.1"),
            ("http://[fec0::1]/", "site-local"),
            ("http://[2001:0:a00:1::1]/", "Teredo with server 10.0.0.1"),
        ] {
            let result = get(&fetcher, url).await;
            assert!(
                matches!(&result, Err(SourceError::Refused { reason, .. }) if reason.contains("is an internal address")),
                "{url} ({embedded}) is refused before connecting: {result:?}"
            );
        }
    });
}
