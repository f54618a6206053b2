//! Restoring a disk of a recovery point to a file or block device.
//!
//! Each distinct chunk is fetched once (however often the disk repeats it), checked and
//! decompressed on the blocking pool, and written at every position that holds it, with
//! up to `concurrency` chunks in flight. Zero chunks are left as holes in a new file.
//!
//! A file target is written under a temporary name beside it, synced, and renamed into
//! place only when complete, so a failed or interrupted restore never leaves a file that
//! looks whole. A block device is written in place.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cairn_format::id::{ChunkId, ChunkRef};
use cairn_format::index::DiskIndex;
use cairn_format::record::{DiskRecord, PointRecord};
use futures::{StreamExt, TryStreamExt};

use crate::error::SpaceError;
use crate::fetch::{FetchError, fetch_chunk, group_by_chunk};
use crate::image::Image;
use crate::progress::Progress;
use crate::space::Space;

#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Overwrite an existing file or block device.
    pub force: bool,
    /// Flush the target to stable storage before reporting success.
    pub sync: bool,
    pub concurrency: usize,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            force: false,
            sync: true,
            concurrency: crate::create::default_concurrency(),
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreReport {
    pub point: cairn_format::id::PointId,
    pub disk: String,
    pub target: PathBuf,
    pub disk_size: u64,
    pub bytes_written: u64,
    pub chunks_fetched: u64,
    pub chunks_zero: u64,
}

/// Turns a fetch failure of chunk `id` at position `i` into the error an operator reads.
pub(crate) fn chunk_error(
    record: &PointRecord,
    disk: &DiskRecord,
    index: &DiskIndex,
    i: u64,
    id: ChunkId,
    e: FetchError,
) -> SpaceError {
    let (start, end) = index.chunk_range(i);
    match e {
        FetchError::Missing => SpaceError::MissingChunk {
            point: record.id,
            disk: disk.name.clone(),
            chunk: id,
            start,
            end,
        },
        FetchError::Damaged(source) => SpaceError::DamagedChunk {
            point: record.id,
            disk: disk.name.clone(),
            chunk: id,
            start,
            end,
            source: Box::new(source),
        },
        FetchError::Backend(b) => SpaceError::Backend(b),
    }
}

/// Writes every given chunk of `index` into `image` (each distinct chunk fetched once).
/// With `write_zeros`, zero chunks and zero runs are written (an existing target);
/// without, the target is known to read as zeros and they are left as holes (a fresh
/// sparse file). Returns bytes written and chunks fetched.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn write_chunks(
    space: &Space,
    record: &PointRecord,
    disk: &DiskRecord,
    index: &DiskIndex,
    positions: Vec<(u64, ChunkRef)>,
    image: &Image,
    write_zeros: bool,
    concurrency: usize,
    progress: &dyn Progress,
) -> Result<(u64, u64), SpaceError> {
    let mut zero_bytes = 0;
    for (i, _) in positions.iter().filter(|(_, r)| r.id.is_zero()) {
        let (start, end) = index.chunk_range(*i);
        if write_zeros {
            image.zero_range(start, end - start)?;
            zero_bytes += end - start;
        }
        progress.advance(end - start);
    }
    let groups = group_by_chunk(positions);
    let fetched = groups.len() as u64;
    let backend = space.backend().clone();
    // Write-behind: every FLUSH_EVERY bytes, start flushing in the background.
    const FLUSH_EVERY: u64 = 256 << 20;
    let since_flush = std::sync::atomic::AtomicU64::new(0);
    let flushing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (since_flush, flushing) = (&since_flush, &flushing);
    let written: u64 = futures::stream::iter(groups)
        .map(|(id, at)| {
            let backend = backend.clone();
            async move {
                let data = fetch_chunk(&backend, id)
                    .await
                    .map_err(|e| chunk_error(record, disk, index, at[0], id.id, e))?;
                let data = Arc::new(data);
                let img = image.clone();
                let ranges: Vec<(u64, u64)> = at.iter().map(|i| index.chunk_range(*i)).collect();
                let (covered, written) = tokio::task::spawn_blocking(move || {
                    let (mut covered, mut written) = (0, 0);
                    for (start, end) in ranges {
                        if end - start != data.len() as u64 {
                            return Err(SpaceError::Internal(format!(
                                "chunk {} is {} bytes, its place {start}..{end}",
                                id.id,
                                data.len()
                            )));
                        }
                        if write_zeros {
                            img.write_at(&data, start)?;
                            written += end - start;
                        } else {
                            written += img.write_nonzero_at(&data, start)?;
                        }
                        covered += end - start;
                    }
                    Ok::<_, SpaceError>((covered, written))
                })
                .await??;
                progress.advance(covered);
                let pending =
                    since_flush.fetch_add(written, std::sync::atomic::Ordering::Relaxed) + written;
                if pending >= FLUSH_EVERY {
                    since_flush.store(0, std::sync::atomic::Ordering::Relaxed);
                    image.flush_behind(flushing);
                }
                Ok::<_, SpaceError>(written)
            }
        })
        .buffer_unordered(concurrency.max(1))
        .try_fold(0u64, |acc, n| async move { Ok(acc + n) })
        .await?;
    Ok((written + zero_bytes, fetched))
}

fn temp_beside(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "disk".into());
    target.with_file_name(format!(
        ".{name}.cairn-restore-{}",
        uuid::Uuid::new_v4().simple()
    ))
}

/// Restores one disk of a point to `target`. See the module documentation.
pub async fn restore_disk(
    space: &Space,
    record: &PointRecord,
    disk: Option<&str>,
    target: &Path,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreReport, SpaceError> {
    let disk = Space::choose_disk(record, disk)?;
    let lease =
        crate::lock::acquire_reader(space.backend(), "restore", crate::lock::DEFAULT_WAIT).await?;
    let result = restore_locked(space, record, disk, target, opts, progress).await;
    crate::lock::release_quietly(lease).await;
    result
}

async fn restore_locked(
    space: &Space,
    record: &PointRecord,
    disk: &DiskRecord,
    target: &Path,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreReport, SpaceError> {
    // Still there? (It may have been deleted before the lease was taken.)
    if !space.point_exists(&record.id).await? {
        return Err(SpaceError::PointNotFound(record.id.to_string()));
    }
    let index = space.load_index(record, disk).await?;
    let existing = std::fs::metadata(target).ok();
    if existing.is_some() && !opts.force {
        return Err(SpaceError::TargetExists {
            path: target.to_path_buf(),
        });
    }
    // Through a symlink, replace what it points to, not the link.
    let resolved;
    let target = if existing.is_some() {
        resolved = std::fs::canonicalize(target)
            .map_err(|e| SpaceError::image("cannot resolve", target, e))?;
        resolved.as_path()
    } else {
        target
    };
    let is_block = existing
        .as_ref()
        .is_some_and(|m| m.file_type().is_block_device());
    let positions: Vec<(u64, ChunkRef)> = (0..index.chunks.len() as u64)
        .map(|i| (i, index.chunk_ref(i)))
        .collect();
    let chunks_zero = index.chunks.iter().filter(|c| c.is_zero()).count() as u64;
    progress.start("restore", disk.size);

    let (written, fetched) = if is_block {
        let image = Image::open_rw(target)?;
        if image.size < disk.size {
            return Err(SpaceError::TargetTooSmall {
                path: target.to_path_buf(),
                target_size: image.size,
                disk_size: disk.size,
            });
        }
        let r = write_chunks(
            space,
            record,
            disk,
            &index,
            positions,
            &image,
            true,
            opts.concurrency,
            progress,
        )
        .await?;
        if opts.sync {
            image.sync()?;
        }
        r
    } else {
        if existing.as_ref().is_some_and(|m| !m.is_file()) {
            return Err(SpaceError::image(
                "cannot restore onto",
                target,
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "not a file or block device",
                ),
            ));
        }
        let temp = temp_beside(target);
        let result = restore_to_new_file(
            space, record, disk, &index, positions, &temp, opts, progress,
        )
        .await
        .and_then(|r| {
            // A replaced file keeps its mode and owner (qemu or libvirt must still open it).
            if let Some(old) = &existing {
                use std::os::unix::fs::MetadataExt;
                std::fs::set_permissions(&temp, old.permissions())
                    .and_then(|()| {
                        std::os::unix::fs::chown(&temp, Some(old.uid()), Some(old.gid()))
                    })
                    .map_err(|e| SpaceError::image("cannot copy owner and mode to", &temp, e))?;
            }
            Ok(r)
        });
        match result {
            Ok(r) => {
                std::fs::rename(&temp, target)
                    .map_err(|e| SpaceError::image("cannot rename restored file to", target, e))?;
                if opts.sync
                    && let Some(dir) = target.parent()
                {
                    let dir = if dir.as_os_str().is_empty() {
                        Path::new(".")
                    } else {
                        dir
                    };
                    if let Ok(d) = std::fs::File::open(dir) {
                        let _ = d.sync_all();
                    }
                }
                r
            }
            Err(e) => {
                let _ = std::fs::remove_file(&temp);
                return Err(e);
            }
        }
    };
    progress.finish();
    Ok(RestoreReport {
        point: record.id,
        disk: disk.name.clone(),
        target: target.to_path_buf(),
        disk_size: disk.size,
        bytes_written: written,
        chunks_fetched: fetched,
        chunks_zero,
    })
}

#[allow(clippy::too_many_arguments)]
async fn restore_to_new_file(
    space: &Space,
    record: &PointRecord,
    disk: &DiskRecord,
    index: &DiskIndex,
    positions: Vec<(u64, ChunkRef)>,
    temp: &Path,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<(u64, u64), SpaceError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(temp)
        .map_err(|e| SpaceError::image("cannot create", temp, e))?;
    file.set_len(disk.size)
        .map_err(|e| SpaceError::image("cannot size", temp, e))?;
    drop(file);
    let image = Image::open_rw(temp)?;
    let r = write_chunks(
        space,
        record,
        disk,
        index,
        positions,
        &image,
        false,
        opts.concurrency,
        progress,
    )
    .await?;
    if opts.sync {
        image.sync()?;
    }
    Ok(r)
}
