//! HTTP routes of other locations and DR pairs (see `pairs.rs` for what they do).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::Deserialize;
use utoipa::ToSchema;

use crate::api::{Body, need};
use crate::auth::{Principal, Role};
use crate::error::{ApiError, ErrorBody};
use crate::location::{Location, StartOutcome};
use crate::model::*;

type App = State<Arc<Location>>;
type ApiResult<T> = Result<T, ApiError>;

#[utoipa::path(get, path = "/api/v1/locations", tag = "locations",
    responses((status = 200, body = Vec<RemoteLocation>), (status = "4XX", body = ErrorBody)))]
pub async fn list_locations(State(loc): App) -> ApiResult<Json<Vec<RemoteLocation>>> {
    Ok(Json(loc.list_locations().await?))
}

#[utoipa::path(post, path = "/api/v1/locations", tag = "locations", request_body = LocationSpec,
    responses((status = 201, body = RemoteLocation), (status = "4XX", body = ErrorBody)))]
pub async fn add_location(
    State(loc): App,
    Extension(p): Extension<Principal>,
    Body(spec): Body<LocationSpec>,
) -> ApiResult<(StatusCode, Json<RemoteLocation>)> {
    need(&p, Role::Admin)?;
    Ok((StatusCode::CREATED, Json(loc.add_location(spec, &p).await?)))
}

#[utoipa::path(delete, path = "/api/v1/locations/{name}", tag = "locations",
    params(("name" = String, Path)),
    responses((status = 204), (status = "4XX", body = ErrorBody)))]
pub async fn remove_location(
    State(loc): App,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    need(&p, Role::Admin)?;
    loc.remove_location(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/pairs", tag = "pairs",
    responses((status = 200, body = Vec<Pair>), (status = "4XX", body = ErrorBody)))]
pub async fn list_pairs(State(loc): App) -> ApiResult<Json<Vec<Pair>>> {
    Ok(Json(loc.list_pairs().await?))
}

#[utoipa::path(post, path = "/api/v1/pairs", tag = "pairs", request_body = PairSpec,
    responses((status = 201, body = Pair), (status = "4XX", body = ErrorBody)))]
pub async fn create_pair(
    State(loc): App,
    Extension(p): Extension<Principal>,
    Body(spec): Body<PairSpec>,
) -> ApiResult<(StatusCode, Json<Pair>)> {
    need(&p, Role::Admin)?;
    Ok((StatusCode::CREATED, Json(loc.create_pair(spec, &p).await?)))
}

#[utoipa::path(get, path = "/api/v1/pairs/{pair}", tag = "pairs",
    params(("pair" = String, Path)),
    responses((status = 200, body = Pair), (status = "4XX", body = ErrorBody)))]
pub async fn get_pair(State(loc): App, Path(pair): Path<String>) -> ApiResult<Json<Pair>> {
    Ok(Json(loc.get_pair(&pair).await?))
}

#[utoipa::path(post, path = "/api/v1/pairs/{pair}/replicate-now", tag = "pairs",
    params(("pair" = String, Path)),
    responses((status = 202, body = StartOutcome), (status = "4XX", body = ErrorBody)))]
pub async fn pair_replicate_now(
    State(loc): App,
    Extension(p): Extension<Principal>,
    Path(pair): Path<String>,
) -> ApiResult<(StatusCode, Json<StartOutcome>)> {
    need(&p, Role::Operator)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(loc.pair_replicate_now(&pair, &p).await?),
    ))
}

#[utoipa::path(post, path = "/api/v1/pairs/{pair}/pause", tag = "pairs",
    params(("pair" = String, Path)),
    responses((status = 200, body = Pair), (status = "4XX", body = ErrorBody)))]
pub async fn pause_pair(
    State(loc): App,
    Extension(p): Extension<Principal>,
    Path(pair): Path<String>,
) -> ApiResult<Json<Pair>> {
    need(&p, Role::Admin)?;
    Ok(Json(loc.pause_pair(&pair, &p).await?))
}

#[utoipa::path(post, path = "/api/v1/pairs/{pair}/resume", tag = "pairs",
    params(("pair" = String, Path)),
    responses((status = 200, body = Pair), (status = "4XX", body = ErrorBody)))]
pub async fn resume_pair(
    State(loc): App,
    Extension(p): Extension<Principal>,
    Path(pair): Path<String>,
) -> ApiResult<Json<Pair>> {
    need(&p, Role::Admin)?;
    Ok(Json(loc.resume_pair(&pair, &p).await?))
}

/// Restart Replication: must say `"confirm": true`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestartRequest {
    pub confirm: Option<bool>,
}

#[utoipa::path(post, path = "/api/v1/pairs/{pair}/restart", tag = "pairs",
    params(("pair" = String, Path)), request_body = RestartRequest,
    responses((status = 200, body = Pair), (status = "4XX", body = ErrorBody)))]
pub async fn restart_pair(
    State(loc): App,
    Extension(p): Extension<Principal>,
    Path(pair): Path<String>,
    Body(b): Body<RestartRequest>,
) -> ApiResult<Json<Pair>> {
    need(&p, Role::Admin)?;
    if b.confirm != Some(true) {
        return Err(ApiError::confirmation_required(format!(
            "Restart Replication permanently deletes every recovery point of DR pair {pair} and copies the whole server again: send \"confirm\": true (CLI: --yes)"
        )));
    }
    Ok(Json(loc.restart_pair(&pair, &p).await?))
}

#[utoipa::path(post, path = "/api/v1/pairs/{pair}/failover", tag = "pairs",
    params(("pair" = String, Path)), request_body = FailoverRequest,
    responses((status = 200, body = serde_json::Value), (status = "4XX", body = ErrorBody)))]
pub async fn failover_pair(
    State(loc): App,
    Extension(p): Extension<Principal>,
    Path(pair): Path<String>,
    Body(b): Body<FailoverRequest>,
) -> ApiResult<Json<serde_json::Value>> {
    need(&p, Role::Admin)?;
    Ok(Json(loc.failover_pair(&pair, b, &p, false).await?))
}

#[utoipa::path(post, path = "/api/v1/pairs/{pair}/drill", tag = "pairs",
    params(("pair" = String, Path)), request_body = FailoverRequest,
    responses((status = 200, body = serde_json::Value), (status = "4XX", body = ErrorBody)))]
pub async fn drill_pair(
    State(loc): App,
    Extension(p): Extension<Principal>,
    Path(pair): Path<String>,
    Body(b): Body<FailoverRequest>,
) -> ApiResult<Json<serde_json::Value>> {
    need(&p, Role::Operator)?;
    if b.confirm.is_some() {
        return Err(ApiError::bad_request(
            "a drill needs no confirmation (it changes nothing of the pair): leave out \"confirm\"",
        ));
    }
    Ok(Json(loc.failover_pair(&pair, b, &p, true).await?))
}

#[utoipa::path(post, path = "/api/v1/pairs/{pair}/drill-cleanup", tag = "pairs",
    params(("pair" = String, Path)),
    responses((status = 200, body = Pair), (status = "4XX", body = ErrorBody)))]
pub async fn drill_cleanup(
    State(loc): App,
    Extension(p): Extension<Principal>,
    Path(pair): Path<String>,
) -> ApiResult<Json<Pair>> {
    need(&p, Role::Operator)?;
    Ok(Json(loc.drill_cleanup(&pair, &p).await?))
}

#[utoipa::path(post, path = "/api/v1/pairs/standby", tag = "pairs",
    request_body = StandbyRegistration,
    responses((status = 201, body = Pair), (status = "4XX", body = ErrorBody)))]
pub async fn register_standby(
    State(loc): App,
    Extension(p): Extension<Principal>,
    Body(reg): Body<StandbyRegistration>,
) -> ApiResult<(StatusCode, Json<Pair>)> {
    need(&p, Role::Operator)?;
    Ok((
        StatusCode::CREATED,
        Json(loc.register_standby(reg, &p).await?),
    ))
}

#[utoipa::path(put, path = "/api/v1/pairs/{pair}/status", tag = "pairs",
    params(("pair" = String, Path)), request_body = PairStatus,
    responses((status = 200, body = serde_json::Value), (status = "4XX", body = ErrorBody)))]
pub async fn pair_status(
    State(loc): App,
    Extension(p): Extension<Principal>,
    Path(pair): Path<String>,
    Body(st): Body<PairStatus>,
) -> ApiResult<Json<serde_json::Value>> {
    need(&p, Role::Operator)?;
    loc.receive_status(&pair, st).await?;
    Ok(Json(serde_json::json!({"ok": true})))
}

/// Reverse a failed-over pair (failback, step 1): must say `"confirm": true`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReverseRequest {
    pub confirm: Option<bool>,
    /// The reversed replication's schedule (default: every 15 minutes).
    #[serde(default)]
    pub schedule: Option<ScheduleSpec>,
}

#[utoipa::path(post, path = "/api/v1/pairs/{pair}/reverse", tag = "pairs",
    params(("pair" = String, Path)), request_body = ReverseRequest,
    responses((status = 200, body = Pair), (status = "4XX", body = ErrorBody)))]
pub async fn reverse_pair(
    State(loc): App,
    Extension(p): Extension<Principal>,
    Path(pair): Path<String>,
    Body(b): Body<ReverseRequest>,
) -> ApiResult<Json<Pair>> {
    need(&p, Role::Admin)?;
    if b.confirm != Some(true) {
        return Err(ApiError::confirmation_required(format!(
            "reversing DR pair {pair} makes this location the primary and the old primary the standby: its server there is overwritten by the next failover back; send \"confirm\": true (CLI: --yes)"
        )));
    }
    Ok(Json(loc.reverse_pair(&pair, b.schedule, &p).await?))
}

#[utoipa::path(post, path = "/api/v1/pairs/{pair}/become-standby", tag = "pairs",
    params(("pair" = String, Path)), request_body = crate::pairs::BecomeStandby,
    responses((status = 200, body = serde_json::Value), (status = "4XX", body = ErrorBody)))]
pub async fn become_standby(
    State(loc): App,
    Extension(p): Extension<Principal>,
    Path(pair): Path<String>,
    Body(b): Body<crate::pairs::BecomeStandby>,
) -> ApiResult<Json<serde_json::Value>> {
    need(&p, Role::Operator)?;
    Ok(Json(loc.become_standby(&pair, b, &p).await?))
}

/// `DELETE /pairs/{pair}?points=keep|delete` (`points` is required).
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct DeletePairQuery {
    pub points: Option<String>,
}

#[utoipa::path(delete, path = "/api/v1/pairs/{pair}", tag = "pairs",
    params(("pair" = String, Path), DeletePairQuery),
    responses((status = 200, body = serde_json::Value), (status = "4XX", body = ErrorBody)))]
pub async fn delete_pair(
    State(loc): App,
    Extension(p): Extension<Principal>,
    Path(pair): Path<String>,
    crate::api::Q(q): crate::api::Q<DeletePairQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    need(&p, Role::Admin)?;
    let delete = match q.points.as_deref() {
        Some("keep") => false,
        Some("delete") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "points={other}: use points=keep or points=delete"
            )));
        }
        None => {
            return Err(ApiError::confirmation_required(
                "say what to do with the pair's recovery points: points=keep or points=delete (delete is permanent)",
            ));
        }
    };
    Ok(Json(loc.delete_pair(&pair, delete, &p).await?))
}

#[utoipa::path(post, path = "/api/v1/pairs/{pair}/forget", tag = "pairs",
    params(("pair" = String, Path)),
    responses((status = 204), (status = "4XX", body = ErrorBody)))]
pub async fn forget_pair(
    State(loc): App,
    Extension(p): Extension<Principal>,
    Path(pair): Path<String>,
) -> ApiResult<StatusCode> {
    need(&p, Role::Operator)?;
    loc.forget_pair(&pair).await?;
    Ok(StatusCode::NO_CONTENT)
}
