//! Calls to another location's API (a registered location: its URL and a token of it).
//! Errors name the location and keep the remote's stable code, so that "the standby
//! refused" reads differently from "the standby is unreachable".

use std::time::Duration;

use axum::http::StatusCode;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// A client of one other location.
#[derive(Clone)]
pub struct Peer {
    pub name: String,
    pub url: String,
    token: String,
    http: reqwest::Client,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        write!(f, "Peer({} at {})", self.name, self.url)
    }
}

impl Peer {
    pub fn new(name: &str, url: &str, token: &str, timeout: Duration) -> Result<Peer, ApiError> {
        let url = url.trim_end_matches('/').to_string();
        let parsed = reqwest::Url::parse(&url).map_err(|e| {
            ApiError::bad_request(format!(
                "{url:?} is not a URL like http://10.0.0.2:7070: {e}"
            ))
        })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(ApiError::bad_request(format!(
                "{url:?}: only http:// and https:// locations are supported"
            )));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(timeout)
            .build()
            .map_err(|e| ApiError::internal(e.to_string()))?;
        Ok(Peer {
            name: name.to_string(),
            url,
            token: token.to_string(),
            http,
        })
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        self.call(reqwest::Method::GET, path, None::<&()>).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ApiError> {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn put<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ApiError> {
        self.call(reqwest::Method::PUT, path, Some(body)).await
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ApiError> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| self.unreachable(&e))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| self.unreachable(&e))?;
        if status.is_success() {
            let body = if bytes.is_empty() {
                &b"null"[..]
            } else {
                &bytes[..]
            };
            return serde_json::from_slice(body).map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "location_error",
                    format!(
                        "location {} ({}) answered {path} with something unexpected: {e}",
                        self.name, self.url
                    ),
                )
            });
        }
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        let code = v["error"]["code"].as_str().unwrap_or("location_error");
        let message = v["error"]["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
        let status = StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        let (status, code) = match (status, code) {
            // Our token there is wrong: that is this location's configuration problem,
            // not the caller's credentials here.
            (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN, _) => {
                (StatusCode::BAD_GATEWAY, "location_token_refused")
            }
            (s, c) => (s, leak(c)),
        };
        Err(ApiError::new(
            status,
            code,
            format!("location {} ({}): {message}", self.name, self.url),
        ))
    }

    fn unreachable(&self, e: &reqwest::Error) -> ApiError {
        let mut cause = e.to_string();
        let mut src = std::error::Error::source(e);
        while let Some(s) = src {
            cause = s.to_string();
            src = s.source();
        }
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "location_unreachable",
            format!(
                "location {} is unreachable at {}: {cause}",
                self.name, self.url
            ),
        )
    }
}

/// The stable codes a peer may answer, as `'static` strings (unknown ones collapse).
fn leak(code: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "bad_request",
        "not_found",
        "conflict",
        "unprocessable",
        "confirmation_required",
        "standby_not_ready",
        "unknown_field",
        "invalid_json",
        "shutting_down",
        "internal",
        "damaged",
    ];
    KNOWN
        .iter()
        .find(|k| **k == code)
        .copied()
        .unwrap_or("location_error")
}
