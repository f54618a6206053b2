//! Clones: a disk made from a recovery point's disk, usable at once. Its data file starts
//! empty (sparse); a per-chunk *present* map says which chunks are already copied. A read
//! of an absent chunk fetches it from the recovery space, writes it into the data file and
//! marks it present (copy-on-read); a write that covers a chunk only in part fetches it
//! first, so the write merges with the point's content; a write that covers it whole
//! needs nothing fetched. Hydration copies the remaining chunks in the background.
//!
//! Crash safety: the present map (`<disk>.present`) is saved only after the data file is
//! synced, and on every flush and FUA write, so a chunk is never marked present unless its
//! content is durable. A chunk fetched again after a crash is written whole (punched,
//! then written), so it holds exactly the point's content, as it did before any write
//! that was not flushed.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use cairn_format::id::ChunkId;
use cairn_format::index::DiskIndex;
use cairn_nbd::export::Extent;
use cairn_nbd::proto::{STATE_HOLE, STATE_ZERO};
use cairn_store::Space;
use cairn_store::fetch::{FetchError, fetch_chunk};
use serde::{Deserialize, Serialize};

use crate::bitmap::Bitmap;
use crate::error::VolumeError;
use crate::mapfile;
use crate::pool::{DiskMeta, DiskPaths, Origin, Pool};

const STRIPES: usize = 256;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PresentHeader {
    pub point: cairn_format::id::PointId,
    pub chunk_size: u32,
    pub size: u64,
}

pub(crate) struct CloneState {
    label: String,
    space: Arc<Space>,
    pub(crate) origin: Origin,
    index: DiskIndex,
    chunk: u64,
    size: u64,
    present: Bitmap,
    locks: Vec<Arc<tokio::sync::Mutex<()>>>,
    dirty: AtomicBool,
    persist_lock: std::sync::Mutex<()>,
    present_path: PathBuf,
    pub(crate) fetched_bytes: AtomicU64,
}

/// The chunk locks a change holds, and the chunks it covers whole (marked present once
/// the change is written).
pub(crate) struct ChangeGuard {
    _locks: Vec<tokio::sync::OwnedMutexGuard<()>>,
    whole: Vec<u64>,
}

/// Opens a clone's origin: the point's index in the location's space.
pub(crate) async fn origin_index(
    pool: &Pool,
    label: &str,
    origin: &Origin,
    space: Option<&Arc<Space>>,
) -> Result<(Arc<Space>, DiskIndex), VolumeError> {
    let space = space.ok_or_else(|| {
        VolumeError::Other(format!(
            "disk {label} is a clone of recovery point {}, and this location's recovery space is not open",
            origin.point
        ))
    })?;
    if space.config().id != origin.space_id {
        return Err(VolumeError::WrongLocation {
            point: origin.point.to_string(),
            space: origin.space_id.to_string(),
            pool: pool.root().to_path_buf(),
            location: pool.meta().location.clone(),
            pool_space: space.config().id.to_string(),
        });
    }
    let wrap = |e| {
        let (server, disk) = label.split_once('/').unwrap_or((label, ""));
        VolumeError::Origin {
            server: server.into(),
            disk: disk.into(),
            point: origin.point,
            source: Box::new(e),
        }
    };
    let record = space.load_point(&origin.point).await.map_err(wrap)?;
    let disk = Space::choose_disk(&record, Some(&origin.disk)).map_err(wrap)?;
    let index = space.load_index(&record, disk).await.map_err(wrap)?;
    Ok((space.clone(), index))
}

impl CloneState {
    pub(crate) async fn open(
        pool: &Pool,
        meta: &DiskMeta,
        origin: &Origin,
        paths: &DiskPaths,
        space: Option<&Arc<Space>>,
    ) -> Result<CloneState, VolumeError> {
        let label = format!("{}/{}", meta.server, meta.name);
        let (space, index) = origin_index(pool, &label, origin, space).await?;
        if index.disk_size != meta.size {
            return Err(VolumeError::Malformed {
                path: paths.meta.clone(),
                detail: format!(
                    "the clone is {} bytes but its origin disk is {}",
                    meta.size, index.disk_size
                ),
            });
        }
        let chunks = index.chunks.len() as u64;
        let present = match mapfile::read::<PresentHeader>(&paths.present)? {
            Some((h, map))
                if h.point == origin.point && h.size == meta.size && map.len() == chunks =>
            {
                map
            }
            Some(_) => {
                return Err(VolumeError::Malformed {
                    path: paths.present.clone(),
                    detail: "the hydration map does not match the clone's origin".into(),
                });
            }
            None => Bitmap::new(chunks),
        };
        // Chunks that are zero in the point are present from the start (the file is sparse).
        for (i, id) in index.chunks.iter().enumerate() {
            if id.is_zero() {
                present.set(i as u64);
            }
        }
        Ok(CloneState {
            label,
            space,
            origin: origin.clone(),
            chunk: u64::from(index.chunk_size),
            size: meta.size,
            index,
            present,
            locks: (0..STRIPES)
                .map(|_| Arc::new(tokio::sync::Mutex::new(())))
                .collect(),
            dirty: AtomicBool::new(false),
            persist_lock: std::sync::Mutex::new(()),
            present_path: paths.present.clone(),
            fetched_bytes: AtomicU64::new(0),
        })
    }

    pub(crate) fn chunks(&self) -> u64 {
        self.index.chunks.len() as u64
    }

    pub(crate) fn present_count(&self) -> u64 {
        self.present.count()
    }

    pub(crate) fn is_hydrated(&self) -> bool {
        self.present.all()
    }

    fn chunk_range(&self, c: u64) -> (u64, u64) {
        (c * self.chunk, ((c + 1) * self.chunk).min(self.size))
    }

    fn lock_for(&self, c: u64) -> Arc<tokio::sync::Mutex<()>> {
        self.locks[usize::try_from(c % STRIPES as u64).expect("small")].clone()
    }

    /// Fetches chunk `c` into the data file; the caller holds its stripe lock.
    async fn fetch_locked(&self, file: &Arc<File>, c: u64) -> std::io::Result<()> {
        if self.present.get(c) {
            return Ok(());
        }
        let r = self.index.chunk_ref(c);
        let id: ChunkId = r.id;
        let (start, end) = self.chunk_range(c);
        let data = fetch_chunk(self.space.backend(), r).await.map_err(|e| {
            let why = match e {
                FetchError::Missing => "is missing from the recovery space".to_string(),
                FetchError::Damaged(d) => format!("is damaged ({d})"),
                FetchError::Backend(b) => format!("cannot be read ({b})"),
            };
            std::io::Error::other(format!(
                "clone {}: chunk {id} of recovery point {} (disk {}, bytes {start}..{end}) {why}",
                self.label, self.origin.point, self.origin.disk
            ))
        })?;
        if data.len() as u64 != end - start {
            return Err(std::io::Error::other(format!(
                "clone {}: chunk {id} has {} bytes, expected {}",
                self.label,
                data.len(),
                end - start
            )));
        }
        let f = file.clone();
        tokio::task::spawn_blocking(move || write_whole(&f, &data, start))
            .await
            .map_err(std::io::Error::other)??;
        self.fetched_bytes.fetch_add(end - start, Ordering::Relaxed);
        self.present.set(c);
        self.dirty.store(true, Ordering::Release);
        Ok(())
    }

    /// Fetches chunk `c` unless present.
    pub(crate) async fn fetch(&self, file: &Arc<File>, c: u64) -> std::io::Result<()> {
        if self.present.get(c) {
            return Ok(());
        }
        let lock = self.lock_for(c);
        let _g = lock.lock().await;
        self.fetch_locked(file, c).await
    }

    /// Makes every chunk of `[offset, offset+len)` present.
    pub(crate) async fn ensure_present(
        &self,
        file: &Arc<File>,
        offset: u64,
        len: u64,
    ) -> std::io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        for c in offset / self.chunk..=(offset + len - 1) / self.chunk {
            self.fetch(file, c).await?;
        }
        Ok(())
    }

    /// Before a change of `[offset, offset+len)`: locks its absent chunks, fetches those it
    /// covers in part (or all of them unless `whole_ok`).
    pub(crate) async fn before_change(
        &self,
        file: &Arc<File>,
        offset: u64,
        len: u64,
        whole_ok: bool,
    ) -> std::io::Result<ChangeGuard> {
        let mut guard = ChangeGuard {
            _locks: Vec::new(),
            whole: Vec::new(),
        };
        if len == 0 {
            return Ok(guard);
        }
        let (c0, c1) = (offset / self.chunk, (offset + len - 1) / self.chunk);
        let absent: Vec<u64> = (c0..=c1).filter(|&c| !self.present.get(c)).collect();
        if absent.is_empty() {
            return Ok(guard);
        }
        let mut stripes: Vec<usize> = absent
            .iter()
            .map(|&c| usize::try_from(c % STRIPES as u64).expect("small"))
            .collect();
        stripes.sort_unstable();
        stripes.dedup();
        for s in stripes {
            guard._locks.push(self.locks[s].clone().lock_owned().await);
        }
        for c in absent {
            let (start, end) = self.chunk_range(c);
            if whole_ok && offset <= start && offset + len >= end {
                guard.whole.push(c);
            } else {
                self.fetch_locked(file, c).await?;
            }
        }
        Ok(guard)
    }

    pub(crate) fn after_change(&self, guard: ChangeGuard) {
        for c in &guard.whole {
            self.present.set(*c);
        }
        if !guard.whole.is_empty() {
            self.dirty.store(true, Ordering::Release);
        }
    }

    /// Saves the present map if it changed: the data file is synced first.
    pub(crate) fn persist(&self, file: &File) -> Result<(), VolumeError> {
        let _g = self.persist_lock.lock().expect("poisoned");
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let result = rustix::fs::fdatasync(file)
            .map_err(|e| VolumeError::io("cannot sync clone", &self.present_path, e.into()))
            .and_then(|()| {
                mapfile::write(
                    &self.present_path,
                    &PresentHeader {
                        point: self.origin.point,
                        chunk_size: u32::try_from(self.chunk).expect("chunk size"),
                        size: self.size,
                    },
                    &self.present,
                )
                .map_err(VolumeError::from)
            });
        if result.is_err() {
            self.dirty.store(true, Ordering::Release);
        }
        result
    }

    /// Whether an absent chunk in `[start, end)` has data in the point.
    pub(crate) fn origin_may_have_data(&self, start: u64, end: u64) -> bool {
        if end <= start {
            return false;
        }
        (start / self.chunk..=(end - 1) / self.chunk).any(|c| {
            !self.present.get(c) && !self.index.chunks[usize::try_from(c).expect("fits")].is_zero()
        })
    }

    /// Extents of `[offset, offset+len)` if it starts in an absent chunk (they describe
    /// the point's content there); `None` if it starts in a present one (then only up to
    /// the next absent chunk may be described from the data file: see [`Self::present_run`]).
    pub(crate) fn extents_if_absent(&self, offset: u64, len: u32) -> Option<Vec<Extent>> {
        let end = offset + u64::from(len);
        let mut c = offset / self.chunk;
        if self.present.get(c) {
            return None;
        }
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end && !self.present.get(c) {
            let stop = ((c + 1) * self.chunk).min(end);
            let flags = if self.index.chunks[usize::try_from(c).expect("fits")].is_zero() {
                STATE_HOLE | STATE_ZERO
            } else {
                0
            };
            let n = u32::try_from(stop - pos).expect("within len");
            match out.last_mut() {
                Some(last) if last.1 == flags => last.0 += n,
                _ => out.push((n, flags)),
            }
            pos = stop;
            c += 1;
        }
        Some(out)
    }

    /// The length from `offset` (at most `len`) that lies in present chunks.
    pub(crate) fn present_run(&self, offset: u64, len: u32) -> u32 {
        let end = offset + u64::from(len);
        let mut c = offset / self.chunk;
        while c * self.chunk < end && self.present.get(c) {
            c += 1;
        }
        u32::try_from((c * self.chunk).min(end) - offset).expect("within len")
    }

    /// The absent chunks, in order.
    pub(crate) fn absent(&self) -> Vec<u64> {
        (0..self.chunks())
            .filter(|&c| !self.present.get(c))
            .collect()
    }

    pub(crate) fn chunk_len(&self, c: u64) -> u64 {
        let (s, e) = self.chunk_range(c);
        e - s
    }

    pub(crate) fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::Acquire)
    }
}

/// Writes a chunk's content whole: the range is punched first, then the non-zero
/// 64 KiB blocks written (zero blocks stay holes).
fn write_whole(file: &File, data: &[u8], offset: u64) -> std::io::Result<()> {
    let flags = rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
    if rustix::fs::fallocate(file, flags, offset, data.len() as u64).is_err() {
        return file.write_all_at(data, offset);
    }
    const BLOCK: usize = 64 * 1024;
    for (i, block) in data.chunks(BLOCK).enumerate() {
        if !cairn_format::zero::is_zero(block) {
            file.write_all_at(block, offset + (i * BLOCK) as u64)?;
        }
    }
    Ok(())
}
