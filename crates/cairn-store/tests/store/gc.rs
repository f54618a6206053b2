//! Garbage collection running while points are created: chunks a concurrent writer
//! writes or reuses are never removed.

use std::time::Duration;

use cairn_store::create::ParentChoice;
use cairn_store::gc::{GcOptions, delete_points, gc};
use cairn_store::progress::NoProgress;
use cairn_store::verify::verify;

use crate::common::*;

#[test]
fn gc_concurrent_with_writers_keeps_everything_referenced() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let space = fs_space(dir.path()).await;
        gc_concurrent(space, dir.path()).await;
    });
}

/// The same on a real S3-compatible server (moto on loopback).
#[test]
fn gc_concurrent_with_writers_on_s3() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        if let Some(space) = crate::s3::s3_space(CHUNK).await {
            gc_concurrent(space, dir.path()).await;
        }
    });
}

async fn gc_concurrent(space: cairn_store::Space, dir: &std::path::Path) {
    {
        let img = dir.join("root.img");
        let mut data = noise(11, 24 * CHUNK as usize);
        std::fs::write(&img, &data).unwrap();
        let mut kept = Vec::new();
        let p = point_of(&space, &[("root", &img)], ParentChoice::None).await;
        let mut previous = p.id;
        kept.push((p.id, data.clone()));
        let writer_space = space.clone();
        let gc_space = space.clone();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = stop.clone();
        // GC with no grace period, in a loop, while the writer works.
        let collector = tokio::spawn(async move {
            let opts = GcOptions {
                grace: Duration::ZERO,
                max_ids_per_pass: 5,
                ..GcOptions::default()
            };
            let mut runs = 0;
            while !s2.load(std::sync::atomic::Ordering::SeqCst) {
                gc(&gc_space, &opts, &NoProgress).await.unwrap();
                runs += 1;
            }
            runs
        });
        for round in 0..12u64 {
            // Change some chunks; delete the previous point so its chunks become garbage
            // that the next point partly reuses.
            for c in [round as usize % 24, (round as usize * 7) % 24] {
                let n = noise(100 + round, CHUNK as usize);
                data[c * CHUNK as usize..(c + 1) * CHUNK as usize].copy_from_slice(&n);
            }
            std::fs::write(&img, &data).unwrap();
            let p = point_of(&writer_space, &[("root", &img)], ParentChoice::Latest).await;
            if round % 2 == 0 {
                delete_points(&writer_space, &[previous]).await.unwrap();
                kept.retain(|(id, _)| *id != previous);
            }
            previous = p.id;
            kept.push((p.id, data.clone()));
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let runs = collector.await.unwrap();
        assert!(runs >= 1);
        let report = verify(&space, &[], 4, &NoProgress).await.unwrap();
        assert!(report.is_clean(), "{:?}", report.damage);
        for (id, content) in &kept {
            let r = space.load_point(id).await.unwrap();
            assert_eq!(&restored(&space, &r, "root", dir).await, content);
        }
    }
}

#[test]
fn grace_period_protects_young_garbage() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let space = fs_space(dir.path()).await;
        let img = dir.path().join("root.img");
        std::fs::write(&img, noise(1, 4 * CHUNK as usize)).unwrap();
        let p = point_of(&space, &[("root", &img)], ParentChoice::None).await;
        delete_points(&space, &[p.id]).await.unwrap();
        let r = gc(&space, &GcOptions::default(), &NoProgress)
            .await
            .unwrap();
        assert_eq!((r.chunks_deleted, r.chunks_in_grace), (0, 4));
        let stored: u64 = chunk_files(dir.path())
            .iter()
            .map(|f| f.metadata().unwrap().len())
            .sum();
        let r = gc(
            &space,
            &GcOptions {
                grace: Duration::ZERO,
                ..GcOptions::default()
            },
            &NoProgress,
        )
        .await
        .unwrap();
        assert_eq!(r.chunks_deleted, 4);
        assert_eq!(r.bytes_freed, stored);
        assert!(stored > 4 * CHUNK, "noise is stored raw");
        assert!(chunk_files(dir.path()).is_empty());
    });
}
