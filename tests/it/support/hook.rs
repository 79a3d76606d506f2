//! A scriptable webhook receiver for the delivery tests: a real HTTP/1.1 server (axum) whose
//! answer to each request a test chooses (status, `Retry-After`, a delay), recording every
//! request with when it arrived and how many were in progress at once.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;

/// How to answer one request.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub retry_after: Option<String>,
    pub delay: Duration,
    pub body: String,
}

impl Answer {
    pub fn status(status: u16) -> Answer {
        Answer {
            status,
            retry_after: None,
            delay: Duration::ZERO,
            body: String::new(),
        }
    }
}

/// One request received.
#[derive(Debug, Clone)]
pub struct Got {
    pub body: serde_json::Value,
    pub webhook_id: String,
    pub at: Instant,
}

type Script = dyn Fn(&serde_json::Value, usize) -> Answer + Send + Sync;

#[derive(Clone)]
struct Shared {
    got: Arc<Mutex<Vec<Got>>>,
    script: Arc<Mutex<Arc<Script>>>,
    now: Arc<AtomicUsize>,
    max: Arc<AtomicUsize>,
}

pub struct Hook {
    pub addr: SocketAddr,
    shared: Shared,
}

impl Hook {
    /// A receiver answering every request (`event`, number of the request) as `script` says.
    pub async fn start(
        script: impl Fn(&serde_json::Value, usize) -> Answer + Send + Sync + 'static,
    ) -> Hook {
        let shared = Shared {
            got: Arc::default(),
            script: Arc::new(Mutex::new(Arc::new(script))),
            now: Arc::default(),
            max: Arc::default(),
        };
        let app = Router::new()
            .route("/{*path}", post(handle))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Hook { addr, shared }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// Answer from now on as `script` says.
    pub fn script(
        &self,
        script: impl Fn(&serde_json::Value, usize) -> Answer + Send + Sync + 'static,
    ) {
        *self.shared.script.lock().unwrap() = Arc::new(script);
    }

    pub fn got(&self) -> Vec<Got> {
        self.shared.got.lock().unwrap().clone()
    }

    /// Requests in progress at once, at most.
    pub fn max_concurrent(&self) -> usize {
        self.shared.max.load(Ordering::SeqCst)
    }
}

async fn handle(State(s): State<Shared>, headers: HeaderMap, body: Bytes) -> impl IntoResponse {
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let n = s.now.fetch_add(1, Ordering::SeqCst) + 1;
    s.max.fetch_max(n, Ordering::SeqCst);
    let index = {
        let mut g = s.got.lock().unwrap();
        g.push(Got {
            body: body.clone(),
            webhook_id: headers
                .get("webhook-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string(),
            at: Instant::now(),
        });
        g.len() - 1
    };
    let script = s.script.lock().unwrap().clone();
    let answer = script(&body, index);
    if !answer.delay.is_zero() {
        tokio::time::sleep(answer.delay).await;
    }
    s.now.fetch_sub(1, Ordering::SeqCst);
    let mut h = HeaderMap::new();
    if let Some(r) = &answer.retry_after {
        h.insert("retry-after", r.parse().unwrap());
    }
    (StatusCode::from_u16(answer.status).unwrap(), h, answer.body)
}
