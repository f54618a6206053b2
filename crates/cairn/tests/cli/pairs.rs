//! DR pairs end to end (issue 5): two real `cairn serve` daemons on loopback — `fra`, the
//! standby, whose recovery space is on a real S3 server (`moto_server`), and `ams`, the
//! primary, with a local folder space — driven by the operator's CLI exactly as in a
//! shell (CAIRN_URL, CAIRN_TOKEN), disks written and read over NBD by qemu-io and
//! qemu-img. Without moto_server, qemu-io or qemu-img the tests skip, except in CI
//! (`CI=true`), where they fail. Every process they start (moto, both daemons) runs in
//! its own process group, killed when the test ends, passed or panicked.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{Run, cairn, noise, p};

/// The pair tests run one at a time: each starts three servers, and the timing checks
/// (nothing copied while paused) should not depend on what else runs.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const BUCKET: &str = "cairn-dr";
const MIB: u64 = 1 << 20;

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Whether the tools are there; without them a laptop skips, CI fails.
fn tools_found() -> bool {
    let mut missing = Vec::new();
    for (tool, probe) in [
        ("qemu-io", "qemu-io --version"),
        ("qemu-img", "qemu-img --version"),
        ("moto_server", "command -v moto_server"),
    ] {
        let ok = Command::new("sh")
            .args(["-c", probe])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            missing.push(tool);
        }
    }
    if missing.is_empty() {
        return true;
    }
    assert!(
        !in_ci(),
        "{} missing, and CI=true: the DR pair tests must run in CI (.ci/run installs qemu-utils and moto[server])",
        missing.join(", ")
    );
    eprintln!(
        "skipping the DR pair test: {} not installed",
        missing.join(", ")
    );
    false
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP/1.1 request (`Connection: close`): the whole answer, head and body.
fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)]) -> std::io::Result<String> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("Content-Length: 0\r\n\r\n");
    s.write_all(req.as_bytes())?;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    Ok(out)
}

/// SIGKILL to a whole process group (one this test started with `process_group(0)`).
fn kill_group(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .stderr(Stdio::null())
        .status();
    let _ = child.kill();
    let _ = child.wait();
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------- moto

/// A `moto_server` on a free loopback port with one bucket. A watchdog shell ends it if
/// the test process dies without unwinding; Drop kills its process group.
struct Moto {
    child: Child,
    addr: String,
}

impl Moto {
    fn start(log: &Path) -> Moto {
        let port = free_port();
        let me = std::process::id();
        let child = Command::new("sh")
            .args([
                "-c",
                &format!(
                    "moto_server -H 127.0.0.1 -p {port} & m=$!; while kill -0 {me} 2>/dev/null && kill -0 $m 2>/dev/null; do sleep 1; done; kill $m 2>/dev/null"
                ),
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .process_group(0)
            .spawn()
            .expect("start moto_server");
        let mut moto = Moto {
            child,
            addr: format!("127.0.0.1:{port}"),
        };
        let t0 = Instant::now();
        loop {
            // Creating the bucket is also the readiness probe.
            let r = http(&moto.addr, "PUT", &format!("/{BUCKET}"), &[]);
            if r.is_ok_and(|s| s.starts_with("HTTP/1.1 200") || s.starts_with("HTTP/1.0 200")) {
                return moto;
            }
            if let Ok(Some(status)) = moto.child.try_wait() {
                panic!("moto_server exited ({status}): {}", tail(log, 40));
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "moto_server did not start: {}",
                tail(log, 40)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The S3 URL of a recovery space under `prefix`.
    fn space_url(&self, prefix: &str) -> String {
        format!(
            "s3://{BUCKET}/{prefix}?endpoint=http://{}&region=us-east-1",
            self.addr
        )
    }

    /// The keys under `prefix`, listed through the S3 API (not through Cairn).
    fn keys(&self, prefix: &str) -> Vec<String> {
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut path = format!("/{BUCKET}?list-type=2&prefix={prefix}");
            if let Some(t) = &token {
                path.push_str(&format!("&continuation-token={}", t.replace('=', "%3D")));
            }
            let ans = http(&self.addr, "GET", &path, &[]).unwrap();
            assert!(ans.starts_with("HTTP/1.1 200"), "S3 list {prefix}: {ans}");
            for part in ans.split("<Key>").skip(1) {
                keys.push(part.split("</Key>").next().unwrap().to_string());
            }
            token = ans
                .split("<NextContinuationToken>")
                .nth(1)
                .and_then(|s| s.split("</NextContinuationToken>").next())
                .map(str::to_string);
            if token.is_none() {
                return keys;
            }
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        kill_group(&mut self.child);
    }
}

// ---------------------------------------------------------------- daemons

/// A `cairn serve` of one location on free ports, in its own process group.
struct Daemon {
    child: Option<Child>,
    name: String,
    data: PathBuf,
    url: String,
    /// `127.0.0.1:PORT` of its NBD listener.
    nbd: String,
    log: PathBuf,
    /// `127.0.0.1:PORT` of its API, and its `--space` (kept for a restart).
    api: String,
    space: Option<String>,
}

impl Daemon {
    fn start(dir: &Path, location: &str, space: Option<&str>) -> Daemon {
        let mut d = Daemon {
            child: None,
            name: location.to_string(),
            data: dir.join(location),
            url: String::new(),
            nbd: format!("127.0.0.1:{}", free_port()),
            log: dir.join(format!("{location}.log")),
            api: format!("127.0.0.1:{}", free_port()),
            space: space.map(str::to_string),
        };
        d.url = format!("http://{}", d.api);
        d.spawn();
        d
    }

    /// Starts `cairn serve` (again): same data directory, ports and space; returns once
    /// it answers /healthz.
    fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} runs already", self.name);
        let (location, data, api, nbd) = (
            self.name.clone(),
            self.data.clone(),
            self.api.clone(),
            self.nbd.clone(),
        );
        let log = self.log.clone();
        let space = self.space.clone();
        let mut c = cairn();
        for (k, _) in std::env::vars() {
            if k.starts_with("CAIRN_") || k.starts_with("AWS_") {
                c.env_remove(k);
            }
        }
        c.args(["serve", "--data-dir", p(&data), "--location", &location])
            .args(["--listen", &api, "--nbd-listen", &nbd]);
        if let Some(s) = &space {
            c.args(["--space", s]);
        }
        // A restart appends to the log of the first run.
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        // moto takes any credentials.
        let child = c
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("CAIRN_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log_file)
            .process_group(0)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            if http(&api, "GET", "/healthz", &[]).is_ok_and(|a| a.starts_with("HTTP/1.1 200")) {
                return;
            }
            if let Ok(Some(status)) = self.child.as_mut().unwrap().try_wait() {
                panic!(
                    "cairn serve ({location}) exited ({status}): {}",
                    tail(&log, 60)
                );
            }
            assert!(
                Instant::now() < until,
                "cairn serve ({location}) did not answer /healthz: {}",
                tail(&log, 60)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `cairn token create NAME --role ROLE --data-dir D`: the token.
    fn token(&self, name: &str, role: &str) -> String {
        let out = cairn()
            .env_remove("CAIRN_DATA_DIR")
            .args([
                "token",
                "create",
                name,
                "--role",
                role,
                "--data-dir",
                p(&self.data),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "token create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let t = String::from_utf8(out.stdout).unwrap().trim().to_string();
        assert!(!t.is_empty() && !t.contains(char::is_whitespace), "{t:?}");
        t
    }

    /// The shell of an operator of this location: CAIRN_URL and CAIRN_TOKEN exported.
    fn shell(&self, token: &str) -> Shell {
        Shell {
            url: self.url.clone(),
            token: token.to_string(),
        }
    }

    fn nbd_url(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.nbd)
    }

    /// SIGKILL (the location is gone without a word), and waits for it.
    fn kill9(&mut self) {
        let mut c = self.child.take().expect("running");
        c.kill().unwrap();
        c.wait().unwrap();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            kill_group(c);
        }
        if std::thread::panicking() {
            eprintln!(
                "---- the log of location {} (last lines) ----\n{}",
                self.name,
                tail(&self.log, 40)
            );
        }
    }
}

/// `cairn` with CAIRN_URL and CAIRN_TOKEN exported (and nothing else of Cairn's).
struct Shell {
    url: String,
    token: String,
}

impl Shell {
    fn run(&self, args: &[&str]) -> Run {
        let mut c = cairn();
        for (k, _) in std::env::vars() {
            if k.starts_with("CAIRN_") {
                c.env_remove(k);
            }
        }
        let out = c
            .env("CAIRN_URL", &self.url)
            .env("CAIRN_TOKEN", &self.token)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("cairn runs");
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    #[track_caller]
    fn ok(&self, args: &[&str]) -> String {
        let r = self.run(args);
        assert_eq!(
            r.code, 0,
            "cairn {args:?} (at {}) failed:\n{}\n{}",
            self.url, r.stdout, r.stderr
        );
        r.stdout
    }

    #[track_caller]
    fn json(&self, args: &[&str]) -> Value {
        let out = self.ok(args);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("cairn {args:?}: not JSON ({e}): {out}"))
    }

    /// Runs a command that must fail with `code`; its stderr.
    #[track_caller]
    fn fails(&self, args: &[&str], code: i32) -> String {
        let r = self.run(args);
        assert_eq!(
            r.code, code,
            "cairn {args:?} (at {}): expected exit {code}:\n{}\n{}",
            self.url, r.stdout, r.stderr
        );
        eprintln!("cairn {}: {}", args.join(" "), r.stderr.trim());
        r.stderr
    }

    fn pair(&self, pair: &str) -> Value {
        self.json(&["pair", "show", pair, "--json"])
    }

    /// Polls `pair show --json` until its state is `state` (at most `secs` seconds).
    #[track_caller]
    fn wait_state(&self, pair: &str, state: &str, secs: u64) -> Value {
        let until = Instant::now() + Duration::from_secs(secs);
        loop {
            let v = self.pair(pair);
            if v["state"] == state {
                return v;
            }
            assert!(
                Instant::now() < until,
                "DR pair {pair} at {} is not {state} after {secs} s: {v:#}",
                self.url
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `cairn pair replicate-now PAIR --wait --json`: the succeeded job. A replicate-now
    /// that finds a (scheduled) job of the pair running is skipped: then that job is
    /// waited for and replicate-now asked again, so that the point returned was taken
    /// after everything written before this call.
    #[track_caller]
    fn replicate(&self, pair: &str) -> Value {
        for _ in 0..10 {
            let v = self.json(&["pair", "replicate-now", pair, "--wait", "--json"]);
            if v["skipped"] == true {
                let other = v["job"]["skipped_for"].as_str().unwrap().to_string();
                eprintln!("replicate-now skipped for job {other}; waiting for it");
                self.ok(&["job", "follow", &other, "-q"]);
                continue;
            }
            assert_eq!(v["state"], "succeeded", "{v:#}");
            assert_eq!(v["kind"], "replication", "{v:#}");
            return v;
        }
        panic!("replicate-now of DR pair {pair} was skipped ten times");
    }
}

/// The space point id of a replication job's (only) server.
fn point_of(job: &Value) -> String {
    let pts = job["points"].as_array().expect("points");
    assert_eq!(pts.len(), 1, "{job:#}");
    pts[0]["point"].as_str().unwrap().to_string()
}

fn point_ids(pair: &Value) -> Vec<String> {
    pair["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect()
}

fn kinds(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap_or_default().to_string())
        .collect()
}

// ---------------------------------------------------------------- qemu

/// `qemu-io -f raw -c CMD URL`, which must succeed (pattern checks included).
#[track_caller]
fn qemu_io(url: &str, cmd: &str) {
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", cmd, url])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("failed") && !text.contains("error"),
        "qemu-io -c {cmd:?} {url}: {text}"
    );
}

fn qemu_img(args: &[&str]) -> (bool, String) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A raw (sparse) copy of what an NBD export holds now.
#[track_caller]
fn copy_disk(url: &str, to: &Path) {
    let (ok, text) = qemu_img(&["convert", "-f", "raw", "-O", "raw", url, p(to)]);
    assert!(ok, "qemu-img convert {url}: {text}");
}

/// `qemu-img compare`: the export holds exactly the copy's bytes.
#[track_caller]
fn same_as(copy: &Path, url: &str) {
    let (ok, text) = qemu_img(&["compare", "-f", "raw", "-F", "raw", p(copy), url]);
    assert!(ok, "qemu-img compare {} {url}: {text}", p(copy));
}

// ---------------------------------------------------------------- the two locations

/// moto, `fra` (standby, space on S3) and `ams` (primary, folder space), each with an
/// admin's shell; `fra` added at `ams` with an operator token of `fra`.
struct Sites {
    ams: Daemon,
    fra: Daemon,
    moto: Moto,
    /// Operator's shells: CAIRN_URL/CAIRN_TOKEN of each location (admin tokens).
    at_ams: Shell,
    at_fra: Shell,
    /// The operator token of `fra` that `ams` was given.
    fra_link_token: String,
    dir: PathBuf,
    _guard: std::sync::MutexGuard<'static, ()>,
    _tmp: tempfile::TempDir,
}

impl Sites {
    fn start() -> Option<Sites> {
        let guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        if !tools_found() {
            return None;
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let moto = Moto::start(&dir.join("moto.log"));
        let fra = Daemon::start(&dir, "fra", Some(&moto.space_url("fra")));
        let ams = Daemon::start(&dir, "ams", None);
        let at_fra = fra.shell(&fra.token("fra-ops", "admin"));
        let at_ams = ams.shell(&ams.token("ams-ops", "admin"));
        let link = fra.token("ams-link", "operator");
        // The recovery space of fra is on S3 indeed.
        assert!(
            moto.keys("fra/").iter().any(|k| k.starts_with("fra/")),
            "fra's space is not in the bucket: {:?}",
            moto.keys("")
        );
        // cairn location add fra --url http://127.0.0.1:FRA_PORT --token "$TOKEN_FRA"
        let added = at_ams.ok(&[
            "location", "add", "fra", "--url", &fra.url, "--token", &link,
        ]);
        assert!(added.contains("added location fra"), "{added}");
        let listed = at_ams.json(&["location", "list", "--json"]);
        assert_eq!(listed[0]["name"], "fra", "{listed}");
        assert!(
            !listed.to_string().contains(&link),
            "the token is never shown: {listed}"
        );
        Some(Sites {
            ams,
            fra,
            moto,
            at_ams,
            at_fra,
            fra_link_token: link,
            dir,
            _guard: guard,
            _tmp: tmp,
        })
    }

    /// A server `web` at ams with the given disks, started; returns the `server start`
    /// output.
    fn web(&self, disks: &[(&str, &str)], pre_hook: Option<&str>) -> String {
        let mut create = vec!["server", "create", "web"];
        if let Some(h) = pre_hook {
            create.extend(["--pre-hook", h]);
        }
        self.at_ams.ok(&create);
        for (disk, size) in disks {
            self.at_ams
                .ok(&["disk", "create", &format!("web/{disk}"), "--size", size]);
        }
        let started = self.at_ams.ok(&["server", "start", "web"]);
        for (disk, _) in disks {
            assert!(
                started.contains(&self.ams.nbd_url(&format!("web/{disk}"))),
                "{started}"
            );
        }
        started
    }

    /// `cairn pair create --server web --standby-location fra ...`: the pair id, which
    /// it prints alone on stdout.
    fn create_pair(&self, schedule: &[&str]) -> String {
        let mut args = vec![
            "pair",
            "create",
            "--server",
            "web",
            "--standby-location",
            "fra",
        ];
        args.extend(schedule);
        let r = self.at_ams.run(&args);
        assert_eq!(r.code, 0, "pair create: {}{}", r.stdout, r.stderr);
        let id = r.stdout.trim().to_string();
        assert!(
            r.stdout.lines().count() == 1
                && id.len() == 12
                && id.chars().all(|c| c.is_ascii_hexdigit()),
            "pair create prints the pair id alone: {:?}",
            r.stdout
        );
        assert!(r.stderr.contains(&format!("DR pair {id}")), "{}", r.stderr);
        id
    }
}

/// A schedule that does not fire while a test runs (1 January, 03:00).
const NEVER_DURING_THE_TEST: [&str; 2] = ["--schedule", "0 3 1 1 *"];

// ---------------------------------------------------------------- the tests

#[test]
fn pair_session_failover_with_primary_killed() {
    let Some(mut s) = Sites::start() else {
        return;
    };
    let (at_ams, at_fra) = (&s.at_ams, &s.at_fra);
    let (root, data) = (s.ams.nbd_url("web/root"), s.ams.nbd_url("web/data"));

    // At ams: the server, its disks, data on them.
    s.web(&[("root", "256MiB"), ("data", "128MiB")], None);
    qemu_io(&root, "write -P 0xab 0 8M");
    qemu_io(&data, "write -P 0xcd 0 4M");
    qemu_io(&data, "write -P 0xce 100M 1M");

    let pair = s.create_pair(&["--schedule", "*/5 * * * *"]);
    let first = at_ams.pair(&pair);
    eprintln!(
        "right after create: {} ({})",
        first["state_label"], first["detail"]
    );
    assert!(
        ["start_replication", "replicating"].contains(&first["state"].as_str().unwrap()),
        "{first:#}"
    );
    assert_eq!(first["role"], "primary", "{first:#}");
    assert_eq!(first["schedule"]["cron"], "*/5 * * * *", "{first:#}");
    let shown = at_ams.wait_state(&pair, "replicating", 120);
    // The history says Start Replication, then Replicating.
    let states: Vec<&str> = shown["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["state"].as_str())
        .collect();
    assert_eq!(
        states.first().copied(),
        Some("start_replication"),
        "{shown:#}"
    );
    assert!(states.contains(&"replicating"), "{shown:#}");
    assert!(!shown["last_point"].is_null(), "{shown:#}");
    assert!(
        shown["last_point_age_s"].as_i64().unwrap() >= 0,
        "{shown:#}"
    );
    assert!(!shown["points"].as_array().unwrap().is_empty(), "{shown:#}");
    assert!(
        kinds(&shown["jobs"]).iter().all(|k| k == "replication"),
        "{shown:#}"
    );
    let text = at_ams.ok(&["pair", "show", &pair]);
    for want in [
        "Replicating",
        "last point",
        "recovery points (",
        "jobs (newest first)",
        "history:",
        "fra",
    ] {
        assert!(text.contains(want), "pair show lacks {want:?}:\n{text}");
    }
    // The standby was told, and finds the point in its own (S3) space.
    let standby = at_fra.wait_state(&pair, "replicating", 30);
    assert_eq!(standby["role"], "standby", "{standby:#}");
    assert_eq!(standby["primary_location"], "ams", "{standby:#}");
    assert!(
        !standby["points"].as_array().unwrap().is_empty(),
        "{standby:#}"
    );
    let listed = at_fra.ok(&["pair", "list"]);
    assert!(
        listed.contains(&pair) && listed.contains("standby"),
        "{listed}"
    );

    // New data, a point, and what the disks held at that point; twice.
    let copies = s.dir.join("copies");
    std::fs::create_dir_all(&copies).unwrap();
    qemu_io(&root, "write -P 0x11 8M 4M");
    qemu_io(&data, "write -P 0x22 16M 3M");
    let older_job = at_ams.replicate(&pair);
    let older = point_of(&older_job);
    copy_disk(&root, &copies.join("older-root.raw"));
    copy_disk(&data, &copies.join("older-data.raw"));

    qemu_io(&root, "write -P 0x33 0 2M");
    qemu_io(&root, "write -P 0x34 200M 5M");
    qemu_io(&data, "write -P 0x44 64M 4M");
    let newer_job = at_ams.replicate(&pair);
    let newer = point_of(&newer_job);
    copy_disk(&root, &copies.join("newer-root.raw"));
    copy_disk(&data, &copies.join("newer-data.raw"));
    assert_ne!(older, newer);
    // (The copies differ: the older point really is older.)
    let (differ, _) = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        p(&copies.join("older-root.raw")),
        p(&copies.join("newer-root.raw")),
    ]);
    assert!(!differ, "the two copies of web/root should differ");

    let shown = at_ams.pair(&pair);
    let ids = point_ids(&shown);
    assert!(
        ids.len() >= 3 && ids.contains(&older) && ids.contains(&newer),
        "{shown:#}"
    );
    assert_eq!(shown["last_point"]["id"], ids[0].as_str(), "{shown:#}");
    let standby = at_fra.pair(&pair);
    let ids = point_ids(&standby);
    assert!(ids.contains(&older) && ids.contains(&newer), "{standby:#}");
    for id in [&older, &newer] {
        assert!(
            s.moto
                .keys("fra/points/")
                .contains(&format!("fra/points/{id}.json")),
            "point {id} is not in the S3 bucket"
        );
    }

    // The primary is gone without a word.
    s.ams.kill9();

    // At fra: failover to the latest point, with the primary unreachable.
    let r = at_fra.run(&["pair", "failover", &pair, "--point", "latest", "--yes"]);
    assert_eq!(r.code, 0, "failover: {}{}", r.stdout, r.stderr);
    eprintln!("{}", r.stdout.trim());
    assert!(
        r.stdout.starts_with("failed over: server web "),
        "{}",
        r.stdout
    );
    for disk in ["root", "data"] {
        assert!(
            r.stdout.contains(&s.fra.nbd_url(&format!("web/{disk}"))),
            "{}",
            r.stdout
        );
    }
    // Latest is the newer point (or a scheduled one taken after it, which holds the
    // same bytes: nothing was written after the newer point).
    same_as(&copies.join("newer-root.raw"), &s.fra.nbd_url("web/root"));
    same_as(&copies.join("newer-data.raw"), &s.fra.nbd_url("web/data"));
    let servers = at_fra.json(&["server", "list", "--json"]);
    let running: Vec<&str> = servers
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["state"] == "running")
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert!(running.contains(&"web"), "{servers:#}");

    // A drill to the older point, next to it: exactly the older bytes.
    let r = at_fra.run(&["pair", "drill", &pair, "--point", &older]);
    assert_eq!(r.code, 0, "drill: {}{}", r.stdout, r.stderr);
    assert!(
        r.stdout.starts_with("drill: server web-drill ") && r.stdout.contains(&older),
        "{}",
        r.stdout
    );
    same_as(
        &copies.join("older-root.raw"),
        &s.fra.nbd_url("web-drill/root"),
    );
    same_as(
        &copies.join("older-data.raw"),
        &s.fra.nbd_url("web-drill/data"),
    );
    let shown = at_fra.pair(&pair);
    assert_eq!(
        shown["drills"],
        serde_json::json!(["web-drill"]),
        "{shown:#}"
    );

    let cleaned = at_fra.ok(&["pair", "drill-cleanup", &pair]);
    assert!(cleaned.contains("drill servers removed"), "{cleaned}");
    let servers = at_fra.json(&["server", "list", "--json"]);
    let names: Vec<&str> = servers
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert!(
        names.contains(&"web") && !names.contains(&"web-drill"),
        "{servers:#}"
    );
    // The failed-over server goes on serving the newer bytes.
    same_as(&copies.join("newer-root.raw"), &s.fra.nbd_url("web/root"));

    // What fra says of the pair now.
    let shown = at_fra.pair(&pair);
    assert_eq!(shown["state"], "failed_over", "{shown:#}");
    assert_eq!(shown["state_label"], "Failed over", "{shown:#}");
    assert_eq!(shown["drills"], serde_json::json!([]), "{shown:#}");
    let history = kinds(&shown["history"]);
    for k in ["created", "failover", "drill", "drill_cleanup"] {
        assert!(
            history.iter().any(|h| h == k),
            "history lacks {k}: {shown:#}"
        );
    }
    let jobs = kinds(&shown["jobs"]);
    assert!(
        jobs.iter().any(|k| k == "failover") && jobs.iter().any(|k| k == "drill"),
        "{shown:#}"
    );
    for j in shown["jobs"].as_array().unwrap() {
        assert_eq!(j["state"], "succeeded", "{j:#}");
    }
    let drill_job = shown["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["kind"] == "drill")
        .unwrap();
    assert_eq!(drill_job["target"], older.as_str(), "{drill_job:#}");
    let text = at_fra.ok(&["pair", "show", &pair]);
    assert!(
        text.contains("Failed over") && text.contains("failover"),
        "{text}"
    );

    // A second failover is refused.
    let err = at_fra.fails(&["pair", "failover", &pair, "--yes"], 1);
    assert!(err.contains("already failed over"), "{err}");
}

#[test]
fn restart_replication() {
    let Some(s) = Sites::start() else {
        return;
    };
    let (at_ams, at_fra) = (&s.at_ams, &s.at_fra);
    // The pre-hook holds a point while the file `hold` exists: the test decides how long
    // the initial copy after a restart lasts, instead of racing it.
    let hold = s.dir.join("hold");
    let hook = format!("while [ -e '{}' ]; do sleep 0.05; done", p(&hold));
    s.web(&[("root", "256MiB")], Some(&hook));
    let root = s.ams.nbd_url("web/root");
    // Data that does not compress.
    let random = s.dir.join("random");
    std::fs::write(&random, noise(55, (32 * MIB) as usize)).unwrap();
    qemu_io(&root, &format!("write -s {} 0 32M", p(&random)));

    let pair = s.create_pair(&NEVER_DURING_THE_TEST);
    at_ams.wait_state(&pair, "replicating", 120);
    qemu_io(&root, "write -P 0x5a 100M 1M");
    at_ams.replicate(&pair);
    let before = at_ams.pair(&pair);
    let old = point_ids(&before);
    assert_eq!(old.len(), 2, "{before:#}");
    let old_jobs: Vec<String> = before["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["job"].as_str().unwrap().to_string())
        .collect();
    at_fra.wait_state(&pair, "replicating", 30);
    let keys = s.moto.keys("fra/points/");
    for id in &old {
        assert!(keys.contains(&format!("fra/points/{id}.json")), "{keys:?}");
    }

    // Without --yes: exit 4, nothing changed.
    let err = at_ams.fails(&["pair", "restart", &pair], 4);
    assert!(
        err.contains("--yes")
            && err.contains("PERMANENTLY DELETES")
            && err.contains("Nothing was changed"),
        "{err}"
    );
    let same = at_ams.pair(&pair);
    assert_eq!(point_ids(&same), old, "{same:#}");
    assert_eq!(same["state"], "replicating", "{same:#}");
    assert_eq!(point_ids(&at_fra.pair(&pair)), old);

    // With --yes, while the new initial copy is held at its start.
    std::fs::write(&hold, b"").unwrap();
    let out = at_ams.ok(&["pair", "restart", &pair, "--yes"]);
    assert!(out.contains("restarted"), "{out}");
    let after = at_ams.pair(&pair);
    assert_eq!(after["state"], "start_replication", "{after:#}");
    assert_eq!(after["points"], serde_json::json!([]), "{after:#}");
    assert!(after["last_point"].is_null(), "{after:#}");
    assert!(
        kinds(&after["history"]).iter().any(|k| k == "restart"),
        "{after:#}"
    );
    let standby = at_fra.pair(&pair);
    assert_eq!(standby["state"], "start_replication", "{standby:#}");
    assert_eq!(standby["points"], serde_json::json!([]), "{standby:#}");
    assert!(
        kinds(&standby["history"]).iter().any(|k| k == "restart"),
        "{standby:#}"
    );
    // The standby refuses to fail over until the copy is done.
    let err = at_fra.fails(&["pair", "failover", &pair, "--yes"], 1);
    assert!(
        err.contains("standby not ready: initial replication in progress")
            && err.contains("% copied"),
        "{err}"
    );
    let text = at_fra.ok(&["pair", "show", &pair]);
    assert!(
        text.contains("Start Replication") && text.contains("% copied"),
        "{text}"
    );
    // The old points are gone from the S3 bucket...
    let keys = s.moto.keys("fra/points/");
    for id in &old {
        assert!(
            !keys.contains(&format!("fra/points/{id}.json")),
            "point {id} of the pair is still in S3 after the restart: {keys:?}"
        );
    }
    // ... and ams no longer offers them.
    let points = at_ams.json(&["point", "list", "--json"]);
    for j in points.as_array().unwrap() {
        if old_jobs.iter().any(|o| j["id"] == o.as_str()) {
            assert_eq!(j["restorable"], false, "{j:#}");
            assert!(
                j["deleted"]
                    .as_str()
                    .is_some_and(|d| d.contains("Restart Replication")),
                "{j:#}"
            );
        }
    }
    for id in &old {
        let r = at_ams.run(&["point", "clone", id, "--disk", "web/root", "--to", "x/root"]);
        assert_ne!(r.code, 0, "a deleted point was cloned: {}", r.stdout);
    }

    // The copy goes on: Replicating, one new point, failover allowed.
    std::fs::remove_file(&hold).unwrap();
    let done = at_ams.wait_state(&pair, "replicating", 120);
    let new = point_ids(&done);
    assert_eq!(new.len(), 1, "{done:#}");
    assert!(!old.contains(&new[0]), "{done:#}");
    let standby = at_fra.wait_state(&pair, "replicating", 30);
    assert_eq!(point_ids(&standby), new, "{standby:#}");
    assert!(
        s.moto
            .keys("fra/points/")
            .contains(&format!("fra/points/{}.json", new[0]))
    );
    let out = at_fra.ok(&["pair", "failover", &pair, "--yes"]);
    assert!(out.contains(&new[0]), "{out}");
    // What fra serves is what ams holds (nothing was written since the copy).
    let (ok, text) = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        &root,
        &s.fra.nbd_url("web/root"),
    ]);
    assert!(
        ok,
        "qemu-img compare {root} (ams) with fra's web/root: {text}"
    );
}

#[test]
fn pair_bad_input() {
    let Some(s) = Sites::start() else {
        return;
    };
    let (at_ams, at_fra) = (&s.at_ams, &s.at_fra);
    s.web(&[("root", "64MiB")], None);
    qemu_io(&s.ams.nbd_url("web/root"), "write -P 0x17 0 1M");

    // Creating a pair: unknown server, unknown standby, itself as its standby.
    let err = at_ams.fails(
        &[
            "pair",
            "create",
            "--server",
            "nosuch",
            "--standby-location",
            "fra",
        ],
        1,
    );
    assert!(
        err.contains("unknown server") && err.contains("nosuch"),
        "{err}"
    );
    let err = at_ams.fails(
        &[
            "pair",
            "create",
            "--server",
            "web",
            "--standby-location",
            "lis",
        ],
        1,
    );
    assert!(
        err.contains("unknown location")
            && err.contains("lis")
            && err.contains("cairn location add"),
        "{err}"
    );
    let err = at_ams.fails(
        &[
            "pair",
            "create",
            "--server",
            "web",
            "--standby-location",
            "ams",
        ],
        1,
    );
    assert!(
        err.contains("another location") && err.contains("ams"),
        "{err}"
    );
    assert_eq!(
        at_ams.json(&["pair", "list", "--json"]),
        serde_json::json!([])
    );

    // Adding a location: a wrong token, a wrong name, no --url/--token.
    let err = at_ams.fails(
        &[
            "location",
            "add",
            "lis",
            "--url",
            &s.fra.url,
            "--token",
            "cairn_not-a-token",
        ],
        1,
    );
    assert!(err.to_lowercase().contains("token"), "{err}");
    let err = at_ams.fails(
        &[
            "location",
            "add",
            "lis",
            "--url",
            &s.fra.url,
            "--token",
            &s.fra_link_token,
        ],
        1,
    );
    assert!(
        err.contains("calls itself \"fra\"") && err.contains("lis"),
        "{err}"
    );
    let err = at_ams.fails(&["location", "add", "lis"], 2);
    assert!(err.contains("--url") && err.contains("--token"), "{err}");
    let dead = format!("http://127.0.0.1:{}", free_port());
    let err = at_ams.fails(
        &[
            "location",
            "add",
            "lis",
            "--url",
            &dead,
            "--token",
            &s.fra_link_token,
        ],
        1,
    );
    assert!(err.contains("unreachable"), "{err}");
    let known = at_ams.json(&["location", "list", "--json"]);
    assert_eq!(known.as_array().unwrap().len(), 1, "{known}");

    let pair = s.create_pair(&NEVER_DURING_THE_TEST);
    at_ams.wait_state(&pair, "replicating", 120);
    at_fra.wait_state(&pair, "replicating", 30);
    let err = at_ams.fails(
        &[
            "pair",
            "create",
            "--server",
            "web",
            "--standby-location",
            "fra",
        ],
        1,
    );
    assert!(
        err.contains("already protected") && err.contains(&pair),
        "{err}"
    );

    // Unknown pair ids, at either side.
    for sh in [at_ams, at_fra] {
        for id in ["0123456789ab", "nosuch"] {
            let err = sh.fails(&["pair", "show", id], 1);
            assert!(
                err.starts_with("error: ") && err.contains("no DR pair"),
                "{err}"
            );
        }
        let err = sh.fails(&["pair", "replicate-now", "0123456789ab"], 1);
        assert!(err.contains("no DR pair"), "{err}");
    }
    let err = at_fra.fails(&["pair", "failover", "0123456789ab", "--yes"], 1);
    assert!(err.contains("no DR pair"), "{err}");

    // Each side's commands at the other side: refused, naming where they run.
    let err = at_ams.fails(&["pair", "failover", &pair, "--yes"], 1);
    assert!(err.contains("standby location fra"), "{err}");
    let err = at_ams.fails(&["pair", "drill", &pair], 1);
    assert!(err.contains("standby location fra"), "{err}");
    let err = at_ams.fails(&["pair", "drill-cleanup", &pair], 1);
    assert!(err.contains("standby location fra"), "{err}");
    let err = at_fra.fails(&["pair", "replicate-now", &pair], 1);
    assert!(err.contains("primary location ams"), "{err}");
    let err = at_fra.fails(&["pair", "pause", &pair], 1);
    assert!(err.contains("primary location ams"), "{err}");
    let err = at_fra.fails(&["pair", "restart", &pair, "--yes"], 1);
    assert!(err.contains("primary location ams"), "{err}");

    // Failover without --yes: exit 4, nothing changed.
    let err = at_fra.fails(&["pair", "failover", &pair], 4);
    assert!(
        err.contains("--yes") && err.contains("Nothing was changed"),
        "{err}"
    );
    assert_eq!(at_fra.pair(&pair)["state"], "replicating");
    assert_eq!(
        at_fra.json(&["server", "list", "--json"]),
        serde_json::json!([])
    );
    // A point that is not there.
    let err = at_fra.fails(
        &["pair", "failover", &pair, "--point", "ffffffff", "--yes"],
        1,
    );
    assert!(err.contains("no recovery point ffffffff"), "{err}");
    assert_eq!(at_fra.pair(&pair)["state"], "replicating");
    // No drill to clean up.
    let err = at_fra.fails(&["pair", "drill-cleanup", &pair], 1);
    assert!(err.contains("no drill to clean up"), "{err}");
    // A drill server's name taken: refused, and nothing is left behind.
    at_fra.ok(&["server", "create", "web-drill"]);
    let err = at_fra.fails(&["pair", "drill", &pair, "--name", "web-drill"], 1);
    assert!(err.contains("exists already"), "{err}");
    let shown = at_fra.pair(&pair);
    assert_eq!(shown["drills"], serde_json::json!([]), "{shown:#}");
}

#[test]
fn pause_resume_nothing_copied_while_paused() {
    let Some(s) = Sites::start() else {
        return;
    };
    let (at_ams, at_fra) = (&s.at_ams, &s.at_fra);
    let (root, data) = (s.ams.nbd_url("web/root"), s.ams.nbd_url("web/data"));
    s.web(&[("root", "256MiB"), ("data", "128MiB")], None);
    qemu_io(&root, "write -P 0xab 0 8M");
    qemu_io(&data, "write -P 0xcd 0 4M");
    // The shortest interval: the scheduler would copy within 10 s if pausing did not
    // stop it.
    let pair = s.create_pair(&["--every", "10s"]);
    at_ams.wait_state(&pair, "replicating", 120);

    let out = at_ams.ok(&["pair", "pause", &pair]);
    assert!(out.contains("paused"), "{out}");
    let paused = at_ams.pair(&pair);
    assert_eq!(paused["state"], "paused", "{paused:#}");
    assert_eq!(paused["state_label"], "Paused", "{paused:#}");
    at_fra.wait_state(&pair, "paused", 30);
    // A job that had started before the pause ends first.
    let until = Instant::now() + Duration::from_secs(60);
    let before = loop {
        let v = at_ams.pair(&pair);
        let busy = v["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|j| matches!(j["state"].as_str(), Some("queued" | "running")));
        if !busy {
            break v;
        }
        assert!(Instant::now() < until, "{v:#}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(before["state"], "paused", "{before:#}");
    let jobs_before: Vec<Value> = before["jobs"].as_array().unwrap().clone();
    let points_before = point_ids(&before);
    let standby_before = point_ids(&at_fra.pair(&pair));

    // Writes while paused; replicate-now refused; the schedule copies nothing.
    qemu_io(&root, "write -P 0x5e 32M 2M");
    qemu_io(&data, "write -P 0x6f 1M 1M");
    let err = at_ams.fails(&["pair", "replicate-now", &pair], 1);
    assert!(
        err.contains("paused") && err.contains("cairn pair resume"),
        "{err}"
    );
    std::thread::sleep(Duration::from_secs(12));
    let still = at_ams.pair(&pair);
    assert_eq!(still["state"], "paused", "{still:#}");
    assert_eq!(
        still["jobs"].as_array().unwrap().len(),
        jobs_before.len(),
        "a job ran while the pair was paused: {still:#}"
    );
    assert_eq!(point_ids(&still), points_before, "{still:#}");
    assert_eq!(point_ids(&at_fra.pair(&pair)), standby_before);

    // Resumed: replication goes on incrementally, the change map kept.
    let out = at_ams.ok(&["pair", "resume", &pair]);
    assert!(out.contains("resumed"), "{out}");
    assert_eq!(at_ams.pair(&pair)["state"], "replicating");
    at_fra.wait_state(&pair, "replicating", 30);
    at_ams.replicate(&pair);
    let after = at_ams.pair(&pair);
    let new: Vec<&Value> = after["points"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| !points_before.contains(&p["id"].as_str().unwrap().to_string()))
        .collect();
    assert!(!new.is_empty(), "{after:#}");
    // The first point after the resume (the list is newest first) holds the writes made
    // while paused, and only them: a 4 MiB chunk of each disk.
    let first = new.last().unwrap();
    let disks = first["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 2, "{first:#}");
    let mut covered = 0;
    for d in disks {
        let changed = d["bytes_changed"].as_u64().unwrap();
        covered += d["size"].as_u64().unwrap();
        assert!(
            (MIB..=8 * MIB).contains(&changed),
            "{}: {changed} bytes changed for 1-2 MiB written: {first:#}",
            d["disk"]
        );
    }
    assert_eq!(covered, 384 * MIB, "{first:#}");
    // Later points (the schedule goes on) found nothing new.
    for p in &new[..new.len() - 1] {
        for d in p["disks"].as_array().unwrap() {
            assert_eq!(d["bytes_changed"], 0, "{p:#}");
        }
    }
    let standby = at_fra.pair(&pair);
    assert!(
        point_ids(&standby).contains(&first["id"].as_str().unwrap().to_string()),
        "{standby:#}"
    );
    let history = kinds(&after["history"]);
    assert!(
        history.iter().any(|k| k == "paused") && history.iter().any(|k| k == "resumed"),
        "{after:#}"
    );
}

// ---------------------------------------------------------------- failback, layout

/// A file of `len` random (incompressible) bytes, to write with `qemu-io -c 'write -s'`.
fn random_file(dir: &Path, name: &str, seed: u64, len: u64) -> PathBuf {
    let f = dir.join(name);
    std::fs::write(&f, noise(seed, len as usize)).unwrap();
    f
}

/// `qemu-io -c 'write -s FILE OFF LEN'`: the file's first LEN bytes at OFF.
#[track_caller]
fn write_file(url: &str, file: &Path, off: &str, len: &str) {
    qemu_io(url, &format!("write -s {} {off} {len}", p(file)));
}

fn is_running(sh: &Shell, server: &str) -> bool {
    sh.json(&["server", "list", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v["name"] == server && v["state"] == "running")
}

/// The first replication job of a pair's (current) policy, from `pair show --json`
/// (jobs newest first), and its totals: (bytes_written, bytes_changed, size covered).
#[track_caller]
fn first_replication(pair: &Value) -> (Value, u64, u64, u64) {
    let job = pair["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|j| j["kind"] == "replication")
        .unwrap_or_else(|| panic!("no replication job: {pair:#}"))
        .clone();
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let res = job["resources"].as_array().expect("resources");
    let sum = |k: &str| res.iter().map(|r| r[k].as_u64().unwrap()).sum::<u64>();
    let (w, c, size) = (sum("bytes_written"), sum("bytes_changed"), sum("size"));
    (job, w, c, size)
}

/// `cairn pair replicate-now PAIR --wait` at a location whose pair's standby failed
/// over: refused (by the pair's state, or by the split-brain guard in the job). A
/// replicate-now skipped for a scheduled job is asked again once that job ended.
#[track_caller]
fn replicate_refused(sh: &Shell, pair: &str) -> String {
    for _ in 0..10 {
        let r = sh.run(&["pair", "replicate-now", pair, "--wait"]);
        if r.code == 0 && r.stdout.contains("skipped") {
            eprintln!("replicate-now skipped: {}", r.stdout.trim());
            std::thread::sleep(Duration::from_millis(500));
            continue;
        }
        assert_eq!(
            r.code, 1,
            "replicate-now at {} should fail:\n{}\n{}",
            sh.url, r.stdout, r.stderr
        );
        eprintln!(
            "cairn pair replicate-now {pair} --wait: {}",
            r.stderr.trim()
        );
        return r.stderr;
    }
    panic!("replicate-now of DR pair {pair} was skipped ten times");
}

#[test]
fn failback_round_trip_sends_only_what_changed() {
    let Some(mut s) = Sites::start() else {
        return;
    };
    let t0 = Instant::now();
    let (at_ams, at_fra) = (s.ams.shell(&s.at_ams.token), s.fra.shell(&s.at_fra.token));
    let (root, data) = (s.ams.nbd_url("web/root"), s.ams.nbd_url("web/data"));
    let (fra_root, fra_data) = (s.fra.nbd_url("web/root"), s.fra.nbd_url("web/data"));

    // At ams: 80 MiB of data that does not compress on two disks, replicated to fra.
    s.web(&[("root", "256MiB"), ("data", "128MiB")], None);
    let random_root = random_file(&s.dir, "random-root", 101, 64 * MIB);
    let random_data = random_file(&s.dir, "random-data", 102, 16 * MIB);
    write_file(&root, &random_root, "0", "64M");
    write_file(&data, &random_data, "0", "16M");
    let on_disks = 80 * MIB;
    let pair = s.create_pair(&["--schedule", "*/5 * * * *"]);
    let initial = at_ams.wait_state(&pair, "replicating", 120);
    let (_, w0, c0, _) = first_replication(&initial);
    eprintln!("initial copy ams → fra: {w0} bytes written, {c0} bytes changed");
    assert!(w0 >= on_disks, "the initial copy wrote only {w0} bytes");
    at_ams.replicate(&pair);
    at_fra.wait_state(&pair, "replicating", 30);

    // ams is gone; fra fails over and its server is written to.
    s.ams.kill9();
    let out = at_fra.ok(&["pair", "failover", &pair, "--yes"]);
    eprintln!("{}", out.trim());
    assert!(out.starts_with("failed over: server web "), "{out}");
    let since_failover = random_file(&s.dir, "random-fra", 103, 2 * MIB);
    write_file(&fra_root, &since_failover, "100M", "2M");

    // ams comes back (same data directory, same ports), still the primary by its own
    // records: its next job is stopped by the split-brain guard.
    s.ams.spawn();
    let back = at_ams.pair(&pair);
    assert_eq!(back["role"], "primary", "{back:#}");
    assert_eq!(back["standby_location"], "fra", "{back:#}");
    eprintln!(
        "ams after its restart: {} ({})",
        back["state_label"], back["detail"]
    );
    let err = replicate_refused(&at_ams, &pair);
    assert!(err.contains("failed over"), "{err}");
    let stopped = at_ams.pair(&pair);
    assert_eq!(stopped["state"], "failed_over", "{stopped:#}");
    assert_eq!(stopped["role"], "primary", "{stopped:#}");
    // The stale server at ams is stopped before the reversal.
    if is_running(&at_ams, "web") {
        eprintln!("ams re-exported web after its restart; stopping it");
        at_ams.ok(&["server", "stop", "web"]);
    }
    assert!(!is_running(&at_ams, "web"));

    // Failback, step 1, at fra: reverse.
    let ams_link = s.ams.token("fra-link", "operator");
    let added = at_fra.ok(&[
        "location", "add", "ams", "--url", &s.ams.url, "--token", &ams_link,
    ]);
    assert!(added.contains("added location ams"), "{added}");
    let err = at_fra.fails(&["pair", "reverse", &pair], 4);
    assert!(
        err.contains("--yes") && err.contains("Nothing was changed"),
        "{err}"
    );
    let same = at_fra.pair(&pair);
    assert_eq!(same["role"], "standby", "{same:#}");
    assert_eq!(same["state"], "failed_over", "{same:#}");
    let out = at_fra.ok(&["pair", "reverse", &pair, "--yes"]);
    eprintln!("{}", out.trim());
    assert!(
        out.contains("reversed: fra is now the primary, ams the standby"),
        "{out}"
    );
    let reversed = at_fra.pair(&pair);
    assert_eq!(reversed["role"], "primary", "{reversed:#}");
    assert_eq!(reversed["primary_location"], "fra", "{reversed:#}");
    assert_eq!(reversed["standby_location"], "ams", "{reversed:#}");
    let reversed = at_fra.wait_state(&pair, "replicating", 120);
    let standby = at_ams.wait_state(&pair, "replicating", 30);
    assert_eq!(standby["role"], "standby", "{standby:#}");
    assert_eq!(standby["primary_location"], "fra", "{standby:#}");
    for side in [&reversed, &standby] {
        assert!(
            kinds(&side["history"]).iter().any(|k| k == "reversed"),
            "{side:#}"
        );
    }
    // What crossed from fra to ams: the 2 MiB written since the failover (one 4 MiB
    // chunk of root), not the 80 MiB on the disks.
    let (job, written, changed, covered) = first_replication(&reversed);
    eprintln!(
        "MEASURED failback fra → ams (job {}): bytes_written {written} ({:.2} MiB), bytes_changed {changed} ({:.2} MiB), disks {covered} bytes with {on_disks} bytes of random data",
        job["id"],
        written as f64 / MIB as f64,
        changed as f64 / MIB as f64
    );
    assert_eq!(covered, 384 * MIB, "{job:#}");
    assert!(
        written < 8 * MIB,
        "the reversed pair's first job wrote {written} bytes: {job:#}"
    );

    // Failback, step 2: planned failover back. fra's final bytes, then its server
    // stopped and a last point of it.
    let copies = s.dir.join("copies");
    std::fs::create_dir_all(&copies).unwrap();
    copy_disk(&fra_root, &copies.join("root.raw"));
    copy_disk(&fra_data, &copies.join("data.raw"));
    at_fra.ok(&["server", "stop", "web"]);
    let last = at_fra.replicate(&pair);
    let last_point = point_of(&last);
    at_ams.wait_state(&pair, "replicating", 30);
    let r = at_ams.run(&["pair", "failover", &pair, "--yes"]);
    assert_eq!(r.code, 0, "failover back: {}{}", r.stdout, r.stderr);
    eprintln!("{}", r.stdout.trim());
    assert!(
        r.stdout.starts_with("failed over: server web ")
            && r.stdout.contains(&last_point)
            && r.stdout.contains("rolled back")
            && !r.stdout.contains("hydrate in the background"),
        "{}",
        r.stdout
    );
    same_as(&copies.join("root.raw"), &root);
    same_as(&copies.join("data.raw"), &data);
    let over = at_ams.pair(&pair);
    assert_eq!(over["state"], "failed_over", "{over:#}");
    at_fra.wait_state(&pair, "failed_over", 30);

    // Failback, step 3, at ams (which knows fra): the original direction again.
    let out = at_ams.ok(&["pair", "reverse", &pair, "--yes"]);
    eprintln!("{}", out.trim());
    let again = at_ams.pair(&pair);
    assert_eq!(again["role"], "primary", "{again:#}");
    assert_eq!(again["standby_location"], "fra", "{again:#}");
    let again = at_ams.wait_state(&pair, "replicating", 120);
    let standby = at_fra.wait_state(&pair, "replicating", 30);
    assert_eq!(standby["role"], "standby", "{standby:#}");
    assert_eq!(standby["primary_location"], "ams", "{standby:#}");
    let (job, written, changed, covered) = first_replication(&again);
    eprintln!(
        "MEASURED back to ams → fra (job {}): bytes_written {written} ({:.2} MiB), bytes_changed {changed} ({:.2} MiB), disks {covered} bytes",
        job["id"],
        written as f64 / MIB as f64,
        changed as f64 / MIB as f64
    );
    assert_eq!(covered, 384 * MIB, "{job:#}");
    assert!(
        written < 8 * MIB,
        "the pair's first job after the second reversal wrote {written} bytes: {job:#}"
    );
    // ams serves what fra held last, and goes on replicating; the point fra got for
    // (next to) nothing holds all of it: a drill there has exactly those bytes.
    same_as(&copies.join("root.raw"), &root);
    let latest = point_of(&at_ams.replicate(&pair));
    at_fra.wait_state(&pair, "replicating", 30);
    let r = at_fra.run(&["pair", "drill", &pair]);
    assert_eq!(r.code, 0, "drill: {}{}", r.stdout, r.stderr);
    assert!(
        r.stdout.starts_with("drill: server web-drill ") && r.stdout.contains(&latest),
        "{}",
        r.stdout
    );
    same_as(&copies.join("root.raw"), &s.fra.nbd_url("web-drill/root"));
    same_as(&copies.join("data.raw"), &s.fra.nbd_url("web-drill/data"));
    at_fra.ok(&["pair", "drill-cleanup", &pair]);
    eprintln!("failback round trip: {:.1} s", t0.elapsed().as_secs_f64());
}

#[test]
fn layout_change_is_picked_up_by_the_standby() {
    let Some(s) = Sites::start() else {
        return;
    };
    let (at_ams, at_fra) = (&s.at_ams, &s.at_fra);
    let (root, data, logs) = (
        s.ams.nbd_url("web/root"),
        s.ams.nbd_url("web/data"),
        s.ams.nbd_url("web/logs"),
    );
    s.web(&[("root", "64MiB"), ("data", "128MiB")], None);
    qemu_io(&root, "write -P 0x21 0 4M");
    qemu_io(&data, "write -P 0x22 0 4M");
    let pair = s.create_pair(&NEVER_DURING_THE_TEST);
    at_ams.wait_state(&pair, "replicating", 120);
    at_ams.replicate(&pair);

    // The layout changes at ams: data grown, a disk added.
    at_ams.ok(&["server", "stop", "web"]);
    at_ams.ok(&["disk", "grow", "web/data", "--size", "192MiB"]);
    at_ams.ok(&["disk", "create", "web/logs", "--size", "64MiB"]);
    let started = at_ams.ok(&["server", "start", "web"]);
    assert!(started.contains(&logs), "{started}");
    qemu_io(&logs, "write -P 0x6c 1M 3M");
    qemu_io(&data, "write -P 0x23 160M 1M");
    let job = at_ams.replicate(&pair);
    let id = point_of(&job);

    let shown = at_ams.pair(&pair);
    let points = shown["points"].as_array().unwrap();
    assert!(points.len() >= 3, "{shown:#}");
    assert_eq!(points[0]["id"], id.as_str(), "{shown:#}");
    assert_eq!(points[0]["scope_changed"], true, "{shown:#}");
    for p in &points[1..] {
        assert_eq!(p["scope_changed"], false, "{shown:#}");
    }
    let sizes: Vec<(String, u64)> = points[0]["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["disk"].as_str().unwrap().to_string(),
                d["size"].as_u64().unwrap(),
            )
        })
        .collect();
    for want in [
        ("web/root", 64 * MIB),
        ("web/data", 192 * MIB),
        ("web/logs", 64 * MIB),
    ] {
        assert!(
            sizes.contains(&(want.0.to_string(), want.1)),
            "{want:?} not in {sizes:?}"
        );
    }

    // A drill at fra of the latest point has the new layout.
    let standby = at_fra.wait_state(&pair, "replicating", 30);
    assert_eq!(point_ids(&standby)[0], id, "{standby:#}");
    let r = at_fra.run(&["pair", "drill", &pair]);
    assert_eq!(r.code, 0, "drill: {}{}", r.stdout, r.stderr);
    assert!(
        r.stdout.starts_with("drill: server web-drill ") && r.stdout.contains(&id),
        "{}",
        r.stdout
    );
    for disk in ["root", "data", "logs"] {
        assert!(
            r.stdout
                .contains(&s.fra.nbd_url(&format!("web-drill/{disk}"))),
            "{}",
            r.stdout
        );
    }
    let disks = at_fra.json(&["disk", "list", "web-drill", "--json"]);
    let mut found: Vec<(String, u64)> = disks
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let n = d["name"].as_str().or(d["disk"].as_str()).unwrap();
            (
                n.rsplit('/').next().unwrap().to_string(),
                d["size"].as_u64().unwrap(),
            )
        })
        .collect();
    found.sort();
    assert_eq!(
        found,
        vec![
            ("data".to_string(), 192 * MIB),
            ("logs".to_string(), 64 * MIB),
            ("root".to_string(), 64 * MIB),
        ],
        "{disks:#}"
    );
    let drill = |d: &str| s.fra.nbd_url(&format!("web-drill/{d}"));
    qemu_io(&drill("logs"), "read -P 0x6c 1M 3M");
    qemu_io(&drill("logs"), "read -P 0 0 1M");
    qemu_io(&drill("data"), "read -P 0x23 160M 1M");
    qemu_io(&drill("data"), "read -P 0x22 0 4M");
    qemu_io(&drill("data"), "read -P 0 161M 31M");
    qemu_io(&drill("root"), "read -P 0x21 0 4M");
    // ... and is the same as ams's disks.
    for d in ["root", "data", "logs"] {
        let (ok, text) = qemu_img(&[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &s.ams.nbd_url(&format!("web/{d}")),
            &drill(d),
        ]);
        assert!(
            ok,
            "qemu-img compare web/{d} (ams) with fra's drill: {text}"
        );
    }

    let cleaned = at_fra.ok(&["pair", "drill-cleanup", &pair]);
    assert!(cleaned.contains("drill servers removed"), "{cleaned}");
    let servers = at_fra.json(&["server", "list", "--json"]);
    assert_eq!(servers, serde_json::json!([]), "{servers:#}");
    assert_eq!(at_fra.pair(&pair)["state"], "replicating");
}

#[test]
fn pair_delete_keeps_or_deletes_points_and_both_sides_forget() {
    let Some(s) = Sites::start() else {
        return;
    };
    let (at_ams, at_fra) = (&s.at_ams, &s.at_fra);
    s.web(&[("root", "64MiB")], None);
    qemu_io(&s.ams.nbd_url("web/root"), "write -P 0x5a 0 1M");
    let pair = s.create_pair(&NEVER_DURING_THE_TEST);
    at_ams.wait_state(&pair, "replicating", 60);
    at_fra.wait_state(&pair, "replicating", 60);
    let before = s.moto.keys("fra/points/");
    assert!(!before.is_empty(), "the pair's point is in the bucket");

    // The pair's policy is the pair's: policy commands are refused.
    let err = at_ams.fails(&["policy", "pause", &format!("pair-{pair}")], 1);
    assert!(err.contains("belongs to DR pair"), "{err}");
    // Without saying what happens to the points: nothing is done (exit 4).
    let err = at_ams.fails(&["pair", "delete", &pair], 4);
    assert!(err.contains("--keep-points"), "{err}");
    assert_eq!(at_ams.pair(&pair)["state"], "replicating");

    let out = at_ams.ok(&["pair", "delete", &pair, "--delete-points"]);
    assert!(
        out.contains("deleted") && out.contains("the standby forgot it"),
        "{out}"
    );
    let listed = at_ams.json(&["pair", "list", "--json"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "{listed}");
    let listed = at_fra.json(&["pair", "list", "--json"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "{listed}");
    let policies = at_ams.json(&["policy", "list", "--json"]);
    assert_eq!(policies.as_array().map(Vec::len), Some(0), "{policies}");
    let after = s.moto.keys("fra/points/");
    assert!(
        before.iter().all(|k| !after.contains(k)),
        "the pair's points are gone from S3: {after:?}"
    );
    let err = at_ams.fails(&["pair", "show", &pair], 1);
    assert!(err.contains("no DR pair"), "{err}");
}
