//! The scheduler on a clock the test moves by hand (`ManualClock`): no test sleeps for a
//! guessed time. Effects of the scheduler are awaited by polling the database with a
//! bounded retry loop.
//!
//! A `Location` is built in process as `cairn serve` builds it (`prepare_pool`, `Db::open`,
//! `Host::open`, `Location::new`), on a fresh data directory.

use std::sync::Arc;
use std::time::Duration;

use cairn_daemon::config::{Config, ServeArgs};
use cairn_daemon::db::Db;
use cairn_daemon::location::{JobFilter, Location};
use cairn_daemon::model::*;
use cairn_daemon::schedule::{Clock, ManualClock};
use cairn_volume::host::Host;
use chrono::{DateTime, Utc};

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn mins(n: u64) -> Duration {
    Duration::from_secs(60 * n)
}

struct Rig {
    tmp: tempfile::TempDir,
    config: Config,
    clock: Arc<ManualClock>,
    loc: Arc<Location>,
    sched: Option<tokio::task::JoinHandle<()>>,
}

impl Rig {
    /// A location with server `web` (one 1 MiB disk, holding data) whose pre-hook waits
    /// for the gate file when the file `hold` exists; the clock at `start`.
    async fn new(start: &str) -> Rig {
        let tmp = tempfile::tempdir().unwrap();
        let config = Config::load(&ServeArgs {
            data_dir: Some(tmp.path().join("d")),
            nbd_listen: Some("none".into()),
            shutdown_grace: Some(Duration::from_millis(200)),
            ..Default::default()
        })
        .unwrap();
        cairn_daemon::prepare_pool(&config).await.unwrap();
        let clock = Arc::new(ManualClock::new(at(start)));
        let loc = open(&config, &clock).await;
        let hook = format!(
            "if [ -e '{hold}' ]; then while [ ! -e '{gate}' ]; do sleep 0.02; done; fi",
            hold = tmp.path().join("hold").display(),
            gate = tmp.path().join("gate").display()
        );
        let pool = loc.host.pool();
        pool.create_server("web", Some(hook), None).unwrap();
        cairn_volume::host::create_disk(pool, "web", "root", 1 << 20).unwrap();
        let disk = tmp.path().join("d/pool/servers/web/disks/root.raw");
        std::fs::write(&disk, vec![0x5au8; 1 << 20]).unwrap();
        Rig {
            tmp,
            config,
            clock,
            loc,
            sched: None,
        }
    }

    fn start_scheduler(&mut self) {
        self.sched = Some(tokio::spawn(self.loc.clone().scheduler()));
    }

    /// Stops the scheduler and opens the location again on the same data directory (a
    /// daemon restart, on the same clock).
    async fn restart(&mut self) {
        if let Some(s) = self.sched.take() {
            s.abort();
            let _ = s.await;
        }
        self.loc = open(&self.config, &self.clock).await;
        self.loc.recover_interrupted().await.unwrap();
        self.start_scheduler();
    }

    /// Jobs from now on hold in the pre-hook until [`Rig::release`].
    fn hold(&self) {
        let _ = std::fs::remove_file(self.tmp.path().join("gate"));
        std::fs::write(self.tmp.path().join("hold"), b"").unwrap();
    }

    fn release(&self) {
        std::fs::write(self.tmp.path().join("gate"), b"").unwrap();
    }

    fn advance(&self, d: Duration) {
        self.clock.advance(d);
    }

    fn advance_to(&self, t: &str) {
        let now = self.clock.now();
        self.clock.advance((at(t) - now).to_std().unwrap());
    }

    async fn policy(&self, name: &str, schedule: ScheduleSpec, enabled: bool) -> Policy {
        self.loc
            .create_policy(PolicySpec {
                name: name.into(),
                description: String::new(),
                schedule,
                scope: vec!["web".into()],
                space: "local".into(),
                retention: RetentionSpec::default(),
                enabled,
            })
            .await
            .unwrap()
    }

    /// The policy's jobs, oldest first.
    async fn jobs(&self, policy: &str) -> Vec<Job> {
        let mut v = self
            .loc
            .list_jobs(&JobFilter {
                policy: Some(policy.into()),
                limit: 10_000,
                ..Default::default()
            })
            .await
            .unwrap()
            .items;
        v.reverse();
        v
    }

    /// Polls (bounded) until the policy's jobs satisfy `pred`; returns them.
    async fn wait_jobs(&self, policy: &str, pred: impl Fn(&[Job]) -> bool) -> Vec<Job> {
        for _ in 0..3000 {
            let j = self.jobs(policy).await;
            if pred(&j) {
                return j;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "policy {policy}: jobs never as expected: {:#?}",
            self.jobs(policy).await
        );
    }

    /// Waits until the policy has `n` jobs, all ended.
    async fn wait_ended(&self, policy: &str, n: usize) -> Vec<Job> {
        self.wait_jobs(policy, |j| {
            j.len() == n && j.iter().all(|j| j.state.is_final())
        })
        .await
    }

    async fn status(&self, policy: &str) -> ProtectionStatus {
        self.loc.get_policy(policy).await.unwrap().status
    }

    /// Polls (bounded) until the scheduler knows the policy's next due time is `t`.
    async fn wait_next_run(&self, policy: &str, t: &str) {
        for _ in 0..3000 {
            let p = self.loc.get_policy(policy).await.unwrap();
            if p.next_run_at.as_deref() == Some(t) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "policy {policy}: next run never {t}: {:?}",
            self.loc.get_policy(policy).await.unwrap()
        );
    }
}

async fn open(config: &Config, clock: &Arc<ManualClock>) -> Arc<Location> {
    let db = Db::open(&config.db_path()).unwrap();
    let host = Host::open(&config.pool_path()).await.unwrap();
    let clock: Arc<dyn Clock> = clock.clone();
    Location::new(config.clone(), db, host, clock)
}

fn cron(expr: &str, tz: &str) -> ScheduleSpec {
    ScheduleSpec {
        cron: Some(expr.into()),
        timezone: Some(tz.into()),
        interval: None,
    }
}

fn every(i: &str) -> ScheduleSpec {
    ScheduleSpec {
        cron: None,
        timezone: None,
        interval: Some(i.into()),
    }
}

fn due(j: &Job) -> &str {
    j.due_at.as_deref().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cron_in_a_time_zone_fires_at_its_due_times() {
    let mut r = Rig::new("2026-11-23T00:30:00Z").await;
    // 02:00 in Amsterdam is 01:00 UTC in winter.
    r.policy("nightly", cron("0 2 * * *", "Europe/Amsterdam"), true)
        .await;
    r.start_scheduler();
    r.wait_next_run("nightly", "2026-11-23T01:00:00.000Z").await;
    r.advance_to("2026-11-23T00:59:59Z");
    r.advance_to("2026-11-23T01:00:00Z");
    let jobs = r.wait_ended("nightly", 1).await;
    let j = &jobs[0];
    assert_eq!(due(j), "2026-11-23T01:00:00.000Z");
    assert_eq!(j.trigger, "schedule");
    assert_eq!(j.operator, "scheduler");
    assert_eq!(j.state, JobState::Succeeded, "{j:?}");
    assert_eq!(j.started_at.as_deref(), Some("2026-11-23T01:00:00.000Z"));
    assert_eq!(r.status("nightly").await, ProtectionStatus::Protected);
    r.wait_next_run("nightly", "2026-11-24T01:00:00.000Z").await;
    // A day later, the next one; nothing in between.
    r.advance(Duration::from_secs(86400));
    let jobs = r.wait_ended("nightly", 2).await;
    assert_eq!(due(&jobs[1]), "2026-11-24T01:00:00.000Z");
    assert_eq!(jobs[1].state, JobState::Succeeded);
    // The clock jumps months (a suspended host): the missed nights fire once, not once
    // each; in summer the same expression is 00:00 UTC.
    r.advance_to("2027-07-01T12:00:00Z");
    r.wait_ended("nightly", 3).await;
    r.wait_next_run("nightly", "2027-07-02T00:00:00.000Z").await;
    r.advance_to("2027-07-02T00:00:00Z");
    let jobs = r.wait_ended("nightly", 4).await;
    assert_eq!(due(&jobs[3]), "2027-07-02T00:00:00.000Z", "{jobs:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intervals_fire_one_period_after_the_policy_was_made() {
    let mut r = Rig::new("2026-11-23T00:00:00Z").await;
    r.start_scheduler();
    r.policy("often", every("10m"), true).await;
    r.wait_next_run("often", "2026-11-23T00:10:00.000Z").await;
    r.advance(mins(10));
    let jobs = r.wait_ended("often", 1).await;
    // Creating the policy ran nothing: the first job is the one due a period later.
    assert_eq!(due(&jobs[0]), "2026-11-23T00:10:00.000Z", "{jobs:#?}");
    assert_eq!(jobs[0].state, JobState::Succeeded);
    r.advance(mins(10));
    let jobs = r.wait_ended("often", 2).await;
    assert_eq!(due(&jobs[1]), "2026-11-23T00:20:00.000Z");
    // A change (here, its description) re-anchors the interval and runs nothing.
    r.advance(mins(5));
    r.loc
        .update_policy(
            "often",
            PolicyPatch {
                description: Some("every ten minutes".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    r.wait_next_run("often", "2026-11-23T00:35:00.000Z").await;
    r.advance(mins(10));
    let jobs = r.wait_ended("often", 3).await;
    assert_eq!(due(&jobs[2]), "2026-11-23T00:35:00.000Z", "{jobs:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_policy_does_not_run() {
    let mut r = Rig::new("2026-11-23T00:00:00Z").await;
    r.start_scheduler();
    r.policy("paused", every("10m"), false).await;
    r.policy("active", every("10m"), true).await;
    assert_eq!(r.status("paused").await, ProtectionStatus::Paused);
    assert!(
        r.loc
            .get_policy("paused")
            .await
            .unwrap()
            .next_run_at
            .is_none()
    );
    for n in 1..=3 {
        r.advance(mins(10));
        // `active` ran at this time: the scheduler has been past it.
        r.wait_ended("active", n).await;
    }
    assert!(r.jobs("paused").await.is_empty());
    assert_eq!(r.status("paused").await, ProtectionStatus::Paused);
    // Resumed: the periods missed while paused do not fire; the next one does.
    r.loc.set_enabled("paused", true).await.unwrap();
    r.wait_next_run("paused", "2026-11-23T00:40:00.000Z").await;
    r.advance(mins(10));
    let jobs = r.wait_ended("paused", 1).await;
    assert_eq!(due(&jobs[0]), "2026-11-23T00:40:00.000Z");
    // Paused again while "replicate now" still works.
    r.loc.set_enabled("paused", false).await.unwrap();
    let row = r.loc.policy_row("paused").await.unwrap();
    let out = r
        .loc
        .start_replication(&row, "manual", "ops", None)
        .await
        .unwrap();
    assert!(!out.skipped);
    // (30 minutes at once: `active` fires once for them.)
    r.advance(mins(30));
    r.wait_ended("active", 5).await;
    let jobs = r.wait_ended("paused", 2).await;
    assert_eq!(jobs[1].trigger, "manual");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_due_time_missed_while_down_fires_once() {
    let mut r = Rig::new("2026-11-23T00:00:00Z").await;
    r.start_scheduler();
    r.policy("hourly", every("1h"), true).await;
    r.policy("nightly", cron("0 2 * * *", "UTC"), true).await;
    r.advance(mins(60));
    r.wait_ended("hourly", 1).await;
    // Down from 01:00 to 04:30 (three hourly runs and the nightly one missed).
    let s = r.sched.take().unwrap();
    s.abort();
    let _ = s.await;
    r.advance_to("2026-11-23T04:30:00Z");
    r.restart().await;
    let hourly = r.wait_ended("hourly", 2).await;
    assert_eq!(due(&hourly[1]), "2026-11-23T04:00:00.000Z", "{hourly:#?}");
    assert_eq!(
        hourly[1].started_at.as_deref(),
        Some("2026-11-23T04:30:00.000Z")
    );
    let nightly = r.wait_ended("nightly", 1).await;
    assert_eq!(due(&nightly[0]), "2026-11-23T02:00:00.000Z");
    r.wait_next_run("hourly", "2026-11-23T05:00:00.000Z").await;
    r.wait_next_run("nightly", "2026-11-24T02:00:00.000Z").await;
    // Once: the next is the next period's.
    r.advance(mins(30));
    let hourly = r.wait_ended("hourly", 3).await;
    assert_eq!(due(&hourly[2]), "2026-11-23T05:00:00.000Z");
    assert_eq!(r.jobs("nightly").await.len(), 1);
    // A restart with nothing missed fires nothing.
    r.restart().await;
    r.wait_next_run("hourly", "2026-11-23T06:00:00.000Z").await;
    r.advance(mins(60));
    let hourly = r.wait_ended("hourly", 4).await;
    assert_eq!(due(&hourly[3]), "2026-11-23T06:00:00.000Z", "{hourly:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_run_while_a_job_runs_is_skipped_and_late_is_reported() {
    let mut r = Rig::new("2026-11-23T00:00:00Z").await;
    r.start_scheduler();
    r.policy("p", every("10m"), true).await;
    r.advance(mins(10));
    let first = r.wait_ended("p", 1).await;
    assert_eq!(first[0].state, JobState::Succeeded);
    assert_eq!(r.status("p").await, ProtectionStatus::Protected);

    // The next job hangs in the pre-hook.
    r.hold();
    r.advance(mins(10));
    let jobs = r
        .wait_jobs("p", |j| j.len() == 2 && j[1].state == JobState::Running)
        .await;
    let stuck = jobs[1].id.clone();
    assert_eq!(
        r.loc.get_policy("p").await.unwrap().running_job.as_deref(),
        Some(stuck.as_str())
    );
    // Its next due time comes while it runs: recorded skipped, naming it.
    r.advance(mins(10));
    let jobs = r.wait_jobs("p", |j| j.len() == 3).await;
    let skipped = &jobs[2];
    assert_eq!(skipped.state, JobState::Skipped, "{skipped:?}");
    assert_eq!(skipped.skipped_for.as_deref(), Some(stuck.as_str()));
    assert_eq!(skipped.trigger, "schedule");
    assert_eq!(due(skipped), "2026-11-23T00:30:00.000Z");
    assert!(!skipped.restorable);
    // 00:35: the newest success (00:10) is 25 min old, more than twice the period.
    assert_eq!(r.status("p").await, ProtectionStatus::Protected);
    r.advance(mins(5));
    assert_eq!(r.status("p").await, ProtectionStatus::Late);
    let text = cairn_daemon::metrics::render(&r.loc).await.unwrap();
    assert!(
        text.contains("cairn_policy_rpo_late{policy=\"p\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("cairn_policy_status{policy=\"p\",status=\"late\"} 1"),
        "{text}"
    );
    // The stuck job ends: protected again (its point is from 00:20, 15 min ago).
    r.release();
    let jobs = r
        .wait_jobs("p", |j| j[1].state == JobState::Succeeded)
        .await;
    assert_eq!(jobs.len(), 3);
    assert_eq!(r.status("p").await, ProtectionStatus::Protected);
    let text = cairn_daemon::metrics::render(&r.loc).await.unwrap();
    assert!(
        text.contains("cairn_policy_rpo_late{policy=\"p\"} 0"),
        "{text}"
    );
    // Late without any job running: time passes with the scheduler down.
    let s = r.sched.take().unwrap();
    s.abort();
    let _ = s.await;
    r.advance(mins(21));
    assert_eq!(r.status("p").await, ProtectionStatus::Late);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_removes_what_an_aborted_job_committed() {
    // In process, the same as SIGTERM with a short grace: a job of two servers has
    // committed the first and waits in the second's hook when the grace time ends.
    let r = Rig::new("2026-11-23T00:00:00Z").await;
    let pool = r.loc.host.pool();
    pool.create_server("app", None, None).unwrap();
    cairn_volume::host::create_disk(pool, "app", "root", 1 << 20).unwrap();
    std::fs::write(
        r.tmp.path().join("d/pool/servers/app/disks/root.raw"),
        vec![7u8; 1 << 20],
    )
    .unwrap();
    let p = r
        .loc
        .create_policy(PolicySpec {
            name: "both".into(),
            description: String::new(),
            schedule: every("1h"),
            scope: vec!["app".into(), "web".into()],
            space: "local".into(),
            retention: RetentionSpec::default(),
            enabled: true,
        })
        .await
        .unwrap();
    r.hold();
    let row = r.loc.policy_row(&p.id).await.unwrap();
    let job = r
        .loc
        .start_replication(&row, "manual", "ops", None)
        .await
        .unwrap()
        .job;
    let space = r.loc.host.space().unwrap().clone();
    let mine = |pts: &[cairn_format::record::PointRecord]| {
        pts.iter()
            .filter(|p| p.trigger.ends_with(&format!("job {}", job.id)))
            .count()
    };
    for i in 0.. {
        if mine(&space.list_points().await.unwrap()) == 1 {
            break;
        }
        assert!(i < 3000, "app's point never appeared");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    r.loc.shutdown().await;
    assert_eq!(mine(&space.list_points().await.unwrap()), 0);
    let j = r.loc.get_job(&job.id).await.unwrap();
    assert_eq!(j.state, JobState::Failed);
    assert!(j.error.unwrap().starts_with("interrupted by shutdown"));
}
