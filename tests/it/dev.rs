//! `pgfire dev`: a private PostgreSQL, the demo, Ctrl-C, and reuse of the data directory.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::eventually;

fn start_dev(
    dir: &std::path::Path,
    pg_port: u16,
    proxy: u16,
    admin: u16,
) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgfire"))
        .args(["dev", "--pg-port", &pg_port.to_string()])
        .args([
            "--listen",
            &format!("127.0.0.1:{proxy}"),
            "--admin-listen",
            &format!("127.0.0.1:{admin}"),
        ])
        .arg("--data-dir")
        .arg(dir)
        .env("PGFIRE_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pgfire dev");
    let (tx, rx) = std::sync::mpsc::channel();
    for stream in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    (child, rx)
}

fn wait_line(rx: &std::sync::mpsc::Receiver<String>, needle: &str, seen: &mut Vec<String>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            let hit = line.contains(needle);
            seen.push(line);
            if hit {
                return;
            }
        }
    }
    panic!(
        "pgfire dev never printed {needle:?}; output:\n{}",
        seen.join("\n")
    );
}

fn interrupt(child: &mut std::process::Child) -> std::process::ExitStatus {
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    for _ in 0..300 {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill().ok();
    panic!("pgfire dev did not stop on Ctrl-C");
}

#[tokio::test]
async fn dev_runs_the_demo_stops_on_ctrl_c_and_reuses_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("dev");
    let port = || pgfire::embedded::free_port().unwrap();
    let (pg, proxy, admin) = (port(), port(), port());
    let (mut child, rx) = start_dev(&data, pg, proxy, admin);
    let mut seen = Vec::new();
    wait_line(&rx, "pgfire dev is running", &mut seen);
    let url = format!("postgres://postgres@127.0.0.1:{pg}/app");
    let c = pgfire::db::connect(&url).await.unwrap();
    // The row goes in through pgfire's proxy, as an application would write it.
    let app = pgfire::db::connect(&format!("postgres://postgres@127.0.0.1:{proxy}/app"))
        .await
        .unwrap();
    app.batch_execute("INSERT INTO users (email, name) VALUES ('ada@example.com', 'Ada')")
        .await
        .unwrap();
    wait_line(&rx, "POST_USER_CREATE", &mut seen);
    eventually(Duration::from_secs(20), "the execution row", || async {
        let n: i64 = c.query_one("SELECT count(*) FROM pgfire.executions WHERE function_name = 'log_users' AND status = 'ok'", &[]).await.unwrap().get(0);
        (n == 1).then_some(())
    })
    .await;
    let health = reqwest::get(format!("http://127.0.0.1:{admin}/healthz"))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    // The application's session through the proxy is counted, on /metrics and the status bar.
    let metrics = reqwest::get(format!("http://127.0.0.1:{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.lines().any(|l| l == "pgfire_proxy_connections 1"),
        "{metrics}"
    );
    let page = reqwest::get(format!("http://127.0.0.1:{admin}/"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("1 connection"), "the status bar counts it");
    drop(app);
    drop(c);
    let status = interrupt(&mut child);
    assert!(status.success(), "exit status {status:?}");
    assert!(
        !data.join("postmaster.pid").exists(),
        "PostgreSQL stopped with pgfire dev"
    );

    // Again: same data, the demo row is still there, nothing installed twice.
    let (mut child, rx) = start_dev(&data, pg, proxy, admin);
    let mut seen = Vec::new();
    wait_line(&rx, "pgfire dev is running", &mut seen);
    assert!(
        seen.iter().any(|l| l.contains("starting PostgreSQL")),
        "{seen:?}"
    );
    let c = pgfire::db::connect(&url).await.unwrap();
    let n: i64 = c
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    drop(c);
    assert!(interrupt(&mut child).success());
}
