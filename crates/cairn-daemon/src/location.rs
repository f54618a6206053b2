//! The location: every operation the API offers, on the control database, the pool (via
//! `cairn-volume`'s host) and the recovery space. The HTTP layer only parses, checks the
//! caller's role and calls in here.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_format::id::PointId;
use cairn_store::progress::Progress;
use cairn_volume::host::{self, Host};
use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, Row, params};
use tokio::sync::{Notify, Semaphore};

use crate::auth::Principal;
use crate::config::Config;
use crate::db::{Db, DbError, now_text, parse_time, time_text};
use crate::error::ApiError;
use crate::model::*;
use crate::schedule::{Clock, Schedule};

/// The operator recorded on scheduled jobs.
pub const SCHEDULER: &str = "scheduler";

/// Progress of a running job, shared with the API.
#[derive(Default)]
pub struct JobProgress {
    phase: Mutex<String>,
    done: AtomicU64,
    total: AtomicU64,
}

impl JobProgress {
    pub fn snapshot(&self) -> ProgressInfo {
        ProgressInfo {
            phase: self.phase.lock().expect("poisoned").clone(),
            done: self.done.load(Ordering::Relaxed),
            total: self.total.load(Ordering::Relaxed),
        }
    }
}

impl Progress for JobProgress {
    fn start(&self, phase: &str, total: u64) {
        *self.phase.lock().expect("poisoned") = phase.to_string();
        self.total.fetch_add(total, Ordering::Relaxed);
    }
    fn advance(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
    }
    fn finish(&self) {}
}

/// Counters kept in memory for `/metrics` (the rest is derived from the database).
#[derive(Default)]
pub struct Counters {
    pub bytes_replicated: AtomicU64,
    pub bytes_changed: AtomicU64,
    pub api_requests: AtomicU64,
}

/// A policy row with its parsed schedule.
#[derive(Debug, Clone)]
pub struct PolicyRow {
    pub id: String,
    pub spec: PolicySpec,
    pub created_at: String,
    pub updated_at: String,
}

/// What `replicate-now` did.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct StartOutcome {
    pub job: Job,
    pub skipped: bool,
    pub message: String,
}

pub struct Location {
    pub config: Config,
    pub db: Db,
    pub host: Arc<Host>,
    pub clock: Arc<dyn Clock>,
    pub counters: Counters,
    /// Policy id → the id of its running (or queued) replication job.
    running: Mutex<HashMap<String, String>>,
    slots: Arc<Semaphore>,
    progress: Mutex<HashMap<String, Arc<JobProgress>>>,
    tasks: Mutex<HashMap<String, tokio::task::AbortHandle>>,
    /// Wakes the scheduler when policies change.
    pub wake: Notify,
    accepting: AtomicBool,
    /// Due times the scheduler computed, per policy id.
    next_due: Mutex<HashMap<String, DateTime<Utc>>>,
    /// How late each scheduled job started (ms), for the benchmark and metrics.
    pub lateness_ms: Mutex<Vec<i64>>,
    /// Other locations' recovery spaces, opened through their APIs, by location name.
    pub(crate) remote_spaces: Mutex<HashMap<String, Arc<cairn_store::Space>>>,
}

fn sql_err(e: rusqlite::Error) -> DbError {
    DbError::Sql(e)
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("serializes")
}

pub(crate) const JOB_COLUMNS: &str = "seq, id, policy_id, policy_name, kind, trigger, operator, state, due_at, queued_at, started_at, ended_at, duration_ms, error, skipped_for, target, resources, points, scope_digest, scope_changed, deleted, space";

pub(crate) fn job_from_row(r: &Row<'_>) -> rusqlite::Result<(i64, Job)> {
    let kind: String = r.get(4)?;
    let state: String = r.get(7)?;
    let resources: String = r.get(16)?;
    let points: String = r.get(17)?;
    let duration: Option<i64> = r.get(12)?;
    let deleted: Option<String> = r.get(20)?;
    let state = JobState::parse(&state).unwrap_or(JobState::Failed);
    let kind = JobKind::parse(&kind).unwrap_or(JobKind::Replication);
    let points: Vec<ServerPointRef> = serde_json::from_str(&points).unwrap_or_default();
    Ok((
        r.get(0)?,
        Job {
            id: r.get(1)?,
            policy_id: r.get(2)?,
            policy: r.get(3)?,
            kind,
            trigger: r.get(5)?,
            operator: r.get(6)?,
            state,
            due_at: r.get(8)?,
            queued_at: r.get(9)?,
            started_at: r.get(10)?,
            ended_at: r.get(11)?,
            duration_ms: duration.map(|d| u64::try_from(d).unwrap_or(0)),
            error: r.get(13)?,
            skipped_for: r.get(14)?,
            target: r.get(15)?,
            progress: None,
            resources: serde_json::from_str(&resources).unwrap_or_default(),
            restorable: kind == JobKind::Replication
                && state == JobState::Succeeded
                && deleted.is_none()
                && !points.is_empty(),
            points,
            scope_digest: r.get(18)?,
            scope_changed: r.get::<_, i64>(19)? != 0,
            deleted,
            space: r.get(21)?,
        },
    ))
}

/// Filters of job and point lists.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub policy: Option<String>,
    pub kind: Option<JobKind>,
    pub state: Option<JobState>,
    pub disk: Option<String>,
    pub scope_changed: Option<bool>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub limit: usize,
    pub cursor: Option<i64>,
}

/// How a deleted policy's points are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointsOnDelete {
    Keep,
    Delete,
}

/// A resolved protection scope: servers, each with all disks (None) or some.
type ScopePlan = BTreeMap<String, Option<BTreeSet<String>>>;

impl Location {
    pub fn new(config: Config, db: Db, host: Arc<Host>, clock: Arc<dyn Clock>) -> Arc<Location> {
        let slots = Arc::new(Semaphore::new(config.max_jobs));
        Arc::new(Location {
            config,
            db,
            host,
            clock,
            counters: Counters::default(),
            running: Mutex::new(HashMap::new()),
            slots,
            progress: Mutex::new(HashMap::new()),
            tasks: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            accepting: AtomicBool::new(true),
            next_due: Mutex::new(HashMap::new()),
            lateness_ms: Mutex::new(Vec::new()),
            remote_spaces: Mutex::new(HashMap::new()),
        })
    }

    pub(crate) fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    // ---------------------------------------------------------------- policies

    /// Checks a policy spec: returns its parsed schedule. Names the first problem.
    pub fn validate(&self, spec: &PolicySpec) -> Result<Schedule, ApiError> {
        cairn_format::name::validate("policy", &spec.name)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        if spec.description.len() > 4096 {
            return Err(ApiError::bad_request(
                "description is longer than 4096 bytes",
            ));
        }
        let schedule = parse_schedule(&spec.schedule)?;
        if spec.scope.is_empty() {
            return Err(ApiError::bad_request(
                "the protection scope is empty: give at least one server (`web`) or disk (`web/root`)",
            ));
        }
        self.scope_plan(&spec.scope)?;
        if spec.space != "local" {
            return Err(ApiError::bad_request(format!(
                "unknown recovery space {:?}: this location replicates to its own space (`local`)",
                spec.space
            )));
        }
        retention_of(&spec.retention)?;
        Ok(schedule)
    }

    /// [`Location::validate`], and the space: `local` or a known location.
    pub async fn validate_policy(&self, spec: &PolicySpec) -> Result<Schedule, ApiError> {
        let mut local = spec.clone();
        local.space = "local".into();
        let schedule = self.validate(&local)?;
        if spec.space != "local" && !self.is_location(&spec.space).await? {
            return Err(ApiError::bad_request(format!(
                "unknown recovery space {:?}: use `local` (this location's space) or the name of a location added with `cairn location add`",
                spec.space
            )));
        }
        Ok(schedule)
    }

    /// Groups a scope by server, checking every server and disk exists.
    fn scope_plan(&self, scope: &[String]) -> Result<ScopePlan, ApiError> {
        let pool = self.host.pool();
        let mut plan: ScopePlan = BTreeMap::new();
        for item in scope {
            let item = item.trim();
            if let Some((s, d)) = item.split_once('/') {
                cairn_format::name::validate("server", s)
                    .and_then(|()| cairn_format::name::validate("disk", d))
                    .map_err(|e| ApiError::bad_request(format!("scope item {item:?}: {e}")))?;
                pool.server(s).map_err(|_| {
                    ApiError::bad_request(format!(
                        "scope item {item:?}: unknown server {s:?} (create it with `cairn server create {s}`)"
                    ))
                })?;
                pool.disk(s, d).map_err(|_| {
                    ApiError::bad_request(format!(
                        "scope item {item:?}: server {s} has no disk {d:?}"
                    ))
                })?;
                // A server given whole (None) stays whole.
                if let Some(set) = plan
                    .entry(s.to_string())
                    .or_insert_with(|| Some(BTreeSet::new()))
                {
                    set.insert(d.to_string());
                }
            } else {
                cairn_format::name::validate("server", item)
                    .map_err(|e| ApiError::bad_request(format!("scope item {item:?}: {e}")))?;
                pool.server(item).map_err(|_| {
                    ApiError::bad_request(format!(
                        "scope item {item:?}: unknown server (create it with `cairn server create {item}`)"
                    ))
                })?;
                plan.insert(item.to_string(), None);
            }
        }
        Ok(plan)
    }

    pub async fn create_policy(&self, spec: PolicySpec) -> Result<Policy, ApiError> {
        if spec.name.starts_with("pair-") {
            return Err(ApiError::bad_request(format!(
                "policy names starting with pair- are reserved for DR pairs ({}); create a pair with `cairn pair create`",
                spec.name
            )));
        }
        self.validate_policy(&spec).await?;
        self.create_policy_unchecked(spec).await
    }

    /// Creates a policy already validated (a DR pair's).
    pub(crate) async fn create_policy_unchecked(
        &self,
        spec: PolicySpec,
    ) -> Result<Policy, ApiError> {
        let id = uuid::Uuid::now_v7().to_string();
        let now = time_text(&self.now());
        let (id2, spec2, now2) = (id.clone(), spec.clone(), now.clone());
        let inserted = self
            .db
            .call(move |c| {
                match c.execute(
                    "INSERT INTO policies (id, name, spec, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?4)",
                    params![id2, spec2.name, json(&spec2), now2],
                ) {
                    Ok(_) => Ok(true),
                    Err(rusqlite::Error::SqliteFailure(e, _))
                        if e.code == rusqlite::ErrorCode::ConstraintViolation =>
                    {
                        Ok(false)
                    }
                    Err(e) => Err(sql_err(e)),
                }
            })
            .await?;
        if !inserted {
            return Err(ApiError::conflict(format!(
                "a policy named {} exists already",
                spec.name
            )));
        }
        self.wake.notify_one();
        self.get_policy(&id).await
    }

    pub async fn policy_row(&self, name_or_id: &str) -> Result<PolicyRow, ApiError> {
        let key = name_or_id.to_string();
        let row = self
            .db
            .read(move |c| {
                c.query_row(
                    "SELECT id, spec, created_at, updated_at FROM policies WHERE name = ?1 OR id = ?1",
                    params![key],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, String>(3)?,
                        ))
                    },
                )
                .optional()
                .map_err(sql_err)
            })
            .await?;
        let (id, spec, created_at, updated_at) =
            row.ok_or_else(|| ApiError::not_found(format!("no policy named {name_or_id}")))?;
        let spec: PolicySpec = serde_json::from_str(&spec)
            .map_err(|e| ApiError::internal(format!("stored policy {id} is unreadable: {e}")))?;
        Ok(PolicyRow {
            id,
            spec,
            created_at,
            updated_at,
        })
    }

    pub async fn policy_rows(&self) -> Result<Vec<PolicyRow>, ApiError> {
        let rows = self
            .db
            .read(|c| {
                let mut st = c
                    .prepare_cached(
                        "SELECT id, spec, created_at, updated_at FROM policies ORDER BY name",
                    )
                    .map_err(sql_err)?;
                let rows = st
                    .query_map([], |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, String>(3)?,
                        ))
                    })
                    .map_err(sql_err)?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(sql_err)?;
                Ok(rows)
            })
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, spec, created_at, updated_at)| {
                Some(PolicyRow {
                    spec: serde_json::from_str(&spec).ok()?,
                    id,
                    created_at,
                    updated_at,
                })
            })
            .collect())
    }

    pub async fn get_policy(&self, name_or_id: &str) -> Result<Policy, ApiError> {
        let row = self.policy_row(name_or_id).await?;
        self.policy_view(row).await
    }

    pub async fn list_policies(&self) -> Result<Vec<Policy>, ApiError> {
        let mut out = Vec::new();
        for row in self.policy_rows().await? {
            out.push(self.policy_view(row).await?);
        }
        Ok(out)
    }

    /// A policy with its derived status.
    pub async fn policy_view(&self, row: PolicyRow) -> Result<Policy, ApiError> {
        let id = row.id.clone();
        let (last, last_success) = self
            .db
            .read(move |c| {
                let last = c
                    .query_row(
                        "SELECT id, state, ended_at FROM jobs WHERE policy_id = ?1 AND kind = 'replication' AND state IN ('succeeded', 'failed') ORDER BY seq DESC LIMIT 1",
                        params![id],
                        |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, Option<String>>(2)?)),
                    )
                    .optional()
                    .map_err(sql_err)?;
                let success = c
                    .query_row(
                        "SELECT started_at FROM jobs WHERE policy_id = ?1 AND kind = 'replication' AND state = 'succeeded' ORDER BY seq DESC LIMIT 1",
                        params![id],
                        |r| r.get::<_, Option<String>>(0),
                    )
                    .optional()
                    .map_err(sql_err)?
                    .flatten();
                Ok((last, success))
            })
            .await?;
        let now = self.now();
        let schedule = parse_schedule(&row.spec.schedule).ok();
        let period = schedule
            .as_ref()
            .map_or(Duration::from_secs(86400), |s| s.period(now));
        let last_job = last.map(|(id, state, ended_at)| JobRef {
            id,
            state: JobState::parse(&state).unwrap_or(JobState::Failed),
            ended_at,
        });
        let status = protection_status(
            row.spec.enabled,
            last_job.as_ref().map(|j| j.state),
            last_success.as_deref().and_then(parse_time),
            period,
            now,
        );
        let next_run_at = if row.spec.enabled {
            let known = self
                .next_due
                .lock()
                .expect("poisoned")
                .get(&row.id)
                .copied();
            known
                .or_else(|| {
                    let anchor = parse_time(&row.updated_at).unwrap_or(now);
                    schedule.as_ref().and_then(|s| s.next_after(now, anchor))
                })
                .map(|t| time_text(&t))
        } else {
            None
        };
        let running_job = self.running.lock().expect("poisoned").get(&row.id).cloned();
        Ok(Policy {
            id: row.id,
            spec: row.spec,
            created_at: row.created_at,
            updated_at: row.updated_at,
            status,
            last_job,
            last_success_at: last_success,
            next_run_at,
            period_ms: u64::try_from(period.as_millis()).unwrap_or(u64::MAX),
            running_job,
        })
    }

    pub async fn update_policy(
        &self,
        name_or_id: &str,
        patch: PolicyPatch,
    ) -> Result<Policy, ApiError> {
        let row = self.policy_row(name_or_id).await?;
        let mut spec = row.spec.clone();
        if let Some(n) = &patch.name
            && *n != spec.name
        {
            return Err(ApiError::bad_request(format!(
                "policies cannot be renamed ({} → {n}); create a new one",
                spec.name
            )));
        }
        if let Some(v) = patch.description {
            spec.description = v;
        }
        if let Some(v) = patch.schedule {
            spec.schedule = v;
        }
        if let Some(v) = patch.scope {
            spec.scope = v;
        }
        if let Some(v) = patch.space {
            spec.space = v;
        }
        if let Some(v) = patch.retention {
            spec.retention = v;
        }
        if let Some(v) = patch.enabled {
            spec.enabled = v;
        }
        self.validate_policy(&spec).await?;
        self.save_policy(&row.id, &spec).await?;
        self.get_policy(&row.id).await
    }

    async fn save_policy(&self, id: &str, spec: &PolicySpec) -> Result<(), ApiError> {
        let (id2, spec2, now) = (id.to_string(), json(spec), time_text(&self.now()));
        self.db
            .call(move |c| {
                c.execute(
                    "UPDATE policies SET spec = ?2, updated_at = ?3 WHERE id = ?1",
                    params![id2, spec2, now],
                )
                .map_err(sql_err)
            })
            .await?;
        self.next_due.lock().expect("poisoned").remove(id);
        self.wake.notify_one();
        Ok(())
    }

    pub async fn set_enabled(&self, name_or_id: &str, enabled: bool) -> Result<Policy, ApiError> {
        let row = self.policy_row(name_or_id).await?;
        let mut spec = row.spec.clone();
        spec.enabled = enabled;
        self.save_policy(&row.id, &spec).await?;
        self.get_policy(&row.id).await
    }

    /// Deletes a policy. Its job records stay (history); with `Delete`, the data of its
    /// points is deleted too (refused, before anything is deleted, if a clone still
    /// depends on one of them).
    pub async fn delete_policy(
        &self,
        name_or_id: &str,
        points: PointsOnDelete,
        who: &Principal,
    ) -> Result<serde_json::Value, ApiError> {
        let row = self.policy_row(name_or_id).await?;
        if let Some(j) = self.running.lock().expect("poisoned").get(&row.id) {
            return Err(ApiError::conflict(format!(
                "policy {} has a running job ({j}); wait for it to end",
                row.spec.name
            )));
        }
        let mut deleted_points = 0usize;
        if points == PointsOnDelete::Delete {
            let live = self.restorable_jobs(&row.id).await?;
            let space = self.space_for(&row.spec.space).await?;
            // Refuse before deleting anything when a clone depends on one of them.
            for j in &live {
                for p in &j.points {
                    let id = parse_point_id(&p.point)?;
                    let pins = cairn_store::pins::pins_of(&space, &id).await?;
                    if !pins.is_empty() {
                        return Err(ApiError::conflict(format!(
                            "policy {} cannot be deleted with its points: point {} is still read by clone {}; hydrate or delete the clone first, or keep the points",
                            row.spec.name,
                            j.id,
                            pins.iter()
                                .map(|p| p.holder.clone())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )));
                    }
                }
            }
            for j in &live {
                self.delete_job_points(
                    j,
                    &format!("deleted with policy {} by {}", row.spec.name, who.name),
                )
                .await?;
                deleted_points += 1;
            }
        }
        let id = row.id.clone();
        self.db
            .call(move |c| {
                c.execute("DELETE FROM policies WHERE id = ?1", params![id])
                    .map_err(sql_err)
            })
            .await?;
        self.next_due.lock().expect("poisoned").remove(&row.id);
        self.wake.notify_one();
        Ok(serde_json::json!({
            "deleted": row.spec.name,
            "points": if points == PointsOnDelete::Delete { "deleted" } else { "kept" },
            "points_deleted": deleted_points,
        }))
    }

    // ---------------------------------------------------------------- jobs

    pub fn accepting(&self) -> bool {
        self.accepting.load(Ordering::SeqCst)
    }

    pub(crate) fn refuse_if_closing(&self) -> Result<(), ApiError> {
        if self.accepting() {
            Ok(())
        } else {
            Err(ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the daemon is shutting down: no new jobs",
            ))
        }
    }

    pub(crate) async fn insert_job(&self, job: &Job) -> Result<(), ApiError> {
        let j = job.clone();
        self.db
            .call(move |c| {
                c.execute(
                    "INSERT INTO jobs (id, policy_id, policy_name, kind, trigger, operator, state, due_at, queued_at, started_at, ended_at, duration_ms, error, skipped_for, target, resources, points, scope_digest, scope_changed, space)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20)",
                    params![
                        j.id, j.policy_id, j.policy, j.kind.as_str(), j.trigger, j.operator,
                        j.state.as_str(), j.due_at, j.queued_at, j.started_at, j.ended_at,
                        j.duration_ms.map(|d| i64::try_from(d).unwrap_or(i64::MAX)), j.error,
                        j.skipped_for, j.target, json(&j.resources), json(&j.points),
                        j.scope_digest, i64::from(j.scope_changed), j.space
                    ],
                )
                .map_err(sql_err)
            })
            .await?;
        Ok(())
    }

    pub(crate) fn new_job(
        &self,
        policy: Option<&PolicyRow>,
        kind: JobKind,
        trigger: &str,
        operator: &str,
        due_at: Option<DateTime<Utc>>,
    ) -> Job {
        Job {
            id: uuid::Uuid::now_v7().to_string(),
            policy: policy.map(|p| p.spec.name.clone()),
            policy_id: policy.map(|p| p.id.clone()),
            kind,
            trigger: trigger.to_string(),
            operator: operator.to_string(),
            state: JobState::Queued,
            due_at: due_at.map(|t| time_text(&t)),
            queued_at: time_text(&self.now()),
            started_at: None,
            ended_at: None,
            duration_ms: None,
            error: None,
            skipped_for: None,
            target: None,
            progress: None,
            resources: Vec::new(),
            points: Vec::new(),
            scope_digest: None,
            scope_changed: false,
            restorable: false,
            deleted: None,
            space: policy.map_or_else(|| "local".to_string(), |p| p.spec.space.clone()),
        }
    }

    /// Starts a replication job of a policy now ("Replicate now", or the scheduler). If
    /// one of the policy's jobs is running, the new one is recorded as skipped.
    pub async fn start_replication(
        self: &Arc<Self>,
        policy: &PolicyRow,
        trigger: &str,
        operator: &str,
        due_at: Option<DateTime<Utc>>,
    ) -> Result<StartOutcome, ApiError> {
        self.refuse_if_closing()?;
        let mut job = self.new_job(
            Some(policy),
            JobKind::Replication,
            trigger,
            operator,
            due_at,
        );
        let running = {
            let mut r = self.running.lock().expect("poisoned");
            match r.get(&policy.id) {
                Some(other) => Some(other.clone()),
                None => {
                    r.insert(policy.id.clone(), job.id.clone());
                    None
                }
            }
        };
        if let Some(other) = running {
            job.state = JobState::Skipped;
            job.skipped_for = Some(other.clone());
            job.started_at = Some(job.queued_at.clone());
            job.ended_at = Some(job.queued_at.clone());
            job.duration_ms = Some(0);
            job.error = Some(format!(
                "skipped: job {other} of policy {} is still running",
                policy.spec.name
            ));
            self.insert_job(&job).await?;
            return Ok(StartOutcome {
                message: format!(
                    "skipped: job {other} of policy {} is already running; this request was recorded as skipped job {}",
                    policy.spec.name, job.id
                ),
                job,
                skipped: true,
            });
        }
        if let Err(e) = self.insert_job(&job).await {
            self.running.lock().expect("poisoned").remove(&policy.id);
            return Err(e);
        }
        let progress = Arc::new(JobProgress::default());
        self.progress
            .lock()
            .expect("poisoned")
            .insert(job.id.clone(), progress.clone());
        let me = self.clone();
        let (job2, policy2) = (job.clone(), policy.clone());
        let handle = tokio::spawn(async move {
            me.run_replication(job2, policy2, progress).await;
        });
        self.tasks
            .lock()
            .expect("poisoned")
            .insert(job.id.clone(), handle.abort_handle());
        Ok(StartOutcome {
            message: format!("job {} of policy {} started", job.id, policy.spec.name),
            job,
            skipped: false,
        })
    }

    pub(crate) async fn mark_running(&self, id: &str) -> Result<DateTime<Utc>, ApiError> {
        let now = self.now();
        let (id2, t) = (id.to_string(), time_text(&now));
        self.db
            .call(move |c| {
                c.execute(
                    "UPDATE jobs SET state = 'running', started_at = ?2 WHERE id = ?1",
                    params![id2, t],
                )
                .map_err(sql_err)
            })
            .await?;
        Ok(now)
    }

    pub(crate) async fn finish_job(
        &self,
        id: &str,
        started: DateTime<Utc>,
        outcome: Result<(), String>,
    ) -> Result<(), ApiError> {
        let now = self.now();
        let ms = (now - started).num_milliseconds().max(0);
        let (state, error) = match outcome {
            Ok(()) => ("succeeded", None),
            Err(e) => ("failed", Some(e)),
        };
        let (id2, t) = (id.to_string(), time_text(&now));
        self.db
            .call(move |c| {
                c.execute(
                    // Not over a record shutdown already closed (an aborted job's last
                    // database call can still land).
                    "UPDATE jobs SET state = ?2, ended_at = ?3, duration_ms = ?4, error = ?5 WHERE id = ?1 AND state IN ('queued', 'running')",
                    params![id2, state, t, ms, error],
                )
                .map_err(sql_err)
            })
            .await?;
        Ok(())
    }

    async fn run_replication(
        self: Arc<Self>,
        job: Job,
        policy: PolicyRow,
        progress: Arc<JobProgress>,
    ) {
        let permit = self.slots.clone().acquire_owned().await;
        let started = match self.mark_running(&job.id).await {
            Ok(t) => t,
            Err(e) => {
                tracing::error!("job {}: {e}", job.id);
                self.running.lock().expect("poisoned").remove(&policy.id);
                return;
            }
        };
        if let Some(due) = job.due_at.as_deref().and_then(parse_time) {
            self.lateness_ms
                .lock()
                .expect("poisoned")
                .push((started - due).num_milliseconds());
        }
        let reporter = self
            .pair_progress_reporter(&policy.id, progress.clone())
            .await;
        let outcome = self.replicate(&job, &policy, &progress).await;
        if let Some(r) = reporter {
            r.abort();
        }
        let ok = outcome.is_ok();
        // The policy's slot is free before the record says the job ended: whoever sees
        // it ended and asks again ("replicate now" after `--wait`) is not skipped.
        self.running.lock().expect("poisoned").remove(&policy.id);
        if let Err(e) = self.finish_job(&job.id, started, outcome).await {
            tracing::error!("job {}: cannot record its end: {e}", job.id);
        }
        drop(permit);
        self.progress.lock().expect("poisoned").remove(&job.id);
        self.tasks.lock().expect("poisoned").remove(&job.id);
        if ok && let Err(e) = self.apply_retention(&policy).await {
            tracing::warn!("policy {}: retention: {e}", policy.spec.name);
        }
        self.pair_after_job(&policy.id, &job).await;
    }

    /// Takes the points of a policy's scope. On any failure the points already taken
    /// by this job are deleted again: a job commits all of its scope or nothing.
    async fn replicate(
        &self,
        job: &Job,
        policy: &PolicyRow,
        progress: &JobProgress,
    ) -> Result<(), String> {
        self.pair_guard(policy).await?;
        let plan = self
            .scope_plan(&policy.spec.scope)
            .map_err(|e| format!("protection scope: {}", e.message))?;
        let pool = self.host.pool();
        let mut lines = Vec::new();
        for (server, disks) in &plan {
            let all = pool.disks(server).map_err(|e| e.to_string())?;
            if all.is_empty() {
                return Err(format!(
                    "server {server} of the protection scope has no disks"
                ));
            }
            for d in all
                .iter()
                .filter(|d| disks.as_ref().is_none_or(|s| s.contains(&d.name)))
            {
                lines.push(format!("{server}/{} {}", d.name, d.size));
            }
        }
        lines.sort();
        let digest = blake3::hash(lines.join("\n").as_bytes()).to_hex()[..16].to_string();
        let (pid, jid, dg) = (policy.id.clone(), job.id.clone(), digest.clone());
        let changed = self
            .db
            .call(move |c| {
                let prev: Option<String> = c
                    .query_row(
                        "SELECT scope_digest FROM jobs WHERE policy_id = ?1 AND kind = 'replication' AND state = 'succeeded' AND scope_digest IS NOT NULL ORDER BY seq DESC LIMIT 1",
                        params![pid],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(sql_err)?;
                let changed = prev.is_some_and(|p| p != dg);
                c.execute(
                    "UPDATE jobs SET scope_digest = ?2, scope_changed = ?3 WHERE id = ?1",
                    params![jid, dg, i64::from(changed)],
                )
                .map_err(sql_err)?;
                Ok(changed)
            })
            .await
            .map_err(|e| e.to_string())?;
        let _ = changed;
        let space = self
            .space_for(&policy.spec.space)
            .await
            .map_err(|e| e.message)?;
        let trigger = if let Some(pair) = policy.spec.name.strip_prefix("pair-") {
            format!(
                "{} {} job {}",
                job.trigger,
                crate::pairs::pair_mark(pair),
                job.id
            )
        } else {
            format!("{} job {}", job.trigger, job.id)
        };
        let mut made: Vec<ServerPointRef> = Vec::new();
        let mut resources = Vec::new();
        let mut failure = None;
        for (server, disks) in &plan {
            let names: Option<Vec<String>> = disks.as_ref().map(|s| s.iter().cloned().collect());
            match self
                .host
                .take_point_into(
                    &space,
                    server,
                    names.as_deref(),
                    &job.operator,
                    &trigger,
                    progress,
                )
                .await
            {
                Ok(sp) => {
                    for d in &sp.record.disks {
                        resources.push(Resource {
                            disk: format!("{server}/{}", d.name),
                            size: d.size,
                            bytes_changed: d.stats.bytes_new,
                            bytes_written: d.stats.bytes_written,
                        });
                    }
                    made.push(ServerPointRef {
                        server: server.clone(),
                        point: sp.record.id.to_string(),
                        disks: sp.record.disks.iter().map(|d| d.name.clone()).collect(),
                        snapshot_at: Some(time_text(&sp.record.snapshot_at)),
                    });
                }
                Err(e) => {
                    failure = Some(format!("server {server}: {}", describe_volume_error(&e)));
                    break;
                }
            }
        }
        if let Some(f) = failure {
            if !made.is_empty() {
                let ids: Vec<PointId> = made.iter().filter_map(|p| p.point.parse().ok()).collect();
                if let Err(e) = cairn_store::gc::delete_points(&space, &ids).await {
                    tracing::warn!("job {}: cannot remove its partial points: {e}", job.id);
                }
            }
            return Err(f);
        }
        let total_written: u64 = resources.iter().map(|r| r.bytes_written).sum();
        let total_changed: u64 = resources.iter().map(|r| r.bytes_changed).sum();
        self.counters
            .bytes_replicated
            .fetch_add(total_written, Ordering::Relaxed);
        self.counters
            .bytes_changed
            .fetch_add(total_changed, Ordering::Relaxed);
        let (jid, res, pts) = (job.id.clone(), json(&resources), json(&made));
        self.db
            .call(move |c| {
                c.execute(
                    "UPDATE jobs SET resources = ?2, points = ?3 WHERE id = ?1",
                    params![jid, res, pts],
                )
                .map_err(sql_err)
            })
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Applies the policy's retention to its points (after a success: the new point is
    /// committed first). Never removes the newest successful point nor a point a clone
    /// still reads from (those are kept and retried next time).
    async fn apply_retention(&self, policy: &PolicyRow) -> Result<(), ApiError> {
        let Some(rules) = retention_of(&policy.spec.retention)? else {
            return Ok(());
        };
        let live = self.restorable_jobs(&policy.id).await?;
        let Some(newest) = live.first().map(|j| j.id.clone()) else {
            return Ok(());
        };
        // One candidate per job, named by a synthetic id (retention groups by server;
        // a policy's points are one series).
        let mut by_cand: HashMap<PointId, &Job> = HashMap::new();
        let mut cands = Vec::new();
        for j in &live {
            let Ok(id) = j.id.parse::<uuid::Uuid>() else {
                continue;
            };
            let at = j
                .started_at
                .as_deref()
                .and_then(parse_time)
                .unwrap_or_else(|| self.now());
            by_cand.insert(id, j);
            cands.push(cairn_store::retention::Candidate {
                id,
                server: None,
                snapshot_at: at,
            });
        }
        let plan = cairn_store::retention::plan(&cands, &rules)?;
        for p in plan.remove {
            let Some(j) = by_cand.get(&p.id) else {
                continue;
            };
            if j.id == newest {
                continue;
            }
            if let Err(e) = self
                .delete_job_points(
                    j,
                    &format!("pruned by the retention of policy {}", policy.spec.name),
                )
                .await
            {
                tracing::info!(
                    "policy {}: point {} kept: {}",
                    policy.spec.name,
                    j.id,
                    e.message
                );
            }
        }
        Ok(())
    }

    /// A policy's restorable points (succeeded replication jobs whose data is kept),
    /// newest first.
    pub(crate) async fn restorable_jobs(&self, policy_id: &str) -> Result<Vec<Job>, ApiError> {
        let jobs = self
            .list_jobs(&JobFilter {
                policy: Some(policy_id.to_string()),
                kind: Some(JobKind::Replication),
                state: Some(JobState::Succeeded),
                limit: usize::MAX,
                ..JobFilter::default()
            })
            .await?;
        Ok(jobs.items.into_iter().filter(|j| j.restorable).collect())
    }

    /// Deletes the recovery space points of a job and marks it deleted.
    pub(crate) async fn delete_job_points(&self, job: &Job, why: &str) -> Result<(), ApiError> {
        let space = self.space_for(&job.space).await?;
        let ids: Vec<PointId> = job
            .points
            .iter()
            .map(|p| parse_point_id(&p.point))
            .collect::<Result<_, _>>()?;
        cairn_store::gc::delete_points(&space, &ids).await?;
        let (jid, why) = (
            job.id.clone(),
            format!("{why} at {}", time_text(&self.now())),
        );
        self.db
            .call(move |c| {
                c.execute(
                    "UPDATE jobs SET deleted = ?2 WHERE id = ?1",
                    params![jid, why],
                )
                .map_err(sql_err)
            })
            .await?;
        Ok(())
    }

    pub async fn list_jobs(&self, f: &JobFilter) -> Result<Page<Job>, ApiError> {
        let mut sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE 1=1");
        let mut args: Vec<rusqlite::types::Value> = Vec::new();
        if let Some(p) = &f.policy {
            // A policy's id or name (a deleted policy's points are found by its name).
            let row = self.policy_row(p).await.ok();
            match row {
                Some(r) => {
                    sql.push_str(" AND policy_id = ?");
                    args.push(r.id.into());
                }
                None => {
                    sql.push_str(" AND policy_name = ?");
                    args.push(p.clone().into());
                }
            }
        }
        if let Some(k) = f.kind {
            sql.push_str(" AND kind = ?");
            args.push(k.as_str().to_string().into());
        }
        if let Some(s) = f.state {
            sql.push_str(" AND state = ?");
            args.push(s.as_str().to_string().into());
        }
        if let Some(sc) = f.scope_changed {
            sql.push_str(" AND scope_changed = ?");
            args.push(i64::from(sc).into());
        }
        if let Some(d) = &f.disk {
            sql.push_str(" AND resources LIKE ?");
            args.push(format!("%\"disk\":\"{}\"%", d.replace(['%', '_', '"'], "")).into());
        }
        if let Some(t) = &f.since {
            sql.push_str(" AND queued_at >= ?");
            args.push(time_text(t).into());
        }
        if let Some(t) = &f.until {
            sql.push_str(" AND queued_at < ?");
            args.push(time_text(t).into());
        }
        if let Some(c) = f.cursor {
            sql.push_str(" AND seq < ?");
            args.push(c.into());
        }
        let limit = f.limit.clamp(1, 1_000_000);
        sql.push_str(" ORDER BY seq DESC LIMIT ?");
        args.push(i64::try_from(limit + 1).unwrap_or(i64::MAX).into());
        let mut rows = self
            .db
            .read(move |c| {
                let mut st = c.prepare_cached(&sql).map_err(sql_err)?;
                let rows = st
                    .query_map(rusqlite::params_from_iter(args), job_from_row)
                    .map_err(sql_err)?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(sql_err)?;
                Ok(rows)
            })
            .await?;
        let next_cursor = if rows.len() > limit {
            rows.truncate(limit);
            rows.last().map(|(seq, _)| seq.to_string())
        } else {
            None
        };
        let progress = self.progress.lock().expect("poisoned");
        let items = rows
            .into_iter()
            .map(|(_, mut j)| {
                j.progress = progress.get(&j.id).map(|p| p.snapshot());
                j
            })
            .collect();
        Ok(Page { items, next_cursor })
    }

    /// At most two jobs whose `column` matches a LIKE `pattern`, newest first (two are
    /// enough to tell "unique" from "ambiguous").
    async fn two_jobs_like(
        &self,
        column: &'static str,
        pattern: String,
    ) -> Result<Vec<(i64, Job)>, ApiError> {
        Ok(self
            .db
            .read(move |c| {
                let mut st = c
                    .prepare_cached(&format!(
                        "SELECT {JOB_COLUMNS} FROM jobs WHERE {column} LIKE ?1 ORDER BY seq DESC LIMIT 2"
                    ))
                    .map_err(sql_err)?;
                let rows = st
                    .query_map(params![pattern], job_from_row)
                    .map_err(sql_err)?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(sql_err)?;
                Ok(rows)
            })
            .await?)
    }

    /// A job by id or unique id prefix (at least 4 characters).
    pub async fn get_job(&self, id: &str) -> Result<Job, ApiError> {
        let key = id.to_string();
        if key.len() < 4 || !key.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            return Err(ApiError::not_found(format!("no job {id}")));
        }
        let rows = self.two_jobs_like("id", format!("{key}%")).await?;
        match rows.len() {
            0 => Err(ApiError::not_found(format!("no job {id}"))),
            1 => {
                let mut j = rows.into_iter().next().expect("one").1;
                j.progress = self
                    .progress
                    .lock()
                    .expect("poisoned")
                    .get(&j.id)
                    .map(|p| p.snapshot());
                Ok(j)
            }
            _ => Err(ApiError::bad_request(format!(
                "{id} matches several jobs; give more characters"
            ))),
        }
    }

    /// A recovery point: a replication job by id or prefix, or by one of its recovery
    /// space point ids.
    pub async fn get_point(&self, spec: &str) -> Result<Job, ApiError> {
        let by_job = self.get_job(spec).await;
        let job = match by_job {
            Ok(j) => j,
            Err(e) if e.code == "not_found" => {
                let key = spec.to_string();
                if key.len() < 8 || !key.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
                    return Err(ApiError::not_found(format!("no recovery point {spec}")));
                }
                let rows = self
                    .two_jobs_like("points", format!("%\"point\":\"{key}%"))
                    .await?;
                match rows.len() {
                    1 => rows.into_iter().next().expect("one").1,
                    0 => return Err(ApiError::not_found(format!("no recovery point {spec}"))),
                    _ => {
                        return Err(ApiError::bad_request(format!(
                            "{spec} matches several recovery points; give more characters"
                        )));
                    }
                }
            }
            Err(e) => return Err(e),
        };
        if job.kind != JobKind::Replication {
            return Err(ApiError::not_found(format!(
                "{spec} is a {} job, not a recovery point",
                job.kind.as_str()
            )));
        }
        Ok(job)
    }

    fn restorable<'a>(&self, job: &'a Job) -> Result<&'a Job, ApiError> {
        if job.restorable {
            return Ok(job);
        }
        let why = match (&job.deleted, job.state) {
            (Some(d), _) => format!("its data was deleted ({d})"),
            (None, JobState::Failed) => format!(
                "its job failed: {}",
                job.error.as_deref().unwrap_or("unknown error")
            ),
            (None, JobState::Skipped) => "its job was skipped".to_string(),
            (None, s) => format!("its job is {}", s.as_str()),
        };
        Err(ApiError::unprocessable(format!(
            "recovery point {} cannot be used: {why}; only points of succeeded jobs can be restored, cloned or rolled back to",
            job.id
        )))
    }

    /// Refuses a point that lives in another location's space.
    fn here(&self, job: &Job, what: &str) -> Result<(), ApiError> {
        if job.space == "local" {
            Ok(())
        } else {
            Err(ApiError::conflict(format!(
                "recovery point {} lives in the recovery space of location {}: it can be {what} only there (recovery points are cloned in the location where they are stored)",
                job.id, job.space
            )))
        }
    }

    /// The id of a policy's running replication job, if any.
    pub(crate) fn running_job_of(&self, policy_id: &str) -> Option<String> {
        self.running
            .lock()
            .expect("poisoned")
            .get(policy_id)
            .cloned()
    }

    /// The recovery space point of a job that holds `server`'s disk `disk`.
    fn server_point<'a>(
        &self,
        job: &'a Job,
        server: &str,
        disk: Option<&str>,
    ) -> Result<&'a ServerPointRef, ApiError> {
        let p = job
            .points
            .iter()
            .find(|p| p.server == server)
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "recovery point {} has no disks of server {server} (it has: {})",
                    job.id,
                    job.points
                        .iter()
                        .flat_map(|p| p.disks.iter().map(move |d| format!("{}/{d}", p.server)))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
        if let Some(d) = disk
            && !p.disks.iter().any(|x| x == d)
        {
            return Err(ApiError::bad_request(format!(
                "recovery point {} has no disk {server}/{d} (it has: {})",
                job.id,
                p.disks
                    .iter()
                    .map(|d| format!("{server}/{d}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(p)
    }

    pub async fn delete_point(&self, spec: &str, who: &Principal) -> Result<Job, ApiError> {
        let job = self.get_point(spec).await?;
        self.restorable(&job)?;
        self.delete_job_points(&job, &format!("deleted by {}", who.name))
            .await?;
        self.get_job(&job.id).await
    }

    /// Clones a point's disk into `to` (`server/disk`; the server is created if needed)
    /// and starts that server unless `start` is false.
    pub async fn clone_point(
        &self,
        spec: &str,
        disk: &str,
        to: &str,
        start: bool,
    ) -> Result<serde_json::Value, ApiError> {
        let job = self.get_point(spec).await?;
        self.restorable(&job)?;
        self.here(&job, "cloned")?;
        let (server, d) = cairn_volume::pool::parse_disk_spec(disk)?;
        let p = self.server_point(&job, &server, Some(&d))?;
        let (to_server, to_disk) = cairn_volume::pool::parse_disk_spec(to)?;
        let pool = self.host.pool();
        if pool.server(&to_server).is_err() {
            pool.create_server(&to_server, None, None)?;
        }
        let space = self.host.space()?.clone();
        let point_id = parse_point_id(&p.point)?;
        let meta =
            host::clone_disk(pool, &space, &point_id, Some(&d), &to_server, &to_disk).await?;
        if start {
            self.host.start(&to_server).await?;
        }
        Ok(serde_json::json!({
            "disk": format!("{to_server}/{to_disk}"),
            "size": meta.size,
            "from": {"point": job.id, "space_point": p.point, "disk": disk},
            "started": start,
            "export": match (&self.config.nbd_listen, start) {
                (Some(a), true) => Some(format!("nbd://{a}/{to_server}/{to_disk}")),
                _ => None,
            },
        }))
    }

    pub async fn rollback_point(
        &self,
        spec: &str,
        disk: Option<&str>,
        server: Option<&str>,
    ) -> Result<serde_json::Value, ApiError> {
        let job = self.get_point(spec).await?;
        self.restorable(&job)?;
        self.here(&job, "rolled back to")?;
        let (server, only) = match (disk, server) {
            (Some(d), _) => {
                let (s, d) = cairn_volume::pool::parse_disk_spec(d)?;
                (s, Some(d))
            }
            (None, Some(s)) => (s.to_string(), None),
            (None, None) => {
                return Err(ApiError::bad_request(
                    "say what to roll back: a disk (`web/root`) or a server (`web`)",
                ));
            }
        };
        let p = self.server_point(&job, &server, only.as_deref())?;
        if self.host.running().await.contains(&server) {
            return Err(ApiError::conflict(format!(
                "server {server} is running; stop it first (`cairn server stop {server}`): rollback rewrites its disks"
            )));
        }
        let space = self.host.space()?.clone();
        let point_id = parse_point_id(&p.point)?;
        // The store's rollback future is not provably Send (a higher-ranked closure
        // inside it), so it runs on a blocking thread of its own.
        let pool = self.host.pool().clone();
        let (server2, only2) = (server.clone(), only.clone());
        let rt = tokio::runtime::Handle::current();
        let out = tokio::task::spawn_blocking(move || {
            rt.block_on(host::rollback_server(
                &pool,
                &space,
                &point_id,
                &server2,
                only2.as_deref(),
                true,
                &cairn_store::progress::NoProgress,
            ))
        })
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
        Ok(serde_json::json!({"point": job.id, "server": server, "disks": out}))
    }

    /// Starts a verify job of one point, or of every restorable point of a policy.
    pub async fn start_verify(
        self: &Arc<Self>,
        point: Option<&str>,
        policy: Option<&str>,
        operator: &str,
    ) -> Result<Job, ApiError> {
        self.refuse_if_closing()?;
        let (policy_row, targets, target) = match (point, policy) {
            (Some(p), _) => {
                let job = self.get_point(p).await?;
                self.restorable(&job)?;
                let row = match &job.policy_id {
                    Some(id) => self.policy_row(id).await.ok(),
                    None => None,
                };
                (row, vec![job.clone()], Some(job.id.clone()))
            }
            (None, Some(p)) => {
                let row = self.policy_row(p).await?;
                let live = self.restorable_jobs(&row.id).await?;
                if live.is_empty() {
                    return Err(ApiError::unprocessable(format!(
                        "policy {} has no recovery points to verify",
                        row.spec.name
                    )));
                }
                (Some(row), live, None)
            }
            (None, None) => return Err(ApiError::bad_request("verify what? a point or a policy")),
        };
        let mut job = self.new_job(
            policy_row.as_ref(),
            JobKind::Verify,
            "manual",
            operator,
            None,
        );
        job.target = target;
        self.insert_job(&job).await?;
        let progress = Arc::new(JobProgress::default());
        self.progress
            .lock()
            .expect("poisoned")
            .insert(job.id.clone(), progress.clone());
        let me = self.clone();
        let job2 = job.clone();
        let handle = tokio::spawn(async move {
            let permit = me.slots.clone().acquire_owned().await;
            let started = match me.mark_running(&job2.id).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!("job {}: {e}", job2.id);
                    return;
                }
            };
            let outcome = me.verify(&targets, &progress).await;
            if let Err(e) = me.finish_job(&job2.id, started, outcome).await {
                tracing::error!("job {}: cannot record its end: {e}", job2.id);
            }
            drop(permit);
            me.progress.lock().expect("poisoned").remove(&job2.id);
            me.tasks.lock().expect("poisoned").remove(&job2.id);
        });
        self.tasks
            .lock()
            .expect("poisoned")
            .insert(job.id.clone(), handle.abort_handle());
        Ok(job)
    }

    async fn verify(&self, targets: &[Job], progress: &JobProgress) -> Result<(), String> {
        let space_name = targets.first().map_or("local", |j| j.space.as_str());
        let space = self.space_for(space_name).await.map_err(|e| e.message)?;
        let ids: Vec<PointId> = targets
            .iter()
            .flat_map(|j| j.points.iter())
            .filter_map(|p| p.point.parse().ok())
            .collect();
        let report = cairn_store::verify::verify(
            &space,
            &ids,
            cairn_store::create::default_concurrency(),
            progress,
        )
        .await
        .map_err(|e| e.to_string())?;
        if report.is_clean() {
            Ok(())
        } else {
            let first = report
                .damage
                .first()
                .map(|d| d.problem.clone())
                .unwrap_or_default();
            Err(format!(
                "data damaged: {} problem(s) in {} point(s) checked; first: {first}",
                report.damage.len(),
                report.points
            ))
        }
    }

    /// Runs garbage collection of the space now, as a job.
    pub async fn run_gc(self: &Arc<Self>, operator: &str) -> Result<Job, ApiError> {
        self.refuse_if_closing()?;
        let job = self.new_job(None, JobKind::Gc, "schedule", operator, None);
        self.insert_job(&job).await?;
        let started = self.mark_running(&job.id).await?;
        let space = self.host.space()?.clone();
        let opts = cairn_store::gc::GcOptions {
            grace: self.config.gc_grace,
            ..Default::default()
        };
        let outcome = cairn_store::gc::gc(&space, &opts, &cairn_store::progress::NoProgress)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
        self.finish_job(&job.id, started, outcome).await?;
        self.get_job(&job.id).await
    }

    // ---------------------------------------------------------------- lifecycle

    /// At startup: jobs a killed daemon left queued or running are recorded failed, and
    /// any recovery space point such a job had committed is removed (its database record
    /// never said so; the job is all-or-nothing).
    pub async fn recover_interrupted(&self) -> Result<usize, ApiError> {
        let now = time_text(&self.now());
        let ids: Vec<String> = self
            .db
            .call(move |c| {
                let ids = {
                    let mut st = c
                        .prepare("SELECT id FROM jobs WHERE state IN ('queued', 'running')")
                        .map_err(sql_err)?;
                    st.query_map([], |r| r.get::<_, String>(0))
                        .map_err(sql_err)?
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(sql_err)?
                };
                c.execute(
                    "UPDATE jobs SET state = 'failed', ended_at = ?1,
                       duration_ms = CAST((julianday(?1) - julianday(COALESCE(started_at, queued_at))) * 86400000 AS INTEGER),
                       error = 'interrupted: the daemon stopped while this job ran (killed or crashed); nothing of it was kept'
                     WHERE state IN ('queued', 'running')",
                    params![now],
                )
                .map_err(sql_err)?;
                Ok(ids)
            })
            .await?;
        let removed = self.remove_orphan_points().await?;
        if removed > 0 {
            tracing::warn!("removed {removed} recovery point(s) of interrupted jobs");
        }
        Ok(ids.len())
    }

    /// Removes the recovery space points of replication jobs recorded as failed.
    /// A job commits its whole scope or nothing, but one stopped half-way (killed, or
    /// aborted on shutdown) may have committed the points of the servers it had done.
    /// Call it only when no replication job is running. Returns how many were removed.
    async fn remove_orphan_points(&self) -> Result<usize, ApiError> {
        let mut n = match self.host.space() {
            Ok(space) => self.remove_orphan_points_in(&space.clone()).await?,
            Err(_) => 0,
        };
        // Other locations' spaces the policies write to (DR pairs), if reachable now.
        let mut remote: Vec<String> = self
            .policy_rows()
            .await?
            .into_iter()
            .map(|p| p.spec.space)
            .filter(|s| s != "local")
            .collect();
        remote.sort();
        remote.dedup();
        for name in remote {
            let r = async {
                let space = self.space_for(&name).await?;
                self.remove_orphan_points_in(&space).await
            }
            .await;
            match r {
                Ok(k) => n += k,
                Err(e) => tracing::warn!(
                    "points of interrupted jobs in the space of location {name} not checked: {e}"
                ),
            }
        }
        Ok(n)
    }

    async fn remove_orphan_points_in(
        &self,
        space: &Arc<cairn_store::Space>,
    ) -> Result<usize, ApiError> {
        let mut by_job: HashMap<String, Vec<PointId>> = HashMap::new();
        for r in space.list_points().await? {
            if let Some((_, id)) = r.trigger.rsplit_once(" job ") {
                by_job.entry(id.to_string()).or_default().push(r.id);
            }
        }
        if by_job.is_empty() {
            return Ok(0);
        }
        let ids: Vec<String> = by_job.keys().cloned().collect();
        let failed: Vec<String> = self
            .db
            .call(move |c| {
                let mut st = c
                    .prepare_cached("SELECT state FROM jobs WHERE id = ?1 AND kind = 'replication'")
                    .map_err(sql_err)?;
                let mut out = Vec::new();
                for id in ids {
                    let state: Option<String> = st
                        .query_row(params![id], |r| r.get(0))
                        .optional()
                        .map_err(sql_err)?;
                    if state.is_some_and(|s| s == "failed") {
                        out.push(id);
                    }
                }
                Ok(out)
            })
            .await?;
        let orphans: Vec<PointId> = failed
            .iter()
            .flat_map(|id| by_job.get(id).into_iter().flatten().copied())
            .collect();
        if !orphans.is_empty() {
            cairn_store::gc::delete_points(space, &orphans).await?;
        }
        Ok(orphans.len())
    }

    /// Stops taking jobs; waits up to the grace time for running ones; the rest are
    /// aborted and recorded as failed ("interrupted by shutdown").
    pub async fn shutdown(&self) {
        self.accepting.store(false, Ordering::SeqCst);
        self.wake.notify_one();
        let deadline = tokio::time::Instant::now() + self.config.shutdown_grace;
        loop {
            if self.tasks.lock().expect("poisoned").is_empty() {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let left: Vec<(String, tokio::task::AbortHandle)> =
            self.tasks.lock().expect("poisoned").drain().collect();
        let mut aborted = Vec::new();
        for (id, h) in left {
            h.abort();
            let (id2, now) = (id.clone(), now_text());
            let r = self
                .db
                .call(move |c| {
                    c.execute(
                        "UPDATE jobs SET state = 'failed', ended_at = ?2,
                           duration_ms = CAST((julianday(?2) - julianday(COALESCE(started_at, queued_at))) * 86400000 AS INTEGER),
                           error = 'interrupted by shutdown: the job did not finish within the grace time'
                         WHERE id = ?1 AND state IN ('queued', 'running')",
                        params![id2, now],
                    )
                    .map_err(sql_err)
                })
                .await;
            if let Err(e) = r {
                tracing::error!("job {id}: {e}");
            }
            aborted.push(h);
        }
        if aborted.is_empty() {
            return;
        }
        // Once the aborted jobs are gone, what they had committed goes too.
        let until = tokio::time::Instant::now() + Duration::from_secs(5);
        while aborted.iter().any(|h| !h.is_finished()) && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        match self.remove_orphan_points().await {
            Ok(0) => {}
            Ok(n) => {
                tracing::warn!("removed {n} recovery point(s) of jobs interrupted by shutdown")
            }
            Err(e) => tracing::error!(
                "points of jobs interrupted by shutdown not removed ({e}); the next start removes them"
            ),
        }
    }

    // ---------------------------------------------------------------- scheduler

    /// Runs the scheduler until shutdown: each enabled policy's job starts at its due
    /// time. A due time missed while the daemon was down fires once at startup.
    pub async fn scheduler(self: Arc<Self>) {
        // The policies with their parsed schedules are read again only after a change
        // (every change notifies `wake`), not at every due time: with 1,000 policies on
        // one-minute intervals the scheduler wakes ~17 times a second, and reading and
        // parsing them all each time cost more CPU than the jobs' own bookkeeping.
        type Cached = Arc<(Vec<PolicyRow>, Vec<Option<Schedule>>)>;
        let mut cached: Option<Cached> = None;
        loop {
            if !self.accepting() {
                return;
            }
            let fresh = cached.is_none();
            let policies = match &cached {
                Some(p) => p.clone(),
                None => match self.policy_rows().await {
                    Ok(rows) => {
                        let schedules = rows
                            .iter()
                            .map(|r| parse_schedule(&r.spec.schedule).ok())
                            .collect();
                        let p: Cached = Arc::new((rows, schedules));
                        cached = Some(p.clone());
                        p
                    }
                    Err(e) => {
                        tracing::error!("scheduler: {e}");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                },
            };
            let (rows, schedules) = (&policies.0, &policies.1);
            let now = self.now();
            let unknown = {
                let next = self.next_due.lock().expect("poisoned");
                rows.iter()
                    .any(|r| r.spec.enabled && !next.contains_key(&r.id))
            };
            // When a policy is first seen (start, change), a due time missed since its
            // last job (the daemon was down) fires once, now.
            let last_queued: HashMap<String, String> = if unknown {
                self.db
                    .read(|c| {
                        let mut st = c
                            .prepare_cached(
                                "SELECT policy_id, MAX(queued_at) FROM jobs WHERE kind = 'replication' AND policy_id IS NOT NULL GROUP BY policy_id",
                            )
                            .map_err(sql_err)?;
                        let rows = st
                            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
                            .map_err(sql_err)?
                            .collect::<Result<HashMap<_, _>, _>>()
                            .map_err(sql_err)?;
                        Ok(rows)
                    })
                    .await
                    .unwrap_or_default()
            } else {
                HashMap::new()
            };
            let mut due_now = Vec::new();
            let mut earliest: Option<DateTime<Utc>> = None;
            {
                let mut next = self.next_due.lock().expect("poisoned");
                if fresh {
                    let enabled: std::collections::HashSet<&str> = rows
                        .iter()
                        .filter(|r| r.spec.enabled)
                        .map(|r| r.id.as_str())
                        .collect();
                    next.retain(|id, _| enabled.contains(id.as_str()));
                }
                for (row, s) in rows.iter().zip(schedules) {
                    let (true, Some(s)) = (row.spec.enabled, s) else {
                        continue;
                    };
                    let anchor = parse_time(&row.updated_at).unwrap_or(now);
                    let due = *next.entry(row.id.clone()).or_insert_with(|| {
                        // Strictly after the anchor: an interval's anchor (the policy's
                        // creation or change) is not a run, or every change would start one.
                        let missed = s.prev_at_or_before(now, anchor).filter(|p| {
                            *p > anchor
                                && last_queued
                                    .get(&row.id)
                                    .and_then(|q| parse_time(q))
                                    .is_none_or(|q| q < *p)
                        });
                        missed
                            .or_else(|| s.next_after(now, anchor))
                            .unwrap_or(now + chrono::Duration::days(3650))
                    });
                    let due = if due <= now {
                        due_now.push((row.clone(), due));
                        let n = s
                            .next_after(now, anchor)
                            .unwrap_or(now + chrono::Duration::days(3650));
                        next.insert(row.id.clone(), n);
                        n
                    } else {
                        due
                    };
                    earliest = Some(earliest.map_or(due, |e| e.min(due)));
                }
            }
            for (row, due) in due_now {
                if let Err(e) = self
                    .start_replication(&row, "schedule", SCHEDULER, Some(due))
                    .await
                {
                    tracing::error!("policy {}: scheduled job not started: {e}", row.spec.name);
                }
            }
            let until = earliest.unwrap_or(now + chrono::Duration::hours(1));
            tokio::select! {
                () = self.clock.sleep_until(until) => {}
                () = self.wake.notified() => cached = None,
            }
        }
    }

    /// Runs garbage collection every `gc_interval`.
    pub async fn gc_loop(self: Arc<Self>) {
        loop {
            tokio::time::sleep(self.config.gc_interval).await;
            if !self.accepting() {
                return;
            }
            if let Err(e) = self.run_gc(SCHEDULER).await {
                tracing::warn!("garbage collection: {e}");
            }
        }
    }
}

pub fn parse_point_id(s: &str) -> Result<PointId, ApiError> {
    s.parse()
        .map_err(|_| ApiError::internal(format!("stored point id {s:?} is not a uuid")))
}

/// The protection status rule (the specification's): paused wins; then the latest
/// finished job decides (failed → Failed); a success older than twice the period is Late.
pub fn protection_status(
    enabled: bool,
    last: Option<JobState>,
    last_success: Option<DateTime<Utc>>,
    period: Duration,
    now: DateTime<Utc>,
) -> ProtectionStatus {
    if !enabled {
        return ProtectionStatus::Paused;
    }
    match last {
        None => ProtectionStatus::NotStarted,
        Some(JobState::Failed) => ProtectionStatus::Failed,
        Some(_) => {
            let late = last_success.is_none_or(|t| {
                (now - t).to_std().unwrap_or(Duration::ZERO) > period.saturating_mul(2)
            });
            if late {
                ProtectionStatus::Late
            } else {
                ProtectionStatus::Protected
            }
        }
    }
}

pub fn parse_schedule(s: &ScheduleSpec) -> Result<Schedule, ApiError> {
    match (&s.cron, &s.interval) {
        (Some(c), None) => {
            Schedule::cron(c, s.timezone.as_deref().unwrap_or("UTC")).map_err(ApiError::bad_request)
        }
        (None, Some(i)) => {
            if s.timezone.is_some() {
                return Err(ApiError::bad_request(
                    "a time zone goes with a cron schedule, not with an interval",
                ));
            }
            Schedule::every(i).map_err(ApiError::bad_request)
        }
        (Some(_), Some(_)) => Err(ApiError::bad_request(
            "give either a cron schedule or an interval, not both",
        )),
        (None, None) => Err(ApiError::bad_request(
            "the schedule is missing: give a cron expression (`0 2 * * *`) or an interval (`15m`)",
        )),
    }
}

/// The store's retention rules of a spec (`None` when it keeps everything).
pub fn retention_of(
    r: &RetentionSpec,
) -> Result<Option<cairn_store::retention::RetentionPolicy>, ApiError> {
    let within = match &r.keep_within {
        Some(s) => Some(humantime::parse_duration(s).map_err(|e| {
            ApiError::bad_request(format!("keep_within {s:?} is not a duration: {e}"))
        })?),
        None => None,
    };
    for (k, v) in [
        ("keep_last", r.keep_last),
        ("keep_hourly", r.keep_hourly),
        ("keep_daily", r.keep_daily),
        ("keep_weekly", r.keep_weekly),
        ("keep_monthly", r.keep_monthly),
    ] {
        if v == Some(0) {
            return Err(ApiError::bad_request(format!(
                "{k} is 0: it would keep nothing; leave it out instead"
            )));
        }
    }
    let p = cairn_store::retention::RetentionPolicy {
        keep_last: r.keep_last,
        keep_hourly: r.keep_hourly,
        keep_daily: r.keep_daily,
        keep_weekly: r.keep_weekly,
        keep_monthly: r.keep_monthly,
        keep_within: within,
    };
    Ok(if p.is_empty() { None } else { Some(p) })
}

/// An operator's words for a failed point.
fn describe_volume_error(e: &cairn_volume::VolumeError) -> String {
    use cairn_store::SpaceError;
    use cairn_volume::VolumeError as V;
    match e {
        V::Space(SpaceError::Backend(b)) => format!("recovery space unreachable: {b}"),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_rules() {
        let now = Utc::now();
        let h = Duration::from_secs(3600);
        use ProtectionStatus as P;
        assert_eq!(
            protection_status(false, Some(JobState::Failed), None, h, now),
            P::Paused
        );
        assert_eq!(protection_status(true, None, None, h, now), P::NotStarted);
        assert_eq!(
            protection_status(true, Some(JobState::Failed), Some(now), h, now),
            P::Failed
        );
        assert_eq!(
            protection_status(true, Some(JobState::Succeeded), Some(now), h, now),
            P::Protected
        );
        let old = now - chrono::Duration::hours(3);
        assert_eq!(
            protection_status(true, Some(JobState::Succeeded), Some(old), h, now),
            P::Late
        );
    }
}
