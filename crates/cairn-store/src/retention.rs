//! Retention: which recovery points a `--keep-*` policy keeps, as a plan computed before
//! anything is deleted. Pure logic, no I/O.
//!
//! Rules (those of restic and borg, which operators know), applied to each server's
//! points separately (points of loose images, without a server, form one group), so a
//! server that is backed up less often never loses its points to another's:
//! - the newest point is always kept;
//! - `keep_last N` keeps the N newest points;
//! - `keep_hourly/daily/weekly/monthly N` keep the newest point of each of the N newest
//!   hours/days/ISO weeks/months (UTC) that have a point;
//! - `keep_within D` keeps every point taken within D of the newest point (not of "now":
//!   if replication stops, retention never eats the last good points).

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Datelike, Timelike, Utc};

use cairn_format::id::PointId;

use crate::error::SpaceError;

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RetentionPolicy {
    pub keep_last: Option<u32>,
    pub keep_hourly: Option<u32>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
    #[serde(with = "humantime_serde_opt", default)]
    pub keep_within: Option<Duration>,
}

mod humantime_serde_opt {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.as_secs()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        let v: Option<u64> = serde::Deserialize::deserialize(d)?;
        Ok(v.map(Duration::from_secs))
    }
}

impl RetentionPolicy {
    pub fn is_empty(&self) -> bool {
        *self == RetentionPolicy::default()
    }
}

/// One point of a plan, with why it is kept.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PlannedPoint {
    pub id: PointId,
    pub server: Option<String>,
    pub snapshot_at: DateTime<Utc>,
    pub reasons: Vec<String>,
}

/// A point as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: PointId,
    pub server: Option<String>,
    pub snapshot_at: DateTime<Utc>,
}

/// What a retention policy keeps and removes.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PrunePlan {
    pub keep: Vec<PlannedPoint>,
    pub remove: Vec<PlannedPoint>,
}

type Bucket = fn(&DateTime<Utc>) -> (i32, u32, u32, u32);

/// Computes the plan, server by server.
pub fn plan(points: &[Candidate], policy: &RetentionPolicy) -> Result<PrunePlan, SpaceError> {
    if policy.is_empty() {
        return Err(SpaceError::EmptyRetention);
    }
    let mut groups: BTreeMap<Option<String>, Vec<(PointId, DateTime<Utc>)>> = BTreeMap::new();
    for p in points {
        groups
            .entry(p.server.clone())
            .or_default()
            .push((p.id, p.snapshot_at));
    }
    let mut out = PrunePlan::default();
    for (server, group) in groups {
        let (keep, remove) = plan_group(&group, policy);
        let with_server = |(id, snapshot_at, reasons)| PlannedPoint {
            id,
            server: server.clone(),
            snapshot_at,
            reasons,
        };
        out.keep.extend(keep.into_iter().map(with_server));
        out.remove.extend(remove.into_iter().map(with_server));
    }
    Ok(out)
}

type Planned = (PointId, DateTime<Utc>, Vec<String>);

/// The plan of one server's points: (kept with reasons, removed).
fn plan_group(
    points: &[(PointId, DateTime<Utc>)],
    policy: &RetentionPolicy,
) -> (Vec<Planned>, Vec<Planned>) {
    let mut sorted: Vec<(PointId, DateTime<Utc>)> = points.to_vec();
    sorted.sort_by(|a, b| b.1.cmp(&a.1).then(b.0.cmp(&a.0)));
    let mut reasons: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    if sorted.is_empty() {
        return (Vec::new(), Vec::new());
    }
    reasons.entry(0).or_default().push("newest".into());
    if let Some(n) = policy.keep_last {
        for i in 0..sorted.len().min(n as usize) {
            reasons.entry(i).or_default().push("last".into());
        }
    }
    let buckets: [(&str, Option<u32>, Bucket); 4] = [
        ("hourly", policy.keep_hourly, |t| {
            (t.year(), t.month(), t.day(), t.hour())
        }),
        ("daily", policy.keep_daily, |t| {
            (t.year(), t.month(), t.day(), 0)
        }),
        ("weekly", policy.keep_weekly, |t| {
            let w = t.iso_week();
            (w.year(), w.week(), 0, 0)
        }),
        ("monthly", policy.keep_monthly, |t| {
            (t.year(), t.month(), 0, 0)
        }),
    ];
    for (name, count, bucket) in buckets {
        let Some(count) = count else { continue };
        let mut last = None;
        let mut kept = 0;
        for (i, (_, t)) in sorted.iter().enumerate() {
            if kept >= count {
                break;
            }
            let b = bucket(t);
            if last != Some(b) {
                last = Some(b);
                kept += 1;
                reasons.entry(i).or_default().push(name.into());
            }
        }
    }
    if let Some(within) = policy.keep_within {
        let newest = sorted[0].1;
        let cutoff = chrono::Duration::from_std(within)
            .ok()
            .and_then(|d| newest.checked_sub_signed(d))
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        for (i, (_, t)) in sorted.iter().enumerate() {
            if *t >= cutoff {
                reasons.entry(i).or_default().push("within".into());
            }
        }
    }
    let (mut keep, mut remove) = (Vec::new(), Vec::new());
    for (i, (id, t)) in sorted.into_iter().enumerate() {
        let why = reasons.remove(&i).unwrap_or_default();
        if why.is_empty() {
            remove.push((id, t, why));
        } else {
            keep.push((id, t, why));
        }
    }
    (keep, remove)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(d: u32, h: u32) -> Candidate {
        Candidate {
            id: uuid::Uuid::now_v7(),
            server: None,
            snapshot_at: Utc.with_ymd_and_hms(2026, 3, d, h, 0, 0).unwrap(),
        }
    }

    #[test]
    fn empty_policy_is_refused() {
        assert!(matches!(
            plan(&[at(1, 1)], &RetentionPolicy::default()),
            Err(SpaceError::EmptyRetention)
        ));
    }

    #[test]
    fn keeps_newest_and_last_and_daily() {
        let pts: Vec<_> = (1..=5).flat_map(|d| [at(d, 1), at(d, 13)]).collect();
        let p = plan(
            &pts,
            &RetentionPolicy {
                keep_last: Some(1),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(p.keep.len(), 1);
        assert_eq!(p.remove.len(), 9);
        let p = plan(
            &pts,
            &RetentionPolicy {
                keep_daily: Some(3),
                ..Default::default()
            },
        )
        .unwrap();
        let kept: Vec<_> = p.keep.iter().map(|k| k.snapshot_at).collect();
        assert_eq!(
            kept,
            vec![pts[9].snapshot_at, pts[7].snapshot_at, pts[5].snapshot_at]
        );
        let p = plan(
            &pts,
            &RetentionPolicy {
                keep_within: Some(Duration::from_secs(36 * 3600)),
                ..Default::default()
            },
        )
        .unwrap();
        // day 5 13:00 and 01:00, day 4 13:00, and day 4 01:00 (exactly 36 h older)
        assert_eq!(p.keep.len(), 4);
        // Absurd durations do not overflow.
        let p = plan(
            &pts,
            &RetentionPolicy {
                keep_within: Some(Duration::from_secs(u64::MAX / 2)),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(p.keep.len(), 10);
    }

    #[test]
    fn each_server_keeps_its_own_points() {
        // web backs up hourly, db once, long ago: keep-last 2 keeps db's only point.
        let mut pts: Vec<Candidate> = (1..=5)
            .map(|h| Candidate {
                server: Some("web".into()),
                ..at(20, h)
            })
            .collect();
        let db = Candidate {
            server: Some("db".into()),
            ..at(1, 1)
        };
        pts.push(db.clone());
        let p = plan(
            &pts,
            &RetentionPolicy {
                keep_last: Some(2),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(p.keep.len(), 3);
        assert!(p.keep.iter().any(|k| k.id == db.id));
        assert!(p.remove.iter().all(|r| r.server.as_deref() == Some("web")));
    }
}
