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
    // 1 MiB writes over the Unix socket (spliced from the socket into the file).
    std::fs::write(&src, noise(8, 8 << 20)).unwrap();
    let (ok, out) = sh(Command::new("nbdcopy")
        .args(["--request-size=1048576", "--connections=2"])
        .arg(&src)
        .arg(&unix_url));
    assert!(ok, "{out}");
    assert_eq!(std::fs::read(&disk).unwrap(), std::fs::read(&src).unwrap());

    // Read-only export: reads work, writes fail with EPERM, nothing changes.
    let ro_url = format!("nbd://127.0.0.1:{}/web/ro", srv.port);
    let (ok, out) = sh(Command::new("qemu-io")
        .args(["-r", "-f", "raw", "-c", "read -P 0x5a 0 64k"])
        .arg(&ro_url));
    assert!(ok && !out.contains("failed"), "{out}");
    for len in ["64k", "1M"] {
        let (_, out) = sh(Command::new("qemu-io")
            .args(["-f", "raw", "-c", &format!("write -P 1 0 {len}")])
            .arg(&ro_url));
        assert!(
            out.contains("ermission") || out.contains("read-only") || out.contains("Read-only"),
            "{out}"
        );
    }
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

/// An export whose reads at offset 0 wait for a gate, and whose `closed` the test flips.
struct Closable {
    file: FileExport,
    gate: Arc<tokio::sync::Semaphore>,
    closed: tokio::sync::watch::Receiver<bool>,
}

#[async_trait::async_trait]
impl BlockExport for Closable {
    fn info(&self) -> ExportInfo {
        self.file.info()
    }
    async fn read(&self, offset: u64, len: u32) -> std::io::Result<Vec<u8>> {
        if offset == 0 {
            let _ = self.gate.acquire().await;
        }
        self.file.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> std::io::Result<()> {
        self.file.write(offset, data, fua).await
    }
    async fn flush(&self) -> std::io::Result<()> {
        self.file.flush().await
    }
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> std::io::Result<()> {
        self.file.trim(offset, len, fua).await
    }
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        may_punch: bool,
        fua: bool,
    ) -> std::io::Result<()> {
        self.file.write_zeroes(offset, len, may_punch, fua).await
    }
    async fn block_status(&self, offset: u64, len: u32) -> std::io::Result<Vec<(u32, u32)>> {
        self.file.block_status(offset, len).await
    }
    fn closed(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        Some(self.closed.clone())
    }
}

struct OneExport(Arc<dyn BlockExport>);

impl Exports for OneExport {
    fn list(&self) -> Vec<ExportInfo> {
        vec![self.0.info()]
    }
    fn open(&self, name: &str) -> Option<Arc<dyn BlockExport>> {
        (name == self.0.info().name).then(|| self.0.clone())
    }
}

/// Connects with `NBD_OPT_EXPORT_NAME` (simple replies, no zeroes); returns the socket
/// in transmission and the export size.
fn raw_client(addr: &str, name: &str) -> (std::net::TcpStream, u64) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    let mut hello = 3u32.to_be_bytes().to_vec(); // fixed newstyle, no zeroes
    hello.extend_from_slice(&0x4948_4156_454F_5054u64.to_be_bytes());
    hello.extend_from_slice(&1u32.to_be_bytes());
    hello.extend_from_slice(&(name.len() as u32).to_be_bytes());
    hello.extend_from_slice(name.as_bytes());
    s.write_all(&hello).unwrap();
    let mut export = [0u8; 10];
    s.read_exact(&mut export).unwrap();
    (s, u64::from_be_bytes(export[..8].try_into().unwrap()))
}

fn send_read(s: &mut std::net::TcpStream, handle: u64, offset: u64, len: u32) {
    let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
    r.extend_from_slice(&0u16.to_be_bytes());
    r.extend_from_slice(&0u16.to_be_bytes()); // NBD_CMD_READ
    r.extend_from_slice(&handle.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    s.write_all(&r).unwrap();
}

/// Reads one simple reply: (handle, error, data); data only without an error.
fn read_reply(s: &mut std::net::TcpStream, len: usize) -> (u64, u32, Vec<u8>) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    assert_eq!(h[..4], 0x6744_6698u32.to_be_bytes(), "simple reply magic");
    let error = u32::from_be_bytes(h[4..8].try_into().unwrap());
    let handle = u64::from_be_bytes(h[8..].try_into().unwrap());
    let mut data = vec![0u8; if error == 0 { len } else { 0 }];
    s.read_exact(&mut data).unwrap();
    (handle, error, data)
}

#[test]
fn closed_export_finishes_in_flight_requests_then_disconnects() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.img");
    let content = noise(5, 1 << 20);
    std::fs::write(&disk, &content).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (close, closed) = tokio::sync::watch::channel(false);
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let export = Arc::new(Closable {
        file: FileExport::open(&disk, "d", false).unwrap(),
        gate: gate.clone(),
        closed,
    });
    let addr = rt.block_on(async {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap().to_string();
        tokio::spawn(serve_tcp(tcp, Arc::new(OneExport(export))));
        addr
    });
    let (mut s, size) = raw_client(&addr, "d");
    assert_eq!(size, 1 << 20);

    // A slow read (waits for the gate) and a fast one: the fast one is answered first.
    send_read(&mut s, 1, 0, 4096);
    send_read(&mut s, 2, 8192, 4096);
    let (handle, error, data) = read_reply(&mut s, 4096);
    assert_eq!((handle, error), (2, 0));
    assert_eq!(data, content[8192..12288]);

    // The export closes while the slow read is in flight: a new request is refused
    // with ESHUTDOWN, the slow read still completes, then the server disconnects.
    close.send(true).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));
    send_read(&mut s, 3, 4096, 4096);
    let (handle, error, _) = read_reply(&mut s, 4096);
    assert_eq!((handle, error), (3, 108), "ESHUTDOWN");
    gate.add_permits(1);
    let (handle, error, data) = read_reply(&mut s, 4096);
    assert_eq!((handle, error), (1, 0));
    assert_eq!(data, content[..4096]);
    let mut rest = Vec::new();
    assert_eq!(
        s.read_to_end(&mut rest).unwrap(),
        0,
        "EOF after the last reply"
    );

    // A connection made while the export is closed is refused at once.
    let (mut s, _) = raw_client(&addr, "d");
    send_read(&mut s, 4, 4096, 4096);
    let mut rest = Vec::new();
    let n = s.read_to_end(&mut rest).unwrap_or(0);
    assert!(n == 0 || n == 16, "at most an ESHUTDOWN reply: {n} bytes");
}

fn request(command: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
    r.extend_from_slice(&0u16.to_be_bytes());
    r.extend_from_slice(&command.to_be_bytes());
    r.extend_from_slice(&handle.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    r
}

#[test]
fn many_requests_in_flight_of_every_size() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.img");
    let size = 16usize << 20;
    let mut model = noise(9, size);
    std::fs::write(&disk, &model).unwrap();
    let srv = start(dir.path(), vec![("d", disk.clone(), false)]);
    let addr = format!("127.0.0.1:{}", srv.port);
    let (mut s, _) = raw_client(&addr, "d");
    // Sizes around every path: small (inline), past the buffered payload (64 KiB), past
    // inline I/O (256 KiB: on the blocking pool), several MiB.
    let sizes = [
        1u32,
        4096,
        65536,
        65537,
        100_000,
        262_144,
        262_145,
        1 << 20,
        3 << 20,
    ];

    // Writes to disjoint ranges, all sent before any reply is read.
    let mut writes = Vec::new();
    let mut at = 0u64;
    for (i, &len) in sizes.iter().cycle().take(27).enumerate() {
        let data = noise(100 + i as u64, len as usize);
        writes.push((i as u64, at, data));
        at += u64::from(len) + 512;
    }
    assert!(at <= size as u64);
    let mut tx = s.try_clone().unwrap();
    let to_send = writes.clone();
    let sender = std::thread::spawn(move || {
        for (handle, offset, data) in to_send {
            tx.write_all(&request(1, handle, offset, data.len() as u32))
                .unwrap();
            tx.write_all(&data).unwrap();
        }
    });
    let mut done = std::collections::HashSet::new();
    for _ in 0..writes.len() {
        let (handle, error, _) = read_reply(&mut s, 0);
        assert_eq!(error, 0, "write {handle}");
        assert!(done.insert(handle), "one reply per request");
    }
    sender.join().unwrap();
    for (_, offset, data) in &writes {
        model[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
    }

    // Reads of every size at scattered offsets, all in flight at once.
    let reads: Vec<(u64, u64, u32)> = sizes
        .iter()
        .cycle()
        .take(40)
        .enumerate()
        .map(|(i, &len)| {
            let offset = (i as u64 * 7_919_003) % (size as u64 - u64::from(len));
            (1000 + i as u64, offset, len)
        })
        .collect();
    // Page-aligned reads of up to 1 MiB (the size of the pipe a file export's reads are
    // spliced through), and one a byte longer.
    let mut reads = reads;
    reads.extend([
        (2000, 0, 1 << 20),
        (2001, 1 << 20, 1 << 20),
        (2002, (5 << 20) + 4096, (1 << 20) - 4096),
        (2003, 8 << 20, (1 << 20) + 1),
    ]);
    let mut all = Vec::new();
    for &(handle, offset, len) in &reads {
        all.extend_from_slice(&request(0, handle, offset, len));
    }
    s.write_all(&all).unwrap();
    let by_handle: HashMap<u64, (u64, u32)> = reads.iter().map(|&(h, o, l)| (h, (o, l))).collect();
    for _ in 0..reads.len() {
        let mut h = [0u8; 16];
        s.read_exact(&mut h).unwrap();
        let handle = u64::from_be_bytes(h[8..].try_into().unwrap());
        assert_eq!(&h[4..8], &[0, 0, 0, 0], "read {handle} failed");
        let (offset, len) = by_handle[&handle];
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).unwrap();
        assert!(
            data == model[offset as usize..offset as usize + len as usize],
            "read {handle} at {offset} (+{len}) returned other bytes"
        );
    }
    // The file holds exactly the model.
    assert!(std::fs::read(&disk).unwrap() == model);
}

/// A file export seen only through [`BlockExport`]'s methods: no `direct_file`, so the
/// server reads every write's payload into a buffer (as for cairn-volume's exports).
struct Buffered(FileExport);

#[async_trait::async_trait]
impl BlockExport for Buffered {
    fn info(&self) -> ExportInfo {
        self.0.info()
    }
    async fn read(&self, offset: u64, len: u32) -> std::io::Result<Vec<u8>> {
        self.0.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> std::io::Result<()> {
        self.0.write(offset, data, fua).await
    }
    async fn flush(&self) -> std::io::Result<()> {
        self.0.flush().await
    }
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> std::io::Result<()> {
        self.0.trim(offset, len, fua).await
    }
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        may_punch: bool,
        fua: bool,
    ) -> std::io::Result<()> {
        self.0.write_zeroes(offset, len, may_punch, fua).await
    }
    async fn block_status(&self, offset: u64, len: u32) -> std::io::Result<Vec<(u32, u32)>> {
        self.0.block_status(offset, len).await
    }
}

/// A file export whose `direct_file` is the file opened read-only: every splice into it
/// fails, and the server must fall back to buffers without losing its place in the
/// request stream.
struct Refusing {
    file: Buffered,
    read_only: std::fs::File,
}

#[async_trait::async_trait]
impl BlockExport for Refusing {
    fn info(&self) -> ExportInfo {
        self.file.info()
    }
    async fn read(&self, offset: u64, len: u32) -> std::io::Result<Vec<u8>> {
        self.file.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> std::io::Result<()> {
        self.file.write(offset, data, fua).await
    }
    async fn flush(&self) -> std::io::Result<()> {
        self.file.flush().await
    }
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> std::io::Result<()> {
        self.file.trim(offset, len, fua).await
    }
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        may_punch: bool,
        fua: bool,
    ) -> std::io::Result<()> {
        self.file.write_zeroes(offset, len, may_punch, fua).await
    }
    async fn block_status(&self, offset: u64, len: u32) -> std::io::Result<Vec<(u32, u32)>> {
        self.file.block_status(offset, len).await
    }
    fn direct_file(&self) -> Option<&std::fs::File> {
        Some(&self.read_only)
    }
}

/// Serves one export over TCP on its own runtime; returns its address.
fn serve_one(export: Arc<dyn BlockExport>) -> (String, tokio::runtime::Runtime) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let addr = rt.block_on(async {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap().to_string();
        tokio::spawn(serve_tcp(tcp, Arc::new(OneExport(export))));
        addr
    });
    (addr, rt)
}

#[test]
fn a_file_that_refuses_splicing_falls_back_to_buffers() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.img");
    let mut model = noise(11, 8 << 20);
    std::fs::write(&disk, &model).unwrap();
    let export = Refusing {
        file: Buffered(FileExport::open(&disk, "d", false).unwrap()),
        read_only: std::fs::File::open(&disk).unwrap(),
    };
    let (addr, _rt) = serve_one(Arc::new(export));
    let (mut s, _) = raw_client(&addr, "d");
    // The first large write is spliced into the read-only file, which fails: its
    // payload is still consumed and it fails alone. The splicer is then given up, so
    // the next large write goes through a buffer and succeeds; then a small one.
    let writes = [(0u64, 1u32 << 20), (2 << 20, 3 << 20), (6 << 20, 4096)];
    let mut all = Vec::new();
    for (i, &(offset, len)) in writes.iter().enumerate() {
        all.extend_from_slice(&request(1, i as u64, offset, len));
        all.extend_from_slice(&noise(300 + i as u64, len as usize));
    }
    let mut tx = s.try_clone().unwrap();
    let sender = std::thread::spawn(move || tx.write_all(&all).unwrap());
    let mut errors = HashMap::new();
    for _ in 0..writes.len() {
        let (handle, error, _) = read_reply(&mut s, 0);
        errors.insert(handle, error);
    }
    sender.join().unwrap();
    assert_ne!(errors[&0], 0, "the write into the read-only file fails");
    assert_eq!((errors[&1], errors[&2]), (0, 0), "{errors:?}");
    for (i, &(offset, len)) in writes.iter().enumerate().skip(1) {
        let at = offset as usize;
        model[at..at + len as usize].copy_from_slice(&noise(300 + i as u64, len as usize));
    }
    // The connection is still in step: a read returns what the file holds.
    send_read(&mut s, 9, 0, 8 << 20);
    let (handle, error, data) = read_reply(&mut s, 8 << 20);
    assert_eq!((handle, error), (9, 0));
    assert!(data == model);
    assert!(std::fs::read(&disk).unwrap() == model);
}

#[test]
fn large_writes_beyond_the_in_flight_limit_all_complete() {
    // 12 writes of 5 MiB sent back to back. Into a file export they are spliced into
    // the file one after the other; into an export without `direct_file` that is more
    // than the 32 MiB of payloads a connection holds in flight, so it must stop reading
    // and resume as writes finish.
    for direct in [true, false] {
        large_writes_all_complete(direct);
    }
}

fn large_writes_all_complete(direct: bool) {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.img");
    std::fs::write(&disk, vec![0u8; 64 << 20]).unwrap();
    let file = FileExport::open(&disk, "d", false).unwrap();
    let export: Arc<dyn BlockExport> = if direct {
        Arc::new(file)
    } else {
        Arc::new(Buffered(file))
    };
    let (addr, _rt) = serve_one(export);
    let (mut s, _) = raw_client(&addr, "d");
    let len = 5usize << 20;
    let mut tx = s.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        for i in 0..12u64 {
            tx.write_all(&request(1, i, i * len as u64, len as u32))
                .unwrap();
            tx.write_all(&noise(200 + i, len)).unwrap();
        }
    });
    let mut acked = std::collections::HashSet::new();
    for _ in 0..12 {
        let (handle, error, _) = read_reply(&mut s, 0);
        assert_eq!(error, 0, "write {handle}");
        assert!(acked.insert(handle));
    }
    sender.join().unwrap();
    let on_disk = std::fs::read(&disk).unwrap();
    for i in 0..12u64 {
        let at = i as usize * len;
        assert!(on_disk[at..at + len] == noise(200 + i, len), "write {i}");
    }
}
