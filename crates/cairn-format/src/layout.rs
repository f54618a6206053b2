//! The key layout of a recovery space. Keys are `/`-separated and relative to the space's
//! root (a folder, or a bucket prefix). See docs/FORMAT.md.
//!
//! ```text
//! config.json                          space config (format version, chunk size, ...)
//! chunks/<aa>/<64 hex>                 chunk envelopes, sharded by the id's first byte
//! indexes/<point id>/<disk>.idx        disk indexes, one per disk per recovery point
//! points/<point id>.json               recovery point records (written last)
//! locks/<uuid>.json                    leases of running writers and of GC
//! damaged/<64 hex>.json                quarantine markers of damaged chunks (verify --repair)
//! reserve.bin                          64 KiB of reserved room, freed by GC on a full store
//! ```

use crate::id::{ChunkId, ChunkRef, PointId};

pub const CONFIG_KEY: &str = "config.json";
pub const RESERVE_KEY: &str = "reserve.bin";
/// Size of the reserve object: room for GC's lease when the store is full.
pub const RESERVE_LEN: usize = 64 * 1024;
pub const CHUNKS_PREFIX: &str = "chunks/";
pub const PATCHES_PREFIX: &str = "patches/";
pub const INDEXES_PREFIX: &str = "indexes/";
pub const POINTS_PREFIX: &str = "points/";
pub const LOCKS_PREFIX: &str = "locks/";
pub const DAMAGED_PREFIX: &str = "damaged/";

pub fn chunk_key(id: &ChunkId) -> String {
    let hex = id.to_hex();
    format!("chunks/{}/{}", &hex[..2], hex)
}

/// A patch's key: `patches/<aa>/<id>.<base id>` (the same content over another base is
/// another object).
pub fn patch_key(id: &ChunkId, base: &ChunkId) -> String {
    let hex = id.to_hex();
    format!("patches/{}/{}.{}", &hex[..2], hex, base.to_hex())
}

/// Where a chunk reference's content is stored.
pub fn object_key(r: &ChunkRef) -> String {
    match &r.base {
        None => chunk_key(&r.id),
        Some(b) => patch_key(&r.id, b),
    }
}

/// The listing prefix of one patch shard (one value of the patch id's first byte).
pub fn patch_shard_prefix(shard: u8) -> String {
    format!("patches/{shard:02x}/")
}

/// Parses a chunk or patch key back into its reference (`None` for anything else).
pub fn parse_object_key(key: &str) -> Option<ChunkRef> {
    if let Some(id) = parse_chunk_key(key) {
        return Some(ChunkRef::plain(id));
    }
    let rest = key.strip_prefix(PATCHES_PREFIX)?;
    let (shard, name) = rest.split_once('/')?;
    let (hex, base) = name.split_once('.')?;
    let id: ChunkId = hex.parse().ok()?;
    let base: ChunkId = base.parse().ok()?;
    (shard == &hex[..2] && !base.is_zero()).then_some(ChunkRef {
        id,
        base: Some(base),
    })
}

/// The listing prefix of one chunk shard (one value of the id's first byte).
pub fn chunk_shard_prefix(shard: u8) -> String {
    format!("chunks/{shard:02x}/")
}

pub fn index_key(point: &PointId, disk: &str) -> String {
    format!("indexes/{point}/{disk}.idx")
}

pub fn index_prefix(point: &PointId) -> String {
    format!("indexes/{point}/")
}

pub fn record_key(point: &PointId) -> String {
    format!("points/{point}.json")
}

pub fn damaged_key(id: &ChunkId) -> String {
    format!("damaged/{}.json", id.to_hex())
}

/// Parses a quarantine marker key back into the chunk id.
pub fn parse_damaged_key(key: &str) -> Option<ChunkId> {
    key.strip_prefix(DAMAGED_PREFIX)?
        .strip_suffix(".json")?
        .parse()
        .ok()
}

pub fn lock_key(lease: &uuid::Uuid) -> String {
    format!("locks/{lease}.json")
}

/// Parses a chunk key back into its id (`None` for anything else, e.g. a temp file).
pub fn parse_chunk_key(key: &str) -> Option<ChunkId> {
    let rest = key.strip_prefix(CHUNKS_PREFIX)?;
    let (shard, hex) = rest.split_once('/')?;
    let id: ChunkId = hex.parse().ok()?;
    (shard == &hex[..2]).then_some(id)
}

/// Parses a record key back into its point id.
pub fn parse_record_key(key: &str) -> Option<PointId> {
    key.strip_prefix(POINTS_PREFIX)?
        .strip_suffix(".json")?
        .parse()
        .ok()
}

/// Parses an index key into its point id and disk name.
pub fn parse_index_key(key: &str) -> Option<(PointId, String)> {
    let rest = key.strip_prefix(INDEXES_PREFIX)?;
    let (point, file) = rest.split_once('/')?;
    let disk = file.strip_suffix(".idx")?;
    Some((point.parse().ok()?, disk.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let id = ChunkId::of(b"hello");
        assert_eq!(parse_chunk_key(&chunk_key(&id)), Some(id));
        assert_eq!(parse_chunk_key("chunks/00/zz"), None);
        let p = ChunkRef {
            id,
            base: Some(ChunkId::of(b"base")),
        };
        assert_eq!(parse_object_key(&object_key(&p)), Some(p));
        assert_eq!(parse_object_key(&chunk_key(&id)), Some(ChunkRef::plain(id)));
        assert_eq!(parse_object_key(&format!("{}#1", object_key(&p))), None);
        let p = crate::id::new_point_id();
        assert_eq!(parse_record_key(&record_key(&p)), Some(p));
        assert_eq!(
            parse_index_key(&index_key(&p, "root")),
            Some((p, "root".to_string()))
        );
    }
}
