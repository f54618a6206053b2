//! Process-wide counters of the NBD server, for metrics.

use std::sync::atomic::{AtomicU64, Ordering};

static CONNECTIONS_OPEN: AtomicU64 = AtomicU64::new(0);
static CONNECTIONS_TOTAL: AtomicU64 = AtomicU64::new(0);
static BYTES_READ: AtomicU64 = AtomicU64::new(0);
static BYTES_WRITTEN: AtomicU64 = AtomicU64::new(0);
static REQUESTS: AtomicU64 = AtomicU64::new(0);

/// A snapshot of the counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    pub connections_open: u64,
    pub connections_total: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub requests: u64,
}

pub fn stats() -> Stats {
    Stats {
        connections_open: CONNECTIONS_OPEN.load(Ordering::Relaxed),
        connections_total: CONNECTIONS_TOTAL.load(Ordering::Relaxed),
        bytes_read: BYTES_READ.load(Ordering::Relaxed),
        bytes_written: BYTES_WRITTEN.load(Ordering::Relaxed),
        requests: REQUESTS.load(Ordering::Relaxed),
    }
}

/// Counts a connection for as long as it lives.
pub struct ConnectionGuard(());

impl ConnectionGuard {
    pub fn new() -> ConnectionGuard {
        CONNECTIONS_OPEN.fetch_add(1, Ordering::Relaxed);
        CONNECTIONS_TOTAL.fetch_add(1, Ordering::Relaxed);
        ConnectionGuard(())
    }
}

impl Default for ConnectionGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        CONNECTIONS_OPEN.fetch_sub(1, Ordering::Relaxed);
    }
}

pub fn count_read(bytes: u64) {
    REQUESTS.fetch_add(1, Ordering::Relaxed);
    BYTES_READ.fetch_add(bytes, Ordering::Relaxed);
}

pub fn count_write(bytes: u64) {
    REQUESTS.fetch_add(1, Ordering::Relaxed);
    BYTES_WRITTEN.fetch_add(bytes, Ordering::Relaxed);
}

pub fn count_other() {
    REQUESTS.fetch_add(1, Ordering::Relaxed);
}
