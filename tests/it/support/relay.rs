//! A TCP relay between pgfire and PostgreSQL that can stop forwarding without closing anything:
//! a network that silently drops everything, as after a cable pull or a NAT that forgot the flow.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Relay {
    pub addr: SocketAddr,
    held: watch::Sender<bool>,
}

impl Relay {
    /// Relay every connection to `target`.
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (held, _) = watch::channel(false);
        let gate = held.subscribe();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pipe(cr, sw, gate.clone()));
                tokio::spawn(pipe(sr, cw, gate.clone()));
            }
        });
        Relay { addr, held }
    }

    /// Stop forwarding in both directions, closing nothing.
    pub fn blackhole(&self) {
        self.held.send_replace(true);
    }

    /// Forward again, what was held first.
    pub fn resume(&self) {
        self.held.send_replace(false);
    }
}

async fn pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut held: watch::Receiver<bool>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if held.wait_for(|h| !*h).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        // What was read as the hole opened is held too, not forwarded.
        if held.wait_for(|h| !*h).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
