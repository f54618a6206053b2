//! Rolling an existing image back to a recovery point, rewriting only what differs.
//!
//! First a [`RollbackPlan`]: every chunk of the image is read (holes are not) and hashed,
//! and compared with the point's index; this changes nothing and tells the operator how
//! much would be rewritten. Applying the plan checks that every chunk it needs is present,
//! then fetches each differing chunk once, verifies it, and writes it (zero chunks become
//! holes where the filesystem can punch them), then syncs the image.

use std::path::{Path, PathBuf};

use cairn_format::id::{ChunkId, PointId};
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
    pub differing: Vec<(u64, ChunkId)>,
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
    let mut differing: Vec<(u64, ChunkId, u64, u64)> = futures::stream::iter(positions)
        .map(|i| async move {
            let want = index_ref.chunks[usize::try_from(i).expect("fits")];
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
            Ok::<_, SpaceError>((i, want, read, if have == want { 0 } else { end - start }))
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
        bytes_read,
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
    let groups = crate::fetch::group_by_chunk(plan.differing.iter().copied());
    futures::stream::iter(groups.iter())
        .map(|(id, at)| {
            let backend = backend.clone();
            let index = &index;
            async move {
                match backend.stat(&layout::chunk_key(id)).await? {
                    Some(_) => Ok(()),
                    None => {
                        let (start, end) = index.chunk_range(at[0]);
                        Err(SpaceError::MissingChunk {
                            point: record.id,
                            disk: disk.name.clone(),
                            chunk: *id,
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
