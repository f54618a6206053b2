//! Fetching chunks back: a GET (two for a patch: it and its base), then checksum,
//! decompression and hash check on the blocking pool; or, for framed chunks, only the
//! grains of a byte range ([`fetch_range`]). Shared by restore, rollback, verify, clone
//! hydration and point exports.

use std::collections::HashMap;
use std::sync::Arc;

use cairn_format::chunk::{ChunkError, open_chunk_into};
use cairn_format::framed;
use cairn_format::id::{ChunkId, ChunkRef};
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

fn worker_failed(key: String, e: tokio::task::JoinError) -> FetchError {
    FetchError::Backend(BackendError::Io {
        key,
        detail: format!("worker failed: {e}"),
        retryable: false,
    })
}

async fn get(backend: &Arc<dyn Backend>, key: &str) -> Result<bytes::Bytes, FetchError> {
    match backend.get(key).await {
        Ok(b) => Ok(b),
        Err(BackendError::NotFound { .. }) => Err(FetchError::Missing),
        Err(e) => Err(FetchError::Backend(e)),
    }
}

async fn get_range(
    backend: &Arc<dyn Backend>,
    key: &str,
    range: std::ops::Range<usize>,
) -> Result<bytes::Bytes, FetchError> {
    match backend
        .get_range(key, range.start as u64..range.end as u64)
        .await
    {
        Ok(b) => Ok(b),
        Err(BackendError::NotFound { .. }) => Err(FetchError::Missing),
        Err(e) => Err(FetchError::Backend(e)),
    }
}

/// Fetches and opens one chunk (a patch with its base); `Ok` content always hashes to
/// the reference's id.
pub async fn fetch_chunk(backend: &Arc<dyn Backend>, r: ChunkRef) -> Result<Vec<u8>, FetchError> {
    let key = layout::object_key(&r);
    let Some(base) = r.base else {
        let stored = get(backend, &key).await?;
        return tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            open_chunk_into(&stored, &r.id, &mut out).map(|()| out)
        })
        .await
        .map_err(|e| worker_failed(key, e))?
        .map_err(FetchError::Damaged);
    };
    let base_key = layout::chunk_key(&base);
    let (patch, base_stored) = futures::try_join!(get(backend, &key), get(backend, &base_key))?;
    tokio::task::spawn_blocking(move || {
        let mut base_plain = Vec::new();
        open_chunk_into(&base_stored, &base, &mut base_plain)?;
        let mut out = Vec::new();
        framed::open_into(&patch, Some(&base_plain), &r.id, &mut out).map(|()| out)
    })
    .await
    .map_err(|e| worker_failed(key, e))?
    .map_err(FetchError::Damaged)
}

/// Grains read by [`read_grains`]: the header, the plain content of the grains read
/// (base and delta grains of a patch left zero), and the frames as read (from the first
/// grain's frame on).
struct Grains {
    h: framed::Header,
    plain: Vec<u8>,
    frames: bytes::Bytes,
    first: usize,
}

impl Grains {
    /// Grain `g`'s frame.
    fn frame(&self, g: usize) -> &[u8] {
        let f = self.h.frame_range(g);
        &self.frames[f.start - self.first..f.end - self.first]
    }
}

/// Reads grains `grains` of a framed chunk stored at `key` with id `id` (`chunk_len`
/// bytes): one read for the table, one for the frames. The table is checked against the
/// id and every grain against the table. Base and delta grains of a patch are left zero.
/// `None` when the object is a version-1 envelope (not seekable).
async fn read_grains(
    backend: &Arc<dyn Backend>,
    key: &str,
    id: ChunkId,
    chunk_len: usize,
    grains: std::ops::Range<usize>,
) -> Result<Option<Grains>, FetchError> {
    let head = get_range(backend, key, 0..framed::table_len(chunk_len)).await?;
    if !framed::is_framed(&head) {
        return Ok(None);
    }
    let h = framed::parse_header(&head)?;
    if h.plain_len != chunk_len || grains.end > h.entries.len() {
        return Err(FetchError::Damaged(ChunkError::Length {
            expected: chunk_len,
            got: h.plain_len,
        }));
    }
    let root = h.root();
    if root != id {
        return Err(FetchError::Damaged(ChunkError::HashMismatch {
            expected: id,
            got: root,
        }));
    }
    let first = h.frame_range(grains.start).start;
    let last = h.frame_range(grains.end - 1).end;
    let frames = if last > first {
        get_range(backend, key, first..last).await?
    } else {
        bytes::Bytes::new()
    };
    if frames.len() != last - first {
        return Err(FetchError::Damaged(ChunkError::Truncated {
            len: frames.len(),
        }));
    }
    let key = key.to_string();
    tokio::task::spawn_blocking(move || {
        let base = h.grain_range(grains.start).start;
        let mut out = vec![0u8; h.grain_range(grains.end - 1).end - base];
        for g in grains {
            if h.entries[g].kind.needs_base() {
                continue;
            }
            let r = h.grain_range(g);
            let f = h.frame_range(g);
            let dst = &mut out[r.start - base..r.end - base];
            framed::decode_grain(&h, g, &frames[f.start - first..f.end - first], dst)?;
            framed::check_grain(&h, g, dst)?;
        }
        Ok(Grains {
            h,
            plain: out,
            frames,
            first,
        })
    })
    .await
    .map_err(|e| worker_failed(key, e))?
    .map(Some)
    .map_err(FetchError::Damaged)
}

/// Fetches bytes `range` of a chunk of `chunk_len` bytes, reading only the grains that
/// hold them (and, for a patch, those of its base) where the chunk is framed; a version-1
/// chunk is fetched whole. Verified like [`fetch_chunk`], grain by grain.
pub async fn fetch_range(
    backend: &Arc<dyn Backend>,
    r: ChunkRef,
    chunk_len: usize,
    range: std::ops::Range<usize>,
) -> Result<Vec<u8>, FetchError> {
    let (g0, g1) = (
        range.start / framed::GRAIN,
        range.end.div_ceil(framed::GRAIN),
    );
    let key = layout::object_key(&r);
    let Some(mut read) = read_grains(backend, &key, r.id, chunk_len, g0..g1).await? else {
        let whole = fetch_chunk(backend, r).await?;
        return Ok(whole[range].to_vec());
    };
    let h = &read.h;
    if h.base != r.base {
        return Err(FetchError::Damaged(ChunkError::Table(format!(
            "stored at {key} with base {:?}",
            h.base.map(|b| b.to_hex())
        ))));
    }
    let need: Vec<usize> = (g0..g1)
        .filter(|&g| h.entries[g].kind.needs_base())
        .collect();
    if let (Some(base), Some(&a), Some(&b)) = (h.base, need.first(), need.last()) {
        let off = a * framed::GRAIN;
        let bkey = layout::chunk_key(&base);
        let from_base = match read_grains(backend, &bkey, base, chunk_len, a..b + 1).await? {
            Some(bg) => {
                for &g in &need {
                    if h.entries[g].kind == framed::Kind::Base
                        && bg.h.entries[g].cv != h.entries[g].cv
                    {
                        return Err(FetchError::Damaged(ChunkError::Table(format!(
                            "grain {g} differs from its base's"
                        ))));
                    }
                }
                bg.plain
            }
            None => {
                let whole = fetch_chunk(backend, ChunkRef::plain(base)).await?;
                whole[off..h.grain_range(b).end].to_vec()
            }
        };
        let at = g0 * framed::GRAIN;
        let mut plain = std::mem::take(&mut read.plain);
        for g in need {
            let gr = read.h.grain_range(g);
            let dst = &mut plain[gr.start - at..gr.end - at];
            dst.copy_from_slice(&from_base[gr.start - off..gr.end - off]);
            if read.h.entries[g].kind == framed::Kind::Delta {
                // Small (a few blocks over one grain): inline.
                framed::apply_delta(&read.h, g, read.frame(g), dst)?;
                framed::check_grain(&read.h, g, dst)?;
            }
        }
        read.plain = plain;
    }
    let at = g0 * framed::GRAIN;
    Ok(read.plain[range.start - at..range.end - at].to_vec())
}

/// Groups chunk positions by id, in order of first appearance, so that each distinct
/// chunk is fetched once however often a disk repeats it. Zero chunks are left out.
pub fn group_by_chunk(
    positions: impl IntoIterator<Item = (u64, ChunkRef)>,
) -> Vec<(ChunkRef, Vec<u64>)> {
    let mut order: Vec<(ChunkRef, Vec<u64>)> = Vec::new();
    let mut slot: HashMap<ChunkRef, usize> = HashMap::new();
    for (i, id) in positions {
        if id.id.is_zero() {
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
