//! Cairn's live disks.
//!
//! - [`pool`]: the disk pool (a folder of sparse files and metadata), servers and disks;
//! - [`volume`]: a live disk, exported over NBD: changed-block tracking, crash-consistent
//!   snapshots with copy-before-write to a local buffer;
//! - [`clone`]: copy-on-read clones of a recovery point's disk, and their hydration;
//! - [`point_export`]: read-only NBD exports of a recovery point straight from the space;
//! - [`host`]: what a serving process holds: attached servers, their exports, points of
//!   running servers (consistency groups), start/stop, and the offline operations
//!   (import, export, grow, delete, clone, rollback, hydrate).

pub mod bitmap;
pub mod clone;
pub mod error;
pub mod host;
pub mod mapfile;
pub mod point_export;
pub mod pool;
pub mod serve;
pub mod volume;

pub use error::VolumeError;
pub use pool::Pool;
