//! The one narrow trait every recovery space is stored through.
//!
//! A backend stores immutable objects under `/`-separated keys: `put` (atomic: the object
//! appears whole or not at all), `get`, `stat`, `delete` and prefix `list`. Nothing above
//! this trait may assume a POSIX filesystem: no rename, no append, no directory, no atime.
//!
//! Implementations:
//! - [`ObjectStoreBackend`]: any `object_store` store. The local filesystem (the embedded
//!   default; temp file, fsync, rename; chunks and patches staged and made durable in
//!   batches, see `deferred`) and memory today; S3 is a configuration of it.
//! - [`FaultBackend`]: a decorator that fails chosen calls, for tests.
//! - [`HttpBackend`]: another location's space, through that location's space object
//!   API (`/api/v1/space/objects`) with its bearer token.

mod deferred;
mod fault;
pub mod http;
mod object;

use std::fmt;

use bytes::Bytes;
use futures::stream::BoxStream;

pub use fault::{FaultBackend, FaultRule, Op, RequestCounts};
pub use http::HttpBackend;
pub use object::ObjectStoreBackend;
pub(crate) use object::map_io;

/// Metadata of one stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    pub last_modified: chrono::DateTime<chrono::Utc>,
}

/// How a `put` treats an existing object at the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutMode {
    /// Replace it (atomically).
    Overwrite,
    /// Fail with [`BackendError::AlreadyExists`] if it exists.
    CreateNew,
}

/// A failed backend call. The message names the object and, where it can, the cause in
/// an operator's words.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{key}: not found")]
    NotFound { key: String },
    #[error("{key}: already exists")]
    AlreadyExists { key: String },
    #[error("recovery space storage is full (no space left on device) while writing {key}")]
    NoSpace { key: String },
    #[error("permission denied on {key}: {detail}")]
    PermissionDenied { key: String, detail: String },
    #[error("recovery space unreachable or failing at {key}: {detail}")]
    Io {
        key: String,
        detail: String,
        retryable: bool,
    },
}

impl BackendError {
    /// Whether the same call may succeed if tried again later.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            BackendError::Io {
                retryable: true,
                ..
            }
        )
    }
}

/// A store of immutable objects. See the module documentation.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + fmt::Debug {
    /// Where this backend stores, for messages (`file:///srv/space`, `memory:`).
    fn describe(&self) -> String;
    async fn get(&self, key: &str) -> Result<Bytes, BackendError>;
    /// Bytes `range` of an object, fewer where it ends sooner (`range.start` must be
    /// inside it). By default the whole object is read and cut.
    async fn get_range(
        &self,
        key: &str,
        range: std::ops::Range<u64>,
    ) -> Result<Bytes, BackendError> {
        let all = self.get(key).await?;
        let end = usize::try_from(range.end)
            .unwrap_or(usize::MAX)
            .min(all.len());
        let start = usize::try_from(range.start).unwrap_or(usize::MAX).min(end);
        Ok(all.slice(start..end))
    }
    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> Result<(), BackendError>;
    /// Like `put` with [`PutMode::CreateNew`], for content-addressed objects that nothing
    /// refers to before [`Backend::flush_deferred`] has returned (chunks, patches): the
    /// object may appear at its key, and be durable, only at the next flush.
    /// [`BackendError::AlreadyExists`] says the object is there or already on its way (the
    /// same content, by its name); either way it is at its key after the next flush. A
    /// staging store may also return `Ok` for a key already stored (a local folder finds
    /// out only at the flush, and keeps the stored object): a caller that counts new
    /// objects `stat`s first. By default a plain `put`.
    async fn put_deferred(&self, key: &str, data: Bytes) -> Result<(), BackendError> {
        self.put(key, data, PutMode::CreateNew).await
    }
    /// Makes every `put_deferred` that returned before this call durable and visible at
    /// its key. By default nothing is deferred.
    async fn flush_deferred(&self) -> Result<(), BackendError> {
        Ok(())
    }
    /// Deletes an object; deleting a missing object succeeds.
    async fn delete(&self, key: &str) -> Result<(), BackendError>;
    async fn stat(&self, key: &str) -> Result<Option<ObjectInfo>, BackendError>;
    /// Every object whose key starts with `prefix` (which ends with `/` or is empty), in
    /// no particular order.
    fn list(&self, prefix: &str) -> BoxStream<'static, Result<ObjectInfo, BackendError>>;
    /// Removes what interrupted writes left behind and `list` does not show (a local
    /// folder's staging files; an object store's unfinished multipart uploads), when older
    /// than `older_than`. Returns how many were removed.
    async fn remove_incomplete(
        &self,
        older_than: chrono::DateTime<chrono::Utc>,
    ) -> Result<u64, BackendError> {
        let _ = older_than;
        Ok(0)
    }
    /// The same store's calls as blocking ones, when they are only file system calls (a
    /// local folder): a caller already on a blocking thread (a point's chunk job) then
    /// reads, checks and stages an object without handing each call to another thread.
    /// `None` (the default): only the async calls.
    fn blocking(&self) -> Option<std::sync::Arc<dyn BlockingBackend>> {
        None
    }
}

/// Blocking calls of a backend of local files ([`Backend::blocking`]), with the same
/// meaning and errors as their async namesakes. Never call them on an async runtime's
/// worker thread.
pub trait BlockingBackend: Send + Sync + fmt::Debug {
    /// As [`Backend::get`].
    fn get(&self, key: &str) -> Result<Bytes, BackendError>;
    /// As [`Backend::get_range`].
    fn get_range(&self, key: &str, range: std::ops::Range<u64>) -> Result<Bytes, BackendError>;
    /// Whether an object is stored at `key` (as [`Backend::stat`] is `Some`).
    fn exists(&self, key: &str) -> Result<bool, BackendError>;
    /// As [`Backend::put_deferred`], except that it never flushes: `Ok(true)` says the
    /// staged batch passed its bound, and the caller calls [`Backend::flush_deferred`]
    /// before it stages more.
    fn put_deferred(&self, key: &str, data: &[u8]) -> Result<bool, BackendError>;
}
