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
//! and later removed) when it has not been refreshed for ten minutes, or at once when it
//! names a process of this host that no longer runs (a killed `cairn`).

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseKind {
    Writer,
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
}

pub(crate) fn this_host() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

impl LeaseInfo {
    /// Whether the lease no longer protects anything.
    pub fn is_stale(&self, now: DateTime<Utc>) -> bool {
        let age = (now - self.refreshed_at).to_std().unwrap_or(Duration::ZERO);
        if age > TTL {
            return true;
        }
        self.host == this_host()
            && self.pid != std::process::id()
            && !std::path::Path::new(&format!("/proc/{}", self.pid)).exists()
    }
}

/// A held lease; refreshed in the background until released.
#[derive(Debug)]
pub struct Lease {
    backend: Arc<dyn Backend>,
    info: LeaseInfo,
    refresher: tokio::task::JoinHandle<()>,
}

impl Lease {
    pub fn info(&self) -> &LeaseInfo {
        &self.info
    }

    /// Gives the lease up.
    pub async fn release(self) -> Result<(), SpaceError> {
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

/// Every lease object in the space, with its key; unreadable ones are returned as stale
/// placeholders (`None`).
pub async fn list_leases(
    backend: &Arc<dyn Backend>,
) -> Result<Vec<(String, Option<LeaseInfo>)>, SpaceError> {
    let keys: Vec<String> = backend
        .list(layout::LOCKS_PREFIX)
        .map_ok(|o| o.key)
        .try_collect()
        .await?;
    let mut out = Vec::with_capacity(keys.len());
    for key in keys {
        let info = match backend.get(&key).await {
            Ok(bytes) => serde_json::from_slice(&bytes).ok(),
            Err(crate::backend::BackendError::NotFound { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        out.push((key, info));
    }
    Ok(out)
}

async fn live_leases(
    backend: &Arc<dyn Backend>,
    except: &uuid::Uuid,
) -> Result<Vec<LeaseInfo>, SpaceError> {
    let now = Utc::now();
    Ok(list_leases(backend)
        .await?
        .into_iter()
        .filter_map(|(_, info)| info)
        .filter(|i| i.id != *except && !i.is_stale(now))
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
    }
}

fn spawn_refresher(backend: Arc<dyn Backend>, mut info: LeaseInfo) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(REFRESH).await;
            info.refreshed_at = Utc::now();
            if let Err(e) = put_lease(&backend, &info).await {
                tracing::warn!("cannot refresh lease {}: {e}", info.id);
            }
        }
    })
}

fn jitter() -> Duration {
    POLL + Duration::from_millis(u64::from(uuid::Uuid::new_v4().as_bytes()[0]))
}

fn busy(holder: &LeaseInfo, waited: Duration) -> SpaceError {
    let what = match holder.kind {
        LeaseKind::Gc => "garbage collection",
        LeaseKind::Writer => "a writer",
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
    let started = Instant::now();
    let info = new_info(LeaseKind::Writer, operation);
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
            return Ok(Lease {
                backend: backend.clone(),
                refresher: spawn_refresher(backend.clone(), info.clone()),
                info,
            });
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
            return Ok(Lease {
                backend: backend.clone(),
                refresher: spawn_refresher(backend.clone(), info.clone()),
                info,
            });
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
    for (key, info) in list_leases(backend).await? {
        if info.is_none_or(|i| i.is_stale(now)) {
            backend.delete(&key).await?;
            removed += 1;
        }
    }
    Ok(removed)
}
