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

/// A put of `key` says the object is there or already on its way.
async fn already_on_its_way(b: &dyn Backend, key: &str, data: &'static [u8]) {
    let err = b
        .put_deferred(key, Bytes::from_static(data))
        .await
        .unwrap_err();
    assert!(
        matches!(err, BackendError::AlreadyExists { .. }),
        "{key}: {err}"
    );
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
        already_on_its_way(&b, "chunks/ab/three", b"3").await;
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
        already_on_its_way(&b, "chunks/ab/x", b"y").await;
        assert_eq!(&b.get("chunks/ab/x").await.unwrap()[..], b"x");
        b.flush_deferred().await.unwrap();
    });
}

/// More than two background batches' worth (a batch of 512 staged files is published
/// while staging goes on).
const MANY: usize = 1_100;

#[test]
fn batches_published_in_the_background_land_by_the_flush_and_keep_their_errors() {
    rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let b = ObjectStoreBackend::local(dir.path()).unwrap();
        for i in 0..MANY {
            b.put_deferred(
                &format!("chunks/{:02x}/{i}", i % 256),
                Bytes::from(i.to_string()),
            )
            .await
            .unwrap();
        }
        // The first key's batch went out in the background: it is still "on its way".
        already_on_its_way(&b, "chunks/00/0", b"0").await;
        b.flush_deferred().await.unwrap();
        for i in 0..MANY {
            let got = b.get(&format!("chunks/{:02x}/{i}", i % 256)).await.unwrap();
            assert_eq!(&got[..], i.to_string().as_bytes());
        }
        let staged = files_under(&dir.path().join(".deferred"));
        assert_eq!(staged.len(), 1, "only the lock file is left: {staged:?}");

        // A background batch that fails (an object whose folder is a file) fails the
        // next flush, naming the object; nothing is silently dropped.
        std::fs::create_dir_all(dir.path().join("patches")).unwrap();
        std::fs::write(dir.path().join("patches/zz"), b"not a folder").unwrap();
        b.put_deferred("patches/zz/bad", Bytes::from_static(b"x"))
            .await
            .unwrap();
        for i in 0..MANY {
            b.put_deferred(
                &format!("patches/{:02x}/{i}", i % 256),
                Bytes::from_static(b"p"),
            )
            .await
            .unwrap();
        }
        b.put_deferred("patches/ab/last", Bytes::from_static(b"last"))
            .await
            .unwrap();
        let err = b.flush_deferred().await.unwrap_err();
        assert!(err.to_string().contains("patches/zz/bad"), "{err}");
        // What that flush itself took is published all the same.
        assert_eq!(&b.get("patches/ab/last").await.unwrap()[..], b"last");
        // The error was reported once; what else was staged can still be flushed.
        b.flush_deferred().await.unwrap();
    });
}

#[test]
fn a_local_spaces_blocking_calls_match_its_async_ones() {
    use cairn_store::backend::{FaultBackend, Op, PutMode};
    use std::sync::Arc;
    rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let local = Arc::new(ObjectStoreBackend::local(dir.path()).unwrap());
        assert!(ObjectStoreBackend::memory().blocking().is_none());
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        local
            .put(
                "chunks/ab/obj",
                Bytes::from(data.clone()),
                PutMode::CreateNew,
            )
            .await
            .unwrap();
        let blocking = local.blocking().expect("a local space has blocking calls");
        let (bl, key) = (blocking.clone(), "chunks/ab/obj");
        let ranges = [0..10, 0..10_000, 9_990..20_000, 1..9_999];
        for r in ranges {
            let want = local
                .get_range(key, r.clone())
                .await
                .unwrap_or_else(|e| panic!("{r:?}: {e}"));
            let bl = bl.clone();
            let rr = r.clone();
            let got = tokio::task::spawn_blocking(move || bl.get_range(key, rr))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(got, want, "range {r:?}");
        }
        let bl = blocking.clone();
        tokio::task::spawn_blocking(move || {
            assert_eq!(&bl.get(key).unwrap()[..], &data[..]);
            assert!(bl.exists(key).unwrap());
            assert!(!bl.exists("chunks/ab/none").unwrap());
            assert!(
                !bl.exists("chunks/ab").unwrap(),
                "a folder is not an object"
            );
            assert!(matches!(
                bl.get("chunks/ab/none").unwrap_err(),
                BackendError::NotFound { .. }
            ));
            assert!(matches!(
                bl.get_range("chunks/ab/none", 0..4).unwrap_err(),
                BackendError::NotFound { .. }
            ));
            // Refused, as by the async call: an empty range, one past the end.
            assert!(bl.get_range(key, 5_000..5_000).is_err());
            assert!(bl.get_range(key, 10_000..10_004).is_err());
            // Staged, not visible until the (async) flush; a second stage is "on its way".
            assert!(!bl.put_deferred("patches/cd/new", b"staged").unwrap());
            assert!(!bl.exists("patches/cd/new").unwrap());
            assert!(matches!(
                bl.put_deferred("patches/cd/new", b"staged").unwrap_err(),
                BackendError::AlreadyExists { .. }
            ));
        })
        .await
        .unwrap();
        local.flush_deferred().await.unwrap();
        assert_eq!(&local.get("patches/cd/new").await.unwrap()[..], b"staged");

        // A fault decorator's blocking calls obey its rule and are counted.
        let faulty = FaultBackend::new(
            local.clone(),
            Arc::new(|op, key: &str, _| {
                (op == Op::Put && key.contains("fail")).then(|| BackendError::NoSpace {
                    key: key.to_string(),
                })
            }),
        );
        let counts = faulty.counts();
        let bl = faulty.blocking().expect("the inner backend's, decorated");
        tokio::task::spawn_blocking(move || {
            assert!(matches!(
                bl.put_deferred("chunks/ee/fail", b"x").unwrap_err(),
                BackendError::NoSpace { .. }
            ));
            bl.put_deferred("chunks/ee/ok", b"ok").unwrap();
            assert!(bl.exists(key).unwrap());
            bl.get(key).unwrap();
        })
        .await
        .unwrap();
        use std::sync::atomic::Ordering::Relaxed;
        assert_eq!(counts.put.load(Relaxed), 2);
        assert_eq!(counts.stat.load(Relaxed), 1);
        assert_eq!(counts.get.load(Relaxed), 1);
        faulty.flush_deferred().await.unwrap();
        assert!(local.stat("chunks/ee/ok").await.unwrap().is_some());
        assert!(local.stat("chunks/ee/fail").await.unwrap().is_none());
    });
}

/// Bytes of `path` in the page cache, by util-linux `fincore`; `None` where it cannot be
/// told (no `fincore` outside CI, or a file system whose pages cannot be dropped).
fn resident(path: &Path) -> Option<u64> {
    let out = match std::process::Command::new("fincore")
        .args(["-b", "-n", "-o", "RES"])
        .arg(path)
        .output()
    {
        Ok(o) if o.status.success() => o,
        other => {
            assert!(
                std::env::var("CI").is_err(),
                "fincore (util-linux) is needed in CI: {other:?}"
            );
            return None;
        }
    };
    String::from_utf8(out.stdout).ok()?.trim().parse().ok()
}

/// A published whole chunk leaves the page cache but for its head (header and table, read
/// by the next point's patches); a patch stays whole. The content is unchanged.
#[test]
fn published_chunks_leave_the_page_cache_but_their_head() {
    rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        // tmpfs pages are the file itself: nothing to drop there.
        let fs = rustix::fs::statfs(dir.path()).unwrap();
        if fs.f_type == 0x0102_1994 {
            eprintln!("skipped: the temporary folder is on tmpfs");
            return;
        }
        let b = ObjectStoreBackend::local(dir.path()).unwrap();
        let big: Vec<u8> = (0..4u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
        b.put_deferred("chunks/ab/big", Bytes::from(big.clone()))
            .await
            .unwrap();
        b.put_deferred("patches/cd/small", Bytes::from(big[..256 << 10].to_vec()))
            .await
            .unwrap();
        b.flush_deferred().await.unwrap();
        let chunk = dir.path().join("chunks/ab/big");
        let patch = dir.path().join("patches/cd/small");
        if let (Some(c), Some(p)) = (resident(&chunk), resident(&patch)) {
            assert!(c <= 64 << 10, "{c} bytes of the chunk still cached");
            assert!(c > 0, "the head of the chunk is cached again");
            assert_eq!(p, 256 << 10, "the patch stays cached");
        }
        assert_eq!(&b.get("chunks/ab/big").await.unwrap()[..], &big[..]);
    });
}
