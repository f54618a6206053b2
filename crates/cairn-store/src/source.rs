//! What a recovery point reads its disks from: a [`ChunkSource`]. A disk image on the
//! local machine ([`Image`]) is one; a frozen snapshot of a live pool disk (in
//! `cairn-volume`) is another, which also knows which areas changed since a base point
//! (changed-block tracking), so that the point reads only those.

use std::sync::Arc;

use cairn_format::id::PointId;

use crate::error::SpaceError;
use crate::image::Image;

/// The base a source's change tracking is relative to: that point's disk `disk` equals
/// the source everywhere [`ChunkSource::changed`] says false.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeBase {
    pub point: PointId,
    pub disk: String,
}

/// A disk's content as of one instant, read chunk by chunk (from the blocking pool).
pub trait ChunkSource: Send + Sync {
    fn size(&self) -> u64;
    /// Where it comes from, for the record and for errors.
    fn describe(&self) -> String;
    /// Whether `[start, end)` may hold data (false only where it is surely zero).
    fn may_have_data(&self, start: u64, end: u64) -> bool;
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), SpaceError>;
    /// The point this source tracks changes against, if it does.
    fn change_base(&self) -> Option<ChangeBase> {
        None
    }
    /// Whether `[start, end)` may differ from [`Self::change_base`] (always true without one).
    fn changed(&self, _start: u64, _end: u64) -> bool {
        true
    }
    /// For a grain `[start, end)` (64 KiB aligned) that [`Self::changed`] reports: which
    /// of its 4 KiB blocks may differ (bit i = block i; all unless the source knows).
    fn changed_blocks(&self, _start: u64, _end: u64) -> u16 {
        u16::MAX
    }
    /// `[start, end)` has been taken into the point: it need not be kept frozen any more.
    fn taken(&self, _start: u64, _end: u64) {}
}

impl ChunkSource for Image {
    fn size(&self) -> u64 {
        self.size
    }
    fn describe(&self) -> String {
        self.path.display().to_string()
    }
    fn may_have_data(&self, start: u64, end: u64) -> bool {
        Image::may_have_data(self, start, end)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), SpaceError> {
        Image::read_at(self, buf, offset)
    }
}

/// One disk to take into a point, from any source.
#[derive(Clone)]
pub struct NamedSource {
    pub name: String,
    pub source: Arc<dyn ChunkSource>,
}
