//! [`Backend`] over any `object_store` store.

use std::path::Path as FsPath;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutOptions, PutPayload};

use super::deferred::{self, Deferred};
use super::{Backend, BackendError, BlockingBackend, ObjectInfo, PutMode};

/// A recovery space stored in an `object_store` store.
#[derive(Debug, Clone)]
pub struct ObjectStoreBackend {
    store: Arc<dyn ObjectStore>,
    describe: String,
    /// A local space: its folder and staging folder, with the blocking calls on them.
    local: Option<Arc<LocalBlocking>>,
}

impl ObjectStoreBackend {
    /// Wraps any store; `describe` names it in messages.
    pub fn new(store: Arc<dyn ObjectStore>, describe: impl Into<String>) -> Self {
        ObjectStoreBackend {
            store,
            describe: describe.into(),
            local: None,
        }
    }

    /// A space in a local folder, which must exist. Writes go to a temp file that is
    /// fsynced and renamed into place, and the directory is fsynced; `put_deferred`
    /// stages instead and makes a batch durable at once (see `deferred`).
    pub fn local(root: &FsPath) -> Result<Self, BackendError> {
        let store = object_store::local::LocalFileSystem::new_with_prefix(root)
            .map_err(|e| map_error(&root.display().to_string(), e))?
            .with_fsync(true);
        let shown = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
        let mut backend = Self::new(Arc::new(store), format!("file://{}", shown.display()));
        backend.local = Some(Arc::new(LocalBlocking {
            root: shown,
            deferred: std::sync::OnceLock::new(),
        }));
        Ok(backend)
    }

    /// A space on S3-compatible object storage, from a URL
    /// `s3://BUCKET[/PREFIX][?endpoint=URL&region=R&allow_http=true]`. Credentials come
    /// from the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_SESSION_TOKEN`, or the other sources `object_store` reads) and never appear in
    /// messages. Requests are retried with backoff on throttling, 5xx and timeouts.
    pub fn s3(url: &str) -> Result<Self, BackendError> {
        Self::s3_with_credentials(url, None)
    }

    /// Like [`ObjectStoreBackend::s3`], with an access key and secret given explicitly
    /// (from a config file) instead of the environment.
    pub fn s3_with_credentials(
        url: &str,
        credentials: Option<(&str, &str)>,
    ) -> Result<Self, BackendError> {
        let bad = |detail: String| BackendError::Io {
            key: String::new(),
            detail: format!("recovery space URL {url:?}: {detail}"),
            retryable: false,
        };
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| bad("not an s3:// URL".into()))?;
        let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (bucket, prefix) = location.split_once('/').unwrap_or((location, ""));
        let prefix = prefix.trim_matches('/');
        if bucket.is_empty() {
            return Err(bad("no bucket (s3://BUCKET/PREFIX)".into()));
        }
        let mut builder = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
        if let Some((key, secret)) = credentials {
            builder = builder
                .with_access_key_id(key)
                .with_secret_access_key(secret);
        }
        let mut endpoint = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "endpoint" => {
                    builder = builder
                        .with_endpoint(v)
                        .with_allow_http(v.starts_with("http://"));
                    endpoint = Some(v.to_string());
                }
                "region" => builder = builder.with_region(v),
                "allow_http" => builder = builder.with_allow_http(v == "true"),
                other => {
                    return Err(bad(format!(
                        "unknown parameter {other:?} (known: endpoint, region, allow_http)"
                    )));
                }
            }
        }
        let store = builder
            .with_retry(object_store::RetryConfig {
                max_retries: 8,
                retry_timeout: std::time::Duration::from_secs(120),
                ..Default::default()
            })
            .build()
            .map_err(|e| bad(e.to_string()))?;
        let describe = format!(
            "s3://{bucket}/{prefix}{}",
            endpoint.map(|e| format!(" at {e}")).unwrap_or_default()
        );
        let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
            Arc::new(store)
        } else {
            Arc::new(object_store::prefix::PrefixStore::new(store, prefix))
        };
        Ok(Self::new(store, describe))
    }

    /// A space in memory (tests, benchmarks of the pipeline alone).
    pub fn memory() -> Self {
        Self::new(Arc::new(object_store::memory::InMemory::new()), "memory:")
    }
}

/// The blocking calls of a local space ([`Backend::blocking`]): plain file calls on the
/// files `LocalFileSystem` keeps at `<root>/<key>`, and the same staging folder.
#[derive(Debug)]
struct LocalBlocking {
    root: std::path::PathBuf,
    /// This process's staging folder for `put_deferred`, made at the first use.
    deferred: std::sync::OnceLock<Deferred>,
}

impl LocalBlocking {
    fn open(&self, key: &str) -> Result<std::fs::File, BackendError> {
        std::fs::File::open(self.root.join(key)).map_err(|e| map_io(key, &e))
    }

    /// This process's staging folder, made at the first use.
    fn staging(&self) -> Result<&Deferred, BackendError> {
        if let Some(d) = self.deferred.get() {
            return Ok(d);
        }
        let d = Deferred::open(&self.root).map_err(|e| map_io(deferred::DEFERRED_DIR, &e))?;
        // A concurrent first use may have won: its folder is used, this one dropped.
        let _ = self.deferred.set(d);
        Ok(self.deferred.get().expect("just set"))
    }
}

impl BlockingBackend for LocalBlocking {
    fn get(&self, key: &str) -> Result<Bytes, BackendError> {
        use std::io::Read;
        let mut buf = Vec::new();
        self.open(key)?
            .read_to_end(&mut buf)
            .map_err(|e| map_io(key, &e))?;
        Ok(Bytes::from(buf))
    }

    fn get_range(&self, key: &str, range: std::ops::Range<u64>) -> Result<Bytes, BackendError> {
        use std::os::unix::fs::FileExt;
        let f = self.open(key)?;
        let want = usize::try_from(range.end.saturating_sub(range.start)).unwrap_or(usize::MAX);
        let size = f.metadata().map_err(|e| map_io(key, &e))?.len();
        if range.start >= size || want == 0 {
            return Err(BackendError::Io {
                key: key.to_string(),
                detail: format!("invalid range {range:?} of an object of {size} bytes"),
                retryable: false,
            });
        }
        let mut buf =
            vec![0u8; want.min(usize::try_from(size - range.start).unwrap_or(usize::MAX))];
        let mut at = 0;
        while at < buf.len() {
            match f.read_at(&mut buf[at..], range.start + at as u64) {
                Ok(0) => break,
                Ok(n) => at += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(map_io(key, &e)),
            }
        }
        buf.truncate(at);
        Ok(Bytes::from(buf))
    }

    fn exists(&self, key: &str) -> Result<bool, BackendError> {
        match std::fs::metadata(self.root.join(key)) {
            Ok(m) => Ok(m.is_file()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(map_io(key, &e)),
        }
    }

    fn put_deferred(&self, key: &str, data: &[u8]) -> Result<bool, BackendError> {
        let staged = self.staging()?.stage(key, data)?;
        if staged.duplicate {
            return Err(BackendError::AlreadyExists {
                key: key.to_string(),
            });
        }
        Ok(staged.flush)
    }
}

fn path(key: &str) -> Path {
    Path::from(key)
}

/// Maps an `object_store` error to a [`BackendError`], digging the I/O cause out of the
/// error chain so that a full disk or a permission problem is named as such.
pub(crate) fn map_error(key: &str, e: object_store::Error) -> BackendError {
    match e {
        object_store::Error::NotFound { .. } => BackendError::NotFound {
            key: key.to_string(),
        },
        object_store::Error::AlreadyExists { .. } => BackendError::AlreadyExists {
            key: key.to_string(),
        },
        other => {
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&other);
            while let Some(err) = source {
                if let Some(io) = err.downcast_ref::<std::io::Error>() {
                    return map_io(key, io);
                }
                source = err.source();
            }
            BackendError::Io {
                key: key.to_string(),
                detail: other.to_string(),
                retryable: true,
            }
        }
    }
}

pub(crate) fn map_io(key: &str, io: &std::io::Error) -> BackendError {
    use std::io::ErrorKind;
    match io.kind() {
        ErrorKind::StorageFull | ErrorKind::QuotaExceeded => BackendError::NoSpace {
            key: key.to_string(),
        },
        ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem => {
            BackendError::PermissionDenied {
                key: key.to_string(),
                detail: io.to_string(),
            }
        }
        ErrorKind::NotFound => BackendError::NotFound {
            key: key.to_string(),
        },
        _ => BackendError::Io {
            key: key.to_string(),
            detail: io.to_string(),
            retryable: matches!(
                io.kind(),
                ErrorKind::Interrupted | ErrorKind::TimedOut | ErrorKind::WouldBlock
            ),
        },
    }
}

#[async_trait::async_trait]
impl Backend for ObjectStoreBackend {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    async fn get(&self, key: &str) -> Result<Bytes, BackendError> {
        let res = self
            .store
            .get(&path(key))
            .await
            .map_err(|e| map_error(key, e))?;
        res.bytes().await.map_err(|e| map_error(key, e))
    }

    async fn get_range(
        &self,
        key: &str,
        range: std::ops::Range<u64>,
    ) -> Result<Bytes, BackendError> {
        self.store
            .get_range(&path(key), range)
            .await
            .map_err(|e| map_error(key, e))
    }

    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> Result<(), BackendError> {
        let opts = PutOptions {
            mode: match mode {
                PutMode::Overwrite => object_store::PutMode::Overwrite,
                PutMode::CreateNew => object_store::PutMode::Create,
            },
            ..Default::default()
        };
        self.store
            .put_opts(&path(key), PutPayload::from_bytes(data), opts)
            .await
            .map(|_| ())
            .map_err(|e| map_error(key, e))
    }

    async fn put_deferred(&self, key: &str, data: Bytes) -> Result<(), BackendError> {
        let Some(local) = self.local.clone() else {
            return self.put(key, data, PutMode::CreateNew).await;
        };
        let k = key.to_string();
        let flush = tokio::task::spawn_blocking(move || local.put_deferred(&k, &data))
            .await
            .map_err(|e| deferred::blocking_error(key, e))??;
        if flush {
            self.flush_deferred().await?;
        }
        Ok(())
    }

    fn blocking(&self) -> Option<Arc<dyn BlockingBackend>> {
        self.local.clone().map(|l| l as Arc<dyn BlockingBackend>)
    }

    async fn flush_deferred(&self) -> Result<(), BackendError> {
        match self.local.as_ref().and_then(|l| l.deferred.get()) {
            Some(d) => d.flush().await,
            None => Ok(()),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), BackendError> {
        match self.store.delete(&path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(map_error(key, e)),
        }
        // On a local folder a deletion is durable only once its directory is synced: a
        // deleted record must not come back after a power loss once its indexes or
        // chunks are gone.
        // (A chunk or patch that comes back is only garbage again: no sync needed.)
        if let Some(root) = self
            .local
            .as_ref()
            .map(|l| &l.root)
            .filter(|_| !key.starts_with("chunks/") && !key.starts_with("patches/"))
        {
            let dir = root.join(key).parent().map(FsPath::to_path_buf);
            if let Some(dir) = dir {
                tokio::task::spawn_blocking(move || match std::fs::File::open(&dir) {
                    Ok(d) => d.sync_all(),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(e),
                })
                .await
                .map_err(|e| BackendError::Io {
                    key: key.to_string(),
                    detail: e.to_string(),
                    retryable: false,
                })?
                .map_err(|e| map_io(key, &e))?;
            }
        }
        Ok(())
    }

    async fn stat(&self, key: &str) -> Result<Option<ObjectInfo>, BackendError> {
        match self.store.head(&path(key)).await {
            Ok(meta) => Ok(Some(ObjectInfo {
                key: key.to_string(),
                size: meta.size,
                last_modified: meta.last_modified,
            })),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(map_error(key, e)),
        }
    }

    async fn remove_incomplete(
        &self,
        older_than: chrono::DateTime<chrono::Utc>,
    ) -> Result<u64, BackendError> {
        let Some(root) = self.local.as_ref().map(|l| l.root.clone()) else {
            return Ok(0);
        };
        let cutoff = std::time::SystemTime::from(older_than);
        tokio::task::spawn_blocking(move || {
            Ok::<_, std::io::Error>(remove_staging(&root, cutoff)? + deferred::remove_dead(&root)?)
        })
        .await
        .map_err(|e| deferred::blocking_error("staging files", e))?
        .map_err(|e| map_io("staging files", &e))
    }

    fn list(&self, prefix: &str) -> BoxStream<'static, Result<ObjectInfo, BackendError>> {
        let owned = prefix.to_string();
        let p = prefix.trim_end_matches('/');
        let stream = if p.is_empty() {
            self.store.list(None)
        } else {
            self.store.list(Some(&path(p)))
        };
        stream
            .map(move |r| match r {
                Ok(meta) => Ok(ObjectInfo {
                    key: meta.location.to_string(),
                    size: meta.size,
                    last_modified: meta.last_modified,
                }),
                // A folder that does not exist yet lists as empty.
                Err(object_store::Error::NotFound { .. }) => {
                    Err(BackendError::NotFound { key: owned.clone() })
                }
                Err(e) => Err(map_error(&owned, e)),
            })
            .filter(|r| futures::future::ready(!matches!(r, Err(BackendError::NotFound { .. }))))
            .boxed()
    }
}

/// Removes the staging files (`<name>#<n>`) that a killed writer left under `dir`.
/// Files that vanish meanwhile (a write completing) are not an error.
fn remove_staging(dir: &FsPath, cutoff: std::time::SystemTime) -> std::io::Result<u64> {
    let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
    let mut removed = 0;
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if gone(&e) => return Ok(0),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let Ok(ft) = entry.file_type() else { continue };
        if ft.is_dir() && entry.file_name() == deferred::DEFERRED_DIR {
            // Staging folders of `put_deferred`: alive while their process holds the
            // lock, whatever their age (`deferred::remove_dead`).
        } else if ft.is_dir() {
            removed += remove_staging(&entry.path(), cutoff)?;
        } else if ft.is_file() && entry.file_name().to_string_lossy().contains('#') {
            let old = match entry.metadata().and_then(|m| m.modified()) {
                Ok(t) => t < cutoff,
                Err(e) if gone(&e) => false,
                Err(e) => return Err(e),
            };
            if old {
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => removed += 1,
                    Err(e) if gone(&e) => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Ok(removed)
}
