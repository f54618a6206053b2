//! A location's live side: the pool, its recovery space, and the servers attached
//! (running) in this process. Also the operations on a pool that need no serving process
//! (they take the server's lock, so they are refused while another process serves it).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_format::id::PointId;
use cairn_format::record::PointRecord;
use cairn_nbd::export::BlockExport;
use cairn_nbd::handshake::ExportInfo;
use cairn_nbd::server::Exports;
use cairn_store::create::{CpuPriority, CreateOptions, ParentChoice, create_point_from};
use cairn_store::progress::Progress;
use cairn_store::source::NamedSource;
use cairn_store::{Space, SpaceError};
use tokio::sync::watch;

use crate::error::VolumeError;
use crate::point_export::PointExport;
use crate::pool::{DiskMeta, Origin, Pool, ServerLock, ServerMeta, ServerState, check_size};
use crate::volume::{BaseRef, Volume, VolumeExport, read_cbt, reset_cbt};

/// Opens the recovery space of a pool's location.
pub async fn open_space(pool: &Pool) -> Result<Arc<Space>, VolumeError> {
    let backend = cairn_store::space::open_location(&pool.meta().space, false)?;
    let space = Space::open(backend).await?;
    if space.config().id != pool.meta().space_id {
        return Err(VolumeError::Other(format!(
            "the recovery space at {} is not this location's (its id is {}, pool.json expects {})",
            pool.meta().space,
            space.config().id,
            pool.meta().space_id
        )));
    }
    Ok(Arc::new(space))
}

/// A server whose disks are open in this process.
struct Attached {
    _lock: ServerLock,
    volumes: Vec<Arc<Volume>>,
    stop_hydration: watch::Sender<bool>,
}

/// What a point of a server reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServerPoint {
    pub record: PointRecord,
    /// Per disk: whether changed-block tracking limited the reads.
    pub tracked: Vec<(String, bool)>,
    pub warnings: Vec<String>,
}

pub struct Host {
    pool: Pool,
    space: Option<Arc<Space>>,
    space_error: Option<String>,
    attached: tokio::sync::Mutex<BTreeMap<String, Attached>>,
    exports: Mutex<BTreeMap<String, Arc<dyn BlockExport>>>,
    points: Mutex<HashMap<String, Arc<dyn BlockExport>>>,
    /// One point at a time per server (a second request waits for the first).
    taking: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Background hydration: chunks in flight per clone.
    pub hydration_concurrency: usize,
    background_hydration: std::sync::atomic::AtomicBool,
}

impl Host {
    /// Opens a pool and its location's space (a clone or a point needs the space; the
    /// rest works without it, and the error is kept for those that need it).
    pub async fn open(root: &Path) -> Result<Arc<Host>, VolumeError> {
        let pool = Pool::open(root)?;
        let (space, space_error) = match open_space(&pool).await {
            Ok(s) => (Some(s), None),
            Err(e) => (None, Some(e.to_string())),
        };
        Ok(Arc::new(Host {
            pool,
            space,
            space_error,
            attached: tokio::sync::Mutex::new(BTreeMap::new()),
            exports: Mutex::new(BTreeMap::new()),
            points: Mutex::new(HashMap::new()),
            taking: Mutex::new(HashMap::new()),
            hydration_concurrency: 2,
            background_hydration: std::sync::atomic::AtomicBool::new(true),
        }))
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn space(&self) -> Result<&Arc<Space>, VolumeError> {
        self.space.as_ref().ok_or_else(|| {
            VolumeError::Other(format!(
                "this location's recovery space cannot be opened: {}",
                self.space_error.as_deref().unwrap_or("unknown error")
            ))
        })
    }

    /// Whether servers started from now on hydrate their clones in the background (on by
    /// default; off, clones fill only as they are read, or by `cairn disk hydrate`).
    pub fn set_background_hydration(&self, on: bool) {
        self.background_hydration
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Attaches every server whose desired state is running.
    pub async fn attach_running(self: &Arc<Self>) -> Vec<(String, VolumeError)> {
        let mut failed = Vec::new();
        for s in self.pool.servers().unwrap_or_default() {
            if s.state == ServerState::Running
                && let Err(e) = self.start(&s.name).await
            {
                failed.push((s.name.clone(), e));
            }
        }
        failed
    }

    /// Starts a server: takes its lock, opens its disks, exports them, and hydrates its
    /// clones in the background.
    pub async fn start(self: &Arc<Self>, server: &str) -> Result<(), VolumeError> {
        let mut meta = self.pool.server(server)?;
        let mut attached = self.attached.lock().await;
        if attached.contains_key(server) {
            return Ok(());
        }
        let lock = self.pool.lock_server(server, "cairn serve-nbd")?;
        let mut volumes = Vec::new();
        for d in self.pool.disks(server)? {
            let v = Volume::open(&self.pool, &d, self.space.as_ref()).await;
            match v {
                Ok(v) => volumes.push(v),
                Err(e) => {
                    for v in &volumes {
                        let _ = v.close().await;
                    }
                    return Err(e);
                }
            }
        }
        {
            let mut ex = self.exports.lock().expect("poisoned");
            for v in &volumes {
                let name = format!("{}/{}", v.server, v.name);
                ex.insert(
                    name.clone(),
                    Arc::new(VolumeExport {
                        volume: v.clone(),
                        info: ExportInfo {
                            name,
                            description: format!("disk {} of server {}", v.name, v.server),
                            size: v.size(),
                            read_only: false,
                            multi_conn: true,
                        },
                    }),
                );
            }
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let background = self
            .background_hydration
            .load(std::sync::atomic::Ordering::Relaxed);
        for v in volumes.iter().filter(|v| background && !v.is_hydrated()) {
            let host = self.clone();
            let v = v.clone();
            let stop = stop_rx.clone();
            tokio::spawn(async move {
                let r = v.hydrate(host.hydration_concurrency, &|_| {}, &stop).await;
                match r {
                    Ok(()) if v.is_hydrated() => {
                        if let Err(e) = host.finish_hydration(&v).await {
                            tracing::warn!("{}/{}: {e}", v.server, v.name);
                        }
                    }
                    Ok(()) => {}
                    Err(e) => {
                        tracing::warn!("{}/{}: background hydration stopped: {e}", v.server, v.name)
                    }
                }
            });
        }
        attached.insert(
            server.to_string(),
            Attached {
                _lock: lock,
                volumes,
                stop_hydration: stop_tx,
            },
        );
        meta.state = ServerState::Running;
        self.pool.save_server(&meta)?;
        Ok(())
    }

    /// Stops a server: its exports disappear, connected clients are disconnected (writes
    /// in flight finish first), disks are synced and closed cleanly.
    pub async fn stop(&self, server: &str) -> Result<(), VolumeError> {
        let mut meta = self.pool.server(server)?;
        let Some(att) = self.attached.lock().await.remove(server) else {
            meta.state = ServerState::Stopped;
            return self.pool.save_server(&meta);
        };
        {
            let mut ex = self.exports.lock().expect("poisoned");
            for v in &att.volumes {
                ex.remove(&format!("{}/{}", v.server, v.name));
            }
        }
        att.stop_hydration.send_replace(true);
        let mut first_err = None;
        for v in &att.volumes {
            if let Err(e) = v.close().await {
                first_err.get_or_insert(e);
            }
        }
        meta.state = ServerState::Stopped;
        self.pool.save_server(&meta)?;
        drop(att);
        first_err.map_or(Ok(()), Err)
    }

    /// Stops every attached server (on shutdown), leaving their desired state as is.
    pub async fn detach_all(&self) {
        let all = std::mem::take(&mut *self.attached.lock().await);
        self.exports.lock().expect("poisoned").clear();
        for (name, att) in all {
            att.stop_hydration.send_replace(true);
            for v in &att.volumes {
                if let Err(e) = v.close().await {
                    tracing::warn!("{name}: {e}");
                }
            }
        }
    }

    /// Live state of every attached disk: bytes changed since its base, the base, and
    /// for clones the chunks present.
    pub async fn disk_status(&self) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        for att in self.attached.lock().await.values() {
            for v in &att.volumes {
                out.push(serde_json::json!({
                    "server": v.server, "disk": v.name,
                    "changed_bytes": v.change_base().map(|_| v.changed_bytes()),
                    "change_base": v.change_base().map(|b| b.point.to_string()),
                    "hydration": v.hydration().map(|(p, t, _)| [p, t]),
                }));
            }
        }
        out
    }

    pub async fn running(&self) -> Vec<String> {
        self.attached.lock().await.keys().cloned().collect()
    }

    /// The open volumes of a server attached here.
    pub async fn volumes(&self, server: &str) -> Option<Vec<Arc<Volume>>> {
        self.attached
            .lock()
            .await
            .get(server)
            .map(|a| a.volumes.clone())
    }

    /// Takes a crash-consistent recovery point of a server: attached here (running), or
    /// opened for the purpose (stopped).
    pub async fn take_point(
        &self,
        server: &str,
        operator: &str,
        trigger: &str,
        progress: &dyn Progress,
    ) -> Result<ServerPoint, VolumeError> {
        self.take_point_of(server, None, operator, trigger, progress)
            .await
    }

    /// Like [`Host::take_point`], of some of the server's disks only (`None`: all),
    /// frozen together.
    pub async fn take_point_of(
        &self,
        server: &str,
        disks: Option<&[String]>,
        operator: &str,
        trigger: &str,
        progress: &dyn Progress,
    ) -> Result<ServerPoint, VolumeError> {
        let space = self.space()?.clone();
        self.take_point_into(&space, server, disks, operator, trigger, progress)
            .await
    }

    /// Like [`Host::take_point_of`], into any recovery space (another location's, for a
    /// DR pair). The changed-block map is relative to the server's latest point in
    /// whichever space; a point into another space than the previous one reads the
    /// whole disk (and writes only what that space lacks).
    pub async fn take_point_into(
        &self,
        space: &Arc<Space>,
        server: &str,
        disks: Option<&[String]>,
        operator: &str,
        trigger: &str,
        progress: &dyn Progress,
    ) -> Result<ServerPoint, VolumeError> {
        let meta = self.pool.server(server)?;
        if let Some(names) = disks {
            let have = self.pool.disks(server)?;
            for n in names {
                if !have.iter().any(|d| &d.name == n) {
                    return Err(VolumeError::Other(format!(
                        "server {server} has no disk {n:?}"
                    )));
                }
            }
        }
        let wanted = |name: &str| disks.is_none_or(|d| d.iter().any(|n| n == name));
        let space = space.clone();
        let one = self
            .taking
            .lock()
            .expect("poisoned")
            .entry(server.to_string())
            .or_default()
            .clone();
        let _one = one.lock().await;
        if let Some(vols) = self.volumes(server).await {
            let vols: Vec<_> = vols.into_iter().filter(|v| wanted(&v.name)).collect();
            return point_of(
                &space, &self.pool, &meta, &vols, operator, trigger, progress,
            )
            .await;
        }
        let _lock = self.pool.lock_server(server, "point create")?;
        let mut vols = Vec::new();
        for d in self.pool.disks(server)? {
            if wanted(&d.name) {
                vols.push(Volume::open(&self.pool, &d, Some(&space)).await?);
            }
        }
        let result = point_of(
            &space, &self.pool, &meta, &vols, operator, trigger, progress,
        )
        .await;
        for v in &vols {
            v.close().await?;
        }
        result
    }

    /// Forgets the changed-block maps of a server's disks: the next point of each reads
    /// the whole disk (DR pair restart: "discard the change map").
    pub async fn discard_change_maps(&self, server: &str) -> Result<(), VolumeError> {
        if let Some(vols) = self.volumes(server).await {
            for v in vols {
                v.drop_base();
            }
            return Ok(());
        }
        let _lock = self.pool.lock_server(server, "discard change maps")?;
        for d in self.pool.disks(server)? {
            reset_cbt(&self.pool.disk_paths(server, &d.name), d.size, None)?;
        }
        Ok(())
    }

    /// Copies the rest of a clone now (the specification's `dd`), with progress; resumes
    /// where an earlier run (or a crash) left off. When complete, the clone no longer
    /// depends on its recovery point, whose pin is removed.
    pub async fn hydrate(
        &self,
        server: &str,
        disk: &str,
        progress: &dyn Progress,
    ) -> Result<(), VolumeError> {
        let meta = self.pool.disk(server, disk)?;
        if meta.origin.is_none() {
            return Ok(());
        }
        let (vol, _lock) = match self.volumes(server).await {
            Some(vols) => (
                vols.into_iter().find(|v| v.name == disk).ok_or_else(|| {
                    VolumeError::Other(format!("{server}/{disk} is not attached"))
                })?,
                None,
            ),
            None => {
                let lock = self.pool.lock_server(server, "disk hydrate")?;
                (
                    Volume::open(&self.pool, &meta, self.space.as_ref()).await?,
                    Some(lock),
                )
            }
        };
        let (present, total, _) = vol.hydration().unwrap_or((0, 0, 0));
        progress.start("hydrate", meta.size);
        progress.advance(meta.size * present / total.max(1));
        let (_tx, rx) = watch::channel(false);
        let r = vol.hydrate(8, &|n| progress.advance(n), &rx).await;
        progress.finish();
        if r.is_ok() && vol.is_hydrated() {
            self.finish_hydration(&vol).await?;
        }
        if _lock.is_some() {
            vol.close().await?;
        }
        r
    }

    /// A fully hydrated clone becomes an ordinary disk: its origin and pin are dropped.
    async fn finish_hydration(&self, vol: &Volume) -> Result<(), VolumeError> {
        let mut meta = self.pool.disk(&vol.server, &vol.name)?;
        let Some(origin) = meta.origin.take() else {
            return Ok(());
        };
        self.pool.save_disk(&meta)?;
        let _ = std::fs::remove_file(self.pool.disk_paths(&vol.server, &vol.name).present);
        if let Ok(space) = self.space() {
            cairn_store::pins::remove_pin(space, &origin.point, &origin.pin).await?;
        }
        tracing::info!(
            "{}/{}: hydrated; recovery point {} unpinned",
            vol.server,
            vol.name,
            origin.point
        );
        Ok(())
    }

    /// Opens (or reuses) a read-only export `server/disk@point`.
    pub async fn point_export(&self, name: &str) -> Result<Arc<dyn BlockExport>, VolumeError> {
        if let Some(e) = self.points.lock().expect("poisoned").get(name) {
            return Ok(e.clone());
        }
        let (spec, point) = name.split_once('@').ok_or_else(|| {
            VolumeError::Other(format!("{name:?} is not <server>/<disk>@<point>"))
        })?;
        let (server, disk) = crate::pool::parse_disk_spec(spec)?;
        let space = self.space()?.clone();
        let id = resolve_point(&space, Some(&server), point).await?;
        let record = space.load_point(&id).await?;
        if record.server.as_deref() != Some(server.as_str()) {
            return Err(VolumeError::Other(format!(
                "recovery point {id} is not of server {server:?}"
            )));
        }
        let e: Arc<dyn BlockExport> = Arc::new(PointExport::open(space, id, &disk, name).await?);
        let mut points = self.points.lock().expect("poisoned");
        if points.len() > 64 {
            points.clear();
        }
        points.insert(name.to_string(), e.clone());
        Ok(e)
    }
}

/// Resolves a point spec (`latest`, an id or a unique prefix); `latest` is the newest
/// point of `server` when given.
pub async fn resolve_point(
    space: &Space,
    server: Option<&str>,
    spec: &str,
) -> Result<PointId, VolumeError> {
    if spec == "latest"
        && let Some(server) = server
    {
        let points = space.list_points().await?;
        return points
            .iter()
            .rev()
            .find(|p| p.server.as_deref() == Some(server))
            .map(|p| p.id)
            .ok_or_else(|| {
                VolumeError::Other(format!("server {server:?} has no recovery points yet"))
            });
    }
    Ok(space.resolve_point(spec).await?)
}

impl Exports for Host {
    fn list(&self) -> Vec<ExportInfo> {
        self.exports
            .lock()
            .expect("poisoned")
            .values()
            .map(|e| e.info())
            .collect()
    }

    fn open(&self, name: &str) -> Option<Arc<dyn BlockExport>> {
        if let Some(e) = self.exports.lock().expect("poisoned").get(name) {
            return Some(e.clone());
        }
        self.points.lock().expect("poisoned").get(name).cloned()
    }

    /// Live disks by name; `server/disk@point` opens a read-only export of a recovery
    /// point on demand (on a helper thread: the handshake is synchronous).
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        if let Some(e) = self.exports.lock().expect("poisoned").get(name) {
            return Some(e.info());
        }
        if !name.contains('@') {
            return None;
        }
        std::thread::scope(|s| {
            s.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .ok()?;
                match rt.block_on(self.point_export(name)) {
                    Ok(e) => Some(e.info()),
                    Err(e) => {
                        tracing::info!("export {name:?}: {e}");
                        None
                    }
                }
            })
            .join()
            .ok()
            .flatten()
        })
    }
}

/// Runs a hook with `sh -c`; its environment names the server and the phase.
async fn run_hook(
    which: &'static str,
    command: &str,
    pool: &Pool,
    server: &str,
) -> Result<(), VolumeError> {
    let fail = |detail: String| VolumeError::Hook {
        which,
        command: command.to_string(),
        detail,
    };
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .env("CAIRN_SERVER", server)
        .env("CAIRN_POOL", pool.root())
        .env("CAIRN_HOOK", which)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| fail(e.to_string()))?;
    let out = tokio::time::timeout(Duration::from_secs(300), child.wait_with_output())
        .await
        .map_err(|_| fail("did not finish within 5 minutes (killed)".into()))?
        .map_err(|e| fail(e.to_string()))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    Err(fail(format!("{} — {}", out.status, stderr.trim())))
}

/// Freezes every disk at one instant: all write gates are taken (writes in flight
/// complete, new ones wait), then each disk's snapshot begins, then writes resume.
async fn freeze(
    vols: &[Arc<Volume>],
    chunk: u64,
) -> Result<chrono::DateTime<chrono::Utc>, VolumeError> {
    let mut guards = Vec::with_capacity(vols.len());
    for v in vols {
        guards.push(v.gate_exclusive().await);
    }
    let at = chrono::Utc::now();
    for (i, v) in vols.iter().enumerate() {
        if let Err(e) = v.begin_snapshot(chunk) {
            for v in &vols[..i] {
                v.end_snapshot(None);
            }
            return Err(e);
        }
    }
    drop(guards);
    Ok(at)
}

async fn point_of(
    space: &Arc<Space>,
    pool: &Pool,
    meta: &ServerMeta,
    vols: &[Arc<Volume>],
    operator: &str,
    trigger: &str,
    progress: &dyn Progress,
) -> Result<ServerPoint, VolumeError> {
    if vols.is_empty() {
        return Err(VolumeError::Other(format!(
            "server {:?} has no disks; add one with `cairn disk create`",
            meta.name
        )));
    }
    let mut warnings = Vec::new();
    for attempt in 0..2 {
        if let Some(cmd) = &meta.pre_hook {
            run_hook("pre", cmd, pool, &meta.name).await?;
        }
        let frozen = freeze(vols, u64::from(space.config().chunk_size)).await;
        if let Some(cmd) = &meta.post_hook
            && let Err(e) = run_hook("post", cmd, pool, &meta.name).await
        {
            tracing::warn!("{e}");
            warnings.push(e.to_string());
        }
        let at = match frozen {
            Ok(at) => at,
            Err(e) => return Err(e),
        };
        let bases: Vec<_> = vols.iter().map(|v| v.change_base()).collect();
        let tracked: Vec<(String, bool)> = vols
            .iter()
            .zip(&bases)
            .map(|(v, b)| (v.name.clone(), b.is_some()))
            .collect();
        let parent = match bases.first().cloned().flatten() {
            Some(b)
                if bases
                    .iter()
                    .all(|x| x.as_ref().map(|x| x.point) == Some(b.point))
                    && space.point_exists(&b.point).await? =>
            {
                ParentChoice::Id(b.point)
            }
            // A base deleted since: the newest point of the server is the parent, and
            // the base's absence is found again below (the point is then taken whole).
            _ => ParentChoice::Latest,
        };
        let sources: Vec<NamedSource> = vols
            .iter()
            .map(|v| NamedSource {
                name: v.name.clone(),
                source: v.snapshot_source(),
            })
            .collect();
        let mut opts = CreateOptions::new(Vec::new());
        opts.parent = parent;
        opts.server = Some(meta.name.clone());
        opts.trigger = trigger.to_string();
        opts.operator = operator.to_string();
        opts.snapshot_at = Some(at);
        // The point's reading, hashing and compressing yield to the guests' I/O.
        opts.cpu_priority = Some(CpuPriority::BACKGROUND);
        let result = create_point_from(space, &opts, &sources, progress).await;
        drop(sources);
        match result {
            Ok(record) => {
                for v in vols {
                    v.end_snapshot(Some(record.id));
                }
                return Ok(ServerPoint {
                    record,
                    tracked,
                    warnings,
                });
            }
            Err(e @ (SpaceError::BaseGone { .. } | SpaceError::PointNotFound(_)))
                if attempt == 0 =>
            {
                warnings.push(format!(
                    "{e}; the point was taken again reading the whole disk"
                ));
                for v in vols {
                    v.end_snapshot(None);
                    v.drop_base();
                }
            }
            // A parent deleted meanwhile and the like: the frozen changes go back into
            // the maps, nothing is lost for the next attempt.
            Err(e) => {
                for v in vols {
                    v.end_snapshot(None);
                }
                return Err(e.into());
            }
        }
    }
    unreachable!("the second attempt has no base to lose")
}

// ---------------------------------------------------------------------------------------
// Offline operations on a pool (the server's lock is taken: refused while it is served).

/// Refuses an operation that needs the server stopped.
fn stopped(pool: &Pool, server: &str, what: &'static str) -> Result<ServerLock, VolumeError> {
    let meta = pool.server(server)?;
    let lock = match pool.lock_server(server, what) {
        Ok(l) => l,
        Err(VolumeError::InUse { .. }) if meta.state == ServerState::Running => {
            return Err(VolumeError::Running {
                server: server.into(),
                what,
            });
        }
        Err(e) => return Err(e),
    };
    if meta.state == ServerState::Running {
        return Err(VolumeError::Running {
            server: server.into(),
            what,
        });
    }
    Ok(lock)
}

/// Creates an empty disk (the server may not be served by another process meanwhile).
pub fn create_disk(
    pool: &Pool,
    server: &str,
    disk: &str,
    size: u64,
) -> Result<DiskMeta, VolumeError> {
    let paths = pool.disk_paths(server, disk);
    let _lock = stopped(pool, server, "disk create")?;
    let meta = pool.create_disk(server, disk, size, None)?;
    reset_cbt(&paths, size, None)?;
    Ok(meta)
}

pub fn delete_disk(pool: &Pool, server: &str, disk: &str) -> Result<Option<Origin>, VolumeError> {
    let meta = pool.disk(server, disk)?;
    let _lock = stopped(pool, server, "disk delete")?;
    pool.remove_disk_files(server, disk)?;
    Ok(meta.origin)
}

pub fn grow_disk(
    pool: &Pool,
    server: &str,
    disk: &str,
    size: u64,
) -> Result<DiskMeta, VolumeError> {
    let mut meta = pool.disk(server, disk)?;
    let _lock = stopped(pool, server, "disk grow")?;
    check_size(size)?;
    if size < meta.size {
        return Err(VolumeError::BadSize {
            size,
            why: format!(
                "the disk is {} bytes and shrinking would lose data",
                meta.size
            ),
        });
    }
    if meta.origin.is_some() {
        return Err(VolumeError::Other(format!(
            "disk {server}/{disk} is a clone still being hydrated; hydrate it first (`cairn disk hydrate`)"
        )));
    }
    let paths = pool.disk_paths(server, disk);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&paths.data)
        .map_err(|e| VolumeError::io("cannot open disk", &paths.data, e))?;
    f.set_len(size)
        .and_then(|()| f.sync_all())
        .map_err(|e| VolumeError::io("cannot grow disk", &paths.data, e))?;
    meta.size = size;
    pool.save_disk(&meta)?;
    // The size changed: the next point reads the whole disk.
    reset_cbt(&paths, size, None)?;
    Ok(meta)
}

/// Whether `qemu-img` can be run.
pub fn have_qemu_img() -> bool {
    std::process::Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The format of an image: `raw` unless `qemu-img info` (or the qcow2 magic) says
/// otherwise.
pub fn detect_format(image: &Path) -> Result<String, VolumeError> {
    let mut magic = [0u8; 4];
    let f = File::open(image).map_err(|e| VolumeError::io("cannot open image", image, e))?;
    let n = f.read_at(&mut magic, 0).unwrap_or(0);
    if have_qemu_img() {
        let out = std::process::Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(image)
            .output()
            .map_err(|e| VolumeError::QemuImg(e.to_string()))?;
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)
                .map_err(|e| VolumeError::QemuImg(format!("unreadable `qemu-img info`: {e}")))?;
            return Ok(v["format"].as_str().unwrap_or("raw").to_string());
        }
    }
    Ok(if n == 4 && &magic == b"QFI\xfb" {
        "qcow2".into()
    } else {
        "raw".into()
    })
}

fn qemu_img(args: &[&std::ffi::OsStr]) -> Result<(), VolumeError> {
    if !have_qemu_img() {
        return Err(VolumeError::QemuImg(
            "not installed; only raw images can be imported and exported without it (apt install qemu-utils)".into(),
        ));
    }
    let out = std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .map_err(|e| VolumeError::QemuImg(e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(VolumeError::QemuImg(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

fn virtual_size(image: &Path, format: &str) -> Result<u64, VolumeError> {
    if format == "raw" {
        let img = cairn_store::image::Image::open_read(image)?;
        return Ok(img.size);
    }
    let out = std::process::Command::new("qemu-img")
        .args(["info", "--output=json", "-f", format])
        .arg(image)
        .output()
        .map_err(|e| VolumeError::QemuImg(e.to_string()))?;
    if !out.status.success() {
        return Err(VolumeError::QemuImg(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| VolumeError::QemuImg(e.to_string()))?;
    v["virtual-size"]
        .as_u64()
        .ok_or_else(|| VolumeError::QemuImg("no virtual-size in `qemu-img info`".into()))
}

/// Copies `size` bytes from `src` to a fresh (sparse, zero) `dst`: holes are skipped, zero
/// blocks are not written. Reports progress.
fn copy_sparse(src: &File, dst: &File, size: u64, progress: &dyn Progress) -> std::io::Result<()> {
    use rustix::fs::{SeekFrom, seek};
    const BUF: u64 = 1 << 20;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < size {
        let data = match seek(src, SeekFrom::Data(pos)) {
            Ok(d) => d.min(size),
            Err(rustix::io::Errno::NXIO) => size,
            Err(_) => pos,
        };
        if data > pos {
            progress.advance(data - pos);
            pos = data;
            continue;
        }
        let n = (size - pos).min(BUF);
        let part = &mut buf[..usize::try_from(n).expect("small")];
        src.read_exact_at(part, pos)?;
        for (i, block) in part.chunks(64 * 1024).enumerate() {
            if !cairn_format::zero::is_zero(block) {
                dst.write_all_at(block, pos + (i * 64 * 1024) as u64)?;
            }
        }
        progress.advance(n);
        pos += n;
    }
    dst.sync_all()
}

/// Imports an image (raw; qcow2 and others through `qemu-img`) as a new disk.
pub fn import_disk(
    pool: &Pool,
    server: &str,
    disk: &str,
    image: &Path,
    format: Option<&str>,
    progress: &dyn Progress,
) -> Result<DiskMeta, VolumeError> {
    let _lock = stopped(pool, server, "disk import")?;
    let format = match format {
        Some(f) => f.to_string(),
        None => detect_format(image)?,
    };
    let size = virtual_size(image, &format)?;
    check_size(size)?;
    let paths = pool.disk_paths(server, disk);
    if paths.meta.exists() {
        return Err(VolumeError::DiskExists {
            server: server.into(),
            disk: disk.into(),
        });
    }
    progress.start("import", size);
    let copied = if format == "raw" {
        let src = File::open(image).map_err(|e| VolumeError::io("cannot open image", image, e))?;
        let dst = File::create(&paths.data)
            .map_err(|e| VolumeError::io("cannot create disk", &paths.data, e))?;
        dst.set_len(size)
            .and_then(|()| copy_sparse(&src, &dst, size, progress))
            .map_err(|e| VolumeError::io("cannot import into", &paths.data, e))
    } else {
        qemu_img(&[
            "convert".as_ref(),
            "-f".as_ref(),
            format.as_ref(),
            "-O".as_ref(),
            "raw".as_ref(),
            "-S".as_ref(),
            "64k".as_ref(),
            image.as_os_str(),
            paths.data.as_os_str(),
        ])
    };
    progress.finish();
    if let Err(e) = copied {
        let _ = std::fs::remove_file(&paths.data);
        return Err(e);
    }
    let meta = DiskMeta {
        server: server.into(),
        name: disk.into(),
        size,
        created_at: chrono::Utc::now(),
        origin: None,
    };
    reset_cbt(&paths, size, None)?;
    pool.save_disk(&meta)?;
    Ok(meta)
}

/// Exports a disk of a stopped server to an image (raw, or any `qemu-img` format).
pub fn export_disk(
    pool: &Pool,
    server: &str,
    disk: &str,
    target: &Path,
    format: &str,
    force: bool,
    progress: &dyn Progress,
) -> Result<PathBuf, VolumeError> {
    let meta = pool.disk(server, disk)?;
    let _lock = stopped(pool, server, "disk export")?;
    if meta.origin.is_some() {
        return Err(VolumeError::Other(format!(
            "disk {server}/{disk} is a clone still being hydrated; hydrate it first (`cairn disk hydrate`)"
        )));
    }
    if target.exists() && !force {
        return Err(VolumeError::Other(format!(
            "{} exists; pass --force to overwrite it",
            target.display()
        )));
    }
    let paths = pool.disk_paths(server, disk);
    progress.start("export", meta.size);
    let r = if format == "raw" {
        let src = File::open(&paths.data)
            .map_err(|e| VolumeError::io("cannot open disk", &paths.data, e))?;
        let dst = File::create(target).map_err(|e| VolumeError::io("cannot create", target, e))?;
        dst.set_len(meta.size)
            .and_then(|()| copy_sparse(&src, &dst, meta.size, progress))
            .map_err(|e| VolumeError::io("cannot export to", target, e))
    } else {
        qemu_img(&[
            "convert".as_ref(),
            "-f".as_ref(),
            "raw".as_ref(),
            "-O".as_ref(),
            format.as_ref(),
            paths.data.as_os_str(),
            target.as_os_str(),
        ])
    };
    progress.finish();
    r.map(|()| target.to_path_buf())
}

/// Makes disk `server/disk` a clone of disk `source_disk` of recovery point `point`.
pub async fn clone_disk(
    pool: &Pool,
    space: &Space,
    point: &PointId,
    source_disk: Option<&str>,
    server: &str,
    disk: &str,
) -> Result<DiskMeta, VolumeError> {
    if space.config().id != pool.meta().space_id {
        return Err(VolumeError::WrongLocation {
            point: point.to_string(),
            space: space.config().id.to_string(),
            pool: pool.root().to_path_buf(),
            location: pool.meta().location.clone(),
            pool_space: pool.meta().space_id.to_string(),
        });
    }
    let record = space.load_point(point).await?;
    let src = Space::choose_disk(&record, source_disk)?.clone();
    let _lock = stopped(pool, server, "disk clone")?;
    if pool.disk_paths(server, disk).meta.exists() {
        return Err(VolumeError::DiskExists {
            server: server.into(),
            disk: disk.into(),
        });
    }
    let holder = format!("{}:{server}/{disk}", pool.meta().location);
    let pin = cairn_store::pins::add_pin(space, point, &holder).await?;
    let origin = Origin {
        space_id: space.config().id,
        point: *point,
        disk: src.name.clone(),
        chunk_size: record.chunk_size,
        pin: pin.id,
    };
    let paths = pool.disk_paths(server, disk);
    let made = reset_cbt(
        &paths,
        src.size,
        Some(BaseRef {
            point: *point,
            disk: src.name.clone(),
        }),
    )
    .and_then(|()| pool.create_disk(server, disk, src.size, Some(origin)));
    if made.is_err() {
        cairn_store::pins::remove_pin(space, point, &pin.id).await?;
    }
    made
}

/// Removes a deleted clone's pin.
pub async fn unpin(space: &Space, origin: &Origin) -> Result<(), VolumeError> {
    Ok(cairn_store::pins::remove_pin(space, &origin.point, &origin.pin).await?)
}

/// What a rollback of one disk did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DiskRollback {
    pub disk: String,
    /// "changed-block map" or "hash comparison".
    pub method: String,
    /// Bytes read from the disk and hashed to find what differs (none with the map:
    /// it names the changed areas).
    pub bytes_compared: u64,
    pub chunks_differing: u64,
    /// Bytes the rollback rewrites (planned).
    pub bytes_to_rewrite: u64,
    pub bytes_rewritten: u64,
}

/// Plans (and with `apply`, performs) the rollback of a stopped server's disks to a
/// point. Only areas that may differ are compared: those changed since the disk's base
/// per its changed-block map (plus where the base differs from the point); the whole disk
/// when the map is invalid.
pub async fn rollback_server(
    pool: &Pool,
    space: &Space,
    point: &PointId,
    server: &str,
    only_disk: Option<&str>,
    apply: bool,
    progress: &dyn Progress,
) -> Result<Vec<DiskRollback>, VolumeError> {
    let _lock = stopped(pool, server, "rollback")?;
    let record = space.load_point(point).await?;
    let disks: Vec<_> = match only_disk {
        Some(d) => vec![Space::choose_disk(&record, Some(d))?.clone()],
        None => record.disks.clone(),
    };
    let mut out = Vec::new();
    let concurrency = cairn_store::create::default_concurrency();
    for d in disks {
        let meta = pool.disk(server, &d.name)?;
        if meta.origin.is_some() {
            return Err(VolumeError::Other(format!(
                "disk {server}/{} is a clone still being hydrated; hydrate it first (`cairn disk hydrate`)",
                d.name
            )));
        }
        let paths = pool.disk_paths(server, &d.name);
        let index = space.load_index(&record, &d).await?;
        // Byte ranges that may differ from the point: what changed since the disk's
        // base (its map, exact to a grain), plus every chunk where the base differs from
        // the point. `None`: the map is invalid, compare everything.
        let candidates = match read_cbt(&paths, meta.size)? {
            Some((base, map)) if meta.size == d.size => {
                let g = crate::volume::GRAIN;
                let mut c: Vec<(u64, u64)> = map
                    .ones()
                    .map(|i| (i * g, ((i + 1) * g).min(d.size)))
                    .collect();
                if base.point == *point && base.disk == d.name {
                    Some(c)
                } else {
                    match space.load_point(&base.point).await {
                        Ok(br) => match br.disks.iter().find(|x| x.name == base.disk) {
                            Some(bd) if br.chunk_size == record.chunk_size && bd.size == d.size => {
                                let bi = space.load_index(&br, bd).await?;
                                c.extend(
                                    (0..index.chunks.len() as u64)
                                        .filter(|&i| bi.chunk_ref(i).id != index.chunk_ref(i).id)
                                        .map(|i| index.chunk_range(i)),
                                );
                                Some(c)
                            }
                            _ => None,
                        },
                        Err(SpaceError::PointNotFound(_)) => None,
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            _ => None,
        };
        let method = if candidates.is_some() {
            "changed-block map"
        } else {
            "hash comparison"
        };
        let plan = match candidates {
            Some(ranges) => {
                cairn_store::rollback::plan_rollback_ranges(
                    space,
                    &record,
                    Some(&d.name),
                    &paths.data,
                    ranges,
                )
                .await?
            }
            None => {
                cairn_store::rollback::plan_rollback_of(
                    space,
                    &record,
                    Some(&d.name),
                    &paths.data,
                    None,
                    concurrency,
                    progress,
                )
                .await?
            }
        };
        let mut report = DiskRollback {
            disk: d.name.clone(),
            method: method.into(),
            bytes_compared: plan.bytes_read,
            bytes_to_rewrite: plan.bytes_to_rewrite,
            chunks_differing: plan.chunks_differing,
            bytes_rewritten: 0,
        };
        if apply {
            // Until done, the map is invalid: a crash midway means "read everything".
            reset_cbt(&paths, meta.size, None)?;
            let r =
                cairn_store::rollback::apply_rollback(space, &record, &plan, concurrency, progress)
                    .await?;
            report.bytes_rewritten = r.bytes_rewritten;
            reset_cbt(
                &paths,
                meta.size,
                Some(BaseRef {
                    point: *point,
                    disk: d.name.clone(),
                }),
            )?;
        }
        out.push(report);
    }
    Ok(out)
}
