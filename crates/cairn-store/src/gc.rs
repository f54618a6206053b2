//! Deleting recovery points, and garbage collection of what no point references.
//!
//! Deleting a point removes its record first (the point is gone at that instant), then its
//! indexes. Chunks are shared between points, so they are left for garbage collection:
//! deleting an old point never touches what a newer one references.
//!
//! Garbage collection is mark and sweep, without atime (object stores have none) and
//! without stopping writers:
//! 1. *Mark*: read every record and index, and collect the ids they reference. To bound
//!    memory, ids are split by their first byte into passes of at most `max_ids_per_pass`
//!    referenced ids each; each pass re-reads the indexes and keeps only its own shards.
//! 2. *List*: list the pass's chunk shards; an unreferenced chunk is a candidate only if
//!    it is older than the grace period (a writer's fresh chunks are never candidates).
//! 3. *Sweep*: take the GC lease (only when no writer holds a lease; see `lock`), read the
//!    records that appeared since the mark and drop every chunk they reference from the
//!    candidates, delete the rest, release the lease.
//!
//! Every step is idempotent, so an interrupted GC is resumed by running it again.

use std::collections::HashSet;
use std::time::Duration;

use cairn_format::id::{ChunkRef, PointId};
use cairn_format::layout;
use cairn_format::record::PointRecord;
use futures::{StreamExt, TryStreamExt};

use crate::error::SpaceError;
use crate::lock;
use crate::progress::Progress;
use crate::retention::{PrunePlan, RetentionPolicy};
use crate::space::{METADATA_CONCURRENCY, Space};

/// The instant `age` ago (the beginning of time for absurdly long ages).
pub(crate) fn before(age: Duration) -> chrono::DateTime<chrono::Utc> {
    chrono::Duration::from_std(age)
        .ok()
        .and_then(|d| chrono::Utc::now().checked_sub_signed(d))
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC)
}

/// Deletes points (records first, then their indexes). Returns the ids deleted.
pub async fn delete_points(space: &Space, ids: &[PointId]) -> Result<Vec<PointId>, SpaceError> {
    for id in ids {
        if !space.point_exists(id).await? {
            return Err(SpaceError::PointNotFound(id.to_string()));
        }
        pinned(space, id).await?;
    }
    for id in ids {
        pinned(space, id).await?;
        space.backend().delete(&layout::record_key(id)).await?;
        delete_prefix(space, &layout::index_prefix(id)).await?;
    }
    Ok(ids.to_vec())
}

/// Refuses a point that a clone still reads from.
async fn pinned(space: &Space, id: &PointId) -> Result<(), SpaceError> {
    let pins = crate::pins::pins_of(space, id).await?;
    if pins.is_empty() {
        return Ok(());
    }
    Err(SpaceError::Pinned {
        point: *id,
        holders: pins
            .iter()
            .map(|p| p.holder.clone())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

async fn delete_prefix(space: &Space, prefix: &str) -> Result<u64, SpaceError> {
    let keys: Vec<String> = space
        .backend()
        .list(prefix)
        .map_ok(|o| o.key)
        .try_collect()
        .await?;
    for k in &keys {
        space.backend().delete(k).await?;
    }
    Ok(keys.len() as u64)
}

#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Unreferenced chunks younger than this are kept.
    pub grace: Duration,
    /// Referenced ids held in memory at once (32 bytes each, plus set overhead).
    pub max_ids_per_pass: usize,
    /// How long the sweep waits for running writers.
    pub lease_wait: Duration,
    /// Compute and report, delete nothing.
    pub dry_run: bool,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            grace: Duration::from_secs(3600),
            max_ids_per_pass: 4 << 20,
            lease_wait: Duration::from_secs(3600),
            dry_run: false,
        }
    }
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GcReport {
    pub points: usize,
    pub passes: usize,
    pub chunks_seen: u64,
    pub chunks_referenced: u64,
    /// Unreferenced chunks kept because they are younger than the grace period.
    pub chunks_in_grace: u64,
    pub chunks_deleted: u64,
    pub bytes_freed: u64,
    pub indexes_deleted: u64,
    pub leases_removed: usize,
    /// Staging files or unfinished uploads of interrupted writes.
    pub incomplete_removed: u64,
    /// The store was full: the reserve object was freed to let GC take its lease.
    pub reserve_used: bool,
    pub dry_run: bool,
}

/// Collects every id referenced by the records' indexes whose shard is in `shards`.
async fn mark(
    space: &Space,
    records: &[PointRecord],
    shards: &std::ops::RangeInclusive<u8>,
    into: &mut HashSet<ChunkRef>,
) -> Result<(), SpaceError> {
    for record in records {
        for d in &record.disks {
            // A damaged index stops GC: without it, nothing can be known unreferenced.
            // (A point deleted while we mark is simply skipped.)
            let index = match space.load_index(record, d).await {
                Ok(index) => index,
                Err(SpaceError::DamagedIndex { .. }) if !space.point_exists(&record.id).await? => {
                    break;
                }
                Err(e) => return Err(e),
            };
            for i in 0..index.chunks.len() as u64 {
                let r = index.chunk_ref(i);
                if r.id.is_zero() {
                    continue;
                }
                if shards.contains(&r.id.shard()) {
                    into.insert(r);
                }
                // A patch keeps its base.
                if let Some(b) = r.base
                    && shards.contains(&b.shard())
                {
                    into.insert(ChunkRef::plain(b));
                }
            }
        }
    }
    Ok(())
}

/// Runs garbage collection. See the module documentation.
pub async fn gc(
    space: &Space,
    opts: &GcOptions,
    progress: &dyn Progress,
) -> Result<GcReport, SpaceError> {
    let mut report = GcReport {
        dry_run: opts.dry_run,
        ..GcReport::default()
    };
    // Records are small: read once, then every pass re-reads only the indexes.
    let records0 = space.list_points().await?;
    report.points = records0.len();
    // Upper bound of referenced ids: every chunk of every disk of every point.
    let estimate = records0
        .iter()
        .fold(0u64, |n, r| n.saturating_add(r.stats.chunks_total));
    let passes = usize::try_from(estimate.div_ceil(opts.max_ids_per_pass.max(1) as u64))
        .unwrap_or(256)
        .clamp(1, 256);
    report.passes = passes;
    progress.start("gc", 256);
    let cutoff = before(opts.grace);
    for pass in 0..passes {
        let lo = u8::try_from(pass * 256 / passes).expect("shard");
        let hi = u8::try_from((pass + 1) * 256 / passes - 1).expect("shard");
        let shards = lo..=hi;
        let mut referenced = HashSet::new();
        mark(space, &records0, &shards, &mut referenced).await?;
        report.chunks_referenced += referenced.len() as u64;

        let mut candidates: Vec<(ChunkRef, u64)> = Vec::new();
        for shard in shards.clone() {
            let mut listing = futures::stream::select(
                space.backend().list(&layout::chunk_shard_prefix(shard)),
                space.backend().list(&layout::patch_shard_prefix(shard)),
            );
            while let Some(o) = listing.try_next().await? {
                let Some(id) = layout::parse_object_key(&o.key) else {
                    continue;
                };
                report.chunks_seen += 1;
                if referenced.contains(&id) {
                    continue;
                }
                if o.last_modified < cutoff {
                    candidates.push((id, o.size));
                } else {
                    report.chunks_in_grace += 1;
                }
            }
            progress.advance(1);
        }
        drop(referenced);
        if candidates.is_empty() || opts.dry_run {
            report.chunks_deleted += candidates.len() as u64;
            report.bytes_freed += candidates.iter().map(|c| c.1).sum::<u64>();
            continue;
        }
        let lease = acquire_lease(space, opts, &mut report).await?;
        let swept = match lease.check().await {
            Ok(()) => sweep(space, &records0, &shards, candidates).await,
            Err(e) => Err(e),
        };
        let released = lease.release().await;
        let (n, bytes) = swept?;
        released?;
        report.chunks_deleted += n;
        report.bytes_freed += bytes;
    }
    progress.finish();
    if !opts.dry_run {
        // Leftovers of killed writers, removed while no writer is live.
        let lease = acquire_lease(space, opts, &mut report).await?;
        let cleaned = clean_leftovers(space, opts, &mut report).await;
        let released = lease.release().await;
        cleaned?;
        released?;
        // Staging files of interrupted writes: not under the lease (the walk can be long
        // on a large space, and writers must not wait for it); old enough (ten minutes at
        // least) that no running write can still own them.
        let age = opts.grace.max(Duration::from_secs(600));
        report.incomplete_removed = space.backend().remove_incomplete(before(age)).await?;
    }
    if report.reserve_used {
        // Put the room back for next time, if there is room again.
        if let Err(e) = space.put_reserve().await {
            tracing::warn!("cannot restore the reserve object: {e}");
        }
    }
    Ok(report)
}

/// Takes the GC lease. When the store is too full to write even the lease, frees the
/// reserve object first: GC is how an operator gets room back, so it must run on a full
/// store. (Writers cannot start on a full store: they must write a lease first.)
async fn acquire_lease(
    space: &Space,
    opts: &GcOptions,
    report: &mut GcReport,
) -> Result<lock::Lease, SpaceError> {
    match lock::acquire_gc(space.backend(), opts.lease_wait).await {
        Err(SpaceError::Backend(crate::backend::BackendError::NoSpace { .. }))
            if !report.reserve_used =>
        {
            report.reserve_used = true;
            space.backend().delete(layout::RESERVE_KEY).await?;
            lock::acquire_gc(space.backend(), opts.lease_wait).await
        }
        other => other,
    }
}

/// Under the GC lease: spare what points committed since the mark reference, delete
/// the rest.
async fn sweep(
    space: &Space,
    records0: &[PointRecord],
    shards: &std::ops::RangeInclusive<u8>,
    mut candidates: Vec<(ChunkRef, u64)>,
) -> Result<(u64, u64), SpaceError> {
    let before: HashSet<PointId> = records0.iter().map(|r| r.id).collect();
    let new_ids: Vec<PointId> = space
        .point_ids()
        .await?
        .into_iter()
        .filter(|id| !before.contains(id))
        .collect();
    if !new_ids.is_empty() {
        let mut spared = HashSet::new();
        mark(
            space,
            &space.load_points(&new_ids).await?,
            shards,
            &mut spared,
        )
        .await?;
        candidates.retain(|(id, _)| !spared.contains(id));
    }
    let backend = space.backend().clone();
    let deleted: Vec<u64> = futures::stream::iter(candidates)
        .map(|(id, size)| {
            let backend = backend.clone();
            async move {
                backend.delete(&layout::object_key(&id)).await?;
                Ok::<_, SpaceError>(size)
            }
        })
        .buffer_unordered(METADATA_CONCURRENCY)
        .try_collect()
        .await?;
    Ok((deleted.len() as u64, deleted.iter().sum()))
}

async fn clean_leftovers(
    space: &Space,
    opts: &GcOptions,
    report: &mut GcReport,
) -> Result<(), SpaceError> {
    report.indexes_deleted = remove_orphan_indexes(space, opts).await?;
    report.leases_removed = lock::remove_stale(space.backend()).await?;
    Ok(())
}

/// Deletes indexes left by a writer that died before its record (older than the grace
/// period, and with no record).
async fn remove_orphan_indexes(space: &Space, opts: &GcOptions) -> Result<u64, SpaceError> {
    let cutoff = before(opts.grace);
    let points: HashSet<PointId> = space.point_ids().await?.into_iter().collect();
    let listing: Vec<_> = space
        .backend()
        .list(layout::INDEXES_PREFIX)
        .try_collect()
        .await?;
    let mut deleted = 0;
    for o in listing {
        let Some((point, _)) = layout::parse_index_key(&o.key) else {
            continue;
        };
        if !points.contains(&point) && o.last_modified < cutoff {
            // Re-check: the record may have been committed since the listing.
            if !space.point_exists(&point).await? {
                space.backend().delete(&o.key).await?;
                deleted += 1;
            }
        }
    }
    Ok(deleted)
}

/// Computes the retention plan of a space.
pub async fn prune_plan(space: &Space, policy: &RetentionPolicy) -> Result<PrunePlan, SpaceError> {
    let points: Vec<_> = space
        .list_points()
        .await?
        .into_iter()
        .map(|r| crate::retention::Candidate {
            id: r.id,
            server: r.server,
            snapshot_at: r.snapshot_at,
        })
        .collect();
    let mut plan = crate::retention::plan(&points, policy)?;
    // A point a clone still reads from is kept whatever the policy says.
    let mut remove = Vec::with_capacity(plan.remove.len());
    for mut p in std::mem::take(&mut plan.remove) {
        let pins = crate::pins::pins_of(space, &p.id).await?;
        if pins.is_empty() {
            remove.push(p);
        } else {
            for pin in pins {
                p.reasons.push(format!("pinned by clone {}", pin.holder));
            }
            plan.keep.push(p);
        }
    }
    plan.remove = remove;
    plan.keep.sort_by_key(|p| p.snapshot_at);
    Ok(plan)
}
