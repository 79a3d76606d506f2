//! A real `nats-server -js` per test, from the installed binary, on a free port with its own
//! store directory; stopped (killed) when dropped.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct NatsServer {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Option<Child>,
}

const BIN: &str = "/usr/sbin/nats-server";

impl NatsServer {
    /// Start one and wait until it accepts JetStream requests.
    pub async fn start() -> NatsServer {
        let port = pgfire::embedded::free_port().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut s = NatsServer {
            port,
            dir,
            child: None,
        };
        s.restart().await;
        s
    }

    fn bin() -> String {
        if std::path::Path::new(BIN).exists() {
            BIN.to_string()
        } else {
            "nats-server".to_string()
        }
    }

    /// Start it again (same port, same store) after [`NatsServer::kill`].
    pub async fn restart(&mut self) {
        let child = Command::new(Self::bin())
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server (apt-get install nats-server)");
        self.child = Some(child);
        let url = self.url();
        super::eventually(Duration::from_secs(20), "nats-server to start", || {
            let url = url.clone();
            async move {
                // (nats-server 2.9's account info does not parse in async-nats 0.42: ask for a
                // stream that does not exist, which JetStream answers)
                let c = async_nats::connect(url).await.ok()?;
                let js = async_nats::jetstream::new(c);
                match js.get_stream("PGFIRE_PROBE").await {
                    Err(e) if e.to_string().contains("not found") => Some(()),
                    Ok(_) => Some(()),
                    Err(_) => None,
                }
            }
        })
        .await;
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Every message of stream `name`: (subject, Nats-Msg-Id, payload as JSON).
    pub async fn messages(&self, name: &str) -> Vec<(String, String, serde_json::Value)> {
        let c = async_nats::connect(self.url()).await.unwrap();
        let js = async_nats::jetstream::new(c);
        let Ok(mut stream) = js.get_stream(name).await else {
            return Vec::new();
        };
        let info = stream.info().await.unwrap().clone();
        let mut out = Vec::new();
        for seq in info.state.first_sequence..=info.state.last_sequence {
            if info.state.messages == 0 {
                break;
            }
            let m = stream.get_raw_message(seq).await.unwrap();
            let id = m
                .headers
                .get(async_nats::header::NATS_MESSAGE_ID)
                .map(|v| v.to_string())
                .unwrap_or_default();
            out.push((
                m.subject.to_string(),
                id,
                serde_json::from_slice(&m.payload).unwrap(),
            ));
        }
        out
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
