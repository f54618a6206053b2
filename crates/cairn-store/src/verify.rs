//! Verifying recovery points: read back every chunk they reference.
//!
//! Every distinct chunk referenced by the chosen points is fetched once, its stored
//! checksum checked, decompressed and re-hashed, in parallel. For each damaged or missing
//! chunk the report names every point, disk and byte range it damages. Damaged or
//! missing indexes and records are reported too.

use std::collections::HashMap;

use cairn_format::id::{ChunkId, PointId};
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
    let lease =
        crate::lock::acquire_reader(space.backend(), "verify", crate::lock::DEFAULT_WAIT).await?;
    let result = verify_locked(space, points, concurrency, progress).await;
    crate::lock::release_quietly(lease).await;
    result
}

/// Whether a point's record is gone (deleted while we looked), as opposed to damaged.
pub(crate) async fn deleted_meanwhile(space: &Space, id: &PointId) -> Result<bool, SpaceError> {
    Ok(space
        .backend()
        .stat(&cairn_format::layout::record_key(id))
        .await?
        .is_none())
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
    let mut unique: HashMap<ChunkId, u64> = HashMap::new();
    for r in &records {
        for d in &r.disks {
            report.disks += 1;
            match space.load_index(r, d).await {
                Ok(index) => {
                    for (i, id) in index.chunks.iter().enumerate() {
                        if !id.is_zero() {
                            let (s, e) = index.chunk_range(i as u64);
                            unique.entry(*id).or_insert(e - s);
                        }
                    }
                }
                Err(SpaceError::DamagedIndex { .. }) if deleted_meanwhile(space, &r.id).await? => {}
                Err(e @ SpaceError::DamagedIndex { .. }) => report.damage.push(Damage {
                    chunk: None,
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
    let mut bad: HashMap<ChunkId, String> = HashMap::new();
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
    let mut affected: HashMap<ChunkId, Vec<Affected>> = HashMap::new();
    for r in &records {
        for d in &r.disks {
            let Ok(index) = space.load_index(r, d).await else {
                continue;
            };
            let mut per_chunk: HashMap<ChunkId, Vec<(u64, u64)>> = HashMap::new();
            for (i, id) in index.chunks.iter().enumerate() {
                if bad.contains_key(id) {
                    let (s, e) = index.chunk_range(i as u64);
                    let ranges = per_chunk.entry(*id).or_default();
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
    let mut ids: Vec<ChunkId> = bad.keys().copied().collect();
    ids.sort();
    for id in ids {
        report.damage.push(Damage {
            chunk: Some(id),
            problem: bad.remove(&id).unwrap_or_default(),
            affected: affected.remove(&id).unwrap_or_default(),
        });
    }
    Ok(report)
}
