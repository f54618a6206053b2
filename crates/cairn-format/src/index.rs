//! Disk indexes: the chunk ids of one disk of one recovery point, in order.
//!
//! ```text
//! offset size field
//!      0    4 magic "CRNI"
//!      4    2 index version (1), u16 LE
//!      6    2 flags (0; reserved: bit 0 = keyed chunk ids)
//!      8    8 disk size in bytes, u64 LE (a multiple of 512)
//!     16    4 chunk size in bytes, u32 LE (a power of two, 64 KiB ..= 16 MiB)
//!     20    4 reserved, 0
//!     24    8 chunk count n, u64 LE (= ceil(disk size / chunk size))
//!     32 32*n chunk ids; 32 zero bytes = a zero chunk (not stored)
//! 32+32n   32 BLAKE3 of all bytes before it (the index's own checksum)
//! ```
//!
//! Version 2 (written when the disk has patches) adds, between the ids and the checksum,
//! the positions whose chunk is stored as a patch, with the patch's base:
//!
//! ```text
//! 32+32n    8 patch count m, u64 LE
//! 40+32n 40·m (position u64 LE, base chunk id 32), positions strictly increasing
//! ```
//!
//! The last chunk of a disk is short when the disk size is not a multiple of the chunk
//! size; its id is the hash of just those bytes.

use std::collections::BTreeMap;

use crate::id::{ChunkId, ChunkRef};

pub const MAGIC: &[u8; 4] = b"CRNI";
pub const INDEX_VERSION: u16 = 1;
/// The version written when a disk has patches.
pub const INDEX_VERSION_PATCHES: u16 = 2;
const HEADER_LEN: usize = 32;

/// Why bytes are not a valid disk index.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IndexError {
    #[error("disk index is truncated ({0} bytes)")]
    Truncated(usize),
    #[error("object is not a disk index (bad magic)")]
    BadMagic,
    #[error("disk index version {0} is not supported (this cairn reads versions 1 and 2)")]
    UnsupportedVersion(u16),
    #[error("disk index uses flags {0:#x} this cairn does not know")]
    UnknownFlags(u16),
    #[error("disk index checksum mismatch: the index is damaged")]
    Checksum,
    #[error("disk index is inconsistent: {0}")]
    Inconsistent(String),
}

/// One disk's content at one recovery point, as chunk ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskIndex {
    pub disk_size: u64,
    pub chunk_size: u32,
    pub chunks: Vec<ChunkId>,
    /// Positions whose chunk is stored as a patch, with the patch's base.
    pub bases: BTreeMap<u64, ChunkId>,
}

/// Number of chunks of a disk of `disk_size` bytes.
pub fn chunk_count(disk_size: u64, chunk_size: u32) -> u64 {
    disk_size.div_ceil(u64::from(chunk_size))
}

impl DiskIndex {
    /// An index without patches.
    pub fn new(disk_size: u64, chunk_size: u32, chunks: Vec<ChunkId>) -> DiskIndex {
        DiskIndex {
            disk_size,
            chunk_size,
            chunks,
            bases: BTreeMap::new(),
        }
    }

    /// Where chunk `i`'s content is stored.
    pub fn chunk_ref(&self, i: u64) -> ChunkRef {
        ChunkRef {
            id: self.chunks[usize::try_from(i).expect("fits")],
            base: self.bases.get(&i).copied(),
        }
    }

    /// Byte range `[start, end)` of chunk `i` of the disk.
    pub fn chunk_range(&self, i: u64) -> (u64, u64) {
        let start = i * u64::from(self.chunk_size);
        (
            start,
            (start + u64::from(self.chunk_size)).min(self.disk_size),
        )
    }

    /// Serializes the index, checksum included.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + 32 * self.chunks.len() + 32);
        out.extend_from_slice(MAGIC);
        let version = if self.bases.is_empty() {
            INDEX_VERSION
        } else {
            INDEX_VERSION_PATCHES
        };
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&self.disk_size.to_le_bytes());
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(self.chunks.len() as u64).to_le_bytes());
        for id in &self.chunks {
            out.extend_from_slice(&id.0);
        }
        if !self.bases.is_empty() {
            out.extend_from_slice(&(self.bases.len() as u64).to_le_bytes());
            for (pos, base) in &self.bases {
                out.extend_from_slice(&pos.to_le_bytes());
                out.extend_from_slice(&base.0);
            }
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    /// Parses and checks an index (magic, version, checksum, consistency).
    pub fn decode(bytes: &[u8]) -> Result<DiskIndex, IndexError> {
        if bytes.len() < HEADER_LEN + 32 {
            return Err(IndexError::Truncated(bytes.len()));
        }
        if &bytes[0..4] != MAGIC {
            return Err(IndexError::BadMagic);
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version != INDEX_VERSION && version != INDEX_VERSION_PATCHES {
            return Err(IndexError::UnsupportedVersion(version));
        }
        let (body, sum) = bytes.split_at(bytes.len() - 32);
        if blake3::hash(body).as_bytes() != sum {
            return Err(IndexError::Checksum);
        }
        let flags = u16::from_le_bytes([bytes[6], bytes[7]]);
        if flags != 0 {
            return Err(IndexError::UnknownFlags(flags));
        }
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
        let disk_size = u64_at(8);
        let chunk_size = u32::from_le_bytes(bytes[16..20].try_into().expect("4 bytes"));
        let count = u64_at(24);
        if !chunk_size.is_power_of_two() || chunk_size < 4096 {
            return Err(IndexError::Inconsistent(format!("chunk size {chunk_size}")));
        }
        if chunk_count(disk_size, chunk_size) != count {
            return Err(IndexError::Inconsistent(format!(
                "{count} chunks for a disk of {disk_size} bytes"
            )));
        }
        let rest = &body[HEADER_LEN..];
        let ids_len = usize::try_from(count.saturating_mul(32)).unwrap_or(usize::MAX);
        if rest.len() < ids_len {
            return Err(IndexError::Inconsistent(format!(
                "{} bytes of ids for {count} chunks",
                rest.len()
            )));
        }
        let (ids, tail) = rest.split_at(ids_len);
        let mut bases = BTreeMap::new();
        if version == INDEX_VERSION_PATCHES {
            let m = tail
                .get(..8)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
                .ok_or_else(|| IndexError::Inconsistent("no patch count".into()))?;
            let entries = &tail[8..];
            if m == 0 || entries.len() as u64 != m.saturating_mul(40) {
                return Err(IndexError::Inconsistent(format!(
                    "{} bytes for {m} patches",
                    entries.len()
                )));
            }
            let mut last = None;
            for e in entries.chunks_exact(40) {
                let pos = u64::from_le_bytes(e[..8].try_into().expect("8 bytes"));
                let base = ChunkId(e[8..].try_into().expect("32 bytes"));
                if pos >= count || last.is_some_and(|l| l >= pos) || base.is_zero() {
                    return Err(IndexError::Inconsistent(format!("patch entry at {pos}")));
                }
                last = Some(pos);
                bases.insert(pos, base);
            }
        } else if !tail.is_empty() {
            return Err(IndexError::Inconsistent(format!(
                "{} bytes of ids for {count} chunks",
                rest.len()
            )));
        }
        let chunks = ids
            .chunks_exact(32)
            .map(|c| ChunkId(c.try_into().expect("32 bytes")))
            .collect();
        Ok(DiskIndex {
            disk_size,
            chunk_size,
            chunks,
            bases,
        })
    }

    /// The checksum of the encoded index, as recorded in the point record.
    pub fn checksum_of(encoded: &[u8]) -> String {
        hex::encode(&encoded[encoded.len().saturating_sub(32)..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> DiskIndex {
        DiskIndex::new(
            3 * 65536 + 512,
            65536,
            vec![
                ChunkId::of(b"a"),
                ChunkId::ZERO,
                ChunkId::of(b"b"),
                ChunkId::of(b"c"),
            ],
        )
    }

    #[test]
    fn patches_round_trip() {
        let mut idx = sample();
        let enc1 = idx.encode();
        idx.bases.insert(2, ChunkId::of(b"base"));
        let enc = idx.encode();
        assert_eq!(u16::from_le_bytes([enc[4], enc[5]]), INDEX_VERSION_PATCHES);
        assert_eq!(u16::from_le_bytes([enc1[4], enc1[5]]), INDEX_VERSION);
        assert_eq!(DiskIndex::decode(&enc).unwrap(), idx);
        assert_eq!(idx.chunk_ref(2).base, Some(ChunkId::of(b"base")));
        assert_eq!(idx.chunk_ref(0).base, None);
    }

    #[test]
    fn round_trip_and_damage() {
        let idx = sample();
        let enc = idx.encode();
        assert_eq!(DiskIndex::decode(&enc).unwrap(), idx);
        assert_eq!(idx.chunk_range(3), (3 * 65536, 3 * 65536 + 512));
        let mut bad = enc.clone();
        bad[40] ^= 1;
        assert_eq!(DiskIndex::decode(&bad), Err(IndexError::Checksum));
        assert_eq!(
            DiskIndex::decode(&enc[..20]),
            Err(IndexError::Truncated(20))
        );
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = DiskIndex::decode(&bytes);
        }
    }
}
