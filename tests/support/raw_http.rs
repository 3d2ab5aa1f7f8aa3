//! A bare HTTP/1.1 server on loopback that answers every request with one scripted status and body, written
//! by hand so a test controls the bytes exactly: a body far larger than any client should read (streamed in
//! 64 KiB chunks, chunked or with a declared `Content-Length`), or an error text that echoes a secret. It
//! counts the body bytes it managed to write, which shows whether the client stopped reading.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the server sends back.
#[derive(Debug, Clone)]
pub enum Body {
    /// This text, with its length declared.
    Text(String),
    /// `total` bytes of `x`, streamed; with `declare` the `Content-Length` says `total`, else it is chunked.
    Huge { total: u64, declare: bool },
}

/// The server's address and the body bytes written so far, over every connection.
pub struct Server {
    pub base: String,
    pub written: Arc<AtomicU64>,
}

/// Starts the server; it answers at most 8 connections, one request each, then stops.
pub async fn serve(status: u16, content_type: &'static str, body: Body) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let written = Arc::new(AtomicU64::new(0));
    let counter = written.clone();
    tokio::spawn(async move {
        for _ in 0..8 {
            let Ok((socket, _)) = listener.accept().await else { return };
            let (body, counter) = (body.clone(), counter.clone());
            tokio::spawn(async move { answer(socket, status, content_type, &body, &counter).await });
        }
    });
    Server { base, written }
}

/// Reads the request head and its declared body (bounded), then writes the answer until done or refused.
async fn answer(mut socket: TcpStream, status: u16, content_type: &str, body: &Body, written: &AtomicU64) {
    let mut request = Vec::new();
    let mut buffer = [0u8; 8192];
    for _ in 0..1000 {
        let Ok(read) = socket.read(&mut buffer).await else { return };
        if read == 0 {
            return;
        }
        request.extend_from_slice(&buffer[..read]);
        let text = String::from_utf8_lossy(&request);
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|line| {
                    line.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string())
                })
                .and_then(|value| value.parse().ok())
                .unwrap_or(0);
            if request.len() >= end + 4 + length {
                break;
            }
        }
    }
    let head = |length: Option<u64>| {
        let framing = match length {
            Some(length) => format!("content-length: {length}"),
            None => "transfer-encoding: chunked".to_string(),
        };
        format!("HTTP/1.1 {status} Scripted\r\ncontent-type: {content_type}\r\n{framing}\r\nconnection: close\r\n\r\n")
    };
    match body {
        Body::Text(text) => {
            let _ = socket.write_all(head(Some(text.len() as u64)).as_bytes()).await;
            let _ = socket.write_all(text.as_bytes()).await;
            written.fetch_add(text.len() as u64, Ordering::SeqCst);
        }
        Body::Huge { total, declare } => {
            if socket.write_all(head(declare.then_some(*total)).as_bytes()).await.is_err() {
                return;
            }
            let chunk = vec![b'x'; 64 << 10];
            let mut sent = 0;
            while sent < *total {
                let result = if *declare {
                    socket.write_all(&chunk).await
                } else {
                    let mut framed = format!("{:x}\r\n", chunk.len()).into_bytes();
                    framed.extend_from_slice(&chunk);
                    framed.extend_from_slice(b"\r\n");
                    socket.write_all(&framed).await
                };
                if result.is_err() {
                    return;
                }
                sent += chunk.len() as u64;
                written.fetch_add(chunk.len() as u64, Ordering::SeqCst);
            }
            if !*declare {
                let _ = socket.write_all(b"0\r\n\r\n").await;
            }
        }
    }
    let _ = socket.shutdown().await;
}
