//! Other locations and DR pairs.
//!
//! A DR pair protects a server of this location (the primary) by a standby location:
//! it is a replication policy scoped to that one server whose recovery space is the
//! standby's (written through the standby's space object API), plus a pair record on
//! both sides. The primary runs the jobs and decides the state; it tells the standby
//! every transition (and the initial copy's progress), so that the standby can fail
//! over alone, with the primary gone. The standby also keeps `pairs/<id>.json` in its
//! recovery space: the points there carry the servers' disk layout, so the space alone
//! is enough to fail over.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use cairn_format::id::PointId;
use cairn_store::Space;
use cairn_volume::host;
use rusqlite::{OptionalExtension, params};

use crate::auth::Principal;
use crate::db::{DbError, parse_time, time_text};
use crate::error::ApiError;
use crate::location::{JOB_COLUMNS, JobFilter, Location, StartOutcome, job_from_row};
use crate::model::*;
use crate::peer::Peer;

/// Timeout of calls to another location's API.
const PEER_TIMEOUT: Duration = Duration::from_secs(30);
/// Key of a pair's record in the standby's recovery space.
fn pair_key(id: &str) -> String {
    format!("pairs/{id}.json")
}

/// A pair as stored.
#[derive(Debug, Clone)]
pub struct PairRow {
    pub id: String,
    pub role: String,
    pub server: String,
    pub primary_location: String,
    pub standby_location: String,
    pub policy_id: Option<String>,
    pub state: PairState,
    pub detail: Option<String>,
    pub progress: Option<f64>,
    pub restarted_at: String,
    pub created_at: String,
    pub created_by: String,
}

const PAIR_COLUMNS: &str = "id, role, server, primary_location, standby_location, policy_id, state, detail, progress, restarted_at, created_at, created_by";

fn pair_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<PairRow> {
    let state: String = r.get(6)?;
    Ok(PairRow {
        id: r.get(0)?,
        role: r.get(1)?,
        server: r.get(2)?,
        primary_location: r.get(3)?,
        standby_location: r.get(4)?,
        policy_id: r.get(5)?,
        state: PairState::parse(&state).unwrap_or(PairState::Failed),
        detail: r.get(7)?,
        progress: r.get(8)?,
        restarted_at: r.get(9)?,
        created_at: r.get(10)?,
        created_by: r.get(11)?,
    })
}

/// The trigger text of a pair's points (how the standby knows them in its space).
pub fn pair_mark(id: &str) -> String {
    format!("(pair {id})")
}

/// Records the initial copy's progress of a pair (either side).
async fn set_progress(db: &crate::db::Db, id: &str, pct: Option<f64>) -> Result<(), DbError> {
    let id = id.to_string();
    db.call(move |c| {
        c.execute(
            "UPDATE pairs SET progress = ?2 WHERE id = ?1",
            params![id, pct],
        )?;
        Ok(())
    })
    .await
}

fn new_pair_id() -> String {
    format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

fn not_ready(pct: Option<f64>, why: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "standby_not_ready",
        format!(
            "standby not ready: {why}, {:.0}% copied",
            pct.unwrap_or(0.0).clamp(0.0, 100.0)
        ),
    )
}

impl Location {
    // ------------------------------------------------------------ locations

    /// Registers another location: checks that it answers at `url` with that name and
    /// accepts the token, and notes its recovery space's id.
    pub async fn add_location(
        &self,
        spec: LocationSpec,
        who: &Principal,
    ) -> Result<RemoteLocation, ApiError> {
        cairn_format::name::validate("location", &spec.name)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        if spec.name == self.config.location {
            return Err(ApiError::bad_request(format!(
                "{} is this location's own name",
                spec.name
            )));
        }
        if spec.token.trim().is_empty() {
            return Err(ApiError::bad_request(
                "give a token of that location (`cairn token create NAME --role operator` there)",
            ));
        }
        let peer = Peer::new(&spec.name, &spec.url, spec.token.trim(), PEER_TIMEOUT)?;
        let info: serde_json::Value = peer.get("/api/v1/location").await?;
        let theirs = info["name"].as_str().unwrap_or("");
        if theirs != spec.name {
            return Err(ApiError::bad_request(format!(
                "the location at {} calls itself {theirs:?}, not {:?}: add it under its own name",
                peer.url, spec.name
            )));
        }
        let space: serde_json::Value = peer.get("/api/v1/space").await?;
        let space_id = space["id"].as_str().map(str::to_string);
        let row = RemoteLocation {
            name: spec.name.clone(),
            url: peer.url.clone(),
            space_id,
            added_at: time_text(&self.now()),
            added_by: who.name.clone(),
        };
        let (r, token) = (row.clone(), peer.token().to_string());
        let inserted = self
            .db
            .call(move |c| {
                match c.execute(
                    "INSERT INTO locations (name, url, token, space_id, added_at, added_by) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![r.name, r.url, token, r.space_id, r.added_at, r.added_by],
                ) {
                    Ok(_) => Ok(true),
                    Err(rusqlite::Error::SqliteFailure(e, _))
                        if e.code == rusqlite::ErrorCode::ConstraintViolation =>
                    {
                        Ok(false)
                    }
                    Err(e) => Err(DbError::Sql(e)),
                }
            })
            .await?;
        if !inserted {
            return Err(ApiError::conflict(format!(
                "location {} is known already (remove it first to change its URL or token)",
                spec.name
            )));
        }
        Ok(row)
    }

    pub async fn list_locations(&self) -> Result<Vec<RemoteLocation>, ApiError> {
        Ok(self
            .db
            .read(|c| {
                let mut st = c.prepare(
                    "SELECT name, url, space_id, added_at, added_by FROM locations ORDER BY name",
                )?;
                let rows = st
                    .query_map([], |r| {
                        Ok(RemoteLocation {
                            name: r.get(0)?,
                            url: r.get(1)?,
                            space_id: r.get(2)?,
                            added_at: r.get(3)?,
                            added_by: r.get(4)?,
                        })
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            })
            .await?)
    }

    pub async fn remove_location(&self, name: &str) -> Result<(), ApiError> {
        let n = name.to_string();
        let users: Vec<String> = self
            .db
            .read(move |c| {
                let mut st = c.prepare(
                    "SELECT id FROM pairs WHERE (role = 'primary' AND standby_location = ?1) OR (role = 'standby' AND primary_location = ?1)",
                )?;
                let v = st
                    .query_map(params![n], |r| r.get(0))?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(v)
            })
            .await?;
        if !users.is_empty() {
            return Err(ApiError::conflict(format!(
                "location {name} is used by DR pair(s) {}; delete them first",
                users.join(", ")
            )));
        }
        for p in self.policy_rows().await? {
            if p.spec.space == name {
                return Err(ApiError::conflict(format!(
                    "location {name} is the recovery space of policy {}",
                    p.spec.name
                )));
            }
        }
        let n = name.to_string();
        let gone = self
            .db
            .call(move |c| Ok(c.execute("DELETE FROM locations WHERE name = ?1", params![n])?))
            .await?;
        if gone == 0 {
            return Err(ApiError::not_found(format!(
                "no location {name} is known here"
            )));
        }
        self.remote_spaces.lock().expect("poisoned").remove(name);
        Ok(())
    }

    /// A client of a registered location.
    pub async fn peer(&self, name: &str) -> Result<Peer, ApiError> {
        let n = name.to_string();
        let row: Option<(String, String)> = self
            .db
            .read(move |c| {
                Ok(c.query_row(
                    "SELECT url, token FROM locations WHERE name = ?1",
                    params![n],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?)
            })
            .await?;
        let Some((url, token)) = row else {
            return Err(ApiError::bad_request(format!(
                "unknown location {name:?}: add it with `cairn location add {name} --url URL --token TOKEN`"
            )));
        };
        Peer::new(name, &url, &token, PEER_TIMEOUT)
    }

    /// The recovery space a policy writes to: `local`, or a registered location's
    /// (through its API).
    pub async fn space_for(&self, space: &str) -> Result<Arc<Space>, ApiError> {
        if space == "local" {
            return Ok(self.host.space()?.clone());
        }
        if let Some(s) = self.remote_spaces.lock().expect("poisoned").get(space) {
            return Ok(s.clone());
        }
        let peer = self.peer(space).await?;
        let backend = cairn_store::backend::HttpBackend::new(&peer.url, peer.token())
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let opened = Space::open(Arc::new(backend)).await.map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "location_unreachable",
                format!("the recovery space of location {space}: {e}"),
            )
        })?;
        let opened = Arc::new(opened);
        self.remote_spaces
            .lock()
            .expect("poisoned")
            .insert(space.to_string(), opened.clone());
        Ok(opened)
    }

    /// Whether `space` names a known location (for policy validation).
    pub async fn is_location(&self, space: &str) -> Result<bool, ApiError> {
        let n = space.to_string();
        Ok(self
            .db
            .read(move |c| {
                Ok(c.query_row(
                    "SELECT 1 FROM locations WHERE name = ?1",
                    params![n],
                    |_| Ok(()),
                )
                .optional()?
                .is_some())
            })
            .await?)
    }

    // ------------------------------------------------------------ pair rows

    async fn pair_row(&self, id: &str) -> Result<PairRow, ApiError> {
        let key = id.trim().to_string();
        if key.len() < 4 || !key.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(ApiError::not_found(format!(
                "no DR pair {id:?} at location {} (a pair id is 12 hex digits; `cairn pair list` shows them)",
                self.config.location
            )));
        }
        let pattern = format!("{key}%");
        let rows: Vec<PairRow> = self
            .db
            .read(move |c| {
                let mut st = c.prepare(&format!(
                    "SELECT {PAIR_COLUMNS} FROM pairs WHERE id LIKE ?1 LIMIT 2"
                ))?;
                let v = st
                    .query_map(params![pattern], pair_from_row)?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(v)
            })
            .await?;
        match rows.len() {
            1 => Ok(rows.into_iter().next().expect("one")),
            0 => Err(ApiError::not_found(format!(
                "no DR pair {id} at location {}",
                self.config.location
            ))),
            _ => Err(ApiError::bad_request(format!(
                "{id} matches several DR pairs; give more characters"
            ))),
        }
    }

    async fn pair_of_policy(&self, policy_id: &str) -> Option<PairRow> {
        let p = policy_id.to_string();
        self.db
            .read(move |c| {
                Ok(c.query_row(
                    &format!("SELECT {PAIR_COLUMNS} FROM pairs WHERE policy_id = ?1"),
                    params![p],
                    pair_from_row,
                )
                .optional()?)
            })
            .await
            .ok()
            .flatten()
    }

    async fn insert_pair(&self, row: &PairRow) -> Result<(), ApiError> {
        let r = row.clone();
        self.db
            .call(move |c| {
                c.execute(
                    "INSERT INTO pairs (id, role, server, primary_location, standby_location, policy_id, state, detail, progress, restarted_at, created_at, created_by, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?11)",
                    params![r.id, r.role, r.server, r.primary_location, r.standby_location, r.policy_id,
                        r.state.as_str(), r.detail, r.progress, r.restarted_at, r.created_at, r.created_by],
                )?;
                Ok(())
            })
            .await?;
        Ok(())
    }

    async fn set_pair_state(
        &self,
        id: &str,
        state: PairState,
        detail: Option<String>,
        progress: Option<f64>,
        restarted_at: Option<String>,
    ) -> Result<(), ApiError> {
        let (id, now) = (id.to_string(), time_text(&self.now()));
        self.db
            .call(move |c| {
                c.execute(
                    "UPDATE pairs SET state = ?2, detail = ?3, progress = ?4, restarted_at = COALESCE(?5, restarted_at), updated_at = ?6 WHERE id = ?1",
                    params![id, state.as_str(), detail, progress, restarted_at, now],
                )?;
                Ok(())
            })
            .await?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn pair_event(
        &self,
        id: &str,
        kind: &str,
        state: Option<PairState>,
        operator: &str,
        detail: Option<String>,
        job: Option<String>,
        server: Option<String>,
    ) -> Result<(), ApiError> {
        let (id, kind, op, now) = (
            id.to_string(),
            kind.to_string(),
            operator.to_string(),
            time_text(&self.now()),
        );
        self.db
            .call(move |c| {
                c.execute(
                    "INSERT INTO pair_events (pair_id, at, kind, state, operator, detail, job_id, server) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    params![id, now, kind, state.map(PairState::as_str), op, detail, job, server],
                )?;
                Ok(())
            })
            .await?;
        Ok(())
    }

    async fn pair_events(&self, id: &str) -> Result<Vec<(PairEvent, Option<String>)>, ApiError> {
        let id = id.to_string();
        Ok(self
            .db
            .read(move |c| {
                let mut st = c.prepare(
                    "SELECT at, kind, state, operator, detail, job_id, server, cleaned_at FROM pair_events WHERE pair_id = ?1 ORDER BY seq",
                )?;
                let v = st
                    .query_map(params![id], |r| {
                        let state: Option<String> = r.get(2)?;
                        Ok((
                            PairEvent {
                                at: r.get(0)?,
                                kind: r.get(1)?,
                                state: state.as_deref().and_then(PairState::parse),
                                operator: r.get(3)?,
                                detail: r.get(4)?,
                                job: r.get(5)?,
                                server: r.get(6)?,
                            },
                            r.get(7)?,
                        ))
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(v)
            })
            .await?)
    }

    // ------------------------------------------------------------ the primary's side

    /// Creates a DR pair of a server of this location with a standby location.
    pub async fn create_pair(
        self: &Arc<Self>,
        spec: PairSpec,
        who: &Principal,
    ) -> Result<Pair, ApiError> {
        self.host.pool().server(&spec.server).map_err(|_| {
            ApiError::bad_request(format!(
                "unknown server {:?} at location {}",
                spec.server, self.config.location
            ))
        })?;
        if spec.standby_location == self.config.location {
            return Err(ApiError::bad_request(format!(
                "the standby must be another location than this one ({})",
                self.config.location
            )));
        }
        let peer = self.peer(&spec.standby_location).await?;
        let (s, st) = (spec.server.clone(), spec.standby_location.clone());
        let existing: Option<String> = self
            .db
            .read(move |c| {
                Ok(c.query_row(
                    "SELECT id FROM pairs WHERE role = 'primary' AND server = ?1 AND standby_location = ?2",
                    params![s, st],
                    |r| r.get(0),
                )
                .optional()?)
            })
            .await?;
        if let Some(other) = existing {
            return Err(ApiError::conflict(format!(
                "server {} is already protected at {} by DR pair {other}",
                spec.server, spec.standby_location
            )));
        }
        let id = new_pair_id();
        let policy_spec = PolicySpec {
            name: format!("pair-{id}"),
            description: format!(
                "DR pair {id}: server {} of {} protected at {}",
                spec.server, self.config.location, spec.standby_location
            ),
            schedule: spec.schedule.clone().unwrap_or(ScheduleSpec {
                interval: Some("15m".into()),
                ..ScheduleSpec::default()
            }),
            scope: vec![spec.server.clone()],
            space: spec.standby_location.clone(),
            retention: spec.retention.clone().unwrap_or(RetentionSpec {
                keep_last: Some(24),
                keep_daily: Some(7),
                ..RetentionSpec::default()
            }),
            enabled: true,
        };
        self.validate_policy(&policy_spec).await?;
        let now = time_text(&self.now());
        let reg = StandbyRegistration {
            id: id.clone(),
            server: spec.server.clone(),
            primary_location: self.config.location.clone(),
            created_by: who.name.clone(),
            restarted_at: now.clone(),
        };
        let _: serde_json::Value = peer.post("/api/v1/pairs/standby", &reg).await?;
        let policy = self.create_policy_unchecked(policy_spec).await?;
        let row = PairRow {
            id: id.clone(),
            role: "primary".into(),
            server: spec.server.clone(),
            primary_location: self.config.location.clone(),
            standby_location: spec.standby_location.clone(),
            policy_id: Some(policy.id.clone()),
            state: PairState::StartReplication,
            detail: None,
            progress: Some(0.0),
            restarted_at: now,
            created_at: time_text(&self.now()),
            created_by: who.name.clone(),
        };
        self.insert_pair(&row).await?;
        self.pair_event(
            &id,
            "created",
            Some(PairState::StartReplication),
            &who.name,
            Some(format!(
                "server {} protected at {}",
                spec.server, spec.standby_location
            )),
            None,
            None,
        )
        .await?;
        let prow = self.policy_row(&policy.id).await?;
        self.start_replication(&prow, "pair created", &who.name, None)
            .await?;
        self.get_pair(&id).await
    }

    fn primary_only<'a>(&self, row: &'a PairRow, what: &str) -> Result<&'a PairRow, ApiError> {
        if row.role == "primary" {
            Ok(row)
        } else {
            Err(ApiError::conflict(format!(
                "{what} runs at the primary location {} of DR pair {}; this is its standby {}",
                row.primary_location, row.id, self.config.location
            )))
        }
    }

    async fn pair_policy(&self, row: &PairRow) -> Result<crate::location::PolicyRow, ApiError> {
        let pid = row.policy_id.as_deref().ok_or_else(|| {
            ApiError::internal(format!("DR pair {} has no replication policy", row.id))
        })?;
        self.policy_row(pid).await
    }

    pub async fn pair_replicate_now(
        self: &Arc<Self>,
        id: &str,
        who: &Principal,
    ) -> Result<StartOutcome, ApiError> {
        let row = self.pair_row(id).await?;
        self.primary_only(&row, "replication")?;
        match row.state {
            PairState::Paused => {
                return Err(ApiError::conflict(format!(
                    "DR pair {} is paused: nothing is copied; resume it first (`cairn pair resume {}`)",
                    row.id, row.id
                )));
            }
            PairState::FailedOver => {
                return Err(ApiError::conflict(format!(
                    "DR pair {} has failed over to {}: replication from here has stopped",
                    row.id, row.standby_location
                )));
            }
            _ => {}
        }
        let policy = self.pair_policy(&row).await?;
        self.start_replication(&policy, "replicate now", &who.name, None)
            .await
    }

    pub async fn pause_pair(&self, id: &str, who: &Principal) -> Result<Pair, ApiError> {
        let row = self.pair_row(id).await?;
        self.primary_only(&row, "pausing")?;
        if row.state == PairState::FailedOver {
            return Err(ApiError::conflict(format!(
                "DR pair {} has failed over; there is nothing to pause",
                row.id
            )));
        }
        let policy = self.pair_policy(&row).await?;
        self.set_enabled(&policy.id, false).await?;
        if row.state != PairState::Paused {
            self.transition(&row, PairState::Paused, None, &who.name, "paused", None)
                .await?;
        }
        self.get_pair(&row.id).await
    }

    pub async fn resume_pair(&self, id: &str, who: &Principal) -> Result<Pair, ApiError> {
        let row = self.pair_row(id).await?;
        self.primary_only(&row, "resuming")?;
        if row.state == PairState::FailedOver {
            return Err(ApiError::conflict(format!(
                "DR pair {} has failed over; it cannot be resumed from here",
                row.id
            )));
        }
        let policy = self.pair_policy(&row).await?;
        self.set_enabled(&policy.id, true).await?;
        let (state, detail) = self.derived_state(&row).await?;
        self.transition(&row, state, detail, &who.name, "resumed", None)
            .await?;
        self.get_pair(&row.id).await
    }

    /// Restart Replication: deletes every recovery point of the pair, discards the
    /// server's change maps and copies everything again.
    pub async fn restart_pair(
        self: &Arc<Self>,
        id: &str,
        who: &Principal,
    ) -> Result<Pair, ApiError> {
        let row = self.pair_row(id).await?;
        self.primary_only(&row, "Restart Replication")?;
        if row.state == PairState::FailedOver {
            return Err(ApiError::conflict(format!(
                "DR pair {} has failed over to {}; restart would replicate the old primary over nothing — reverse the pair instead",
                row.id, row.standby_location
            )));
        }
        let policy = self.pair_policy(&row).await?;
        if let Some(job) = self.running_job_of(&policy.id) {
            return Err(ApiError::conflict(format!(
                "job {job} of DR pair {} is running; wait for it (`cairn job follow {job}`) and restart again",
                row.id
            )));
        }
        let jobs = self.restorable_jobs(&policy.id).await?;
        let n = jobs.len();
        for j in &jobs {
            self.delete_job_points(j, &format!("deleted by Restart Replication ({})", who.name))
                .await?;
        }
        // Points of the pair the records do not know (a job interrupted by a crash).
        let space = self.space_for(&policy.spec.space).await?;
        let mark = pair_mark(&row.id);
        let strays: Vec<PointId> = space
            .list_points()
            .await?
            .into_iter()
            .filter(|p| p.trigger.contains(&mark))
            .map(|p| p.id)
            .collect();
        if !strays.is_empty() {
            cairn_store::gc::delete_points(&space, &strays).await?;
        }
        self.host.discard_change_maps(&row.server).await?;
        let now = time_text(&self.now());
        self.set_pair_state(
            &row.id,
            PairState::StartReplication,
            None,
            Some(0.0),
            Some(now.clone()),
        )
        .await?;
        self.pair_event(
            &row.id,
            "restart",
            Some(PairState::StartReplication),
            &who.name,
            Some(format!(
                "{} recovery point(s) deleted; the change map discarded; copying everything again",
                n + strays.len()
            )),
            None,
            None,
        )
        .await?;
        self.push_status(
            &row,
            PairStatus {
                state: PairState::StartReplication,
                detail: Some("Restart Replication".into()),
                progress_pct: Some(0.0),
                operator: who.name.clone(),
                restarted_at: Some(now),
                progress_only: false,
            },
        )
        .await;
        if policy.spec.enabled {
            self.start_replication(&policy, "pair restart", &who.name, None)
                .await?;
        }
        self.get_pair(&row.id).await
    }

    /// The state the primary's records say a pair is in.
    async fn derived_state(&self, row: &PairRow) -> Result<(PairState, Option<String>), ApiError> {
        if row.state == PairState::FailedOver {
            return Ok((PairState::FailedOver, row.detail.clone()));
        }
        let policy = self.pair_policy(row).await?;
        if !policy.spec.enabled {
            return Ok((PairState::Paused, None));
        }
        let (pid, since) = (policy.id.clone(), row.restarted_at.clone());
        let (latest, succeeded): (Option<(String, Option<String>)>, i64) = self
            .db
            .read(move |c| {
                let latest = c
                    .query_row(
                        "SELECT state, error FROM jobs WHERE policy_id = ?1 AND kind = 'replication' AND state IN ('succeeded', 'failed') AND queued_at >= ?2 ORDER BY seq DESC LIMIT 1",
                        params![pid, since],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                let n = c.query_row(
                    "SELECT count(*) FROM jobs WHERE policy_id = ?1 AND kind = 'replication' AND state = 'succeeded' AND deleted IS NULL AND queued_at >= ?2",
                    params![pid, since],
                    |r| r.get(0),
                )?;
                Ok((latest, n))
            })
            .await?;
        Ok(match latest {
            Some((s, err)) if s == "failed" => (PairState::Failed, err),
            _ if succeeded == 0 => (PairState::StartReplication, None),
            _ => (PairState::Replicating, None),
        })
    }

    /// Records a transition (if it is one) and tells the other side.
    async fn transition(
        &self,
        row: &PairRow,
        state: PairState,
        detail: Option<String>,
        operator: &str,
        kind: &str,
        job: Option<String>,
    ) -> Result<(), ApiError> {
        let progress = match state {
            PairState::StartReplication => row.progress,
            _ => None,
        };
        self.set_pair_state(&row.id, state, detail.clone(), progress, None)
            .await?;
        if state != row.state || kind != "state" {
            self.pair_event(
                &row.id,
                kind,
                Some(state),
                operator,
                detail.clone(),
                job,
                None,
            )
            .await?;
        }
        if row.role == "primary" && (state != row.state || kind != "state") {
            self.push_status(
                row,
                PairStatus {
                    state,
                    detail,
                    progress_pct: progress,
                    operator: operator.to_string(),
                    restarted_at: Some(row.restarted_at.clone()),
                    progress_only: false,
                },
            )
            .await;
        }
        Ok(())
    }

    /// Tells the standby (best effort: a standby that is down learns the state at the
    /// next transition; its failover checks its own space anyway).
    async fn push_status(&self, row: &PairRow, status: PairStatus) {
        let peer = match self.peer(&row.standby_location).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("DR pair {}: {e}", row.id);
                return;
            }
        };
        let r: Result<serde_json::Value, _> = peer
            .put(&format!("/api/v1/pairs/{}/status", row.id), &status)
            .await;
        if let Err(e) = r {
            tracing::warn!("DR pair {}: cannot tell the standby: {e}", row.id);
        }
    }

    /// After a replication job of a policy ended: a pair's transition, if any.
    pub(crate) async fn pair_after_job(&self, policy_id: &str, job: &Job) {
        let Some(row) = self.pair_of_policy(policy_id).await else {
            return;
        };
        if row.role != "primary" || row.state == PairState::FailedOver {
            return;
        }
        let r = async {
            let (state, detail) = self.derived_state(&row).await?;
            self.transition(
                &row,
                state,
                detail,
                &job.operator,
                "state",
                Some(job.id.clone()),
            )
            .await
        }
        .await;
        if let Err(e) = r {
            tracing::warn!("DR pair {}: {e}", row.id);
        }
    }

    /// While a pair's initial copy runs: its progress, to the standby every 2 s.
    pub(crate) async fn pair_progress_reporter(
        &self,
        policy_id: &str,
        progress: Arc<crate::location::JobProgress>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let row = self.pair_of_policy(policy_id).await?;
        if row.role != "primary" || row.state != PairState::StartReplication {
            return None;
        }
        let peer = self.peer(&row.standby_location).await.ok()?;
        let db = self.db.clone();
        Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                let p = progress.snapshot();
                let pct = if p.total == 0 {
                    0.0
                } else {
                    (p.done as f64 * 100.0 / p.total as f64).min(99.9)
                };
                let _ = set_progress(&db, &row.id, Some(pct)).await;
                let status = PairStatus {
                    state: PairState::StartReplication,
                    detail: None,
                    progress_pct: Some(pct),
                    operator: String::new(),
                    restarted_at: None,
                    progress_only: true,
                };
                let _: Result<serde_json::Value, _> = peer
                    .put(&format!("/api/v1/pairs/{}/status", row.id), &status)
                    .await;
            }
        }))
    }

    // ------------------------------------------------------------ the standby's side

    /// A primary registers a pair whose standby this location is.
    pub async fn register_standby(
        &self,
        reg: StandbyRegistration,
        who: &Principal,
    ) -> Result<Pair, ApiError> {
        if reg.id.len() != 12 || !reg.id.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(ApiError::bad_request(format!(
                "{:?} is not a pair id",
                reg.id
            )));
        }
        cairn_format::name::validate("server", &reg.server)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        cairn_format::name::validate("location", &reg.primary_location)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let row = PairRow {
            id: reg.id.clone(),
            role: "standby".into(),
            server: reg.server.clone(),
            primary_location: reg.primary_location.clone(),
            standby_location: self.config.location.clone(),
            policy_id: None,
            state: PairState::StartReplication,
            detail: None,
            progress: Some(0.0),
            restarted_at: reg.restarted_at.clone(),
            created_at: time_text(&self.now()),
            created_by: format!("{} at {}", reg.created_by, reg.primary_location),
        };
        self.insert_pair(&row).await.map_err(|e| {
            if e.message.contains("UNIQUE") {
                ApiError::conflict(format!("DR pair {} exists already here", reg.id))
            } else {
                e
            }
        })?;
        self.pair_event(
            &row.id,
            "created",
            Some(PairState::StartReplication),
            &row.created_by,
            Some(format!(
                "standby of server {} of {} (registered with token {})",
                reg.server, reg.primary_location, who.name
            )),
            None,
            None,
        )
        .await?;
        self.save_pair_record(&row.id).await;
        self.get_pair(&row.id).await
    }

    /// The primary tells a transition (or progress).
    pub async fn receive_status(&self, id: &str, st: PairStatus) -> Result<(), ApiError> {
        let row = self.pair_row(id).await?;
        if row.role != "standby" {
            // The standby failed over and tells the primary: replication stops.
            if st.state == PairState::FailedOver && row.state != PairState::FailedOver {
                let policy = self.pair_policy(&row).await?;
                self.set_enabled(&policy.id, false).await?;
                self.set_pair_state(
                    &row.id,
                    PairState::FailedOver,
                    st.detail.clone(),
                    None,
                    None,
                )
                .await?;
                self.pair_event(
                    &row.id,
                    "state",
                    Some(PairState::FailedOver),
                    &st.operator,
                    st.detail,
                    None,
                    None,
                )
                .await?;
            }
            return Ok(());
        }
        if row.state == PairState::FailedOver {
            return Err(ApiError::conflict(format!(
                "DR pair {} has failed over at {}; the primary's replication has stopped",
                row.id, self.config.location
            )));
        }
        if st.progress_only {
            set_progress(&self.db, &row.id, st.progress_pct).await?;
            return Ok(());
        }
        // During the initial copy the detail is its progress (derived when shown).
        let detail = match st.state {
            PairState::StartReplication => None,
            _ => st.detail.clone(),
        };
        self.set_pair_state(
            &row.id,
            st.state,
            detail,
            st.progress_pct,
            st.restarted_at.clone(),
        )
        .await?;
        let kind = if st.detail.as_deref() == Some("Restart Replication") {
            "restart"
        } else {
            "state"
        };
        if st.state != row.state || kind != "state" {
            self.pair_event(
                &row.id,
                kind,
                Some(st.state),
                &format!("{} at {}", st.operator, row.primary_location),
                st.detail,
                None,
                None,
            )
            .await?;
        }
        if st.state == PairState::Replicating {
            self.drop_failback_seed(&row.id).await;
        }
        self.save_pair_record(&row.id).await;
        Ok(())
    }

    /// Once the reversed pair has its first point here, the seed point of the
    /// failback is no longer needed.
    async fn drop_failback_seed(&self, id: &str) {
        let Ok(space) = self.host.space().cloned() else {
            return;
        };
        let want = format!("failback seed of pair {id}");
        if let Ok(points) = space.list_points().await {
            let ids: Vec<PointId> = points
                .into_iter()
                .filter(|p| p.trigger == want)
                .map(|p| p.id)
                .collect();
            if !ids.is_empty()
                && let Err(e) = cairn_store::gc::delete_points(&space, &ids).await
            {
                tracing::warn!("DR pair {id}: cannot delete the failback seed: {e}");
            }
        }
    }

    /// Writes `pairs/<id>.json` into this location's space (best effort).
    async fn save_pair_record(&self, id: &str) {
        let r = async {
            let pair = self.get_pair(id).await?;
            let space = self.host.space()?.clone();
            let mut v = serde_json::json!({
                "version": 1,
                "id": pair.id,
                "server": pair.server,
                "primary_location": pair.primary_location,
                "standby_location": pair.standby_location,
                "state": pair.state,
                "restarted_at": pair.restarted_at,
                "created_at": pair.created_at,
                "created_by": pair.created_by,
                "point_mark": pair_mark(&pair.id),
                "history": pair.history,
            });
            v["updated_at"] = serde_json::Value::String(time_text(&self.now()));
            let bytes = serde_json::to_vec_pretty(&v).expect("serializes");
            space
                .backend()
                .put(
                    &pair_key(id),
                    bytes.into(),
                    cairn_store::backend::PutMode::Overwrite,
                )
                .await
                .map_err(|e| ApiError::internal(e.to_string()))
        }
        .await;
        if let Err(e) = r {
            tracing::warn!("DR pair {id}: cannot write its record into the space: {e}");
        }
    }

    /// The pair's points in this location's own space (at the standby), oldest first.
    async fn standby_points(
        &self,
        row: &PairRow,
    ) -> Result<Vec<cairn_format::record::PointRecord>, ApiError> {
        let space = self.host.space()?.clone();
        let mark = pair_mark(&row.id);
        let mut v: Vec<_> = space
            .list_points()
            .await?
            .into_iter()
            .filter(|p| {
                p.server.as_deref() == Some(row.server.as_str()) && p.trigger.contains(&mark)
            })
            .collect();
        v.sort_by_key(|p| p.snapshot_at);
        Ok(v)
    }

    /// Failover (or a drill): at the standby, a server made of instant clones of a
    /// point's disks, started (exported over NBD) at once.
    pub async fn failover_pair(
        self: &Arc<Self>,
        id: &str,
        req: FailoverRequest,
        who: &Principal,
        drill: bool,
    ) -> Result<serde_json::Value, ApiError> {
        let what = if drill {
            "a failover drill"
        } else {
            "failover"
        };
        let row = self.pair_row(id).await?;
        if row.role != "standby" {
            return Err(ApiError::conflict(format!(
                "{what} runs at the standby location {} of DR pair {}, where its recovery points are; this is its primary {}",
                row.standby_location, row.id, self.config.location
            )));
        }
        if !drill && req.confirm != Some(true) {
            return Err(ApiError::confirmation_required(format!(
                "failover starts server {} at {} from a recovery point and stops accepting replication from {}: send \"confirm\": true (CLI: --yes)",
                req.name.as_deref().unwrap_or(&row.server),
                self.config.location,
                row.primary_location
            )));
        }
        if !drill && row.state == PairState::FailedOver {
            let events = self.pair_events(&row.id).await?;
            let last = events
                .iter()
                .rev()
                .find(|(e, _)| e.kind == "failover")
                .map(|(e, _)| e.clone());
            return Err(ApiError::conflict(format!(
                "DR pair {} has already failed over{}",
                row.id,
                last.map(|e| format!(
                    " at {} by {} (server {})",
                    e.at,
                    e.operator,
                    e.server.unwrap_or_default()
                ))
                .unwrap_or_default()
            )));
        }
        let points = self.standby_points(&row).await?;
        let since = parse_time(&row.restarted_at);
        let ready: Vec<_> = points
            .iter()
            .filter(|p| since.is_none_or(|s| p.snapshot_at >= s))
            .collect();
        if ready.is_empty() {
            return Err(match row.state {
                PairState::Failed => not_ready(
                    row.progress,
                    &format!(
                        "the initial replication failed ({})",
                        row.detail.as_deref().unwrap_or("unknown error")
                    ),
                ),
                _ => not_ready(row.progress, "initial replication in progress"),
            });
        }
        let want = req.point.as_deref().unwrap_or("latest").trim();
        let point = if want == "latest" {
            *ready.last().expect("not empty")
        } else {
            let m: Vec<_> = points
                .iter()
                .filter(|p| p.id.to_string().starts_with(want))
                .collect();
            match m.len() {
                1 => m[0],
                0 => {
                    return Err(ApiError::not_found(format!(
                        "DR pair {} has no recovery point {want} here (it has {}: `cairn pair show {}`)",
                        row.id,
                        points.len(),
                        row.id
                    )));
                }
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "{want} matches several recovery points; give more characters"
                    )));
                }
            }
        };
        let name = match &req.name {
            Some(n) => n.clone(),
            None if drill => {
                let mut n = format!("{}-drill", row.server);
                let mut i = 2;
                while self.host.pool().server(&n).is_ok() {
                    n = format!("{}-drill{i}", row.server);
                    i += 1;
                }
                n
            }
            None => row.server.clone(),
        };
        cairn_format::name::validate("server", &name)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        // A planned failback lands on the old primary's own (stopped) server: its
        // disks are rolled back to the point, rewriting only what differs.
        let into_existing = if self.host.pool().server(&name).is_ok() {
            let same_layout = {
                let have = self.host.pool().disks(&name)?;
                have.len() == point.disks.len()
                    && point.disks.iter().all(|d| {
                        have.iter()
                            .any(|h| h.name == d.name && h.size == d.size && h.origin.is_none())
                    })
            };
            if drill || !same_layout {
                return Err(ApiError::conflict(format!(
                    "a server {name} exists already at {}{}; remove it or give another name (--name)",
                    self.config.location,
                    if drill {
                        ""
                    } else {
                        " with another disk layout than the point's"
                    }
                )));
            }
            if self.host.running().await.contains(&name) {
                return Err(ApiError::conflict(format!(
                    "server {name} is running at {}; stop it first (`cairn server stop {name}`): failover rolls its disks back to the point",
                    self.config.location
                )));
            }
            true
        } else {
            false
        };
        self.refuse_if_closing()?;
        let kind = if drill {
            JobKind::Drill
        } else {
            JobKind::Failover
        };
        let mut job = self.new_job(
            None,
            kind,
            &format!("pair {} {}", row.id, kind.as_str()),
            &who.name,
            None,
        );
        job.target = Some(point.id.to_string());
        self.insert_job(&job).await?;
        let started = self.mark_running(&job.id).await?;
        let t0 = std::time::Instant::now();
        let outcome = if into_existing {
            self.roll_into(&name, point).await
        } else {
            self.build_from_point(&name, point).await
        };
        let first_byte_ms = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX);
        let result = match outcome {
            Ok(()) => Ok(()),
            Err(e) => {
                if !into_existing {
                    self.remove_server_quietly(&name).await;
                }
                Err(e)
            }
        };
        let resources: Vec<Resource> = point
            .disks
            .iter()
            .map(|d| Resource {
                disk: format!("{name}/{}", d.name),
                size: d.size,
                bytes_changed: 0,
                bytes_written: 0,
            })
            .collect();
        let refs = vec![ServerPointRef {
            server: name.clone(),
            point: point.id.to_string(),
            disks: point.disks.iter().map(|d| d.name.clone()).collect(),
            snapshot_at: Some(time_text(&point.snapshot_at)),
        }];
        let (jid, res, pts) = (
            job.id.clone(),
            serde_json::to_string(&resources).expect("json"),
            serde_json::to_string(&refs).expect("json"),
        );
        self.db
            .call(move |c| {
                c.execute(
                    "UPDATE jobs SET resources = ?2, points = ?3 WHERE id = ?1",
                    params![jid, res, pts],
                )?;
                Ok(())
            })
            .await?;
        self.finish_job(
            &job.id,
            started,
            result.clone().map_err(|e| e.message.clone()),
        )
        .await?;
        result?;
        let detail = format!(
            "server {name} from point {} (taken {}), first byte after {first_byte_ms} ms",
            point.id,
            time_text(&point.snapshot_at)
        );
        if drill {
            self.pair_event(
                &row.id,
                "drill",
                None,
                &who.name,
                Some(detail.clone()),
                Some(job.id.clone()),
                Some(name.clone()),
            )
            .await?;
        } else {
            self.set_pair_state(
                &row.id,
                PairState::FailedOver,
                Some(detail.clone()),
                None,
                None,
            )
            .await?;
            self.pair_event(
                &row.id,
                "failover",
                Some(PairState::FailedOver),
                &who.name,
                Some(detail.clone()),
                Some(job.id.clone()),
                Some(name.clone()),
            )
            .await?;
            // Tell the primary, if it is there, so that it stops replicating.
            if let Ok(peer) = self.peer(&row.primary_location).await {
                let (id, op, d) = (row.id.clone(), who.name.clone(), detail.clone());
                tokio::spawn(async move {
                    let st = PairStatus {
                        state: PairState::FailedOver,
                        detail: Some(d),
                        progress_pct: None,
                        operator: op,
                        restarted_at: None,
                        progress_only: false,
                    };
                    let _: Result<serde_json::Value, _> =
                        peer.put(&format!("/api/v1/pairs/{id}/status"), &st).await;
                });
            }
        }
        self.save_pair_record(&row.id).await;
        let exports: Vec<String> = match &self.config.nbd_listen {
            Some(a) => point
                .disks
                .iter()
                .map(|d| format!("nbd://{a}/{name}/{}", d.name))
                .collect(),
            None => Vec::new(),
        };
        Ok(serde_json::json!({
            "pair": row.id,
            "job": self.get_job(&job.id).await?,
            "server": name,
            "point": point.id.to_string(),
            "snapshot_at": time_text(&point.snapshot_at),
            "first_byte_ms": first_byte_ms,
            "exports": exports,
            // Instant clones fill in the background; an existing server was rolled back.
            "hydrating": !into_existing,
        }))
    }

    /// Makes server `name` of instant clones of every disk of `point` and starts it;
    /// returns once the first disk's first block has been read through the clone.
    async fn build_from_point(
        &self,
        name: &str,
        point: &cairn_format::record::PointRecord,
    ) -> Result<(), ApiError> {
        let pool = self.host.pool();
        pool.create_server(name, None, None)?;
        let space = self.host.space()?.clone();
        for d in &point.disks {
            host::clone_disk(pool, &space, &point.id, Some(&d.name), name, &d.name).await?;
        }
        self.host.start(name).await?;
        if let Some(v) = self
            .host
            .volumes(name)
            .await
            .and_then(|v| v.into_iter().next())
        {
            let len = v.size().min(4096);
            v.read_at(0, len)
                .await
                .map_err(|e| ApiError::internal(format!("first read of {name}: {e}")))?;
        }
        Ok(())
    }

    /// Rolls an existing stopped server's disks back to `point` and starts it.
    async fn roll_into(
        &self,
        name: &str,
        point: &cairn_format::record::PointRecord,
    ) -> Result<(), ApiError> {
        let space = self.host.space()?.clone();
        let pool = self.host.pool().clone();
        let (name2, id) = (name.to_string(), point.id);
        // The store's rollback future is not provably Send (see `rollback_point`).
        let rt = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            rt.block_on(host::rollback_server(
                &pool,
                &space,
                &id,
                &name2,
                None,
                true,
                &cairn_store::progress::NoProgress,
            ))
        })
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
        self.host.start(name).await?;
        Ok(())
    }

    async fn remove_server_quietly(&self, name: &str) {
        let _ = self.host.stop(name).await;
        let pool = self.host.pool();
        if let Ok(disks) = pool.disks(name) {
            for d in disks {
                match host::delete_disk(pool, name, &d.name) {
                    Ok(Some(origin)) => {
                        if let Ok(space) = self.host.space() {
                            let _ = host::unpin(space, &origin).await;
                        }
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!("cannot remove disk {name}/{}: {e}", d.name),
                }
            }
        }
        if let Err(e) = pool.delete_server(name) {
            tracing::warn!("cannot remove server {name}: {e}");
        }
    }

    /// Removes the servers of a pair's drills.
    pub async fn drill_cleanup(&self, id: &str, who: &Principal) -> Result<Pair, ApiError> {
        let row = self.pair_row(id).await?;
        if row.role != "standby" {
            return Err(ApiError::conflict(format!(
                "drills run at the standby location {} of DR pair {}; clean them up there",
                row.standby_location, row.id
            )));
        }
        let open: Vec<String> = self
            .pair_events(&row.id)
            .await?
            .into_iter()
            .filter(|(e, cleaned)| e.kind == "drill" && cleaned.is_none())
            .filter_map(|(e, _)| e.server)
            .collect();
        if open.is_empty() {
            return Err(ApiError::conflict(format!(
                "DR pair {} has no drill to clean up",
                row.id
            )));
        }
        for s in &open {
            if self.host.pool().server(s).is_ok() {
                self.remove_server_quietly(s).await;
            }
        }
        let (pid, now, names) = (row.id.clone(), time_text(&self.now()), open.clone());
        self.db
            .call(move |c| {
                for n in &names {
                    c.execute(
                        "UPDATE pair_events SET cleaned_at = ?3 WHERE pair_id = ?1 AND kind = 'drill' AND server = ?2",
                        params![pid, n, now],
                    )?;
                }
                Ok(())
            })
            .await?;
        self.pair_event(
            &row.id,
            "drill_cleanup",
            None,
            &who.name,
            Some(format!("removed {}", open.join(", "))),
            None,
            None,
        )
        .await?;
        self.save_pair_record(&row.id).await;
        self.get_pair(&row.id).await
    }

    // ------------------------------------------------------------ views

    pub async fn list_pairs(&self) -> Result<Vec<Pair>, ApiError> {
        let ids: Vec<String> = self
            .db
            .read(|c| {
                let mut st = c.prepare("SELECT id FROM pairs ORDER BY created_at")?;
                let v = st
                    .query_map([], |r| r.get(0))?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(v)
            })
            .await?;
        let mut out = Vec::new();
        for id in ids {
            out.push(self.get_pair(&id).await?);
        }
        Ok(out)
    }

    pub async fn get_pair(&self, id: &str) -> Result<Pair, ApiError> {
        let row = self.pair_row(id).await?;
        let events = self.pair_events(&row.id).await?;
        let drills: Vec<String> = events
            .iter()
            .filter(|(e, c)| e.kind == "drill" && c.is_none())
            .filter_map(|(e, _)| e.server.clone())
            .collect();
        let history: Vec<PairEvent> = events.into_iter().map(|(e, _)| e).collect();
        let (policy, schedule, points, jobs) = if row.role == "primary" {
            let policy = self.pair_policy(&row).await?;
            let jobs = self
                .list_jobs(&JobFilter {
                    policy: Some(policy.id.clone()),
                    limit: 20,
                    ..JobFilter::default()
                })
                .await?
                .items;
            let points: Vec<PairPoint> = self
                .restorable_jobs(&policy.id)
                .await?
                .into_iter()
                .filter_map(|j| {
                    let p = j.points.iter().find(|p| p.server == row.server)?;
                    Some(PairPoint {
                        id: p.point.clone(),
                        snapshot_at: p
                            .snapshot_at
                            .clone()
                            .or_else(|| j.started_at.clone())
                            .unwrap_or_default(),
                        disks: j.resources.clone(),
                        job: Some(j.id.clone()),
                        scope_changed: j.scope_changed,
                    })
                })
                .collect();
            (
                Some(policy.spec.name.clone()),
                Some(policy.spec.schedule.clone()),
                points,
                jobs,
            )
        } else {
            let mut points: Vec<PairPoint> = self
                .standby_points(&row)
                .await
                .unwrap_or_default()
                .into_iter()
                .map(|p| PairPoint {
                    id: p.id.to_string(),
                    snapshot_at: time_text(&p.snapshot_at),
                    disks: p
                        .disks
                        .iter()
                        .map(|d| Resource {
                            disk: format!("{}/{}", row.server, d.name),
                            size: d.size,
                            bytes_changed: d.stats.bytes_new,
                            bytes_written: d.stats.bytes_written,
                        })
                        .collect(),
                    job: p.trigger.rsplit(" job ").next().map(str::to_string),
                    scope_changed: false,
                })
                .collect();
            points.reverse();
            let pattern = format!("pair {} %", row.id);
            let jobs = self
                .db
                .read(move |c| {
                    let mut st = c.prepare(&format!(
                        "SELECT {JOB_COLUMNS} FROM jobs WHERE trigger LIKE ?1 ORDER BY seq DESC LIMIT 20"
                    ))?;
                    let v = st
                        .query_map(params![pattern], job_from_row)?
                        .map(|r| r.map(|(_, j)| j))
                        .collect::<Result<Vec<_>, _>>()?;
                    Ok(v)
                })
                .await?;
            (None, None, points, jobs)
        };
        let last_point = points.first().cloned();
        let last_point_age_s = last_point
            .as_ref()
            .and_then(|p| parse_time(&p.snapshot_at))
            .map(|t| (self.now() - t).num_seconds().max(0));
        let detail = match (row.state, &row.detail) {
            (PairState::StartReplication, None) => Some(format!(
                "initial replication in progress, {:.0}% copied",
                row.progress.unwrap_or(0.0)
            )),
            (_, d) => d.clone(),
        };
        Ok(Pair {
            id: row.id.clone(),
            role: row.role.clone(),
            server: row.server.clone(),
            primary_location: row.primary_location.clone(),
            standby_location: row.standby_location.clone(),
            state: row.state,
            state_label: row.state.label().to_string(),
            detail,
            progress_pct: row.progress,
            policy,
            schedule,
            last_point,
            last_point_age_s,
            points,
            jobs,
            history,
            drills,
            restarted_at: row.restarted_at,
            created_at: row.created_at,
            created_by: row.created_by,
        })
    }
}

// ---------------------------------------------------------------- failback

impl Location {
    /// Refuses policy commands on a DR pair's policy (the pair commands keep the pair's
    /// state and history right).
    pub async fn not_a_pair_policy(&self, name_or_id: &str) -> Result<(), ApiError> {
        let row = self.policy_row(name_or_id).await?;
        if let Some(pair) = row.spec.name.strip_prefix("pair-") {
            return Err(ApiError::conflict(format!(
                "policy {} belongs to DR pair {pair}: use `cairn pair show|pause|resume|restart {pair}`",
                row.spec.name
            )));
        }
        Ok(())
    }

    /// Before a pair's replication job copies anything: the standby must still be the
    /// standby. If it failed over (or the pair was reversed there), replicating the old
    /// primary would write a second history into its space: the job fails, the pair
    /// here is marked failed over and its schedule paused.
    pub(crate) async fn pair_guard(
        &self,
        policy: &crate::location::PolicyRow,
    ) -> Result<(), String> {
        let Some(row) = self.pair_of_policy(&policy.id).await else {
            return Ok(());
        };
        if row.role != "primary" {
            return Ok(());
        }
        let peer = self
            .peer(&row.standby_location)
            .await
            .map_err(|e| e.message)?;
        let theirs: Pair = peer
            .get(&format!("/api/v1/pairs/{}", row.id))
            .await
            .map_err(|e| format!("the standby cannot be asked about the pair: {}", e.message))?;
        let over = theirs.state == PairState::FailedOver || theirs.role == "primary";
        if !over {
            return Ok(());
        }
        let why = format!(
            "DR pair {} has failed over to {} ({}): replication from {} stopped",
            row.id,
            row.standby_location,
            theirs
                .detail
                .as_deref()
                .unwrap_or("the server runs there now"),
            self.config.location
        );
        let _ = self.set_enabled(&policy.id, false).await;
        let _ = self
            .set_pair_state(
                &row.id,
                PairState::FailedOver,
                Some(why.clone()),
                None,
                None,
            )
            .await;
        let _ = self
            .pair_event(
                &row.id,
                "state",
                Some(PairState::FailedOver),
                "scheduler",
                Some(why.clone()),
                None,
                None,
            )
            .await;
        Err(why)
    }

    /// Failback, step 1, at the location that failed over: reverse the pair. This
    /// location becomes the primary (its failed-over server is replicated to the old
    /// primary's space), the old primary becomes the standby. The old primary first
    /// stores its own (stale) disks into its own space, locally, so that the reversed
    /// replication sends only the chunks that differ.
    pub async fn reverse_pair(
        self: &Arc<Self>,
        id: &str,
        schedule: Option<ScheduleSpec>,
        who: &Principal,
    ) -> Result<Pair, ApiError> {
        let row = self.pair_row(id).await?;
        if row.role != "standby" || row.state != PairState::FailedOver {
            return Err(ApiError::conflict(format!(
                "DR pair {} is reversed at the location that failed over, after the failover (here it is the {} and {})",
                row.id,
                row.role,
                row.state.label()
            )));
        }
        let events = self.pair_events(&row.id).await?;
        let server = events
            .iter()
            .rev()
            .find(|(e, _)| e.kind == "failover")
            .and_then(|(e, _)| e.server.clone())
            .ok_or_else(|| {
                ApiError::internal(format!("DR pair {}: no failover recorded", row.id))
            })?;
        self.host.pool().server(&server).map_err(|_| {
            ApiError::conflict(format!(
                "server {server} that DR pair {} failed over to is gone from {}",
                row.id, self.config.location
            ))
        })?;
        let old_primary = row.primary_location.clone();
        let peer = self.peer(&old_primary).await.map_err(|e| {
            ApiError::bad_request(format!(
                "{} (to reverse the pair this location must reach its old primary)",
                e.message
            ))
        })?;
        let now = time_text(&self.now());
        let ask = serde_json::json!({
            "new_primary": self.config.location,
            "server": server,
            "operator": who.name,
            "restarted_at": now,
        });
        let seeded: serde_json::Value = peer
            .post(&format!("/api/v1/pairs/{}/become-standby", row.id), &ask)
            .await?;
        let policy_spec = PolicySpec {
            name: format!("pair-{}", row.id),
            description: format!(
                "DR pair {} (reversed): server {server} of {} protected at {old_primary}",
                row.id, self.config.location
            ),
            schedule: schedule.unwrap_or(ScheduleSpec {
                interval: Some("15m".into()),
                ..ScheduleSpec::default()
            }),
            scope: vec![server.clone()],
            space: old_primary.clone(),
            retention: RetentionSpec {
                keep_last: Some(24),
                keep_daily: Some(7),
                ..RetentionSpec::default()
            },
            enabled: true,
        };
        self.validate_policy(&policy_spec).await?;
        let policy = self.create_policy_unchecked(policy_spec).await?;
        let (pid, loc, op, srv, t, polid) = (
            row.id.clone(),
            self.config.location.clone(),
            old_primary.clone(),
            server.clone(),
            now.clone(),
            policy.id.clone(),
        );
        self.db
            .call(move |c| {
                c.execute(
                    "UPDATE pairs SET role = 'primary', server = ?2, primary_location = ?3, standby_location = ?4, policy_id = ?5, state = 'start_replication', detail = NULL, progress = 0, restarted_at = ?6, updated_at = ?6 WHERE id = ?1",
                    params![pid, srv, loc, op, polid, t],
                )?;
                Ok(())
            })
            .await?;
        self.pair_event(
            &row.id,
            "reversed",
            Some(PairState::StartReplication),
            &who.name,
            Some(format!(
                "{} is now the primary (server {server}), {old_primary} the standby; {} seeded its space from its own disks (point {})",
                self.config.location,
                old_primary,
                seeded["seed_point"].as_str().unwrap_or("-")
            )),
            None,
            Some(server.clone()),
        )
        .await?;
        let prow = self.policy_row(&policy.id).await?;
        self.start_replication(&prow, "pair reverse", &who.name, None)
            .await?;
        self.get_pair(&row.id).await
    }

    /// Failback, step 1, at the old primary: become the standby of the reversed pair.
    pub async fn become_standby(
        &self,
        id: &str,
        req: BecomeStandby,
        who: &Principal,
    ) -> Result<serde_json::Value, ApiError> {
        let row = self.pair_row(id).await?;
        if row.role != "primary" {
            return Err(ApiError::conflict(format!(
                "DR pair {} is not primary here at {}",
                row.id, self.config.location
            )));
        }
        if row.standby_location != req.new_primary {
            return Err(ApiError::conflict(format!(
                "DR pair {}'s standby is {}, not {}",
                row.id, row.standby_location, req.new_primary
            )));
        }
        let policy = self.pair_policy(&row).await?;
        if let Some(job) = self.running_job_of(&policy.id) {
            return Err(ApiError::conflict(format!(
                "job {job} of DR pair {} is still running at {}; wait for it",
                row.id, self.config.location
            )));
        }
        if self.host.running().await.contains(&row.server) {
            return Err(ApiError::conflict(format!(
                "server {} is running at {}: it is the old primary's copy; stop it there first (`cairn server stop {}`), it becomes the standby's",
                row.server, self.config.location, row.server
            )));
        }
        // The stale disks into this location's own space: the reversed replication
        // then sends only the chunks that differ.
        let space = self.host.space()?.clone();
        let seed = self
            .host
            .take_point_into(
                &space,
                &row.server,
                None,
                &format!("{} at {}", req.operator, req.new_primary),
                &format!("failback seed of pair {}", row.id),
                &cairn_store::progress::NoProgress,
            )
            .await?;
        let pid = policy.id.clone();
        self.db
            .call(move |c| {
                c.execute("DELETE FROM policies WHERE id = ?1", params![pid])?;
                Ok(())
            })
            .await?;
        let (id2, np, me, t) = (
            row.id.clone(),
            req.new_primary.clone(),
            self.config.location.clone(),
            req.restarted_at.clone(),
        );
        let srv = req.server.clone();
        self.db
            .call(move |c| {
                c.execute(
                    "UPDATE pairs SET role = 'standby', server = ?2, primary_location = ?3, standby_location = ?4, policy_id = NULL, state = 'start_replication', detail = NULL, progress = 0, restarted_at = ?5, updated_at = ?5 WHERE id = ?1",
                    params![id2, srv, np, me, t],
                )?;
                Ok(())
            })
            .await?;
        self.pair_event(
            &row.id,
            "reversed",
            Some(PairState::StartReplication),
            &format!("{} at {}", req.operator, req.new_primary),
            Some(format!(
                "{} is now the primary, {} the standby (server {} here is the failback target); seed point {}",
                req.new_primary, self.config.location, row.server, seed.record.id
            )),
            None,
            Some(row.server.clone()),
        )
        .await?;
        self.save_pair_record(&row.id).await;
        let _ = who;
        Ok(serde_json::json!({
            "seed_point": seed.record.id.to_string(),
            "bytes_read": seed.record.disks.iter().map(|d| d.size).sum::<u64>(),
        }))
    }
}

/// `POST /pairs/{id}/become-standby` (location to location, for a reversal).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BecomeStandby {
    pub new_primary: String,
    /// The server's name at the new primary.
    pub server: String,
    pub operator: String,
    pub restarted_at: String,
}

// ---------------------------------------------------------------- deleting a pair

impl Location {
    /// Deletes a DR pair. At the primary: its policy (the job records stay as history),
    /// its points in the standby's space if `delete_points`, and the standby's copy of
    /// the pair (if the standby answers). At the standby: only this side (after a
    /// failover, or with the primary gone); the points stay unless `delete_points`.
    pub async fn delete_pair(
        &self,
        id: &str,
        delete_points: bool,
        who: &Principal,
    ) -> Result<serde_json::Value, ApiError> {
        let row = self.pair_row(id).await?;
        let mut deleted = 0usize;
        let mut standby_told = None;
        if row.role == "primary" {
            if let Some(pid) = &row.policy_id
                && let Ok(policy) = self.policy_row(pid).await
            {
                let mode = if delete_points {
                    crate::location::PointsOnDelete::Delete
                } else {
                    crate::location::PointsOnDelete::Keep
                };
                let out = self.delete_policy(&policy.id, mode, who).await?;
                deleted = usize::try_from(out["points_deleted"].as_u64().unwrap_or(0)).unwrap_or(0);
            }
            if let Ok(peer) = self.peer(&row.standby_location).await {
                let r: Result<serde_json::Value, _> = peer
                    .post(
                        &format!("/api/v1/pairs/{}/forget", row.id),
                        &serde_json::json!({}),
                    )
                    .await;
                standby_told = Some(match r {
                    Ok(_) => "the standby forgot it".to_string(),
                    Err(e) => format!(
                        "the standby was not told ({}): delete it there too",
                        e.message
                    ),
                });
            }
        } else {
            if delete_points {
                let points = self.standby_points(&row).await?;
                let space = self.host.space()?.clone();
                for p in &points {
                    let pins = cairn_store::pins::pins_of(&space, &p.id).await?;
                    if !pins.is_empty() {
                        return Err(ApiError::conflict(format!(
                            "point {} of DR pair {} is still read by clone {}; hydrate or delete it first, or keep the points",
                            p.id,
                            row.id,
                            pins.iter()
                                .map(|x| x.holder.clone())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )));
                    }
                }
                let ids: Vec<PointId> = points.iter().map(|p| p.id).collect();
                cairn_store::gc::delete_points(&space, &ids).await?;
                deleted = ids.len();
            }
        }
        self.remove_pair_row(&row).await?;
        Ok(serde_json::json!({
            "pair": row.id,
            "role": row.role,
            "deleted_points": deleted,
            "standby": standby_told,
        }))
    }

    /// The primary deleted the pair: the standby forgets it (its points stay in the
    /// space, deletable with `cairn point`-level tools or by deleting them at the
    /// primary first). Refused after a failover: then the pair is this side's to keep.
    pub async fn forget_pair(&self, id: &str) -> Result<(), ApiError> {
        let row = self.pair_row(id).await?;
        if row.role != "standby" || row.state == PairState::FailedOver {
            return Err(ApiError::conflict(format!(
                "DR pair {} is {} here ({}): delete it here with `cairn pair delete`",
                row.id,
                row.role,
                row.state.label()
            )));
        }
        self.remove_pair_row(&row).await
    }

    /// Removes a pair's rows and history here, and (at its standby) its record in the
    /// space.
    async fn remove_pair_row(&self, row: &PairRow) -> Result<(), ApiError> {
        let pid = row.id.clone();
        self.db
            .call(move |c| {
                c.execute("DELETE FROM pair_events WHERE pair_id = ?1", params![pid])?;
                c.execute("DELETE FROM pairs WHERE id = ?1", params![pid])?;
                Ok(())
            })
            .await?;
        if row.role == "standby"
            && let Ok(space) = self.host.space()
        {
            let _ = space.backend().delete(&pair_key(&row.id)).await;
        }
        Ok(())
    }
}
