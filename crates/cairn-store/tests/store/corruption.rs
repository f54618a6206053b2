//! Damage at rest: a flipped byte, a truncated chunk, a deleted chunk, a damaged index.
//! Verify names the chunk and every point, disk and byte range it damages; restore and
//! rollback fail loudly and never write wrong data.

use std::path::Path;

use cairn_format::id::ChunkId;
use cairn_store::create::ParentChoice;
use cairn_store::progress::NoProgress;
use cairn_store::restore::{RestoreOptions, restore_disk};
use cairn_store::rollback::{apply_rollback, plan_rollback};
use cairn_store::verify::verify;
use cairn_store::{Space, SpaceError};

use crate::common::*;

/// A space with two points of a 10-chunk disk; chunk 3 is shared by both points, and
/// appears twice in the disk (positions 3 and 7).
async fn setup(
    dir: &Path,
) -> (
    Space,
    Vec<u8>,
    cairn_format::record::PointRecord,
    cairn_format::record::PointRecord,
) {
    let space = fs_space(dir).await;
    let img = dir.join("root.img");
    let mut data = noise(9, 10 * CHUNK as usize);
    let c3 = data[3 * CHUNK as usize..4 * CHUNK as usize].to_vec();
    data[7 * CHUNK as usize..8 * CHUNK as usize].copy_from_slice(&c3);
    std::fs::write(&img, &data).unwrap();
    let p1 = point_of(&space, &[("root", &img)], ParentChoice::None).await;
    data[0] ^= 1;
    std::fs::write(&img, &data).unwrap();
    let p2 = point_of(&space, &[("root", &img)], ParentChoice::Latest).await;
    (space, data, p1, p2)
}

fn chunk3_path(dir: &Path, data: &[u8]) -> (ChunkId, std::path::PathBuf) {
    let id = ChunkId::of(&data[3 * CHUNK as usize..4 * CHUNK as usize]);
    let hex = id.to_hex();
    (id, dir.join(format!("space/chunks/{}/{}", &hex[..2], hex)))
}

async fn check_damage_reported(
    space: &Space,
    id: ChunkId,
    p1: uuid::Uuid,
    p2: uuid::Uuid,
    problem: &str,
) {
    let report = verify(space, &[], 4, &NoProgress).await.unwrap();
    assert_eq!(report.damage.len(), 1, "{:?}", report.damage);
    let d = &report.damage[0];
    assert_eq!(d.chunk, Some(id));
    assert!(d.problem.contains(problem), "{}", d.problem);
    let mut pts: Vec<_> = d.affected.iter().map(|a| a.point).collect();
    pts.sort();
    assert_eq!(pts, vec![p1, p2]);
    for a in &d.affected {
        assert_eq!(a.disk, "root");
        assert_eq!(
            a.ranges,
            vec![(3 * CHUNK, 4 * CHUNK), (7 * CHUNK, 8 * CHUNK)]
        );
    }
    // Verifying only the other points' chunks: still found since both use it.
    let only = verify(space, &[p2], 4, &NoProgress).await.unwrap();
    assert!(!only.is_clean());
}

async fn check_restore_and_rollback_refuse(
    space: &Space,
    dir: &Path,
    p2: &cairn_format::record::PointRecord,
) {
    let out = dir.join("out.img");
    let e = restore_disk(
        space,
        p2,
        None,
        &out,
        &RestoreOptions::default(),
        &NoProgress,
    )
    .await
    .unwrap_err();
    assert!(e.is_damage(), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("disk \"root\"") && msg.contains(&p2.id.to_string()),
        "{msg}"
    );
    assert!(!out.exists(), "a failed restore leaves no target behind");
    assert_eq!(
        std::fs::read_dir(dir)
            .unwrap()
            .filter(|e| e
                .as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("cairn-restore"))
            .count(),
        0
    );

    // Rollback of an image that differs in the damaged chunk: refused, image untouched.
    let victim = dir.join("victim.img");
    let junk = noise(77, 10 * CHUNK as usize);
    std::fs::write(&victim, &junk).unwrap();
    let plan = plan_rollback(space, p2, None, &victim, 4, &NoProgress)
        .await
        .unwrap();
    assert_eq!(plan.chunks_differing, 10);
    let r = apply_rollback(space, p2, &plan, 4, &NoProgress).await;
    let e = r.unwrap_err();
    assert!(e.is_damage(), "{e}");
    if matches!(e, SpaceError::MissingChunk { .. }) {
        assert_eq!(
            std::fs::read(&victim).unwrap(),
            junk,
            "refused before writing anything"
        );
    } else {
        // A damaged (present) chunk is found while writing: nothing wrong is written in
        // its place; the chunks written are the point's own.
        let now = std::fs::read(&victim).unwrap();
        let c = CHUNK as usize;
        assert_eq!(&now[3 * c..4 * c], &junk[3 * c..4 * c]);
        assert_eq!(&now[7 * c..8 * c], &junk[7 * c..8 * c]);
    }
}

#[test]
fn flipped_byte() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let (space, data, p1, p2) = setup(dir.path()).await;
        let (id, path) = chunk3_path(dir.path(), &data);
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n / 2] ^= 0x10;
        std::fs::write(&path, &bytes).unwrap();
        check_damage_reported(&space, id, p1.id, p2.id, "is damaged").await;
        check_restore_and_rollback_refuse(&space, dir.path(), &p2).await;
    });
}

#[test]
fn truncated_chunk() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let (space, data, p1, p2) = setup(dir.path()).await;
        let (id, path) = chunk3_path(dir.path(), &data);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 3]).unwrap();
        check_damage_reported(&space, id, p1.id, p2.id, "truncated").await;
        check_restore_and_rollback_refuse(&space, dir.path(), &p2).await;
        std::fs::write(&path, &bytes[..5]).unwrap();
        check_damage_reported(&space, id, p1.id, p2.id, "truncated").await;
    });
}

#[test]
fn deleted_chunk() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let (space, data, p1, p2) = setup(dir.path()).await;
        let (id, path) = chunk3_path(dir.path(), &data);
        std::fs::remove_file(&path).unwrap();
        check_damage_reported(&space, id, p1.id, p2.id, "missing").await;
        check_restore_and_rollback_refuse(&space, dir.path(), &p2).await;
    });
}

#[test]
fn damaged_index_and_record() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let (space, _data, p1, p2) = setup(dir.path()).await;
        let idx = dir.path().join("space").join(&p1.disks[0].index);
        let mut bytes = std::fs::read(&idx).unwrap();
        bytes[40] ^= 1;
        std::fs::write(&idx, &bytes).unwrap();
        let report = verify(&space, &[], 4, &NoProgress).await.unwrap();
        assert_eq!(report.damage.len(), 1);
        assert!(
            report.damage[0].problem.contains("disk index of \"root\""),
            "{}",
            report.damage[0].problem
        );
        assert_eq!(report.damage[0].affected[0].point, p1.id);
        // The other point is unaffected.
        assert_eq!(
            restored(&space, &p2, "root", dir.path()).await.len() as u64,
            10 * CHUNK
        );
        let e = restore_disk(
            &space,
            &p1,
            None,
            &dir.path().join("x"),
            &RestoreOptions::default(),
            &NoProgress,
        )
        .await
        .unwrap_err();
        assert!(e.is_damage() && e.to_string().contains("checksum"), "{e}");
        // GC refuses to run on a space whose indexes it cannot read.
        let opts = cairn_store::gc::GcOptions {
            grace: std::time::Duration::ZERO,
            ..Default::default()
        };
        assert!(
            cairn_store::gc::gc(&space, &opts, &NoProgress)
                .await
                .is_err()
        );

        let rec = dir
            .path()
            .join("space/points")
            .join(format!("{}.json", p2.id));
        std::fs::write(&rec, b"{ not json").unwrap();
        let e = space.load_point(&p2.id).await.unwrap_err();
        assert!(e.is_damage() && e.to_string().contains("record"), "{e}");
    });
}

#[test]
fn repair_quarantines_and_the_next_point_heals_every_point() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let (space, data, p1, p2) = setup(dir.path()).await;
        let (id, path) = chunk3_path(dir.path(), &data);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[20] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        let r = cairn_store::verify::verify_and_repair(&space, &[], true, 4, &NoProgress)
            .await
            .unwrap();
        assert_eq!(r.quarantined, 1);
        assert!(!path.exists(), "the damaged object is gone");
        assert!(
            dir.path()
                .join(format!("space/damaged/{}.json", id.to_hex()))
                .exists()
        );
        // The next point of the same data (incremental: its parent names the chunk)
        // stores the chunk again instead of trusting the parent.
        let img = dir.path().join("root.img");
        let p3 = point_of(&space, &[("root", &img)], ParentChoice::Latest).await;
        assert_eq!(p3.parent, Some(p2.id));
        assert_eq!(
            p3.stats.chunks_new, 1,
            "only the quarantined chunk is stored again"
        );
        assert!(
            !dir.path()
                .join(format!("space/damaged/{}.json", id.to_hex()))
                .exists()
        );
        // Every point is whole again.
        assert!(
            verify(&space, &[], 4, &NoProgress)
                .await
                .unwrap()
                .is_clean()
        );
        assert_eq!(restored(&space, &p2, "root", dir.path()).await, data);
        let mut first = data.clone();
        first[0] ^= 1;
        assert_eq!(restored(&space, &p1, "root", dir.path()).await, first);
    });
}
