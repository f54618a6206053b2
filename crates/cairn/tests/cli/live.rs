//! Live disks through the real interface: `cairn serve-nbd` as a process, real NBD
//! clients (qemu-io, qemu-img, nbdinfo, nbdcopy), SIGKILL of the serving process.

use std::path::Path;
use std::process::{Child, Command};

use crate::common::{json, ok, p, run};

fn tool(name: &str) -> bool {
    let found = Command::new(name)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("CI").is_err(),
            "{name} is required in CI (.ci/run installs it)"
        );
        eprintln!("skipping: {name} is not installed");
    }
    found
}

struct Serve(Child);

impl Serve {
    fn start(pool: &Path, socket: &Path) -> Serve {
        let _ = std::fs::remove_file(socket);
        let mut child = crate::common::cairn()
            .args([
                "serve-nbd",
                p(pool),
                "--listen",
                "none",
                "--socket",
                p(socket),
            ])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        for _ in 0..200 {
            if socket.exists() && pool.join("control.sock").exists() {
                return Serve(child);
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("serve-nbd did not come up");
    }

    fn kill9(mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }

    fn stop(mut self) {
        let pid = self.0.id();
        Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(self.0.wait().unwrap().success());
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn url(socket: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", p(socket))
}

fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn operator_session_with_running_servers() {
    if !["qemu-io", "qemu-img", "nbdinfo", "nbdcopy"]
        .iter()
        .all(|t| tool(t))
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (space, pool, sock) = (d.join("space"), d.join("pool"), d.join("nbd.sock"));
    ok(&["space", "init", p(&space), "--chunk-size", "256KiB"]);
    ok(&["pool", "init", p(&pool), "--space", p(&space)]);
    ok(&["server", "create", p(&pool), "web"]);
    let image = d.join("root.img");
    let data = crate::common::make_image(&image, 32 << 20, 7);
    ok(&["disk", "import", p(&pool), "web/root", p(&image)]);
    ok(&["disk", "create", p(&pool), "web/data", "--size", "16MiB"]);
    ok(&["server", "start", p(&pool), "web"]);
    let serve = Serve::start(&pool, &sock);

    // The guest's view: exactly the imported image; writes go through.
    sh(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", p(&image)])
        .arg(url(&sock, "web/root")));
    sh(Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 1M 64k",
            "-c",
            "read -P 0x5a 1M 64k",
        ])
        .arg(url(&sock, "web/data")));
    let list = sh(Command::new("nbdinfo")
        .arg("--list")
        .arg(format!("nbd+unix://?socket={}", p(&sock))));
    assert!(
        list.contains("web/root") && list.contains("web/data"),
        "{list}"
    );

    let first = json(&["point", "create", p(&pool), "--server", "web", "--json"]);
    let id1 = first["record"]["id"].as_str().unwrap().to_string();
    sh(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x11 3M 4k"])
        .arg(url(&sock, "web/root")));
    let second = json(&["point", "create", p(&pool), "--server", "web", "--json"]);
    assert_eq!(second["tracked"][1][1], true, "{second}");
    assert_eq!(
        second["record"]["stats"]["bytes_read"],
        64 << 10,
        "only the changed 64 KiB grain of the changed chunk is read"
    );

    // Read-only exports of a point, straight from the space.
    let at = format!("web/root@{id1}");
    sh(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", p(&image)])
        .arg(url(&sock, &at)));
    let map = sh(Command::new("nbdinfo").arg("--map").arg(url(&sock, &at)));
    assert!(map.contains("hole"), "{map}");
    let copied = d.join("copied.img");
    sh(Command::new("nbdcopy").arg(url(&sock, &at)).arg(p(&copied)));
    assert_eq!(std::fs::read(&copied).unwrap(), data);
    let w = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 4k"])
        .arg(url(&sock, &at))
        .output()
        .unwrap();
    assert!(
        !w.status.success() || String::from_utf8_lossy(&w.stdout).contains("failed"),
        "a point export is read-only"
    );

    // Deleting a disk or rolling back a running server is refused.
    let r = run(&["disk", "delete", p(&pool), "web/data", "--yes"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("running"), "{}", r.stderr);
    let r = run(&[
        "point",
        "rollback",
        p(&pool),
        &id1,
        "--server",
        "web",
        "--yes",
    ]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("stop"), "{}", r.stderr);

    // SIGKILL: the changed-block map is not trusted afterwards; the point is still exact.
    sh(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x22 20M 4k"])
        .arg(url(&sock, "web/root")));
    serve.kill9();
    let serve = Serve::start(&pool, &sock);
    let third = json(&["point", "create", p(&pool), "--server", "web", "--json"]);
    assert_eq!(third["tracked"][1][1], false, "{third}");
    // Everything allocated is read again (holes never are).
    assert!(
        third["record"]["stats"]["bytes_read"].as_u64().unwrap() > 4 << 20,
        "{third}"
    );
    let id3 = third["record"]["id"].as_str().unwrap().to_string();
    let live = d.join("live.img");
    sh(Command::new("nbdcopy")
        .arg(url(&sock, "web/root"))
        .arg(p(&live)));
    let restored = d.join("restored.img");
    ok(&[
        "point",
        "restore",
        p(&space),
        &id3,
        p(&restored),
        "--disk",
        "root",
    ]);
    assert_eq!(
        std::fs::read(&restored).unwrap(),
        std::fs::read(&live).unwrap()
    );

    // A clone of the first point: served at once, pinned until hydrated.
    ok(&["server", "create", p(&pool), "copy"]);
    ok(&[
        "disk",
        "clone",
        p(&pool),
        &id1,
        "copy/root",
        "--from-disk",
        "root",
    ]);
    let r = run(&["point", "delete", p(&space), &id1]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("copy/root"), "{}", r.stderr);
    // Started, it is served at once (and hydrates in the background).
    ok(&["server", "start", p(&pool), "copy"]);
    sh(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", p(&image)])
        .arg(url(&sock, "copy/root")));
    ok(&["disk", "hydrate", p(&pool), "copy/root"]);
    let disks = json(&["disk", "list", p(&pool), "copy", "--json"]);
    assert!(disks[0]["clone_of"].is_null(), "{disks}");

    // Rollback of the stopped server to the first point, through the map.
    ok(&["server", "stop", p(&pool), "web"]);
    let r = run(&[
        "point",
        "rollback",
        p(&pool),
        &id1,
        "--server",
        "web",
        "--disk",
        "root",
    ]);
    assert_eq!(r.code, 4, "{}", r.stdout);
    ok(&[
        "point",
        "rollback",
        p(&pool),
        &id1,
        "--server",
        "web",
        "--disk",
        "root",
        "--yes",
    ]);
    let exported = d.join("exported.img");
    ok(&["disk", "export", p(&pool), "web/root", p(&exported)]);
    assert_eq!(std::fs::read(&exported).unwrap(), data);
    let q = d.join("exported.qcow2");
    ok(&[
        "disk",
        "export",
        p(&pool),
        "web/root",
        p(&q),
        "--format",
        "qcow2",
    ]);
    ok(&["disk", "import", p(&pool), "web/fromq", p(&q)]);
    assert_eq!(
        std::fs::read(pool.join("servers/web/disks/fromq.raw")).unwrap(),
        data
    );
    serve.stop();
    // Stopped cleanly: the map is valid again.
    let list = json(&["disk", "list", p(&pool), "copy", "--json"]);
    assert!(list[0]["change_base"].is_string(), "{list}");
}

#[test]
fn pool_commands_refuse_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (space, pool) = (d.join("space"), d.join("pool"));
    let r = run(&["pool", "init", p(&pool), "--space", p(&space)]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("cairn space init"), "{}", r.stderr);
    ok(&["space", "init", p(&space)]);
    ok(&["pool", "init", p(&pool), "--space", p(&space)]);
    let r = run(&["pool", "init", p(&pool), "--space", p(&space)]);
    assert!(r.stderr.contains("already exists"), "{}", r.stderr);
    let r = run(&["disk", "create", p(&pool), "web/root", "--size", "1GiB"]);
    assert!(r.stderr.contains("cairn server create"), "{}", r.stderr);
    ok(&["server", "create", p(&pool), "web"]);
    for bad in ["../root", "web/../x", "web", "web/.x"] {
        let r = run(&["disk", "create", p(&pool), bad, "--size", "1MiB"]);
        assert_eq!(r.code, 1, "{bad}");
    }
    let r = run(&["disk", "create", p(&pool), "web/root", "--size", "1000B"]);
    assert!(r.stderr.contains("multiple of 512"), "{}", r.stderr);
    let r = run(&["point", "create", p(&pool), "--server", "web"]);
    assert!(r.stderr.contains("no disks"), "{}", r.stderr);
    let r = run(&[
        "disk",
        "import",
        p(&pool),
        "web/x",
        p(&d.join("missing.img")),
    ]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("missing.img"), "{}", r.stderr);
    let r = run(&["disk", "clone", p(&pool), "latest", "web/c"]);
    assert!(r.stderr.contains("no recovery points"), "{}", r.stderr);
    let r = run(&["server", "start", p(&pool), "nosuch"]);
    assert!(r.stderr.contains("nosuch"), "{}", r.stderr);
}

/// A hydration killed with SIGKILL resumes and leaves the clone exact.
#[test]
fn killed_hydration_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (space, pool) = (d.join("space"), d.join("pool"));
    ok(&["space", "init", p(&space), "--chunk-size", "64KiB"]);
    ok(&["pool", "init", p(&pool), "--space", p(&space)]);
    ok(&["server", "create", p(&pool), "web"]);
    let image = d.join("root.img");
    let data = crate::common::noise(11, 96 << 20);
    std::fs::write(&image, &data).unwrap();
    ok(&["disk", "import", p(&pool), "web/root", p(&image)]);
    let point = json(&["point", "create", p(&pool), "--server", "web", "--json"]);
    let id = point["record"]["id"].as_str().unwrap().to_string();
    ok(&["server", "create", p(&pool), "copy"]);
    ok(&["disk", "clone", p(&pool), &id, "copy/root"]);
    for delay in [30u64, 80, 150] {
        let mut h = crate::common::cairn()
            .args(["disk", "hydrate", p(&pool), "copy/root", "--quiet"])
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay));
        let _ = h.kill();
        h.wait().unwrap();
    }
    ok(&["disk", "hydrate", p(&pool), "copy/root"]);
    let out = d.join("copy.img");
    ok(&["disk", "export", p(&pool), "copy/root", p(&out)]);
    assert_eq!(std::fs::read(&out).unwrap(), data);
    ok(&["point", "delete", p(&space), &id]);
}
