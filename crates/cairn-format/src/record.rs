//! Recovery point records (`points/<id>.json`).
//!
//! A record is written last, after every chunk and disk index it references: a recovery
//! point exists if and only if its record exists. It is JSON so that an operator can read
//! it with any tool in an emergency; it names each disk's index and that index's checksum,
//! so a record and its indexes can be checked against each other.

use serde::{Deserialize, Serialize};

use crate::id::PointId;

/// The record format version this cairn writes and reads.
pub const RECORD_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("recovery point record is malformed: {0}")]
    Malformed(String),
    #[error("recovery point record version {0} is not supported (this cairn reads version 1)")]
    UnknownVersion(u32),
}

/// Byte and chunk counts of one disk, or of a whole point.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PointStats {
    /// Logical size covered (sum of disk sizes).
    pub bytes_total: u64,
    /// Bytes read from the source (holes and unchanged areas are not read).
    pub bytes_read: u64,
    /// Plain bytes of the chunks this point stored anew.
    pub bytes_new: u64,
    /// Stored (compressed) bytes this point wrote.
    pub bytes_written: u64,
    pub chunks_total: u64,
    pub chunks_new: u64,
    /// Chunks already in the space (same as the parent, or deduplicated).
    pub chunks_reused: u64,
    pub chunks_zero: u64,
}

impl PointStats {
    pub fn add(&mut self, o: &PointStats) {
        self.bytes_total = self.bytes_total.saturating_add(o.bytes_total);
        self.bytes_read = self.bytes_read.saturating_add(o.bytes_read);
        self.bytes_new = self.bytes_new.saturating_add(o.bytes_new);
        self.bytes_written = self.bytes_written.saturating_add(o.bytes_written);
        self.chunks_total = self.chunks_total.saturating_add(o.chunks_total);
        self.chunks_new = self.chunks_new.saturating_add(o.chunks_new);
        self.chunks_reused = self.chunks_reused.saturating_add(o.chunks_reused);
        self.chunks_zero = self.chunks_zero.saturating_add(o.chunks_zero);
    }

    /// Non-zero logical bytes per new plain byte (how much deduplication saved).
    #[allow(clippy::cast_precision_loss)]
    pub fn dedup_ratio(&self, chunk_size: u32) -> f64 {
        let nonzero =
            self.chunks_total.saturating_sub(self.chunks_zero) as f64 * f64::from(chunk_size);
        let nonzero = nonzero.min(self.bytes_total as f64);
        if self.bytes_new == 0 {
            if nonzero == 0.0 { 1.0 } else { f64::INFINITY }
        } else {
            nonzero / self.bytes_new as f64
        }
    }

    /// New plain bytes per stored byte (how much compression saved).
    #[allow(clippy::cast_precision_loss)]
    pub fn compression_ratio(&self) -> f64 {
        if self.bytes_written == 0 {
            1.0
        } else {
            self.bytes_new as f64 / self.bytes_written as f64
        }
    }
}

/// One disk of a recovery point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskRecord {
    pub name: String,
    pub size: u64,
    /// Where the disk was read from (a path, or later a server's disk).
    pub source: String,
    /// Key of the disk index.
    pub index: String,
    /// BLAKE3 checksum of the encoded index (its trailing 32 bytes), hex.
    pub index_checksum: String,
    pub stats: PointStats,
}

/// A recovery point: one crash-consistent image of one or more disks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointRecord {
    pub version: u32,
    pub id: PointId,
    /// The server the disks belong to, if any.
    pub server: Option<String>,
    /// The instant the point's content is taken at.
    pub snapshot_at: chrono::DateTime<chrono::Utc>,
    pub completed_at: chrono::DateTime<chrono::Utc>,
    pub duration_ms: u64,
    /// What started it ("cli", "schedule", "manual", ...).
    pub trigger: String,
    /// Who started it.
    pub operator: String,
    pub parent: Option<PointId>,
    pub chunk_size: u32,
    pub disks: Vec<DiskRecord>,
    pub stats: PointStats,
}

impl PointRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("record serializes");
        v.push(b'\n');
        v
    }

    pub fn decode(bytes: &[u8]) -> Result<PointRecord, RecordError> {
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| RecordError::Malformed(e.to_string()))?;
        let version = value.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
        if version != u64::from(RECORD_VERSION) {
            return Err(RecordError::UnknownVersion(
                u32::try_from(version).unwrap_or(u32::MAX),
            ));
        }
        serde_json::from_value(value).map_err(|e| RecordError::Malformed(e.to_string()))
    }

    pub fn disk(&self, name: &str) -> Option<&DiskRecord> {
        self.disks.iter().find(|d| d.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let r = PointRecord {
            version: RECORD_VERSION,
            id: crate::id::new_point_id(),
            server: Some("web".into()),
            snapshot_at: chrono::Utc::now(),
            completed_at: chrono::Utc::now(),
            duration_ms: 12,
            trigger: "cli".into(),
            operator: "root".into(),
            parent: None,
            chunk_size: 1 << 20,
            disks: vec![DiskRecord {
                name: "root".into(),
                size: 1 << 30,
                source: "/dev/x".into(),
                index: "indexes/x/root.idx".into(),
                index_checksum: "00".into(),
                stats: PointStats::default(),
            }],
            stats: PointStats::default(),
        };
        assert_eq!(PointRecord::decode(&r.encode()).unwrap(), r);
        assert!(matches!(
            PointRecord::decode(b"{\"version\":2}"),
            Err(RecordError::UnknownVersion(2))
        ));
        assert!(matches!(
            PointRecord::decode(b"nope"),
            Err(RecordError::Malformed(_))
        ));
    }
}
