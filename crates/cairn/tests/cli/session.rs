//! An operator's session, command by command, as README.md shows it.

use crate::common::*;

#[test]
fn operator_session() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let space = d.join("space");
    let root = d.join("root.img");
    let data_img = d.join("data.img");
    let root0 = make_image(&root, 8 << 20, 1);
    make_image(&data_img, 4 << 20, 2);

    let out = ok(&["space", "init", p(&space), "--chunk-size", "256KiB"]);
    assert!(out.contains("created recovery space"), "{out}");
    let info = json(&["space", "info", p(&space), "--json"]);
    assert_eq!(info["config"]["chunk_size"], 256 * 1024);
    assert_eq!(info["config"]["version"], 1);

    // A point of a server's two disks, named by file name.
    let p1 = json(&[
        "point",
        "create",
        p(&space),
        p(&root),
        p(&data_img),
        "--server",
        "web",
        "--operator",
        "alice",
        "--json",
    ]);
    assert_eq!(p1["disks"][0]["name"], "root");
    assert_eq!(p1["disks"][1]["name"], "data");
    assert_eq!(p1["operator"], "alice");
    assert_eq!(p1["server"], "web");
    let id1 = p1["id"].as_str().unwrap().to_string();

    // Change a little and take an incremental point.
    let mut changed = root0.clone();
    changed[100] ^= 0xff;
    changed[5 << 20] = 7;
    std::fs::write(&root, &changed).unwrap();
    let p2 = json(&[
        "point",
        "create",
        p(&space),
        p(&root),
        p(&data_img),
        "--server",
        "web",
        "--parent",
        "latest",
        "--json",
    ]);
    assert_eq!(p2["parent"], id1.as_str());
    assert_eq!(p2["stats"]["chunks_new"], 2, "{p2}");
    let id2 = p2["id"].as_str().unwrap().to_string();

    let list = json(&["point", "list", p(&space), "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 2);
    let table = ok(&["point", "list", p(&space)]);
    assert!(
        table.contains(&id1) && table.contains(&id2) && table.contains("root,data"),
        "{table}"
    );
    let show = ok(&["point", "show", p(&space), &id1[..30]]);
    assert!(
        show.contains("operator        alice") && show.contains("parent          none (full)"),
        "{show}"
    );
    assert_eq!(
        json(&["point", "show", p(&space), "latest", "--json"])["id"],
        id2.as_str()
    );

    // Restore: a point of two disks needs --disk.
    let out_img = d.join("out.img");
    let r = run(&["point", "restore", p(&space), &id1, p(&out_img)]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("has 2 disks (root, data); choose one with --disk"),
        "{}",
        r.stderr
    );
    ok(&[
        "point",
        "restore",
        p(&space),
        &id1,
        p(&out_img),
        "--disk",
        "root",
    ]);
    assert_eq!(std::fs::read(&out_img).unwrap(), root0);
    // Holes: the restored file is sparse.
    use std::os::unix::fs::MetadataExt;
    let blocks = std::fs::metadata(&out_img).unwrap().blocks() * 512;
    assert!(
        blocks < (8 << 20) / 2,
        "restored file is not sparse: {blocks} bytes allocated"
    );
    let r = run(&[
        "point",
        "restore",
        p(&space),
        &id1,
        p(&out_img),
        "--disk",
        "root",
    ]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("exists; pass --force"), "{}", r.stderr);
    ok(&[
        "point",
        "restore",
        p(&space),
        &id2,
        p(&out_img),
        "--disk",
        "root",
        "--force",
    ]);
    assert_eq!(std::fs::read(&out_img).unwrap(), changed);

    // Rollback: without --yes it explains and changes nothing (exit 4).
    let r = run(&[
        "point",
        "rollback",
        p(&space),
        &id1,
        p(&root),
        "--disk",
        "root",
    ]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(
        r.stdout
            .contains("would rewrite 2 of 32 chunks (512.0 KiB of 8.0 MiB)"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("Nothing was changed"));
    assert_eq!(std::fs::read(&root).unwrap(), changed);
    let rb = json(&[
        "point",
        "rollback",
        p(&space),
        &id1,
        p(&root),
        "--disk",
        "root",
        "--yes",
        "--json",
    ]);
    assert_eq!(rb["report"]["bytes_rewritten"], 2 * 256 * 1024);
    assert_eq!(std::fs::read(&root).unwrap(), root0);

    // Verify: clean.
    let v = json(&["point", "verify", p(&space), "--json"]);
    assert_eq!(v["damage"].as_array().unwrap().len(), 0);
    assert_eq!(v["points"], 2);

    // Retention: keep the last one (dry run first), then delete and collect.
    let plan = json(&[
        "space",
        "prune",
        p(&space),
        "--keep-last",
        "1",
        "--dry-run",
        "--json",
    ]);
    assert_eq!(plan["plan"]["remove"].as_array().unwrap().len(), 1);
    assert_eq!(
        json(&["point", "list", p(&space), "--json"])
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let r = run(&["space", "prune", p(&space)]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("no --keep option given"), "{}", r.stderr);
    let out = ok(&[
        "space",
        "prune",
        p(&space),
        "--keep-last",
        "1",
        "--grace",
        "0s",
    ]);
    assert!(out.contains("retention plan: keep 1, remove 1"), "{out}");
    assert!(out.contains("gc:"), "{out}");
    let left = json(&["point", "list", p(&space), "--json"]);
    assert_eq!(left.as_array().unwrap().len(), 1);
    assert_eq!(left[0]["id"], id2.as_str());
    ok(&[
        "point",
        "restore",
        p(&space),
        &id2,
        p(&out_img),
        "--disk",
        "root",
        "--force",
    ]);
    assert_eq!(std::fs::read(&out_img).unwrap(), changed);

    // Delete the last one; gc frees everything.
    ok(&["point", "delete", p(&space), &id2]);
    let gc = json(&["space", "gc", p(&space), "--grace", "0s", "--json"]);
    assert!(gc["chunks_deleted"].as_u64().unwrap() > 0);
    assert_eq!(
        json(&["space", "gc", p(&space), "--grace", "0s", "--json"])["chunks_seen"],
        0
    );
}

#[test]
fn pipes_get_no_progress_bar_and_json_is_stable() {
    let dir = tempfile::tempdir().unwrap();
    let space = dir.path().join("s");
    let img = dir.path().join("disk.img");
    make_image(&img, 1 << 20, 3);
    ok(&["space", "init", p(&space), "--chunk-size", "64KiB"]);
    let r = run(&["point", "create", p(&space), p(&img), "--json"]);
    assert_eq!(r.code, 0);
    assert!(r.stderr.is_empty(), "stderr in a pipe: {:?}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    for key in [
        "id",
        "snapshot_at",
        "completed_at",
        "duration_ms",
        "trigger",
        "operator",
        "parent",
        "chunk_size",
        "disks",
        "stats",
        "server",
        "version",
    ] {
        assert!(v.get(key).is_some(), "missing {key} in {v}");
    }
    for key in [
        "bytes_total",
        "bytes_read",
        "bytes_new",
        "bytes_written",
        "chunks_total",
        "chunks_new",
        "chunks_reused",
        "chunks_zero",
    ] {
        assert!(v["stats"].get(key).is_some(), "missing stats.{key}");
    }
}
