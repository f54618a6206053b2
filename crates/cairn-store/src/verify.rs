//! Verifying recovery points: read back every chunk they reference.
//!
//! Every distinct chunk referenced by the chosen points is fetched once, its stored
//! checksum checked, decompressed and re-hashed, in parallel. For each damaged or missing
//! chunk the report names every point, disk and byte range it damages. Damaged or
//! missing indexes and records are reported too.

use std::collections::HashMap;

use cairn_format::id::{ChunkId, ChunkRef, PointId};
use cairn_format::record::PointRecord;
use futures::StreamExt;

use crate::error::SpaceError;
use crate::fetch::{FetchError, fetch_chunk};
use crate::progress::Progress;
use crate::space::Space;

/// Where a damaged chunk or index hurts.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Affected {
    pub point: PointId,
    pub disk: String,
    /// Byte ranges `[start, end)` of the disk that cannot be restored.
    pub ranges: Vec<(u64, u64)>,
}

/// One problem found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Damage {
    /// The damaged chunk, or `None` when an index or record is damaged.
    pub chunk: Option<ChunkId>,
    /// Where that chunk is stored (a patch names its base).
    #[serde(skip)]
    pub object: Option<ChunkRef>,
    pub problem: String,
    pub affected: Vec<Affected>,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct VerifyReport {
    pub points: usize,
    pub disks: usize,
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    pub damage: Vec<Damage>,
    /// Damaged chunks quarantined (with `repair`): the next point that reads the same
    /// data stores them again, which heals every point that references them.
    pub quarantined: u64,
}

/// The quarantine marker of a damaged chunk (`damaged/<id>.json`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct QuarantineMarker {
    pub chunk: ChunkId,
    pub problem: String,
    pub found_at: chrono::DateTime<chrono::Utc>,
}

/// Ids of quarantined chunks: writers must not trust that these exist.
pub async fn quarantined(space: &Space) -> Result<std::collections::HashSet<ChunkId>, SpaceError> {
    use futures::TryStreamExt;
    Ok(space
        .backend()
        .list(cairn_format::layout::DAMAGED_PREFIX)
        .try_filter_map(|o| async move { Ok(cairn_format::layout::parse_damaged_key(&o.key)) })
        .try_collect()
        .await?)
}

/// Quarantines a damaged chunk: the marker first (so no writer trusts the id any more),
/// then the damaged object goes.
async fn quarantine(space: &Space, r: ChunkRef, problem: &str) -> Result<(), SpaceError> {
    let id = r.id;
    let marker = QuarantineMarker {
        chunk: id,
        problem: problem.to_string(),
        found_at: chrono::Utc::now(),
    };
    space
        .backend()
        .put(
            &cairn_format::layout::damaged_key(&id),
            bytes::Bytes::from(serde_json::to_vec_pretty(&marker).expect("marker serializes")),
            crate::backend::PutMode::Overwrite,
        )
        .await?;
    space
        .backend()
        .delete(&cairn_format::layout::object_key(&r))
        .await?;
    Ok(())
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.damage.is_empty()
    }
}

/// Verifies the given points (all when `points` is empty).
pub async fn verify(
    space: &Space,
    points: &[PointId],
    concurrency: usize,
    progress: &dyn Progress,
) -> Result<VerifyReport, SpaceError> {
    verify_and_repair(space, points, false, concurrency, progress).await
}

/// Verifies, and with `repair` quarantines every damaged chunk (see [`VerifyReport`]).
pub async fn verify_and_repair(
    space: &Space,
    points: &[PointId],
    repair: bool,
    concurrency: usize,
    progress: &dyn Progress,
) -> Result<VerifyReport, SpaceError> {
    let lease =
        crate::lock::acquire_reader(space.backend(), "verify", crate::lock::DEFAULT_WAIT).await?;
    let result = match verify_locked(space, points, concurrency, progress).await {
        Ok(mut report) if repair => {
            let mut outcome = Ok(());
            for id in report
                .damage
                .iter()
                .filter_map(|d| d.object.map(|c| (c, d.problem.clone())))
            {
                outcome = quarantine(space, id.0, &id.1).await;
                if outcome.is_err() {
                    break;
                }
                report.quarantined += 1;
            }
            outcome.map(|()| report)
        }
        other => other,
    };
    crate::lock::release_quietly(lease).await;
    result
}

async fn verify_locked(
    space: &Space,
    points: &[PointId],
    concurrency: usize,
    progress: &dyn Progress,
) -> Result<VerifyReport, SpaceError> {
    let mut report = VerifyReport::default();
    let records: Vec<PointRecord> = if points.is_empty() {
        space.list_points().await?
    } else {
        let mut v = Vec::new();
        for id in points {
            match space.load_point(id).await {
                Ok(r) => v.push(r),
                Err(e @ SpaceError::DamagedRecord { .. }) => report.damage.push(Damage {
                    chunk: None,
                    object: None,
                    problem: e.to_string(),
                    affected: vec![],
                }),
                Err(e) => return Err(e),
            }
        }
        v
    };
    report.points = records.len();

    // Pass 1: every distinct chunk, with the bytes it covers (for progress).
    let mut unique: HashMap<ChunkRef, u64> = HashMap::new();
    for r in &records {
        for d in &r.disks {
            report.disks += 1;
            match space.load_index(r, d).await {
                Ok(index) => {
                    for i in 0..index.chunks.len() as u64 {
                        let r = index.chunk_ref(i);
                        if !r.id.is_zero() {
                            let (s, e) = index.chunk_range(i);
                            unique.entry(r).or_insert(e - s);
                        }
                    }
                }
                Err(SpaceError::DamagedIndex { .. }) if !space.point_exists(&r.id).await? => {}
                Err(e @ SpaceError::DamagedIndex { .. }) => report.damage.push(Damage {
                    chunk: None,
                    object: None,
                    problem: e.to_string(),
                    affected: vec![Affected {
                        point: r.id,
                        disk: d.name.clone(),
                        ranges: vec![(0, d.size)],
                    }],
                }),
                Err(e) => return Err(e),
            }
        }
    }
    progress.start("verify", unique.values().sum());
    let backend = space.backend().clone();
    let mut bad: HashMap<ChunkRef, String> = HashMap::new();
    let mut results = futures::stream::iter(unique)
        .map(|(id, plain)| {
            let backend = backend.clone();
            async move { (id, plain, fetch_chunk(&backend, id).await) }
        })
        .buffer_unordered(concurrency.max(1));
    while let Some((id, plain, result)) = results.next().await {
        report.chunks_checked += 1;
        progress.advance(plain);
        match result {
            Ok(data) => report.bytes_checked += data.len() as u64,
            Err(FetchError::Backend(e)) => return Err(e.into()),
            Err(e) => {
                bad.insert(id, e.to_string());
            }
        }
    }
    drop(results);
    progress.finish();
    if bad.is_empty() {
        return Ok(report);
    }

    // Pass 2 (only when damaged): which points, disks and ranges each damaged chunk hurts.
    let mut affected: HashMap<ChunkRef, Vec<Affected>> = HashMap::new();
    for r in &records {
        for d in &r.disks {
            let Ok(index) = space.load_index(r, d).await else {
                continue;
            };
            let mut per_chunk: HashMap<ChunkRef, Vec<(u64, u64)>> = HashMap::new();
            for i in 0..index.chunks.len() as u64 {
                let id = index.chunk_ref(i);
                if bad.contains_key(&id) {
                    let (s, e) = index.chunk_range(i);
                    let ranges = per_chunk.entry(id).or_default();
                    match ranges.last_mut() {
                        Some(last) if last.1 == s => last.1 = e,
                        _ => ranges.push((s, e)),
                    }
                }
            }
            for (id, ranges) in per_chunk {
                affected.entry(id).or_default().push(Affected {
                    point: r.id,
                    disk: d.name.clone(),
                    ranges,
                });
            }
        }
    }
    let mut ids: Vec<ChunkRef> = bad.keys().copied().collect();
    ids.sort();
    for id in ids {
        report.damage.push(Damage {
            chunk: Some(id.id),
            object: Some(id),
            problem: bad.remove(&id).unwrap_or_default(),
            affected: affected.remove(&id).unwrap_or_default(),
        });
    }
    Ok(report)
}
