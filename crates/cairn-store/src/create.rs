//! Creating a recovery point from disk images.
//!
//! Each disk is cut into fixed-size chunks and every chunk goes through
//! read → zero check → hash → (parent / known / exists?) → compress → put. Up to
//! `concurrency` chunks are in flight at once (that bound is the back-pressure: memory is
//! at most about `concurrency` × 2 chunks); reading, hashing and compressing run on the
//! blocking pool, one chunk per thread, so every core is busy; puts run concurrently.
//!
//! A chunk costs nothing more than a read and a hash when:
//! - it is a hole of a sparse image (not even read) or all zeros (a marker in the index);
//! - its id equals the parent's id at the same position, or any id of the parent point,
//!   or one already handled in this operation (no existence check, no write).
//!
//! Otherwise one `stat` tells whether another point already stored it (deduplication);
//! only chunks new to the space are compressed and written.
//!
//! The disk indexes are written after all their chunks, and the record last of all, so a
//! crash leaves at worst unreferenced chunks and indexes for garbage collection.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cairn_format::chunk::ChunkCodec;
use cairn_format::framed;
use cairn_format::id::{ChunkId, ChunkRef, PointId};
use cairn_format::index::{DiskIndex, chunk_count};
use cairn_format::layout;
use cairn_format::record::{DiskRecord, PointRecord, PointStats, RECORD_VERSION};
use futures::{StreamExt, TryStreamExt};

use crate::backend::{Backend, BackendError, BlockingBackend, PutMode};
use crate::error::SpaceError;
use crate::image::{BufferPool, Image};
use crate::lock;
use crate::progress::Progress;
use crate::source::{ChunkSource, NamedSource};
use crate::space::Space;

/// One disk to take into a point.
#[derive(Debug, Clone)]
pub struct DiskSource {
    pub name: String,
    pub path: PathBuf,
}

/// Which earlier point a new point is incremental to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParentChoice {
    /// A full point (still deduplicated against the whole space).
    None,
    /// The newest point of the same server (`None` = of no server), if any.
    Latest,
    Id(PointId),
}

#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub disks: Vec<DiskSource>,
    pub parent: ParentChoice,
    pub server: Option<String>,
    pub trigger: String,
    pub operator: String,
    /// Chunks in flight at once.
    pub concurrency: usize,
    /// How long to wait for a running garbage collection's delete phase.
    pub lease_wait: Duration,
    /// The instant the disks were frozen at (default: when creation starts).
    pub snapshot_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Run the chunk jobs (read, hash, compress) on threads of their own at this
    /// priority, e.g. [`CpuPriority::BACKGROUND`] for a point of a running server, so
    /// that the guests' I/O in the same process goes first. Default (`None`): tokio's
    /// blocking pool.
    pub cpu_priority: Option<CpuPriority>,
}

/// The priority of a point's own chunk threads ([`CreateOptions::cpu_priority`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuPriority {
    /// Their nice value (per thread on Linux).
    pub nice: i32,
    /// Also schedule them `SCHED_IDLE` (Linux), so that a guest's thread that wakes up
    /// preempts them at once instead of waiting out their time slice (a nice value only
    /// changes their share). They still progress: an idle thread keeps a small share of
    /// a busy CPU.
    pub idle: bool,
}

impl CpuPriority {
    /// Below everything else: nice 19 and `SCHED_IDLE`.
    pub const BACKGROUND: CpuPriority = CpuPriority {
        nice: 19,
        idle: true,
    };
}

impl CreateOptions {
    pub fn new(disks: Vec<DiskSource>) -> Self {
        CreateOptions {
            disks,
            parent: ParentChoice::None,
            server: None,
            trigger: "cli".into(),
            operator: default_operator(),
            concurrency: default_concurrency(),
            lease_wait: Duration::from_secs(3600),
            snapshot_at: None,
            cpu_priority: None,
        }
    }
}

/// The operator recorded when none is given: the login name (from the environment, or
/// the user database for this process's uid).
pub fn default_operator() -> String {
    if let Ok(name) = std::env::var("USER").or_else(|_| std::env::var("LOGNAME")) {
        return name;
    }
    let uid = rustix::process::getuid().as_raw();
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|passwd| {
            passwd.lines().find_map(|line| {
                let mut f = line.split(':');
                let name = f.next()?;
                (f.nth(1)? == uid.to_string()).then(|| name.to_string())
            })
        })
        .unwrap_or_else(|| format!("uid {uid}"))
}

/// Chunks in flight by default: enough to keep every core and the storage busy.
pub fn default_concurrency() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()) * 2 + 2
}

/// Reusable compression contexts (each with its scratch buffer), at most one per core
/// in use at once.
pub(crate) struct CodecPool {
    level: i32,
    idle: Mutex<Vec<ChunkCodec>>,
}

impl CodecPool {
    pub(crate) fn new(level: i32) -> Self {
        CodecPool {
            level,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Runs `f` with a pooled context.
    pub(crate) fn with<R>(
        &self,
        f: impl FnOnce(&mut ChunkCodec) -> std::io::Result<R>,
    ) -> std::io::Result<R> {
        let taken = self.idle.lock().expect("poisoned").pop();
        let mut codec = match taken {
            Some(c) => c,
            None => ChunkCodec::new(self.level)?,
        };
        let r = f(&mut codec);
        self.idle.lock().expect("poisoned").push(codec);
        r
    }
}

/// How many CPU-bound chunk jobs (read+hash, compress) run at once: one per core, plus
/// one to cover a job waiting on a read. More would only add memory and context
/// switches; I/O still overlaps up to `concurrency`.
pub(crate) fn cpu_slots() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()) + 1
}

type Task = Box<dyn FnOnce() + Send>;

/// Threads of one point creation at a lower priority ([`CreateOptions::cpu_priority`]); they
/// end when it is dropped (the channel closes).
struct NiceThreads {
    jobs: std::sync::mpsc::Sender<Task>,
}

impl NiceThreads {
    fn new(threads: usize, priority: CpuPriority) -> std::io::Result<NiceThreads> {
        let (tx, rx) = std::sync::mpsc::channel::<Task>();
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..threads {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name("cairn-point".into())
                .spawn(move || {
                    // Failure only costs priority. The policy first: setting it resets
                    // the nice value.
                    if priority.idle {
                        use thread_priority::{
                            NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy,
                        };
                        let _ = thread_priority::set_thread_priority_and_policy(
                            thread_priority::thread_native_id(),
                            ThreadPriority::Min,
                            ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle),
                        );
                    }
                    // Who = 0: this thread only (Linux).
                    let _ = rustix::process::setpriority_process(None, priority.nice);
                    loop {
                        let job = rx.lock().expect("poisoned").recv();
                        match job {
                            Ok(job) => job(),
                            Err(_) => break,
                        }
                    }
                })?;
        }
        Ok(NiceThreads { jobs: tx })
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, SpaceError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Task = Box::new(move || {
            // A panic is reported as the job's failure; the thread goes on.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let _ = tx.send(r.ok());
        });
        let done = match self.jobs.send(job) {
            Ok(()) => rx.await.ok().flatten(),
            Err(_) => None,
        };
        done.ok_or_else(|| SpaceError::Internal("a chunk job failed".into()))
    }
}

/// State shared by every chunk of one point creation.
struct Writer {
    backend: Arc<dyn Backend>,
    /// The backend's blocking calls, if it has them (a local folder): a chunk is then
    /// read, checked, compressed and staged in one job, on one thread.
    blocking: Option<Arc<dyn BlockingBackend>>,
    codecs: Arc<CodecPool>,
    /// Bounds the jobs on tokio's blocking pool (the nice threads bound their own).
    cpu: tokio::sync::Semaphore,
    pool: Arc<BufferPool>,
    /// Chunks known to be in the space: the parent's, and those handled so far.
    known: Arc<Mutex<HashSet<ChunkId>>>,
    /// Chunks quarantined as damaged: never trusted, stored again when met.
    quarantined: Arc<HashSet<ChunkId>>,
    /// Where chunk jobs run: tokio's blocking pool, or these threads.
    nice: Option<NiceThreads>,
}

enum Outcome {
    Zero,
    Reused,
    New { plain: u64, stored: u64 },
}

/// How a chunk job ended.
enum Job {
    /// Nothing (more) to store: the chunk, and what it cost.
    Done(ChunkRef, Outcome),
    /// Staged by the job itself (blocking backend); `flush`: the staged batch passed its
    /// bound.
    Staged(ChunkRef, Outcome, bool),
    /// To store from the runtime: the sealed object, its plain bytes, and whether it
    /// heals a quarantined chunk (stored at once, its marker removed).
    Store {
        r: ChunkRef,
        sealed: Vec<u8>,
        plain: u64,
        suspect: bool,
    },
}

/// Stages a sealed object from a job, or hands it back to the runtime (no blocking
/// backend, or a quarantined chunk healed: stored at once).
fn stage_or_hand_back(
    blocking: Option<&dyn BlockingBackend>,
    r: ChunkRef,
    sealed: Vec<u8>,
    plain: u64,
    suspect: bool,
) -> Result<Job, SpaceError> {
    let Some(b) = blocking.filter(|_| !suspect) else {
        return Ok(Job::Store {
            r,
            sealed,
            plain,
            suspect,
        });
    };
    let stored = sealed.len() as u64;
    match b.put_deferred(&layout::object_key(&r), &sealed) {
        Ok(flush) => Ok(Job::Staged(r, Outcome::New { plain, stored }, flush)),
        // Stored meanwhile by a concurrent task or writer: same content.
        Err(BackendError::AlreadyExists { .. }) => Ok(Job::Done(r, Outcome::Reused)),
        Err(e) => Err(e.into()),
    }
}

/// Seals a whole chunk (every grain data) and gives its buffer back.
fn seal_whole(
    codecs: &CodecPool,
    pool: &BufferPool,
    buf: Vec<u8>,
    cvs: &[framed::ChainingValue],
) -> Result<Vec<u8>, SpaceError> {
    let grains: Vec<framed::Grain> = buf.chunks(framed::GRAIN).map(framed::Grain::Data).collect();
    let sealed =
        codecs.with(|c| framed::seal(c.compressor(), buf.len(), None, &grains, cvs).map(|s| s.1));
    drop(grains);
    pool.give(buf);
    sealed.map_err(|e| SpaceError::Internal(format!("compression failed: {e}")))
}

/// Seals a sparse chunk: its data grains, zero grains elsewhere.
fn seal_sparse(
    codecs: &CodecPool,
    len: usize,
    data: &[Option<Vec<u8>>],
    cvs: &[framed::ChainingValue],
) -> Result<(ChunkId, Vec<u8>), SpaceError> {
    let grains: Vec<framed::Grain> = data
        .iter()
        .map(|d| match d {
            Some(d) => framed::Grain::Data(d),
            None => framed::Grain::Zero,
        })
        .collect();
    codecs
        .with(|c| framed::seal(c.compressor(), len, None, &grains, cvs))
        .map_err(|e| SpaceError::Internal(format!("compression failed: {e}")))
}

impl Writer {
    async fn on_cpu<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, SpaceError> {
        match &self.nice {
            // The threads are the bound: a job waits in their queue, so a thread that
            // ends one takes the next at once (no round trip through the runtime).
            Some(threads) => threads.run(f).await,
            None => {
                let _permit = self.cpu.acquire().await.expect("semaphore open");
                Ok(tokio::task::spawn_blocking(f).await?)
            }
        }
    }

    /// Finishes what a job left: a flush it asked for, or the store it could not do.
    async fn finish(&self, job: Job) -> Result<(ChunkRef, Outcome), SpaceError> {
        match job {
            Job::Done(r, outcome) => Ok((r, outcome)),
            Job::Staged(r, outcome, flush) => {
                if flush {
                    self.backend.flush_deferred().await?;
                }
                Ok((r, outcome))
            }
            Job::Store {
                r,
                sealed,
                plain,
                suspect,
            } => {
                let outcome = self
                    .store(&layout::object_key(&r), sealed, plain, suspect)
                    .await?;
                if suspect {
                    // Stored again from good data: the quarantine is over (this heals
                    // every point that references the chunk).
                    self.backend.delete(&layout::damaged_key(&r.id)).await?;
                }
                if r.base.is_none() {
                    self.known.lock().expect("poisoned").insert(r.id);
                }
                Ok((r, outcome))
            }
        }
    }

    /// Takes a chunk whole: read, hash (per grain), and store it framed unless known.
    /// `parent` is the parent point's chunk at the same position.
    async fn chunk(
        &self,
        image: &Arc<dyn ChunkSource>,
        start: u64,
        end: u64,
        parent: Option<ChunkRef>,
    ) -> Result<(ChunkRef, Outcome, u64), SpaceError> {
        let len = usize::try_from(end - start).expect("chunk fits in memory");
        let img = image.clone();
        let pool = self.pool.clone();
        let known = self.known.clone();
        let quarantined = self.quarantined.clone();
        let blocking = self.blocking.clone();
        let codecs = self.codecs.clone();
        // Read, hash, the checks that need no request; with a blocking backend also the
        // existence check, compression and staging: all in one job.
        let (first, read) = self
            .on_cpu(move || {
                if !img.may_have_data(start, end) {
                    img.taken(start, end);
                    return Ok((
                        Err(Job::Done(ChunkRef::plain(ChunkId::ZERO), Outcome::Zero)),
                        0,
                    ));
                }
                let mut buf = pool.take(len);
                img.read_at(&mut buf, start)?;
                img.taken(start, end);
                let read = len as u64;
                if cairn_format::zero::is_zero(&buf) {
                    pool.give(buf);
                    return Ok((
                        Err(Job::Done(ChunkRef::plain(ChunkId::ZERO), Outcome::Zero)),
                        read,
                    ));
                }
                let (cvs, id) = framed::cvs_of(&buf);
                let suspect = quarantined.contains(&id);
                let r = ChunkRef::plain(id);
                let reused = |r| Ok((Err(Job::Done(r, Outcome::Reused)), read));
                if !suspect
                    && let Some(p) = parent
                    && p.id == id
                {
                    // The parent's (a patch stays a patch).
                    pool.give(buf);
                    return reused(p);
                }
                if !suspect && known.lock().expect("poisoned").contains(&id) {
                    pool.give(buf);
                    return reused(r);
                }
                let Some(b) = blocking.as_deref() else {
                    return Ok((Ok((r, buf, cvs, suspect)), read));
                };
                if b.exists(&layout::chunk_key(&id))? {
                    pool.give(buf);
                    known.lock().expect("poisoned").insert(id);
                    return reused(r);
                }
                let sealed = seal_whole(&codecs, &pool, buf, &cvs)?;
                let job = stage_or_hand_back(Some(b), r, sealed, len as u64, suspect)?;
                if !matches!(job, Job::Store { .. }) {
                    known.lock().expect("poisoned").insert(id);
                }
                Ok::<_, SpaceError>((Err(job), read))
            })
            .await??;
        let job = match first {
            Err(job) => job,
            // No blocking backend: the existence check from here, then compression.
            Ok((r, buf, cvs, suspect)) => {
                if self
                    .backend
                    .stat(&layout::chunk_key(&r.id))
                    .await?
                    .is_some()
                {
                    self.pool.give(buf);
                    self.known.lock().expect("poisoned").insert(r.id);
                    Job::Done(r, Outcome::Reused)
                } else {
                    let codecs = self.codecs.clone();
                    let pool = self.pool.clone();
                    let sealed = self
                        .on_cpu(move || seal_whole(&codecs, &pool, buf, &cvs))
                        .await??;
                    Job::Store {
                        r,
                        sealed,
                        plain: len as u64,
                        suspect,
                    }
                }
            }
        };
        let (r, outcome) = self.finish(job).await?;
        Ok((r, outcome, read))
    }

    /// Stores a new chunk or patch. Deferred (durable at the flush before the disk's
    /// index is written, see `Backend::put_deferred`) unless `now`: a chunk that heals a
    /// quarantined one is stored at once, as its quarantine marker goes next.
    async fn store(
        &self,
        key: &str,
        sealed: Vec<u8>,
        plain: u64,
        now: bool,
    ) -> Result<Outcome, SpaceError> {
        let stored = sealed.len() as u64;
        let data = Bytes::from(sealed);
        let put = if now {
            self.backend.put(key, data, PutMode::CreateNew).await
        } else {
            self.backend.put_deferred(key, data).await
        };
        match put {
            Ok(()) => Ok(Outcome::New { plain, stored }),
            // Written meanwhile by a concurrent task or writer: same content.
            Err(BackendError::AlreadyExists { .. }) => Ok(Outcome::Reused),
            Err(e) => Err(e.into()),
        }
    }

    /// Takes a chunk that was all zeros at the base, of which only `changed` grains may
    /// hold data now: reads only those, and stores a standalone framed chunk whose other
    /// grains are zero grains. `None` (nothing read) when more than a quarter changed.
    async fn sparse(
        &self,
        image: &Arc<dyn ChunkSource>,
        start: u64,
        end: u64,
        changed: Vec<usize>,
    ) -> Result<Option<(ChunkRef, Outcome, u64)>, SpaceError> {
        let len = usize::try_from(end - start).expect("chunk fits in memory");
        let n = framed::grain_count(len, framed::GRAIN);
        if changed.len() > n / 4 {
            return Ok(None);
        }
        let img = image.clone();
        let known = self.known.clone();
        let quarantined = self.quarantined.clone();
        let blocking = self.blocking.clone();
        let codecs = self.codecs.clone();
        // The id comes from the grains' chaining values: a chunk already stored is not
        // compressed (as in the whole-chunk path).
        let (first, read) = self
            .on_cpu(move || {
                let mut cvs: Vec<_> = framed::zero_cvs(len).to_vec();
                let mut data: Vec<Option<Vec<u8>>> = vec![None; n];
                let (mut read, mut plain) = (0, 0);
                for &g in &changed {
                    let r = g * framed::GRAIN..((g + 1) * framed::GRAIN).min(len);
                    let mut buf = vec![0u8; r.len()];
                    img.read_at(&mut buf, start + r.start as u64)?;
                    read += buf.len() as u64;
                    if !cairn_format::zero::is_zero(&buf) {
                        cvs[g] = framed::grain_cv(&buf, g, n, framed::GRAIN);
                        plain += buf.len() as u64;
                        data[g] = Some(buf);
                    }
                }
                img.taken(start, end);
                if plain == 0 {
                    return Ok((
                        Err(Job::Done(ChunkRef::plain(ChunkId::ZERO), Outcome::Zero)),
                        read,
                    ));
                }
                let id = framed::root_of(&cvs, len, framed::GRAIN);
                let r = ChunkRef::plain(id);
                let suspect = quarantined.contains(&id);
                if !suspect && known.lock().expect("poisoned").contains(&id) {
                    return Ok((Err(Job::Done(r, Outcome::Reused)), read));
                }
                let Some(b) = blocking.as_deref() else {
                    return Ok((Ok((r, data, cvs, plain, suspect)), read));
                };
                if !suspect && b.exists(&layout::chunk_key(&id))? {
                    known.lock().expect("poisoned").insert(id);
                    return Ok((Err(Job::Done(r, Outcome::Reused)), read));
                }
                let (sealed_id, sealed) = seal_sparse(&codecs, len, &data, &cvs)?;
                debug_assert_eq!(
                    sealed_id, id,
                    "the sealed chunk's id is its chaining values' root"
                );
                let job = stage_or_hand_back(Some(b), r, sealed, plain, suspect)?;
                if !matches!(job, Job::Store { .. }) {
                    known.lock().expect("poisoned").insert(id);
                }
                Ok::<_, SpaceError>((Err(job), read))
            })
            .await??;
        let job = match first {
            Err(job) => job,
            Ok((r, data, cvs, plain, suspect)) => {
                if !suspect
                    && self
                        .backend
                        .stat(&layout::chunk_key(&r.id))
                        .await?
                        .is_some()
                {
                    self.known.lock().expect("poisoned").insert(r.id);
                    Job::Done(r, Outcome::Reused)
                } else {
                    let codecs = self.codecs.clone();
                    let (sealed_id, sealed) = self
                        .on_cpu(move || seal_sparse(&codecs, len, &data, &cvs))
                        .await??;
                    debug_assert_eq!(
                        sealed_id, r.id,
                        "the sealed chunk's id is its chaining values' root"
                    );
                    Job::Store {
                        r,
                        sealed,
                        plain,
                        suspect,
                    }
                }
            }
        };
        let (r, outcome) = self.finish(job).await?;
        Ok(Some((r, outcome, read)))
    }

    /// Takes a chunk of which only `changed` grains (with the mask of their 4 KiB blocks
    /// that may differ) may differ from `old` (the change base's chunk at the same
    /// position) as a patch: reads only those grains and stores them over `old`'s base,
    /// as deltas (the changed blocks only) where the base's grain is the rest. `None`
    /// (nothing read) when a patch does not fit: `old` is zero, not framed, quarantined,
    /// or the patch would hold more than a quarter of the grains; the caller then takes
    /// the chunk whole.
    async fn patch(
        &self,
        image: &Arc<dyn ChunkSource>,
        start: u64,
        end: u64,
        old: ChunkRef,
        changed: &[(usize, u16)],
    ) -> Result<Option<(ChunkRef, Outcome, u64)>, SpaceError> {
        let len = usize::try_from(end - start).expect("chunk fits in memory");
        if old.id.is_zero() {
            let grains = changed.iter().map(|&(g, _)| g).collect();
            return self.sparse(image, start, end, grains).await;
        }
        let base = old.base.unwrap_or(old.id);
        if self.quarantined.contains(&old.id) || self.quarantined.contains(&base) {
            return Ok(None);
        }
        let key = layout::object_key(&old);
        // The old chunk's table (a patch is small: read whole, its frames are kept).
        let table = framed::table_len(len) as u64;
        let blocking = self.blocking.clone();
        let fetched = match &blocking {
            // Read in the job.
            Some(_) => None,
            None => {
                let stored = match old.base {
                    Some(_) => self.backend.get(&key).await,
                    None => self.backend.get_range(&key, 0..table).await,
                };
                match stored {
                    Ok(b) => Some(b),
                    Err(BackendError::NotFound { .. }) => return Ok(None),
                    Err(e) => return Err(e.into()),
                }
            }
        };
        let changed = changed.to_vec();
        // Only the changed grains are read; the rest is the base's, or the old patch's.
        let img = image.clone();
        let codecs = self.codecs.clone();
        let job = self
            .on_cpu(move || {
                let stored = match fetched {
                    Some(b) => b,
                    None => {
                        let b = blocking.as_deref().expect("no fetch: blocking");
                        let stored = match old.base {
                            Some(_) => b.get(&key),
                            None => b.get_range(&key, 0..table),
                        };
                        match stored {
                            Ok(b) => b,
                            Err(BackendError::NotFound { .. }) => return Ok(None),
                            Err(e) => return Err(e.into()),
                        }
                    }
                };
                let Some((h, own)) = patch_fits(&stored, len, old.base, &changed) else {
                    return Ok(None);
                };
                let n = h.entries.len();
                // Per changed grain: its content, and the blocks that differ from the
                // base's grain (`None`: store it whole).
                let mut data: Vec<Option<(Vec<u8>, Option<u16>)>> = vec![None; n];
                let mut cvs: Vec<_> = h.entries.iter().map(|e| e.cv).collect();
                let mut read = 0;
                for &(g, blocks) in &changed {
                    let r = h.grain_range(g);
                    // The whole grain is read (its chaining value needs it); only the
                    // blocks that differ are compressed and stored.
                    let mut buf = vec![0u8; r.len()];
                    img.read_at(&mut buf, start + r.start as u64)?;
                    cvs[g] = framed::grain_cv(&buf, g, n, framed::GRAIN);
                    read += buf.len() as u64;
                    data[g] = Some((
                        buf,
                        delta_over_base(&h, &stored, old.base.is_some(), g, blocks),
                    ));
                }
                img.taken(start, end);
                let grains: Vec<framed::Grain> = (0..n)
                    .map(|g| match &data[g] {
                        Some((d, Some(mask))) => framed::Grain::Delta {
                            mask: *mask,
                            data: d,
                        },
                        Some((d, None)) => framed::Grain::Data(d),
                        None if own[g] => framed::Grain::Stored {
                            kind: h.entries[g].kind,
                            bytes: &stored[h.frame_range(g)],
                        },
                        None => framed::Grain::Base,
                    })
                    .collect();
                let (id, sealed) = codecs
                    .with(|c| framed::seal(c.compressor(), len, Some(base), &grains, &cvs))
                    .map_err(|e| SpaceError::Internal(format!("compression failed: {e}")))?;
                if id == old.id {
                    return Ok(Some((Job::Done(old, Outcome::Reused), read)));
                }
                if id == base {
                    return Ok(Some((
                        Job::Done(ChunkRef::plain(base), Outcome::Reused),
                        read,
                    )));
                }
                let patch_bytes = patch_plain_bytes(&h, &grains);
                drop(grains);
                let r = ChunkRef {
                    id,
                    base: Some(base),
                };
                let job = stage_or_hand_back(blocking.as_deref(), r, sealed, patch_bytes, false)?;
                Ok::<_, SpaceError>(Some((job, read)))
            })
            .await??;
        let Some((job, read)) = job else {
            return Ok(None);
        };
        let (r, outcome) = self.finish(job).await?;
        Ok(Some((r, outcome, read)))
    }
}

/// The old chunk's header, and which grains a patch over its base owns (its changed
/// grains and the old patch's own), if a patch fits: `stored` (the old chunk's table, or
/// the whole old patch) is framed, of this length and grain, over the same base, and the
/// patch would own at most a quarter of the grains.
fn patch_fits(
    stored: &[u8],
    len: usize,
    old_base: Option<ChunkId>,
    changed: &[(usize, u16)],
) -> Option<(framed::Header, Vec<bool>)> {
    if !framed::is_framed(stored) {
        return None;
    }
    let h = framed::parse_header(stored).ok()?;
    if h.plain_len != len || h.grain() != framed::GRAIN || h.base != old_base {
        return None;
    }
    let n = h.entries.len();
    let mut own: Vec<bool> = h
        .entries
        .iter()
        .map(|e| old_base.is_some() && e.kind != framed::Kind::Base)
        .collect();
    for &(g, _) in changed {
        *own.get_mut(g)? = true;
    }
    (own.iter().filter(|&&o| o).count() <= n / 4).then_some((h, own))
}

/// A patch's own plain bytes: whole grains, or a delta's blocks.
fn patch_plain_bytes(h: &framed::Header, grains: &[framed::Grain]) -> u64 {
    grains
        .iter()
        .enumerate()
        .map(|(g, grain)| {
            let glen = h.grain_range(g).len();
            let mask = match grain {
                framed::Grain::Delta { mask, .. } => *mask,
                framed::Grain::Stored {
                    kind: framed::Kind::Delta,
                    bytes,
                } => u16::from_le_bytes([bytes[0], bytes[1]]),
                framed::Grain::Base => 0,
                _ => u16::MAX,
            };
            framed::delta_blocks(mask, glen, framed::GRAIN / framed::DELTA_BLOCKS)
                .map_or(glen, |b| b.map(|r| r.len()).sum()) as u64
        })
        .sum()
}

/// The blocks of grain `g` that a new patch stores as a delta over the base's grain, given
/// the `blocks` changed since `h` (the old chunk's header; `stored` holds its table and,
/// for a patch, its frames; `is_patch`: the old chunk is a patch, so its base is the new
/// patch's): those blocks where the old grain is the base's, those and the old delta's
/// where it was a delta. `None`: store the grain whole (it was the old patch's own whole
/// grain, or the delta would hold more than three quarters of it).
fn delta_over_base(
    h: &framed::Header,
    stored: &[u8],
    is_patch: bool,
    g: usize,
    blocks: u16,
) -> Option<u16> {
    let mask = match h.entries[g].kind {
        _ if !is_patch => blocks,
        framed::Kind::Base => blocks,
        framed::Kind::Delta => {
            let frame = stored.get(h.frame_range(g))?;
            blocks | u16::from_le_bytes([*frame.first()?, *frame.get(1)?])
        }
        _ => return None,
    };
    let glen = h.grain_range(g).len();
    let block = framed::GRAIN / framed::DELTA_BLOCKS;
    let bytes: usize = framed::delta_blocks(mask, glen, block)?
        .map(|r| r.len())
        .sum();
    (mask != 0 && bytes <= glen / 4 * 3).then_some(mask)
}

/// Creates a recovery point of the given images. See the module documentation.
pub async fn create_point(
    space: &Space,
    opts: &CreateOptions,
    progress: &dyn Progress,
) -> Result<PointRecord, SpaceError> {
    let mut sources = Vec::with_capacity(opts.disks.len());
    for d in &opts.disks {
        cairn_format::name::validate("disk", &d.name)?;
        let image: Arc<dyn ChunkSource> = Arc::new(Image::open_read(&d.path)?);
        sources.push(NamedSource {
            name: d.name.clone(),
            source: image,
        });
    }
    create_point_from(space, opts, &sources, progress).await
}

/// Creates a recovery point of any sources (`opts.disks` is not used). A source with a
/// change base is read only where it changed since that base; if the base point no longer
/// exists with the same disk size and chunk size, this fails with
/// [`SpaceError::BaseGone`] (the caller retries without a base).
pub async fn create_point_from(
    space: &Space,
    opts: &CreateOptions,
    sources: &[NamedSource],
    progress: &dyn Progress,
) -> Result<PointRecord, SpaceError> {
    // Check everything that can be checked before taking a lease or writing anything.
    let mut seen = HashSet::new();
    for d in sources {
        cairn_format::name::validate("disk", &d.name)?;
        if !seen.insert(d.name.clone()) {
            return Err(SpaceError::DuplicateDisk(d.name.clone()));
        }
    }
    if let Some(server) = &opts.server {
        cairn_format::name::validate("server", server)?;
    }

    // Under the lease from here on: the parent chosen below, and every chunk found in the
    // space, stay there until the record is committed (GC cannot sweep meanwhile).
    let lease = lock::acquire_writer(space.backend(), "point create", opts.lease_wait).await?;
    let result = async {
        let parent = match &opts.parent {
            ParentChoice::None => None,
            // The newest point of the same server (or of no server, for loose images).
            ParentChoice::Latest => latest_of(space, opts.server.as_deref()).await?,
            ParentChoice::Id(id) => Some(space.load_point(id).await.map_err(|e| match e {
                SpaceError::PointNotFound(_) => {
                    SpaceError::PointNotFound(format!("{id} (the parent; deleted meanwhile?)"))
                }
                other => other,
            })?),
        };
        write_point(space, opts, sources, parent.as_ref(), &lease, progress).await
    }
    .await;
    let released = lease.release().await;
    let record = result?;
    if let Err(e) = released {
        // The point is committed; a lease left behind goes stale and is removed.
        tracing::warn!(
            "point {} committed, but its lease was not released: {e}",
            record.id
        );
    }
    Ok(record)
}

/// The index of a source's change base, if the base can be used: its record and disk
/// exist with the same size and chunk size.
async fn base_index(
    space: &Space,
    source: &dyn ChunkSource,
    chunk_size: u32,
) -> Result<Option<DiskIndex>, SpaceError> {
    let Some(base) = source.change_base() else {
        return Ok(None);
    };
    let record = match space.load_point(&base.point).await {
        Ok(r) => r,
        Err(SpaceError::PointNotFound(_)) => {
            tracing::info!(
                "change base {} is gone: reading {} whole",
                base.point,
                source.describe()
            );
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let Some(disk) = record.disks.iter().find(|d| d.name == base.disk) else {
        return Ok(None);
    };
    if disk.size != source.size() || record.chunk_size != chunk_size {
        return Ok(None);
    }
    Ok(Some(space.load_index(&record, disk).await?))
}

/// Ids of an index's standalone chunks, and its patches' bases (all stored under
/// `chunks/`); patches' own ids are not (they are stored under their base).
fn standalone_ids(index: &DiskIndex) -> impl Iterator<Item = ChunkId> + '_ {
    (0..index.chunks.len() as u64)
        .map(|i| index.chunk_ref(i))
        .filter(|r| !r.id.is_zero())
        .map(|r| r.base.unwrap_or(r.id))
}

/// The newest point of `server`: records are read newest first, and only until one
/// matches (usually the first).
async fn latest_of(space: &Space, server: Option<&str>) -> Result<Option<PointRecord>, SpaceError> {
    for id in space.point_ids().await?.iter().rev() {
        match space.load_point(id).await {
            Ok(p) if p.server.as_deref() == server => return Ok(Some(p)),
            Ok(_) | Err(SpaceError::PointNotFound(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

async fn write_point(
    space: &Space,
    opts: &CreateOptions,
    sources: &[NamedSource],
    parent: Option<&PointRecord>,
    lease: &lock::Lease,
    progress: &dyn Progress,
) -> Result<PointRecord, SpaceError> {
    let started = Instant::now();
    let snapshot_at = opts.snapshot_at.unwrap_or_else(chrono::Utc::now);
    let id = cairn_format::id::new_point_id();
    let chunk_size = space.config().chunk_size;
    let concurrency = opts.concurrency.max(1);

    // The parent's indexes: per-position comparison, and every id it references.
    let mut parent_indexes = Vec::new();
    let mut known = HashSet::new();
    if let Some(p) = parent {
        for d in &p.disks {
            let index = space.load_index(p, d).await?;
            known.extend(standalone_ids(&index));
            parent_indexes.push((d.name.clone(), index));
        }
    }
    let writer = Writer {
        backend: space.backend().clone(),
        codecs: Arc::new(CodecPool::new(space.config().compression_level)),
        cpu: tokio::sync::Semaphore::new(cpu_slots()),
        pool: BufferPool::new(chunk_size as usize, concurrency),
        known: Arc::new(Mutex::new(known)),
        quarantined: Arc::new(crate::verify::quarantined(space).await?),
        blocking: space.backend().blocking(),
        nice: match opts.cpu_priority {
            Some(priority) => Some(
                NiceThreads::new(cpu_slots(), priority)
                    .map_err(|e| SpaceError::Internal(format!("cannot start threads: {e}")))?,
            ),
            None => None,
        },
    };

    // Change bases: chunks unchanged since a base are taken from its index, unread.
    let mut bases = Vec::with_capacity(sources.len());
    for s in sources {
        let base = base_index(space, &*s.source, chunk_size).await?;
        if let (None, Some(b)) = (&base, s.source.change_base()) {
            // A live source froze only its changed areas: reading the rest would see
            // writes made after the freeze. The caller takes the point again, whole.
            return Err(SpaceError::BaseGone {
                disk: s.name.clone(),
                point: b.point,
            });
        }
        if let Some(b) = &base {
            let mut known = writer.known.lock().expect("poisoned");
            known.extend(standalone_ids(b));
        }
        bases.push(base);
    }

    let total: u64 = sources.iter().map(|s| s.source.size()).sum();
    progress.start("point create", total);
    let mut disks = Vec::with_capacity(sources.len());
    let mut stats = PointStats::default();
    for ((source, base), image) in sources
        .iter()
        .zip(&bases)
        .zip(sources.iter().map(|s| &s.source))
    {
        let disk_started = Instant::now();
        let size = image.size();
        let parent_index = parent_indexes
            .iter()
            .find(|(name, idx)| *name == source.name && idx.chunk_size == chunk_size)
            .map(|(_, idx)| idx);
        let n = chunk_count(size, chunk_size);
        let mut ids = vec![ChunkId::ZERO; usize::try_from(n).expect("chunk count fits")];
        let mut patch_bases = std::collections::BTreeMap::new();
        let mut dstats = PointStats {
            bytes_total: size,
            chunks_total: n,
            ..PointStats::default()
        };
        let writer = &writer;
        let mut results = futures::stream::iter(0..n)
            .map(|i| async move {
                let start = i * u64::from(chunk_size);
                let end = (start + u64::from(chunk_size)).min(size);
                let at = usize::try_from(i).expect("index fits");
                if let Some(b) = base
                    && !image.changed(start, end)
                    && !writer.quarantined.contains(&b.chunks[at])
                {
                    // Unchanged since the base: its chunk, not read.
                    let cid = b.chunk_ref(i);
                    let outcome = if cid.id.is_zero() {
                        Outcome::Zero
                    } else {
                        Outcome::Reused
                    };
                    image.taken(start, end);
                    return Ok::<_, SpaceError>((i, cid, outcome, 0, end - start));
                }
                if let Some(b) = base {
                    // Changed since the base: if only a few grains, store just those.
                    let grains = usize::try_from(end - start)
                        .expect("fits")
                        .div_ceil(framed::GRAIN);
                    let changed: Vec<(usize, u16)> = (0..grains)
                        .filter_map(|g| {
                            let s = start + (g * framed::GRAIN) as u64;
                            let e = (s + framed::GRAIN as u64).min(end);
                            image.changed(s, e).then(|| (g, image.changed_blocks(s, e)))
                        })
                        .collect();
                    if changed.len() <= grains / 4
                        && let Some((cid, outcome, read)) = writer
                            .patch(image, start, end, b.chunk_ref(i), &changed)
                            .await?
                    {
                        return Ok((i, cid, outcome, read, end - start));
                    }
                }
                let parent_ref = parent_index
                    .filter(|p| (p.chunks.len() as u64) > i)
                    .map(|p| p.chunk_ref(i));
                let (cid, outcome, read) = writer.chunk(image, start, end, parent_ref).await?;
                Ok::<_, SpaceError>((i, cid, outcome, read, end - start))
            })
            .buffer_unordered(concurrency);
        while let Some((i, cid, outcome, read, len)) = results.try_next().await? {
            ids[usize::try_from(i).expect("index fits")] = cid.id;
            if let Some(b) = cid.base {
                patch_bases.insert(i, b);
            }
            dstats.bytes_read += read;
            match outcome {
                Outcome::Zero => dstats.chunks_zero += 1,
                Outcome::Reused => dstats.chunks_reused += 1,
                Outcome::New { plain, stored } => {
                    dstats.chunks_new += 1;
                    dstats.bytes_new += plain;
                    dstats.bytes_written += stored;
                }
            }
            progress.advance(len);
        }
        drop(results);
        let chunks_done = Instant::now();
        let index = DiskIndex {
            disk_size: size,
            chunk_size,
            chunks: ids,
            bases: patch_bases,
        };
        // Every chunk and patch the index names is durable before the index is written.
        space.backend().flush_deferred().await?;
        let flushed = Instant::now();
        let encoded = index.encode();
        let checksum = DiskIndex::checksum_of(&encoded);
        let key = layout::index_key(&id, &source.name);
        space
            .backend()
            .put(&key, Bytes::from(encoded), PutMode::Overwrite)
            .await?;
        tracing::debug!(
            disk = %source.name,
            chunks_ms = (chunks_done - disk_started).as_millis(),
            flush_ms = (flushed - chunks_done).as_millis(),
            index_ms = flushed.elapsed().as_millis(),
            "disk taken"
        );
        stats.add(&dstats);
        disks.push(DiskRecord {
            name: source.name.clone(),
            size,
            source: image.describe(),
            index: key,
            index_checksum: checksum,
            stats: dstats,
        });
    }
    progress.finish();

    let record = PointRecord {
        version: RECORD_VERSION,
        id,
        server: opts.server.clone(),
        snapshot_at,
        completed_at: chrono::Utc::now(),
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        trigger: opts.trigger.clone(),
        operator: opts.operator.clone(),
        parent: parent.map(|p| p.id),
        chunk_size,
        disks,
        stats,
    };
    // The commit: the point exists from here on. Only while the lease provably stands:
    // otherwise GC may have swept chunks this point reuses.
    lease.check().await?;
    space
        .backend()
        .put(
            &layout::record_key(&id),
            Bytes::from(record.encode()),
            PutMode::CreateNew,
        )
        .await?;
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::{CpuPriority, NiceThreads};
    use thread_priority::{NormalThreadSchedulePolicy, ThreadSchedulePolicy};

    /// The scheduling policy and nice value a job of threads at `priority` runs with.
    async fn seen_by_a_job(priority: CpuPriority) -> (ThreadSchedulePolicy, i32) {
        let threads = NiceThreads::new(2, priority).unwrap();
        threads
            .run(|| {
                (
                    thread_priority::thread_schedule_policy().unwrap(),
                    rustix::process::getpriority_process(None).unwrap(),
                )
            })
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_live_points_threads_are_idle_and_nice() {
        let (policy, nice) = seen_by_a_job(CpuPriority::BACKGROUND).await;
        assert_eq!(
            policy,
            ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle)
        );
        // Setting the policy resets the nice value: it is set after.
        assert_eq!(nice, 19);
        let (policy, nice) = seen_by_a_job(CpuPriority {
            nice: 10,
            idle: false,
        })
        .await;
        assert_eq!(
            policy,
            ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Other)
        );
        assert_eq!(nice, 10);
    }
}
