//! `/metrics` in the Prometheus text format, rendered at scrape time from the database
//! (jobs, policies) and in-memory counters, so it can never disagree with the API.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use rusqlite::params;

use crate::db::{DbError, parse_time};
use crate::error::ApiError;
use crate::location::Location;
use crate::model::{PairState, ProtectionStatus};

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

const BUCKETS: [f64; 10] = [0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0];

pub async fn render(loc: &Location) -> Result<String, ApiError> {
    let mut out = String::new();
    let (by_state, durations) = loc
        .db
        .call(|c| {
            let mut st = c
                .prepare("SELECT kind, state, COUNT(*) FROM jobs GROUP BY kind, state")
                .map_err(DbError::Sql)?;
            let by_state = st
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                })
                .map_err(DbError::Sql)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(DbError::Sql)?;
            let mut st = c
                .prepare(
                    "SELECT duration_ms FROM jobs WHERE kind = 'replication' AND state IN ('succeeded', 'failed') AND duration_ms IS NOT NULL ORDER BY seq DESC LIMIT ?1",
                )
                .map_err(DbError::Sql)?;
            let durations = st
                .query_map(params![100_000], |r| r.get::<_, i64>(0))
                .map_err(DbError::Sql)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(DbError::Sql)?;
            Ok((by_state, durations))
        })
        .await?;
    out.push_str("# HELP cairn_jobs Jobs recorded, by kind and state.\n# TYPE cairn_jobs gauge\n");
    for (kind, state, n) in &by_state {
        let _ = writeln!(out, "cairn_jobs{{kind=\"{kind}\",state=\"{state}\"}} {n}");
    }
    out.push_str("# HELP cairn_replication_job_duration_seconds Duration of finished replication jobs (newest 100000).\n# TYPE cairn_replication_job_duration_seconds histogram\n");
    let mut counts = [0u64; BUCKETS.len()];
    let mut sum = 0.0;
    for d in &durations {
        #[allow(clippy::cast_precision_loss)]
        let s = *d as f64 / 1000.0;
        sum += s;
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                counts[i] += 1;
            }
        }
    }
    for (i, b) in BUCKETS.iter().enumerate() {
        let _ = writeln!(
            out,
            "cairn_replication_job_duration_seconds_bucket{{le=\"{b}\"}} {}",
            counts[i]
        );
    }
    let _ = writeln!(
        out,
        "cairn_replication_job_duration_seconds_bucket{{le=\"+Inf\"}} {}\ncairn_replication_job_duration_seconds_sum {sum}\ncairn_replication_job_duration_seconds_count {}",
        durations.len(),
        durations.len()
    );
    let _ = writeln!(
        out,
        "# HELP cairn_bytes_replicated_total Bytes written to the recovery space by replication jobs since the daemon started.\n# TYPE cairn_bytes_replicated_total counter\ncairn_bytes_replicated_total {}",
        loc.counters.bytes_replicated.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP cairn_bytes_changed_total Changed bytes found by replication jobs since the daemon started.\n# TYPE cairn_bytes_changed_total counter\ncairn_bytes_changed_total {}",
        loc.counters.bytes_changed.load(Ordering::Relaxed)
    );
    let policies = loc.list_policies().await?;
    let now = loc.clock.now();
    out.push_str("# HELP cairn_policy_newest_point_age_seconds Age of the policy's newest successful recovery point (absent before the first).\n# TYPE cairn_policy_newest_point_age_seconds gauge\n");
    for p in &policies {
        if let Some(t) = p.last_success_at.as_deref().and_then(parse_time) {
            #[allow(clippy::cast_precision_loss)]
            let age = (now - t).num_milliseconds().max(0) as f64 / 1000.0;
            let _ = writeln!(
                out,
                "cairn_policy_newest_point_age_seconds{{policy=\"{}\"}} {age}",
                esc(&p.spec.name)
            );
        }
    }
    out.push_str("# HELP cairn_policy_status Protection status of each policy (1 for its current status).\n# TYPE cairn_policy_status gauge\n");
    for p in &policies {
        for s in [
            ProtectionStatus::NotStarted,
            ProtectionStatus::Protected,
            ProtectionStatus::Failed,
            ProtectionStatus::Paused,
            ProtectionStatus::Late,
        ] {
            let _ = writeln!(
                out,
                "cairn_policy_status{{policy=\"{}\",status=\"{}\"}} {}",
                esc(&p.spec.name),
                s.as_str(),
                u8::from(p.status == s)
            );
        }
    }
    out.push_str("# HELP cairn_policy_rpo_late 1 when the policy's newest successful point is older than twice its period.\n# TYPE cairn_policy_rpo_late gauge\n");
    for p in &policies {
        let _ = writeln!(
            out,
            "cairn_policy_rpo_late{{policy=\"{}\"}} {}",
            esc(&p.spec.name),
            u8::from(p.status == ProtectionStatus::Late)
        );
    }
    let pairs: Vec<(String, String, String, String)> = loc
        .db
        .read(|c| {
            let mut st = c.prepare("SELECT id, role, server, state FROM pairs ORDER BY id")?;
            let v = st
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(v)
        })
        .await?;
    out.push_str("# HELP cairn_pair_state State of each DR pair on this location's side (1 for its current state).\n# TYPE cairn_pair_state gauge\n");
    for (id, role, server, state) in &pairs {
        for s in [
            PairState::StartReplication,
            PairState::Replicating,
            PairState::Paused,
            PairState::Failed,
            PairState::FailedOver,
        ] {
            let _ = writeln!(
                out,
                "cairn_pair_state{{pair=\"{id}\",role=\"{role}\",server=\"{}\",state=\"{}\"}} {}",
                esc(server),
                s.as_str(),
                u8::from(state == s.as_str())
            );
        }
    }
    let nbd = cairn_nbd::stats::stats();
    let _ = writeln!(
        out,
        "# HELP cairn_nbd_connections NBD connections open now.\n# TYPE cairn_nbd_connections gauge\ncairn_nbd_connections {}\n# HELP cairn_nbd_connections_total NBD connections accepted.\n# TYPE cairn_nbd_connections_total counter\ncairn_nbd_connections_total {}\n# HELP cairn_nbd_read_bytes_total Bytes read by NBD clients.\n# TYPE cairn_nbd_read_bytes_total counter\ncairn_nbd_read_bytes_total {}\n# HELP cairn_nbd_written_bytes_total Bytes written by NBD clients.\n# TYPE cairn_nbd_written_bytes_total counter\ncairn_nbd_written_bytes_total {}\n# HELP cairn_nbd_requests_total NBD requests served.\n# TYPE cairn_nbd_requests_total counter\ncairn_nbd_requests_total {}",
        nbd.connections_open,
        nbd.connections_total,
        nbd.bytes_read,
        nbd.bytes_written,
        nbd.requests
    );
    let _ = writeln!(
        out,
        "# HELP cairn_api_requests_total HTTP API requests.\n# TYPE cairn_api_requests_total counter\ncairn_api_requests_total {}",
        loc.counters.api_requests.load(Ordering::Relaxed)
    );
    Ok(out)
}
