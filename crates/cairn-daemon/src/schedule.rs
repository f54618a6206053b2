//! Schedules (a cron expression in a time zone, or a fixed interval) and the clock the
//! scheduler runs on. The clock is a trait so that tests drive time by hand instead of
//! sleeping.

use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use croner::Cron;
use croner::parser::{CronParser, Seconds};
use tokio::sync::watch;

/// A parsed schedule.
#[derive(Debug, Clone)]
pub enum Schedule {
    Cron { cron: Box<Cron>, tz: chrono_tz::Tz },
    Every(Duration),
}

/// The shortest interval a policy may run at.
pub const MIN_INTERVAL: Duration = Duration::from_secs(10);

impl Schedule {
    /// Parses a cron expression (5 fields, or 6 with seconds first) in an IANA time zone.
    pub fn cron(expr: &str, timezone: &str) -> Result<Schedule, String> {
        let tz: chrono_tz::Tz = timezone.parse().map_err(|_| {
            format!(
                "unknown time zone {timezone:?} (use an IANA name like UTC or Europe/Amsterdam)"
            )
        })?;
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .build()
            .parse(expr)
            .map_err(|e| format!("bad cron expression {expr:?}: {e}"))?;
        // An expression that never fires (e.g. 30 February) is refused too.
        let s = Schedule::Cron {
            cron: Box::new(cron),
            tz,
        };
        if s.next_after(Utc::now(), Utc::now()).is_none() {
            return Err(format!("cron expression {expr:?} never fires"));
        }
        Ok(s)
    }

    /// Parses an interval like `15m` or `1h 30m`.
    pub fn every(text: &str) -> Result<Schedule, String> {
        let d = humantime::parse_duration(text)
            .map_err(|e| format!("bad interval {text:?}: {e} (e.g. 15m, 1h, 1d)"))?;
        if d < MIN_INTERVAL {
            return Err(format!(
                "interval {text:?} is shorter than the minimum of {}",
                humantime::format_duration(MIN_INTERVAL)
            ));
        }
        Ok(Schedule::Every(d))
    }

    /// The first due time strictly after `t`. Intervals count from `anchor` (the policy's
    /// creation or last change), so restarts do not shift them.
    pub fn next_after(&self, t: DateTime<Utc>, anchor: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Schedule::Cron { cron, tz } => cron
                .find_next_occurrence(&t.with_timezone(tz), false)
                .ok()
                .map(|d| d.with_timezone(&Utc)),
            Schedule::Every(d) => {
                let step = chrono::Duration::from_std(*d).ok()?;
                if t < anchor {
                    return Some(anchor);
                }
                let elapsed = (t - anchor).num_milliseconds();
                let step_ms = step.num_milliseconds().max(1);
                let k = elapsed / step_ms + 1;
                Some(anchor + chrono::Duration::milliseconds(k * step_ms))
            }
        }
    }

    /// The last due time at or before `t` (None before the first one).
    pub fn prev_at_or_before(
        &self,
        t: DateTime<Utc>,
        anchor: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        match self {
            Schedule::Cron { cron, tz } => cron
                .find_previous_occurrence(&t.with_timezone(tz), true)
                .ok()
                .map(|d| d.with_timezone(&Utc)),
            Schedule::Every(d) => {
                if t < anchor {
                    return None;
                }
                let step_ms = i64::try_from(d.as_millis()).ok()?.max(1);
                let k = (t - anchor).num_milliseconds() / step_ms;
                Some(anchor + chrono::Duration::milliseconds(k * step_ms))
            }
        }
    }

    /// The time between two runs around `t` (for a cron expression, the gap between the
    /// next two occurrences): what "late" is measured against.
    pub fn period(&self, t: DateTime<Utc>) -> Duration {
        match self {
            Schedule::Every(d) => *d,
            Schedule::Cron { .. } => {
                let a = self.next_after(t, t);
                let b = a.and_then(|a| self.next_after(a, a));
                match (a, b) {
                    (Some(a), Some(b)) => (b - a).to_std().unwrap_or(Duration::from_secs(86400)),
                    _ => Duration::from_secs(86400),
                }
            }
        }
    }
}

/// Where the scheduler gets the time from.
#[async_trait::async_trait]
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;
    /// Returns at `t` or later (or earlier, when `wake` changes: the caller re-plans).
    async fn sleep_until(&self, t: DateTime<Utc>);
}

/// The system clock. Sleeps at most a minute at a time, so a wall-clock jump is noticed.
pub struct SystemClock;

#[async_trait::async_trait]
impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    async fn sleep_until(&self, t: DateTime<Utc>) {
        let d = (t - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        tokio::time::sleep(d.min(Duration::from_secs(60))).await;
    }
}

/// A clock that only moves when told to (tests).
pub struct ManualClock {
    now: Mutex<DateTime<Utc>>,
    tick: watch::Sender<DateTime<Utc>>,
}

impl ManualClock {
    pub fn new(start: DateTime<Utc>) -> ManualClock {
        ManualClock {
            now: Mutex::new(start),
            tick: watch::channel(start).0,
        }
    }

    /// Moves the time forward by `d`.
    pub fn advance(&self, d: Duration) {
        let mut n = self.now.lock().expect("poisoned");
        *n += chrono::Duration::from_std(d).expect("small duration");
        self.tick.send_replace(*n);
    }

    pub fn set(&self, t: DateTime<Utc>) {
        *self.now.lock().expect("poisoned") = t;
        self.tick.send_replace(t);
    }
}

#[async_trait::async_trait]
impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.now.lock().expect("poisoned")
    }

    async fn sleep_until(&self, t: DateTime<Utc>) {
        let mut rx = self.tick.subscribe();
        let _ = rx.wait_for(|now| *now >= t).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn cron_in_a_time_zone() {
        let s = Schedule::cron("0 2 * * *", "Europe/Amsterdam").unwrap();
        // 02:00 in Amsterdam in November is 01:00 UTC.
        let n = s
            .next_after(at("2026-11-23T05:00:00Z"), at("2026-01-01T00:00:00Z"))
            .unwrap();
        assert_eq!(n, at("2026-11-24T01:00:00Z"));
        assert_eq!(
            s.period(at("2026-11-23T05:00:00Z")),
            Duration::from_secs(86400)
        );
    }

    #[test]
    fn bad_cron_and_zone_are_named() {
        let e = Schedule::cron("0 25 * * *", "UTC").unwrap_err();
        assert!(e.contains("bad cron expression \"0 25 * * *\""), "{e}");
        let e = Schedule::cron("0 2 * * *", "Mars/Olympus").unwrap_err();
        assert!(e.contains("unknown time zone"), "{e}");
    }

    #[test]
    fn intervals_count_from_the_anchor() {
        let s = Schedule::every("15m").unwrap();
        let anchor = at("2026-11-23T00:00:10Z");
        assert_eq!(
            s.next_after(at("2026-11-23T00:20:00Z"), anchor).unwrap(),
            at("2026-11-23T00:30:10Z")
        );
        assert_eq!(
            s.next_after(at("2026-11-23T00:30:10Z"), anchor).unwrap(),
            at("2026-11-23T00:45:10Z")
        );
        assert_eq!(
            s.prev_at_or_before(at("2026-11-23T00:30:10Z"), anchor)
                .unwrap(),
            at("2026-11-23T00:30:10Z")
        );
        assert_eq!(
            s.prev_at_or_before(at("2026-11-23T00:44:00Z"), anchor)
                .unwrap(),
            at("2026-11-23T00:30:10Z")
        );
        assert!(
            s.prev_at_or_before(at("2026-11-23T00:00:00Z"), anchor)
                .is_none()
        );
        let c = Schedule::cron("0 2 * * *", "UTC").unwrap();
        assert_eq!(
            c.prev_at_or_before(at("2026-11-23T05:00:00Z"), anchor)
                .unwrap(),
            at("2026-11-23T02:00:00Z")
        );
        assert!(Schedule::every("1s").is_err());
        assert!(Schedule::every("soon").is_err());
    }

    #[tokio::test]
    async fn manual_clock_wakes_sleepers() {
        let c = std::sync::Arc::new(ManualClock::new(at("2026-11-23T00:00:00Z")));
        let c2 = c.clone();
        let h = tokio::spawn(async move { c2.sleep_until(at("2026-11-23T00:01:00Z")).await });
        tokio::task::yield_now().await;
        assert!(!h.is_finished());
        c.advance(Duration::from_secs(60));
        h.await.unwrap();
    }
}
