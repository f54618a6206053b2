//! The OpenAPI document, /metrics, the audit log, and the point list's pages and filters.

use reqwest::Method;
use serde_json::{Value, json};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_lists_the_api() {
    let d = Daemon::start(&[]).await;
    let api = d.as_role("eve", "viewer");
    let doc = api.ok("/api/v1/openapi.json").await;
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3."),
        "{}",
        doc["openapi"]
    );
    let paths = doc["paths"].as_object().unwrap();
    for (path, methods) in [
        ("/api/v1/location", &["get"][..]),
        ("/api/v1/servers", &["get", "post"]),
        ("/api/v1/servers/{server}", &["get", "delete"]),
        ("/api/v1/servers/{server}/start", &["post"]),
        ("/api/v1/servers/{server}/stop", &["post"]),
        ("/api/v1/disks", &["get", "post"]),
        ("/api/v1/disks/{server}/{disk}", &["get", "delete"]),
        ("/api/v1/disks/{server}/{disk}/grow", &["post"]),
        ("/api/v1/disks/{server}/{disk}/hydrate", &["post"]),
        ("/api/v1/policies", &["get", "post"]),
        ("/api/v1/policies/{policy}", &["get", "patch", "delete"]),
        ("/api/v1/policies/{policy}/pause", &["post"]),
        ("/api/v1/policies/{policy}/resume", &["post"]),
        ("/api/v1/policies/{policy}/replicate-now", &["post"]),
        ("/api/v1/policies/{policy}/verify", &["post"]),
        ("/api/v1/jobs", &["get"]),
        ("/api/v1/jobs/{job}", &["get"]),
        ("/api/v1/points", &["get"]),
        ("/api/v1/points/{point}", &["get", "delete"]),
        ("/api/v1/points/{point}/verify", &["post"]),
        ("/api/v1/points/{point}/clone", &["post"]),
        ("/api/v1/points/{point}/rollback", &["post"]),
        ("/api/v1/audit", &["get"]),
    ] {
        let p = paths
            .get(path)
            .unwrap_or_else(|| panic!("{path} is not in the document: {:?}", paths.keys()));
        for m in methods {
            assert!(p.get(*m).is_some(), "{m} {path}");
        }
    }
    // The points list documents its filters; schemas are there; the token scheme too.
    let params: Vec<&str> = paths["/api/v1/points"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for q in [
        "policy",
        "disk",
        "state",
        "scope_changed",
        "since",
        "until",
        "limit",
        "cursor",
    ] {
        assert!(params.contains(&q), "{q} in {params:?}");
    }
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for s in ["Policy", "PolicySpec", "Job", "ErrorBody", "StartOutcome"] {
        assert!(schemas.contains_key(s), "{s} in {:?}", schemas.keys());
    }
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"]
            .as_str()
            .map(str::to_lowercase)
            .as_deref(),
        Some("bearer")
    );
}

fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_have_the_documented_series() {
    let d = Daemon::start(&[]).await;
    let api = d.as_role("boss", "admin");
    api.server("web", None).await;
    api.disk("web/root", 4 * MIB).await;
    fill_disk_file(&d.data, "web", "root", 0, 2 * MIB, 9);
    api.policy("nightly", &["web"], json!({"cron": "0 2 * * *"}))
        .await;
    api.policy("idle", &["web"], json!({"interval": "1h"}))
        .await;
    api.replicate_wait("nightly").await;
    api.must("/api/v1/servers/web/start", json!({})).await;
    if have_qemu_io() {
        let (ok, out) = qemu_io(&d.nbd, "web/root", "read 0 64k");
        assert!(ok, "{out}");
    }

    let viewer = d.as_role("eve", "viewer");
    let (s, text) = viewer.raw(Method::GET, "/metrics", None, None).await;
    assert_eq!(s, 200);
    for help in [
        "# TYPE cairn_jobs gauge",
        "# TYPE cairn_replication_job_duration_seconds histogram",
        "# TYPE cairn_bytes_replicated_total counter",
        "# TYPE cairn_policy_newest_point_age_seconds gauge",
        "# TYPE cairn_policy_status gauge",
        "# TYPE cairn_policy_rpo_late gauge",
        "# TYPE cairn_nbd_connections gauge",
        "# TYPE cairn_nbd_read_bytes_total counter",
        "# TYPE cairn_nbd_written_bytes_total counter",
        "# TYPE cairn_api_requests_total counter",
    ] {
        assert!(text.contains(help), "{help} in:\n{text}");
    }
    let m = |s: &str| metric(&text, s).unwrap_or_else(|| panic!("{s} in:\n{text}"));
    assert_eq!(
        m("cairn_jobs{kind=\"replication\",state=\"succeeded\"}"),
        1.0
    );
    assert_eq!(m("cairn_replication_job_duration_seconds_count"), 1.0);
    assert_eq!(
        m("cairn_replication_job_duration_seconds_bucket{le=\"+Inf\"}"),
        1.0
    );
    assert!(m("cairn_bytes_replicated_total") > 0.0);
    assert!(m("cairn_bytes_changed_total") >= 2.0 * 1048576.0);
    assert!(m("cairn_policy_newest_point_age_seconds{policy=\"nightly\"}") >= 0.0);
    assert!(
        metric(
            &text,
            "cairn_policy_newest_point_age_seconds{policy=\"idle\"}"
        )
        .is_none()
    );
    assert_eq!(
        m("cairn_policy_status{policy=\"nightly\",status=\"protected\"}"),
        1.0
    );
    assert_eq!(
        m("cairn_policy_status{policy=\"nightly\",status=\"failed\"}"),
        0.0
    );
    assert_eq!(
        m("cairn_policy_status{policy=\"idle\",status=\"not_started\"}"),
        1.0
    );
    assert_eq!(m("cairn_policy_rpo_late{policy=\"nightly\"}"), 0.0);
    assert!(m("cairn_api_requests_total") > 5.0);
    if have_qemu_io() {
        assert!(m("cairn_nbd_connections_total") >= 1.0);
        assert!(m("cairn_nbd_read_bytes_total") >= 65536.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_log_records_state_changing_requests() {
    let d = Daemon::start(&[]).await;
    let admin = d.as_role("boss", "admin");
    let op = d.as_role("ops", "operator");
    admin.server("web", None).await;
    admin.disk("web/root", MIB).await;
    admin.policy("p", &["web"], json!({"interval": "1h"})).await;
    op.replicate_wait("p").await;
    let _ = op.post("/api/v1/servers", json!({"name": "sneaky"})).await;
    let _ = d
        .anonymous()
        .post("/api/v1/servers", json!({"name": "anon"}))
        .await;
    let _ = admin.post("/api/v1/policies", json!({"bad": 1})).await;
    admin.ok("/api/v1/policies").await;

    let log = admin.ok("/api/v1/audit").await;
    let items = log["items"].as_array().unwrap();
    let got: Vec<(String, String, String, u64)> = items
        .iter()
        .rev()
        .map(|e| {
            (
                e["principal"].as_str().unwrap().to_string(),
                e["method"].as_str().unwrap().to_string(),
                e["path"].as_str().unwrap().to_string(),
                e["status"].as_u64().unwrap(),
            )
        })
        .collect();
    let want: Vec<(String, String, String, u64)> = [
        ("boss", "POST", "/api/v1/servers", 201),
        ("boss", "POST", "/api/v1/disks", 201),
        ("boss", "POST", "/api/v1/policies", 201),
        ("ops", "POST", "/api/v1/policies/p/replicate-now", 202),
        ("ops", "POST", "/api/v1/servers", 403),
        ("(unauthenticated)", "POST", "/api/v1/servers", 401),
        ("boss", "POST", "/api/v1/policies", 400),
    ]
    .iter()
    .map(|(a, b, c, d)| (a.to_string(), b.to_string(), c.to_string(), *d))
    .collect();
    assert_eq!(got, want);
    for e in items {
        assert!(
            chrono::DateTime::parse_from_rfc3339(e["at"].as_str().unwrap()).is_ok(),
            "{e}"
        );
    }
    // Pages.
    let p1 = admin.ok("/api/v1/audit?limit=4").await;
    assert_eq!(p1["items"].as_array().unwrap().len(), 4);
    let c = p1["next_cursor"].as_str().unwrap();
    let p2 = admin.ok(&format!("/api/v1/audit?limit=4&cursor={c}")).await;
    assert_eq!(p2["items"].as_array().unwrap().len(), 3);
    assert!(p2["next_cursor"].is_null());
    assert_eq!(p2["items"][2]["path"], "/api/v1/servers");
    assert_eq!(p2["items"][2]["principal"], "boss");
}

/// Follows `next_cursor` from `path` (which has a `?`) with pages of `limit`.
async fn all_pages(api: &Api, path: &str, limit: usize) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let url = match &cursor {
            Some(c) => format!("{path}&limit={limit}&cursor={c}"),
            None => format!("{path}&limit={limit}"),
        };
        let page = api.ok(&url).await;
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= limit);
        out.extend(items.iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => {
                assert_eq!(items.len(), limit);
                cursor = Some(c.to_string());
            }
            None => return out,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_pages_and_filters() {
    let d = Daemon::start(&[]).await;
    let api = d.as_role("boss", "admin");
    api.server("web", None).await;
    api.disk("web/root", 2 * MIB).await;
    fill_disk_file(&d.data, "web", "root", 0, MIB, 3);
    api.server("db", None).await;
    api.disk("db/data", MIB).await;
    api.policy("p", &["web"], json!({"interval": "1h"})).await;
    api.policy("q", &["db"], json!({"interval": "1h"})).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(
            api.replicate_wait("p").await["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    api.replicate_wait("q").await;
    // A disk added to a server in the scope: the next point is flagged.
    api.disk("web/data", MIB).await;
    let changed = api.replicate_wait("p").await;
    assert_eq!(changed["scope_changed"], true, "{changed}");
    let disks: Vec<&str> = changed["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["disk"].as_str().unwrap())
        .collect();
    assert_eq!(disks, ["web/data", "web/root"]);
    ids.push(changed["id"].as_str().unwrap().to_string());
    let after = api.replicate_wait("p").await;
    assert_eq!(after["scope_changed"], false, "{after}");
    ids.push(after["id"].as_str().unwrap().to_string());
    ids.reverse(); // newest first

    for limit in [1, 2, 3, 7, 100] {
        let all = all_pages(&api, "/api/v1/points?policy=p", limit).await;
        let got: Vec<&str> = all.iter().map(|j| j["id"].as_str().unwrap()).collect();
        assert_eq!(got, ids, "limit {limit}");
    }
    let all = api.ok("/api/v1/points?limit=1000").await;
    assert_eq!(all["items"].as_array().unwrap().len(), 8);
    let sc = api.ok("/api/v1/points?policy=p&scope_changed=true").await;
    let sc: Vec<&str> = sc["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(sc, [changed["id"].as_str().unwrap()]);
    let by_disk = api.ok("/api/v1/points?disk=web/data").await;
    assert_eq!(by_disk["items"].as_array().unwrap().len(), 2);
    let by_disk = api.ok("/api/v1/points?disk=db/data").await;
    assert_eq!(by_disk["items"].as_array().unwrap().len(), 1);
    assert_eq!(by_disk["items"][0]["policy"], "q");
    let ok = all_pages(&api, "/api/v1/points?policy=p&state=succeeded", 2).await;
    assert_eq!(ok.len(), 7);
    let failed = api.ok("/api/v1/points?policy=p&state=failed").await;
    assert_eq!(failed["items"], json!([]));
    // Time range: since the scope change.
    let since = changed["queued_at"].as_str().unwrap();
    let recent = api
        .ok(&format!("/api/v1/points?policy=p&since={since}"))
        .await;
    assert_eq!(recent["items"].as_array().unwrap().len(), 2);
    let older = api
        .ok(&format!("/api/v1/points?policy=p&until={since}"))
        .await;
    assert_eq!(older["items"].as_array().unwrap().len(), 5);
    // Verify jobs are jobs, not points.
    let v = api.must("/api/v1/policies/p/verify", json!({})).await;
    let v = api.wait_job(v["id"].as_str().unwrap()).await;
    assert_eq!(v["state"], "succeeded", "{v}");
    assert_eq!(
        api.ok("/api/v1/points?policy=p&limit=1000").await["items"]
            .as_array()
            .unwrap()
            .len(),
        7
    );
    let jobs = api.ok("/api/v1/jobs?policy=p&kind=verify").await;
    assert_eq!(jobs["items"].as_array().unwrap().len(), 1);
    let (s, e) = api
        .get(&format!("/api/v1/points/{}", v["id"].as_str().unwrap()))
        .await;
    assert_error(&(s, e), 404, "not_found");
}
