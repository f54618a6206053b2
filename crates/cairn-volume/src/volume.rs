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
//!   the point must read. Until the point has read a unit (4 KiB on disks up to 256 GiB,
//!   see [`cow_unit`]) of those chunks, the first write to it copies the old unit to a
//!   local buffer file (copy-before-write), appended (its blocks allocated in save order,
//!   not one extent per scattered unit, so its removal is cheap); the point reads units from
//!   the buffer where saved, from the disk elsewhere. Each unit has its own state (two bits, changed by
//!   compare-and-swap): a guest write never waits for the point's reader, only (rarely)
//!   for another write copying the same unit.
//! - **Clones**: see [`crate::clone`]; reads and writes of chunks not yet copied from the
//!   recovery point fetch them first (copy-on-read).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

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

/// Changed-block tracking granularity.
pub const GRAIN: u64 = 64 * 1024;
/// The changed-block map's detail inside a grain: its 4 KiB blocks (those of a chunk
/// envelope's delta frames).
const BLOCK: u64 = GRAIN / cairn_format::framed::DELTA_BLOCKS as u64;
/// At most this many grains written only in part are remembered as such (about 8 MiB);
/// past it, a grain first written in part counts as changed whole.
const PARTIAL_MAX: usize = 1 << 18;
/// The smallest copy-before-write unit: a guest's 4 KiB write preserves 4 KiB, not a grain.
const COW_MIN: u64 = 4096;
/// Copy-before-write state is kept for at most about this many units (2 bits each, so
/// 16 MiB while a point is taken); larger disks get larger units, up to a grain.
const COW_UNITS: u64 = 1 << 26;

/// The copy-before-write unit of a disk of `size` bytes: 4 KiB up to 256 GiB, then
/// doubling, at most a grain (which divides it evenly: chunks are whole grains).
fn cow_unit(size: u64) -> u64 {
    size.div_ceil(COW_UNITS)
        .next_power_of_two()
        .clamp(COW_MIN, GRAIN)
}
/// Requests up to this size do their file I/O on the runtime thread.
const INLINE_IO: u64 = 256 * 1024;

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

/// Copy-before-write state of a unit (see [`cow_unit`]) while a point is taken. The
/// transitions are `KEEP → SAVING → SAVED` (a guest write copies the unit to the buffer
/// first; an error while copying goes back `SAVING → KEEP`) and `KEEP → FREE` (the point
/// has read it); `FREE` and `SAVED` are final. While a unit is `KEEP` or `SAVING` the
/// data file holds its frozen content (a write to it waits for `SAVED` or `FREE`); once
/// `SAVED` the buffer does.
const FREE: u64 = 0;
const KEEP: u64 = 1;
const SAVING: u64 = 2;
const SAVED: u64 = 3;
const PER_WORD: u64 = 32;

/// Two bits per copy-before-write unit in atomic words.
struct UnitStates {
    units: u64,
    words: Vec<AtomicU64>,
}

impl UnitStates {
    fn new(units: u64) -> UnitStates {
        let n = usize::try_from(units.div_ceil(PER_WORD)).expect("fits in memory");
        UnitStates {
            units,
            words: (0..n).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn at(g: u64) -> (usize, u32) {
        (
            usize::try_from(g / PER_WORD).expect("fits"),
            u32::try_from(g % PER_WORD * 2).expect("small"),
        )
    }

    fn get(&self, g: u64) -> u64 {
        let (w, shift) = Self::at(g);
        (self.words[w].load(Ordering::SeqCst) >> shift) & 3
    }

    /// Sets units `[a, b)` (all `FREE`) to `KEEP`; before the snapshot is shared.
    fn keep(&self, a: u64, b: u64) {
        let b = b.min(self.units);
        let mut g = a;
        while g < b {
            let (w, shift) = Self::at(g);
            if shift == 0 && g + PER_WORD <= b {
                // A whole word (the freeze holds every write: keep it short).
                self.words[w].fetch_or(0x5555_5555_5555_5555, Ordering::Relaxed);
                g += PER_WORD;
            } else {
                self.words[w].fetch_or(KEEP << shift, Ordering::Relaxed);
                g += 1;
            }
        }
    }

    /// Moves unit `g` from `from` to `to`; on failure returns its state.
    fn swap(&self, g: u64, from: u64, to: u64) -> Result<(), u64> {
        let (w, shift) = Self::at(g);
        let mask = 3u64 << shift;
        self.words[w]
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |word| {
                (word & mask == from << shift).then_some(word & !mask | to << shift)
            })
            .map(|_| ())
            .map_err(|word| (word & mask) >> shift)
    }

    /// Moves every `KEEP` unit of `[a, b)` to `FREE`, one atomic update per word; calls
    /// `other(g, state)` for each unit of the range that was not `KEEP` (its state then).
    fn free_kept(&self, a: u64, b: u64, mut other: impl FnMut(u64, u64)) {
        const LOW: u64 = 0x5555_5555_5555_5555;
        let b = b.min(self.units);
        let mut g = a;
        while g < b {
            let (w, shift) = Self::at(g);
            let n = (PER_WORD - u64::from(shift / 2)).min(b - g);
            let range = if n == PER_WORD {
                u64::MAX
            } else {
                ((1u64 << (2 * n)) - 1) << shift
            };
            // A field is KEEP (0b01) where its low bit is set and its high bit is not.
            let kept = |word: u64| word & !(word >> 1) & LOW & range;
            let old = match self.words[w].fetch_update(Ordering::SeqCst, Ordering::SeqCst, |word| {
                let k = kept(word);
                (k != 0).then_some(word & !k)
            }) {
                Ok(old) | Err(old) => old,
            };
            let k = kept(old);
            for i in 0..n {
                let at = shift + 2 * u32::try_from(i).expect("small");
                if k >> at & 1 == 0 {
                    other(g + i, old >> at & 3);
                }
            }
            g += n;
        }
    }

    /// Whether any unit of `[a, b)` is in one of `states` (a bit set of states).
    fn any(&self, a: u64, b: u64, states: u8) -> bool {
        (a..b.min(self.units)).any(|g| states & (1 << self.get(g)) != 0)
    }
}

/// The areas changed since the base: a bit per grain, and for grains written only in
/// part, which of their 4 KiB blocks (bit i = block i). A grain whose bit is set and that
/// has no entry in `partial` changed whole. The detail is kept in memory only (the map
/// file holds the grains): after a restart, every changed grain counts whole.
struct Changes {
    map: Arc<Bitmap>,
    partial: std::collections::HashMap<u64, u16>,
    /// At most this many entries in `partial`.
    cap: usize,
}

impl Changes {
    fn new(map: Bitmap) -> Changes {
        Changes {
            map: Arc::new(map),
            partial: std::collections::HashMap::new(),
            cap: PARTIAL_MAX,
        }
    }

    /// Marks `[offset, offset+len)` of a disk of `size` bytes changed.
    fn mark(&mut self, offset: u64, len: u64, size: u64) {
        let (a, b) = grains(offset, len);
        let end = offset + len;
        let mut g = a;
        while g < b {
            let (gs, ge) = (g * GRAIN, ((g + 1) * GRAIN).min(size));
            let (from, to) = (offset.max(gs) - gs, end.min(ge) - gs);
            if from == 0 && to == ge - gs {
                // Whole grains, up to the last one the range covers whole.
                let last = if end >= size { b } else { end / GRAIN };
                self.map.set_range(g, last);
                if !self.partial.is_empty() {
                    if last - g < self.partial.len() as u64 {
                        for x in g..last {
                            self.partial.remove(&x);
                        }
                    } else {
                        self.partial.retain(|x, _| !(g..last).contains(x));
                    }
                }
                g = last;
                continue;
            }
            let mask = cairn_format::framed::delta_mask(
                usize::try_from(from).expect("within a grain"),
                usize::try_from(to).expect("within a grain"),
                usize::try_from(BLOCK).expect("small"),
            );
            if self.map.set(g) {
                if self.partial.len() < self.cap {
                    self.partial.insert(g, mask);
                }
            } else if let Some(m) = self.partial.get_mut(&g) {
                *m |= mask;
            }
            g += 1;
        }
    }

    /// Adds `other`'s changes (a frozen map given back after a failed point).
    fn merge(&mut self, other: &Bitmap, other_partial: &std::collections::HashMap<u64, u16>) {
        for g in other.ones() {
            let theirs = other_partial.get(&g).copied();
            if self.map.set(g) {
                if let Some(m) = theirs
                    && self.partial.len() < self.cap
                {
                    self.partial.insert(g, m);
                }
            } else {
                match (self.partial.get_mut(&g), theirs) {
                    (Some(m), Some(t)) => *m |= t,
                    (Some(_), None) => {
                        self.partial.remove(&g);
                    }
                    (None, _) => {}
                }
            }
        }
    }

    /// The 4 KiB blocks of grain `g` that changed (all for a whole grain, none when the
    /// grain did not change).
    fn blocks(map: &Bitmap, partial: &std::collections::HashMap<u64, u16>, g: u64) -> u16 {
        if !map.get(g) {
            return 0;
        }
        partial.get(&g).copied().unwrap_or(u16::MAX)
    }
}

/// The frozen state of one disk while a recovery point is taken of it.
pub(crate) struct Snap {
    /// The copy-before-write unit (bytes, a power of two dividing a grain).
    unit: u64,
    /// Per unit: where its frozen content is, and whether the point still needs it.
    states: UnitStates,
    /// Saved units, appended in the order they were saved (`None` only while dropped).
    buffer: Option<File>,
    /// The buffer's length (where the next saved unit goes).
    appended: AtomicU64,
    /// Where each saved unit is in the buffer (in units), sharded by unit number. Set
    /// before the unit is `SAVED`; 20–40 bytes of memory per unit saved (hash map entry).
    slots: Vec<Mutex<std::collections::HashMap<u64, u32>>>,
    /// Writers (or the reader) waiting for a unit being saved.
    waiters: AtomicUsize,
    parked: Mutex<()>,
    saved: Condvar,
    /// The changed-block map at the freeze, and its detail inside grains.
    frozen: Arc<Bitmap>,
    frozen_partial: std::collections::HashMap<u64, u16>,
    base: Option<ChangeBase>,
}

/// Shards of [`Snap::slots`].
const SLOT_SHARDS: usize = 16;

impl Drop for Snap {
    /// The buffer is closed on a thread of its own: the last close of an unlinked file
    /// frees its blocks (with online discard, one device request per extent), which must
    /// not hold a runtime worker or the point's answer.
    fn drop(&mut self) {
        if let Some(f) = self.buffer.take() {
            let _ = std::thread::Builder::new()
                .name("cairn-cow-drop".into())
                .spawn(move || drop(f));
        }
    }
}

impl Snap {
    fn buffer(&self) -> &File {
        self.buffer.as_ref().expect("open until dropped")
    }

    fn shard(g: u64) -> usize {
        usize::try_from(g % SLOT_SHARDS as u64).expect("small")
    }

    /// Appends unit `g`'s frozen content to the buffer and records where it is.
    fn save(&self, g: u64, data: &[u8]) -> std::io::Result<()> {
        let at = self.appended.fetch_add(self.unit, Ordering::Relaxed);
        self.buffer().write_all_at(data, at)?;
        let slot = u32::try_from(at / self.unit).map_err(std::io::Error::other)?;
        self.slots[Self::shard(g)]
            .lock()
            .expect("poisoned")
            .insert(g, slot);
        Ok(())
    }

    /// Reads `buf.len()` bytes of saved unit `g`'s frozen content, from `skip` into it.
    fn read_saved(&self, g: u64, skip: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let slot = self.slots[Self::shard(g)]
            .lock()
            .expect("poisoned")
            .get(&g)
            .copied()
            .ok_or_else(|| std::io::Error::other(format!("saved unit {g} not in the buffer")))?;
        self.buffer()
            .read_exact_at(buf, u64::from(slot) * self.unit + skip)
    }

    /// The units `[first, end)` covering `[offset, offset+len)`.
    fn units(&self, offset: u64, len: u64) -> (u64, u64) {
        (offset / self.unit, (offset + len).div_ceil(self.unit))
    }

    /// Waits while unit `g` is being saved by a write; returns its state then.
    fn wait_saving(&self, g: u64) -> u64 {
        for _ in 0..100 {
            let s = self.states.get(g);
            if s != SAVING {
                return s;
            }
            std::hint::spin_loop();
        }
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let mut parked = self.parked.lock().expect("poisoned");
        let s = loop {
            let s = self.states.get(g);
            if s != SAVING {
                break s;
            }
            parked = self
                .saved
                .wait_timeout(parked, std::time::Duration::from_millis(1))
                .expect("poisoned")
                .0;
        };
        drop(parked);
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        s
    }

    /// Ends the saving of unit `g` (to `SAVED`, or back to `KEEP` after an error).
    fn saved(&self, g: u64, to: u64) {
        self.states
            .swap(g, SAVING, to)
            .expect("only the saver changes a unit being saved");
        if self.waiters.load(Ordering::SeqCst) > 0 {
            let _parked = self.parked.lock().expect("poisoned");
            self.saved.notify_all();
        }
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
    cbt: Mutex<Changes>,
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
            cbt: Mutex::new(Changes::new(map)),
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
        self.cbt.lock().expect("poisoned").map.count() * GRAIN
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
        let map = self.cbt.lock().expect("poisoned").map.clone();
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
        self.cbt
            .lock()
            .expect("poisoned")
            .mark(offset, len, self.size);
    }

    /// Copy-before-write: keeps the frozen content of `[offset, offset+len)` where a
    /// point still needs it. Blocking; waits only for other writes saving the same grains.
    fn preserve(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let Some(snap) = self.snap.lock().expect("poisoned").clone() else {
            return Ok(());
        };
        let (g0, g1) = snap.units(offset, len);
        let mut buf = Vec::new();
        for g in g0..g1 {
            let mut state = snap.states.get(g);
            loop {
                match state {
                    FREE | SAVED => break,
                    SAVING => state = snap.wait_saving(g),
                    _ => match snap.states.swap(g, KEEP, SAVING) {
                        Err(now) => state = now,
                        Ok(()) => {
                            // Nothing writes this unit until it is SAVED: the data file
                            // still holds the frozen content.
                            #[cfg(test)]
                            std::thread::sleep(std::time::Duration::from_micros(
                                tests::SAVE_PAUSE_US.load(Ordering::Relaxed),
                            ));
                            let start = g * snap.unit;
                            buf.resize(
                                usize::try_from(snap.unit.min(self.size - start)).expect("small"),
                                0,
                            );
                            let copied = self
                                .file
                                .read_exact_at(&mut buf, start)
                                .and_then(|()| snap.save(g, &buf));
                            snap.saved(g, if copied.is_ok() { SAVED } else { KEEP });
                            copied?;
                            break;
                        }
                    },
                }
            }
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
        // Copy-before-write never waits for the point's reader: at most one local read
        // and write of each unit, like the write itself.
        self.run(len <= INLINE_IO && !fua, move |v| {
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
        let Changes {
            map: frozen,
            partial: frozen_partial,
            ..
        } = {
            let mut cbt = self.cbt.lock().expect("poisoned");
            std::mem::replace(
                &mut *cbt,
                Changes::new(Bitmap::new(self.size.div_ceil(GRAIN))),
            )
        };
        let base = self.change_base();
        // The units of every chunk the point reads: all, or those of changed chunks.
        let unit = cow_unit(self.size);
        #[cfg(test)]
        let unit = match tests::UNIT.load(Ordering::Relaxed) {
            0 => unit,
            u => u,
        };
        let states = UnitStates::new(self.size.div_ceil(unit));
        let per_chunk = chunk.div_ceil(unit).max(1);
        if base.is_some() {
            let mut last = None;
            for g in frozen.ones() {
                let c = g * GRAIN / (per_chunk * unit);
                if last != Some(c) {
                    states.keep(c * per_chunk, (c + 1) * per_chunk);
                    last = Some(c);
                }
            }
        } else {
            states.keep(0, states.units);
        }
        let buffer = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&self.paths.cow)
            .map_err(|e| {
                VolumeError::io("cannot create the snapshot buffer", &self.paths.cow, e)
            })?;
        *self.snap.lock().expect("poisoned") = Some(Arc::new(Snap {
            unit,
            states,
            buffer: Some(buffer),
            appended: AtomicU64::new(0),
            slots: (0..SLOT_SHARDS).map(|_| Mutex::default()).collect(),
            waiters: AtomicUsize::new(0),
            parked: Mutex::new(()),
            saved: Condvar::new(),
            frozen,
            frozen_partial,
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
            None => self
                .cbt
                .lock()
                .expect("poisoned")
                .merge(&snap.frozen, &snap.frozen_partial),
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
        let (g0, g1) = self.snap.units(start, end - start);
        data || self.snap.states.any(g0, g1, 1 << SAVING | 1 << SAVED)
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
        // The whole range from the data file at once; then each unit is taken (it was
        // not written meanwhile: what was read is its frozen content) or, where a write
        // saved it first, read again from the buffer.
        self.volume.file.read_exact_at(buf, offset).map_err(err)?;
        #[cfg(test)]
        std::thread::sleep(std::time::Duration::from_micros(
            tests::READ_PAUSE_US.load(Ordering::Relaxed),
        ));
        let (g0, g1) = self.snap.units(offset, len);
        let unit = self.snap.unit;
        // Every KEEP unit is taken at once (what was read is its frozen content); the
        // others one by one.
        let mut others = Vec::new();
        self.snap
            .states
            .free_kept(g0, g1, |g, state| others.push((g, state)));
        for (g, mut state) in others {
            let from = (g * unit).max(offset);
            let to = ((g + 1) * unit).min(offset + len);
            loop {
                match state {
                    KEEP => match self.snap.states.swap(g, KEEP, FREE) {
                        Ok(()) => break,
                        Err(now) => state = now,
                    },
                    SAVING => state = self.snap.wait_saving(g),
                    SAVED => {
                        let part = &mut buf[usize::try_from(from - offset).expect("small")
                            ..usize::try_from(to - offset).expect("small")];
                        self.snap
                            .read_saved(g, from - g * unit, part)
                            .map_err(err)?;
                        break;
                    }
                    _ => {
                        return Err(SpaceError::Internal(format!(
                            "{}: copy-before-write unit {g} read twice, or outside the frozen chunks",
                            self.describe()
                        )));
                    }
                }
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

    fn changed_blocks(&self, start: u64, _end: u64) -> u16 {
        if self.snap.base.is_none() {
            return u16::MAX;
        }
        Changes::blocks(&self.snap.frozen, &self.snap.frozen_partial, start / GRAIN)
    }

    fn taken(&self, start: u64, end: u64) {
        let (g0, g1) = self.snap.units(start, end - start);
        // Read already (FREE), saved, or being saved: nothing to do.
        self.snap.states.free_kept(g0, g1, |_, _| {});
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

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;

    /// A pause of the point's reader between reading the data file and taking the
    /// grains: writes land in between (the window a slow reader has).
    pub(super) static READ_PAUSE_US: AtomicU64 = AtomicU64::new(0);
    /// A pause of a write saving a grain before it copies it: other writes to the grain
    /// arrive meanwhile.
    pub(super) static SAVE_PAUSE_US: AtomicU64 = AtomicU64::new(0);
    /// The copy-before-write unit of the next snapshot (0: the disk's own).
    pub(super) static UNIT: AtomicU64 = AtomicU64::new(0);

    proptest::proptest! {
        /// Taking a range word by word against a reference, one unit at a time: KEEP
        /// units become FREE, the others keep their state and are reported with it.
        #[test]
        fn free_kept_matches_one_unit_at_a_time(
            states in proptest::collection::vec(0u64..4, 1..200),
            a in 0u64..220,
            len in 0u64..220,
        ) {
            let n = states.len() as u64;
            let s = UnitStates::new(n);
            for (g, &st) in states.iter().enumerate() {
                let g = g as u64;
                s.keep(g, g + 1);
                if st != KEEP {
                    s.swap(g, KEEP, if st == FREE { FREE } else { SAVING }).unwrap();
                    if st == SAVED {
                        s.swap(g, SAVING, SAVED).unwrap();
                    }
                }
            }
            let b = a + len;
            let mut reported = Vec::new();
            s.free_kept(a, b, |g, st| reported.push((g, st)));
            let expected: Vec<_> = (a..b.min(n))
                .filter(|&g| states[g as usize] != KEEP)
                .map(|g| (g, states[g as usize]))
                .collect();
            proptest::prop_assert_eq!(reported, expected);
            for g in 0..n {
                let was = states[g as usize];
                let want = if (a..b).contains(&g) && was == KEEP { FREE } else { was };
                proptest::prop_assert_eq!(s.get(g), want, "unit {}", g);
            }
        }
    }

    /// The change map against a reference set of written 4 KiB blocks: every written
    /// block is reported (a grain whole when the detail is past its bound), no grain is
    /// reported that was not written; a merge reports the union.
    #[test]
    fn the_change_map_reports_every_written_block() {
        const SIZE: u64 = 40 * GRAIN + 5000;
        let blocks = SIZE.div_ceil(BLOCK);
        let mut x = 99u64;
        let mut rng = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..200usize {
            let mut sets = [
                Changes::new(Bitmap::new(SIZE.div_ceil(GRAIN))),
                Changes::new(Bitmap::new(SIZE.div_ceil(GRAIN))),
            ];
            sets[1].cap = round % 7;
            let mut truth = [vec![false; blocks as usize], vec![false; blocks as usize]];
            for i in 0..(1 + rng() % 30) {
                let offset = rng() % SIZE;
                let len = 1 + match rng() % 3 {
                    0 => rng() % 8192,
                    1 => rng() % (4 * GRAIN),
                    _ => rng() % SIZE,
                }
                .min(SIZE - offset - 1);
                let k = (i % 2) as usize;
                sets[k].mark(offset, len, SIZE);
                for b in offset / BLOCK..(offset + len).div_ceil(BLOCK) {
                    truth[k][b as usize] = true;
                }
            }
            let [mut a, b] = sets;
            a.merge(&b.map, &b.partial);
            for (c, t) in [
                (
                    &a,
                    truth[0]
                        .iter()
                        .zip(&truth[1])
                        .map(|(x, y)| *x || *y)
                        .collect::<Vec<_>>(),
                ),
                (&b, truth[1].clone()),
            ] {
                for g in 0..SIZE.div_ceil(GRAIN) {
                    let m = Changes::blocks(&c.map, &c.partial, g);
                    let written: Vec<bool> = (0..16)
                        .map(|i| t.get((g * 16 + i) as usize).copied().unwrap_or(false))
                        .collect();
                    assert_eq!(
                        m == 0,
                        !written.iter().any(|&w| w),
                        "round {round}: grain {g}"
                    );
                    for (i, w) in written.iter().enumerate() {
                        assert!(
                            !w || m & (1 << i) != 0,
                            "round {round}: grain {g} block {i} lost"
                        );
                    }
                    if c.cap == PARTIAL_MAX && c.partial.contains_key(&g) {
                        let exact: u16 = (0..16).filter(|&i| written[i]).fold(0, |m, i| m | 1 << i);
                        assert_eq!(m, exact, "round {round}: grain {g}");
                    }
                }
            }
        }
    }

    #[test]
    fn copy_before_write_units_stay_small_and_bounded() {
        assert_eq!(cow_unit(1 << 20), 4096);
        assert_eq!(cow_unit(16 << 30), 4096);
        assert_eq!(cow_unit(256 << 30), 4096);
        assert_eq!(cow_unit((256 << 30) + 1), 8192);
        assert_eq!(cow_unit(1 << 40), 16384);
        assert_eq!(cow_unit(64 << 40), GRAIN);
        assert_eq!(cow_unit(u64::MAX / 2), GRAIN);
        for size in [1u64 << 30, 1 << 40, 4 << 40] {
            assert!(size.div_ceil(cow_unit(size)) <= COW_UNITS);
        }
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn fill(&mut self, buf: &mut [u8]) {
            for c in buf.chunks_mut(8) {
                let v = self.next().to_le_bytes();
                c.copy_from_slice(&v[..c.len()]);
            }
        }
    }

    /// Guest writes (and trims) race the point's reader on the very grains of the chunks
    /// it is reading: every chunk the point reads is exactly the disk at the freeze, and
    /// no write is lost. Full and incremental snapshots, large chunks (16 grains), 4 KiB
    /// and 64 KiB copy-before-write units.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_of_a_snapshot_race_writes_to_the_same_grains() {
        const SIZE: u64 = 8 << 20;
        const CHUNK: u64 = 1 << 20;
        let dir = tempfile::tempdir().unwrap();
        let pool = Pool::init(
            &dir.path().join("pool"),
            "here",
            "/nowhere",
            uuid::Uuid::new_v4(),
        )
        .unwrap();
        pool.create_server("db", None, None).unwrap();
        let meta = crate::host::create_disk(&pool, "db", "a", SIZE).unwrap();
        let data = pool.disk_paths("db", "a").data;
        let mut init = vec![0u8; SIZE as usize];
        Rng(7).fill(&mut init[..SIZE as usize / 2]);
        std::fs::write(&data, &init).unwrap();
        let vol = Volume::open(&pool, &meta, None).await.unwrap();

        let mut previous: Option<Vec<u8>> = None;
        for round in 0..24u64 {
            READ_PAUSE_US.store(if round % 4 < 2 { 0 } else { 3000 }, Ordering::Relaxed);
            SAVE_PAUSE_US.store(if round % 3 == 0 { 200 } else { 0 }, Ordering::Relaxed);
            // 4 KiB units (the disk's own), and grains: writers then share units.
            UNIT.store(if round % 5 < 3 { 0 } else { GRAIN }, Ordering::Relaxed);
            let gate = vol.gate_exclusive().await;
            vol.begin_snapshot(CHUNK).unwrap();
            let frozen = std::fs::read(&data).unwrap();
            drop(gate);
            let source = vol.snapshot_source();
            let incremental = source.change_base().is_some();
            assert_eq!(incremental, round > 0);

            // Writers: most of their writes into a chunk being read right now. They never
            // overlap each other (so the disk's final content is known): in even rounds
            // 4 KiB writes to interleaved blocks (block % 4 = writer: four writers on the
            // same grains), in odd rounds writes of up to 192 KiB, each writer in its own
            // quarter of each chunk.
            let reading = Arc::new(AtomicU64::new(0));
            let stop = Arc::new(AtomicBool::new(false));
            let mut writers = Vec::new();
            for w in 0..4u64 {
                let (vol, reading, stop) = (vol.clone(), reading.clone(), stop.clone());
                writers.push(tokio::spawn(async move {
                    let mut rng = Rng(round * 100 + w + 1);
                    let mut done = Vec::new();
                    while !stop.load(Ordering::Acquire) {
                        let area = if !rng.next().is_multiple_of(4) {
                            reading.load(Ordering::Acquire) * CHUNK
                        } else {
                            rng.next() % (SIZE / CHUNK) * CHUNK
                        };
                        let (offset, len) = if round.is_multiple_of(2) {
                            (
                                area + (rng.next() % (CHUNK / 4096 / 4) * 4 + w) * 4096,
                                4096,
                            )
                        } else {
                            let quarter = area + w * CHUNK / 4;
                            let len = (1 + rng.next() % 48) * 4096;
                            let at = rng.next() % ((CHUNK / 4 - len) / 4096 + 1) * 4096;
                            (quarter + at, len)
                        };
                        if rng.next().is_multiple_of(8) {
                            vol.zero(offset, len, true, false).await.unwrap();
                            done.push((offset, vec![0; len as usize]));
                        } else {
                            let mut buf = vec![0u8; len as usize];
                            rng.fill(&mut buf);
                            vol.write_at(offset, buf.clone(), false).await.unwrap();
                            done.push((offset, buf));
                        }
                        if done.len().is_multiple_of(4) {
                            tokio::task::yield_now().await;
                        }
                    }
                    done
                }));
            }

            // The point: two readers, chunks in a random order.
            let mut order: Vec<u64> = (0..SIZE / CHUNK).collect();
            let mut rng = Rng(round + 1000);
            for i in (1..order.len()).rev() {
                order.swap(i, (rng.next() % (i as u64 + 1)) as usize);
            }
            let order = Arc::new(Mutex::new(order));
            let mut readers = Vec::new();
            for _ in 0..2 {
                let (source, order, reading) = (source.clone(), order.clone(), reading.clone());
                readers.push(tokio::task::spawn_blocking(move || {
                    let mut got = Vec::new();
                    while let Some(c) = order.lock().unwrap().pop() {
                        reading.store(c, Ordering::Release);
                        let (start, end) = (c * CHUNK, (c + 1) * CHUNK);
                        if !source.changed(start, end) {
                            source.taken(start, end);
                            got.push((c, None));
                            continue;
                        }
                        let mut buf = vec![0u8; CHUNK as usize];
                        if source.may_have_data(start, end) {
                            source.read_at(&mut buf, start).unwrap();
                        }
                        source.taken(start, end);
                        got.push((c, Some(buf)));
                    }
                    got
                }));
            }
            let mut chunks = Vec::new();
            for r in readers {
                chunks.extend(r.await.unwrap());
            }
            stop.store(true, Ordering::Release);
            let mut expect = frozen.clone();
            for w in writers {
                for (offset, buf) in w.await.unwrap() {
                    expect[offset as usize..offset as usize + buf.len()].copy_from_slice(&buf);
                }
            }
            drop(source);
            vol.end_snapshot(Some(cairn_format::id::new_point_id()));

            for (c, got) in chunks {
                let r = (c * CHUNK) as usize..((c + 1) * CHUNK) as usize;
                match got {
                    Some(buf) => assert!(buf == frozen[r], "round {round}: chunk {c} differs"),
                    // Unchanged since the last point: equal to it.
                    None => assert!(
                        previous.as_ref().unwrap()[r.clone()] == frozen[r],
                        "round {round}: chunk {c} changed but was not tracked"
                    ),
                }
            }
            // No write lost.
            assert!(
                std::fs::read(&data).unwrap() == expect,
                "round {round}: writes lost"
            );
            previous = Some(frozen);
        }
        UNIT.store(0, Ordering::Relaxed);
        vol.close().await.unwrap();
    }
}
