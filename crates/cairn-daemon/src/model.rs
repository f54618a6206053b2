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
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Replication => "replication",
            JobKind::Verify => "verify",
            JobKind::Gc => "gc",
        }
    }

    pub fn parse(s: &str) -> Option<JobKind> {
        Some(match s {
            "replication" => JobKind::Replication,
            "verify" => JobKind::Verify,
            "gc" => JobKind::Gc,
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
}

/// A page of a list.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}
