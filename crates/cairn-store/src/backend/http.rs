//! [`Backend`] over another location's space object API (`/api/v1/space/objects`).
//!
//! A primary location writes recovery points into the recovery space of a standby
//! location through the standby daemon's HTTP API, with a bearer token of the standby
//! (role `operator`). The standby's space may itself be a folder or S3: this backend sees
//! only the API, which maps one to one onto the [`Backend`] calls (docs/FORMAT.md, "Space
//! object API (v1)"):
//!
//! | call | request | outcome |
//! |---|---|---|
//! | `get` | `GET objects/KEY` | 200 bytes; 404 → `NotFound` |
//! | `stat` | `HEAD objects/KEY` | 200 `content-length`, `x-cairn-last-modified`; 404 → `None` |
//! | `put` | `PUT objects/KEY` (+ `If-None-Match: *` for `CreateNew`) | 201/204; 412 → `AlreadyExists`; 507 → `NoSpace` |
//! | `delete` | `DELETE objects/KEY` | 204 (missing is success) |
//! | `list` | `GET objects?prefix=P&after=K&limit=N` | pages sorted by key, followed by `next` |
//!
//! 401 and 403 become `PermissionDenied` naming the remote location ("token rejected
//! by …"). Connect errors, timeouts, 429 and 5xx are retried with exponential backoff and
//! jitter (5 attempts from 100 ms by default); other 4xx are not. A `CreateNew` put that
//! was retried and then meets 412 compares the stored object with its own bytes: equal
//! means the earlier attempt landed, so it succeeds (a chunk or record put twice is the
//! same object).
//!
//! The token is never shown: not in [`Backend::describe`], not in `Debug`, not in errors.

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use reqwest::header::{AUTHORIZATION, CONTENT_LENGTH, HeaderMap, HeaderValue, IF_NONE_MATCH};
use reqwest::{Method, StatusCode, Url};

use super::{Backend, BackendError, ObjectInfo, PutMode};

/// Longest object key the API accepts, in bytes.
pub const MAX_OBJECT_KEY_LEN: usize = 1024;

/// Objects a list page holds at most (the server's limit).
pub const MAX_LIST_PAGE: usize = 10_000;

/// The header every response of the space object API carries (`1`), so a client can tell
/// "this object is missing" from "this server has no space object API".
pub const SPACE_API_HEADER: &str = "x-cairn-space-api";

/// The header that carries an object's modification time (RFC 3339, nanoseconds).
pub const LAST_MODIFIED_HEADER: &str = "x-cairn-last-modified";

/// An object key the space object API refuses. The key grammar: 1–1024 bytes of
/// `/`-separated segments of `[A-Za-z0-9._-]`, no empty segment, no `.` or `..` segment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid object key {shown}: {reason} (a key is 1-{MAX_OBJECT_KEY_LEN} bytes of /-separated segments of A-Z a-z 0-9 . _ -, with no empty, . or .. segment)"
)]
pub struct InvalidObjectKey {
    /// The key as shown: quoted, escaped and cut at 128 characters.
    pub shown: String,
    pub reason: String,
}

/// Checks an object key against the grammar of the space object API.
pub fn check_object_key(key: &str) -> Result<(), InvalidObjectKey> {
    let fail = |reason: String| {
        let cut: String = key.chars().take(128).collect();
        let more = if cut.len() < key.len() { "…" } else { "" };
        Err(InvalidObjectKey {
            shown: format!("{cut:?}{more}"),
            reason,
        })
    };
    if key.is_empty() {
        return fail("it is empty".into());
    }
    if key.len() > MAX_OBJECT_KEY_LEN {
        return fail(format!("it is {} bytes long", key.len()));
    }
    if let Some(c) = key
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/')))
    {
        return fail(format!("it holds the character {c:?}"));
    }
    for segment in key.split('/') {
        match segment {
            "" => return fail("it has an empty segment".into()),
            "." | ".." => return fail(format!("it has a {segment:?} segment")),
            _ => {}
        }
    }
    Ok(())
}

/// Checks a list prefix: empty, or a valid key followed by `/`.
pub fn check_list_prefix(prefix: &str) -> Result<(), InvalidObjectKey> {
    if prefix.is_empty() {
        return Ok(());
    }
    match prefix.strip_suffix('/') {
        Some(p) => check_object_key(p),
        None => Err(InvalidObjectKey {
            shown: format!("{prefix:?}"),
            reason: "a list prefix is empty or ends with '/'".into(),
        }),
    }
}

/// What `GET /api/v1/space` says about a location's space.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RemoteSpaceInfo {
    /// The name of the location whose space this is.
    pub location: String,
    /// The space's id (its config's `id`).
    pub id: uuid::Uuid,
    pub chunk_size: u32,
    pub compression_level: i32,
    /// Where that location stores its space (its backend's `describe()`).
    pub describe: String,
    /// The space object API's version (1).
    pub api_version: u32,
}

/// One entry of a list page.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ListedObject {
    pub key: String,
    pub size: u64,
    pub last_modified: chrono::DateTime<chrono::Utc>,
}

/// A page of `GET /api/v1/space/objects`: objects sorted by key; `next` (the last key of
/// this page) is the `after` of the next page, absent on the last page.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ListPage {
    pub objects: Vec<ListedObject>,
    pub next: Option<String>,
}

/// How failed requests are tried again.
#[derive(Debug, Clone, Copy)]
struct RetryPolicy {
    attempts: u32,
    first_delay: Duration,
}

/// A recovery space reached through another location's space object API.
#[derive(Clone)]
pub struct HttpBackend {
    client: reqwest::Client,
    /// `http://HOST:PORT[/PATH]`, no trailing `/`.
    base: String,
    /// `Authorization: Bearer …`, marked sensitive.
    auth: HeaderValue,
    /// The remote location's name, once `space_info` has learnt it.
    location: Arc<OnceLock<String>>,
    retry: RetryPolicy,
    page_size: usize,
}

impl fmt::Debug for HttpBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpBackend")
            .field("base", &self.base)
            .field("location", &self.location.get())
            .field("token", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// A request's final answer (after retries).
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    /// Requests sent, counting retries.
    attempts: u32,
}

impl Answer {
    /// Whether the space object API itself answered (not a proxy or an older daemon).
    fn by_space_api(&self) -> bool {
        self.headers.contains_key(SPACE_API_HEADER)
    }

    /// The `{"error":{"code","message"}}` of an error answer, or the body as text.
    fn error(&self) -> (String, String) {
        #[derive(serde::Deserialize)]
        struct Body {
            error: Detail,
        }
        #[derive(serde::Deserialize)]
        struct Detail {
            code: String,
            message: String,
        }
        match serde_json::from_slice::<Body>(&self.body) {
            Ok(b) => (b.error.code, b.error.message),
            Err(_) => {
                let text = String::from_utf8_lossy(&self.body);
                let text: String = text.trim().chars().take(300).collect();
                (String::new(), text)
            }
        }
    }
}

impl HttpBackend {
    /// A backend for the space of the location whose API is at `base_url`
    /// (`http://127.0.0.1:7071`, or `https://…` behind a TLS proxy), with a bearer token
    /// of that location (role `operator`). Nothing is sent yet; [`HttpBackend::connect`]
    /// also checks the token and learns the location's name.
    pub fn new(base_url: &str, token: &str) -> Result<HttpBackend, BackendError> {
        // Whatever stands before an `@` (user:password) is never shown.
        let shown = match (base_url.split_once("://"), base_url.rsplit_once('@')) {
            (Some((scheme, _)), Some((_, rest))) => format!("{scheme}://…@{rest}"),
            _ => base_url.to_string(),
        };
        let bad = |detail: String| BackendError::Io {
            key: "location API URL".into(),
            detail,
            retryable: false,
        };
        let url = Url::parse(base_url).map_err(|e| {
            bad(format!(
                "{shown:?} is not a URL ({e}); use http://HOST:PORT or https://HOST:PORT"
            ))
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(bad(format!(
                "{shown:?}: use http://HOST:PORT or https://HOST:PORT"
            )));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(bad(format!(
                "{shown:?}: give the token separately, not in the URL"
            )));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(bad(format!("{shown:?}: no query or fragment, please")));
        }
        let token = token.trim();
        if token.is_empty() {
            return Err(bad(format!(
                "no token for the location at {shown}: give a token of that location (role operator)"
            )));
        }
        let mut auth = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
            bad(format!(
                "the token for the location at {shown} holds characters a header cannot carry"
            ))
        })?;
        auth.set_sensitive(true);
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(300))
            .build()
            .map_err(|e| bad(format!("cannot build an HTTP client: {e}")))?;
        Ok(HttpBackend {
            client,
            base: url.as_str().trim_end_matches('/').to_string(),
            auth,
            location: Arc::new(OnceLock::new()),
            retry: RetryPolicy {
                attempts: 5,
                first_delay: Duration::from_millis(100),
            },
            page_size: MAX_LIST_PAGE,
        })
    }

    /// [`HttpBackend::new`], then [`HttpBackend::space_info`]: fails early on a wrong URL
    /// or token, and names the remote location in `describe()`.
    pub async fn connect(base_url: &str, token: &str) -> Result<HttpBackend, BackendError> {
        let backend = Self::new(base_url, token)?;
        backend.space_info().await?;
        Ok(backend)
    }

    /// Tries each request `attempts` times in all, waiting `first_delay`, then twice as
    /// long each time (plus up to half of it at random).
    #[must_use]
    pub fn with_retries(mut self, attempts: u32, first_delay: Duration) -> Self {
        self.retry = RetryPolicy {
            attempts: attempts.max(1),
            first_delay,
        };
        self
    }

    /// Objects asked for per list page (1–10000; default 10000).
    #[must_use]
    pub fn with_page_size(mut self, objects: usize) -> Self {
        self.page_size = objects.clamp(1, MAX_LIST_PAGE);
        self
    }

    /// The remote location's space: its id, chunk size and where it is stored. Also
    /// checks the token (role operator).
    pub async fn space_info(&self) -> Result<RemoteSpaceInfo, BackendError> {
        let url = self.url("/api/v1/space", "")?;
        let answer = self.exchange(Method::GET, &url, None, false).await?;
        if !answer.status.is_success() {
            return Err(self.failure(&answer, &Method::GET, &url));
        }
        let info: RemoteSpaceInfo =
            serde_json::from_slice(&answer.body).map_err(|e| BackendError::Io {
                key: url.to_string(),
                detail: format!(
                    "{} answered something that is not a space description: {e}",
                    self.shown()
                ),
                retryable: false,
            })?;
        let _ = self.location.set(info.location.clone());
        Ok(info)
    }

    /// `cairn+http://HOST:PORT`.
    fn shown(&self) -> String {
        format!("cairn+{}", self.base)
    }

    fn url(&self, path: &str, key: &str) -> Result<Url, BackendError> {
        Url::parse(&format!("{}{path}{key}", self.base)).map_err(|e| BackendError::Io {
            key: key.to_string(),
            detail: format!("cannot form a URL on {}: {e}", self.shown()),
            retryable: false,
        })
    }

    fn object_url(&self, key: &str) -> Result<Url, BackendError> {
        check_object_key(key).map_err(|e| BackendError::Io {
            key: format!(
                "{} at {}",
                key.chars().take(128).collect::<String>(),
                self.shown()
            ),
            detail: e.to_string(),
            retryable: false,
        })?;
        self.url("/api/v1/space/objects/", key)
    }

    /// Sends a request, reading the whole answer, and tries again on connect errors,
    /// timeouts, 429 and 5xx (but not on the space's own non-retryable 502 or its
    /// permission 500). Returns the final answer, whatever its status.
    async fn exchange(
        &self,
        method: Method,
        url: &Url,
        body: Option<&Bytes>,
        create_new: bool,
    ) -> Result<Answer, BackendError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut req = self
                .client
                .request(method.clone(), url.clone())
                .header(AUTHORIZATION, self.auth.clone());
            if create_new {
                req = req.header(IF_NONE_MATCH, "*");
            }
            if let Some(b) = body {
                req = req.body(b.clone());
            }
            let outcome = match req.send().await {
                Ok(resp) => {
                    let status = resp.status();
                    let headers = resp.headers().clone();
                    match resp.bytes().await {
                        Ok(body) => Ok(Answer {
                            status,
                            headers,
                            body,
                            attempts: attempt,
                        }),
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(e),
            };
            let transient = match &outcome {
                Ok(a) => retryable_status(a),
                Err(e) => !e.is_builder() && !e.is_redirect(),
            };
            if !transient || attempt >= self.retry.attempts {
                return match outcome {
                    Ok(a) => Ok(a),
                    Err(e) => Err(BackendError::Io {
                        key: url.to_string(),
                        detail: format!(
                            "{method} failed after {attempt} attempt(s): {}",
                            error_chain(&e)
                        ),
                        retryable: !e.is_builder(),
                    }),
                };
            }
            let delay = self.retry.first_delay * 2u32.saturating_pow(attempt - 1);
            tracing::debug!(%url, attempt, ?delay, "space object API request failed; retrying");
            tokio::time::sleep(delay + jitter(delay / 2)).await;
        }
    }

    /// The error a final non-success answer means.
    fn failure(&self, a: &Answer, method: &Method, url: &Url) -> BackendError {
        let (code, message) = a.error();
        let key = url.to_string();
        let status = a.status;
        match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                // A HEAD answer has no body to say why.
                let message = match (message.is_empty(), status) {
                    (false, _) => message,
                    (true, StatusCode::UNAUTHORIZED) => "401: the token is unknown or revoked".into(),
                    (true, _) => "403: the token's role may not use the space object API (it needs role operator)".into(),
                };
                BackendError::PermissionDenied {
                    key,
                    detail: format!("token rejected by {}: {message}", self.shown()),
                }
            }
            StatusCode::NOT_FOUND if a.by_space_api() => BackendError::NotFound { key },
            StatusCode::NOT_FOUND => BackendError::Io {
                key,
                detail: format!(
                    "{} does not serve the space object API (is it a cairn location of this version?): {message}",
                    self.shown()
                ),
                retryable: false,
            },
            StatusCode::PRECONDITION_FAILED => BackendError::AlreadyExists { key },
            StatusCode::INSUFFICIENT_STORAGE => BackendError::NoSpace { key },
            StatusCode::INTERNAL_SERVER_ERROR if code == "space_permission" => {
                BackendError::PermissionDenied {
                    key,
                    detail: format!("{} cannot use its own space: {message}", self.shown()),
                }
            }
            _ => BackendError::Io {
                detail: format!(
                    "{method} answered {}{}: {message}",
                    status.as_u16(),
                    if code.is_empty() {
                        String::new()
                    } else {
                        format!(" {code}")
                    },
                ),
                retryable: retryable_status(a),
                key,
            },
        }
    }

    async fn list_page(&self, prefix: &str, after: Option<&str>) -> Result<ListPage, BackendError> {
        let mut url = self.url("/api/v1/space/objects", "")?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("prefix", prefix);
            if let Some(a) = after {
                q.append_pair("after", a);
            }
            q.append_pair("limit", &self.page_size.to_string());
        }
        let a = self.exchange(Method::GET, &url, None, false).await?;
        if !a.status.is_success() {
            return Err(self.failure(&a, &Method::GET, &url));
        }
        let page: ListPage = serde_json::from_slice(&a.body).map_err(|e| BackendError::Io {
            key: url.to_string(),
            detail: format!("not a list page: {e}"),
            retryable: false,
        })?;
        // A page that does not move forward would loop for ever.
        if let (Some(next), Some(after)) = (&page.next, after)
            && next.as_str() <= after
        {
            return Err(BackendError::Io {
                key: url.to_string(),
                detail: format!("the list went backwards (next {next:?} after {after:?})"),
                retryable: false,
            });
        }
        Ok(page)
    }
}

/// 429, 500 (but not the space's permission error), 502 (but not the space's own
/// non-retryable failure), 503, 504.
fn retryable_status(a: &Answer) -> bool {
    match a.status {
        StatusCode::TOO_MANY_REQUESTS
        | StatusCode::SERVICE_UNAVAILABLE
        | StatusCode::GATEWAY_TIMEOUT => true,
        StatusCode::INTERNAL_SERVER_ERROR => a.error().0 != "space_permission",
        StatusCode::BAD_GATEWAY => !a.by_space_api(),
        _ => false,
    }
}

/// A random wait in `[0, max)`.
fn jitter(max: Duration) -> Duration {
    let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
    if nanos == 0 {
        return Duration::ZERO;
    }
    let r = u64::from_le_bytes(
        uuid::Uuid::new_v4().as_bytes()[..8]
            .try_into()
            .expect("8 bytes"),
    );
    Duration::from_nanos(r % nanos)
}

/// An error with its causes (reqwest's own message says little: "error sending request").
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !out.contains(&s_text) {
            out.push_str(": ");
            out.push_str(&s_text);
        }
        source = s.source();
    }
    out
}

#[async_trait::async_trait]
impl Backend for HttpBackend {
    fn describe(&self) -> String {
        match self.location.get() {
            Some(name) => format!("{} (space of location {name})", self.shown()),
            None => format!("{} (space of a remote location)", self.shown()),
        }
    }

    async fn get(&self, key: &str) -> Result<Bytes, BackendError> {
        let url = self.object_url(key)?;
        let a = self.exchange(Method::GET, &url, None, false).await?;
        if a.status.is_success() {
            Ok(a.body)
        } else {
            Err(self.failure(&a, &Method::GET, &url))
        }
    }

    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> Result<(), BackendError> {
        let url = self.object_url(key)?;
        let create_new = mode == PutMode::CreateNew;
        let a = self
            .exchange(Method::PUT, &url, Some(&data), create_new)
            .await?;
        if a.status.is_success() {
            return Ok(());
        }
        if a.status == StatusCode::PRECONDITION_FAILED && a.attempts > 1 {
            // An earlier attempt may have landed before its answer was lost.
            if let Ok(stored) = self.get(key).await
                && stored == data
            {
                return Ok(());
            }
        }
        Err(self.failure(&a, &Method::PUT, &url))
    }

    async fn delete(&self, key: &str) -> Result<(), BackendError> {
        let url = self.object_url(key)?;
        let a = self.exchange(Method::DELETE, &url, None, false).await?;
        if a.status.is_success() || (a.status == StatusCode::NOT_FOUND && a.by_space_api()) {
            Ok(())
        } else {
            Err(self.failure(&a, &Method::DELETE, &url))
        }
    }

    async fn stat(&self, key: &str) -> Result<Option<ObjectInfo>, BackendError> {
        let url = self.object_url(key)?;
        let a = self.exchange(Method::HEAD, &url, None, false).await?;
        if a.status == StatusCode::NOT_FOUND && a.by_space_api() {
            return Ok(None);
        }
        if !a.status.is_success() {
            return Err(self.failure(&a, &Method::HEAD, &url));
        }
        let header = |name: &str| a.headers.get(name).and_then(|v| v.to_str().ok());
        let bad = |what: &str| BackendError::Io {
            key: url.to_string(),
            detail: format!("HEAD answered without a valid {what} header"),
            retryable: false,
        };
        let size = header(CONTENT_LENGTH.as_str())
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| bad("content-length"))?;
        let last_modified = header(LAST_MODIFIED_HEADER)
            .and_then(|v| chrono::DateTime::parse_from_rfc3339(v).ok())
            .ok_or_else(|| bad(LAST_MODIFIED_HEADER))?
            .with_timezone(&chrono::Utc);
        Ok(Some(ObjectInfo {
            key: key.to_string(),
            size,
            last_modified,
        }))
    }

    fn list(&self, prefix: &str) -> BoxStream<'static, Result<ObjectInfo, BackendError>> {
        let this = self.clone();
        let prefix = prefix.to_string();
        // State: Some(after) while pages remain (None = from the start), None when done.
        futures::stream::try_unfold(
            (this, prefix, Some(None::<String>)),
            |(this, prefix, state)| async move {
                let Some(after) = state else {
                    return Ok(None);
                };
                let page = this.list_page(&prefix, after.as_deref()).await?;
                let objects = page.objects.into_iter().map(|o| {
                    Ok(ObjectInfo {
                        key: o.key,
                        size: o.size,
                        last_modified: o.last_modified,
                    })
                });
                let next_state = page.next.map(Some);
                Ok(Some((
                    futures::stream::iter(objects),
                    (this, prefix, next_state),
                )))
            },
        )
        .try_flatten()
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_grammar() {
        for ok in [
            "config.json",
            "chunks/ab/abcdef",
            "points/0190-x_y.json",
            "a",
            "..a/b..",
        ] {
            assert_eq!(check_object_key(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("../x", "\"..\" segment"),
            ("a/./b", "\".\" segment"),
            ("a//b", "empty segment"),
            ("/a", "empty segment"),
            ("a/", "empty segment"),
            ("a b", "character ' '"),
            ("a\\b", "character '\\\\'"),
            ("é", "character 'é'"),
            ("a%2Fb", "character '%'"),
        ] {
            let e = check_object_key(bad).unwrap_err();
            assert!(e.to_string().contains(why), "{bad}: {e}");
        }
        let long = "a".repeat(MAX_OBJECT_KEY_LEN + 1);
        let e = check_object_key(&long).unwrap_err().to_string();
        assert!(e.contains("1025 bytes long") && e.len() < 400, "{e}");
        assert_eq!(check_object_key(&long[1..]), Ok(()));
        assert_eq!(check_list_prefix(""), Ok(()));
        assert_eq!(check_list_prefix("chunks/ab/"), Ok(()));
        assert!(check_list_prefix("chunks/ab").is_err());
        assert!(check_list_prefix("/").is_err());
    }

    #[test]
    fn the_token_is_never_shown() {
        let token = "cairn_0123456789abcdef";
        let b = HttpBackend::new("http://127.0.0.1:7071/", token).unwrap();
        assert_eq!(
            b.describe(),
            "cairn+http://127.0.0.1:7071 (space of a remote location)"
        );
        let debug = format!("{b:?}");
        assert!(
            !debug.contains(token) && debug.contains("127.0.0.1:7071"),
            "{debug}"
        );
        let _ = b.location.set("standby".into());
        assert_eq!(
            b.describe(),
            "cairn+http://127.0.0.1:7071 (space of location standby)"
        );
    }

    #[test]
    fn bad_urls_and_tokens_are_refused() {
        for (url, token, says) in [
            ("127.0.0.1:7071", "t", "use http://"),
            ("http://u:secret@[::1", "t", "not a URL"),
            ("ftp://h/", "t", "use http://"),
            ("http://u:secret@h/", "t", "not in the URL"),
            ("http://h/?a=b", "t", "no query"),
            ("http://h/", " ", "no token"),
            ("http://h/", "a\nb", "cannot carry"),
        ] {
            let e = HttpBackend::new(url, token).unwrap_err().to_string();
            assert!(e.contains(says), "{url}: {e}");
            assert!(!e.contains("secret"), "{e}");
        }
    }

    #[tokio::test]
    async fn a_bad_key_is_refused_before_any_request() {
        // Port 9 (discard) on loopback: nothing is sent anyway.
        let b = HttpBackend::new("http://127.0.0.1:9", "t").unwrap();
        let e = b.get("../config.json").await.unwrap_err();
        assert!(!e.is_retryable());
        let m = e.to_string();
        assert!(
            m.contains("\"..\" segment") && m.contains("cairn+http://127.0.0.1:9"),
            "{m}"
        );
    }

    #[tokio::test]
    async fn an_unreachable_location_is_retried_then_reported() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // The listener is closed again: connections are refused.
        let b = HttpBackend::new(&format!("http://127.0.0.1:{port}"), "t")
            .unwrap()
            .with_retries(3, Duration::from_millis(10));
        let started = std::time::Instant::now();
        let e = b.stat("config.json").await.unwrap_err();
        assert!(e.is_retryable(), "{e}");
        let m = e.to_string();
        assert!(
            m.contains(&format!(
                "http://127.0.0.1:{port}/api/v1/space/objects/config.json"
            )) && m.contains("after 3 attempt(s)"),
            "{m}"
        );
        assert!(started.elapsed() >= Duration::from_millis(30));
    }
}
