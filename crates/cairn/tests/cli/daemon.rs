//! The CLI as a client of the location daemon: the real `cairn serve` process on free
//! ports, the operator session of the README run as written (CAIRN_URL, CAIRN_TOKEN),
//! real qemu-io over NBD, and bad input with its messages and exit codes.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{Run, p};

/// A port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET /healthz` answered 200.
fn healthy(addr: &str) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: cairn\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.1 200")
}

struct Daemon {
    child: Child,
    url: String,
    nbd: String,
    log: std::path::PathBuf,
}

impl Daemon {
    fn start(data: &Path) -> Daemon {
        let (api, nbd) = (
            format!("127.0.0.1:{}", free_port()),
            format!("127.0.0.1:{}", free_port()),
        );
        let log = data.with_extension("log");
        let mut child = crate::common::cairn()
            .args([
                "serve",
                "--data-dir",
                p(data),
                "--listen",
                &api,
                "--nbd-listen",
                &nbd,
            ])
            .env_remove("CAIRN_URL")
            .env_remove("CAIRN_TOKEN")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until {
            if healthy(&api) {
                return Daemon {
                    child,
                    url: format!("http://{api}"),
                    nbd,
                    log,
                };
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "cairn serve exited ({status}): {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "cairn serve did not answer /healthz: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    fn stop(mut self) {
        Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        let status = self.child.wait().unwrap();
        assert!(
            status.success(),
            "cairn serve stopped with {status}: {}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The operator's shell: `cairn` with CAIRN_URL and CAIRN_TOKEN exported.
struct Shell {
    env: Vec<(&'static str, String)>,
}

impl Shell {
    fn run(&self, args: &[&str]) -> Run {
        let mut c = crate::common::cairn();
        c.env_remove("CAIRN_URL").env_remove("CAIRN_TOKEN");
        for (k, v) in &self.env {
            c.env(k, v);
        }
        let out = c.args(args).output().expect("cairn runs");
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn ok(&self, args: &[&str]) -> String {
        let r = self.run(args);
        assert_eq!(
            r.code, 0,
            "cairn {args:?} failed:\n{}\n{}",
            r.stdout, r.stderr
        );
        r.stdout
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.ok(args);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("cairn {args:?}: not JSON ({e}): {out}"))
    }
}

fn qemu_io_found() -> bool {
    let found = Command::new("qemu-io")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "qemu-io is required in CI (.ci/run installs it)"
        );
        eprintln!("skipping: qemu-io is not installed");
    }
    found
}

/// `qemu-io -f raw -c CMD URL`, which must succeed (pattern checks included).
fn qemu_io(cmd: &str, url: &str) {
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", cmd, url])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !stdout.contains("failed") && !stdout.contains("error"),
        "qemu-io -c {cmd:?} {url}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn operator_session_through_the_daemon() {
    if !qemu_io_found() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("D");
    let daemon = Daemon::start(&data);

    // export CAIRN_TOKEN=$(cairn token create ops --role admin --data-dir D)
    let out = crate::common::ok(&[
        "token",
        "create",
        "ops",
        "--role",
        "admin",
        "--data-dir",
        p(&data),
    ]);
    let token = out.trim().to_string();
    assert!(
        !token.is_empty() && out.lines().count() == 1 && !token.contains(' '),
        "token create prints only the token: {out:?}"
    );
    let sh = Shell {
        env: vec![
            ("CAIRN_URL", daemon.url.clone()),
            ("CAIRN_TOKEN", token.clone()),
        ],
    };
    let nbd = |export: &str| format!("nbd://{}/{export}", daemon.nbd);

    sh.ok(&["server", "create", "web"]);
    sh.ok(&["disk", "create", "web/root", "--size", "1GiB"]);
    let started = sh.ok(&["server", "start", "web"]);
    assert!(started.contains(&nbd("web/root")), "{started}");
    qemu_io("write -P 0xab 0 1M", &nbd("web/root"));

    sh.ok(&[
        "policy",
        "create",
        "nightly",
        "--scope",
        "web",
        "--schedule",
        "0 2 * * *",
        "--keep-last",
        "7",
    ]);
    let shown = sh.json(&["policy", "show", "nightly", "--json"]);
    assert_eq!(shown["retention"]["keep_last"], 7, "{shown}");
    assert_eq!(shown["schedule"]["cron"], "0 2 * * *", "{shown}");
    let listed = sh.ok(&["policy", "list"]);
    assert!(listed.contains("nightly"), "{listed}");

    let done = sh.ok(&["policy", "replicate-now", "nightly", "--wait"]);
    assert!(done.contains("succeeded"), "{done}");

    let points = sh.json(&["point", "list", "--policy", "nightly", "--json"]);
    let points = points.as_array().unwrap();
    assert_eq!(points.len(), 1, "{points:?}");
    let point = points[0]["id"].as_str().unwrap().to_string();
    assert_eq!(points[0]["restorable"], true, "{points:?}");
    let table = sh.ok(&["point", "list", "--policy", "nightly"]);
    assert!(table.contains(&point), "{table}");
    let changed = sh.json(&[
        "point",
        "list",
        "--policy",
        "nightly",
        "--scope-changed",
        "--json",
    ]);
    for p in changed.as_array().unwrap() {
        assert_eq!(p["scope_changed"], true, "{changed}");
    }
    let shown = sh.ok(&["point", "show", &point]);
    assert!(shown.contains("succeeded"), "{shown}");

    // A clone is readable at once over NBD.
    sh.ok(&[
        "point",
        "clone",
        &point,
        "--disk",
        "web/root",
        "--to",
        "web-copy/root",
    ]);
    qemu_io("read -P 0xab 0 1M", &nbd("web-copy/root"));
    // (Background hydration may have finished already: then hydrate has nothing to do.)
    sh.ok(&["disk", "hydrate", "web-copy/root"]);
    let copy = sh.json(&["disk", "show", "web-copy/root", "--json"]);
    assert!(copy["clone_of"].is_null(), "{copy}");
    qemu_io("read -P 0xab 0 1M", &nbd("web-copy/root"));
    let servers = sh.json(&["server", "list", "--json"]);
    assert_eq!(servers.as_array().unwrap().len(), 2, "{servers}");
    let disks = sh.ok(&["disk", "list", "web-copy"]);
    assert!(
        disks.contains("web-copy/root") && !disks.contains("web/root"),
        "{disks}"
    );

    // Roll back the stopped server's disk: refused without --yes (exit 4), then done.
    qemu_io("write -P 0xcd 0 1M", &nbd("web/root"));
    sh.ok(&["server", "stop", "web"]);
    let r = sh.run(&["point", "rollback", &point, "--disk", "web/root"]);
    assert_eq!(r.code, 4, "{}{}", r.stdout, r.stderr);
    sh.ok(&["point", "rollback", &point, "--disk", "web/root", "--yes"]);
    sh.ok(&["server", "start", "web"]);
    qemu_io("read -P 0xab 0 1M", &nbd("web/root"));

    // Verify jobs, waited for.
    let v = sh.ok(&["point", "verify", &point, "--wait"]);
    assert!(v.contains("verify") && v.contains("succeeded"), "{v}");
    let v = sh.json(&["policy", "verify", "nightly", "--wait", "--json"]);
    assert_eq!(v["state"], "succeeded", "{v}");
    assert_eq!(v["kind"], "verify", "{v}");

    // Policy changes: only what is given changes; pause and resume.
    sh.ok(&["policy", "update", "nightly", "--keep-daily", "14"]);
    let shown = sh.json(&["policy", "show", "nightly", "--json"]);
    assert_eq!(shown["retention"]["keep_last"], 7, "{shown}");
    assert_eq!(shown["retention"]["keep_daily"], 14, "{shown}");
    sh.ok(&[
        "policy",
        "update",
        "nightly",
        "--timezone",
        "Europe/Amsterdam",
    ]);
    let shown = sh.json(&["policy", "show", "nightly", "--json"]);
    assert_eq!(shown["schedule"]["cron"], "0 2 * * *", "{shown}");
    assert_eq!(shown["schedule"]["timezone"], "Europe/Amsterdam", "{shown}");
    sh.ok(&["policy", "pause", "nightly"]);
    assert_eq!(
        sh.json(&["policy", "show", "nightly", "--json"])["status"],
        "paused"
    );
    sh.ok(&["policy", "resume", "nightly"]);
    sh.ok(&["policy", "update", "nightly", "--paused"]);
    assert_eq!(
        sh.json(&["policy", "show", "nightly", "--json"])["enabled"],
        false
    );
    sh.ok(&[
        "policy",
        "update",
        "nightly",
        "--enabled",
        "--description",
        "every night",
    ]);
    let shown = sh.json(&["policy", "show", "nightly", "--json"]);
    assert_eq!(shown["enabled"], true, "{shown}");
    assert_eq!(shown["description"], "every night", "{shown}");

    // Jobs.
    let jobs = sh.json(&["job", "list", "--policy", "nightly", "--json"]);
    let job = jobs[0]["id"].as_str().unwrap().to_string();
    let followed = sh.ok(&["job", "follow", &job]);
    assert!(followed.contains("succeeded"), "{followed}");
    assert!(sh.ok(&["job", "show", &job]).contains("nightly"));
    assert!(sh.ok(&["job", "list"]).contains(&job));

    // A second replicate-now while one runs answers "skipped" (exit 0). Enough new data
    // that the first job is still running when the second call comes.
    qemu_io("write -P 0x11 0 512M", &nbd("web/root"));
    let first = sh.json(&["policy", "replicate-now", "nightly", "--json"]);
    let first_id = first["job"]["id"].as_str().unwrap_or_default().to_string();
    let second = sh.run(&["policy", "replicate-now", "nightly"]);
    assert_eq!(second.code, 0, "{}", second.stderr);
    let state = sh.json(&["job", "show", &first_id, "--json"])["state"].clone();
    eprintln!(
        "second replicate-now while job {first_id} ran: {}",
        second.stdout.trim()
    );
    if second.stdout.contains("skipped") {
        assert!(
            second.stdout.starts_with("skipped: ") && second.stdout.contains(&first_id),
            "{}",
            second.stdout
        );
    } else {
        assert!(
            state == "succeeded",
            "the second call was not skipped although job {first_id} was {state}: {}",
            second.stdout
        );
    }
    sh.ok(&["job", "follow", &first_id, "-q"]);

    // A job that fails: `--wait` and `job follow` exit 1 with the job's error.
    sh.ok(&["server", "create", "empty"]);
    sh.ok(&[
        "policy", "create", "bad", "--scope", "empty", "--every", "1h",
    ]);
    let r = sh.run(&["policy", "replicate-now", "bad", "--wait"]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stderr.starts_with("error: job ") && r.stderr.contains("failed: "),
        "{}",
        r.stderr
    );
    let failed = sh.json(&[
        "job", "list", "--policy", "bad", "--state", "failed", "--json",
    ]);
    let failed = failed[0]["id"].as_str().unwrap().to_string();
    let r = sh.run(&["job", "follow", &failed]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    sh.ok(&["policy", "delete", "bad", "--delete-points"]);

    // Bad input.
    let r = sh.run(&["policy", "show", "nosuch"]);
    eprintln!("unknown policy: {}", r.stderr.trim());
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.starts_with("error: ") && r.stderr.contains("nosuch"),
        "{}",
        r.stderr
    );
    let r = sh.run(&["policy", "delete", "nightly"]);
    assert_eq!(r.code, 4);
    assert!(
        r.stderr.contains("--keep-points") && r.stderr.contains("--delete-points"),
        "{}",
        r.stderr
    );
    let bad = Shell {
        env: vec![
            ("CAIRN_URL", daemon.url.clone()),
            ("CAIRN_TOKEN", "not-a-token".into()),
        ],
    };
    let r = bad.run(&["policy", "list"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.starts_with("error: "), "{}", r.stderr);
    eprintln!("bad token: {}", r.stderr.trim());
    let anonymous = Shell {
        env: vec![("CAIRN_URL", daemon.url.clone())],
    };
    let r = anonymous.run(&["server", "list"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("CAIRN_TOKEN"), "{}", r.stderr);
    sh.ok(&["policy", "delete", "nightly", "--keep-points"]);
    let left = sh.json(&["point", "list", "--json"]);
    assert!(!left.as_array().unwrap().is_empty(), "points kept: {left}");

    daemon.stop();
}

/// What needs no daemon: a missing CAIRN_URL, a daemon that is not there, a policy
/// delete that does not say what happens to the points.
#[test]
fn client_errors_without_a_daemon() {
    let none = Shell { env: vec![] };
    for args in [
        &["server", "create", "web"][..],
        &["disk", "create", "web/root", "--size", "1GiB"],
        &["point", "list", "--policy", "nightly"],
        &["policy", "list"],
        &["job", "list"],
    ] {
        let r = none.run(args);
        assert_eq!(r.code, 1, "{args:?}");
        assert!(
            r.stderr.contains("set CAIRN_URL") && r.stderr.contains("pool or space path"),
            "{args:?}: {}",
            r.stderr
        );
    }
    let r = none.run(&["policy", "delete", "nightly"]);
    assert_eq!(r.code, 4);
    assert!(r.stderr.contains("--keep-points"), "{}", r.stderr);
    let r = none.run(&[
        "policy",
        "delete",
        "nightly",
        "--keep-points",
        "--delete-points",
    ]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    let r = none.run(&["policy", "create", "nightly", "--scope", "web"]);
    assert_eq!(r.code, 2, "a schedule is required: {}", r.stderr);
    let r = none.run(&[
        "policy", "create", "nightly", "--scope", "web", "--every", "soon",
    ]);
    assert_eq!(r.code, 2, "{}", r.stderr);

    let url = format!("http://127.0.0.1:{}", free_port());
    let gone = Shell {
        env: vec![("CAIRN_URL", url.clone()), ("CAIRN_TOKEN", "t".into())],
    };
    let r = gone.run(&["policy", "list"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains(&format!("cannot reach the Cairn daemon at {url}")),
        "{}",
        r.stderr
    );

    // The offline forms are chosen by their first argument, daemon or not.
    let dir = tempfile::tempdir().unwrap();
    let r = gone.run(&["point", "list", p(&dir.path().join("nowhere"))]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("no recovery space at"), "{}", r.stderr);
    let r = gone.run(&["point", "verify", p(dir.path()), "--wait"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    let r = gone.run(&["point", "list", p(dir.path()), "--policy", "x"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
}
