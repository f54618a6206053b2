//! The daemon's resources as the API shows them (and the JSON stored for policies).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// When a policy runs: a cron expression in a time zone, or an interval.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    /// Cron expression: 5 fields (minute hour day month weekday), or 6 with seconds first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// IANA time zone of the cron expression (default UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// Fixed interval instead of cron, e.g. `15m`, `1h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
}

/// Which recovery points a policy keeps (any combination; a point kept by one rule is
/// kept). Empty keeps everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetentionSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_hourly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_daily: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_weekly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_monthly: Option<u32>,
    /// Keep every point younger than this, e.g. `2d`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_within: Option<String>,
}

fn yes() -> bool {
    true
}

fn local() -> String {
    "local".to_string()
}

/// A replication policy as created (and stored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub schedule: ScheduleSpec,
    /// Servers (`web`: all its disks) and disks (`db/data`) of this location.
    pub scope: Vec<String>,
    /// The recovery space the points go to (`local`: this location's space).
    #[serde(default = "local")]
    pub space: String,
    #[serde(default)]
    pub retention: RetentionSpec,
    /// False: paused (no scheduled jobs; "replicate now" still works).
    #[serde(default = "yes")]
    pub enabled: bool,
}

/// A change to a policy: the fields given replace the old ones.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyPatch {
    /// Must equal the policy's name if given (policies are not renamed).
    pub name: Option<String>,
    pub description: Option<String>,
    pub schedule: Option<ScheduleSpec>,
    pub scope: Option<Vec<String>>,
    pub space: Option<String>,
    pub retention: Option<RetentionSpec>,
    pub enabled: Option<bool>,
}

/// Derived protection status of a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProtectionStatus {
    /// No replication job has finished yet.
    NotStarted,
    /// The latest replication job succeeded.
    Protected,
    /// The latest replication job failed.
    Failed,
    /// The policy is paused.
    Paused,
    /// The newest successful point is older than twice the schedule's period.
    Late,
}

impl ProtectionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ProtectionStatus::NotStarted => "not_started",
            ProtectionStatus::Protected => "protected",
            ProtectionStatus::Failed => "failed",
            ProtectionStatus::Paused => "paused",
            ProtectionStatus::Late => "late",
        }
    }
}

/// A job in short (in a policy).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobRef {
    pub id: String,
    pub state: JobState,
    pub ended_at: Option<String>,
}

/// A policy with its derived state.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Policy {
    pub id: String,
    #[serde(flatten)]
    pub spec: PolicySpec,
    pub created_at: String,
    pub updated_at: String,
    pub status: ProtectionStatus,
    /// The latest replication job that ran (not skipped).
    pub last_job: Option<JobRef>,
    pub last_success_at: Option<String>,
    /// The next scheduled run (none while paused).
    pub next_run_at: Option<String>,
    pub period_ms: u64,
    pub running_job: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Skipped,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Skipped => "skipped",
        }
    }

    pub fn parse(s: &str) -> Option<JobState> {
        Some(match s {
            "queued" => JobState::Queued,
            "running" => JobState::Running,
            "succeeded" => JobState::Succeeded,
            "failed" => JobState::Failed,
            "skipped" => JobState::Skipped,
            _ => return None,
        })
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Skipped
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    Replication,
    Verify,
    Gc,
    /// A DR pair's failover at its standby location.
    Failover,
    /// A failover drill (test failover into an isolated server).
    Drill,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Replication => "replication",
            JobKind::Verify => "verify",
            JobKind::Gc => "gc",
            JobKind::Failover => "failover",
            JobKind::Drill => "drill",
        }
    }

    pub fn parse(s: &str) -> Option<JobKind> {
        Some(match s {
            "replication" => JobKind::Replication,
            "verify" => JobKind::Verify,
            "gc" => JobKind::Gc,
            "failover" => JobKind::Failover,
            "drill" => JobKind::Drill,
            _ => return None,
        })
    }
}

/// One disk a replication job copied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Resource {
    /// `server/disk`.
    pub disk: String,
    pub size: u64,
    /// Bytes that differed from the previous point (read and found new).
    pub bytes_changed: u64,
    /// Bytes stored in the recovery space (compressed).
    pub bytes_written: u64,
}

/// The recovery space point a job made for one server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ServerPointRef {
    pub server: String,
    pub point: String,
    pub disks: Vec<String>,
    /// The instant the point's content is of (the freeze), RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_at: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ProgressInfo {
    pub phase: String,
    pub done: u64,
    pub total: u64,
}

/// A job: a run of a policy (replication), a verify, or a garbage collection. A
/// replication job is also a recovery point.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Job {
    pub id: String,
    pub policy: Option<String>,
    pub policy_id: Option<String>,
    pub kind: JobKind,
    /// `schedule` or `manual`.
    pub trigger: String,
    /// Who started it: a token's name, or `scheduler`.
    pub operator: String,
    pub state: JobState,
    pub due_at: Option<String>,
    pub queued_at: String,
    pub started_at: Option<String>,
    pub ended_at: Option<String>,
    pub duration_ms: Option<u64>,
    pub error: Option<String>,
    /// For a skipped job: the job that was running.
    pub skipped_for: Option<String>,
    /// What a verify job checks (a point id), if not a whole policy.
    pub target: Option<String>,
    pub progress: Option<ProgressInfo>,
    pub resources: Vec<Resource>,
    pub points: Vec<ServerPointRef>,
    pub scope_digest: Option<String>,
    pub scope_changed: bool,
    /// A succeeded replication job whose data is still there: it can be restored,
    /// cloned, rolled back to.
    pub restorable: bool,
    /// Why and when its data was deleted (retention, an operator).
    pub deleted: Option<String>,
    /// The recovery space its points are in: `local`, or the name of the location
    /// whose space it is.
    #[serde(default = "local")]
    pub space: String,
}

/// A page of a list.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

// ------------------------------------------------------------------ locations, pairs

/// Another location this one knows (its API and a token of it).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LocationSpec {
    pub name: String,
    /// Its API, e.g. `http://10.0.0.2:7070`.
    pub url: String,
    /// A token of that location (an operator's); stored here, never shown again.
    pub token: String,
}

/// A known location as shown (never with its token).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RemoteLocation {
    pub name: String,
    pub url: String,
    /// The id of its recovery space (checked when it was added).
    pub space_id: Option<String>,
    pub added_at: String,
    pub added_by: String,
}

/// A DR pair's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PairState {
    /// The initial full copy is running: the standby is not ready for failover.
    StartReplication,
    /// Healthy: the latest replication job succeeded.
    Replicating,
    /// Paused by an operator: nothing is copied.
    Paused,
    /// The latest replication job failed (the error is shown).
    Failed,
    /// Failed over: the server runs at the standby location.
    FailedOver,
}

impl PairState {
    pub fn as_str(self) -> &'static str {
        match self {
            PairState::StartReplication => "start_replication",
            PairState::Replicating => "replicating",
            PairState::Paused => "paused",
            PairState::Failed => "failed",
            PairState::FailedOver => "failed_over",
        }
    }

    /// As the specification names it.
    pub fn label(self) -> &'static str {
        match self {
            PairState::StartReplication => "Start Replication",
            PairState::Replicating => "Replicating",
            PairState::Paused => "Paused",
            PairState::Failed => "Failed",
            PairState::FailedOver => "Failed over",
        }
    }

    pub fn parse(s: &str) -> Option<PairState> {
        Some(match s {
            "start_replication" => PairState::StartReplication,
            "replicating" => PairState::Replicating,
            "paused" => PairState::Paused,
            "failed" => PairState::Failed,
            "failed_over" => PairState::FailedOver,
            _ => return None,
        })
    }
}

/// `POST /pairs`: protect a server of this location by a standby at another.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PairSpec {
    pub server: String,
    pub standby_location: String,
    /// Default: every 15 minutes.
    #[serde(default)]
    pub schedule: Option<ScheduleSpec>,
    /// Default: the last 24 points and one a day for 7 days.
    #[serde(default)]
    pub retention: Option<RetentionSpec>,
}

/// What a primary tells its standby when it creates a pair.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StandbyRegistration {
    pub id: String,
    pub server: String,
    pub primary_location: String,
    pub created_by: String,
    pub restarted_at: String,
}

/// A state change one side of a pair tells the other.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PairStatus {
    pub state: PairState,
    #[serde(default)]
    pub detail: Option<String>,
    /// Of the initial copy, 0–100.
    #[serde(default)]
    pub progress_pct: Option<f64>,
    pub operator: String,
    /// When replication was (re)started from scratch.
    #[serde(default)]
    pub restarted_at: Option<String>,
    /// True: a progress report only (no transition to record).
    #[serde(default)]
    pub progress_only: bool,
}

/// A recovery point of a pair.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PairPoint {
    /// The recovery space point id.
    pub id: String,
    pub snapshot_at: String,
    /// `name size` of each disk.
    pub disks: Vec<Resource>,
    /// The replication job that made it (at the primary).
    pub job: Option<String>,
    pub scope_changed: bool,
}

/// One entry of a pair's history.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PairEvent {
    pub at: String,
    /// `created`, `state`, `paused`, `resumed`, `restart`, `failover`, `drill`,
    /// `drill_cleanup`.
    pub kind: String,
    pub state: Option<PairState>,
    pub operator: String,
    pub detail: Option<String>,
    pub job: Option<String>,
    /// The server a failover or drill made.
    pub server: Option<String>,
}

/// A DR pair as shown.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Pair {
    pub id: String,
    /// `primary` or `standby`: this location's side.
    pub role: String,
    pub server: String,
    pub primary_location: String,
    pub standby_location: String,
    pub state: PairState,
    /// The state as the specification names it ("Start Replication", …).
    pub state_label: String,
    /// The latest job's error, or the initial copy's progress.
    pub detail: Option<String>,
    pub progress_pct: Option<f64>,
    /// The replication policy (at the primary).
    pub policy: Option<String>,
    pub schedule: Option<ScheduleSpec>,
    pub last_point: Option<PairPoint>,
    /// Age of the last point in seconds (the recovery point objective achieved now).
    pub last_point_age_s: Option<i64>,
    pub points: Vec<PairPoint>,
    pub jobs: Vec<Job>,
    pub history: Vec<PairEvent>,
    /// Drill servers not cleaned up yet.
    pub drills: Vec<String>,
    pub restarted_at: String,
    pub created_at: String,
    pub created_by: String,
}

/// `POST /pairs/{id}/failover` and `/drill`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FailoverRequest {
    /// `latest` (default) or a point id (or a unique prefix).
    #[serde(default)]
    pub point: Option<String>,
    /// The server to create (failover: the pair's server name; drill: `<server>-drill`).
    #[serde(default)]
    pub name: Option<String>,
    /// Failover only: must be true.
    #[serde(default)]
    pub confirm: Option<bool>,
}
