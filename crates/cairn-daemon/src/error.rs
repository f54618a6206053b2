//! Errors as the API answers them: an HTTP status, a stable code and words.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable: bad_request, invalid_json, unknown_field,
    /// payload_too_large, unauthorized, forbidden, not_found, conflict,
    /// confirmation_required, unprocessable, space_unavailable, damaged, shutting_down,
    /// internal; standby_not_ready, location_unreachable, location_token_refused,
    /// location_error; already_exists, no_space, space_permission, space_error.
    pub code: String,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    pub fn bad_request(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", m)
    }
    pub fn not_found(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", m)
    }
    pub fn conflict(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, "conflict", m)
    }
    pub fn unprocessable(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "unprocessable", m)
    }
    pub fn forbidden(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", m)
    }
    /// Nothing was done: the request must say `"confirm": true` (or choose).
    pub fn confirmation_required(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "confirmation_required", m)
    }
    pub fn internal(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", m)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
            },
        };
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<crate::db::DbError> for ApiError {
    fn from(e: crate::db::DbError) -> ApiError {
        ApiError::internal(e.to_string())
    }
}

impl From<cairn_store::SpaceError> for ApiError {
    fn from(e: cairn_store::SpaceError) -> ApiError {
        use cairn_store::SpaceError as E;
        let m = e.to_string();
        match &e {
            E::Pinned { .. } => ApiError::conflict(m),
            E::PointNotFound(_) | E::NoPoints => ApiError::not_found(m),
            E::AmbiguousPoint { .. } | E::DiskNotInPoint { .. } | E::DiskNotChosen { .. } => {
                ApiError::bad_request(m)
            }
            E::Busy { .. } => ApiError::conflict(m),
            _ if e.is_damage() => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "damaged", m),
            E::Backend(b) if b.is_retryable() => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "space_unavailable", m)
            }
            _ => ApiError::unprocessable(m),
        }
    }
}

impl From<cairn_volume::VolumeError> for ApiError {
    fn from(e: cairn_volume::VolumeError) -> ApiError {
        use cairn_volume::VolumeError as E;
        let m = e.to_string();
        match e {
            E::Space(s) => s.into(),
            _ if e.is_damage() => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "damaged", m),
            E::InUse { .. }
            | E::Running { .. }
            | E::NotRunning { .. }
            | E::DiskExists { .. }
            | E::ServerExists(_)
            | E::ServerHasDisks { .. } => ApiError::conflict(m),
            E::NoServer { .. } | E::NoDisk { .. } => ApiError::not_found(m),
            E::Name(_) | E::DiskSpec(_) | E::BadSize { .. } | E::WrongLocation { .. } => {
                ApiError::bad_request(m)
            }
            _ => ApiError::unprocessable(m),
        }
    }
}
