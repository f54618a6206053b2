//! Rolling an existing image back to a recovery point, rewriting only what differs.
//!
//! First a [`RollbackPlan`]: every chunk of the image is read (holes are not) and hashed,
//! and compared with the point's index; this changes nothing and tells the operator how
//! much would be rewritten. Applying the plan checks that every chunk it needs is present,
//! then fetches each differing chunk once, verifies it, and writes it (zero chunks become
//! holes where the filesystem can punch them), then syncs the image.
//!
//! When the caller knows which byte ranges may differ (a live disk's changed-block map,
//! exact to 64 KiB), [`plan_rollback_ranges`] compares nothing: only those ranges are
//! rewritten, each read from the point's chunk grain by grain ([`crate::fetch::fetch_range`];
//! a framed chunk is not read whole), so the cost follows the diverged data, not the
//! chunk size.

use std::path::{Path, PathBuf};

use cairn_format::id::{ChunkId, ChunkRef, PointId};
use cairn_format::index::DiskIndex;
use cairn_format::layout;
use cairn_format::record::{DiskRecord, PointRecord};
use futures::{StreamExt, TryStreamExt};

use crate::error::SpaceError;
use crate::image::Image;
use crate::progress::Progress;
use crate::restore::write_chunks;
use crate::space::Space;

/// What a rollback would rewrite.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RollbackPlan {
    pub point: PointId,
    pub disk: String,
    pub image: PathBuf,
    pub disk_size: u64,
    pub chunks_total: u64,
    /// Chunk positions whose content differs from the point, with the point's id there.
    #[serde(skip)]
    pub differing: Vec<(u64, ChunkRef)>,
    /// Byte ranges `[start, end)` of the disk to rewrite from the point, each within one
    /// chunk (not in `differing`).
    #[serde(skip)]
    pub ranges: Vec<(u64, u64)>,
    pub chunks_differing: u64,
    pub bytes_to_rewrite: u64,
    pub bytes_read: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RollbackReport {
    pub point: PointId,
    pub disk: String,
    pub image: PathBuf,
    pub chunks_rewritten: u64,
    pub bytes_rewritten: u64,
    pub bytes_read: u64,
}

/// Rollback never changes a disk's size: an image of another size is refused.
fn same_size(image: &Image, record: &PointRecord, disk: &DiskRecord) -> Result<(), SpaceError> {
    if image.size == disk.size {
        return Ok(());
    }
    Err(SpaceError::SizeMismatch {
        path: image.path.clone(),
        image_size: image.size,
        disk: disk.name.clone(),
        point: record.id,
        point_size: disk.size,
    })
}

/// Computes what rolling `image` back to `disk` of `record` would rewrite.
pub async fn plan_rollback(
    space: &Space,
    record: &PointRecord,
    disk: Option<&str>,
    image_path: &Path,
    concurrency: usize,
    progress: &dyn Progress,
) -> Result<RollbackPlan, SpaceError> {
    plan_rollback_of(space, record, disk, image_path, None, concurrency, progress).await
}

/// Like [`plan_rollback`], but only the chunk positions in `candidates` are compared
/// (all when `None`): the caller knows the rest equals the point (changed-block tracking).
pub async fn plan_rollback_of(
    space: &Space,
    record: &PointRecord,
    disk: Option<&str>,
    image_path: &Path,
    candidates: Option<Vec<u64>>,
    concurrency: usize,
    progress: &dyn Progress,
) -> Result<RollbackPlan, SpaceError> {
    let disk = Space::choose_disk(record, disk)?;
    let image = Image::open_read(image_path)?;
    same_size(&image, record, disk)?;
    let index = space.load_index(record, disk).await?;
    let n = index.chunks.len() as u64;
    let positions: Vec<u64> = match candidates {
        Some(mut c) => {
            c.retain(|&i| i < n);
            c.sort_unstable();
            c.dedup();
            c
        }
        None => (0..n).collect(),
    };
    let compared: u64 = positions
        .iter()
        .map(|&i| index.chunk_range(i))
        .map(|(s, e)| e - s)
        .sum();
    progress.start("compare", compared);
    let index_ref = &index;
    let image_ref = &image;
    let mut differing: Vec<(u64, ChunkRef, u64, u64)> = futures::stream::iter(positions)
        .map(|i| async move {
            let want = index_ref.chunk_ref(i);
            let (start, end) = index_ref.chunk_range(i);
            let img = image_ref.clone();
            let (have, read) = tokio::task::spawn_blocking(move || {
                if !img.may_have_data(start, end) {
                    return Ok((ChunkId::ZERO, 0));
                }
                let mut buf = vec![0u8; usize::try_from(end - start).expect("fits")];
                img.read_at(&mut buf, start)?;
                let id = if cairn_format::zero::is_zero(&buf) {
                    ChunkId::ZERO
                } else {
                    ChunkId::of(&buf)
                };
                Ok::<_, SpaceError>((id, end - start))
            })
            .await??;
            progress.advance(end - start);
            let differs = have != want.id;
            Ok::<_, SpaceError>((i, want, read, if differs { end - start } else { 0 }))
        })
        .buffer_unordered(concurrency.max(1))
        .try_collect()
        .await?;
    progress.finish();
    differing.sort_unstable_by_key(|d| d.0);
    let bytes_read = differing.iter().map(|d| d.2).sum();
    differing.retain(|d| d.3 > 0);
    Ok(RollbackPlan {
        point: record.id,
        disk: disk.name.clone(),
        image: image_path.to_path_buf(),
        disk_size: disk.size,
        chunks_total: index.chunks.len() as u64,
        chunks_differing: differing.len() as u64,
        bytes_to_rewrite: differing.iter().map(|d| d.3).sum(),
        differing: differing.into_iter().map(|d| (d.0, d.1)).collect(),
        ranges: Vec::new(),
        bytes_read,
    })
}

/// Plans the rollback of the byte ranges `ranges` only (the caller knows the rest equals
/// the point), without comparing: each is rewritten from the point. A chunk more than
/// half covered is rewritten whole (one read of it); the rest, range by range.
pub async fn plan_rollback_ranges(
    space: &Space,
    record: &PointRecord,
    disk: Option<&str>,
    image_path: &Path,
    mut ranges: Vec<(u64, u64)>,
) -> Result<RollbackPlan, SpaceError> {
    let disk = Space::choose_disk(record, disk)?;
    let image = Image::open_read(image_path)?;
    same_size(&image, record, disk)?;
    let index = space.load_index(record, disk).await?;
    let cs = u64::from(index.chunk_size);
    // Cut at chunk boundaries, sort, merge.
    let mut cut: Vec<(u64, u64)> = Vec::new();
    ranges.sort_unstable();
    for (mut s, e) in ranges {
        let e = e.min(disk.size);
        while s < e {
            let end = ((s / cs + 1) * cs).min(e);
            match cut.last_mut() {
                Some(last) if last.1 >= s && last.0 / cs == s / cs => last.1 = last.1.max(end),
                _ => cut.push((s, end)),
            }
            s = end;
        }
    }
    let mut differing = Vec::new();
    let mut partial = Vec::new();
    let mut i = 0;
    while i < cut.len() {
        let c = cut[i].0 / cs;
        let mut j = i;
        let mut covered = 0;
        while j < cut.len() && cut[j].0 / cs == c {
            covered += cut[j].1 - cut[j].0;
            j += 1;
        }
        let (start, end) = index.chunk_range(c);
        if covered * 2 > end - start {
            differing.push((c, index.chunk_ref(c)));
        } else {
            partial.extend_from_slice(&cut[i..j]);
        }
        i = j;
    }
    let whole: u64 = differing
        .iter()
        .map(|&(c, _)| index.chunk_range(c))
        .map(|(s, e)| e - s)
        .sum();
    Ok(RollbackPlan {
        point: record.id,
        disk: disk.name.clone(),
        image: image_path.to_path_buf(),
        disk_size: disk.size,
        chunks_total: index.chunks.len() as u64,
        chunks_differing: differing.len() as u64
            + partial
                .iter()
                .map(|r| r.0 / cs)
                .collect::<std::collections::BTreeSet<_>>()
                .len() as u64,
        bytes_to_rewrite: whole + partial.iter().map(|r| r.1 - r.0).sum::<u64>(),
        differing,
        ranges: partial,
        bytes_read: 0,
    })
}

/// Applies a plan made by [`plan_rollback`]. Irreversible.
pub async fn apply_rollback(
    space: &Space,
    record: &PointRecord,
    plan: &RollbackPlan,
    concurrency: usize,
    progress: &dyn Progress,
) -> Result<RollbackReport, SpaceError> {
    let lease =
        crate::lock::acquire_reader(space.backend(), "rollback", crate::lock::DEFAULT_WAIT).await?;
    let result = apply_locked(space, record, plan, concurrency, progress).await;
    crate::lock::release_quietly(lease).await;
    result
}

async fn apply_locked(
    space: &Space,
    record: &PointRecord,
    plan: &RollbackPlan,
    concurrency: usize,
    progress: &dyn Progress,
) -> Result<RollbackReport, SpaceError> {
    if !space.point_exists(&record.id).await? {
        return Err(SpaceError::PointNotFound(record.id.to_string()));
    }
    let disk = Space::choose_disk(record, Some(&plan.disk))?;
    let index: DiskIndex = space.load_index(record, disk).await?;
    let image = Image::open_rw(&plan.image)?;
    same_size(&image, record, disk)?;
    // Refuse before writing anything if a needed chunk is gone.
    let backend = space.backend().clone();
    let cs = u64::from(index.chunk_size);
    let partial = plan
        .ranges
        .iter()
        .map(|r| (r.0 / cs, index.chunk_ref(r.0 / cs)));
    let groups = crate::fetch::group_by_chunk(plan.differing.iter().copied().chain(partial));
    // Every object a fetch will read: the chunk, and a patch's base.
    let needed = groups.iter().flat_map(|(r, at)| {
        let base = r.base.map(|b| (ChunkRef::plain(b), r.id, at[0]));
        std::iter::once((*r, r.id, at[0])).chain(base)
    });
    futures::stream::iter(needed)
        .map(|(r, id, at)| {
            let backend = backend.clone();
            let index = &index;
            async move {
                match backend.stat(&layout::object_key(&r)).await? {
                    Some(_) => Ok(()),
                    None => {
                        let (start, end) = index.chunk_range(at);
                        Err(SpaceError::MissingChunk {
                            point: record.id,
                            disk: disk.name.clone(),
                            chunk: id,
                            start,
                            end,
                        })
                    }
                }
            }
        })
        .buffer_unordered(crate::space::METADATA_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    progress.start("rollback", plan.bytes_to_rewrite);
    let (written, _) = write_chunks(
        space,
        record,
        disk,
        &index,
        plan.differing.clone(),
        &image,
        true,
        concurrency,
        progress,
    )
    .await?;
    let written = written
        + write_ranges(
            record,
            disk,
            &index,
            &plan.ranges,
            &image,
            space,
            concurrency,
            progress,
        )
        .await?;
    image.sync()?;
    progress.finish();
    Ok(RollbackReport {
        point: record.id,
        disk: disk.name.clone(),
        image: plan.image.clone(),
        chunks_rewritten: plan.chunks_differing,
        bytes_rewritten: written,
        bytes_read: plan.bytes_read,
    })
}

/// Rewrites byte ranges (each within one chunk) from the point's chunks, reading only the
/// grains that hold them.
#[allow(clippy::too_many_arguments)]
async fn write_ranges(
    record: &PointRecord,
    disk: &DiskRecord,
    index: &DiskIndex,
    ranges: &[(u64, u64)],
    image: &Image,
    space: &Space,
    concurrency: usize,
    progress: &dyn Progress,
) -> Result<u64, SpaceError> {
    let cs = u64::from(index.chunk_size);
    let backend = space.backend().clone();
    futures::stream::iter(ranges.iter().copied())
        .map(|(s, e)| {
            let backend = backend.clone();
            async move {
                let c = s / cs;
                let r = index.chunk_ref(c);
                if r.id.is_zero() {
                    let img = image.clone();
                    tokio::task::spawn_blocking(move || img.zero_range(s, e - s)).await??;
                    progress.advance(e - s);
                    return Ok::<_, SpaceError>(e - s);
                }
                let (cstart, cend) = index.chunk_range(c);
                let len = usize::try_from(cend - cstart).expect("fits");
                let within = usize::try_from(s - cstart).expect("fits")
                    ..usize::try_from(e - cstart).expect("fits");
                let data = crate::fetch::fetch_range(&backend, r, len, within)
                    .await
                    .map_err(|err| {
                        crate::restore::chunk_error(record, disk, index, c, r.id, err)
                    })?;
                let img = image.clone();
                tokio::task::spawn_blocking(move || img.write_at(&data, s)).await??;
                progress.advance(e - s);
                Ok::<_, SpaceError>(e - s)
            }
        })
        .buffer_unordered(concurrency.max(1))
        .try_fold(0u64, |acc, n| async move { Ok(acc + n) })
        .await
}
