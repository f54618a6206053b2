//! The HTTP client of the location daemon's API (`docs/API.md`): what the CLI uses for
//! everything `cairn serve` owns. Errors keep the API's stable code, so that `main` can
//! turn `damaged` into exit 3 and `confirmation_required` into exit 4.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::{Method, StatusCode, Url};
use serde_json::Value;

/// How to reach the daemon (global flags, each also an environment variable).
#[derive(Debug, Clone, Args)]
pub struct Conn {
    /// The Cairn daemon's API, e.g. http://127.0.0.1:7070 (for the daemon forms of
    /// commands; offline forms take a pool or space path instead).
    #[arg(
        long,
        global = true,
        env = "CAIRN_URL",
        value_name = "URL",
        display_order = 900
    )]
    pub url: Option<String>,
    /// API token (made with `cairn token create` on the daemon's host).
    #[arg(
        long,
        global = true,
        env = "CAIRN_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN",
        display_order = 901
    )]
    pub token: Option<String>,
}

/// An error answer of the API: `{"error": {"code", "message"}}` and its status.
#[derive(Debug)]
pub struct ApiError {
    pub code: String,
    pub message: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiError {}

impl ApiError {
    /// The process exit code for this error (see `main.rs`).
    pub fn exit_code(&self) -> u8 {
        match self.code.as_str() {
            "damaged" => 3,
            "confirmation_required" => 4,
            _ => 1,
        }
    }
}

/// A job that ended in `failed`: exit 1 (3 when the job says its data is damaged).
#[derive(Debug)]
pub struct JobFailed {
    pub message: String,
    pub damaged: bool,
}

impl std::fmt::Display for JobFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for JobFailed {}

pub struct Client {
    base: Url,
    shown: String,
    token: Option<String>,
    http: reqwest::Client,
}

/// Encodes one path segment (names, ids; never a `/`).
fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~@:".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Builds an API path from literal parts and segments to encode:
/// `path(&["policies", name, "pause"])` → `policies/nightly/pause`.
pub fn path(parts: &[&str]) -> String {
    parts
        .iter()
        .map(|p| segment(p))
        .collect::<Vec<_>>()
        .join("/")
}

/// A disk path `server/disk` as two encoded segments.
pub fn disk_path(spec: &str) -> Result<String> {
    let (s, d) = cairn_volume::pool::parse_disk_spec(spec)?;
    Ok(format!("{}/{}", segment(&s), segment(&d)))
}

impl Client {
    /// The client for `conn`; a clear error when no daemon is given.
    pub fn new(conn: &Conn) -> Result<Client> {
        let Some(url) = conn.url.as_deref().filter(|u| !u.trim().is_empty()) else {
            anyhow::bail!(
                "no Cairn daemon given: set CAIRN_URL (or --url) to its API, e.g. http://127.0.0.1:7070, or give a pool or space path as the first argument to work on it directly (offline)"
            );
        };
        let with_scheme = if url.contains("://") {
            url.to_string()
        } else {
            format!("http://{url}")
        };
        let mut base = Url::parse(&with_scheme).with_context(|| {
            format!("CAIRN_URL {url:?} is not a URL like http://127.0.0.1:7070")
        })?;
        if !matches!(base.scheme(), "http" | "https") {
            anyhow::bail!("CAIRN_URL {url:?}: only http:// and https:// are supported");
        }
        let p = base.path().trim_end_matches('/').to_string();
        let p = p.strip_suffix("/api/v1").unwrap_or(&p).to_string();
        base.set_path(&format!("{p}/api/v1/"));
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(600))
            .user_agent(concat!("cairn-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Client {
            base,
            shown: url.to_string(),
            token: conn.token.clone().filter(|t| !t.trim().is_empty()),
            http,
        })
    }

    /// Sends a request to `path` (relative to `/api/v1/`) and returns the JSON answer
    /// (`Value::Null` for an empty body).
    pub async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value> {
        let url = self
            .base
            .join(path)
            .with_context(|| format!("bad API path {path}"))?;
        let mut req = self.http.request(method, url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t.trim());
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| self.unreachable(&e))?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| anyhow::anyhow!("reading the daemon's answer: {e}"))?;
        if status.is_success() {
            if text.trim().is_empty() {
                return Ok(Value::Null);
            }
            return serde_json::from_str(&text).with_context(|| {
                format!(
                    "the daemon at {} answered something that is not JSON",
                    self.shown
                )
            });
        }
        Err(self.api_error(status, &text).into())
    }

    fn unreachable(&self, e: &reqwest::Error) -> anyhow::Error {
        // The innermost cause names the problem ("Connection refused").
        let mut cause: &dyn std::error::Error = e;
        while let Some(next) = cause.source() {
            cause = next;
        }
        if e.is_timeout() {
            anyhow::anyhow!("the Cairn daemon at {} did not answer in time", self.shown)
        } else {
            anyhow::anyhow!(
                "cannot reach the Cairn daemon at {}: {cause} (is `cairn serve` running? is CAIRN_URL right?)",
                self.shown
            )
        }
    }

    fn api_error(&self, status: StatusCode, text: &str) -> ApiError {
        let parsed: Option<Value> = serde_json::from_str(text).ok();
        let err = parsed.as_ref().map(|v| &v["error"]);
        let code = err
            .and_then(|e| e["code"].as_str())
            .map(str::to_string)
            .unwrap_or_else(|| match status.as_u16() {
                401 => "unauthorized".into(),
                403 => "forbidden".into(),
                404 => "not_found".into(),
                409 => "conflict".into(),
                _ => "internal".into(),
            });
        let mut message = err
            .and_then(|e| e["message"].as_str())
            .map(str::to_string)
            .unwrap_or_else(|| {
                let t = text.trim();
                if t.is_empty() {
                    format!("the daemon answered {status}")
                } else {
                    format!(
                        "the daemon answered {status}: {}",
                        t.chars().take(300).collect::<String>()
                    )
                }
            });
        if code == "unauthorized" {
            message.push_str(if self.token.is_none() {
                " (no token given: set CAIRN_TOKEN or pass --token)"
            } else {
                " (the token given by CAIRN_TOKEN or --token was refused: mistyped, revoked, or made for another data directory)"
            });
        }
        ApiError { code, message }
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        self.call(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        self.call(Method::POST, path, Some(body)).await
    }

    pub async fn patch(&self, path: &str, body: &Value) -> Result<Value> {
        self.call(Method::PATCH, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> Result<Value> {
        self.call(Method::DELETE, path, None).await
    }

    /// Every item of a list endpoint: a page object (`{"items", "next_cursor"}`,
    /// followed to the end or to `limit` items), or a bare array (sent no paging
    /// parameters: `paged` false).
    pub async fn list(
        &self,
        path: &str,
        query: &[(&str, String)],
        paged: bool,
        limit: Option<usize>,
    ) -> Result<Vec<Value>> {
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut q: Vec<(&str, String)> = query.to_vec();
            if paged {
                let want = limit.map_or(1000, |l| l.saturating_sub(items.len()).clamp(1, 1000));
                q.push(("limit", want.to_string()));
                if let Some(c) = &cursor {
                    q.push(("cursor", c.clone()));
                }
            }
            let qs = q
                .iter()
                .map(|(k, v)| format!("{k}={}", segment(v)))
                .collect::<Vec<_>>()
                .join("&");
            let url = if qs.is_empty() {
                path.to_string()
            } else {
                format!("{path}?{qs}")
            };
            let page = self.get(&url).await?;
            let (page_items, next) = match &page {
                Value::Array(a) => (a.clone(), None),
                v => (
                    v["items"].as_array().cloned().unwrap_or_default(),
                    v["next_cursor"].as_str().map(str::to_string),
                ),
            };
            items.extend(page_items);
            if let Some(l) = limit
                && items.len() >= l
            {
                items.truncate(l);
                break;
            }
            match next {
                Some(c) if paged && !c.is_empty() && cursor.as_deref() != Some(c.as_str()) => {
                    cursor = Some(c);
                }
                _ => break,
            }
        }
        Ok(items)
    }

    /// Polls a job about five times a second until it ends, drawing a bar on stderr from
    /// `progress.done/total` (only on a terminal, and not when `quiet`). Returns the final
    /// job; a failed job is an error ([`JobFailed`]), after its JSON when `json`.
    pub async fn follow(&self, job_id: &str, quiet: bool, json: bool) -> Result<Value> {
        let bar = job_bar(
            quiet,
            "{msg:>12} [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        );
        let path = path(&["jobs", job_id]);
        let mut errors = 0;
        let job = loop {
            let job = match self.get(&path).await {
                Ok(j) => {
                    errors = 0;
                    j
                }
                // A daemon restarting under us: retry a few times before giving up.
                Err(e) if e.downcast_ref::<ApiError>().is_none() && errors < 25 => {
                    errors += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                Err(e) => {
                    bar.finish_and_clear();
                    return Err(e);
                }
            };
            let state = job["state"].as_str().unwrap_or("");
            if matches!(state, "succeeded" | "failed" | "skipped") {
                break job;
            }
            bar.set_message(format!(
                "{} {}",
                job["kind"].as_str().unwrap_or("job"),
                state
            ));
            let done = job["progress"]["done"].as_u64();
            let total = job["progress"]["total"].as_u64();
            if let (Some(d), Some(t)) = (done, total) {
                bar.set_length(t);
                bar.set_position(d.min(t));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        bar.finish_and_clear();
        if job["state"] == "failed" {
            let error = job["error"]
                .as_str()
                .filter(|e| !e.is_empty())
                .unwrap_or("no reason given");
            let damaged = job["error_code"] == "damaged" || job["damaged"] == true;
            if json {
                crate::commands::print_json(&job)?;
            }
            return Err(JobFailed {
                message: format!("job {job_id} failed: {error}"),
                damaged,
            }
            .into());
        }
        Ok(job)
    }
}

/// A bar on stderr with this template when stderr is a terminal and not `quiet`; hidden
/// otherwise.
pub fn job_bar(quiet: bool, template: &str) -> ProgressBar {
    let bar = ProgressBar::hidden();
    if !quiet && std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::stderr());
    }
    bar.set_style(
        ProgressStyle::with_template(template)
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar
}
