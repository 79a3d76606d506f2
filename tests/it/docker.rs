//! The container recipe, checked as far as this machine can without a Docker engine: the
//! compose file is valid YAML naming real images and a Dockerfile that exists, the image is
//! multi-stage and runs as a non-root user, its build command works on the committed lock file,
//! and the demo's SQL applies (twice) to a database pgfire is installed in.

use std::path::Path;

use crate::support::{install_pgfire, texts, TestDb};

fn repo(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[tokio::test]
async fn the_compose_file_and_the_dockerfile_hold_together() {
    let compose: serde_norway::Value =
        serde_norway::from_str(&repo("docker/docker-compose.yml")).expect("valid YAML");
    let services = compose["services"].as_mapping().expect("services");
    // Official images, by tag, or the image built from the Dockerfile.
    let real = ["postgres:16-bookworm", "python:3.12-slim-bookworm"];
    for (name, s) in services {
        let name = name.as_str().unwrap();
        let image = s["image"].as_str().unwrap_or_default();
        if let Some(build) = s.get("build") {
            assert_eq!(image, "pgfire:local", "{name}");
            assert_eq!(
                build["dockerfile"].as_str(),
                Some("docker/Dockerfile"),
                "{name}"
            );
            assert_eq!(build["context"].as_str(), Some(".."), "{name}");
        } else if image != "pgfire:local" {
            assert!(real.contains(&image), "{name} names {image:?}");
        }
    }
    // The admin endpoint listens beyond loopback in the container: it needs a token.
    let env = &services["pgfire"]["environment"];
    let listen: std::net::SocketAddr = env["PGFIRE_ADMIN_LISTEN"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let token = env["PGFIRE_ADMIN_TOKEN"]
        .as_str()
        .expect("PGFIRE_ADMIN_TOKEN");
    let token = token
        .strip_prefix("${PGFIRE_ADMIN_TOKEN:-")
        .and_then(|t| t.strip_suffix('}'))
        .unwrap_or(token);
    pgfire::admin::guard::check_exposure(listen, Some(token)).expect("a usable token");
    let postgres = serde_norway::to_string(&services["postgres"]["command"]).unwrap();
    assert!(postgres.contains("wal_level=logical"), "{postgres}");
    for needed in ["postgres", "install", "demo", "pgfire", "receiver"] {
        assert!(services.contains_key(needed), "service {needed}");
    }

    let dockerfile = repo("docker/Dockerfile");
    let stages: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert_eq!(
        stages.len(),
        2,
        "a build stage and a runtime stage: {stages:?}"
    );
    assert!(
        stages[1].contains("slim"),
        "a small runtime image: {}",
        stages[1]
    );
    let user = dockerfile
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER line");
    assert!(
        user.trim() != "root" && user.trim() != "0",
        "runs as {user}"
    );
    assert!(dockerfile.contains("cargo build --release --locked --bin pgfire"));
    // `--locked` fails when Cargo.lock does not match Cargo.toml: check it here. `cargo tree`
    // resolves for the host only, so it needs no download of other platforms' crates (a fresh
    // machine's registry cache holds just what the build fetched).
    let status = std::process::Command::new(env!("CARGO"))
        .args(["tree", "--locked", "--offline"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(
        status.success(),
        "Cargo.lock is not in step with Cargo.toml"
    );
    let ignore = repo(".dockerignore");
    assert!(
        ignore.lines().any(|l| l == "target/"),
        "the build context leaves target/ out"
    );

    // The demo configuration, as the compose file runs it.
    let demo = services["demo"]["command"][0].as_str().expect("demo SQL");
    let db = TestDb::new();
    install_pgfire(&db).await;
    db.psql(demo);
    db.psql(demo);
    let subs = texts(
        &db.client().await,
        "SELECT event_type || ' ' || function_name FROM pgfire.subscriptions",
    )
    .await;
    assert_eq!(subs, ["POST_USER_CREATE demo_receiver"]);
}
