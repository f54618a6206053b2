//! Roles: viewers read, operators run jobs, clones and start/stop servers, admins change
//! policies, servers and disks, roll back and delete. No token, a bad one or a revoked
//! one: 401, in JSON.

use reqwest::Method;
use serde_json::{Value, json};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_may_do_what_it_should_and_no_more() {
    let d = Daemon::start(&[]).await;
    let admin = d.as_role("boss", "admin");
    let op = d.as_role("ops", "operator");
    let viewer = d.as_role("eve", "viewer");

    admin.server("web", None).await;
    admin.disk("web/root", 4 * MIB).await;
    fill_disk_file(&d.data, "web", "root", 0, MIB, 0x77);
    admin
        .policy("p", &["web"], json!({"cron": "0 2 * * *"}))
        .await;
    let point = admin.replicate_wait("p").await;
    let point = point["id"].as_str().unwrap().to_string();

    // Everyone reads.
    for path in [
        "/api/v1/location",
        "/api/v1/servers",
        "/api/v1/servers/web",
        "/api/v1/disks",
        "/api/v1/disks/web/root",
        "/api/v1/policies",
        "/api/v1/policies/p",
        "/api/v1/jobs",
        "/api/v1/points",
        &format!("/api/v1/points/{point}"),
        &format!("/api/v1/jobs/{point}"),
        "/api/v1/openapi.json",
    ] {
        for c in [&viewer, &op, &admin] {
            let (s, v) = c.get(path).await;
            assert_eq!(s, 200, "GET {path}: {v}");
        }
    }
    let (s, _) = viewer.raw(Method::GET, "/metrics", None, None).await;
    assert_eq!(s, 200);
    // The audit log is the admins'.
    assert_error(&viewer.get("/api/v1/audit").await, 403, "forbidden");
    assert_error(&op.get("/api/v1/audit").await, 403, "forbidden");
    admin.ok("/api/v1/audit").await;

    // What an operator may do, a viewer may not.
    let operator_actions: Vec<(Method, String, Value)> = vec![
        (
            Method::POST,
            "/api/v1/policies/p/replicate-now".into(),
            json!({}),
        ),
        (Method::POST, "/api/v1/policies/p/verify".into(), json!({})),
        (
            Method::POST,
            format!("/api/v1/points/{point}/verify"),
            json!({}),
        ),
        (
            Method::POST,
            format!("/api/v1/points/{point}/clone"),
            json!({"disk": "web/root", "to": "copy/root", "start": false}),
        ),
        (Method::POST, "/api/v1/servers/web/start".into(), json!({})),
        (Method::POST, "/api/v1/servers/web/stop".into(), json!({})),
    ];
    assert_error(
        &viewer
            .post("/api/v1/disks/web/root/hydrate", json!({}))
            .await,
        403,
        "forbidden",
    );
    for (m, path, body) in &operator_actions {
        let r = viewer.call(m.clone(), path, Some(body.clone())).await;
        assert_error(&r, 403, "forbidden");
        let msg = r.1["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains("eve") && msg.contains("viewer") && msg.contains("operator"),
            "{msg}"
        );
    }
    for (m, path, body) in &operator_actions {
        let (s, v) = op.call(m.clone(), path, Some(body.clone())).await;
        assert!((200..300).contains(&s), "operator {m} {path}: {s} {v}");
        if path.ends_with("replicate-now") {
            assert_eq!(v["job"]["operator"], "ops", "{v}");
            op.wait_job(v["job"]["id"].as_str().unwrap()).await;
        }
        if path.ends_with("verify") {
            assert_eq!(v["operator"], "ops", "{v}");
            let j = op.wait_job(v["id"].as_str().unwrap()).await;
            assert_eq!(j["state"], "succeeded", "{j}");
        }
    }

    // What only an admin may do: the operator (and the viewer) may not.
    let admin_actions: Vec<(Method, String, Value)> = vec![
        (
            Method::POST,
            "/api/v1/policies".into(),
            json!({"name": "q", "scope": ["web"], "schedule": {"interval": "1h"}}),
        ),
        (
            Method::PATCH,
            "/api/v1/policies/p".into(),
            json!({"description": "nightly"}),
        ),
        (Method::POST, "/api/v1/policies/p/pause".into(), json!({})),
        (Method::POST, "/api/v1/policies/p/resume".into(), json!({})),
        (
            Method::POST,
            "/api/v1/servers".into(),
            json!({"name": "new"}),
        ),
        (
            Method::POST,
            "/api/v1/disks".into(),
            json!({"disk": "new/d", "size": MIB}),
        ),
        (
            Method::POST,
            "/api/v1/disks/new/d/grow".into(),
            json!({"size": 2 * MIB}),
        ),
        (
            Method::POST,
            format!("/api/v1/points/{point}/rollback"),
            json!({"disk": "web/root", "confirm": true}),
        ),
        (Method::DELETE, "/api/v1/disks/new/d".into(), Value::Null),
        (Method::DELETE, "/api/v1/servers/new".into(), Value::Null),
        (
            Method::DELETE,
            "/api/v1/disks/copy/root".into(),
            Value::Null,
        ),
        (
            Method::DELETE,
            format!("/api/v1/points/{point}"),
            Value::Null,
        ),
        (
            Method::DELETE,
            "/api/v1/policies/q?points=keep".into(),
            Value::Null,
        ),
    ];
    for c in [&viewer, &op] {
        for (m, path, body) in &admin_actions {
            let body = (!body.is_null()).then(|| body.clone());
            assert_error(&c.call(m.clone(), path, body).await, 403, "forbidden");
        }
    }
    for (m, path, body) in &admin_actions {
        let body = (!body.is_null()).then(|| body.clone());
        let (s, v) = admin.call(m.clone(), path, body).await;
        assert!((200..300).contains(&s), "admin {m} {path}: {s} {v}");
    }
    // Nothing a forbidden request asked for happened: one policy was created (by the
    // admin) and deleted again.
    let policies = admin.ok("/api/v1/policies").await;
    assert_eq!(policies.as_array().unwrap().len(), 1, "{policies}");
    assert_eq!(policies[0]["description"], "nightly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_a_bad_token_or_a_revoked_token_is_401() {
    let d = Daemon::start(&[]).await;
    let token = d.token("temp", "admin");
    let api = d.client(&token);
    api.ok("/api/v1/policies").await;

    // /healthz needs nothing.
    let (s, v) = d.anonymous().get("/healthz").await;
    assert_eq!(s, 200);
    assert_eq!(v, json!({"status": "ok", "location": "local"}));

    let anon = d.anonymous();
    let bad = d.client("cairn_0000000000000000000000000000000000000000000000000000000000000000");
    let garbage = d.client("not a token at all");
    for c in [&anon, &bad, &garbage] {
        for (m, path) in [
            (Method::GET, "/api/v1/policies"),
            (Method::GET, "/api/v1/openapi.json"),
            (Method::GET, "/api/v1/nothing-here"),
            (Method::POST, "/api/v1/servers"),
            (Method::DELETE, "/api/v1/policies/p?points=keep"),
        ] {
            let r = c.call(m.clone(), path, Some(json!({"name": "x"}))).await;
            assert_error(&r, 401, "unauthorized");
        }
        let (s, text) = c.raw(Method::GET, "/metrics", None, None).await;
        assert_eq!(s, 401, "{text}");
    }
    // The wrong scheme is no token either.
    let (s, text) = d
        .anonymous()
        .http
        .get(format!("{}/api/v1/policies", d.url))
        .basic_auth("temp", Some(&token))
        .send()
        .await
        .map(|r| (r.status().as_u16(), r))
        .unwrap();
    assert_eq!(s, 401);
    let v: Value = text.json().await.unwrap();
    assert_eq!(v["error"]["code"], "unauthorized");

    // The scheme's case does not matter.
    let (s, _) = d
        .anonymous()
        .http
        .get(format!("{}/api/v1/policies", d.url))
        .header("authorization", format!("bearer {token}"))
        .send()
        .await
        .map(|r| (r.status().as_u16(), ()))
        .unwrap();
    assert_eq!(s, 200);

    d.revoke("temp");
    assert_error(&api.get("/api/v1/policies").await, 401, "unauthorized");
    // A new token of the same name works; the old one stays revoked.
    let again = d.token("temp", "viewer");
    d.client(&again).ok("/api/v1/policies").await;
    assert_error(&api.get("/api/v1/policies").await, 401, "unauthorized");
    assert_error(
        &d.client(&again)
            .post("/api/v1/servers", json!({"name": "x"}))
            .await,
        403,
        "forbidden",
    );
    // A second token under a live name is refused.
    let out = cairn()
        .args(["token", "create", "temp", "--role", "admin", "--data-dir"])
        .arg(&d.data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("exists"));
}
