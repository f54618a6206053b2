//! Backend faults: a full recovery space, an unreachable one. The error names the
//! problem, nothing committed is lost, nothing half-written is visible, and the next run
//! succeeds.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use cairn_format::config::SpaceConfig;
use cairn_store::backend::{Backend, BackendError, FaultBackend, ObjectStoreBackend, Op};
use cairn_store::create::{CreateOptions, DiskSource, ParentChoice, create_point};
use cairn_store::progress::NoProgress;
use cairn_store::verify::verify;
use cairn_store::{Space, SpaceError};

use crate::common::*;

#[test]
fn full_space_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let root = dir.path().join("space");
        std::fs::create_dir_all(&root).unwrap();
        let inner: Arc<dyn Backend> = Arc::new(ObjectStoreBackend::local(&root).unwrap());
        let full = Arc::new(AtomicBool::new(false));
        let f = full.clone();
        let faulty: Arc<dyn Backend> = Arc::new(FaultBackend::new(
            inner,
            Arc::new(move |op, key, _n| {
                (op == Op::Put && key.starts_with("chunks/") && f.load(Ordering::SeqCst)).then(
                    || BackendError::NoSpace {
                        key: key.to_string(),
                    },
                )
            }),
        ));
        let space = Space::init(faulty, SpaceConfig::new(CHUNK, 1).unwrap())
            .await
            .unwrap();
        let img = dir.path().join("root.img");
        let data = noise(3, 20 * CHUNK as usize);
        std::fs::write(&img, &data).unwrap();
        let p1 = point_of(&space, &[("root", &img)], ParentChoice::None).await;

        std::fs::write(&img, noise(4, 20 * CHUNK as usize)).unwrap();
        full.store(true, Ordering::SeqCst);
        let mut opts = CreateOptions::new(vec![DiskSource {
            name: "root".into(),
            path: img.clone(),
        }]);
        opts.parent = ParentChoice::Latest;
        let e = create_point(&space, &opts, &NoProgress).await.unwrap_err();
        assert!(
            e.to_string().contains("full (no space left on device)"),
            "{e}"
        );
        assert!(matches!(
            e,
            SpaceError::Backend(BackendError::NoSpace { .. })
        ));
        // Nothing half-written is visible; the committed point is intact.
        assert_eq!(space.point_ids().await.unwrap(), vec![p1.id]);
        assert!(
            verify(&space, &[], 4, &NoProgress)
                .await
                .unwrap()
                .is_clean()
        );
        assert_eq!(restored(&space, &p1, "root", dir.path()).await, data);
        // No lease left behind.
        assert!(
            std::fs::read_dir(root.join("locks"))
                .map(|d| d.count())
                .unwrap_or(0)
                == 0
        );
        // Space freed: the next run succeeds.
        full.store(false, Ordering::SeqCst);
        let p2 = create_point(&space, &opts, &NoProgress).await.unwrap();
        assert_eq!(
            restored(&space, &p2, "root", dir.path()).await,
            std::fs::read(&img).unwrap()
        );
    });
}

#[test]
fn real_full_filesystem_is_named() {
    // A real full filesystem, where one can be mounted (root); the fault backend above
    // covers machines where it cannot.
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI must be able to mount a tmpfs"
        );
        eprintln!("skipped: cannot mount a tmpfs here");
        return;
    }
    let result = std::panic::catch_unwind(|| {
        rt().block_on(async {
            let backend: Arc<dyn Backend> = Arc::new(ObjectStoreBackend::local(&mnt).unwrap());
            let space = Space::init(backend, SpaceConfig::new(CHUNK, 1).unwrap())
                .await
                .unwrap();
            let img = dir.path().join("root.img");
            std::fs::write(&img, noise(5, 60 * CHUNK as usize)).unwrap();
            let opts = CreateOptions::new(vec![DiskSource {
                name: "root".into(),
                path: img.clone(),
            }]);
            let e = create_point(&space, &opts, &NoProgress).await.unwrap_err();
            assert!(e.to_string().contains("no space left"), "{e}");
            assert!(space.point_ids().await.unwrap().is_empty());
        })
    });
    let _ = std::process::Command::new("umount").arg(&mnt).status();
    result.unwrap();
}

#[test]
fn unreachable_space_is_named_and_retryable() {
    rt().block_on(async {
        let inner: Arc<dyn Backend> = Arc::new(ObjectStoreBackend::memory());
        let space = Space::init(inner.clone(), SpaceConfig::new(CHUNK, 1).unwrap())
            .await
            .unwrap();
        let down: Arc<dyn Backend> = Arc::new(FaultBackend::new(
            inner,
            Arc::new(|_, key, _| {
                Some(BackendError::Io {
                    key: key.to_string(),
                    detail: "connection refused".into(),
                    retryable: true,
                })
            }),
        ));
        let e = Space::open(down).await.unwrap_err();
        assert!(e.is_retryable());
        assert!(
            e.to_string().contains("unreachable") && e.to_string().contains("connection refused"),
            "{e}"
        );
        drop(space);
    });
}

#[test]
fn bad_images_are_refused_with_names() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let space = mem_space().await;
        let missing = dir.path().join("nope.img");
        let opts = CreateOptions::new(vec![DiskSource {
            name: "root".into(),
            path: missing.clone(),
        }]);
        let e = create_point(&space, &opts, &NoProgress).await.unwrap_err();
        assert!(
            e.to_string().contains("nope.img") && e.to_string().contains("No such file"),
            "{e}"
        );

        let odd = dir.path().join("odd.img");
        std::fs::write(&odd, vec![1u8; 1000]).unwrap();
        let opts = CreateOptions::new(vec![DiskSource {
            name: "root".into(),
            path: odd,
        }]);
        let e = create_point(&space, &opts, &NoProgress).await.unwrap_err();
        assert!(
            e.to_string()
                .contains("1000 bytes, which is not a multiple of 512"),
            "{e}"
        );

        let ok = dir.path().join("ok.img");
        std::fs::write(&ok, vec![1u8; 1024]).unwrap();
        let opts = CreateOptions::new(vec![
            DiskSource {
                name: "a".into(),
                path: ok.clone(),
            },
            DiskSource {
                name: "a".into(),
                path: ok.clone(),
            },
        ]);
        let e = create_point(&space, &opts, &NoProgress).await.unwrap_err();
        assert!(e.to_string().contains("two disks are named \"a\""), "{e}");
        let opts = CreateOptions::new(vec![DiskSource {
            name: "../etc".into(),
            path: ok,
        }]);
        let e = create_point(&space, &opts, &NoProgress).await.unwrap_err();
        assert!(e.to_string().contains("disk name \"../etc\""), "{e}");
        assert!(space.point_ids().await.unwrap().is_empty());
    });
}
