//! The status bar every page shows (stream connected, slot lag in bytes and seconds, parked and
//! dead runs, proxy), the dashboard's database connection, and the slot lag sampled over the last
//! hour for the executions chart.

use std::collections::VecDeque;
use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::html::esc;
use super::Dashboard;
use crate::ops::{self, OpsError};

/// How often the slot lag is sampled, and how many samples (an hour's) are kept.
const LAG_SAMPLE_EVERY: Duration = Duration::from_secs(10);
const LAG_SAMPLES: usize = 360;
/// How long connecting to the database may take before a page says it is unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One connection to the served database, shared by every request (queries pipeline over it);
/// opened again when it was closed.
pub struct AdminDb {
    url: String,
    client: tokio::sync::Mutex<Option<Arc<Client>>>,
}

impl AdminDb {
    pub fn new(url: &str) -> AdminDb {
        AdminDb {
            url: url.to_string(),
            client: Default::default(),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub async fn get(&self) -> Result<Arc<Client>, OpsError> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let c = tokio::time::timeout(CONNECT_TIMEOUT, ops::connect(&self.url))
            .await
            .map_err(|_| OpsError::Connect(format!("no answer within {CONNECT_TIMEOUT:?}")))??;
        let c = Arc::new(c);
        *slot = Some(c.clone());
        Ok(c)
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct LagSample {
    /// Unix seconds.
    pub at: i64,
    pub bytes: i64,
    pub seconds: f64,
}

#[derive(Default)]
pub struct LagHistory(Mutex<VecDeque<LagSample>>);

impl LagHistory {
    pub fn push(&self, s: LagSample) {
        if let Ok(mut q) = self.0.lock() {
            if q.len() == LAG_SAMPLES {
                q.pop_front();
            }
            q.push_back(s);
        }
    }

    pub fn samples(&self) -> Vec<LagSample> {
        self.0
            .lock()
            .map(|q| q.iter().copied().collect())
            .unwrap_or_default()
    }
}

/// Sample the slot lag until shutdown.
pub async fn sample_lag(d: Arc<Dashboard>, shutdown: CancellationToken) {
    loop {
        if let Ok(c) = d.db.get().await {
            if let Ok(s) = ops::slot_status(&c).await {
                d.lag.push(LagSample {
                    at: chrono::Utc::now().timestamp(),
                    bytes: s.lag_bytes.unwrap_or(0),
                    seconds: s.lag_seconds.unwrap_or(0.0),
                });
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(LAG_SAMPLE_EVERY) => {}
        }
    }
}

/// What the status bar shows.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StatusBar {
    /// `connected`, `disconnected` (with the consumer's state), or `off` (no consumer).
    pub stream: String,
    pub stream_detail: Option<String>,
    #[serde(flatten)]
    pub slot: ops::SlotStatus,
    pub proxy: Option<String>,
    pub proxy_connections: Option<u64>,
    /// Why the database could not be asked, if it could not.
    pub database_error: Option<String>,
}

pub async fn status_bar(d: &Dashboard) -> StatusBar {
    let mut bar = StatusBar::default();
    match &d.state.consumer {
        None => bar.stream = "off".into(),
        Some(c) if c.connected.load(Ordering::Relaxed) => bar.stream = "connected".into(),
        Some(c) => {
            bar.stream = "disconnected".into();
            bar.stream_detail = Some(c.state().to_string());
        }
    }
    bar.proxy = d.state.proxy_addr.map(|a| a.to_string());
    bar.proxy_connections = d
        .state
        .proxy_connections
        .as_ref()
        .map(|n| n.load(Ordering::Relaxed));
    match d.db.get().await {
        Ok(c) => match ops::slot_status(&c).await {
            Ok(s) => bar.slot = s,
            Err(e) => bar.database_error = Some(e.to_string()),
        },
        Err(e) => bar.database_error = Some(e.to_string()),
    }
    bar
}

/// Bytes in a short human form (1.5 MiB).
pub fn bytes(n: i64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v.abs() >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}

impl StatusBar {
    /// The bar as HTML; app.js refreshes the values by their ids from /api/status.
    pub fn render(&self) -> String {
        let mut s = String::from("<section class=\"statusbar\" aria-label=\"Service status\"><dl>");
        let stream = match (self.stream.as_str(), &self.stream_detail) {
            ("connected", _) => "connected".to_string(),
            ("off", _) => "off (no consumer)".to_string(),
            (other, Some(d)) => format!("{other} ({d})"),
            (other, None) => other.to_string(),
        };
        let class = if self.stream == "connected" {
            "good"
        } else {
            "bad"
        };
        let _ = write!(
            s,
            "<div><dt>Stream</dt><dd id=\"st-stream\" class=\"{class}\">{}</dd></div>",
            esc(&stream)
        );
        let lag = match (self.slot.lag_bytes, self.slot.lag_seconds) {
            (Some(b), Some(secs)) => format!("{} · {secs:.1} s", bytes(b)),
            (Some(b), None) => format!("{} · – s", bytes(b)),
            _ => "–".into(),
        };
        let _ = write!(
            s,
            "<div><dt>Slot lag</dt><dd id=\"st-lag\" data-bytes=\"{}\">{}</dd></div>",
            self.slot.lag_bytes.unwrap_or(0),
            esc(&lag)
        );
        let count = |n: Option<i64>| n.map_or("–".to_string(), |n| n.to_string());
        let _ = write!(
            s,
            "<div><dt>Parked</dt><dd id=\"st-parked\">{}</dd></div><div><dt>Dead</dt><dd id=\"st-dead\">{}</dd></div>",
            count(self.slot.parked),
            count(self.slot.dead)
        );
        let proxy = match (&self.proxy, self.proxy_connections) {
            (None, _) => "off".to_string(),
            (Some(a), Some(1)) => format!("{a} · 1 connection"),
            (Some(a), Some(n)) => format!("{a} · {n} connections"),
            (Some(a), None) => format!("{a} · connections not exposed"),
        };
        let _ = write!(
            s,
            "<div><dt>Proxy</dt><dd id=\"st-proxy\">{}</dd></div>",
            esc(&proxy)
        );
        if let Some(e) = &self.database_error {
            let _ = write!(
                s,
                "<div><dt>Database</dt><dd id=\"st-db\" class=\"bad\">{}</dd></div>",
                esc(e)
            );
        }
        s.push_str("</dl></section>");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_well() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(5 * 1024 * 1024), "5.0 MiB");
    }

    #[test]
    fn the_bar_escapes_what_it_shows() {
        let bar = StatusBar {
            stream: "disconnected".into(),
            stream_detail: Some("<b>reconnecting</b>".into()),
            database_error: Some("x<y".into()),
            ..Default::default()
        };
        let html = bar.render();
        assert!(
            html.contains("disconnected (&lt;b&gt;reconnecting&lt;/b&gt;)"),
            "{html}"
        );
        assert!(html.contains("x&lt;y") && !html.contains("<b>"), "{html}");
    }

    #[test]
    fn lag_history_keeps_an_hour() {
        let h = LagHistory::default();
        for i in 0..(LAG_SAMPLES as i64 + 5) {
            h.push(LagSample {
                at: i,
                bytes: i,
                seconds: 0.0,
            });
        }
        let s = h.samples();
        assert_eq!(s.len(), LAG_SAMPLES);
        assert_eq!(s[0].at, 5);
    }
}
