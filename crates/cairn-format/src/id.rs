//! Identifiers: chunk ids (BLAKE3 of a chunk's plain content) and recovery point ids
//! (UUIDv7, sortable by time).

use std::fmt;
use std::str::FromStr;

/// The id of a chunk: the BLAKE3 hash of its plain (uncompressed, unencrypted) content.
///
/// Where a chunk's content is stored: a standalone chunk (`base` = `None`) or a patch of
/// `base` (see [`crate::framed`]). `id` is the content's hash either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkRef {
    pub id: ChunkId,
    pub base: Option<ChunkId>,
}

impl ChunkRef {
    pub fn plain(id: ChunkId) -> ChunkRef {
        ChunkRef { id, base: None }
    }
}

/// The all-zero value is reserved as the *zero chunk* marker in disk indexes: a chunk of
/// zeros is never stored. (BLAKE3 never yields 32 zero bytes in practice.)
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// The marker for a chunk whose content is all zeros.
    pub const ZERO: ChunkId = ChunkId([0; 32]);

    /// Hashes `data` into its chunk id.
    pub fn of(data: &[u8]) -> ChunkId {
        if data.len() >= 128 * 1024 {
            // Multi-threaded hashing only pays off on large inputs; callers already run
            // one chunk per core, so stay on this thread.
            let mut h = blake3::Hasher::new();
            h.update(data);
            ChunkId(*h.finalize().as_bytes())
        } else {
            ChunkId(*blake3::hash(data).as_bytes())
        }
    }

    /// Whether this is the zero-chunk marker.
    pub fn is_zero(&self) -> bool {
        *self == ChunkId::ZERO
    }

    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first byte, used to shard chunk keys and garbage-collection passes.
    pub fn shard(&self) -> u8 {
        self.0[0]
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", &self.to_hex()[..16])
    }
}

impl serde::Serialize for ChunkId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for ChunkId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A string that is not a 64-character hex chunk id.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a chunk id (expected 64 hex characters): {0:?}")]
pub struct ChunkIdParseError(pub String);

impl FromStr for ChunkId {
    type Err = ChunkIdParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| ChunkIdParseError(s.to_string()))?;
        Ok(ChunkId(out))
    }
}

/// The id of a recovery point: a UUIDv7, so ids sort by creation time.
pub type PointId = uuid::Uuid;

/// A new recovery point id for a snapshot taken now.
pub fn new_point_id() -> PointId {
    uuid::Uuid::now_v7()
}
