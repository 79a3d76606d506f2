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
