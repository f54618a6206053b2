//! Fetching chunks back: one GET, then checksum, decompression and hash check on the
//! blocking pool. Shared by restore, rollback, verify and (later) clone hydration.

use std::collections::HashMap;
use std::sync::Arc;

use cairn_format::chunk::{ChunkError, open_chunk_into};
use cairn_format::id::ChunkId;
use cairn_format::layout;

use crate::backend::{Backend, BackendError};

/// Why a chunk could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("missing from the space")]
    Missing,
    #[error(transparent)]
    Damaged(#[from] ChunkError),
    #[error(transparent)]
    Backend(BackendError),
}

/// Fetches and opens one chunk; `Ok` content always hashes to `id`.
pub async fn fetch_chunk(backend: &Arc<dyn Backend>, id: ChunkId) -> Result<Vec<u8>, FetchError> {
    let stored = match backend.get(&layout::chunk_key(&id)).await {
        Ok(b) => b,
        Err(BackendError::NotFound { .. }) => return Err(FetchError::Missing),
        Err(e) => return Err(FetchError::Backend(e)),
    };
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        open_chunk_into(&stored, &id, &mut out).map(|()| out)
    })
    .await
    .map_err(|e| {
        FetchError::Backend(BackendError::Io {
            key: layout::chunk_key(&id),
            detail: format!("worker failed: {e}"),
            retryable: false,
        })
    })?
    .map_err(FetchError::Damaged)
}

/// Groups chunk positions by id, in order of first appearance, so that each distinct
/// chunk is fetched once however often a disk repeats it. Zero chunks are left out.
pub fn group_by_chunk(
    positions: impl IntoIterator<Item = (u64, ChunkId)>,
) -> Vec<(ChunkId, Vec<u64>)> {
    let mut order: Vec<(ChunkId, Vec<u64>)> = Vec::new();
    let mut slot: HashMap<ChunkId, usize> = HashMap::new();
    for (i, id) in positions {
        if id.is_zero() {
            continue;
        }
        match slot.get(&id) {
            Some(&s) => order[s].1.push(i),
            None => {
                slot.insert(id, order.len());
                order.push((id, vec![i]));
            }
        }
    }
    order
}
