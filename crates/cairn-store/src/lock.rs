//! Leases: how writers and garbage collection share a space without a global lock.
//!
//! A writer (`point create`) holds a *writer lease* from before its first existence check
//! until its record is written. Garbage collection marks and lists without any lease; only
//! its short delete phase holds the *GC lease*, which it takes only when no writer lease is
//! live. A writer that finds a live GC lease waits for it (seconds: the delete phase only
//! deletes a list of keys it already computed). So a chunk a writer found in the space and
//! decided to reuse cannot be deleted before the writer's record references it.
//!
//! A lease is an object `locks/<uuid>.json`, refreshed every minute. It is *stale* (ignored
//! and later removed) when it has not been refreshed for ten minutes (clocks of the hosts
//! sharing a space are assumed to agree within a few minutes, as NTP keeps them), or at
//! once when it names a process that no longer runs on this very machine (same host
//! name, same boot, same PID namespace: a killed `cairn`). An unreadable lease object (a
//! newer cairn's, say) counts as live until it is ten minutes old.
//!
//! A holder that cannot prove its lease still stands (no successful refresh for half the
//! TTL, or its object is gone because someone judged it stale) must not commit: see
//! [`Lease::check`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};

use crate::backend::{Backend, PutMode};
use crate::error::SpaceError;
use cairn_format::layout;

/// How often a live lease is refreshed.
pub const REFRESH: Duration = Duration::from_secs(60);
/// After how long without a refresh a lease is stale.
pub const TTL: Duration = Duration::from_secs(600);
const POLL: Duration = Duration::from_millis(250);
/// How long an operation waits by default for a running GC delete phase.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(3600);

/// Releases a lease after an operation that does not commit anything: a failure to
/// release is only logged (the lease goes stale), the operation's result stands.
pub async fn release_quietly(lease: Lease) {
    let id = lease.info().id;
    if let Err(e) = lease.release().await {
        tracing::warn!("lease {id} not released: {e}");
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseKind {
    /// `point create`: GC must not sweep while it runs.
    Writer,
    /// restore, rollback, verify: GC must not sweep while they read.
    Reader,
    /// GC's sweep: excludes every other lease.
    Gc,
}

/// The content of a lease object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseInfo {
    pub kind: LeaseKind,
    pub id: uuid::Uuid,
    pub host: String,
    pub pid: u32,
    pub operation: String,
    pub started_at: DateTime<Utc>,
    pub refreshed_at: DateTime<Utc>,
    /// This boot of this machine, and the PID namespace: a pid means something only
    /// where both match.
    #[serde(default)]
    pub boot_id: String,
    #[serde(default)]
    pub pid_ns: String,
}

pub(crate) fn this_host() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn pid_ns() -> String {
    std::fs::read_link("/proc/self/ns/pid")
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// Whether `pid` runs (here). EPERM means it runs but belongs to someone else.
fn process_alive(pid: u32) -> bool {
    let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return false;
    };
    !matches!(
        rustix::process::test_kill_process(pid),
        Err(rustix::io::Errno::SRCH)
    )
}

impl LeaseInfo {
    /// Whether the lease no longer protects anything.
    pub fn is_stale(&self, now: DateTime<Utc>) -> bool {
        let age = (now - self.refreshed_at).to_std().unwrap_or(Duration::ZERO);
        if age > TTL {
            return true;
        }
        let same_machine = self.host == this_host()
            && !self.boot_id.is_empty()
            && self.boot_id == boot_id()
            && !self.pid_ns.is_empty()
            && self.pid_ns == pid_ns();
        same_machine && self.pid != std::process::id() && !process_alive(self.pid)
    }
}

/// A held lease; refreshed in the background until released.
#[derive(Debug)]
pub struct Lease {
    backend: Arc<dyn Backend>,
    info: LeaseInfo,
    state: Arc<tokio::sync::Mutex<LeaseState>>,
    refresher: tokio::task::JoinHandle<()>,
}

#[derive(Debug)]
struct LeaseState {
    /// When the lease object was last written successfully (monotonic clock).
    confirmed: Instant,
    released: bool,
}

impl Lease {
    pub fn info(&self) -> &LeaseInfo {
        &self.info
    }

    /// Proves the lease still stands before an irreversible step (a commit, a sweep): it
    /// was refreshed within half the TTL and its object is still there.
    pub async fn check(&self) -> Result<(), SpaceError> {
        let age = self.state.lock().await.confirmed.elapsed();
        let lost = |why: String| SpaceError::LeaseLost {
            lease: self.info.id.to_string(),
            why,
        };
        if age > TTL / 2 {
            return Err(lost(format!("not refreshed for {} s", age.as_secs())));
        }
        if self
            .backend
            .stat(&layout::lock_key(&self.info.id))
            .await?
            .is_none()
        {
            return Err(lost("its lease object was removed as stale".into()));
        }
        Ok(())
    }

    /// Gives the lease up (a refresh in flight is waited for, so it cannot re-create
    /// the object afterwards).
    pub async fn release(self) -> Result<(), SpaceError> {
        let mut state = self.state.lock().await;
        state.released = true;
        self.refresher.abort();
        self.backend
            .delete(&layout::lock_key(&self.info.id))
            .await?;
        Ok(())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.refresher.abort();
    }
}

/// Every lease object in the space, with its key and when it was last written;
/// unreadable ones come back as `None`.
pub async fn list_leases(
    backend: &Arc<dyn Backend>,
) -> Result<Vec<(String, DateTime<Utc>, Option<LeaseInfo>)>, SpaceError> {
    let objects: Vec<crate::backend::ObjectInfo> =
        backend.list(layout::LOCKS_PREFIX).try_collect().await?;
    let mut out = Vec::with_capacity(objects.len());
    for o in objects {
        let info = match backend.get(&o.key).await {
            Ok(bytes) => serde_json::from_slice(&bytes).ok(),
            Err(crate::backend::BackendError::NotFound { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        out.push((o.key, o.last_modified, info));
    }
    Ok(out)
}

/// Whether a listed lease object is stale.
fn listed_stale(written: DateTime<Utc>, info: Option<&LeaseInfo>, now: DateTime<Utc>) -> bool {
    match info {
        Some(i) => i.is_stale(now),
        None => (now - written).to_std().unwrap_or(Duration::ZERO) > TTL,
    }
}

/// Live leases other than `except`; an unreadable live object is reported as a lease of
/// unknown kind (treated as GC by writers and as a holder by GC).
async fn live_leases(
    backend: &Arc<dyn Backend>,
    except: &uuid::Uuid,
) -> Result<Vec<LeaseInfo>, SpaceError> {
    let now = Utc::now();
    Ok(list_leases(backend)
        .await?
        .into_iter()
        .filter(|(_, written, info)| !listed_stale(*written, info.as_ref(), now))
        .map(|(key, written, info)| {
            info.unwrap_or_else(|| LeaseInfo {
                kind: LeaseKind::Gc,
                id: uuid::Uuid::nil(),
                host: format!("unknown (unreadable lease {key})"),
                pid: 0,
                operation: "unknown".into(),
                started_at: written,
                refreshed_at: written,
                boot_id: String::new(),
                pid_ns: String::new(),
            })
        })
        .filter(|i| i.id != *except)
        .collect())
}

async fn put_lease(backend: &Arc<dyn Backend>, info: &LeaseInfo) -> Result<(), SpaceError> {
    let bytes = Bytes::from(serde_json::to_vec(info).expect("lease serializes"));
    backend
        .put(&layout::lock_key(&info.id), bytes, PutMode::Overwrite)
        .await?;
    Ok(())
}

fn new_info(kind: LeaseKind, operation: &str) -> LeaseInfo {
    let now = Utc::now();
    LeaseInfo {
        kind,
        id: uuid::Uuid::now_v7(),
        host: this_host(),
        pid: std::process::id(),
        operation: operation.to_string(),
        started_at: now,
        refreshed_at: now,
        boot_id: boot_id(),
        pid_ns: pid_ns(),
    }
}

fn spawn_refresher(
    backend: Arc<dyn Backend>,
    mut info: LeaseInfo,
    state: Arc<tokio::sync::Mutex<LeaseState>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(REFRESH).await;
            let mut st = state.lock().await;
            if st.released {
                return;
            }
            info.refreshed_at = Utc::now();
            match put_lease(&backend, &info).await {
                Ok(()) => st.confirmed = Instant::now(),
                Err(e) => tracing::warn!("cannot refresh lease {}: {e}", info.id),
            }
        }
    })
}

fn held(backend: &Arc<dyn Backend>, info: LeaseInfo) -> Lease {
    let state = Arc::new(tokio::sync::Mutex::new(LeaseState {
        confirmed: Instant::now(),
        released: false,
    }));
    Lease {
        backend: backend.clone(),
        refresher: spawn_refresher(backend.clone(), info.clone(), state.clone()),
        state,
        info,
    }
}

fn jitter() -> Duration {
    POLL + Duration::from_millis(u64::from(uuid::Uuid::new_v4().as_bytes()[0]))
}

fn busy(holder: &LeaseInfo, waited: Duration) -> SpaceError {
    let what = match holder.kind {
        LeaseKind::Gc => "garbage collection",
        LeaseKind::Writer => "a writer",
        LeaseKind::Reader => "a reader",
    };
    SpaceError::Busy {
        lease: holder.id.to_string(),
        holder: format!(
            "{what} ({}) on host {} pid {}",
            holder.operation, holder.host, holder.pid
        ),
        waited_s: waited.as_secs(),
    }
}

/// Takes a writer lease, waiting up to `wait` while a GC delete phase runs.
pub async fn acquire_writer(
    backend: &Arc<dyn Backend>,
    operation: &str,
    wait: Duration,
) -> Result<Lease, SpaceError> {
    acquire_shared(backend, LeaseKind::Writer, operation, wait).await
}

/// Takes a reader lease (restore, rollback, verify), waiting up to `wait` while a GC
/// delete phase runs.
pub async fn acquire_reader(
    backend: &Arc<dyn Backend>,
    operation: &str,
    wait: Duration,
) -> Result<Lease, SpaceError> {
    acquire_shared(backend, LeaseKind::Reader, operation, wait).await
}

async fn acquire_shared(
    backend: &Arc<dyn Backend>,
    kind: LeaseKind,
    operation: &str,
    wait: Duration,
) -> Result<Lease, SpaceError> {
    let started = Instant::now();
    let info = new_info(kind, operation);
    loop {
        let gc = live_leases(backend, &info.id)
            .await?
            .into_iter()
            .find(|l| l.kind == LeaseKind::Gc);
        if let Some(gc) = gc {
            if started.elapsed() > wait {
                return Err(busy(&gc, started.elapsed()));
            }
            tokio::time::sleep(jitter()).await;
            continue;
        }
        put_lease(backend, &info).await?;
        // Both sides put, then look: if GC got in at the same time, one of us backs off.
        let gc_now = live_leases(backend, &info.id)
            .await?
            .into_iter()
            .any(|l| l.kind == LeaseKind::Gc);
        if !gc_now {
            return Ok(held(backend, info));
        }
        backend.delete(&layout::lock_key(&info.id)).await?;
        tokio::time::sleep(jitter()).await;
    }
}

/// Takes the GC lease once no other live lease exists, waiting up to `wait`.
pub async fn acquire_gc(backend: &Arc<dyn Backend>, wait: Duration) -> Result<Lease, SpaceError> {
    let started = Instant::now();
    let info = new_info(LeaseKind::Gc, "gc");
    loop {
        put_lease(backend, &info).await?;
        let others = live_leases(backend, &info.id).await?;
        if others.is_empty() {
            return Ok(held(backend, info));
        }
        backend.delete(&layout::lock_key(&info.id)).await?;
        if started.elapsed() > wait {
            return Err(busy(&others[0], started.elapsed()));
        }
        tokio::time::sleep(jitter()).await;
    }
}

/// Removes stale lease objects (those of killed processes).
pub async fn remove_stale(backend: &Arc<dyn Backend>) -> Result<usize, SpaceError> {
    let now = Utc::now();
    let mut removed = 0;
    for (key, written, info) in list_leases(backend).await? {
        if listed_stale(written, info.as_ref(), now) {
            backend.delete(&key).await?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staleness_of_leases() {
        let now = Utc::now();
        let mine = new_info(LeaseKind::Writer, "test");
        assert!(!mine.is_stale(now), "our own lease is live");
        // A process of this machine that has exited.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead_pid = child.id();
        child.wait().unwrap();
        let dead = LeaseInfo {
            pid: dead_pid,
            ..mine.clone()
        };
        assert!(dead.is_stale(now));
        // The same pid seen from another boot or PID namespace proves nothing.
        let elsewhere = LeaseInfo {
            boot_id: "other-boot".into(),
            ..dead.clone()
        };
        assert!(!elsewhere.is_stale(now));
        let other_ns = LeaseInfo {
            pid_ns: "pid:[1]".into(),
            ..dead.clone()
        };
        assert!(!other_ns.is_stale(now));
        // A live process (pid 1) is live; any lease unrefreshed for the TTL is stale.
        let init = LeaseInfo {
            pid: 1,
            ..mine.clone()
        };
        assert!(!init.is_stale(now));
        let old = LeaseInfo {
            refreshed_at: now - chrono::Duration::minutes(11),
            ..init
        };
        assert!(old.is_stale(now));
        // Unreadable lease objects: live while young.
        assert!(!listed_stale(now - chrono::Duration::minutes(1), None, now));
        assert!(listed_stale(now - chrono::Duration::minutes(11), None, now));
    }
}
