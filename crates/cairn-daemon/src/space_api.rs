//! The space object API (v1): this location's recovery space, object by object, for
//! another location that writes recovery points into it (`cairn_store::backend::
//! HttpBackend` is its client). docs/FORMAT.md, "Space object API (v1)", is the contract.
//!
//! Every endpoint needs role `operator`: the token holder may read, write and delete any
//! object of the space. The object endpoints are a pass-through to the space's
//! [`Backend`](cairn_store::Backend) (there is no decision for `Location` to make); keys
//! are checked against the key grammar before anything is touched. Successful object
//! requests are not written to the audit log (a replication writes thousands of chunks);
//! refused ones (401, 403) are.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Request, State};
use axum::handler::Handler;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use cairn_store::backend::http::{
    LAST_MODIFIED_HEADER, ListPage, ListedObject, MAX_LIST_PAGE, RemoteSpaceInfo, SPACE_API_HEADER,
    check_list_prefix, check_object_key,
};
use cairn_store::backend::{BackendError, PutMode};
use futures::StreamExt;
use serde::Deserialize;

use crate::api::{Q, need};
use crate::auth::{Principal, Role};
use crate::error::ApiError;
use crate::location::Location;

/// Largest object a `PUT` accepts (the global body limit is 1 MiB).
pub const MAX_OBJECT_BODY: usize = 256 << 20;

/// Requests under this path are object requests (not audited unless refused).
pub const OBJECTS_PATH: &str = "/api/v1/space/objects/";

/// Objects a list page holds when the request does not say.
pub const DEFAULT_LIST_PAGE: usize = 1000;

type App = State<Arc<Location>>;
type ApiResult<T> = Result<T, ApiError>;

/// The routes of the space object API (authentication comes from the router they are
/// merged into).
pub fn routes() -> Router<Arc<Location>> {
    Router::new()
        .route("/api/v1/space", get(space_info))
        .route("/api/v1/space/objects", get(list_objects))
        .route(
            "/api/v1/space/objects/{*key}",
            get(get_object)
                .head(head_object)
                .put(put_object.layer(DefaultBodyLimit::max(MAX_OBJECT_BODY)))
                .delete(delete_object),
        )
        .layer(axum::middleware::map_response(mark))
}

/// Marks every answer as the space object API's, so a client tells a missing object
/// from a server without this API.
async fn mark(mut r: Response) -> Response {
    r.headers_mut()
        .insert(SPACE_API_HEADER, HeaderValue::from_static("1"));
    r
}

/// How a backend failure of this location's space is answered. A permission problem of
/// the space itself is a 500 (`space_permission`), not a 403, which would read as a
/// problem with the caller's token.
fn backend_error(e: BackendError) -> ApiError {
    let m = e.to_string();
    match e {
        BackendError::NotFound { .. } => ApiError::not_found(m),
        BackendError::AlreadyExists { .. } => {
            ApiError::new(StatusCode::PRECONDITION_FAILED, "already_exists", m)
        }
        BackendError::NoSpace { .. } => {
            ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "no_space", m)
        }
        BackendError::PermissionDenied { .. } => {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "space_permission", m)
        }
        BackendError::Io {
            retryable: true, ..
        } => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "space_unavailable", m),
        BackendError::Io { .. } => ApiError::new(StatusCode::BAD_GATEWAY, "space_error", m),
    }
}

fn space(loc: &Location) -> ApiResult<&Arc<cairn_store::Space>> {
    loc.host.space().map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "space_unavailable",
            e.to_string(),
        )
    })
}

fn checked(key: &str) -> ApiResult<()> {
    check_object_key(key).map_err(|e| ApiError::bad_request(e.to_string()))
}

async fn space_info(
    State(loc): App,
    Extension(p): Extension<Principal>,
) -> ApiResult<Json<RemoteSpaceInfo>> {
    need(&p, Role::Operator)?;
    let space = space(&loc)?;
    let config = space.config();
    Ok(Json(RemoteSpaceInfo {
        location: loc.config.location.clone(),
        id: config.id,
        chunk_size: config.chunk_size,
        compression_level: config.compression_level,
        describe: space.describe(),
        api_version: 1,
    }))
}

async fn get_object(
    State(loc): App,
    Extension(p): Extension<Principal>,
    Path(key): Path<String>,
) -> ApiResult<Response> {
    need(&p, Role::Operator)?;
    checked(&key)?;
    let data = space(&loc)?
        .backend()
        .get(&key)
        .await
        .map_err(backend_error)?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], data).into_response())
}

async fn head_object(
    State(loc): App,
    Extension(p): Extension<Principal>,
    Path(key): Path<String>,
) -> ApiResult<Response> {
    need(&p, Role::Operator)?;
    checked(&key)?;
    let info = space(&loc)?
        .backend()
        .stat(&key)
        .await
        .map_err(backend_error)?
        .ok_or_else(|| ApiError::not_found(format!("{key}: not found")))?;
    let t = info.last_modified;
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, info.size.to_string()),
            (
                header::LAST_MODIFIED,
                t.format("%a, %d %b %Y %H:%M:%S GMT").to_string(),
            ),
        ],
        [(
            LAST_MODIFIED_HEADER,
            t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
        )],
    )
        .into_response())
}

/// `If-None-Match: *` creates the object only if it is absent (412 otherwise); without
/// it the object is replaced. The role is checked before the body is read.
async fn put_object(
    State(loc): App,
    Extension(p): Extension<Principal>,
    Path(key): Path<String>,
    req: Request,
) -> ApiResult<StatusCode> {
    need(&p, Role::Operator)?;
    checked(&key)?;
    let mode = match req.headers().get(header::IF_NONE_MATCH) {
        None => PutMode::Overwrite,
        Some(v) if v.as_bytes() == b"*" => PutMode::CreateNew,
        Some(_) => {
            return Err(ApiError::bad_request(
                "If-None-Match: only * (create if absent) is supported",
            ));
        }
    };
    let space = space(&loc)?.clone();
    let data = Bytes::from_request(req, &()).await.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("an object is at most {MAX_OBJECT_BODY} bytes"),
            )
        } else {
            ApiError::bad_request(format!("cannot read the object's bytes: {}", e.body_text()))
        }
    })?;
    space
        .backend()
        .put(&key, data, mode)
        .await
        .map_err(backend_error)?;
    Ok(match mode {
        PutMode::CreateNew => StatusCode::CREATED,
        PutMode::Overwrite => StatusCode::NO_CONTENT,
    })
}

async fn delete_object(
    State(loc): App,
    Extension(p): Extension<Principal>,
    Path(key): Path<String>,
) -> ApiResult<StatusCode> {
    need(&p, Role::Operator)?;
    checked(&key)?;
    space(&loc)?
        .backend()
        .delete(&key)
        .await
        .map_err(backend_error)?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// Empty, or a key followed by `/`.
    #[serde(default)]
    prefix: String,
    /// Only keys after this one (the `next` of the previous page).
    after: Option<String>,
    /// 1–10000 (more is taken as 10000); default 1000.
    limit: Option<usize>,
}

/// One page of the objects under a prefix, sorted by key. The backend lists in no order,
/// so each page reads the whole listing and keeps the `limit + 1` smallest keys after
/// `after`: memory is bounded by the page, time is one listing per page.
async fn list_objects(
    State(loc): App,
    Extension(p): Extension<Principal>,
    Q(q): Q<ListQuery>,
) -> ApiResult<Json<ListPage>> {
    need(&p, Role::Operator)?;
    check_list_prefix(&q.prefix).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let limit = match q.limit {
        Some(0) => return Err(ApiError::bad_request("limit must be at least 1")),
        Some(n) => n.min(MAX_LIST_PAGE),
        None => DEFAULT_LIST_PAGE,
    };
    let mut page: BTreeMap<String, ListedObject> = BTreeMap::new();
    let mut listing = space(&loc)?.backend().list(&q.prefix);
    while let Some(item) = listing.next().await {
        let o = item.map_err(backend_error)?;
        if !o.key.starts_with(&q.prefix) || q.after.as_deref().is_some_and(|a| o.key.as_str() <= a)
        {
            continue;
        }
        if page.len() > limit && page.last_key_value().is_some_and(|(k, _)| o.key >= *k) {
            continue;
        }
        page.insert(
            o.key.clone(),
            ListedObject {
                key: o.key,
                size: o.size,
                last_modified: o.last_modified,
            },
        );
        if page.len() > limit + 1 {
            page.pop_last();
        }
    }
    let next = if page.len() > limit {
        page.pop_last();
        page.last_key_value().map(|(k, _)| k.clone())
    } else {
        None
    };
    Ok(Json(ListPage {
        objects: page.into_values().collect(),
        next,
    }))
}
