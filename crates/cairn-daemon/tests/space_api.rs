//! The space object API of a real location daemon (in process: `prepare_pool`, `Db`,
//! `Host`, `Location`, the real router on a loopback port), driven through
//! `cairn_store::backend::HttpBackend` as a primary location drives it, and with raw HTTP
//! where the wire itself is the point (headers, status codes, keys a client would never
//! send).

use std::io::{Read, Write};
use std::sync::Arc;

use axum::body::Bytes;
use cairn_daemon::config::{Config, ServeArgs};
use cairn_daemon::db::Db;
use cairn_daemon::location::Location;
use cairn_daemon::schedule::{Clock, SystemClock};
use cairn_store::backend::{Backend, BackendError, HttpBackend, PutMode};
use cairn_store::create::{CreateOptions, DiskSource, ParentChoice, create_point};
use cairn_store::progress::NoProgress;
use cairn_store::restore::{RestoreOptions, restore_disk};
use cairn_volume::host::Host;
use futures::{StreamExt, TryStreamExt};

/// A standby location serving its API on a loopback port, with tokens of each role.
struct Standby {
    tmp: tempfile::TempDir,
    config: Config,
    loc: Arc<Location>,
    base: String,
    operator: String,
    viewer: String,
    admin: String,
    http: reqwest::Client,
}

impl Standby {
    async fn start() -> Standby {
        let tmp = tempfile::tempdir().unwrap();
        let config = Config::load(&ServeArgs {
            data_dir: Some(tmp.path().join("d")),
            location: Some("standby".into()),
            nbd_listen: Some("none".into()),
            ..Default::default()
        })
        .unwrap();
        cairn_daemon::prepare_pool(&config).await.unwrap();
        let dir = &config.data_dir;
        let operator = cairn_daemon::auth::create_token(dir, "primary", "operator").unwrap();
        let viewer = cairn_daemon::auth::create_token(dir, "watcher", "viewer").unwrap();
        let admin = cairn_daemon::auth::create_token(dir, "root", "admin").unwrap();
        let db = Db::open(&config.db_path()).unwrap();
        let host = Host::open(&config.pool_path()).await.unwrap();
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let loc = Location::new(config.clone(), db, host, clock);
        let (app, _doc) = cairn_daemon::api::router(loc.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Standby {
            tmp,
            config,
            loc,
            base,
            operator,
            viewer,
            admin,
            http: reqwest::Client::new(),
        }
    }

    fn backend(&self) -> HttpBackend {
        HttpBackend::new(&self.base, &self.operator).unwrap()
    }

    /// The standby's own space backend (its folder).
    fn local(&self) -> Arc<dyn Backend> {
        self.loc.host.space().unwrap().backend().clone()
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A raw request line sent as is (no URL normalisation on the way), answered whole.
    fn raw(&self, method: &str, target: &str) -> String {
        let addr = self.base.trim_start_matches("http://");
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(
            s,
            "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.operator
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }
}

/// Deterministic bytes that do not compress.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    let mut reader = h.finalize_xof();
    out.resize(len, 0);
    reader.fill(&mut out);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_round_trip_with_their_status_codes() {
    let s = Standby::start().await;
    let b = HttpBackend::connect(&s.base, &s.operator).await.unwrap();
    let addr = s.base.trim_start_matches("http://");
    assert_eq!(
        b.describe(),
        format!("cairn+http://{addr} (space of location standby)")
    );
    let info = b.space_info().await.unwrap();
    let local_space = s.loc.host.space().unwrap().clone();
    assert_eq!(info.id, local_space.config().id);
    assert_eq!(info.chunk_size, local_space.config().chunk_size);
    assert_eq!(info.api_version, 1);
    assert!(info.describe.starts_with("file://"), "{}", info.describe);

    // put, get, stat, overwrite, delete. 2 MiB: over the API's global 1 MiB body limit.
    let data = Bytes::from(noise(1, 2 << 20));
    b.put("test/one.bin", data.clone(), PutMode::CreateNew)
        .await
        .unwrap();
    assert_eq!(b.get("test/one.bin").await.unwrap(), data);
    assert_eq!(s.local().get("test/one.bin").await.unwrap(), data);
    let st = b.stat("test/one.bin").await.unwrap().unwrap();
    let local_st = s.local().stat("test/one.bin").await.unwrap().unwrap();
    assert_eq!(
        st, local_st,
        "HEAD carries the exact size and modification time"
    );
    assert_eq!(st.size, 2 << 20);

    let e = b
        .put(
            "test/one.bin",
            Bytes::from_static(b"other"),
            PutMode::CreateNew,
        )
        .await
        .unwrap_err();
    assert!(matches!(e, BackendError::AlreadyExists { .. }), "{e}");
    assert_eq!(b.get("test/one.bin").await.unwrap(), data, "not replaced");
    b.put(
        "test/one.bin",
        Bytes::from_static(b"v2"),
        PutMode::Overwrite,
    )
    .await
    .unwrap();
    assert_eq!(&b.get("test/one.bin").await.unwrap()[..], b"v2");
    b.put("test/empty", Bytes::new(), PutMode::CreateNew)
        .await
        .unwrap();
    assert_eq!(b.get("test/empty").await.unwrap().len(), 0);
    assert_eq!(b.stat("test/empty").await.unwrap().unwrap().size, 0);

    b.delete("test/one.bin").await.unwrap();
    b.delete("test/one.bin").await.unwrap(); // missing is success
    assert_eq!(b.stat("test/one.bin").await.unwrap(), None);
    let e = b.get("test/one.bin").await.unwrap_err();
    assert!(matches!(e, BackendError::NotFound { .. }), "{e}");
    let m = e.to_string();
    assert!(
        m.contains(&format!("{}/api/v1/space/objects/test/one.bin", s.base)),
        "names the remote URL and the key: {m}"
    );

    // The wire: HEAD headers, the status of each call.
    let url = s.url("/api/v1/space/objects/test/wire");
    let r = s
        .http
        .put(&url)
        .bearer_auth(&s.operator)
        .header("if-none-match", "*")
        .body(vec![7u8; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["x-cairn-space-api"], "1");
    let r = s
        .http
        .put(&url)
        .bearer_auth(&s.operator)
        .header("if-none-match", "*")
        .body(vec![7u8; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 412);
    let j: serde_json::Value = r.json().await.unwrap();
    assert_eq!(j["error"]["code"], "already_exists");
    let r = s
        .http
        .put(&url)
        .bearer_auth(&s.operator)
        .header("if-none-match", "\"abc\"")
        .body(vec![7u8; 10])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = s
        .http
        .put(&url)
        .bearer_auth(&s.operator)
        .body(vec![8u8; 10])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = s
        .http
        .put(&url)
        .bearer_auth(&s.operator)
        .body(vec![7u8; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = s
        .http
        .head(&url)
        .bearer_auth(&s.operator)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "1000");
    let t = r.headers()["x-cairn-last-modified"].to_str().unwrap();
    chrono::DateTime::parse_from_rfc3339(t).unwrap();
    assert!(
        r.headers()["last-modified"]
            .to_str()
            .unwrap()
            .ends_with(" GMT")
    );
    let r = s
        .http
        .get(&url)
        .bearer_auth(&s.operator)
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "application/octet-stream");
    assert_eq!(r.bytes().await.unwrap(), vec![7u8; 1000]);
    let r = s
        .http
        .delete(&url)
        .bearer_auth(&s.operator)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    for method in [reqwest::Method::GET, reqwest::Method::HEAD] {
        let r = s
            .http
            .request(method.clone(), &url)
            .bearer_auth(&s.operator)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{method}");
        assert_eq!(r.headers()["x-cairn-space-api"], "1");
        if method == reqwest::Method::GET {
            let j: serde_json::Value = r.json().await.unwrap();
            assert_eq!(j["error"]["code"], "not_found");
        }
    }

    // Keys outside the grammar: 400 naming the key, whatever the method.
    for (target, says) in [
        ("/api/v1/space/objects/../x", r#"\"..\" segment"#),
        ("/api/v1/space/objects/a/./b", r#"\".\" segment"#),
        ("/api/v1/space/objects/a//b", "empty segment"),
        ("/api/v1/space/objects/a%20b", "character ' '"),
        ("/api/v1/space/objects/a%2F%2Fb", "empty segment"),
    ] {
        for method in ["GET", "PUT", "DELETE"] {
            let answer = s.raw(method, target);
            assert!(
                answer.starts_with("HTTP/1.1 400"),
                "{method} {target}: {answer}"
            );
            assert!(
                answer.contains(r#""code":"bad_request""#) && answer.contains(says),
                "{method} {target}: {answer}"
            );
        }
    }
    let long = format!("/api/v1/space/objects/{}", "k".repeat(1025));
    assert!(s.raw("GET", &long).starts_with("HTTP/1.1 400"));
    // The client refuses them itself (a URL would resolve `..` before sending).
    for key in ["../x", "a//b", "a b", ""] {
        let e = b.get(key).await.unwrap_err();
        assert!(e.to_string().contains("invalid object key"), "{key:?}: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_operator_tokens_reach_the_space_and_object_requests_are_not_audited() {
    let s = Standby::start().await;
    let ok = s.backend();
    ok.put("test/x", Bytes::from_static(b"x"), PutMode::Overwrite)
        .await
        .unwrap();

    // A token the standby does not know.
    let stranger = HttpBackend::new(&s.base, "cairn_0000").unwrap();
    let e = stranger.get("test/x").await.unwrap_err();
    let m = e.to_string();
    assert!(matches!(e, BackendError::PermissionDenied { .. }), "{m}");
    assert!(
        m.contains(&format!("token rejected by cairn+{}", s.base))
            && m.contains("a valid bearer token is needed"),
        "{m}"
    );
    assert!(!m.contains("cairn_0000"), "{m}");
    let e = HttpBackend::connect(&s.base, "cairn_0000")
        .await
        .unwrap_err();
    assert!(matches!(e, BackendError::PermissionDenied { .. }), "{e}");

    // A viewer may not read raw objects, nor write them.
    let viewer = HttpBackend::new(&s.base, &s.viewer).unwrap();
    for e in [
        viewer.get("test/x").await.unwrap_err(),
        viewer
            .put("test/y", Bytes::from_static(b"y"), PutMode::CreateNew)
            .await
            .unwrap_err(),
        viewer.delete("test/x").await.unwrap_err(),
        viewer.stat("test/x").await.unwrap_err(),
        viewer.list("").try_collect::<Vec<_>>().await.unwrap_err(),
        viewer.space_info().await.unwrap_err(),
    ] {
        let m = e.to_string();
        assert!(matches!(e, BackendError::PermissionDenied { .. }), "{m}");
        assert!(
            m.contains("has role viewer; this needs operator")
                || m.contains("403: the token's role may not use the space object API (it needs role operator)"),
            "{m}"
        );
    }
    assert_eq!(s.local().stat("test/y").await.unwrap(), None);

    // No token at all.
    let r = s
        .http
        .get(s.url("/api/v1/space/objects/test/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let j: serde_json::Value = r.json().await.unwrap();
    assert_eq!(j["error"]["code"], "unauthorized");

    // A revoked token is cut off at once.
    let temp = cairn_daemon::auth::create_token(&s.config.data_dir, "temp", "operator").unwrap();
    let temp_backend = HttpBackend::new(&s.base, &temp).unwrap();
    temp_backend.stat("test/x").await.unwrap().unwrap();
    cairn_daemon::auth::revoke_token(&s.config.data_dir, "temp").unwrap();
    let e = temp_backend.stat("test/x").await.unwrap_err();
    assert!(matches!(e, BackendError::PermissionDenied { .. }), "{e}");

    // Admins may (roles are ordered).
    let admin = HttpBackend::new(&s.base, &s.admin).unwrap();
    assert_eq!(&admin.get("test/x").await.unwrap()[..], b"x");

    // Many successful object writes and deletes: none in the audit log; the refused
    // ones are.
    for i in 0..20 {
        ok.put(
            &format!("test/a{i}"),
            Bytes::from_static(b"a"),
            PutMode::CreateNew,
        )
        .await
        .unwrap();
        ok.delete(&format!("test/a{i}")).await.unwrap();
    }
    let r = s
        .http
        .get(s.url("/api/v1/audit?limit=1000"))
        .bearer_auth(&s.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let j: serde_json::Value = r.json().await.unwrap();
    let rows: Vec<(String, String, String, u64)> = j["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| {
            r["path"]
                .as_str()
                .unwrap()
                .starts_with("/api/v1/space/objects/")
        })
        .map(|r| {
            (
                r["principal"].as_str().unwrap().to_string(),
                r["method"].as_str().unwrap().to_string(),
                r["path"].as_str().unwrap().to_string(),
                r["status"].as_u64().unwrap(),
            )
        })
        .collect();
    let mut rows = rows;
    rows.sort();
    assert_eq!(
        rows,
        vec![
            (
                "watcher".into(),
                "DELETE".into(),
                "/api/v1/space/objects/test/x".into(),
                403
            ),
            (
                "watcher".into(),
                "PUT".into(),
                "/api/v1/space/objects/test/y".into(),
                403
            ),
        ],
        "{j:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_pages_through_many_objects_completely_and_exactly() {
    let s = Standby::start().await;
    let b = s.backend().with_page_size(1000);
    let keys: Vec<String> = (0..2500)
        .map(|i| format!("many/{:02x}/k{i}", i % 7))
        .collect();
    futures::stream::iter(keys.iter().cloned())
        .map(|k| {
            let b = b.clone();
            async move {
                let data = Bytes::from(k.clone().into_bytes());
                b.put(&k, data, PutMode::CreateNew).await
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<()>>()
        .await
        .unwrap();
    b.put("other/k", Bytes::from_static(b"o"), PutMode::CreateNew)
        .await
        .unwrap();

    let mut listed: Vec<_> = b.list("many/").try_collect().await.unwrap();
    assert_eq!(listed.len(), 2500);
    let mut want = keys.clone();
    want.sort();
    let got: Vec<String> = listed.iter().map(|o| o.key.clone()).collect();
    assert_eq!(got, want, "3 pages, in key order, none lost or repeated");
    // Sizes and times are what the standby's own backend lists.
    let mut local: Vec<_> = s.local().list("many/").try_collect().await.unwrap();
    local.sort_by(|a, b| a.key.cmp(&b.key));
    listed.sort_by(|a, b| a.key.cmp(&b.key));
    assert_eq!(listed, local);
    // A narrower prefix, and the whole space (default page size: one page).
    let shard: Vec<_> = b.list("many/03/").try_collect().await.unwrap();
    assert_eq!(
        shard.len(),
        keys.iter().filter(|k| k.starts_with("many/03/")).count()
    );
    let all: Vec<_> = s.backend().list("").try_collect().await.unwrap();
    assert!(all.iter().any(|o| o.key == "config.json"));
    assert!(all.iter().any(|o| o.key == "other/k"));
    assert_eq!(
        all.iter().filter(|o| o.key.starts_with("many/")).count(),
        2500
    );
    let none: Vec<_> = b.list("nothing/").try_collect().await.unwrap();
    assert!(none.is_empty());

    // The wire: a page, its `next`, the last page.
    let page = |q: &str| {
        let url = s.url(&format!("/api/v1/space/objects?{q}"));
        let req = s.http.get(url).bearer_auth(&s.operator);
        async move {
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<serde_json::Value>().await.unwrap())
        }
    };
    let (status, p1) = page("prefix=many/&limit=1000").await;
    assert_eq!(status, 200);
    let p1_keys: Vec<&str> = p1["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["key"].as_str().unwrap())
        .collect();
    assert_eq!(
        p1_keys,
        want[..1000].iter().map(String::as_str).collect::<Vec<_>>()
    );
    assert_eq!(p1["next"], want[999].as_str());
    assert!(p1["objects"][0]["size"].as_u64().unwrap() > 0);
    let (_, p3) = page(&format!("prefix=many/&limit=1000&after={}", want[1999])).await;
    assert_eq!(p3["objects"].as_array().unwrap().len(), 500);
    assert!(p3["next"].is_null());
    let (_, d) = page("prefix=many/").await;
    assert_eq!(
        d["objects"].as_array().unwrap().len(),
        1000,
        "default page size"
    );
    let (_, d) = page("prefix=many/&limit=99999").await;
    assert_eq!(
        d["objects"].as_array().unwrap().len(),
        2500,
        "capped at 10000"
    );
    for (q, says) in [
        ("prefix=many&limit=10", "ends with '/'"),
        ("prefix=../&limit=10", "segment"),
        ("prefix=many/&limit=0", "at least 1"),
        ("prefix=many/&colour=red", "unknown field"),
    ] {
        let (status, e) = page(q).await;
        assert_eq!(status, 400, "{q}");
        assert!(
            e["error"]["message"].as_str().unwrap().contains(says),
            "{q}: {e}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovery_point_is_written_and_restored_through_the_standby() {
    let s = Standby::start().await;
    let remote = Arc::new(HttpBackend::connect(&s.base, &s.operator).await.unwrap());
    let space = cairn_store::Space::open(remote.clone()).await.unwrap();
    let local_space = s.loc.host.space().unwrap().clone();
    assert_eq!(space.config(), local_space.config());
    assert!(space.describe().contains("space of location standby"));

    // A 12 MiB disk (3 chunks of 4 MiB): data, a hole, more data.
    let dir = s.tmp.path();
    let image = dir.join("root.img");
    let mut disk = vec![0u8; 12 << 20];
    disk[..(2 << 20)].copy_from_slice(&noise(2, 2 << 20));
    disk[(9 << 20)..(10 << 20)].copy_from_slice(&noise(3, 1 << 20));
    std::fs::write(&image, &disk).unwrap();
    let mut opts = CreateOptions::new(vec![DiskSource {
        name: "root".into(),
        path: image.clone(),
    }]);
    opts.server = Some("web".into());
    opts.operator = "primary".into();
    let point = create_point(&space, &opts, &NoProgress).await.unwrap();
    assert_eq!(point.stats.chunks_new, 2, "{:?}", point.stats);

    // Restored through the same remote backend, byte for byte.
    let out = dir.join("restored.img");
    restore_disk(
        &space,
        &point,
        None,
        &out,
        &RestoreOptions::default(),
        &NoProgress,
    )
    .await
    .unwrap();
    assert!(std::fs::read(&out).unwrap() == disk);

    // The standby sees the point in its own space, and restores it too.
    let ids: Vec<_> = local_space
        .list_points()
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(ids, vec![point.id]);
    let local_out = dir.join("restored-locally.img");
    restore_disk(
        &local_space,
        &point,
        None,
        &local_out,
        &RestoreOptions::default(),
        &NoProgress,
    )
    .await
    .unwrap();
    assert!(std::fs::read(&local_out).unwrap() == disk);

    // An incremental point through the remote space stores only what changed.
    disk[(9 << 20)..(9 << 20) + 4096].copy_from_slice(&[0xee; 4096]);
    std::fs::write(&image, &disk).unwrap();
    opts.parent = ParentChoice::Latest;
    let second = create_point(&space, &opts, &NoProgress).await.unwrap();
    assert_eq!(second.stats.chunks_new, 1, "{:?}", second.stats);
    let out2 = dir.join("restored2.img");
    restore_disk(
        &space,
        &second,
        None,
        &out2,
        &RestoreOptions::default(),
        &NoProgress,
    )
    .await
    .unwrap();
    assert!(std::fs::read(&out2).unwrap() == disk);
    // No lease was left behind on the standby.
    let leases: Vec<_> = s.local().list("locks/").try_collect().await.unwrap();
    assert!(leases.is_empty(), "{leases:?}");
}

/// A TCP relay in front of the standby that, for its first `lose` connections, passes
/// the request on but drops the answer and closes (an answer lost on the way back).
async fn lossy_relay(target: String, lose: usize) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut n = 0;
        loop {
            let (client, _) = listener.accept().await.unwrap();
            let server = tokio::net::TcpStream::connect(&target).await.unwrap();
            let lost = n < lose;
            n += 1;
            tokio::spawn(async move {
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = tokio::spawn(async move { tokio::io::copy(&mut cr, &mut sw).await });
                if lost {
                    let mut buf = [0u8; 1];
                    let _ = sr.read(&mut buf).await; // the server answered: drop it
                    up.abort();
                    let _ = cw.shutdown().await;
                } else {
                    let _ = tokio::io::copy(&mut sr, &mut cw).await;
                    up.abort();
                }
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_answer_is_retried_and_a_create_that_landed_is_recognised() {
    let s = Standby::start().await;
    let target = s.base.trim_start_matches("http://").to_string();

    // The first PUT lands but its answer is lost; the retry meets 412, finds the same
    // bytes stored, and succeeds.
    let relay = lossy_relay(target.clone(), 1).await;
    let b = HttpBackend::new(&relay, &s.operator)
        .unwrap()
        .with_retries(3, std::time::Duration::from_millis(20));
    let data = Bytes::from(noise(9, 100_000));
    b.put("test/landed", data.clone(), PutMode::CreateNew)
        .await
        .unwrap();
    assert_eq!(s.local().get("test/landed").await.unwrap(), data);

    // Different bytes already there: a real conflict, even after a retry.
    let relay = lossy_relay(target.clone(), 1).await;
    let b = HttpBackend::new(&relay, &s.operator)
        .unwrap()
        .with_retries(3, std::time::Duration::from_millis(20));
    let e = b
        .put(
            "test/landed",
            Bytes::from_static(b"else"),
            PutMode::CreateNew,
        )
        .await
        .unwrap_err();
    assert!(matches!(e, BackendError::AlreadyExists { .. }), "{e}");

    // Answers lost more often than the client tries: a retryable error naming the URL.
    let relay = lossy_relay(target, 10).await;
    let b = HttpBackend::new(&relay, &s.operator)
        .unwrap()
        .with_retries(3, std::time::Duration::from_millis(20));
    let e = b.get("test/landed").await.unwrap_err();
    assert!(e.is_retryable(), "{e}");
    let m = e.to_string();
    assert!(
        m.contains(&format!("{relay}/api/v1/space/objects/test/landed"))
            && m.contains("after 3 attempt(s)"),
        "{m}"
    );
}
