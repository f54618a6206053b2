//! The operator's first session of issue 4 §5, through the API: server, disk, start,
//! qemu-io writes over NBD, policy, replicate now, points, a clone readable at once,
//! stop, rollback, and the data read back.

use serde_json::json;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_session() {
    if !have_qemu_io() {
        return;
    }
    let d = Daemon::start(&[]).await;
    let api = d.as_role("ops", "admin");

    api.server("web", None).await;
    api.disk("web/root", 1 << 30).await;
    let v = api.must("/api/v1/servers/web/start", json!({})).await;
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(
        v["disks"][0]["export"],
        format!("nbd://{}/web/root", d.nbd),
        "{v}"
    );

    let (ok, out) = qemu_io(&d.nbd, "web/root", "write -P 0xab 0 1M");
    assert!(ok, "{out}");
    let disk = api.ok("/api/v1/disks/web/root").await;
    assert_eq!(disk["size"], 1u64 << 30, "{disk}");

    let (s, p) = api
        .post(
            "/api/v1/policies",
            json!({"name": "nightly", "scope": ["web"],
                   "schedule": {"cron": "0 2 * * *"}, "retention": {"keep_last": 7}}),
        )
        .await;
    assert_eq!(s, 201, "{p}");
    assert_eq!(p["status"], "not_started", "{p}");
    assert_eq!(p["schedule"]["cron"], "0 2 * * *", "{p}");
    assert!(
        p["next_run_at"]
            .as_str()
            .unwrap()
            .ends_with("T02:00:00.000Z"),
        "{p}"
    );
    assert_eq!(p["period_ms"], 86_400_000u64, "{p}");

    let job = api.replicate_wait("nightly").await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["operator"], "ops", "{job}");
    assert_eq!(job["trigger"], "manual", "{job}");
    assert_eq!(job["kind"], "replication", "{job}");
    assert_eq!(job["restorable"], true, "{job}");
    assert_eq!(job["scope_changed"], false, "{job}");
    assert!(job["duration_ms"].is_u64(), "{job}");
    let res = job["resources"].as_array().unwrap();
    assert_eq!(res.len(), 1, "{job}");
    assert_eq!(res[0]["disk"], "web/root");
    assert_eq!(res[0]["size"], 1u64 << 30);
    assert!(res[0]["bytes_changed"].as_u64().unwrap() >= MIB, "{job}");
    assert!(res[0]["bytes_written"].as_u64().unwrap() > 0, "{job}");
    assert_eq!(job["points"][0]["server"], "web", "{job}");
    let point = job["id"].as_str().unwrap().to_string();
    // The job's space point exists in the space, and nothing else does.
    let sp = d.space_points();
    assert_eq!(sp.len(), 1);
    assert_eq!(sp[0]["id"], job["points"][0]["point"]);
    assert_eq!(api.policy_status("nightly").await, "protected");

    let list = api.ok("/api/v1/points?policy=nightly").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["items"][0]["id"], point.as_str());
    assert!(list["next_cursor"].is_null());
    // A point is found by its job id, a prefix of it, or the space's point id.
    let by_prefix = api.ok(&format!("/api/v1/points/{}", &point[..13])).await;
    assert_eq!(by_prefix["id"], point.as_str());
    let by_space_id = api
        .ok(&format!(
            "/api/v1/points/{}",
            job["points"][0]["point"].as_str().unwrap()
        ))
        .await;
    assert_eq!(by_space_id["id"], point.as_str());

    // A clone, readable at once over NBD.
    let (s, c) = api
        .post(
            &format!("/api/v1/points/{point}/clone"),
            json!({"disk": "web/root", "to": "web-copy/root"}),
        )
        .await;
    assert_eq!(s, 201, "{c}");
    assert_eq!(c["started"], true, "{c}");
    let (ok, out) = qemu_io(&d.nbd, "web-copy/root", "read -P 0xab 0 1M");
    assert!(ok, "{out}");
    let (ok, out) = qemu_io(&d.nbd, "web-copy/root", "read -P 0 1M 1M");
    assert!(ok, "{out}");

    // The source changes; stop; roll back; the point's bytes are back.
    let (ok, out) = qemu_io(&d.nbd, "web/root", "write -P 0xcd 0 512k");
    assert!(ok, "{out}");
    let (s, v) = api
        .post(
            &format!("/api/v1/points/{point}/rollback"),
            json!({"disk": "web/root", "confirm": true}),
        )
        .await;
    assert_error(&(s, v), 409, "conflict");
    let v = api.must("/api/v1/servers/web/stop", json!({})).await;
    assert_eq!(v["state"], "stopped");
    let v = api
        .must(
            &format!("/api/v1/points/{point}/rollback"),
            json!({"disk": "web/root", "confirm": true}),
        )
        .await;
    assert_eq!(v["server"], "web", "{v}");
    api.must("/api/v1/servers/web/start", json!({})).await;
    let (ok, out) = qemu_io(&d.nbd, "web/root", "read -P 0xab 0 1M");
    assert!(ok, "{out}");

    // The clone is independent of the source.
    let (ok, out) = qemu_io(&d.nbd, "web-copy/root", "read -P 0xab 0 1M");
    assert!(ok, "{out}");
    let servers = api.ok("/api/v1/servers").await;
    let names: Vec<&str> = servers
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["web", "web-copy"]);
}
