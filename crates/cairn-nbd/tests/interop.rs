//! Interop with real NBD clients that no one here wrote: qemu-img, qemu-io, nbdinfo,
//! nbdcopy. A test skips when a client is missing, except in CI (`CI=true`).

#![allow(clippy::cast_possible_truncation)]

use cairn_format::testdata::noise;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use cairn_nbd::export::{BlockExport, FileExport};
use cairn_nbd::handshake::ExportInfo;
use cairn_nbd::server::{Exports, serve_tcp, serve_unix};

struct Files(HashMap<String, (PathBuf, bool)>);

impl Exports for Files {
    fn list(&self) -> Vec<ExportInfo> {
        let mut v: Vec<ExportInfo> = self
            .0
            .keys()
            .filter_map(|n| self.open(n).map(|e| e.info()))
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
    fn open(&self, name: &str) -> Option<Arc<dyn BlockExport>> {
        let (path, ro) = self.0.get(name)?;
        Some(Arc::new(FileExport::open(path, name, *ro).ok()?))
    }
}

struct Server {
    port: u16,
    socket: PathBuf,
    _rt: tokio::runtime::Runtime,
}

fn start(dir: &Path, exports: Vec<(&str, PathBuf, bool)>) -> Server {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let files: Arc<dyn Exports> = Arc::new(Files(
        exports
            .into_iter()
            .map(|(n, p, ro)| (n.to_string(), (p, ro)))
            .collect(),
    ));
    let socket = dir.join("nbd.sock");
    let (port, sock) = rt.block_on(async {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = tcp.local_addr().unwrap().port();
        let unix = tokio::net::UnixListener::bind(&socket).unwrap();
        tokio::spawn(serve_tcp(tcp, files.clone()));
        tokio::spawn(serve_unix(unix, files));
        (port, socket.clone())
    });
    Server {
        port,
        socket: sock,
        _rt: rt,
    }
}

fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{tool} is required in CI (.ci/run installs it)"
        );
        eprintln!("skipped: {tool} not installed");
    }
    found
}

fn sh(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn real_clients_read_write_list_map_copy() {
    if !(have("qemu-io") && have("qemu-img") && have("nbdinfo") && have("nbdcopy")) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("root.img");
    // 8 MiB sparse file with data in the first MiB only.
    let f = std::fs::File::create(&disk).unwrap();
    f.set_len(8 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &noise(1, 1 << 20), 0).unwrap();
    drop(f);
    let ro = dir.path().join("ro.img");
    std::fs::write(&ro, vec![0x5a; 1 << 20]).unwrap();
    let srv = start(
        dir.path(),
        vec![
            ("web/root", disk.clone(), false),
            ("web/ro", ro.clone(), true),
        ],
    );
    let url = format!("nbd://127.0.0.1:{}/web/root", srv.port);

    // nbdinfo: size, flags, listing, allocation map.
    let (ok, out) = sh(Command::new("nbdinfo").arg("--json").arg(&url));
    assert!(ok, "{out}");
    assert!(out.contains("\"export-size\": 8388608"), "{out}");
    assert!(out.contains("\"can_multi_conn\": true"), "{out}");
    let (ok, out) = sh(Command::new("nbdinfo")
        .arg("--list")
        .arg(format!("nbd://127.0.0.1:{}", srv.port)));
    assert!(
        ok && out.contains("web/root") && out.contains("web/ro"),
        "{out}"
    );
    let (ok, out) = sh(Command::new("nbdinfo").arg("--map").arg(&url));
    assert!(ok, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].split_whitespace().take(3).collect::<Vec<_>>() == ["0", "1048576", "0"],
        "{out}"
    );
    assert!(lines.last().unwrap().contains("hole,zero"), "{out}");

    // qemu-io: write a pattern, read it back (through the server).
    let (ok, out) = sh(Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0xab 2M 1M",
            "-c",
            "read -P 0xab 2M 1M",
        ])
        .arg(&url));
    assert!(ok && !out.contains("Pattern verification failed"), "{out}");
    let on_disk = std::fs::read(&disk).unwrap();
    assert!(on_disk[2 << 20..3 << 20].iter().all(|&b| b == 0xab));
    // Write zeroes and trim through qemu-io.
    let (ok, out) = sh(Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -z 2M 64k",
            "-c",
            "discard 3M 1M",
            "-c",
            "read -P 0 2M 64k",
        ])
        .arg(&url));
    assert!(ok && !out.contains("failed"), "{out}");

    // qemu-img: info, convert out, compare.
    let (ok, out) = sh(Command::new("qemu-img").arg("info").arg(&url));
    assert!(ok && out.contains("8 MiB"), "{out}");
    let copy = dir.path().join("copy.raw");
    let (ok, out) = sh(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&url)
        .arg(&copy));
    assert!(ok, "{out}");
    assert_eq!(std::fs::read(&copy).unwrap(), std::fs::read(&disk).unwrap());
    let (ok, out) = sh(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&url)
        .arg(&copy));
    assert!(ok && out.contains("identical"), "{out}");

    // Unix socket.
    let unix_url = format!("nbd+unix:///web/root?socket={}", srv.socket.display());
    let copy2 = dir.path().join("copy2.raw");
    let (ok, out) = sh(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&unix_url)
        .arg(&copy2));
    assert!(ok, "{out}");
    assert_eq!(
        std::fs::read(&copy2).unwrap(),
        std::fs::read(&disk).unwrap()
    );

    // nbdcopy in, over 4 connections with many requests in flight, then back out.
    let src = dir.path().join("src.img");
    std::fs::write(&src, noise(7, 8 << 20)).unwrap();
    let (ok, out) = sh(Command::new("nbdcopy")
        .args(["--connections=4", "--requests=16"])
        .arg(&src)
        .arg(&url));
    assert!(ok, "{out}");
    assert_eq!(std::fs::read(&disk).unwrap(), std::fs::read(&src).unwrap());
    let back = dir.path().join("back.img");
    let (ok, out) = sh(Command::new("nbdcopy").arg(&url).arg(&back));
    assert!(ok, "{out}");
    assert_eq!(std::fs::read(&back).unwrap(), std::fs::read(&src).unwrap());

    // Read-only export: reads work, writes fail with EPERM, nothing changes.
    let ro_url = format!("nbd://127.0.0.1:{}/web/ro", srv.port);
    let (ok, out) = sh(Command::new("qemu-io")
        .args(["-r", "-f", "raw", "-c", "read -P 0x5a 0 64k"])
        .arg(&ro_url));
    assert!(ok && !out.contains("failed"), "{out}");
    let (_, out) = sh(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 1 0 64k"])
        .arg(&ro_url));
    assert!(
        out.contains("ermission") || out.contains("read-only") || out.contains("Read-only"),
        "{out}"
    );
    assert_eq!(std::fs::read(&ro).unwrap(), vec![0x5a; 1 << 20]);

    // An unknown export is refused with a clear error.
    let (ok, out) = sh(Command::new("nbdinfo").arg(format!("nbd://127.0.0.1:{}/nope", srv.port)));
    assert!(!ok && out.contains("nope"), "{out}");
}

#[test]
fn hostile_input_closes_only_that_connection() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.img");
    std::fs::write(&disk, noise(3, 1 << 20)).unwrap();
    let srv = start(dir.path(), vec![("d", disk.clone(), false)]);
    let addr = format!("127.0.0.1:{}", srv.port);
    // Garbage instead of client flags; an oversized option; a bad request magic after a
    // valid handshake: each closes its own connection.
    let attempts: Vec<Vec<u8>> = vec![
        vec![0xff; 64],
        {
            let mut v = 1u32.to_be_bytes().to_vec();
            v.extend_from_slice(&0x4948_4156_454F_5054u64.to_be_bytes());
            v.extend_from_slice(&7u32.to_be_bytes());
            v.extend_from_slice(&(1u32 << 30).to_be_bytes());
            v
        },
        {
            let mut v = 3u32.to_be_bytes().to_vec();
            v.extend_from_slice(&0x4948_4156_454F_5054u64.to_be_bytes());
            v.extend_from_slice(&1u32.to_be_bytes());
            v.extend_from_slice(&1u32.to_be_bytes());
            v.extend_from_slice(b"d");
            v.extend_from_slice(&[0xee; 28]);
            v
        },
    ];
    for (i, bytes) in attempts.into_iter().enumerate() {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let _ = s.write_all(&bytes);
        let mut sink = Vec::new();
        // The server closes: read returns (EOF or reset), never hangs.
        let r = s.read_to_end(&mut sink);
        assert!(
            r.is_ok()
                || r.as_ref()
                    .is_err_and(|e| e.kind() != std::io::ErrorKind::WouldBlock),
            "attempt {i}: {r:?}"
        );
    }
    // The server still serves everyone else.
    if have("qemu-io") {
        let url = format!("nbd://{addr}/d");
        let (ok, out) = sh(Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                "write -P 0x11 0 4k",
                "-c",
                "read -P 0x11 0 4k",
            ])
            .arg(&url));
        assert!(ok && !out.contains("failed"), "{out}");
    }
}
