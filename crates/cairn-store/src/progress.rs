//! Progress reporting of long operations, decoupled from any terminal.

/// Receives progress of a long operation; the CLI draws a bar from it.
pub trait Progress: Send + Sync {
    /// A phase starts, covering `total` bytes.
    fn start(&self, phase: &str, total: u64);
    /// `bytes` more of the phase are done.
    fn advance(&self, bytes: u64);
    /// The phase is over.
    fn finish(&self);
}

/// Reports nothing.
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}
