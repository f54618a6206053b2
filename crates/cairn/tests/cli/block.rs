//! Block devices as sources and targets (loop devices, where they can be made).

use std::path::{Path, PathBuf};

use crate::common::*;

/// A loop device over `file`, detached on drop.
struct Loop(PathBuf);

impl Loop {
    fn attach(file: &Path) -> Option<Loop> {
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| Loop(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn block_devices_as_source_and_target() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src_file = d.join("src.img");
    let content = make_image(&src_file, 6 << 20, 21);
    let dst_file = d.join("dst.img");
    std::fs::write(&dst_file, noise(22, 6 << 20)).unwrap();
    let (Some(src), Some(dst)) = (Loop::attach(&src_file), Loop::attach(&dst_file)) else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI must be able to attach loop devices"
        );
        eprintln!("skipped: no loop devices here");
        return;
    };
    let space = d.join("space");
    ok(&["space", "init", p(&space), "--chunk-size", "64KiB"]);
    let point = json(&[
        "point",
        "create",
        p(&space),
        p(&src.0),
        "--disk",
        "root",
        "--json",
    ]);
    assert_eq!(point["disks"][0]["size"], 6 << 20);
    let id = point["id"].as_str().unwrap().to_string();

    // Restoring onto an existing device needs --force; zero chunks are written as zeros.
    let r = run(&["point", "restore", p(&space), &id, p(&dst.0)]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("exists; pass --force"), "{}", r.stderr);
    ok(&["point", "restore", p(&space), &id, p(&dst.0), "--force"]);
    assert_eq!(std::fs::read(&dst.0).unwrap(), content);

    // Rollback of a device: only the differing chunks are rewritten.
    let dev = std::fs::OpenOptions::new()
        .write(true)
        .open(&dst.0)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&dev, &[0xee; 100], 3 << 20).unwrap();
    dev.sync_all().unwrap();
    drop(dev);
    let rb = json(&[
        "point",
        "rollback",
        p(&space),
        &id,
        p(&dst.0),
        "--yes",
        "--json",
    ]);
    assert_eq!(rb["report"]["chunks_rewritten"], 1);
    assert_eq!(std::fs::read(&dst.0).unwrap(), content);
    ok(&["point", "verify", p(&space)]);
}
