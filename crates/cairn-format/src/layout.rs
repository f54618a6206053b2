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

use crate::id::{ChunkId, PointId};

pub const CONFIG_KEY: &str = "config.json";
pub const RESERVE_KEY: &str = "reserve.bin";
/// Size of the reserve object: room for GC's lease when the store is full.
pub const RESERVE_LEN: usize = 64 * 1024;
pub const CHUNKS_PREFIX: &str = "chunks/";
pub const INDEXES_PREFIX: &str = "indexes/";
pub const POINTS_PREFIX: &str = "points/";
pub const LOCKS_PREFIX: &str = "locks/";
pub const DAMAGED_PREFIX: &str = "damaged/";

pub fn chunk_key(id: &ChunkId) -> String {
    let hex = id.to_hex();
    format!("chunks/{}/{}", &hex[..2], hex)
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
        let p = crate::id::new_point_id();
        assert_eq!(parse_record_key(&record_key(&p)), Some(p));
        assert_eq!(
            parse_index_key(&index_key(&p, "root")),
            Some((p, "root".to_string()))
        );
    }
}
