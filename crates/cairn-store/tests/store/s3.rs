//! A real S3-compatible server on loopback for the suite: `moto_server` (PyPI
//! `moto[server]`; `.ci/run` installs it), started once per test process on a free port,
//! one bucket, one prefix per space. It dies with the test process (a watchdog shell).
//! Without `moto_server` the S3 tests skip, except in CI (`CI=true`), where they fail.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use cairn_format::config::SpaceConfig;
use cairn_store::Space;
use cairn_store::backend::{Backend, ObjectStoreBackend};

static SERVER: OnceLock<Option<String>> = OnceLock::new();

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

fn http(addr: &str, req: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(req.as_bytes())?;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    Ok(out)
}

// The watchdog shell outlives this function on purpose (it ends with the process).
#[allow(clippy::zombie_processes)]
fn start() -> Option<String> {
    let found = std::process::Command::new("sh")
        .args(["-c", "command -v moto_server"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            !in_ci(),
            "moto_server is not installed (CI must run the S3 tests: .ci/run installs moto[server])"
        );
        eprintln!("skipping S3 tests: moto_server not installed");
        return None;
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let me = std::process::id();
    // The watchdog kills the server once this test process is gone.
    std::process::Command::new("sh")
        .args([
            "-c",
            &format!(
                "moto_server -H 127.0.0.1 -p {port} >/dev/null 2>&1 & m=$!; while kill -0 {me} 2>/dev/null; do sleep 1; done; kill $m"
            ),
        ])
        .spawn()
        .expect("start moto_server");
    let addr = format!("127.0.0.1:{port}");
    let t0 = Instant::now();
    loop {
        let r = http(
            &addr,
            &format!(
                "PUT /cairn-test HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            ),
        );
        if r.is_ok_and(|s| s.starts_with("HTTP/1.1 200") || s.starts_with("HTTP/1.0 200")) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "moto_server did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Some(format!("http://{addr}"))
}

/// The S3 URL of a fresh prefix, or None when the tests should skip.
pub fn s3_url() -> Option<String> {
    let endpoint = SERVER.get_or_init(start).clone()?;
    Some(format!(
        "s3://cairn-test/{}?endpoint={endpoint}&region=us-east-1",
        uuid::Uuid::new_v4()
    ))
}

pub fn s3_backend() -> Option<Arc<dyn Backend>> {
    let url = s3_url()?;
    // moto accepts any credentials; the tests never use real ones.
    let backend =
        ObjectStoreBackend::s3_with_credentials(&url, Some(("testing", "testing"))).expect("s3");
    Some(Arc::new(backend))
}

pub async fn s3_space(chunk: u64) -> Option<Space> {
    let backend = s3_backend()?;
    Some(
        Space::init(backend, SpaceConfig::new(chunk, 3).unwrap())
            .await
            .unwrap(),
    )
}
