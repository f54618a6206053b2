//! Jobs against the real process: "Replicate now" racing a running job, a failed job
//! and the protection status, SIGKILL and SIGTERM during a job.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::*;

/// The jobs of a policy (all of them, newest first).
async fn jobs_of(api: &Api, policy: &str) -> Vec<Value> {
    let v = api
        .ok(&format!("/api/v1/jobs?policy={policy}&limit=1000"))
        .await;
    assert!(v["next_cursor"].is_null());
    v["items"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicate_now_races_a_running_job() {
    let d = Daemon::start(&[]).await;
    let api = d.as_role("ops", "operator");
    let admin = d.as_role("boss", "admin");
    let gate = d.gate("race");
    admin.server("web", Some(&gate_hook(&gate))).await;
    admin.disk("web/root", 8 * MIB).await;
    fill_disk_file(&d.data, "web", "root", 0, 4 * MIB, 0x42);
    admin
        .policy("p", &["web"], json!({"cron": "0 2 * * *"}))
        .await;

    // 24 requests at once: exactly one runs; every other one is recorded skipped, naming
    // the one that runs.
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..24 {
        let a = api.with_token(api.token.as_deref().unwrap());
        set.spawn(async move { a.replicate("p").await });
    }
    let mut outcomes = Vec::new();
    while let Some(r) = set.join_next().await {
        outcomes.push(r.unwrap());
    }
    let ran: Vec<&Value> = outcomes.iter().filter(|o| o["skipped"] == false).collect();
    assert_eq!(ran.len(), 1, "{outcomes:#?}");
    let running = ran[0]["job"]["id"].as_str().unwrap().to_string();
    for o in outcomes.iter().filter(|o| o["skipped"] == true) {
        assert_eq!(o["job"]["state"], "skipped", "{o}");
        assert_eq!(o["job"]["skipped_for"], running.as_str(), "{o}");
        let m = o["message"].as_str().unwrap();
        assert!(m.starts_with("skipped"), "{m}");
        assert!(m.contains(&running), "{m}");
    }
    // The records say the same (the gate is still closed: the job is still running).
    let jobs = jobs_of(&api, "p").await;
    assert_eq!(jobs.len(), 24);
    let skipped: Vec<&Value> = jobs.iter().filter(|j| j["state"] == "skipped").collect();
    assert_eq!(skipped.len(), 23, "{jobs:#?}");
    assert!(skipped.iter().all(|j| j["skipped_for"] == running.as_str()
        && j["operator"] == "ops"
        && j["restorable"] == false));
    let live: Vec<&Value> = jobs.iter().filter(|j| j["state"] != "skipped").collect();
    assert_eq!(live.len(), 1);
    assert_eq!(live[0]["id"], running.as_str());
    assert!(
        matches!(live[0]["state"].as_str(), Some("queued" | "running")),
        "{}",
        live[0]
    );
    let p = api.ok("/api/v1/policies/p").await;
    assert_eq!(p["running_job"], running.as_str(), "{p}");

    // One more, one at a time, while it still runs: skipped too.
    let again = api.replicate("p").await;
    assert_eq!(again["skipped"], true, "{again}");
    assert_eq!(again["job"]["skipped_for"], running.as_str());

    open_gate(&gate);
    let j = api.wait_job(&running).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(d.space_points().len(), 1);
    // Skipped records are points of the list too, but never restorable.
    let (s, v) = api
        .post(
            &format!(
                "/api/v1/points/{}/clone",
                skipped[0]["id"].as_str().unwrap()
            ),
            json!({"disk": "web/root", "to": "x/root"}),
        )
        .await;
    assert_error(&(s, v), 422, "unprocessable");
    // Once it has ended, the next request runs.
    let next = api.replicate_wait("p").await;
    assert_eq!(next["state"], "succeeded", "{next}");
    assert_eq!(api.policy_status("p").await, "protected");
}

/// Makes the space refuse new chunks: its `chunks` folder becomes a file (chmod would
/// not stop root). Returns the path the folder was moved to.
fn break_space(d: &Daemon) -> std::path::PathBuf {
    let chunks = d.space().join("chunks");
    let moved = d.space().join("chunks.moved");
    std::fs::create_dir_all(&chunks).unwrap();
    std::fs::rename(&chunks, &moved).unwrap();
    std::fs::write(&chunks, b"not a folder").unwrap();
    moved
}

fn mend_space(d: &Daemon, moved: &std::path::Path) {
    let chunks = d.space().join("chunks");
    std::fs::remove_file(&chunks).unwrap();
    std::fs::rename(moved, &chunks).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_job_turns_the_policy_failed_and_a_success_protected() {
    let d = Daemon::start(&[]).await;
    let api = d.as_role("boss", "admin");
    api.server("web", None).await;
    api.disk("web/root", 8 * MIB).await;
    fill_disk_file(&d.data, "web", "root", 0, 6 * MIB, 0x37);
    api.policy("p", &["web"], json!({"interval": "1d"})).await;
    assert_eq!(api.policy_status("p").await, "not_started");

    let moved = break_space(&d);
    let failed = api.replicate_wait("p").await;
    assert_eq!(failed["state"], "failed", "{failed}");
    let err = failed["error"].as_str().unwrap();
    assert!(err.starts_with("server web: "), "{err}");
    assert_eq!(failed["restorable"], false);
    assert_eq!(failed["points"], json!([]));
    assert!(d.space_points_of(failed["id"].as_str().unwrap()).is_empty());
    let p = api.ok("/api/v1/policies/p").await;
    assert_eq!(p["status"], "failed", "{p}");
    assert_eq!(p["last_job"]["id"], failed["id"], "{p}");
    assert_eq!(p["last_job"]["state"], "failed", "{p}");
    assert!(p["last_success_at"].is_null(), "{p}");
    // The failed record is in the point list; it cannot be used.
    let pts = api.ok("/api/v1/points?policy=p&state=failed").await;
    assert_eq!(pts["items"][0]["id"], failed["id"]);
    let (s, v) = api
        .post(
            &format!("/api/v1/points/{}/clone", failed["id"].as_str().unwrap()),
            json!({"disk": "web/root", "to": "x/root"}),
        )
        .await;
    assert_error(&(s, v.clone()), 422, "unprocessable");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("its job failed"),
        "{v}"
    );

    mend_space(&d, &moved);
    let ok = api.replicate_wait("p").await;
    assert_eq!(ok["state"], "succeeded", "{ok}");
    let p = api.ok("/api/v1/policies/p").await;
    assert_eq!(p["status"], "protected", "{p}");
    assert_eq!(p["last_success_at"], ok["started_at"], "{p}");

    // And failed again, then protected again: the latest job decides. (A new disk: its
    // first point reads it whole, so the space must take new chunks.)
    let moved = break_space(&d);
    api.disk("web/data", 4 * MIB).await;
    fill_disk_file(&d.data, "web", "data", 0, 4 * MIB, 0x38);
    let f2 = api.replicate_wait("p").await;
    assert_eq!(f2["state"], "failed", "{f2}");
    assert_eq!(api.policy_status("p").await, "failed");
    mend_space(&d, &moved);
    let ok2 = api.replicate_wait("p").await;
    assert_eq!(ok2["state"], "succeeded", "{ok2}");
    assert_eq!(ok2["scope_changed"], true, "{ok2}");
    assert_eq!(api.policy_status("p").await, "protected");
}

/// Two running servers: `app` (quick) and `db` (its pre-hook waits for the gate). A job
/// of policy `both` commits `app`'s point, then waits in `db`'s hook. Returns the job
/// id once `app`'s point is in the space.
async fn job_half_done(d: &Daemon, api: &Api, gate: &std::path::Path) -> String {
    api.server("app", None).await;
    api.disk("app/root", 4 * MIB).await;
    fill_disk_file(&d.data, "app", "root", 0, 2 * MIB, 0x61);
    api.server("db", Some(&gate_hook(gate))).await;
    api.disk("db/data", 4 * MIB).await;
    fill_disk_file(&d.data, "db", "data", 0, 2 * MIB, 0x64);
    api.must("/api/v1/servers/app/start", json!({})).await;
    api.must("/api/v1/servers/db/start", json!({})).await;
    api.policy("both", &["app", "db"], json!({"cron": "0 2 * * *"}))
        .await;
    let out = api.replicate("both").await;
    assert_eq!(out["skipped"], false, "{out}");
    let job = out["job"]["id"].as_str().unwrap().to_string();
    let until = Instant::now() + Duration::from_secs(60);
    while d.space_points_of(&job).is_empty() {
        assert!(Instant::now() < until, "app's point never appeared");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let j = api.ok(&format!("/api/v1/jobs/{job}")).await;
    assert_eq!(j["state"], "running", "{j}");
    job
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_job_then_restart() {
    let mut d = Daemon::start(&[]).await;
    let token = d.token("boss", "admin");
    let api = d.client(&token);
    let gate = d.gate("db");
    api.server("other", None).await;
    api.disk("other/root", MIB).await;
    api.policy("tick", &["other"], json!({"interval": "10s"}))
        .await;
    let job = job_half_done(&d, &api, &gate).await;

    d.kill9();
    // The half of the job that was committed is in the space (the scenario is real)...
    assert_eq!(d.space_points_of(&job).len(), 1);
    open_gate(&gate);
    let restarted = chrono::Utc::now();
    d.spawn().await;
    let api = d.client(&token);
    // ... and gone after the restart, with the job recorded failed.
    assert!(d.space_points_of(&job).is_empty(), "{:?}", d.space_points());
    let j = api.ok(&format!("/api/v1/jobs/{job}")).await;
    assert_eq!(j["state"], "failed", "{j}");
    assert!(
        j["error"].as_str().unwrap().starts_with("interrupted"),
        "{j}"
    );
    assert!(
        j["ended_at"].is_string() && j["duration_ms"].is_u64(),
        "{j}"
    );
    assert_eq!(j["restorable"], false);
    assert_eq!(j["points"], json!([]));
    let p = api.ok("/api/v1/policies/both").await;
    assert_eq!(p["status"], "failed", "{p}");
    assert!(p["running_job"].is_null(), "{p}");
    let (s, v) = api.get(&format!("/api/v1/points/{job}")).await;
    assert_eq!(s, 200);
    assert_eq!(v["restorable"], false);
    assert!(d.log_text().contains("interrupted by the previous stop"));

    // The servers that were running are exported again.
    for s in ["app", "db"] {
        let v = api.ok(&format!("/api/v1/servers/{s}")).await;
        assert_eq!(v["state"], "running", "{v}");
        assert!(
            v["disks"][0]["export"].as_str().unwrap().contains(&d.nbd),
            "{v}"
        );
    }
    if have_qemu_io() {
        let (ok, out) = qemu_io(&d.nbd, "app/root", "read -P 0x61 0 2M");
        assert!(ok, "{out}");
    }

    // Schedules resume: `tick` runs within its period (10 s) of the restart.
    let until = Instant::now() + Duration::from_secs(90);
    let tick = loop {
        let jobs = jobs_of(&api, "tick").await;
        if let Some(j) = jobs.iter().find(|j| {
            j["trigger"] == "schedule"
                && j["state"] == "succeeded"
                && j["queued_at"]
                    .as_str()
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                    .is_some_and(|t| t > restarted)
        }) {
            break j.clone();
        }
        assert!(
            Instant::now() < until,
            "no scheduled job after the restart: {jobs:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(tick["operator"], "scheduler", "{tick}");

    // The next success turns the policy protected again.
    let ok = api.replicate_wait("both").await;
    assert_eq!(ok["state"], "succeeded", "{ok}");
    assert_eq!(api.policy_status("both").await, "protected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_job_records_it_interrupted_by_shutdown() {
    let mut d = Daemon::start(&["--shutdown-grace", "1s"]).await;
    let token = d.token("boss", "admin");
    let api = d.client(&token);
    let gate = d.gate("db");
    let job = job_half_done(&d, &api, &gate).await;

    let t = Instant::now();
    let status = d.sigterm().await;
    assert!(status.success(), "{status}: {}", d.log_text());
    assert!(t.elapsed() < Duration::from_secs(30));
    assert!(d.log_text().contains("shutting down"), "{}", d.log_text());
    // Nothing of the job is left in the space, before any restart.
    assert!(
        d.space_points_of(&job).is_empty(),
        "a point of the interrupted job is visible: {:?}",
        d.space_points()
    );

    open_gate(&gate);
    d.spawn().await;
    let api = d.client(&token);
    let j = api.ok(&format!("/api/v1/jobs/{job}")).await;
    assert_eq!(j["state"], "failed", "{j}");
    assert!(
        j["error"]
            .as_str()
            .unwrap()
            .starts_with("interrupted by shutdown"),
        "{j}"
    );
    assert_eq!(api.policy_status("both").await, "failed");
    assert!(d.space_points_of(&job).is_empty());
    // The servers come back, and the next job works.
    let v = api.ok("/api/v1/servers/db").await;
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(api.replicate_wait("both").await["state"], "succeeded");
    assert_eq!(api.policy_status("both").await, "protected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_job_finish_within_the_grace_time() {
    let mut d = Daemon::start(&["--shutdown-grace", "60s"]).await;
    let token = d.token("boss", "admin");
    let api = d.client(&token);
    let gate = d.gate("db");
    let job = job_half_done(&d, &api, &gate).await;
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &d.pid().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    // Shutting down: no new jobs.
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let (s, v) = api
            .post("/api/v1/policies/both/replicate-now", json!({}))
            .await;
        if s == 503 {
            assert_error(&(s, v), 503, "shutting_down");
            break;
        }
        assert!(Instant::now() < until, "{s} {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    open_gate(&gate);
    let status = d.wait_exit().await;
    assert!(status.success(), "{status}");
    d.spawn().await;
    let api = d.client(&token);
    let j = api.ok(&format!("/api/v1/jobs/{job}")).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(d.space_points_of(&job).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_jobs_queues_jobs_of_other_policies() {
    let d = Daemon::start(&["--max-jobs", "1"]).await;
    let api = d.as_role("boss", "admin");
    let gate = d.gate("slow");
    api.server("slow", Some(&gate_hook(&gate))).await;
    api.disk("slow/root", MIB).await;
    api.server("fast", None).await;
    api.disk("fast/root", MIB).await;
    api.policy("a", &["slow"], json!({"interval": "1d"})).await;
    api.policy("b", &["fast"], json!({"interval": "1d"})).await;
    let a = api.replicate("a").await["job"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    api.wait_job_until(&a, 60, |j| j["state"] == "running")
        .await;
    // Another policy's job waits for the one slot: queued, not skipped.
    let b = api.replicate("b").await;
    assert_eq!(b["skipped"], false, "{b}");
    let b = b["job"]["id"].as_str().unwrap().to_string();
    let jb = api.ok(&format!("/api/v1/jobs/{b}")).await;
    assert_eq!(jb["state"], "queued", "{jb}");
    assert_eq!(
        api.ok("/api/v1/policies/b").await["running_job"],
        b.as_str()
    );
    // And a second request for b is skipped behind its queued job.
    let again = api.replicate("b").await;
    assert_eq!(again["skipped"], true, "{again}");
    assert_eq!(again["job"]["skipped_for"], b.as_str());
    open_gate(&gate);
    assert_eq!(api.wait_job(&a).await["state"], "succeeded");
    let jb = api.wait_job(&b).await;
    assert_eq!(jb["state"], "succeeded", "{jb}");
    let ja = api.ok(&format!("/api/v1/jobs/{a}")).await;
    // b started only once a had ended.
    assert!(
        jb["started_at"].as_str().unwrap() >= ja["ended_at"].as_str().unwrap(),
        "{ja} {jb}"
    );
}
