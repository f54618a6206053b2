//! A live disk of the pool: the NBD export a guest runs on. Every write passes through
//! here, which is what makes the rest possible:
//!
//! - **Changed-block tracking**: each write, trim or zeroing sets bits (one per 64 KiB) in
//!   a map of the areas changed since the disk's *base* (its latest recovery point). The
//!   map is persisted on clean close; while the disk is open its file says `open`, so
//!   after a crash the map is known to be incomplete and the base is dropped (the next
//!   point reads the whole disk and compares hashes).
//! - **Snapshots** ([`Volume::begin_snapshot`]): under the write gate (no write in
//!   flight), the map is swapped for an empty one and the frozen map says which chunks
//!   the point must read. Until a chunk is taken, the first write to each of its 64 KiB
//!   grains copies the old grain to a local buffer file (copy-before-write); the point
//!   reads grains from the buffer where saved, from the disk elsewhere.
//! - **Clones**: see [`crate::clone`]; reads and writes of chunks not yet copied from the
//!   recovery point fetch them first (copy-on-read).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use cairn_format::id::PointId;
use cairn_nbd::export::{BlockExport, Extent, extents, read_at, zero_range};
use cairn_nbd::handshake::ExportInfo;
use cairn_store::SpaceError;
use cairn_store::source::{ChangeBase, ChunkSource};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::bitmap::Bitmap;
use crate::clone::CloneState;
use crate::error::VolumeError;
use crate::mapfile;
use crate::pool::{DiskMeta, DiskPaths, Pool};

/// Changed-block tracking granularity, and the copy-before-write unit.
pub const GRAIN: u64 = 64 * 1024;
/// Requests up to this size do their file I/O on the runtime thread.
const INLINE_IO: u64 = 256 * 1024;
const SNAP_STRIPES: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CbtState {
    /// Written on clean close: the map is complete.
    Clean,
    /// Written when the disk is opened: found at the next open, it means a crash.
    Open,
}

/// The header of `<disk>.cbt`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CbtHeader {
    pub state: CbtState,
    pub grain: u64,
    pub size: u64,
    /// The point (and its disk) the map is relative to; none: unknown, read everything.
    pub base: Option<BaseRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseRef {
    pub point: PointId,
    pub disk: String,
}

/// Sets the changed-block map of a closed disk: `base` with nothing changed since (after
/// a rollback to it, or for a new clone of it), or no base at all (after an import).
pub fn reset_cbt(paths: &DiskPaths, size: u64, base: Option<BaseRef>) -> Result<(), VolumeError> {
    let header = CbtHeader {
        state: CbtState::Clean,
        grain: GRAIN,
        size,
        base,
    };
    Ok(mapfile::write(
        &paths.cbt,
        &header,
        &Bitmap::new(size.div_ceil(GRAIN)),
    )?)
}

/// Reads a closed disk's changed-block state: its base and map, if valid.
pub fn read_cbt(paths: &DiskPaths, size: u64) -> Result<Option<(BaseRef, Bitmap)>, VolumeError> {
    Ok(match mapfile::read::<CbtHeader>(&paths.cbt)? {
        Some((h, map)) if h.state == CbtState::Clean && h.size == size && h.grain == GRAIN => {
            h.base.map(|b| (b, map))
        }
        _ => None,
    })
}

/// The frozen state of one disk while a recovery point is taken of it.
pub(crate) struct Snap {
    chunk: u64,
    /// Per chunk: its frozen content must be kept (not yet taken into the point).
    needed: Bitmap,
    /// Per grain: the frozen content is in the buffer file.
    saved: Bitmap,
    buffer: File,
    stripes: Vec<Mutex<()>>,
    /// The changed-block map at the freeze.
    frozen: Arc<Bitmap>,
    base: Option<ChangeBase>,
}

impl Snap {
    fn stripe(&self, chunk: u64) -> std::sync::MutexGuard<'_, ()> {
        self.stripes[usize::try_from(chunk % SNAP_STRIPES as u64).expect("small")]
            .lock()
            .expect("poisoned")
    }
}

pub struct Volume {
    pub server: String,
    pub name: String,
    paths: DiskPaths,
    file: Arc<File>,
    size: u64,
    /// Writes hold it shared; a freeze holds it exclusively (so no write is half done).
    gate: tokio::sync::RwLock<()>,
    cbt: Mutex<Arc<Bitmap>>,
    base: Mutex<Option<ChangeBase>>,
    snap: Mutex<Option<Arc<Snap>>>,
    pub(crate) clone: Option<CloneState>,
    closed: watch::Sender<bool>,
    cbt_was_valid: bool,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Volume({}/{})", self.server, self.name)
    }
}

fn grains(offset: u64, len: u64) -> (u64, u64) {
    (offset / GRAIN, (offset + len).div_ceil(GRAIN))
}

impl Volume {
    /// Opens a disk for serving. The caller holds its server's lock. A clone needs the
    /// location's recovery space.
    pub async fn open(
        pool: &Pool,
        meta: &DiskMeta,
        space: Option<&Arc<cairn_store::Space>>,
    ) -> Result<Arc<Volume>, VolumeError> {
        let paths = pool.disk_paths(&meta.server, &meta.name);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&paths.data)
            .map_err(|e| VolumeError::io("cannot open disk", &paths.data, e))?;
        let len = file
            .metadata()
            .map_err(|e| VolumeError::io("cannot stat disk", &paths.data, e))?
            .len();
        if len != meta.size {
            return Err(VolumeError::Malformed {
                path: paths.data.clone(),
                detail: format!(
                    "the file is {len} bytes but the disk's metadata says {}",
                    meta.size
                ),
            });
        }
        let fresh = || Bitmap::new(meta.size.div_ceil(GRAIN));
        let (base, map) = match mapfile::read::<CbtHeader>(&paths.cbt) {
            Ok(Some((h, map)))
                if h.state == CbtState::Clean && h.size == meta.size && h.grain == GRAIN =>
            {
                match h.base {
                    Some(b) => (
                        Some(ChangeBase {
                            point: b.point,
                            disk: b.disk,
                        }),
                        map,
                    ),
                    None => (None, fresh()),
                }
            }
            Ok(Some((h, _))) => {
                if h.state == CbtState::Open {
                    tracing::warn!(
                        "{}/{}: changed-block map invalid (not closed cleanly: crash or kill): the next point reads the whole disk and compares hashes",
                        meta.server,
                        meta.name
                    );
                }
                (None, fresh())
            }
            Ok(None) => (None, fresh()),
            Err(e) => {
                tracing::warn!(
                    "{}/{}: changed-block map unreadable ({e}): the next point reads the whole disk",
                    meta.server,
                    meta.name
                );
                (None, fresh())
            }
        };
        let cbt_was_valid = base.is_some();
        let file = Arc::new(file);
        let clone = match &meta.origin {
            None => None,
            Some(origin) => Some(CloneState::open(pool, meta, origin, &paths, space).await?),
        };
        // From here on the map on disk is `open`: a crash leaves it invalid.
        mapfile::write(
            &paths.cbt,
            &CbtHeader {
                state: CbtState::Open,
                grain: GRAIN,
                size: meta.size,
                base: None,
            },
            &Bitmap::new(0),
        )?;

        let (closed, _) = watch::channel(false);
        Ok(Arc::new(Volume {
            server: meta.server.clone(),
            name: meta.name.clone(),
            paths,
            file,
            size: meta.size,
            gate: tokio::sync::RwLock::new(()),
            cbt: Mutex::new(Arc::new(map)),
            base: Mutex::new(base),
            snap: Mutex::new(None),
            clone,
            closed,
            cbt_was_valid,
        }))
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// Whether the changed-block map was valid when the disk was opened.
    pub fn cbt_was_valid(&self) -> bool {
        self.cbt_was_valid
    }

    pub fn change_base(&self) -> Option<ChangeBase> {
        self.base.lock().expect("poisoned").clone()
    }

    /// Bytes marked changed since the base.
    pub fn changed_bytes(&self) -> u64 {
        self.cbt.lock().expect("poisoned").count() * GRAIN
    }

    /// Stops serving: connections are told to close, data is synced, the changed-block
    /// map is written as clean (and a clone's hydration map saved).
    pub async fn close(&self) -> Result<(), VolumeError> {
        self.closed.send_replace(true);
        // Wait for writes in flight.
        let _g = self.gate.write().await;
        rustix::fs::fdatasync(&*self.file)
            .map_err(|e| VolumeError::io("cannot sync disk", &self.paths.data, e.into()))?;
        if let Some(c) = &self.clone {
            c.persist(&self.file)?;
        }
        let base = self.change_base().map(|b| BaseRef {
            point: b.point,
            disk: b.disk,
        });
        let map = self.cbt.lock().expect("poisoned").clone();
        // A point still being taken may not commit: its frozen changes count as changes
        // since the base until it does.
        if let Some(snap) = self.snap.lock().expect("poisoned").as_ref() {
            map.merge(&snap.frozen);
        }
        mapfile::write(
            &self.paths.cbt,
            &CbtHeader {
                state: CbtState::Clean,
                grain: GRAIN,
                size: self.size,
                base,
            },
            &map,
        )?;
        Ok(())
    }

    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    fn mark_changed(&self, offset: u64, len: u64) {
        let (a, b) = grains(offset, len);
        self.cbt.lock().expect("poisoned").set_range(a, b);
    }

    /// Copy-before-write: keeps the frozen content of `[offset, offset+len)` where a
    /// point still needs it. Blocking.
    fn preserve(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let Some(snap) = self.snap.lock().expect("poisoned").clone() else {
            return Ok(());
        };
        let end = offset + len;
        let mut c = offset / snap.chunk;
        while c * snap.chunk < end {
            if snap.needed.get(c) {
                let _g = snap.stripe(c);
                if snap.needed.get(c) {
                    let from = (c * snap.chunk).max(offset);
                    let to = ((c + 1) * snap.chunk).min(end);
                    let (g0, g1) = grains(from, to - from);
                    let mut buf = Vec::new();
                    for g in g0..g1 {
                        if snap.saved.get(g) {
                            continue;
                        }
                        let start = g * GRAIN;
                        let n = GRAIN.min(self.size - start);
                        buf.resize(usize::try_from(n).expect("small"), 0);
                        self.file.read_exact_at(&mut buf, start)?;
                        snap.buffer.write_all_at(&buf, start)?;
                        snap.saved.set(g);
                    }
                }
            }
            c += 1;
        }
        Ok(())
    }

    /// Runs blocking file work inline when small, on the blocking pool otherwise.
    async fn run<T: Send + 'static>(
        self: &Arc<Self>,
        inline: bool,
        f: impl FnOnce(&Volume) -> std::io::Result<T> + Send + 'static,
    ) -> std::io::Result<T> {
        if inline {
            f(self)
        } else {
            let me = self.clone();
            tokio::task::spawn_blocking(move || f(&me))
                .await
                .map_err(std::io::Error::other)?
        }
    }

    /// Everything a change to `[offset, offset+len)` needs before it: a clone fetches
    /// the chunks it only partly covers (all it covers while a point is taken); then
    /// copy-before-write. Returns the clone's chunk guard, held until the change is done.
    async fn before_change(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
    ) -> std::io::Result<Option<crate::clone::ChangeGuard>> {
        let guard = match &self.clone {
            Some(c) => {
                let whole_ok = self.snap.lock().expect("poisoned").is_none();
                Some(c.before_change(&self.file, offset, len, whole_ok).await?)
            }
            None => None,
        };
        Ok(guard)
    }

    /// After [`Self::close`] every request fails (ESHUTDOWN): the server is stopped and
    /// its disks may be changed by offline operations.
    fn check_open(&self) -> std::io::Result<()> {
        if self.is_closed() {
            return Err(std::io::Error::from_raw_os_error(
                rustix::io::Errno::SHUTDOWN.raw_os_error(),
            ));
        }
        Ok(())
    }

    pub async fn write_at(
        self: &Arc<Self>,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> std::io::Result<()> {
        let _gate = self.gate.read().await;
        self.check_open()?;
        let len = data.len() as u64;
        let guard = self.before_change(offset, len).await?;
        // While a point is taken, copy-before-write may wait for the point's reader of
        // the same chunk: never on a runtime thread, which serves other requests too.
        let snapshot = self.snap.lock().expect("poisoned").is_some();
        self.run(len <= INLINE_IO && !fua && !snapshot, move |v| {
            v.preserve(offset, len)?;
            v.file.write_all_at(&data, offset)?;
            if fua {
                rustix::fs::fdatasync(&*v.file)?;
            }
            Ok(())
        })
        .await?;
        self.after_change(guard, offset, len, fua).await
    }

    async fn after_change(
        self: &Arc<Self>,
        guard: Option<crate::clone::ChangeGuard>,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> std::io::Result<()> {
        self.mark_changed(offset, len);
        if let (Some(c), Some(g)) = (&self.clone, guard) {
            c.after_change(g);
            if fua {
                self.persist_clone().await?;
            }
        }
        Ok(())
    }

    /// Saves a clone's present map if it changed (after syncing the data).
    pub(crate) async fn persist_clone(self: &Arc<Self>) -> std::io::Result<()> {
        match &self.clone {
            Some(c) if c.is_dirty() => {}
            _ => return Ok(()),
        }
        self.run(false, |v| {
            v.clone
                .as_ref()
                .map_or(Ok(()), |c| c.persist(&v.file))
                .map_err(std::io::Error::from)
        })
        .await
    }

    /// Copies every chunk a clone still lacks, `concurrency` at once, saving the map every
    /// few seconds; `advance` gets the bytes of each chunk done. Stops early when `stop`
    /// turns true (the map is saved: hydration resumes from there).
    pub async fn hydrate(
        self: &Arc<Self>,
        concurrency: usize,
        advance: &(dyn Fn(u64) + Send + Sync),
        stop: &watch::Receiver<bool>,
    ) -> Result<(), VolumeError> {
        use futures::StreamExt;
        let Some(c) = &self.clone else {
            return Ok(());
        };
        let mut last_save = std::time::Instant::now();
        let mut done = futures::stream::iter(c.absent())
            .map(|i| async move {
                c.fetch(&self.file, i).await?;
                Ok::<u64, std::io::Error>(c.chunk_len(i))
            })
            .buffer_unordered(concurrency.max(1));
        while let Some(r) = done.next().await {
            let n = r.map_err(|e| VolumeError::Other(e.to_string()))?;
            advance(n);
            if *stop.borrow() || self.is_closed() {
                break;
            }
            if last_save.elapsed() > std::time::Duration::from_secs(2) {
                self.persist_clone().await.map_err(|e| {
                    VolumeError::io("cannot save hydration map", &self.paths.present, e)
                })?;
                last_save = std::time::Instant::now();
            }
        }
        drop(done);
        self.persist_clone()
            .await
            .map_err(|e| VolumeError::io("cannot save hydration map", &self.paths.present, e))
    }

    /// Whether this is a clone whose every chunk is present.
    pub fn is_hydrated(&self) -> bool {
        self.clone.as_ref().is_none_or(|c| c.is_hydrated())
    }

    /// For a clone: (present chunks, all chunks, bytes fetched so far).
    pub fn hydration(&self) -> Option<(u64, u64, u64)> {
        self.clone.as_ref().map(|c| {
            (
                c.present_count(),
                c.chunks(),
                c.fetched_bytes.load(std::sync::atomic::Ordering::Relaxed),
            )
        })
    }

    pub async fn read_at(self: &Arc<Self>, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
        self.check_open()?;
        if let Some(c) = &self.clone {
            c.ensure_present(&self.file, offset, len).await?;
        }
        self.run(len <= INLINE_IO, move |v| {
            read_at(
                &v.file,
                offset,
                usize::try_from(len).expect("request size is limited"),
            )
        })
        .await
    }

    async fn zero(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
        punch: bool,
        fua: bool,
    ) -> std::io::Result<()> {
        let _gate = self.gate.read().await;
        self.check_open()?;
        let guard = self.before_change(offset, len).await?;
        self.run(false, move |v| {
            v.preserve(offset, len)?;
            if !(punch && cairn_nbd::export::punch(&v.file, offset, len).is_ok()) {
                zero_range(&v.file, offset, len)?;
            }
            if fua {
                rustix::fs::fdatasync(&*v.file)?;
            }
            Ok(())
        })
        .await?;
        self.after_change(guard, offset, len, fua).await
    }

    pub async fn flush(self: &Arc<Self>) -> std::io::Result<()> {
        self.check_open()?;
        self.run(false, |v| Ok(rustix::fs::fdatasync(&*v.file)?))
            .await?;
        self.persist_clone().await
    }

    async fn extents(self: &Arc<Self>, offset: u64, len: u32) -> std::io::Result<Vec<Extent>> {
        let mut len = len;
        if let Some(c) = &self.clone {
            if let Some(e) = c.extents_if_absent(offset, len) {
                return Ok(e);
            }
            // The data file describes present chunks only.
            len = c.present_run(offset, len);
        }
        self.run(false, move |v| extents(&v.file, offset, len))
            .await
    }

    /// Freezes this disk for a point (the caller holds the write gate of every disk of
    /// the server, see [`crate::host::freeze`]). `chunk` is the space's chunk size.
    pub(crate) fn begin_snapshot(&self, chunk: u64) -> Result<(), VolumeError> {
        if self.snap.lock().expect("poisoned").is_some() {
            return Err(VolumeError::Other(format!(
                "a recovery point of {}/{} is already being taken",
                self.server, self.name
            )));
        }
        let frozen = {
            let mut cbt = self.cbt.lock().expect("poisoned");
            std::mem::replace(&mut *cbt, Arc::new(Bitmap::new(self.size.div_ceil(GRAIN))))
        };
        let base = self.change_base();
        let chunks = self.size.div_ceil(chunk);
        let needed = if base.is_some() {
            let n = Bitmap::new(chunks);
            for g in frozen.ones() {
                n.set(g * GRAIN / chunk);
            }
            n
        } else {
            Bitmap::full(chunks)
        };
        let buffer = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&self.paths.cow)
            .map_err(|e| {
                VolumeError::io("cannot create the snapshot buffer", &self.paths.cow, e)
            })?;
        buffer
            .set_len(self.size)
            .map_err(|e| VolumeError::io("cannot size the snapshot buffer", &self.paths.cow, e))?;
        *self.snap.lock().expect("poisoned") = Some(Arc::new(Snap {
            chunk,
            needed,
            saved: Bitmap::new(self.size.div_ceil(GRAIN)),
            buffer,
            stripes: (0..SNAP_STRIPES).map(|_| Mutex::new(())).collect(),
            frozen,
            base,
        }));
        Ok(())
    }

    /// Ends the snapshot: on success the point is the new base; on failure the frozen
    /// changes go back into the map (nothing is lost for the next point).
    pub(crate) fn end_snapshot(&self, point: Option<PointId>) {
        let Some(snap) = self.snap.lock().expect("poisoned").take() else {
            return;
        };
        match point {
            Some(id) => {
                *self.base.lock().expect("poisoned") = Some(ChangeBase {
                    point: id,
                    disk: self.name.clone(),
                })
            }
            None => self.cbt.lock().expect("poisoned").merge(&snap.frozen),
        }
        // Unlinking a large sparse buffer can take a while: not on the request path.
        let cow = self.paths.cow.clone();
        let stale = cow.with_extension(format!("cow-{}", uuid::Uuid::new_v4().simple()));
        if std::fs::rename(&cow, &stale).is_ok() {
            std::thread::spawn(move || std::fs::remove_file(stale));
        }
    }

    /// Forgets the base (the next point reads the whole disk).
    pub(crate) fn drop_base(&self) {
        *self.base.lock().expect("poisoned") = None;
    }

    pub(crate) async fn gate_exclusive(&self) -> tokio::sync::RwLockWriteGuard<'_, ()> {
        self.gate.write().await
    }

    /// The frozen disk as a point's source (valid between begin and end of a snapshot).
    pub(crate) fn snapshot_source(self: &Arc<Self>) -> Arc<dyn ChunkSource> {
        let snap = self
            .snap
            .lock()
            .expect("poisoned")
            .clone()
            .expect("snapshot begun");
        Arc::new(SnapSource {
            volume: self.clone(),
            snap,
            runtime: tokio::runtime::Handle::current(),
        })
    }
}

/// A frozen disk, read by point creation.
struct SnapSource {
    volume: Arc<Volume>,
    snap: Arc<Snap>,
    runtime: tokio::runtime::Handle,
}

impl ChunkSource for SnapSource {
    fn size(&self) -> u64 {
        self.volume.size
    }

    fn describe(&self) -> String {
        format!("{}/{}", self.volume.server, self.volume.name)
    }

    fn may_have_data(&self, start: u64, end: u64) -> bool {
        if let Some(c) = &self.volume.clone
            && c.origin_may_have_data(start, end)
        {
            return true;
        }
        // The data file first, then the buffer: a grain punched after the freeze was
        // saved before the punch, so it is seen by the second check.
        let data = match rustix::fs::seek(&*self.volume.file, rustix::fs::SeekFrom::Data(start)) {
            Ok(next) => next < end,
            Err(rustix::io::Errno::NXIO) => false,
            Err(_) => true,
        };
        let (g0, g1) = grains(start, end - start);
        data || self.snap.saved.any_in(g0, g1)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), SpaceError> {
        let len = buf.len() as u64;
        let err =
            |e: std::io::Error| SpaceError::image("cannot read disk", &self.volume.paths.data, e);
        if let Some(c) = &self.volume.clone {
            self.runtime
                .block_on(c.ensure_present(&self.volume.file, offset, len))
                .map_err(err)?;
        }
        let c = offset / self.snap.chunk;
        let last = (offset + len - 1) / self.snap.chunk;
        let _guards: Vec<_> = (c..=last).map(|c| self.snap.stripe(c)).collect();
        let (g0, g1) = grains(offset, len);
        for g in g0..g1 {
            let from = (g * GRAIN).max(offset);
            let to = ((g + 1) * GRAIN).min(offset + len);
            let part = &mut buf[usize::try_from(from - offset).expect("small")
                ..usize::try_from(to - offset).expect("small")];
            if self.snap.saved.get(g) {
                self.snap.buffer.read_exact_at(part, from).map_err(err)?;
            } else {
                self.volume.file.read_exact_at(part, from).map_err(err)?;
            }
        }
        Ok(())
    }

    fn change_base(&self) -> Option<ChangeBase> {
        self.snap.base.clone()
    }

    fn changed(&self, start: u64, end: u64) -> bool {
        if self.snap.base.is_none() {
            return true;
        }
        let (g0, g1) = grains(start, end - start);
        self.snap.frozen.any_in(g0, g1)
    }

    fn taken(&self, start: u64, end: u64) {
        let mut c = start / self.snap.chunk;
        while c * self.snap.chunk < end {
            let _g = self.snap.stripe(c);
            self.snap.needed.clear(c);
            c += 1;
        }
    }
}

/// A live disk as an NBD export.
pub struct VolumeExport {
    pub volume: Arc<Volume>,
    pub info: ExportInfo,
}

#[async_trait::async_trait]
impl BlockExport for VolumeExport {
    fn info(&self) -> ExportInfo {
        self.info.clone()
    }

    async fn read(&self, offset: u64, len: u32) -> std::io::Result<Vec<u8>> {
        self.volume.read_at(offset, u64::from(len)).await
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> std::io::Result<()> {
        self.volume.write_at(offset, data, fua).await
    }

    async fn flush(&self) -> std::io::Result<()> {
        self.volume.flush().await
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> std::io::Result<()> {
        self.volume.zero(offset, u64::from(len), true, fua).await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        may_punch: bool,
        fua: bool,
    ) -> std::io::Result<()> {
        self.volume
            .zero(offset, u64::from(len), may_punch, fua)
            .await
    }

    async fn block_status(&self, offset: u64, len: u32) -> std::io::Result<Vec<Extent>> {
        self.volume.extents(offset, len).await
    }

    /// A stopped server's clients are disconnected.
    fn closed(&self) -> Option<watch::Receiver<bool>> {
        Some(self.volume.closed.subscribe())
    }
}
