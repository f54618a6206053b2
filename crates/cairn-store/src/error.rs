//! Errors of recovery space operations.
//!
//! Rules: every message names what failed and on what (a path, a point id, a disk, a
//! chunk with its byte range); damage to stored data is its own variant so callers can
//! tell "the space is damaged" (exit code 3) from "the request was wrong" (exit code 1);
//! [`SpaceError::is_retryable`] says whether trying again later can help.

use std::path::PathBuf;

use cairn_format::chunk::ChunkError;
use cairn_format::config::ConfigError;
use cairn_format::id::{ChunkId, PointId};
use cairn_format::name::NameError;
use cairn_format::record::RecordError;

use crate::backend::BackendError;

#[derive(Debug, thiserror::Error)]
pub enum SpaceError {
    #[error(
        "no recovery space at {location} (no config.json); create one with `cairn space init {location}`"
    )]
    NotASpace { location: String },
    #[error("a recovery space already exists at {location}")]
    AlreadyExists { location: String },
    #[error("recovery space at {location}: {source}")]
    Config {
        location: String,
        source: ConfigError,
    },
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("no recovery point {0} in this space")]
    PointNotFound(String),
    #[error("recovery point id prefix {prefix:?} is ambiguous: it matches {matches}")]
    AmbiguousPoint { prefix: String, matches: String },
    #[error("this recovery space has no recovery points yet")]
    NoPoints,
    #[error("recovery point {point} has no disk {disk:?} (it has: {available})")]
    DiskNotInPoint {
        point: PointId,
        disk: String,
        available: String,
    },
    #[error("recovery point {point} has {count} disks ({available}); choose one with --disk")]
    DiskNotChosen {
        point: PointId,
        count: usize,
        available: String,
    },
    #[error(
        "recovery point {point} cannot be deleted: clone {holders} still reads from it (not yet hydrated); hydrate the clone (`cairn disk hydrate`) or delete it first"
    )]
    Pinned { point: PointId, holders: String },
    #[error(
        "the change base of disk {disk} (point {point}) is no longer usable (deleted meanwhile?); take the point again"
    )]
    BaseGone { disk: String, point: PointId },
    #[error("two disks are named {0:?}; name them apart with --disk")]
    DuplicateDisk(String),
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("{what} {path}: {source}")]
    Image {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("image {path} is {size} bytes, which is not a multiple of 512")]
    ImageSizeUnaligned { path: PathBuf, size: u64 },
    #[error("image {path} is empty")]
    ImageEmpty { path: PathBuf },
    #[error(
        "image {path} is {image_size} bytes but disk {disk:?} of recovery point {point} is {point_size} bytes; refusing to change its size"
    )]
    SizeMismatch {
        path: PathBuf,
        image_size: u64,
        disk: String,
        point: PointId,
        point_size: u64,
    },
    #[error("target {path} exists; pass --force to overwrite it")]
    TargetExists { path: PathBuf },
    #[error("target {path} is {target_size} bytes, smaller than the disk ({disk_size} bytes)")]
    TargetTooSmall {
        path: PathBuf,
        target_size: u64,
        disk_size: u64,
    },
    #[error("recovery point {point} is damaged: its record {key}: {source}")]
    DamagedRecord {
        point: String,
        key: String,
        source: RecordError,
    },
    #[error("disk index of {disk:?} in recovery point {point} is damaged: {problem}")]
    DamagedIndex {
        point: PointId,
        disk: String,
        problem: String,
    },
    #[error(
        "chunk {chunk} (disk {disk:?}, bytes {start}..{end}) of recovery point {point} is damaged: {source}"
    )]
    DamagedChunk {
        point: PointId,
        disk: String,
        chunk: ChunkId,
        start: u64,
        end: u64,
        source: Box<ChunkError>,
    },
    #[error(
        "chunk {chunk} (disk {disk:?}, bytes {start}..{end}) of recovery point {point} is missing from the space"
    )]
    MissingChunk {
        point: PointId,
        disk: String,
        chunk: ChunkId,
        start: u64,
        end: u64,
    },
    #[error(
        "recovery space is busy: {holder} holds lease {lease}; gave up after waiting {waited_s} s"
    )]
    Busy {
        lease: String,
        holder: String,
        waited_s: u64,
    },
    #[error("lost lease {lease} ({why}); nothing was committed, run the operation again")]
    LeaseLost { lease: String, why: String },
    #[error("no --keep option given: refusing to remove every recovery point")]
    EmptyRetention,
    #[error("internal error: {0}")]
    Internal(String),
}

impl SpaceError {
    /// Whether the stored data is damaged (as opposed to a wrong request or an
    /// unreachable space).
    pub fn is_damage(&self) -> bool {
        matches!(
            self,
            SpaceError::DamagedRecord { .. }
                | SpaceError::DamagedIndex { .. }
                | SpaceError::DamagedChunk { .. }
                | SpaceError::MissingChunk { .. }
        )
    }

    /// Whether the same operation may succeed if tried again later.
    pub fn is_retryable(&self) -> bool {
        match self {
            SpaceError::Backend(e) => e.is_retryable(),
            SpaceError::Busy { .. } | SpaceError::LeaseLost { .. } => true,
            _ => false,
        }
    }

    pub fn image(what: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        SpaceError::Image {
            what,
            path: path.to_path_buf(),
            source,
        }
    }
}

impl From<tokio::task::JoinError> for SpaceError {
    fn from(e: tokio::task::JoinError) -> Self {
        SpaceError::Internal(format!("worker task failed: {e}"))
    }
}
