//! A real HTTP server that receives webhooks: it records every request and answers with the
//! status the test chooses (per call number).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;

#[derive(Debug, Clone)]
pub struct Received {
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Received {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("webhook body is JSON")
    }
    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    }
}

#[derive(Clone, Default)]
struct Shared {
    received: Arc<Mutex<Vec<Received>>>,
    /// Status for call n (0-based); calls past the end get 200.
    statuses: Arc<Mutex<Vec<u16>>>,
}

pub struct Receiver {
    pub addr: SocketAddr,
    shared: Shared,
}

impl Receiver {
    pub async fn start() -> Receiver {
        Self::with_statuses(vec![]).await
    }

    pub async fn with_statuses(statuses: Vec<u16>) -> Receiver {
        let shared = Shared {
            statuses: Arc::new(Mutex::new(statuses)),
            ..Shared::default()
        };
        let app = Router::new()
            .route("/{*path}", post(handle))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Receiver { addr, shared }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{}", self.addr, path.trim_start_matches('/'))
    }

    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().unwrap().clone()
    }
}

async fn handle(State(s): State<Shared>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let n = {
        let mut r = s.received.lock().unwrap();
        r.push(Received { headers, body });
        r.len() - 1
    };
    let status = s.statuses.lock().unwrap().get(n).copied().unwrap_or(200);
    StatusCode::from_u16(status).unwrap()
}

/// One request as a [`RawServer`] read it off the socket.
#[derive(Debug, Clone)]
pub struct RawRequest {
    pub method: String,
    pub path: String,
    /// Header names in lowercase.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// How a [`RawServer`] answers a path.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A status with extra header lines and an empty body.
    Status(u16, Vec<(&'static str, String)>),
    /// A status announcing a 4 GB body, then bytes as fast as the client reads them, forever.
    Endless(u16),
    /// A status announcing a body of `len` bytes, then one byte every `every`.
    Trickle(u16, usize, std::time::Duration),
}

/// A real HTTP/1.1 server on a raw TCP socket, for answers a framework would not give: endless
/// or trickling bodies, redirects of every kind. One request per connection.
pub struct RawServer {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<RawRequest>>>,
}

impl RawServer {
    pub async fn start(route: fn(&str) -> Reply) -> RawServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let log = received.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let _ = serve_raw(socket, route, log).await;
                });
            }
        });
        RawServer { addr, received }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{}", self.addr, path.trim_start_matches('/'))
    }

    pub fn received(&self) -> Vec<RawRequest> {
        self.received.lock().unwrap().clone()
    }
}

async fn serve_raw(
    mut socket: tokio::net::TcpStream,
    route: fn(&str) -> Reply,
    log: Arc<Mutex<Vec<RawRequest>>>,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = socket.read(&mut chunk).await?;
        if n == 0 || buf.len() > 64 * 1024 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split(' ');
    let method = first.next().unwrap_or_default().to_string();
    let path = first.next().unwrap_or_default().to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let mut chunk = [0u8; 4096];
        let n = socket.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    log.lock().unwrap().push(RawRequest {
        method,
        path: path.clone(),
        headers,
        body,
    });
    let status_line = |code: u16| format!("HTTP/1.1 {code} {}\r\n", reason(code));
    match route(&path) {
        Reply::Status(code, extra) => {
            let mut r = status_line(code);
            for (n, v) in extra {
                r.push_str(&format!("{n}: {v}\r\n"));
            }
            r.push_str("content-length: 0\r\nconnection: close\r\n\r\n");
            socket.write_all(r.as_bytes()).await?;
        }
        Reply::Endless(code) => {
            let r = format!(
                "{}content-type: text/plain\r\ncontent-length: 4294967296\r\n\r\n",
                status_line(code)
            );
            socket.write_all(r.as_bytes()).await?;
            let block = vec![b'x'; 64 * 1024];
            loop {
                socket.write_all(&block).await?;
            }
        }
        Reply::Trickle(code, len, every) => {
            let r = format!("{}content-length: {len}\r\n\r\n", status_line(code));
            socket.write_all(r.as_bytes()).await?;
            for _ in 0..len {
                tokio::time::sleep(every).await;
                socket.write_all(b"x").await?;
            }
        }
    }
    socket.shutdown().await
}

fn reason(code: u16) -> &'static str {
    StatusCode::from_u16(code)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Whatever")
}
