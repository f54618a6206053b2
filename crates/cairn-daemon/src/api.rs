//! The HTTP API: axum routes annotated for the OpenAPI document (utoipa), bearer-token
//! authentication, roles, JSON errors, the audit log and `/metrics`. Handlers parse and
//! check; the work is done by [`Location`].

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Request, State};
use axum::http::{StatusCode, request::Parts};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json, Router};
use rusqlite::params;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{Principal, Role, authenticate};
use crate::db::{now_text, parse_time};
use crate::error::{ApiError, ErrorBody};
use crate::location::{JobFilter, Location, PointsOnDelete, StartOutcome};
use crate::model::*;

/// Largest request body accepted.
pub const MAX_BODY: usize = 1 << 20;

type App = State<Arc<Location>>;
type ApiResult<T> = Result<T, ApiError>;

/// A JSON body whose rejections are JSON errors with stable codes.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(rej) => Err(json_rejection(rej)),
        }
    }
}

fn json_rejection(rej: JsonRejection) -> ApiError {
    match rej {
        JsonRejection::JsonDataError(e) => {
            let m = e.body_text();
            let m = m
                .strip_prefix("Failed to deserialize the JSON body into the target type: ")
                .unwrap_or(&m)
                .to_string();
            if m.contains("unknown field") {
                ApiError::new(StatusCode::BAD_REQUEST, "unknown_field", m)
            } else {
                ApiError::bad_request(m)
            }
        }
        JsonRejection::JsonSyntaxError(e) => ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("the body is not valid JSON: {}", e.body_text()),
        ),
        JsonRejection::MissingJsonContentType(_) => {
            ApiError::bad_request("send the body as JSON (Content-Type: application/json)")
        }
        JsonRejection::BytesRejection(e) => {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!("the body is larger than {MAX_BODY} bytes"),
                )
            } else {
                ApiError::bad_request(e.body_text())
            }
        }
        other => ApiError::bad_request(other.body_text()),
    }
}

/// Query parameters whose rejections are JSON errors.
pub struct Q<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Q<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Q(v)),
            Err(QueryRejection::FailedToDeserializeQueryString(e)) => {
                Err(ApiError::bad_request(e.body_text()))
            }
            Err(e) => Err(ApiError::bad_request(e.body_text())),
        }
    }
}

pub(crate) fn need(p: &Principal, role: Role) -> ApiResult<()> {
    if p.role >= role {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "token {} has role {}; this needs {}",
            p.name,
            p.role.as_str(),
            role.as_str()
        )))
    }
}

// ------------------------------------------------------------------ middleware

/// Authenticates every request but `/healthz`, and records state-changing requests in
/// the audit log (who, what, when, result).
async fn auth_and_audit(State(loc): App, mut req: Request, next: Next) -> Response {
    loc.counters
        .api_requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = req.uri().path().to_string();
    if path == "/healthz" {
        return next.run(req).await;
    }
    let method = req.method().clone();
    let token = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        // The scheme is case-insensitive (RFC 9110).
        .and_then(|v| {
            v.get(..7)
                .filter(|s| s.eq_ignore_ascii_case("bearer "))
                .map(|_| v[7..].trim().to_string())
        });
    let principal = match token {
        None => None,
        Some(t) => match authenticate(&loc.db, &t).await {
            Ok(p) => p,
            Err(e) => return ApiError::internal(e.to_string()).into_response(),
        },
    };
    let response = match &principal {
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid bearer token is needed (Authorization: Bearer <token>; make one on the daemon's host with `cairn token create NAME --role viewer|operator|admin --data-dir DIR`)",
        )
        .into_response(),
        Some(p) => {
            req.extensions_mut().insert(p.clone());
            next.run(req).await
        }
    };
    // Space object requests (thousands per replication) are audited only when refused.
    // So are a pair's status reports between locations (its transitions are in the
    // pair's own history).
    let quiet = (path.starts_with(crate::space_api::OBJECTS_PATH)
        || (path.starts_with("/api/v1/pairs/") && path.ends_with("/status")))
        && !matches!(response.status().as_u16(), 401 | 403);
    if method != axum::http::Method::GET && method != axum::http::Method::HEAD && !quiet {
        let who = principal.map_or_else(|| "(unauthenticated)".to_string(), |p| p.name);
        let status = response.status().as_u16();
        let r = loc
            .db
            .call(move |c| {
                c.execute(
                    "INSERT INTO audit (at, principal, method, path, status) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![now_text(), who, method.as_str(), path, status],
                )
                .map_err(crate::db::DbError::Sql)
            })
            .await;
        if let Err(e) = r {
            tracing::error!("audit log: {e}");
        }
    }
    response
}

// ------------------------------------------------------------------ handlers

#[derive(Serialize, ToSchema)]
struct Health {
    status: String,
    location: String,
}

async fn healthz(State(loc): App) -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        location: loc.config.location.clone(),
    })
}

#[derive(Serialize, ToSchema)]
struct LocationInfo {
    name: String,
    version: String,
    api_url: String,
    nbd: Option<String>,
    pool: String,
    space: String,
    running_servers: Vec<String>,
    max_jobs: usize,
}

#[utoipa::path(get, path = "/api/v1/location", tag = "location",
    responses((status = 200, body = LocationInfo), (status = "4XX", body = ErrorBody)))]
async fn location_info(State(loc): App) -> Json<LocationInfo> {
    Json(LocationInfo {
        name: loc.config.location.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        api_url: format!("http://{}", loc.config.listen),
        nbd: loc.config.nbd_listen.clone(),
        pool: loc.config.pool_path().display().to_string(),
        space: loc.config.space.clone(),
        running_servers: loc.host.running().await,
        max_jobs: loc.config.max_jobs,
    })
}

// ---- servers and disks

#[derive(Serialize, Deserialize, ToSchema)]
struct DiskView {
    /// `server/disk`
    disk: String,
    server: String,
    name: String,
    size: u64,
    created_at: String,
    /// `nbd://HOST:PORT/server/disk` while the server runs.
    export: Option<String>,
    /// Bytes written since the disk's latest point (while running).
    changed_bytes: Option<u64>,
    /// For a clone: the recovery space point it reads from until hydrated.
    clone_of: Option<String>,
    /// For a clone being hydrated: [chunks present, chunks in all].
    hydration: Option<Vec<u64>>,
}

#[derive(Serialize, Deserialize, ToSchema)]
struct ServerView {
    name: String,
    /// `running` or `stopped`.
    state: String,
    pre_hook: Option<String>,
    post_hook: Option<String>,
    created_at: String,
    disks: Vec<DiskView>,
}

async fn disk_views(loc: &Location, server: &str) -> ApiResult<Vec<DiskView>> {
    let pool = loc.host.pool();
    let running = loc.host.running().await.iter().any(|s| s == server);
    let status = if running {
        loc.host.disk_status().await
    } else {
        Vec::new()
    };
    let mut out = Vec::new();
    for d in pool.disks(server)? {
        let st = status
            .iter()
            .find(|v| v["server"] == server && v["disk"] == d.name.as_str());
        out.push(DiskView {
            disk: format!("{server}/{}", d.name),
            server: server.to_string(),
            export: match (&loc.config.nbd_listen, running) {
                (Some(a), true) => Some(format!("nbd://{a}/{server}/{}", d.name)),
                _ => None,
            },
            changed_bytes: st.and_then(|v| v["changed_bytes"].as_u64()),
            clone_of: d.origin.as_ref().map(|o| o.point.to_string()),
            hydration: st.and_then(|v| {
                v["hydration"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|x| x.as_u64()).collect())
            }),
            name: d.name,
            size: d.size,
            created_at: d.created_at.to_rfc3339(),
        });
    }
    Ok(out)
}

async fn server_view(loc: &Location, name: &str) -> ApiResult<ServerView> {
    let meta = loc.host.pool().server(name)?;
    let running = loc.host.running().await.iter().any(|s| s == name);
    Ok(ServerView {
        state: if running { "running" } else { "stopped" }.to_string(),
        pre_hook: meta.pre_hook,
        post_hook: meta.post_hook,
        created_at: meta.created_at.to_rfc3339(),
        disks: disk_views(loc, name).await?,
        name: meta.name,
    })
}

#[utoipa::path(get, path = "/api/v1/servers", tag = "servers",
    responses((status = 200, body = Vec<ServerView>), (status = "4XX", body = ErrorBody)))]
async fn list_servers(State(loc): App) -> ApiResult<Json<Vec<ServerView>>> {
    let mut out = Vec::new();
    for s in loc.host.pool().servers()? {
        out.push(server_view(&loc, &s.name).await?);
    }
    Ok(Json(out))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct NewServer {
    name: String,
    pre_hook: Option<String>,
    post_hook: Option<String>,
}

#[utoipa::path(post, path = "/api/v1/servers", tag = "servers", request_body = NewServer,
    responses((status = 201, body = ServerView), (status = "4XX", body = ErrorBody)))]
async fn create_server(
    State(loc): App,
    Extension(p): Extension<Principal>,
    Body(b): Body<NewServer>,
) -> ApiResult<(StatusCode, Json<ServerView>)> {
    need(&p, Role::Admin)?;
    loc.host
        .pool()
        .create_server(&b.name, b.pre_hook, b.post_hook)?;
    Ok((StatusCode::CREATED, Json(server_view(&loc, &b.name).await?)))
}

#[utoipa::path(get, path = "/api/v1/servers/{server}", tag = "servers",
    params(("server" = String, Path)),
    responses((status = 200, body = ServerView), (status = "4XX", body = ErrorBody)))]
async fn get_server(State(loc): App, Path(server): Path<String>) -> ApiResult<Json<ServerView>> {
    Ok(Json(server_view(&loc, &server).await?))
}

#[utoipa::path(delete, path = "/api/v1/servers/{server}", tag = "servers",
    params(("server" = String, Path)),
    responses((status = 200, body = serde_json::Value), (status = "4XX", body = ErrorBody)))]
async fn delete_server(
    State(loc): App,
    Extension(p): Extension<Principal>,
    Path(server): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    need(&p, Role::Admin)?;
    if loc.host.running().await.contains(&server) {
        return Err(ApiError::conflict(format!(
            "server {server} is running; stop it first"
        )));
    }
    loc.host.pool().delete_server(&server)?;
    Ok(Json(serde_json::json!({"deleted": server})))
}

#[utoipa::path(post, path = "/api/v1/servers/{server}/start", tag = "servers",
    params(("server" = String, Path)),
    responses((status = 200, body = ServerView), (status = "4XX", body = ErrorBody)))]
async fn start_server(
    State(loc): App,
    Extension(p): Extension<Principal>,
    Path(server): Path<String>,
) -> ApiResult<Json<ServerView>> {
    need(&p, Role::Operator)?;
    loc.host.start(&server).await?;
    Ok(Json(server_view(&loc, &server).await?))
}

#[utoipa::path(post, path = "/api/v1/servers/{server}/stop", tag = "servers",
    params(("server" = String, Path)),
    responses((status = 200, body = ServerView), (status = "4XX", body = ErrorBody)))]
async fn stop_server(
    State(loc): App,
    Extension(p): Extension<Principal>,
    Path(server): Path<String>,
) -> ApiResult<Json<ServerView>> {
    need(&p, Role::Operator)?;
    loc.host.stop(&server).await?;
    Ok(Json(server_view(&loc, &server).await?))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
struct DiskQuery {
    server: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/disks", tag = "disks", params(DiskQuery),
    responses((status = 200, body = Vec<DiskView>), (status = "4XX", body = ErrorBody)))]
async fn list_disks(State(loc): App, Q(q): Q<DiskQuery>) -> ApiResult<Json<Vec<DiskView>>> {
    let servers = match q.server {
        Some(s) => vec![loc.host.pool().server(&s)?.name],
        None => loc
            .host
            .pool()
            .servers()?
            .into_iter()
            .map(|s| s.name)
            .collect(),
    };
    let mut out = Vec::new();
    for s in servers {
        out.extend(disk_views(&loc, &s).await?);
    }
    Ok(Json(out))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct NewDisk {
    /// `server/disk`
    disk: String,
    /// Bytes (a multiple of 512).
    size: u64,
}

#[utoipa::path(post, path = "/api/v1/disks", tag = "disks", request_body = NewDisk,
    responses((status = 201, body = DiskView), (status = "4XX", body = ErrorBody)))]
async fn create_disk(
    State(loc): App,
    Extension(p): Extension<Principal>,
    Body(b): Body<NewDisk>,
) -> ApiResult<(StatusCode, Json<DiskView>)> {
    need(&p, Role::Admin)?;
    let (s, d) = cairn_volume::pool::parse_disk_spec(&b.disk)?;
    if loc.host.running().await.contains(&s) {
        return Err(ApiError::conflict(format!(
            "server {s} is running; stop it to add a disk"
        )));
    }
    let pool = loc.host.pool().clone();
    let (s2, d2) = (s.clone(), d.clone());
    tokio::task::spawn_blocking(move || cairn_volume::host::create_disk(&pool, &s2, &d2, b.size))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
    let view = disk_views(&loc, &s)
        .await?
        .into_iter()
        .find(|v| v.name == d)
        .ok_or_else(|| ApiError::internal("disk vanished"))?;
    Ok((StatusCode::CREATED, Json(view)))
}

#[utoipa::path(get, path = "/api/v1/disks/{server}/{disk}", tag = "disks",
    params(("server" = String, Path), ("disk" = String, Path)),
    responses((status = 200, body = DiskView), (status = "4XX", body = ErrorBody)))]
async fn get_disk(
    State(loc): App,
    Path((server, disk)): Path<(String, String)>,
) -> ApiResult<Json<DiskView>> {
    loc.host.pool().disk(&server, &disk)?;
    disk_views(&loc, &server)
        .await?
        .into_iter()
        .find(|v| v.name == disk)
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no disk {server}/{disk}")))
}

#[utoipa::path(delete, path = "/api/v1/disks/{server}/{disk}", tag = "disks",
    params(("server" = String, Path), ("disk" = String, Path)),
    responses((status = 200, body = serde_json::Value), (status = "4XX", body = ErrorBody)))]
async fn delete_disk(
    State(loc): App,
    Extension(p): Extension<Principal>,
    Path((server, disk)): Path<(String, String)>,
) -> ApiResult<Json<serde_json::Value>> {
    need(&p, Role::Admin)?;
    if loc.host.running().await.contains(&server) {
        return Err(ApiError::conflict(format!(
            "server {server} is running; stop it to delete its disk"
        )));
    }
    let origin = cairn_volume::host::delete_disk(loc.host.pool(), &server, &disk)?;
    if let Some(o) = origin
        && let Ok(space) = loc.host.space()
    {
        cairn_volume::host::unpin(space, &o).await?;
    }
    Ok(Json(
        serde_json::json!({"deleted": format!("{server}/{disk}")}),
    ))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct GrowDisk {
    size: u64,
}

#[utoipa::path(post, path = "/api/v1/disks/{server}/{disk}/grow", tag = "disks",
    params(("server" = String, Path), ("disk" = String, Path)), request_body = GrowDisk,
    responses((status = 200, body = DiskView), (status = "4XX", body = ErrorBody)))]
async fn grow_disk(
    State(loc): App,
    Extension(p): Extension<Principal>,
    Path((server, disk)): Path<(String, String)>,
    Body(b): Body<GrowDisk>,
) -> ApiResult<Json<DiskView>> {
    need(&p, Role::Admin)?;
    if loc.host.running().await.contains(&server) {
        return Err(ApiError::conflict(format!(
            "server {server} is running; stop it to grow its disk"
        )));
    }
    cairn_volume::host::grow_disk(loc.host.pool(), &server, &disk, b.size)?;
    get_disk(State(loc), Path((server, disk))).await
}

#[utoipa::path(post, path = "/api/v1/disks/{server}/{disk}/hydrate", tag = "disks",
    params(("server" = String, Path), ("disk" = String, Path)),
    responses((status = 202, body = serde_json::Value), (status = "4XX", body = ErrorBody)))]
async fn hydrate_disk(
    State(loc): App,
    Extension(p): Extension<Principal>,
    Path((server, disk)): Path<(String, String)>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    need(&p, Role::Operator)?;
    let meta = loc.host.pool().disk(&server, &disk)?;
    if meta.origin.is_none() {
        return Ok((
            StatusCode::OK,
            Json(serde_json::json!({"disk": format!("{server}/{disk}"), "hydrated": true})),
        ));
    }
    let l = loc.clone();
    let (s2, d2) = (server.clone(), disk.clone());
    tokio::spawn(async move {
        if let Err(e) = l
            .host
            .hydrate(&s2, &d2, &cairn_store::progress::NoProgress)
            .await
        {
            tracing::warn!("{s2}/{d2}: hydration: {e}");
        }
    });
    Ok((
        StatusCode::ACCEPTED,
        Json(
            serde_json::json!({"disk": format!("{server}/{disk}"), "hydrated": false, "message": "hydration started; GET the disk for progress"}),
        ),
    ))
}

// ---- policies

#[utoipa::path(get, path = "/api/v1/policies", tag = "policies",
    responses((status = 200, body = Vec<Policy>), (status = "4XX", body = ErrorBody)))]
async fn list_policies(State(loc): App) -> ApiResult<Json<Vec<Policy>>> {
    Ok(Json(loc.list_policies().await?))
}

#[utoipa::path(post, path = "/api/v1/policies", tag = "policies", request_body = PolicySpec,
    responses((status = 201, body = Policy), (status = "4XX", body = ErrorBody)))]
async fn create_policy(
    State(loc): App,
    Extension(p): Extension<Principal>,
    Body(spec): Body<PolicySpec>,
) -> ApiResult<(StatusCode, Json<Policy>)> {
    need(&p, Role::Admin)?;
    Ok((StatusCode::CREATED, Json(loc.create_policy(spec).await?)))
}

#[utoipa::path(get, path = "/api/v1/policies/{policy}", tag = "policies",
    params(("policy" = String, Path, description = "name or id")),
    responses((status = 200, body = Policy), (status = "4XX", body = ErrorBody)))]
async fn get_policy(State(loc): App, Path(policy): Path<String>) -> ApiResult<Json<Policy>> {
    Ok(Json(loc.get_policy(&policy).await?))
}

#[utoipa::path(patch, path = "/api/v1/policies/{policy}", tag = "policies",
    params(("policy" = String, Path)), request_body = PolicyPatch,
    responses((status = 200, body = Policy), (status = "4XX", body = ErrorBody)))]
async fn update_policy(
    State(loc): App,
    Extension(p): Extension<Principal>,
    Path(policy): Path<String>,
    Body(patch): Body<PolicyPatch>,
) -> ApiResult<Json<Policy>> {
    need(&p, Role::Admin)?;
    loc.not_a_pair_policy(&policy).await?;
    Ok(Json(loc.update_policy(&policy, patch).await?))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
struct DeletePolicyQuery {
    /// `keep` or `delete`: what happens to the policy's recovery points. Required.
    points: Option<String>,
}

#[utoipa::path(delete, path = "/api/v1/policies/{policy}", tag = "policies",
    params(("policy" = String, Path), DeletePolicyQuery),
    responses((status = 200, body = serde_json::Value), (status = "4XX", body = ErrorBody)))]
async fn delete_policy(
    State(loc): App,
    Extension(p): Extension<Principal>,
    Path(policy): Path<String>,
    Q(q): Q<DeletePolicyQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    need(&p, Role::Admin)?;
    let mode = match q.points.as_deref() {
        Some("keep") => PointsOnDelete::Keep,
        Some("delete") => PointsOnDelete::Delete,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "points={other}: use points=keep or points=delete"
            )));
        }
        None => {
            return Err(ApiError::confirmation_required(
                "say what to do with the policy's recovery points: points=keep or points=delete (delete is permanent)",
            ));
        }
    };
    loc.not_a_pair_policy(&policy).await?;
    Ok(Json(loc.delete_policy(&policy, mode, &p).await?))
}

#[utoipa::path(post, path = "/api/v1/policies/{policy}/pause", tag = "policies",
    params(("policy" = String, Path)),
    responses((status = 200, body = Policy), (status = "4XX", body = ErrorBody)))]
async fn pause_policy(
    State(loc): App,
    Extension(p): Extension<Principal>,
    Path(policy): Path<String>,
) -> ApiResult<Json<Policy>> {
    need(&p, Role::Admin)?;
    loc.not_a_pair_policy(&policy).await?;
    Ok(Json(loc.set_enabled(&policy, false).await?))
}

#[utoipa::path(post, path = "/api/v1/policies/{policy}/resume", tag = "policies",
    params(("policy" = String, Path)),
    responses((status = 200, body = Policy), (status = "4XX", body = ErrorBody)))]
async fn resume_policy(
    State(loc): App,
    Extension(p): Extension<Principal>,
    Path(policy): Path<String>,
) -> ApiResult<Json<Policy>> {
    need(&p, Role::Admin)?;
    loc.not_a_pair_policy(&policy).await?;
    Ok(Json(loc.set_enabled(&policy, true).await?))
}

#[utoipa::path(post, path = "/api/v1/policies/{policy}/replicate-now", tag = "policies",
    params(("policy" = String, Path)),
    responses((status = 202, body = StartOutcome), (status = "4XX", body = ErrorBody)))]
async fn replicate_now(
    State(loc): App,
    Extension(p): Extension<Principal>,
    Path(policy): Path<String>,
) -> ApiResult<(StatusCode, Json<StartOutcome>)> {
    need(&p, Role::Operator)?;
    let row = loc.policy_row(&policy).await?;
    let out = loc.start_replication(&row, "manual", &p.name, None).await?;
    Ok((StatusCode::ACCEPTED, Json(out)))
}

#[utoipa::path(post, path = "/api/v1/policies/{policy}/verify", tag = "policies",
    params(("policy" = String, Path)),
    responses((status = 202, body = Job), (status = "4XX", body = ErrorBody)))]
async fn verify_policy(
    State(loc): App,
    Extension(p): Extension<Principal>,
    Path(policy): Path<String>,
) -> ApiResult<(StatusCode, Json<Job>)> {
    need(&p, Role::Operator)?;
    let job = loc.start_verify(None, Some(&policy), &p.name).await?;
    Ok((StatusCode::ACCEPTED, Json(job)))
}

// ---- jobs and points

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// Policy name or id.
    policy: Option<String>,
    /// replication, verify or gc (jobs only).
    kind: Option<String>,
    /// queued, running, succeeded, failed, skipped.
    state: Option<String>,
    /// `server/disk` (points only).
    disk: Option<String>,
    /// Only points whose protection scope changed (points only).
    scope_changed: Option<bool>,
    /// RFC 3339: jobs queued at or after.
    since: Option<String>,
    /// RFC 3339: jobs queued before.
    until: Option<String>,
    /// At most this many (default 100, at most 1000).
    limit: Option<usize>,
    /// From a previous page's `next_cursor`.
    cursor: Option<String>,
}

fn filter_of(q: ListQuery) -> ApiResult<JobFilter> {
    let time = |k: &str, v: Option<String>| -> ApiResult<_> {
        v.map(|s| {
            parse_time(&s)
                .ok_or_else(|| ApiError::bad_request(format!("{k}={s:?} is not an RFC 3339 time")))
        })
        .transpose()
    };
    Ok(JobFilter {
        policy: q.policy,
        kind: q
            .kind
            .map(|k| {
                JobKind::parse(&k).ok_or_else(|| {
                    ApiError::bad_request(format!("kind={k}: use replication, verify or gc"))
                })
            })
            .transpose()?,
        state: q
            .state
            .map(|s| {
                JobState::parse(&s).ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "state={s}: use queued, running, succeeded, failed or skipped"
                    ))
                })
            })
            .transpose()?,
        disk: q.disk,
        scope_changed: q.scope_changed,
        since: time("since", q.since)?,
        until: time("until", q.until)?,
        limit: match q.limit {
            Some(0) => return Err(ApiError::bad_request("limit must be at least 1")),
            Some(n) if n > 1000 => return Err(ApiError::bad_request("limit is at most 1000")),
            Some(n) => n,
            None => 100,
        },
        cursor: q
            .cursor
            .map(|c| {
                c.parse::<i64>()
                    .map_err(|_| ApiError::bad_request(format!("cursor {c:?} is not one we gave")))
            })
            .transpose()?,
    })
}

#[utoipa::path(get, path = "/api/v1/jobs", tag = "jobs", params(ListQuery),
    responses((status = 200, body = Page<Job>), (status = "4XX", body = ErrorBody)))]
async fn list_jobs(State(loc): App, Q(q): Q<ListQuery>) -> ApiResult<Json<Page<Job>>> {
    Ok(Json(loc.list_jobs(&filter_of(q)?).await?))
}

#[utoipa::path(get, path = "/api/v1/jobs/{job}", tag = "jobs",
    params(("job" = String, Path, description = "id or unique prefix")),
    responses((status = 200, body = Job), (status = "4XX", body = ErrorBody)))]
async fn get_job(State(loc): App, Path(job): Path<String>) -> ApiResult<Json<Job>> {
    Ok(Json(loc.get_job(&job).await?))
}

#[utoipa::path(get, path = "/api/v1/points", tag = "points", params(ListQuery),
    responses((status = 200, body = Page<Job>), (status = "4XX", body = ErrorBody)))]
async fn list_points(State(loc): App, Q(q): Q<ListQuery>) -> ApiResult<Json<Page<Job>>> {
    if q.kind.is_some() {
        return Err(ApiError::bad_request(
            "kind is not a filter of points (every point is a replication job)",
        ));
    }
    let mut f = filter_of(q)?;
    f.kind = Some(JobKind::Replication);
    Ok(Json(loc.list_jobs(&f).await?))
}

#[utoipa::path(get, path = "/api/v1/points/{point}", tag = "points",
    params(("point" = String, Path, description = "job id, unique prefix, or space point id")),
    responses((status = 200, body = Job), (status = "4XX", body = ErrorBody)))]
async fn get_point(State(loc): App, Path(point): Path<String>) -> ApiResult<Json<Job>> {
    Ok(Json(loc.get_point(&point).await?))
}

#[utoipa::path(delete, path = "/api/v1/points/{point}", tag = "points",
    params(("point" = String, Path)),
    responses((status = 200, body = Job), (status = "4XX", body = ErrorBody)))]
async fn delete_point(
    State(loc): App,
    Extension(p): Extension<Principal>,
    Path(point): Path<String>,
) -> ApiResult<Json<Job>> {
    need(&p, Role::Admin)?;
    Ok(Json(loc.delete_point(&point, &p).await?))
}

#[utoipa::path(post, path = "/api/v1/points/{point}/verify", tag = "points",
    params(("point" = String, Path)),
    responses((status = 202, body = Job), (status = "4XX", body = ErrorBody)))]
async fn verify_point(
    State(loc): App,
    Extension(p): Extension<Principal>,
    Path(point): Path<String>,
) -> ApiResult<(StatusCode, Json<Job>)> {
    need(&p, Role::Operator)?;
    let job = loc.start_verify(Some(&point), None, &p.name).await?;
    Ok((StatusCode::ACCEPTED, Json(job)))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CloneRequest {
    /// The point's disk, `server/disk`.
    disk: String,
    /// The new disk, `server/disk` (the server is created if it does not exist).
    to: String,
    /// Start the new disk's server (export it over NBD) at once. Default true.
    start: Option<bool>,
}

#[utoipa::path(post, path = "/api/v1/points/{point}/clone", tag = "points",
    params(("point" = String, Path)), request_body = CloneRequest,
    responses((status = 201, body = serde_json::Value), (status = "4XX", body = ErrorBody)))]
async fn clone_point(
    State(loc): App,
    Extension(p): Extension<Principal>,
    Path(point): Path<String>,
    Body(b): Body<CloneRequest>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    need(&p, Role::Operator)?;
    let out = loc
        .clone_point(&point, &b.disk, &b.to, b.start.unwrap_or(true))
        .await?;
    Ok((StatusCode::CREATED, Json(out)))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct RollbackRequest {
    /// One disk, `server/disk`.
    disk: Option<String>,
    /// Or every disk of a server that the point holds.
    server: Option<String>,
    /// Must be true: rollback overwrites the disk and cannot be undone.
    confirm: Option<bool>,
}

#[utoipa::path(post, path = "/api/v1/points/{point}/rollback", tag = "points",
    params(("point" = String, Path)), request_body = RollbackRequest,
    responses((status = 200, body = serde_json::Value), (status = "4XX", body = ErrorBody)))]
async fn rollback_point(
    State(loc): App,
    Extension(p): Extension<Principal>,
    Path(point): Path<String>,
    Body(b): Body<RollbackRequest>,
) -> ApiResult<Json<serde_json::Value>> {
    need(&p, Role::Admin)?;
    if b.confirm != Some(true) {
        return Err(ApiError::confirmation_required(
            "rollback overwrites the disk with the point's content and cannot be undone: send \"confirm\": true",
        ));
    }
    Ok(Json(
        loc.rollback_point(&point, b.disk.as_deref(), b.server.as_deref())
            .await?,
    ))
}

#[derive(Serialize, ToSchema)]
struct AuditEntry {
    seq: i64,
    at: String,
    principal: String,
    method: String,
    path: String,
    status: u16,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    limit: Option<usize>,
    cursor: Option<i64>,
}

#[utoipa::path(get, path = "/api/v1/audit", tag = "audit", params(AuditQuery),
    responses((status = 200, body = Page<AuditEntry>), (status = "4XX", body = ErrorBody)))]
async fn audit(
    State(loc): App,
    Extension(p): Extension<Principal>,
    Q(q): Q<AuditQuery>,
) -> ApiResult<Json<Page<AuditEntry>>> {
    need(&p, Role::Admin)?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let cursor = q.cursor.unwrap_or(i64::MAX);
    let mut rows = loc
        .db
        .call(move |c| {
            let mut st = c
                .prepare_cached(
                    "SELECT seq, at, principal, method, path, status FROM audit WHERE seq < ?1 ORDER BY seq DESC LIMIT ?2",
                )
                .map_err(crate::db::DbError::Sql)?;
            let rows = st
                .query_map(params![cursor, i64::try_from(limit + 1).unwrap_or(1001)], |r| {
                    Ok(AuditEntry {
                        seq: r.get(0)?,
                        at: r.get(1)?,
                        principal: r.get(2)?,
                        method: r.get(3)?,
                        path: r.get(4)?,
                        status: r.get(5)?,
                    })
                })
                .map_err(crate::db::DbError::Sql)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(crate::db::DbError::Sql)?;
            Ok(rows)
        })
        .await?;
    let next_cursor = if rows.len() > limit {
        rows.truncate(limit);
        rows.last().map(|r| r.seq.to_string())
    } else {
        None
    };
    Ok(Json(Page {
        items: rows,
        next_cursor,
    }))
}

async fn metrics(State(loc): App) -> ApiResult<Response> {
    let text = crate::metrics::render(&loc).await?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// Errors that axum's own extractors answer in plain text (a path segment that is not
/// UTF-8, for one) are turned into the JSON error form with a stable code.
async fn json_errors(req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let text = axum::body::to_bytes(response.into_body(), 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let code = match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::CONFLICT => "conflict",
        StatusCode::UNPROCESSABLE_ENTITY => "unprocessable",
        s if s.is_client_error() => "bad_request",
        _ => "internal",
    };
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    ApiError::new(status, code, message).into_response()
}

async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(format!(
        "no such endpoint: {} {}",
        req.method(),
        req.uri().path()
    ))
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Cairn location API", description = "Replication policies, jobs, recovery points, servers and disks of one Cairn location. Every endpoint needs `Authorization: Bearer <token>`."),
    modifiers(&Security),
    security(("bearer" = []))
)]
struct ApiDoc;

struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The router and the OpenAPI document it was generated with.
pub fn router(loc: Arc<Location>) -> (Router, utoipa::openapi::OpenApi) {
    let (api, doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(location_info))
        .routes(routes!(list_servers, create_server))
        .routes(routes!(get_server, delete_server))
        .routes(routes!(start_server))
        .routes(routes!(stop_server))
        .routes(routes!(list_disks, create_disk))
        .routes(routes!(get_disk, delete_disk))
        .routes(routes!(grow_disk))
        .routes(routes!(hydrate_disk))
        .routes(routes!(list_policies, create_policy))
        .routes(routes!(get_policy, update_policy, delete_policy))
        .routes(routes!(pause_policy))
        .routes(routes!(resume_policy))
        .routes(routes!(replicate_now))
        .routes(routes!(verify_policy))
        .routes(routes!(list_jobs))
        .routes(routes!(get_job))
        .routes(routes!(list_points))
        .routes(routes!(get_point, delete_point))
        .routes(routes!(verify_point))
        .routes(routes!(clone_point))
        .routes(routes!(rollback_point))
        .routes(routes!(audit))
        .routes(routes!(
            crate::pair_api::list_locations,
            crate::pair_api::add_location
        ))
        .routes(routes!(crate::pair_api::remove_location))
        .routes(routes!(
            crate::pair_api::list_pairs,
            crate::pair_api::create_pair
        ))
        .routes(routes!(crate::pair_api::register_standby))
        .routes(routes!(
            crate::pair_api::get_pair,
            crate::pair_api::delete_pair
        ))
        .routes(routes!(crate::pair_api::forget_pair))
        .routes(routes!(crate::pair_api::pair_replicate_now))
        .routes(routes!(crate::pair_api::pause_pair))
        .routes(routes!(crate::pair_api::resume_pair))
        .routes(routes!(crate::pair_api::restart_pair))
        .routes(routes!(crate::pair_api::failover_pair))
        .routes(routes!(crate::pair_api::drill_pair))
        .routes(routes!(crate::pair_api::drill_cleanup))
        .routes(routes!(crate::pair_api::pair_status))
        .routes(routes!(crate::pair_api::reverse_pair))
        .routes(routes!(crate::pair_api::become_standby))
        .split_for_parts();
    let doc_json = Arc::new(doc.to_pretty_json().unwrap_or_default());
    let app = api
        .route(
            "/api/v1/openapi.json",
            axum::routing::get(move || {
                let d = doc_json.clone();
                async move {
                    (
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        (*d).clone(),
                    )
                }
            }),
        )
        .route("/metrics", axum::routing::get(metrics))
        .route("/healthz", axum::routing::get(healthz))
        .merge(crate::space_api::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(loc.clone(), auth_and_audit))
        .layer(middleware::from_fn(json_errors))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(loc);
    (app, doc)
}
