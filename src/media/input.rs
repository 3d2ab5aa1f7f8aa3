//! How ffmpeg and ffprobe reach their input. They are never handed a source URL or the path of a file that
//! came from outside: given those, they resolve names themselves and follow what the bytes point at (HLS and
//! DASH playlists, concat lists) to any host or local file. Instead a [`Relay`] on loopback serves exactly
//! one resource, read through the checked fetcher or from the file, and the tools may only speak `http`
//! through that relay (`-protocol_whitelist http,tcp`, `-http_proxy`), so any other resource they ask for
//! reaches the relay and is refused. Files this process wrote itself are read directly
//! (`-protocol_whitelist file`).

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use super::{MediaError, printable};

/// What ffmpeg or ffprobe is told to read, with the options that confine it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaInput {
    options: Vec<OsString>,
    url: OsString,
    shown: String,
}

impl MediaInput {
    /// A file this process wrote itself (transcode's own output): read directly, and nothing else.
    pub fn own_file(path: &Path) -> Self {
        let mut url = OsString::from("file:");
        url.push(path.as_os_str());
        Self {
            options: ["-protocol_whitelist", "file"].map(OsString::from).to_vec(),
            url,
            shown: path.display().to_string(),
        }
    }

    /// The input options and `-i INPUT`, to put where ffmpeg expects the input.
    pub fn args(&self) -> Vec<OsString> {
        let mut args = self.options.clone();
        args.extend([OsString::from("-i"), self.url.clone()]);
        args
    }

    /// The input as people know it (a path or a URL without its query), for messages.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// Replaces the tool's name for the input (the relay's address) with [`MediaInput::shown`] in `text`.
    pub fn clean(&self, text: &str) -> String {
        text.replace(&*self.url.to_string_lossy(), &self.shown)
    }

    /// The same error, with the input named as people know it in the tool's stderr.
    pub fn clean_error(&self, error: MediaError) -> MediaError {
        match error {
            MediaError::Failed { program, input, stderr } => {
                MediaError::Failed { program, input, stderr: self.clean(&stderr) }
            }
            other => other,
        }
    }
}

/// The bytes a relay serves, from `start`.
#[async_trait::async_trait]
pub trait Origin: Send + Sync {
    /// Opens the resource at byte `start`, up to `end` (inclusive) when given.
    ///
    /// # Errors
    /// A message saying why the resource cannot be read; it reaches the stage's error.
    async fn open(&self, start: u64, end: Option<u64>) -> Result<Opened, String>;
}

/// An opened resource.
pub struct Opened {
    /// Its whole size, when known (needed for reads that do not start at 0).
    pub total: Option<u64>,
    /// Its bytes from the requested start.
    pub body: Box<dyn Body>,
}

/// Bytes arriving in chunks.
#[async_trait::async_trait]
pub trait Body: Send {
    /// The next chunk; `None` at the end.
    ///
    /// # Errors
    /// A message when reading fails.
    async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, String>;
}

/// A local file as a relay origin.
#[derive(Debug, Clone)]
pub struct FileOrigin(pub PathBuf);

struct FileBody(tokio::fs::File);

#[async_trait::async_trait]
impl Body for FileBody {
    async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, String> {
        let mut buffer = vec![0; 64 << 10];
        let read = self.0.read(&mut buffer).await.map_err(|error| error.to_string())?;
        buffer.truncate(read);
        Ok((read > 0).then_some(buffer))
    }
}

#[async_trait::async_trait]
impl Origin for FileOrigin {
    async fn open(&self, start: u64, _end: Option<u64>) -> Result<Opened, String> {
        let unreadable = |error: std::io::Error| format!("cannot read {}: {error}", self.0.display());
        let mut file = tokio::fs::File::open(&self.0).await.map_err(unreadable)?;
        let total = file.metadata().await.map_err(unreadable)?.len();
        file.seek(std::io::SeekFrom::Start(start.min(total))).await.map_err(unreadable)?;
        Ok(Opened { total: Some(total), body: Box::new(FileBody(file)) })
    }
}

/// What a relay saw.
struct Log {
    served: AtomicU64,
    refused: Mutex<Vec<String>>,
    failure: Mutex<Option<String>>,
}

/// Longest request head the relay reads; ffmpeg sends a few hundred bytes.
const MAX_HEAD: usize = 16 << 10;
/// Time a tool has to send its request once connected.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; ffmpeg opens one at a time, a playlist a few.
const MAX_CONNECTIONS: usize = 8;
/// Seconds ffmpeg waits on a stalled read before failing (`-rw_timeout`, in microseconds).
const RW_TIMEOUT_MICROS: &str = "30000000";

/// A loopback HTTP server for one resource, alive until dropped (its connections end with it). The resource
/// sits at a random path, so other local users cannot guess it; every other request is refused and logged.
pub struct Relay {
    address: SocketAddr,
    token: String,
    shown: String,
    log: Arc<Log>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").field("address", &self.address).field("shown", &self.shown).finish_non_exhaustive()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Relay {
    /// Starts serving `origin`, known to people as `shown`. With a `budget`, at most that many bytes are
    /// served in all; a tool that wants more gets a broken connection and [`Relay::failure`] says why.
    ///
    /// # Errors
    /// When no loopback port can be bound.
    pub async fn start(origin: Arc<dyn Origin>, shown: &str, budget: Option<u64>) -> std::io::Result<Self> {
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        let address = listener.local_addr()?;
        let token = uuid::Uuid::new_v4().simple().to_string();
        let log = Arc::new(Log { served: AtomicU64::new(0), refused: Mutex::default(), failure: Mutex::default() });
        let server = Server { origin, path: format!("/{token}"), address, budget, log: log.clone() };
        let task = tokio::spawn(server.run(listener));
        Ok(Self { address, token, shown: printable(shown), log, task })
    }

    /// The input for ffmpeg and ffprobe: the relay's URL, with the relay as the only proxy and `http` as the
    /// only protocol, so whatever the bytes point at is asked of the relay.
    pub fn input(&self) -> MediaInput {
        let origin = format!("http://{}", self.address);
        let options = ["-protocol_whitelist", "http,tcp", "-http_proxy", &origin, "-rw_timeout", RW_TIMEOUT_MICROS];
        MediaInput {
            options: options.map(OsString::from).to_vec(),
            url: format!("{origin}/{}", self.token).into(),
            shown: self.shown.clone(),
        }
    }

    /// Resources other than the input that a tool asked for (and did not get), as requested.
    pub fn refused(&self) -> Vec<String> {
        self.log.refused.lock().map(|refused| refused.clone()).unwrap_or_default()
    }

    /// Why reading the origin failed or stopped, if it did.
    pub fn failure(&self) -> Option<String> {
        self.log.failure.lock().ok().and_then(|failure| failure.clone())
    }

    /// Bytes served so far.
    pub fn served(&self) -> u64 {
        self.log.served.load(Ordering::SeqCst)
    }
}

struct Server {
    origin: Arc<dyn Origin>,
    path: String,
    address: SocketAddr,
    budget: Option<u64>,
    log: Arc<Log>,
}

impl Server {
    async fn run(self, listener: TcpListener) {
        let server = Arc::new(self);
        // Dropping the set (when the relay's task is aborted) aborts every connection.
        let mut connections = JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            while connections.try_join_next().is_some() {}
            if connections.len() >= MAX_CONNECTIONS {
                continue;
            }
            let server = server.clone();
            connections.spawn(async move { server.serve(stream).await });
        }
    }

    fn note_failure(&self, message: String) {
        if let Ok(mut failure) = self.log.failure.lock() {
            failure.get_or_insert(message);
        }
    }

    async fn serve(&self, mut stream: TcpStream) {
        let Ok(Some(head)) = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream)).await else {
            return;
        };
        let request = Request::parse(&head);
        let own = [self.path.clone(), format!("http://{}{}", self.address, self.path)];
        if !own.contains(&request.target) {
            // A path relative to the input comes as `http://RELAY/path`: name it by its path.
            let target = request.target.strip_prefix(&format!("http://{}", self.address)).unwrap_or(&request.target);
            if let Ok(mut refused) = self.log.refused.lock() {
                refused.push(printable(target).chars().take(300).collect());
            }
            let _ = stream.write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
            return;
        }
        if request.method != "GET" && request.method != "HEAD" {
            let _ = stream
                .write_all(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .await;
            return;
        }
        let (start, end) = request.range.unwrap_or((0, None));
        let opened = match self.origin.open(start, end).await {
            Ok(opened) => opened,
            Err(message) => {
                self.note_failure(message);
                let _ = stream
                    .write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
                return;
            }
        };
        let (head, mut left) = match (request.range, opened.total) {
            (Some(_), Some(total)) if start >= total && total > 0 => {
                let head = format!(
                    "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{total}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                (head, Some(0))
            }
            (Some(_), Some(total)) if total > 0 => {
                let last = end.map_or(total - 1, |end| end.min(total - 1));
                let length = last + 1 - start;
                let head = format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {start}-{last}/{total}\r\nContent-Length: {length}\r\nAccept-Ranges: bytes\r\nConnection: close\r\n\r\n"
                );
                (head, Some(length))
            }
            (_, Some(total)) => {
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {total}\r\nAccept-Ranges: bytes\r\nConnection: close\r\n\r\n"
                );
                (head, Some(total))
            }
            (_, None) if start == 0 => ("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_string(), None),
            (_, None) => {
                self.note_failure("the source did not tell its size, so it cannot be read from the middle".into());
                let head = "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
                (head.to_string(), Some(0))
            }
        };
        if stream.write_all(head.as_bytes()).await.is_err() || request.method == "HEAD" {
            return;
        }
        let mut body = opened.body;
        while left != Some(0) {
            let chunk = match body.next_chunk().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                Err(message) => {
                    self.note_failure(message);
                    break;
                }
            };
            let take = left.map_or(chunk.len(), |left| chunk.len().min(usize::try_from(left).unwrap_or(usize::MAX)));
            let served = self.log.served.fetch_add(take as u64, Ordering::SeqCst) + take as u64;
            if let Some(budget) = self.budget.filter(|budget| served > *budget) {
                self.note_failure(format!("reading it took more than {budget} bytes"));
                break;
            }
            if stream.write_all(&chunk[..take]).await.is_err() {
                // The tool has what it wanted (or seeks elsewhere) and closed the connection.
                break;
            }
            left = left.map(|left| left - take as u64);
        }
        let _ = stream.shutdown().await;
    }
}

/// Reads up to the blank line ending a request head; `None` when the peer closes first or sends too much.
async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::with_capacity(1024);
    let mut buffer = [0; 1024];
    while !head.windows(4).any(|window| window == b"\r\n\r\n") {
        let read = stream.read(&mut buffer).await.ok()?;
        if read == 0 || head.len() + read > MAX_HEAD {
            return None;
        }
        head.extend_from_slice(&buffer[..read]);
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// The parts of a request the relay looks at.
struct Request {
    method: String,
    target: String,
    range: Option<(u64, Option<u64>)>,
}

impl Request {
    fn parse(head: &str) -> Self {
        let mut lines = head.split("\r\n");
        let mut first = lines.next().unwrap_or_default().split(' ');
        let method = first.next().unwrap_or_default().to_string();
        let target = first.next().unwrap_or_default().to_string();
        let range = lines
            .filter_map(|line| line.split_once(':'))
            .find(|(name, _)| name.trim().eq_ignore_ascii_case("range"))
            .and_then(|(_, value)| {
                let (start, end) = value.trim().strip_prefix("bytes=")?.split_once('-')?;
                let start = start.trim().parse().ok()?;
                let end = match end.trim() {
                    "" => None,
                    end => Some(end.parse().ok().filter(|end| *end >= start)?),
                };
                Some((start, end))
            });
        Self { method, target, range }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_read_for_method_target_and_range() {
        let request = Request::parse("GET http://127.0.0.1:9/abc HTTP/1.1\r\nHost: x\r\nrange: bytes=10-\r\n\r\n");
        assert_eq!((request.method.as_str(), request.target.as_str()), ("GET", "http://127.0.0.1:9/abc"));
        assert_eq!(request.range, Some((10, None)));
        assert_eq!(Request::parse("GET /a HTTP/1.1\r\nRange: bytes=5-9\r\n\r\n").range, Some((5, Some(9))));
        assert_eq!(Request::parse("GET /a HTTP/1.1\r\nRange: bytes=9-5\r\n\r\n").range, None);
        assert_eq!(Request::parse("GET /a HTTP/1.1\r\nRange: items=1-\r\n\r\n").range, None);
    }

    #[test]
    fn own_files_are_read_with_the_file_protocol_only() {
        let input = MediaInput::own_file(Path::new("/w/full.mp3"));
        assert_eq!(input.args(), ["-protocol_whitelist", "file", "-i", "file:/w/full.mp3"]);
        assert_eq!(input.clean("file:/w/full.mp3: Invalid data"), "/w/full.mp3: Invalid data");
    }
}
