//! Bad input of every kind: a clear message naming the problem, a documented exit code,
//! and nothing committed lost.

use crate::common::*;

fn space_with_point(d: &std::path::Path) -> (std::path::PathBuf, String) {
    let space = d.join("space");
    let img = d.join("disk.img");
    make_image(&img, 1 << 20, 5);
    ok(&["space", "init", p(&space), "--chunk-size", "64KiB"]);
    let id = json(&["point", "create", p(&space), p(&img), "--json"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    (space, id)
}

#[test]
fn wrong_space_path() {
    let dir = tempfile::tempdir().unwrap();
    let r = run(&["point", "list", p(&dir.path().join("nowhere"))]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("no recovery space at") && r.stderr.contains("nowhere"),
        "{}",
        r.stderr
    );
    let r = run(&["point", "list", p(dir.path())]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("no recovery space at") && r.stderr.contains("cairn space init"),
        "{}",
        r.stderr
    );
}

#[test]
fn init_twice_and_bad_settings() {
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join("s");
    ok(&["space", "init", p(&s)]);
    let r = run(&["space", "init", p(&s)]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("a recovery space already exists"),
        "{}",
        r.stderr
    );
    let r = run(&[
        "space",
        "init",
        p(&dir.path().join("t")),
        "--chunk-size",
        "3MiB",
    ]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("chunk size 3145728 is not allowed"),
        "{}",
        r.stderr
    );
    let r = run(&[
        "space",
        "init",
        p(&dir.path().join("t")),
        "--chunk-size",
        "32MiB",
    ]);
    assert!(
        r.stderr.contains("power of two from 64 KiB to 16 MiB"),
        "{}",
        r.stderr
    );
    let r = run(&[
        "space",
        "init",
        p(&dir.path().join("t")),
        "--compression-level",
        "40",
    ]);
    assert!(r.stderr.contains("compression level 40"), "{}", r.stderr);
    let r = run(&["space", "init"]);
    assert_eq!(r.code, 2, "usage errors exit 2");
}

#[test]
fn absurd_durations_do_not_crash() {
    let dir = tempfile::tempdir().unwrap();
    let (space, _) = space_with_point(dir.path());
    ok(&["space", "gc", p(&space), "--grace", "400000years"]);
    ok(&[
        "space",
        "prune",
        p(&space),
        "--keep-within",
        "100000years",
        "--dry-run",
    ]);
    let r = run(&["space", "gc", p(&space), "--grace", "soon"]);
    assert_eq!(r.code, 2, "a bad duration is a usage error");
}

#[test]
fn unknown_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (space, _) = space_with_point(dir.path());
    let cfg = space.join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"version\": 1", "\"version\": 9");
    std::fs::write(&cfg, text).unwrap();
    let r = run(&["point", "list", p(&space)]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("format version 9; this cairn reads only version 1"),
        "{}",
        r.stderr
    );
}

#[test]
fn bad_images() {
    let dir = tempfile::tempdir().unwrap();
    let (space, _) = space_with_point(dir.path());
    let r = run(&[
        "point",
        "create",
        p(&space),
        p(&dir.path().join("missing.img")),
    ]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("cannot open image") && r.stderr.contains("missing.img"),
        "{}",
        r.stderr
    );
    let odd = dir.path().join("odd.img");
    std::fs::write(&odd, vec![1u8; 4097]).unwrap();
    let r = run(&["point", "create", p(&space), p(&odd)]);
    assert!(
        r.stderr
            .contains("4097 bytes, which is not a multiple of 512"),
        "{}",
        r.stderr
    );
    let unreadable = dir.path().join("dir.img");
    std::fs::create_dir(&unreadable).unwrap();
    let r = run(&["point", "create", p(&space), p(&unreadable)]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("dir.img"), "{}", r.stderr);
    let r = run(&["point", "create", p(&space), p(&odd), "--disk", "a/b"]);
    assert!(r.stderr.contains("disk name \"a/b\""), "{}", r.stderr);
    // Nothing was added, the committed point is intact.
    assert_eq!(
        json(&["point", "list", p(&space), "--json"])
            .as_array()
            .unwrap()
            .len(),
        1
    );
    ok(&["point", "verify", p(&space)]);
}

#[test]
fn bad_point_ids_and_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let (space, id) = space_with_point(dir.path());
    let r = run(&["point", "show", p(&space), "0000abcd"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("no recovery point 0000abcd"),
        "{}",
        r.stderr
    );
    let r = run(&[
        "point",
        "create",
        p(&space),
        p(&dir.path().join("disk.img")),
        "--parent",
        "zzzz",
    ]);
    assert!(r.stderr.contains("no recovery point zzzz"), "{}", r.stderr);
    let r = run(&[
        "point",
        "restore",
        p(&space),
        &id,
        p(&dir.path().join("o")),
        "--disk",
        "nope",
    ]);
    assert!(
        r.stderr.contains("has no disk \"nope\" (it has: disk)"),
        "{}",
        r.stderr
    );
    // Rollback onto an image of another size is refused, image untouched.
    let other = dir.path().join("other.img");
    std::fs::write(&other, vec![9u8; 2 << 20]).unwrap();
    let r = run(&["point", "rollback", p(&space), &id, p(&other), "--yes"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("is 2097152 bytes but disk \"disk\"")
            && r.stderr.contains("1048576 bytes"),
        "{}",
        r.stderr
    );
    assert_eq!(std::fs::read(&other).unwrap(), vec![9u8; 2 << 20]);
}

#[test]
fn damage_exits_3() {
    let dir = tempfile::tempdir().unwrap();
    let (space, id) = space_with_point(dir.path());
    // Flip a byte in every chunk file.
    for shard in std::fs::read_dir(space.join("chunks")).unwrap() {
        for f in std::fs::read_dir(shard.unwrap().path()).unwrap() {
            let f = f.unwrap().path();
            let mut b = std::fs::read(&f).unwrap();
            let last = b.len() - 1;
            b[last] ^= 1;
            std::fs::write(&f, b).unwrap();
        }
    }
    let r = run(&["point", "verify", p(&space)]);
    assert_eq!(r.code, 3);
    assert!(
        r.stdout.contains("DAMAGED chunk")
            && r.stdout.contains(&format!("point {id} disk disk bytes")),
        "{}",
        r.stdout
    );
    let target = dir.path().join("restored.img");
    let r = run(&["point", "restore", p(&space), &id, p(&target)]);
    assert_eq!(r.code, 3);
    assert!(r.stderr.contains("is damaged: "), "{}", r.stderr);
    assert!(!target.exists());

    // Repair: quarantine the damaged chunks; a new point of the same disk stores them
    // again, which heals the old point.
    let r = run(&["point", "verify", p(&space)]);
    assert!(r.stdout.contains("run again with --repair"), "{}", r.stdout);
    let r = run(&["point", "verify", p(&space), "--repair"]);
    assert_eq!(
        r.code, 3,
        "the damage is there until the chunks are stored again"
    );
    assert!(r.stdout.contains("quarantined"), "{}", r.stdout);
    let r = run(&["point", "restore", p(&space), &id, p(&target)]);
    assert_eq!(r.code, 3);
    assert!(
        r.stderr.contains("is missing from the space"),
        "{}",
        r.stderr
    );
    let img = dir.path().join("disk.img");
    ok(&["point", "create", p(&space), p(&img), "--parent", "latest"]);
    ok(&["point", "verify", p(&space)]);
    ok(&["point", "restore", p(&space), &id, p(&target)]);
    assert_eq!(
        std::fs::read(&target).unwrap(),
        std::fs::read(&img).unwrap()
    );
}

#[test]
fn full_disk_via_cli() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=3m", "tmpfs"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI must be able to mount a tmpfs"
        );
        eprintln!("skipped: cannot mount a tmpfs here");
        return;
    }
    let space = mnt.join("space");
    let small = dir.path().join("small.img");
    let big = dir.path().join("big.img");
    std::fs::write(&small, noise(1, 512 << 10)).unwrap();
    std::fs::write(&big, noise(2, 8 << 20)).unwrap();
    let outcome = std::panic::catch_unwind(|| {
        ok(&["space", "init", p(&space), "--chunk-size", "64KiB"]);
        let id = json(&["point", "create", p(&space), p(&small), "--json"])["id"]
            .as_str()
            .unwrap()
            .to_string();
        let r = run(&["point", "create", p(&space), p(&big)]);
        assert_eq!(r.code, 1);
        assert!(
            r.stderr
                .contains("recovery space storage is full (no space left on device)"),
            "{}",
            r.stderr
        );
        let list = json(&["point", "list", p(&space), "--json"]);
        assert_eq!(
            list.as_array().unwrap().len(),
            1,
            "the failed point is not visible"
        );
        // The failed point's chunks were staged, unsynced, and never published: its
        // process removed them when it failed, so nothing of it is left.
        let deferred = space.join(".deferred");
        let left = std::fs::read_dir(&deferred).map_or(0, |d| d.count());
        assert_eq!(left, 0, "staging left in {}", deferred.display());
        // Fill the store to the last byte: GC must still run (using the reserve to
        // write its lease) and find only the first point's chunks.
        let filler = mnt.join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![7u8; 4096];
        while std::io::Write::write_all(&mut f, &block).is_ok() {}
        drop(f);
        let gc = json(&["space", "gc", p(&space), "--grace", "0s", "--json"]);
        assert_eq!(gc["reserve_used"], true, "{gc}");
        assert_eq!(gc["chunks_seen"], gc["chunks_referenced"], "{gc}");
        std::fs::remove_file(&filler).unwrap();
        ok(&["point", "verify", p(&space)]);
        let out = dir.path().join("back.img");
        ok(&["point", "restore", p(&space), &id, p(&out)]);
        assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&small).unwrap());
    });
    let _ = std::process::Command::new("umount").arg(&mnt).status();
    outcome.unwrap();
}
