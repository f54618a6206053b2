//! Bad input gets a clear 4xx with a stable code, never a 500: malformed JSON, unknown
//! fields, huge bodies, bad ids, bad schedules and scopes, duplicate names, bad queries.

use reqwest::Method;
use serde_json::{Value, json};

use crate::common::*;

fn policy(name: &str, scope: Value, schedule: Value) -> Value {
    json!({"name": name, "scope": scope, "schedule": schedule})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies() {
    let d = Daemon::start(&[]).await;
    let api = d.as_role("boss", "admin");
    api.server("web", None).await;
    api.disk("web/root", MIB).await;

    let raw = |body: &'static [u8]| {
        let api = &api;
        async move {
            let (s, text) = api
                .raw(
                    Method::POST,
                    "/api/v1/policies",
                    Some(body.to_vec()),
                    Some("application/json"),
                )
                .await;
            let v: Value =
                serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({s}): {text}"));
            (s, v)
        }
    };
    assert_error(&raw(b"{\"name\": \"p\", ").await, 400, "invalid_json");
    assert_error(&raw(b"not json").await, 400, "invalid_json");
    assert_error(&raw(b"").await, 400, "invalid_json");
    assert_error(&raw(b"[1, 2]").await, 400, "bad_request");
    assert_error(&raw(b"{\"name\": 5}").await, 400, "bad_request");

    // Unknown fields, at the top and inside.
    let mut b = policy("p", json!(["web"]), json!({"interval": "1h"}));
    b["colour"] = json!("red");
    let r = api.post("/api/v1/policies", b).await;
    assert_error(&r, 400, "unknown_field");
    assert!(
        r.1["error"]["message"].as_str().unwrap().contains("colour"),
        "{}",
        r.1
    );
    let r = api
        .post(
            "/api/v1/policies",
            policy(
                "p",
                json!(["web"]),
                json!({"interval": "1h", "jitter": "1m"}),
            ),
        )
        .await;
    assert_error(&r, 400, "unknown_field");
    let r = api
        .post(
            "/api/v1/policies",
            json!({"name": "p", "scope": ["web"], "schedule": {"interval": "1h"},
                   "retention": {"keep_forever": true}}),
        )
        .await;
    assert_error(&r, 400, "unknown_field");
    assert_error(
        &api.post("/api/v1/servers", json!({"name": "x", "owner": "me"}))
            .await,
        400,
        "unknown_field",
    );
    assert_error(
        &api.patch("/api/v1/policies/p", json!({"nmae": "p"})).await,
        400,
        "unknown_field",
    );
    // Missing fields and wrong types.
    let r = api
        .post(
            "/api/v1/policies",
            json!({"name": "p", "schedule": {"interval": "1h"}}),
        )
        .await;
    assert_error(&r, 400, "bad_request");
    assert!(
        r.1["error"]["message"].as_str().unwrap().contains("scope"),
        "{}",
        r.1
    );
    assert_error(
        &api.post(
            "/api/v1/policies",
            policy("p", json!("web"), json!({"interval": "1h"})),
        )
        .await,
        400,
        "bad_request",
    );
    assert_error(
        &api.post("/api/v1/disks", json!({"disk": "web/x", "size": -1}))
            .await,
        400,
        "bad_request",
    );
    // Not JSON at all.
    let (s, text) = api
        .raw(
            Method::POST,
            "/api/v1/servers",
            Some(b"name=x".to_vec()),
            Some("application/x-www-form-urlencoded"),
        )
        .await;
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_error(&(s, v), 400, "bad_request");

    // More than 1 MiB: 413, whether the length is announced or not.
    let mut huge = policy("p", json!(["web"]), json!({"interval": "1h"}));
    huge["description"] = json!("x".repeat(2 << 20));
    let r = api.post("/api/v1/policies", huge.clone()).await;
    assert_error(&r, 413, "payload_too_large");
    let body = serde_json::to_vec(&huge).unwrap();
    let (s, v) = chunked_post(
        &d.url,
        "/api/v1/policies",
        api.token.as_deref().unwrap(),
        body,
    )
    .await;
    assert_error(&(s, v), 413, "payload_too_large");
    // Just under the limit is fine as a body (and refused for what it says).
    let mut big = policy("p", json!(["web"]), json!({"interval": "1h"}));
    big["description"] = json!("x".repeat(1_000_000));
    let r = api.post("/api/v1/policies", big).await;
    assert_error(&r, 400, "bad_request");
    assert!(
        r.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("description"),
        "{}",
        r.1
    );

    // Nothing was created by any of it.
    assert_eq!(api.ok("/api/v1/policies").await, json!([]));
}

/// POST with `Transfer-Encoding: chunked` (no Content-Length), over a plain socket.
async fn chunked_post(url: &str, path: &str, token: &str, body: Vec<u8>) -> (u16, Value) {
    use std::io::{Read, Write};
    let addr = url.strip_prefix("http://").unwrap().to_string();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: cairn\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        s.write_all(head.as_bytes()).unwrap();
        // The server may answer and close before it has read everything.
        for c in body.chunks(64 * 1024) {
            if s.write_all(format!("{:x}\r\n", c.len()).as_bytes())
                .is_err()
                || s.write_all(c).is_err()
                || s.write_all(b"\r\n").is_err()
            {
                break;
            }
        }
        let _ = s.write_all(b"0\r\n\r\n");
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        let text = String::from_utf8_lossy(&answer).to_string();
        let status: u16 = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no HTTP answer: {text:?}"));
        let (_, rest) = text.split_once("\r\n\r\n").unwrap();
        // The answer itself may be chunked.
        let json_start = rest.find('{').unwrap_or_else(|| panic!("{text}"));
        let json_end = rest.rfind('}').unwrap() + 1;
        (
            status,
            serde_json::from_str(&rest[json_start..json_end]).unwrap(),
        )
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_policies() {
    let d = Daemon::start(&[]).await;
    let api = d.as_role("boss", "admin");
    api.server("web", None).await;
    api.disk("web/root", MIB).await;
    api.server("empty", None).await;

    let bad = |b: Value, needle: &'static str| {
        let api = &api;
        async move {
            let r = api.post("/api/v1/policies", b.clone()).await;
            assert_error(&r, 400, "bad_request");
            let m = r.1["error"]["message"].as_str().unwrap().to_string();
            assert!(m.contains(needle), "{b}: {m}");
        }
    };
    bad(
        policy("p", json!(["web"]), json!({"cron": "61 * * * *"})),
        "bad cron expression",
    )
    .await;
    bad(
        policy("p", json!(["web"]), json!({"cron": "every day"})),
        "bad cron expression",
    )
    .await;
    bad(
        policy("p", json!(["web"]), json!({"cron": "0 0 30 2 *"})),
        "never fires",
    )
    .await;
    bad(
        policy(
            "p",
            json!(["web"]),
            json!({"cron": "0 2 * * *", "timezone": "Mars/Olympus"}),
        ),
        "unknown time zone",
    )
    .await;
    bad(
        policy("p", json!(["web"]), json!({"interval": "1s"})),
        "shorter than the minimum",
    )
    .await;
    bad(
        policy("p", json!(["web"]), json!({"interval": "soon"})),
        "bad interval",
    )
    .await;
    bad(
        policy(
            "p",
            json!(["web"]),
            json!({"interval": "1h", "cron": "0 2 * * *"}),
        ),
        "not both",
    )
    .await;
    bad(
        policy(
            "p",
            json!(["web"]),
            json!({"interval": "1h", "timezone": "UTC"}),
        ),
        "time zone",
    )
    .await;
    bad(
        policy("p", json!(["web"]), json!({})),
        "schedule is missing",
    )
    .await;
    bad(
        policy("p", json!([]), json!({"interval": "1h"})),
        "scope is empty",
    )
    .await;
    bad(
        policy("p", json!(["nope"]), json!({"interval": "1h"})),
        "unknown server",
    )
    .await;
    bad(
        policy("p", json!(["nope/root"]), json!({"interval": "1h"})),
        "unknown server",
    )
    .await;
    bad(
        policy("p", json!(["web/nope"]), json!({"interval": "1h"})),
        "has no disk",
    )
    .await;
    bad(
        policy("p", json!(["../etc"]), json!({"interval": "1h"})),
        "scope item",
    )
    .await;
    bad(
        policy("bad name!", json!(["web"]), json!({"interval": "1h"})),
        "policy",
    )
    .await;
    bad(
        policy("", json!(["web"]), json!({"interval": "1h"})),
        "policy",
    )
    .await;
    let mut b = policy("p", json!(["web"]), json!({"interval": "1h"}));
    b["space"] = json!("s3://elsewhere");
    bad(b, "unknown recovery space").await;
    let mut b = policy("p", json!(["web"]), json!({"interval": "1h"}));
    b["retention"] = json!({"keep_last": 0});
    bad(b, "keep_last").await;
    let mut b = policy("p", json!(["web"]), json!({"interval": "1h"}));
    b["retention"] = json!({"keep_within": "a while"});
    bad(b, "keep_within").await;

    // Duplicate name: 409.
    api.policy("p", &["web"], json!({"interval": "1h"})).await;
    let r = api
        .post(
            "/api/v1/policies",
            policy("p", json!(["web/root"]), json!({"interval": "2h"})),
        )
        .await;
    assert_error(&r, 409, "conflict");
    assert!(
        r.1["error"]["message"].as_str().unwrap().contains("exists"),
        "{}",
        r.1
    );
    // Updates are checked the same way, and cannot rename.
    let r = api.patch("/api/v1/policies/p", json!({"scope": []})).await;
    assert_error(&r, 400, "bad_request");
    let r = api
        .patch("/api/v1/policies/p", json!({"schedule": {"cron": "* * *"}}))
        .await;
    assert_error(&r, 400, "bad_request");
    let r = api.patch("/api/v1/policies/p", json!({"name": "q"})).await;
    assert_error(&r, 400, "bad_request");
    let r = api
        .patch("/api/v1/policies/nope", json!({"description": "x"}))
        .await;
    assert_error(&r, 404, "not_found");
    // The policy is unchanged.
    let p = api.ok("/api/v1/policies/p").await;
    assert_eq!(p["scope"], json!(["web"]));
    assert_eq!(p["schedule"], json!({"interval": "1h"}));
    // A scope of a server without disks is accepted, and its job says why it fails.
    api.policy("e", &["empty"], json!({"interval": "1h"})).await;
    let j = api.replicate_wait("e").await;
    assert_eq!(j["state"], "failed");
    assert!(j["error"].as_str().unwrap().contains("no disks"), "{j}");
    // Delete needs to be told about the points.
    assert_error(
        &api.delete("/api/v1/policies/p").await,
        400,
        "confirmation_required",
    );
    assert_error(
        &api.delete("/api/v1/policies/p?points=maybe").await,
        400,
        "bad_request",
    );
    assert_error(
        &api.delete("/api/v1/policies/p?points=keep&force=1").await,
        400,
        "bad_request",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_ids_paths_and_queries() {
    let d = Daemon::start(&[]).await;
    let api = d.as_role("boss", "admin");
    api.server("web", None).await;
    api.disk("web/root", MIB).await;
    fill_disk_file(&d.data, "web", "root", 0, MIB, 1);
    api.policy("p", &["web"], json!({"interval": "1h"})).await;
    let job = api.replicate_wait("p").await;
    let id = job["id"].as_str().unwrap();

    for path in [
        "/api/v1/jobs/zzzz",
        "/api/v1/jobs/12",
        "/api/v1/jobs/00000000-0000-0000-0000-000000000000",
        "/api/v1/points/not-a-point",
        "/api/v1/points/ffffffff",
        "/api/v1/policies/nope",
        "/api/v1/servers/nope",
        "/api/v1/disks/web/nope",
        "/api/v1/disks/nope/root",
        "/api/v1/policies/%F0%9F%90%88",
        "/api/v1/nothing",
        "/api/v2/policies",
    ] {
        assert_error(&api.get(path).await, 404, "not_found");
    }
    // Path segments that are not UTF-8: 400, in JSON like every other error.
    for path in [
        "/api/v1/policies/%FF",
        "/api/v1/disks/%FF/root",
        "/api/v1/jobs/%FF%FE",
        "/api/v1/points/%C3%28/clone",
    ] {
        let m = if path.ends_with("clone") {
            Method::POST
        } else {
            Method::GET
        };
        let r = api.call(m, path, Some(json!({}))).await;
        assert_error(&r, 400, "bad_request");
    }
    let long = format!("/api/v1/policies/{}", "a".repeat(5000));
    assert_error(&api.get(&long).await, 404, "not_found");
    // A prefix shorter than 4 characters names nothing.
    assert_error(
        &api.get(&format!("/api/v1/jobs/{}", &id[..3])).await,
        404,
        "not_found",
    );
    // Actions on unknown things.
    for (path, body) in [
        (
            "/api/v1/points/nope/clone",
            json!({"disk": "web/root", "to": "c/root"}),
        ),
        (
            "/api/v1/points/nope/rollback",
            json!({"disk": "web/root", "confirm": true}),
        ),
        ("/api/v1/points/nope/verify", json!({})),
        ("/api/v1/policies/nope/replicate-now", json!({})),
        ("/api/v1/policies/nope/pause", json!({})),
        ("/api/v1/servers/nope/start", json!({})),
    ] {
        assert_error(&api.post(path, body).await, 404, "not_found");
    }
    // A point of another disk or server, bad disk names.
    let clone = |body: Value| {
        let api = &api;
        let path = format!("/api/v1/points/{id}/clone");
        async move { api.post(&path, body).await }
    };
    assert_error(
        &clone(json!({"disk": "db/root", "to": "c/root"})).await,
        400,
        "bad_request",
    );
    assert_error(
        &clone(json!({"disk": "web/data", "to": "c/root"})).await,
        400,
        "bad_request",
    );
    assert_error(
        &clone(json!({"disk": "root", "to": "c/root"})).await,
        400,
        "bad_request",
    );
    assert_error(
        &clone(json!({"disk": "web/root", "to": "c/../x"})).await,
        400,
        "bad_request",
    );
    assert_error(
        &clone(json!({"disk": "web/root"})).await,
        400,
        "bad_request",
    );
    assert_error(
        &api.post(
            &format!("/api/v1/points/{id}/rollback"),
            json!({"disk": "web/root"}),
        )
        .await,
        400,
        "confirmation_required",
    );
    assert_error(
        &api.post(
            &format!("/api/v1/points/{id}/rollback"),
            json!({"confirm": true}),
        )
        .await,
        400,
        "bad_request",
    );
    assert_error(
        &api.post("/api/v1/servers", json!({"name": "../x"})).await,
        400,
        "bad_request",
    );
    assert_error(
        &api.post("/api/v1/servers", json!({"name": "web"})).await,
        409,
        "conflict",
    );
    assert_error(
        &api.post("/api/v1/disks", json!({"disk": "noslash", "size": MIB}))
            .await,
        400,
        "bad_request",
    );
    assert_error(
        &api.post("/api/v1/disks", json!({"disk": "web/odd", "size": 1000}))
            .await,
        400,
        "bad_request",
    );
    assert_error(
        &api.post("/api/v1/disks", json!({"disk": "web/root", "size": MIB}))
            .await,
        409,
        "conflict",
    );
    assert_error(
        &api.post("/api/v1/disks", json!({"disk": "nope/root", "size": MIB}))
            .await,
        404,
        "not_found",
    );

    // Queries.
    for q in [
        "limit=0",
        "limit=1001",
        "limit=-1",
        "limit=many",
        "cursor=xyz",
        "state=bogus",
        "kind=bogus",
        "since=yesterday",
        "until=2026-13-01",
        "scope_changed=maybe",
        "colour=red",
    ] {
        let r = api.get(&format!("/api/v1/jobs?{q}")).await;
        assert_error(&r, 400, "bad_request");
    }
    assert_error(
        &api.get("/api/v1/points?kind=verify").await,
        400,
        "bad_request",
    );
    assert_error(
        &api.get("/api/v1/audit?cursor=abc").await,
        400,
        "bad_request",
    );
    assert_error(
        &api.get("/api/v1/disks?server=nope").await,
        404,
        "not_found",
    );
    // A wrong method.
    let r = api
        .call(Method::PUT, "/api/v1/policies/p", Some(json!({})))
        .await;
    assert_eq!(r.0, 405, "{}", r.1);
    let r = api.delete("/api/v1/jobs").await;
    assert_eq!(r.0, 405, "{}", r.1);
}
