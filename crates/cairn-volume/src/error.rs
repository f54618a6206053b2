//! Errors of the disk pool and live disks: each names the thing it is about and, where
//! there is one, the command that gets the operator out.

use std::path::PathBuf;

use cairn_format::id::PointId;
use cairn_format::name::NameError;
use cairn_store::SpaceError;

use crate::mapfile::MapError;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error(
        "no disk pool at {path} (no pool.json); create one with `cairn pool init {path} --space <space>`"
    )]
    NotAPool { path: PathBuf },
    #[error("a disk pool already exists at {path}")]
    PoolExists { path: PathBuf },
    #[error("{path}: {detail}")]
    Malformed { path: PathBuf, detail: String },
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("{0:?} is not a disk name of the form <server>/<disk> (e.g. web/root)")]
    DiskSpec(String),
    #[error(
        "no server {server:?} in pool {pool}; create it with `cairn server create {pool} {server}`"
    )]
    NoServer { server: String, pool: PathBuf },
    #[error("server {0:?} already exists")]
    ServerExists(String),
    #[error("server {server:?} has no disk {disk:?} (it has: {available})")]
    NoDisk {
        server: String,
        disk: String,
        available: String,
    },
    #[error("disk {server}/{disk} already exists")]
    DiskExists { server: String, disk: String },
    #[error("server {server:?} still has disks ({disks}); delete them first")]
    ServerHasDisks { server: String, disks: String },
    #[error(
        "server {server:?} is in use by {holder}; stop it first (`cairn server stop <pool> {server}`)"
    )]
    InUse { server: String, holder: String },
    #[error(
        "server {server:?} is running; {what} needs it stopped (`cairn server stop <pool> {server}`)"
    )]
    Running { server: String, what: &'static str },
    #[error(
        "server {server:?} is not running (start it with `cairn server start <pool> {server}`)"
    )]
    NotRunning { server: String },
    #[error("disk size {size} is not allowed: {why}")]
    BadSize { size: u64, why: String },
    #[error(
        "recovery point {point} is in recovery space {space}, but pool {pool} belongs to location {location:?} whose space is {pool_space}: a clone can only be made in the location that holds the recovery space"
    )]
    WrongLocation {
        point: String,
        space: String,
        pool: PathBuf,
        location: String,
        pool_space: String,
    },
    #[error("the {which} hook `{command}` failed: {detail}")]
    Hook {
        which: &'static str,
        command: String,
        detail: String,
    },
    #[error("qemu-img: {0}")]
    QemuImg(String),
    #[error("disk {server}/{disk}: recovery point {point} is unreadable here: {source}")]
    Origin {
        server: String,
        disk: String,
        point: PointId,
        source: Box<SpaceError>,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Map(#[from] MapError),
    #[error(transparent)]
    Space(#[from] SpaceError),
    #[error("{0}")]
    Other(String),
    /// Damage reported by the serving process.
    #[error("{0}")]
    RemoteDamage(String),
}

impl VolumeError {
    pub fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        VolumeError::Io {
            what,
            path: path.into(),
            source,
        }
    }

    /// Whether the error means damaged stored data (exit code 3 in the CLI).
    pub fn is_damage(&self) -> bool {
        match self {
            VolumeError::Space(e) => e.is_damage(),
            VolumeError::Origin { source, .. } => source.is_damage(),
            VolumeError::Map(MapError::Corrupt { .. }) | VolumeError::RemoteDamage(_) => true,
            _ => false,
        }
    }
}

impl From<VolumeError> for std::io::Error {
    fn from(e: VolumeError) -> Self {
        match e {
            VolumeError::Io { source, .. } => source,
            other => std::io::Error::other(other.to_string()),
        }
    }
}
