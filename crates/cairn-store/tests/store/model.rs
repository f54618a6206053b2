//! Model test: random images and random sequences of writes, points (full and
//! incremental), restores, rollbacks, deletions and GC, run against the real space and
//! against a reference model (a byte vector per disk and per point), compared byte for byte.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Duration;

use cairn_format::id::PointId;
use cairn_store::Space;
use cairn_store::create::ParentChoice;
use cairn_store::gc::{GcOptions, delete_points, gc};
use cairn_store::progress::NoProgress;
use cairn_store::rollback::{apply_rollback, plan_rollback};
use cairn_store::verify::verify;
use proptest::prelude::*;

use crate::common::*;

#[derive(Debug, Clone)]
enum Step {
    /// Write `len` bytes at `offset` (scaled to the disk), noise or zeros.
    Write {
        disk: usize,
        offset: u32,
        len: u32,
        seed: u64,
        zeros: bool,
    },
    Point {
        incremental: bool,
    },
    Restore {
        point: usize,
        disk: usize,
    },
    Rollback {
        point: usize,
        disk: usize,
    },
    Delete {
        point: usize,
    },
    Gc,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..2usize, any::<u32>(), 1..200_000u32, any::<u64>(), prop::bool::weighted(0.2))
            .prop_map(|(disk, offset, len, seed, zeros)| Step::Write { disk, offset, len, seed, zeros }),
        3 => any::<bool>().prop_map(|incremental| Step::Point { incremental }),
        2 => (any::<usize>(), 0..2usize).prop_map(|(point, disk)| Step::Restore { point, disk }),
        1 => (any::<usize>(), 0..2usize).prop_map(|(point, disk)| Step::Rollback { point, disk }),
        1 => any::<usize>().prop_map(|point| Step::Delete { point }),
        1 => Just(Step::Gc),
    ]
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Store {
    Memory,
    Folder,
    S3,
}

fn run_model(store: Store, sizes: Vec<u32>, steps: Vec<Step>) {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let space: Space = match store {
            Store::Folder => fs_space(dir.path()).await,
            Store::Memory => mem_space().await,
            Store::S3 => match crate::s3::s3_space(CHUNK).await {
                Some(s) => s,
                None => return,
            },
        };
        // The reference: current content of each disk, and of each live point.
        let mut disks: Vec<Vec<u8>> = sizes.iter().map(|s| vec![0u8; *s as usize * 512]).collect();
        let paths: Vec<PathBuf> = (0..disks.len())
            .map(|i| dir.path().join(format!("d{i}.img")))
            .collect();
        for (p, d) in paths.iter().zip(&disks) {
            std::fs::File::create(p)
                .unwrap()
                .set_len(d.len() as u64)
                .unwrap();
        }
        let names = ["root", "data"];
        let mut points: BTreeMap<PointId, Vec<Vec<u8>>> = BTreeMap::new();
        for s in steps {
            match s {
                Step::Write {
                    disk,
                    offset,
                    len,
                    seed,
                    zeros,
                } => {
                    let d = disk % disks.len();
                    let size = disks[d].len();
                    let off = offset as usize % size;
                    let len = (len as usize).min(size - off);
                    let data = if zeros {
                        vec![0u8; len]
                    } else {
                        noise(seed, len)
                    };
                    disks[d][off..off + len].copy_from_slice(&data);
                    let f = std::fs::OpenOptions::new()
                        .write(true)
                        .open(&paths[d])
                        .unwrap();
                    f.write_all_at(&data, off as u64).unwrap();
                }
                Step::Point { incremental } => {
                    let parent = if incremental {
                        ParentChoice::Latest
                    } else {
                        ParentChoice::None
                    };
                    let list: Vec<(&str, &std::path::Path)> = paths
                        .iter()
                        .enumerate()
                        .map(|(i, p)| (names[i], p.as_path()))
                        .collect();
                    let r = point_of(&space, &list, parent).await;
                    points.insert(r.id, disks.clone());
                }
                Step::Restore { point, disk } => {
                    let Some((id, content)) = points.iter().nth(point % points.len().max(1)) else {
                        continue;
                    };
                    let d = disk % disks.len();
                    let r = space.load_point(id).await.unwrap();
                    assert_eq!(
                        restored(&space, &r, names[d], dir.path()).await,
                        content[d],
                        "restore of {id} disk {d}"
                    );
                }
                Step::Rollback { point, disk } => {
                    let Some((id, content)) = points.iter().nth(point % points.len().max(1)) else {
                        continue;
                    };
                    let d = disk % disks.len();
                    let r = space.load_point(id).await.unwrap();
                    let plan = plan_rollback(&space, &r, Some(names[d]), &paths[d], 4, &NoProgress)
                        .await
                        .unwrap();
                    let differing = disks[d]
                        .chunks(CHUNK as usize)
                        .zip(content[d].chunks(CHUNK as usize))
                        .filter(|(a, b)| a != b)
                        .count() as u64;
                    assert_eq!(
                        plan.chunks_differing, differing,
                        "rollback plan counts only differing chunks"
                    );
                    apply_rollback(&space, &r, &plan, 4, &NoProgress)
                        .await
                        .unwrap();
                    disks[d] = content[d].clone();
                    assert_eq!(
                        std::fs::read(&paths[d]).unwrap(),
                        disks[d],
                        "rolled-back image"
                    );
                }
                Step::Delete { point } => {
                    let Some(id) = points.keys().nth(point % points.len().max(1)).copied() else {
                        continue;
                    };
                    delete_points(&space, &[id]).await.unwrap();
                    points.remove(&id);
                }
                Step::Gc => {
                    let opts = GcOptions {
                        grace: Duration::ZERO,
                        max_ids_per_pass: 7,
                        ..GcOptions::default()
                    };
                    gc(&space, &opts, &NoProgress).await.unwrap();
                }
            }
        }
        // Finally: collect garbage, then every live point still verifies and restores.
        let opts = GcOptions {
            grace: Duration::ZERO,
            ..GcOptions::default()
        };
        gc(&space, &opts, &NoProgress).await.unwrap();
        let report = verify(&space, &[], 4, &NoProgress).await.unwrap();
        assert!(report.is_clean(), "{:?}", report.damage);
        for (id, content) in &points {
            let r = space.load_point(id).await.unwrap();
            for (d, want) in content.iter().enumerate() {
                assert_eq!(&restored(&space, &r, names[d], dir.path()).await, want);
            }
        }
        assert_eq!(
            space.point_ids().await.unwrap(),
            points.keys().copied().collect::<Vec<_>>()
        );
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn space_matches_model_in_memory(
        sizes in prop::collection::vec(1u32..2500, 1..=2),
        steps in prop::collection::vec(step(), 1..30),
    ) {
        run_model(Store::Memory, sizes, steps);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn space_matches_model_on_filesystem(
        sizes in prop::collection::vec(1u32..2500, 1..=2),
        steps in prop::collection::vec(step(), 1..20),
    ) {
        run_model(Store::Folder, sizes, steps);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    /// The same model on a real S3-compatible server (moto on loopback).
    #[test]
    fn space_matches_model_on_s3(
        sizes in prop::collection::vec(1u32..2500, 1..=2),
        steps in prop::collection::vec(step(), 1..20),
    ) {
        run_model(Store::S3, sizes, steps);
    }
}

/// An incremental point restores identically to a full point of the same content, and
/// costs only the changed chunks.
#[test]
fn incremental_equals_full() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let space = fs_space(dir.path()).await;
        let img = dir.path().join("root.img");
        let mut data = noise(1, 40 * CHUNK as usize);
        data[5 * CHUNK as usize..9 * CHUNK as usize].fill(0);
        std::fs::write(&img, &data).unwrap();
        let full = point_of(&space, &[("root", &img)], ParentChoice::None).await;
        assert_eq!(full.stats.chunks_new, 36);
        assert_eq!(full.stats.chunks_zero, 4);
        // Change 3 chunks.
        for c in [1usize, 20, 39] {
            data[c * CHUNK as usize + 7] ^= 0xff;
        }
        std::fs::write(&img, &data).unwrap();
        let inc = point_of(&space, &[("root", &img)], ParentChoice::Latest).await;
        assert_eq!(inc.parent, Some(full.id));
        assert_eq!(inc.stats.chunks_new, 3);
        assert_eq!(inc.stats.chunks_reused, 33);
        let full2 = point_of(&space, &[("root", &img)], ParentChoice::None).await;
        assert_eq!(
            full2.stats.chunks_new, 0,
            "a full point is deduplicated against the space"
        );
        let a = restored(&space, &inc, "root", dir.path()).await;
        let b = restored(&space, &full2, "root", dir.path()).await;
        assert_eq!(a, data);
        assert_eq!(a, b);
        // Deleting the older point never affects the newer one.
        delete_points(&space, &[full.id]).await.unwrap();
        gc(
            &space,
            &GcOptions {
                grace: Duration::ZERO,
                ..GcOptions::default()
            },
            &NoProgress,
        )
        .await
        .unwrap();
        assert_eq!(restored(&space, &inc, "root", dir.path()).await, data);
    });
}
