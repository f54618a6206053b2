//! Deferred durability for a local space's chunks and patches.
//!
//! A point stores thousands of small objects (a patch of one changed grain is a few
//! KiB). Making each durable on its own costs two `fsync`s (the file, then its folder),
//! one after the other, in the point's pipeline. Chunks and
//! patches are content-addressed and nothing refers to them until an index is written,
//! so they can be made durable in batches instead:
//!
//! 1. [`Deferred::stage`] writes the object, unsynced, to a staging file in this
//!    process's own folder `<root>/.deferred/<uuid>/` (never at its key: a key that is
//!    visible must hold a whole object, since a later point deduplicates against it by
//!    its name alone, and an unsynced file can come back empty after a power loss);
//! 2. [`Deferred::flush`] syncs every staged file (on many threads at once, so that the
//!    syncs share journal commits), links each to its key (`CreateNew`: an existing
//!    object is the same content and stays), and syncs each folder a link went into,
//!    once per flush instead of once per object.
//!
//! A point flushes before it writes each disk's index; a batch is also flushed when its
//! staged bytes pass [`FLUSH_BYTES`], so staging stays bounded.
//!
//! The staging folder of a live process is held by an exclusive `flock` on its lock
//! file. After a crash the lock is gone, and [`remove_dead`] (garbage collection's
//! `remove_incomplete`) removes the folder: what it held was never referenced.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{BackendError, map_io};

/// The folder under a local space's root that holds the staging folders.
pub(crate) const DEFERRED_DIR: &str = ".deferred";

/// The lock file of a staging folder (a name `object_store`'s listing skips).
const LOCK: &str = "lock#0";

/// A batch is flushed by the writer that makes its staged bytes pass this.
pub(crate) const FLUSH_BYTES: u64 = 256 << 20;

/// A batch of this many staged files is published in the background (synced and linked
/// while the point goes on), one such batch at a time: a flush then waits only for
/// that one and the files staged since.
pub(crate) const EARLY_FILES: usize = 512;

/// One process's staging folder and what it holds, not yet flushed.
#[derive(Debug)]
pub(crate) struct Deferred {
    root: PathBuf,
    dir: PathBuf,
    /// Holds the `flock` that tells [`remove_dead`] this folder is alive.
    _lock: File,
    next: AtomicU64,
    pending: Mutex<Batch>,
    /// One flush at a time: a flush that returns has made durable everything staged
    /// before it started, including what a concurrent flush had taken.
    flushing: tokio::sync::Mutex<()>,
    /// The batch being published in the background, if any.
    early: Arc<Early>,
}

/// The background publication of a batch ([`EARLY_FILES`]).
#[derive(Debug, Default)]
struct Early {
    state: Mutex<EarlyState>,
    done: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct EarlyState {
    running: bool,
    /// Its error, for the next flush to return (nothing is lost: its objects were
    /// promised durable at that flush).
    error: Option<BackendError>,
}

impl Early {
    /// Waits until no batch is being published; the error of the last one that failed.
    fn wait(&self) -> Option<BackendError> {
        let mut st = self.state.lock().expect("poisoned");
        while st.running {
            st = self.done.wait(st).expect("poisoned");
        }
        st.error.take()
    }
}

#[derive(Debug, Default)]
struct Batch {
    files: Vec<(PathBuf, String)>,
    /// The keys of `files`, to tell a caller that its object is already on its way.
    keys: std::collections::HashSet<String>,
    bytes: u64,
}

/// What [`Deferred::stage`] did.
pub(crate) struct Staged {
    /// The batch has grown past [`FLUSH_BYTES`]: the caller flushes.
    pub(crate) flush: bool,
    /// The key was already staged in this batch (for statistics: not a new object).
    pub(crate) duplicate: bool,
}

/// A blocking task that failed to finish (panicked or cancelled), as an I/O error.
pub(crate) fn blocking_error(key: &str, e: tokio::task::JoinError) -> BackendError {
    BackendError::Io {
        key: key.to_string(),
        detail: e.to_string(),
        retryable: false,
    }
}

impl Deferred {
    /// Creates this process's staging folder under `root`.
    pub(crate) fn open(root: &Path) -> std::io::Result<Deferred> {
        let base = root.join(DEFERRED_DIR);
        let name = uuid::Uuid::new_v4().simple().to_string();
        // Locked under a name `remove_dead` leaves alone, then renamed: the lock (on the
        // inode) comes along, so the folder is never seen unlocked.
        let new = base.join(format!("{name}.new"));
        std::fs::create_dir_all(&new)?;
        let lock = File::create(new.join(LOCK))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive)?;
        let dir = base.join(name);
        std::fs::rename(&new, &dir)?;
        Ok(Deferred {
            root: root.to_path_buf(),
            dir,
            _lock: lock,
            next: AtomicU64::new(0),
            pending: Mutex::new(Batch::default()),
            flushing: tokio::sync::Mutex::new(()),
            early: Arc::default(),
        })
    }

    /// Writes `data` for `key` to a staging file; it reaches `key` at the next flush.
    /// Blocking: call it on a blocking thread.
    pub(crate) fn stage(&self, key: &str, data: &[u8]) -> Result<Staged, BackendError> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        // `<n>#<n>`: a name `object_store`'s listing skips, should it ever walk here.
        let staged = self.dir.join(format!("{n}#{n}"));
        let mut f = File::create(&staged).map_err(|e| map_io(key, &e))?;
        f.write_all(data).map_err(|e| {
            let _ = std::fs::remove_file(&staged);
            map_io(key, &e)
        })?;
        drop(f);
        let mut b = self.pending.lock().expect("poisoned");
        // Staged again all the same: this caller's flush must not depend on another's.
        let duplicate = !b.keys.insert(key.to_string());
        b.files.push((staged, key.to_string()));
        b.bytes += data.len() as u64;
        let flush = b.bytes >= FLUSH_BYTES;
        if b.files.len() >= EARLY_FILES {
            let mut st = self.early.state.lock().expect("poisoned");
            if !st.running {
                // Published in the background; `keys` stays (its objects are on their
                // way until the next flush) and so does the staged byte count (bounded
                // staging counts what is not yet flushed).
                st.running = true;
                let files = std::mem::take(&mut b.files);
                let (root, early) = (self.root.clone(), self.early.clone());
                let spawned = std::thread::Builder::new()
                    .name("cairn-publish".into())
                    .spawn(move || {
                        let r = publish(&root, files);
                        let mut st = early.state.lock().expect("poisoned");
                        st.running = false;
                        if let Err(e) = r {
                            st.error.get_or_insert(e);
                        }
                        early.done.notify_all();
                    });
                if let Err(e) = spawned {
                    st.running = false;
                    st.error.get_or_insert(map_io(key, &e));
                }
            }
        }
        Ok(Staged { flush, duplicate })
    }

    /// Makes every object staged so far durable at its key.
    pub(crate) async fn flush(&self) -> Result<(), BackendError> {
        let _one = self.flushing.lock().await;
        let batch = std::mem::take(&mut *self.pending.lock().expect("poisoned"));
        let (root, early) = (self.root.clone(), self.early.clone());
        tokio::task::spawn_blocking(move || {
            // The background batch first: it was staged before these files. Its error
            // is this flush's, but these files are published all the same (nothing
            // staged is left behind by an error elsewhere).
            let failed = early.wait();
            let published = publish(&root, batch.files);
            match failed {
                Some(e) => Err(e),
                None => published,
            }
        })
        .await
        .map_err(|e| blocking_error("chunks/", e))?
    }
}

impl Drop for Deferred {
    fn drop(&mut self) {
        // What was never flushed belongs to a point that did not complete.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Threads that sync one batch's files (and then its folders) at once: concurrent syncs
/// share the filesystem's journal commits.
const SYNC_THREADS: usize = 16;

/// Runs `f` on every item of `items` on up to [`SYNC_THREADS`] threads; the first error.
fn parallel<T: Sync>(
    items: &[T],
    f: impl Fn(&T) -> Result<(), BackendError> + Sync,
) -> Result<(), BackendError> {
    if items.is_empty() {
        return Ok(());
    }
    let per = items.len().div_ceil(SYNC_THREADS);
    std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .chunks(per)
            .map(|part| scope.spawn(|| part.iter().try_for_each(&f)))
            .collect();
        // The scope joins the threads not joined here (after an error) before it ends.
        handles
            .into_iter()
            .try_for_each(|h| h.join().unwrap_or_else(|_| Err(panicked())))
    })
}

fn panicked() -> BackendError {
    BackendError::Io {
        key: "chunks/".into(),
        detail: "a sync thread panicked".into(),
        retryable: false,
    }
}

/// What a published whole chunk keeps in the page cache: its start, which holds the
/// header and the grain table (56 + 40 bytes per grain: 2.6 KiB for 4 MiB chunks) that
/// the next point's patches read.
pub(crate) const CACHED_HEAD: usize = 16 * 1024;

fn sync_path(path: &Path, key: &str) -> Result<(), BackendError> {
    let f = File::open(path).map_err(|e| map_io(key, &e))?;
    rustix::fs::fdatasync(&f).map_err(|e| map_io(key, &e.into()))?;
    // A point writes gigabytes of chunks that are rarely read soon: left in the page
    // cache they would evict the guests' own pages (and the frozen content that
    // copy-before-write reads). Clean after the sync, they are dropped without I/O; the
    // whole file, since a large folio is dropped only whole, then the head is read back
    // (no readahead). Patches are small and read whole by the next point's patch: they
    // stay. Advice only: an error changes nothing that was made durable.
    if key.starts_with(cairn_format::layout::CHUNKS_PREFIX) {
        use rustix::fs::{Advice, fadvise};
        if fadvise(&f, 0, None, Advice::DontNeed).is_ok()
            && fadvise(&f, 0, None, Advice::Random).is_ok()
        {
            let mut head = [0u8; CACHED_HEAD];
            let _ = std::os::unix::fs::FileExt::read_at(&f, &mut head, 0);
        }
    }
    Ok(())
}

/// Syncs every staged file, links each to its key, syncs every folder a link went into.
/// (Not `syncfs`: the pool's disks may share the filesystem, and a flush must not wait
/// for the guests' own dirty data.)
fn publish(root: &Path, files: Vec<(PathBuf, String)>) -> Result<(), BackendError> {
    parallel(&files, |(staged, key)| sync_path(staged, key))?;
    let mut dirs = std::collections::BTreeSet::new();
    for (staged, key) in &files {
        let target = root.join(key);
        let parent = target.parent().map(Path::to_path_buf);
        let linked = match std::fs::hard_link(staged, &target) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(parent) = &parent {
                    create_dirs(root, parent, &mut dirs).map_err(|e| map_io(key, &e))?;
                }
                std::fs::hard_link(staged, &target)
            }
            other => other,
        };
        match linked {
            Ok(()) => {
                if let Some(parent) = parent {
                    dirs.insert(parent);
                }
            }
            // Already there: the same content (its name is its hash).
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(map_io(key, &e)),
        }
        let _ = std::fs::remove_file(staged);
    }
    let dirs: Vec<_> = dirs.into_iter().collect();
    parallel(&dirs, |d| {
        sync_path(d, "chunks/").or_else(|e| match e {
            BackendError::NotFound { .. } => Ok(()),
            e => Err(e),
        })
    })
}

/// Creates `dir` and the folders above it up to `root`, noting each new one and its
/// parent in `dirs` (their entries must be synced too).
fn create_dirs(
    root: &Path,
    dir: &Path,
    dirs: &mut std::collections::BTreeSet<PathBuf>,
) -> std::io::Result<()> {
    let mut missing = Vec::new();
    let mut d = dir;
    while d != root && !d.exists() {
        missing.push(d.to_path_buf());
        match d.parent() {
            Some(p) => d = p,
            None => break,
        }
    }
    std::fs::create_dir_all(dir)?;
    for m in missing {
        if let Some(p) = m.parent() {
            dirs.insert(p.to_path_buf());
        }
        dirs.insert(m);
    }
    Ok(())
}

/// Removes the staging folders under `root` whose process is gone (their `lock` file can
/// be locked). Returns how many files they held.
pub(crate) fn remove_dead(root: &Path) -> std::io::Result<u64> {
    let base = root.join(DEFERRED_DIR);
    let entries = match std::fs::read_dir(&base) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    for entry in entries {
        let dir = entry?.path();
        let young = || {
            dir.metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().unwrap_or_default().as_secs() < 600)
        };
        let alive = if dir.extension().is_some_and(|e| e == "new") {
            // Being created right now, or left by a process killed while creating it.
            young()
        } else {
            match File::open(dir.join(LOCK)) {
                Ok(f) => {
                    rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive)
                        .is_err()
                }
                // A folder gets its name only once its lock is in it, and loses the lock
                // only while it is being removed (by its process at its end, or by a
                // collection that was killed in the middle): dead.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
                Err(_) => young(),
            }
        };
        if alive {
            continue;
        }
        if let Ok(rd) = std::fs::read_dir(&dir) {
            removed += rd
                .filter_map(Result::ok)
                .filter(|e| e.file_name() != LOCK)
                .count() as u64;
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}
