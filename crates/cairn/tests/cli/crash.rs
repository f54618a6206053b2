//! Crash safety: `point create`, `point delete` and `space gc` killed with SIGKILL at
//! many moments. Afterwards the space verifies clean, every committed point restores
//! to exactly what it captured, and the next run succeeds.

use std::collections::HashMap;
use std::time::Duration;

use crate::common::*;

fn ids(space: &std::path::Path) -> Vec<String> {
    json(&["point", "list", p(space), "--json"])
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_string())
        .collect()
}

fn kill_after(args: &[&str], delay: Duration) -> bool {
    let mut child = cairn()
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(delay);
    let finished = child.try_wait().unwrap().is_some();
    // SIGKILL (std's kill sends SIGKILL on Unix).
    let _ = child.kill();
    let _ = child.wait();
    !finished
}

#[test]
fn killed_create_delete_gc_leave_a_consistent_space() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let space = d.join("space");
    let img = d.join("disk.img");
    // 24 MiB of mostly incompressible data in 64 KiB chunks: a create takes a while.
    let mut data = noise(42, 24 << 20);
    std::fs::write(&img, &data).unwrap();
    ok(&["space", "init", p(&space), "--chunk-size", "64KiB"]);
    let mut expected: HashMap<String, Vec<u8>> = HashMap::new();
    let first = json(&["point", "create", p(&space), p(&img), "--json"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    expected.insert(first, data.clone());

    let mut killed = 0;
    for round in 0u64..18 {
        // New content for this round (some chunks changed, so there is work to do).
        let fresh = noise(1000 + round, 6 << 20);
        let at = usize::try_from(((round * 3) << 20) % (18 << 20)).unwrap();
        data[at..at + fresh.len()].copy_from_slice(&fresh);
        std::fs::write(&img, &data).unwrap();
        let delay = Duration::from_millis(5 + (round * 37) % 200);
        let before = ids(&space);
        let parent = if round % 2 == 0 { "latest" } else { "none" };
        let mut args = vec!["point", "create", p(&space), p(&img)];
        if parent == "latest" {
            args.extend(["--parent", "latest"]);
        }
        killed += usize::from(kill_after(&args, delay));
        for id in ids(&space) {
            if !before.contains(&id) {
                expected.insert(id, data.clone());
            }
        }
        match round % 3 {
            // Kill a delete of the oldest point.
            0 if expected.len() > 2 => {
                let oldest = ids(&space)[0].clone();
                kill_after(
                    &["point", "delete", p(&space), &oldest],
                    Duration::from_millis(round % 7),
                );
                if !ids(&space).contains(&oldest) {
                    expected.remove(&oldest);
                }
            }
            // Kill a GC with no grace period.
            1 => {
                kill_after(
                    &["space", "gc", p(&space), "--grace", "0s"],
                    Duration::from_millis(3 + round * 11 % 60),
                );
            }
            _ => {}
        }
        // The space is consistent after every kill.
        ok(&["point", "verify", p(&space), "-q"]);
    }
    assert!(
        killed > 0,
        "no run was actually interrupted; the test proves nothing"
    );

    // Every committed point restores exactly; the next runs succeed.
    assert_eq!(ids(&space).len(), expected.len());
    for (id, content) in &expected {
        let out = d.join(format!("r-{id}.img"));
        ok(&["point", "restore", p(&space), id, p(&out)]);
        assert!(
            std::fs::read(&out).unwrap() == *content,
            "point {id} restores wrong"
        );
        std::fs::remove_file(&out).unwrap();
    }
    ok(&["point", "create", p(&space), p(&img), "--parent", "latest"]);
    ok(&["space", "gc", p(&space), "--grace", "0s"]);
    ok(&["point", "verify", p(&space)]);
    // Killed writers' leases block no one and are gone; their staging files are removed
    // once ten minutes old (backdated here).
    let leftovers = |ext: &str| -> Vec<std::path::PathBuf> {
        let mut v = Vec::new();
        let mut stack = vec![space.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let e = e.unwrap().path();
                if e.is_dir() {
                    stack.push(e)
                } else if e.to_string_lossy().contains(ext) {
                    v.push(e)
                }
            }
        }
        v
    };
    assert!(
        std::fs::read_dir(space.join("locks")).unwrap().all(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains('#'))
    );
    let staged = leftovers("#");
    for f in &staged {
        let s = std::process::Command::new("touch")
            .args(["-d", "20 minutes ago"])
            .arg(f)
            .status()
            .unwrap();
        assert!(s.success());
    }
    let gc = json(&["space", "gc", p(&space), "--grace", "0s", "--json"]);
    assert_eq!(
        gc["incomplete_removed"].as_u64().unwrap(),
        staged.len() as u64
    );
    assert!(leftovers("#").is_empty());
    ok(&["point", "verify", p(&space)]);
}
