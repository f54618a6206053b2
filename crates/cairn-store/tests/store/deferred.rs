//! Deferred durability of a local space's chunks and patches (`Backend::put_deferred`):
//! a staged object is invisible at its key until the flush, is whole once visible, keeps
//! an existing object, and what a killed process staged is removed by garbage
//! collection's `remove_incomplete` while a live process's staging is left alone.

use std::path::Path;

use bytes::Bytes;
use cairn_store::backend::{Backend, BackendError, ObjectStoreBackend};
use futures::TryStreamExt;

use crate::common::rt;

fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn staged_objects_appear_whole_at_the_flush() {
    rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let b = ObjectStoreBackend::local(dir.path()).unwrap();
        b.put_deferred("chunks/ab/one", Bytes::from_static(b"first"))
            .await
            .unwrap();
        b.put_deferred("patches/cd/two", Bytes::from(vec![7u8; 100_000]))
            .await
            .unwrap();
        // Not at their keys yet, and not listed.
        assert!(b.stat("chunks/ab/one").await.unwrap().is_none());
        assert!(b.stat("patches/cd/two").await.unwrap().is_none());
        let all: Vec<_> = b.list("").try_collect().await.unwrap();
        assert!(all.is_empty(), "staging is not listed: {all:?}");

        b.flush_deferred().await.unwrap();
        assert_eq!(&b.get("chunks/ab/one").await.unwrap()[..], b"first");
        assert_eq!(b.get("patches/cd/two").await.unwrap().len(), 100_000);
        let mut keys: Vec<_> = b
            .list("")
            .map_ok(|o| o.key)
            .try_collect::<Vec<_>>()
            .await
            .unwrap();
        keys.sort();
        assert_eq!(keys, ["chunks/ab/one", "patches/cd/two"]);

        // An existing object is kept (content-addressed: the same content); so is one
        // staged twice in a batch, and the second put says it is on its way.
        b.put_deferred("chunks/ab/one", Bytes::from_static(b"other"))
            .await
            .unwrap();
        b.put_deferred("chunks/ab/three", Bytes::from_static(b"3"))
            .await
            .unwrap();
        assert!(matches!(
            b.put_deferred("chunks/ab/three", Bytes::from_static(b"3"))
                .await
                .unwrap_err(),
            BackendError::AlreadyExists { .. }
        ));
        b.flush_deferred().await.unwrap();
        assert_eq!(&b.get("chunks/ab/one").await.unwrap()[..], b"first");
        assert_eq!(&b.get("chunks/ab/three").await.unwrap()[..], b"3");
        // Nothing left staged but the lock file; a flush of nothing is a no-op.
        b.flush_deferred().await.unwrap();
        let staged = files_under(&dir.path().join(".deferred"));
        assert_eq!(staged.len(), 1, "{staged:?}");
        drop(b);
        assert!(
            files_under(&dir.path().join(".deferred")).is_empty(),
            "a dropped backend removes its staging folder"
        );
    });
}

#[test]
fn a_killed_processs_staging_is_removed_a_live_ones_is_not() {
    rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        // What a process killed mid-point leaves: its folder, lock file unlocked, and a
        // staged object never flushed.
        let dead = dir.path().join(".deferred/0123456789abcdef");
        std::fs::create_dir_all(&dead).unwrap();
        std::fs::write(dead.join("lock#0"), b"").unwrap();
        std::fs::write(dead.join("0#0"), b"half a chunk").unwrap();
        // What a collection killed while removing such a folder leaves: the lock file
        // already gone, staged objects still there (and the folder just modified).
        let half = dir.path().join(".deferred/fedcba9876543210");
        std::fs::create_dir_all(&half).unwrap();
        std::fs::write(half.join("3#3"), b"staged").unwrap();
        std::fs::write(half.join("4#4"), b"staged too").unwrap();

        let b = ObjectStoreBackend::local(dir.path()).unwrap();
        b.put_deferred("chunks/ab/live", Bytes::from_static(b"in flight"))
            .await
            .unwrap();
        // Even with a cutoff in the future (age does not decide: the lock does).
        let later = chrono::Utc::now() + chrono::Duration::hours(1);
        let removed = b.remove_incomplete(later).await.unwrap();
        assert_eq!(removed, 3);
        assert!(!dead.exists());
        assert!(!half.exists());
        // The live process's staged object survives and still lands.
        b.flush_deferred().await.unwrap();
        assert_eq!(&b.get("chunks/ab/live").await.unwrap()[..], b"in flight");
    });
}

#[test]
fn a_memory_space_puts_at_once() {
    rt().block_on(async {
        let b = ObjectStoreBackend::memory();
        b.put_deferred("chunks/ab/x", Bytes::from_static(b"x"))
            .await
            .unwrap();
        assert!(b.stat("chunks/ab/x").await.unwrap().is_some());
        assert!(matches!(
            b.put_deferred("chunks/ab/x", Bytes::from_static(b"y"))
                .await
                .unwrap_err(),
            BackendError::AlreadyExists { .. }
        ));
        assert_eq!(&b.get("chunks/ab/x").await.unwrap()[..], b"x");
        b.flush_deferred().await.unwrap();
    });
}
