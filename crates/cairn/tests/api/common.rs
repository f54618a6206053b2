//! A real `cairn serve` process on free loopback ports, its tokens, and an HTTP client.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub fn cairn() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cairn"));
    for (k, _) in std::env::vars() {
        if k.starts_with("CAIRN_") {
            c.env_remove(k);
        }
    }
    c
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Daemon {
    pub tmp: tempfile::TempDir,
    pub data: PathBuf,
    child: Option<Child>,
    pub url: String,
    /// `127.0.0.1:PORT` of the NBD listener.
    pub nbd: String,
    pub log: PathBuf,
    extra: Vec<String>,
    starts: u32,
}

impl Daemon {
    /// Starts a daemon on a new data directory.
    pub async fn start(extra: &[&str]) -> Daemon {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("d");
        let mut d = Daemon {
            data,
            log: tmp.path().join("serve.log"),
            tmp,
            child: None,
            url: String::new(),
            nbd: String::new(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            starts: 0,
        };
        d.spawn().await;
        d
    }

    /// Starts the daemon (again) on the same data directory, on new ports.
    pub async fn spawn(&mut self) {
        assert!(self.child.is_none(), "the daemon is running");
        let (api, nbd) = (
            format!("127.0.0.1:{}", free_port()),
            format!("127.0.0.1:{}", free_port()),
        );
        self.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = cairn()
            .args(["serve", "--data-dir"])
            .arg(&self.data)
            .args(["--listen", &api, "--nbd-listen", &nbd])
            .args(&self.extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.url = format!("http://{api}");
        self.nbd = nbd;
        let http = reqwest::Client::new();
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = http.get(format!("{}/healthz", self.url)).send().await
                && r.status() == 200
            {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("cairn serve exited ({status}): {}", self.log_text());
            }
            assert!(
                Instant::now() < until,
                "cairn serve did not answer /healthz within 60 s: {}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL, and waits for the process to be gone.
    pub fn kill9(&mut self) {
        let mut c = self.child.take().expect("running");
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// SIGTERM, and waits (at most 60 s) for the process to exit; returns its status.
    pub async fn sigterm(&mut self) -> std::process::ExitStatus {
        let ok = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        self.wait_exit().await
    }

    /// Waits (at most 60 s) for the process to exit (after a signal); returns its status.
    pub async fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > until {
                let _ = c.kill();
                panic!("cairn serve did not exit within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `cairn token create NAME --role ROLE --data-dir D`: the token.
    pub fn token(&self, name: &str, role: &str) -> String {
        let out = cairn()
            .args(["token", "create", name, "--role", role, "--data-dir"])
            .arg(&self.data)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "token create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let t = String::from_utf8(out.stdout).unwrap().trim().to_string();
        assert!(!t.contains(char::is_whitespace), "only the token: {t:?}");
        t
    }

    pub fn revoke(&self, name: &str) {
        let out = cairn()
            .args(["token", "revoke", name, "--data-dir"])
            .arg(&self.data)
            .output()
            .unwrap();
        assert!(out.status.success());
    }

    pub fn client(&self, token: &str) -> Api {
        Api {
            base: self.url.clone(),
            token: Some(token.to_string()),
            http: reqwest::Client::new(),
        }
    }

    /// A client with a new token of that role.
    pub fn as_role(&self, name: &str, role: &str) -> Api {
        self.client(&self.token(name, role))
    }

    pub fn anonymous(&self) -> Api {
        Api {
            base: self.url.clone(),
            token: None,
            http: reqwest::Client::new(),
        }
    }

    pub fn space(&self) -> PathBuf {
        self.data.join("space")
    }

    /// The recovery space's point records, read from the folder (not through the daemon).
    pub fn space_points(&self) -> Vec<Value> {
        space_points(&self.space())
    }

    /// The space's points whose trigger names job `job`.
    pub fn space_points_of(&self, job: &str) -> Vec<Value> {
        self.space_points()
            .into_iter()
            .filter(|p| {
                p["trigger"]
                    .as_str()
                    .unwrap_or("")
                    .ends_with(&format!("job {job}"))
            })
            .collect()
    }

    /// A file a gate hook waits for (see [`gate_hook`]).
    pub fn gate(&self, name: &str) -> PathBuf {
        self.tmp.path().join(format!("gate-{name}"))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn space_points(space: &Path) -> Vec<Value> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(space.join("points")) else {
        return out;
    };
    for e in dir {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "json")
            && let Ok(text) = std::fs::read_to_string(&p)
            && let Ok(v) = serde_json::from_str::<Value>(&text)
        {
            out.push(v);
        }
    }
    out
}

/// A pre-hook that holds a point (of its server) until `gate` exists: a job that runs
/// as long as the test wants, without sleeping for a guessed time.
pub fn gate_hook(gate: &Path) -> String {
    format!("while [ ! -e '{}' ]; do sleep 0.05; done", gate.display())
}

pub fn open_gate(gate: &Path) {
    std::fs::write(gate, b"go").unwrap();
}

pub struct Api {
    pub base: String,
    pub token: Option<String>,
    pub http: reqwest::Client,
}

pub const MIB: u64 = 1 << 20;

impl Api {
    pub fn with_token(&self, token: &str) -> Api {
        Api {
            base: self.base.clone(),
            token: Some(token.to_string()),
            http: self.http.clone(),
        }
    }

    pub async fn raw(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
        content_type: Option<&str>,
    ) -> (u16, String) {
        let mut rq = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            rq = rq.bearer_auth(t);
        }
        if let Some(ct) = content_type {
            rq = rq.header("content-type", ct);
        }
        if let Some(b) = body {
            rq = rq.body(b);
        }
        let r = rq.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.text().await.unwrap())
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let (status, text) = self
            .raw(
                method.clone(),
                path,
                body.map(|b| serde_json::to_vec(&b).unwrap()),
                Some("application/json"),
            )
            .await;
        let v = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| {
                panic!("{method} {path}: answer ({status}) is not JSON ({e}): {text}")
            })
        };
        (status, v)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }
    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }
    pub async fn patch(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::PATCH, path, Some(body)).await
    }
    pub async fn delete(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::DELETE, path, None).await
    }

    /// GET that must answer 200.
    pub async fn ok(&self, path: &str) -> Value {
        let (s, v) = self.get(path).await;
        assert_eq!(s, 200, "GET {path}: {v}");
        v
    }

    /// POST that must answer 2xx.
    pub async fn must(&self, path: &str, body: Value) -> Value {
        let (s, v) = self.post(path, body).await;
        assert!((200..300).contains(&s), "POST {path}: {s} {v}");
        v
    }

    pub async fn server(&self, name: &str, pre_hook: Option<&str>) {
        let mut b = json!({"name": name});
        if let Some(h) = pre_hook {
            b["pre_hook"] = json!(h);
        }
        let (s, v) = self.post("/api/v1/servers", b).await;
        assert_eq!(s, 201, "{v}");
    }

    pub async fn disk(&self, disk: &str, size: u64) {
        let (s, v) = self
            .post("/api/v1/disks", json!({"disk": disk, "size": size}))
            .await;
        assert_eq!(s, 201, "{v}");
    }

    pub async fn policy(&self, name: &str, scope: &[&str], schedule: Value) -> Value {
        let (s, v) = self
            .post(
                "/api/v1/policies",
                json!({"name": name, "scope": scope, "schedule": schedule}),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        v
    }

    /// Replicate now: the outcome (`{"job", "skipped", "message"}`).
    pub async fn replicate(&self, policy: &str) -> Value {
        let (s, v) = self
            .post(
                &format!("/api/v1/policies/{policy}/replicate-now"),
                json!({}),
            )
            .await;
        assert_eq!(s, 202, "{v}");
        v
    }

    /// Polls a job until `pred` holds (at most `secs` seconds).
    pub async fn wait_job_until(
        &self,
        id: &str,
        secs: u64,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let until = Instant::now() + Duration::from_secs(secs);
        loop {
            let j = self.ok(&format!("/api/v1/jobs/{id}")).await;
            if pred(&j) {
                return j;
            }
            assert!(Instant::now() < until, "job {id} still: {j}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls a job until it has ended.
    pub async fn wait_job(&self, id: &str) -> Value {
        self.wait_job_until(id, 120, |j| {
            matches!(
                j["state"].as_str(),
                Some("succeeded" | "failed" | "skipped")
            )
        })
        .await
    }

    /// Replicate now and wait: the ended job.
    pub async fn replicate_wait(&self, policy: &str) -> Value {
        let out = self.replicate(policy).await;
        assert_eq!(out["skipped"], false, "{out}");
        self.wait_job(out["job"]["id"].as_str().unwrap()).await
    }

    pub async fn policy_status(&self, policy: &str) -> String {
        self.ok(&format!("/api/v1/policies/{policy}")).await["status"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

/// Asserts an error answer: status, and `{"error": {"code", "message"}}` with that code.
#[track_caller]
pub fn assert_error(got: &(u16, Value), status: u16, code: &str) {
    let (s, v) = got;
    assert_eq!(*s, status, "{v}");
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
}

/// Whether qemu-io is there; without it (and not in CI) the test that needs it skips.
pub fn have_qemu_io() -> bool {
    let ok = Command::new("qemu-io")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "qemu-io is missing, and CI=true: install qemu-utils"
        );
        eprintln!("skipped: qemu-io is not installed");
    }
    ok
}

/// `qemu-io -f raw -c CMD nbd://ADDR/EXPORT`: success, and its output.
pub fn qemu_io(nbd: &str, export: &str, cmd: &str) -> (bool, String) {
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", cmd, &format!("nbd://{nbd}/{export}")])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // qemu-io exits 0 even when a read -P finds other bytes; it says so.
    let ok = out.status.success()
        && !text.contains("Pattern verification failed")
        && !text.contains("failed");
    (ok, text)
}

/// Writes `len` bytes of `byte` at `offset` into a stopped server's disk file (a disk's
/// first point reads the whole file, so this is what the point holds).
pub fn fill_disk_file(data: &Path, server: &str, disk: &str, offset: u64, len: u64, byte: u8) {
    use std::io::{Seek, SeekFrom, Write};
    let p = data
        .join("pool/servers")
        .join(server)
        .join("disks")
        .join(format!("{disk}.raw"));
    let mut f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&vec![byte; usize::try_from(len).unwrap()])
        .unwrap();
    f.sync_all().unwrap();
}
