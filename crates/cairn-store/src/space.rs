//! A recovery space: its config, and reading its recovery point records and indexes.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use cairn_format::config::SpaceConfig;
use cairn_format::id::PointId;
use cairn_format::index::DiskIndex;
use cairn_format::layout;
use cairn_format::record::{DiskRecord, PointRecord};
use futures::{StreamExt, TryStreamExt};

use crate::backend::{Backend, BackendError, ObjectStoreBackend, PutMode};
use crate::error::SpaceError;

/// How many objects metadata operations fetch at once.
pub(crate) const METADATA_CONCURRENCY: usize = 16;

/// An open recovery space.
#[derive(Debug, Clone)]
pub struct Space {
    backend: Arc<dyn Backend>,
    config: SpaceConfig,
}

/// S3 credentials from a daemon's config file, for every `s3://` space this process
/// opens (without them: the environment's `AWS_*`, as the AWS SDKs do).
static S3_CREDENTIALS: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();

/// Sets the S3 access key and secret used by [`open_location`] (once per process; a
/// second call is ignored). They are never logged nor shown.
pub fn configure_s3_credentials(access_key_id: &str, secret_access_key: &str) {
    let _ = S3_CREDENTIALS.set((access_key_id.to_string(), secret_access_key.to_string()));
}

/// Opens the backend for a space location given by an operator: a folder path or
/// `file://` URL (the embedded default; with `create`, a missing folder is created), or
/// an S3-compatible store (`s3://BUCKET/PREFIX?endpoint=…&region=…`).
pub fn open_location(location: &str, create: bool) -> Result<Arc<dyn Backend>, SpaceError> {
    if location.starts_with("s3://") {
        let creds = S3_CREDENTIALS.get().map(|(k, s)| (k.as_str(), s.as_str()));
        return Ok(Arc::new(ObjectStoreBackend::s3_with_credentials(
            location, creds,
        )?));
    }
    if location.contains("://") && !location.starts_with("file://") {
        return Err(SpaceError::NotASpace {
            location: format!("{location} (use a folder path, file://PATH or s3://BUCKET/PREFIX)"),
        });
    }
    let path = Path::new(location.strip_prefix("file://").unwrap_or(location));
    if create {
        std::fs::create_dir_all(path)
            .map_err(|e| SpaceError::image("cannot create recovery space folder", path, e))?;
    } else if !path.is_dir() {
        return Err(SpaceError::NotASpace {
            location: location.to_string(),
        });
    }
    Ok(Arc::new(ObjectStoreBackend::local(path)?))
}

impl Space {
    /// Creates a new space in an empty location.
    pub async fn init(backend: Arc<dyn Backend>, config: SpaceConfig) -> Result<Space, SpaceError> {
        let location = backend.describe();
        match backend
            .put(
                layout::CONFIG_KEY,
                Bytes::from(config.encode()),
                PutMode::CreateNew,
            )
            .await
        {
            Ok(()) => {}
            Err(BackendError::AlreadyExists { .. }) => {
                return Err(SpaceError::AlreadyExists { location });
            }
            Err(e) => return Err(e.into()),
        }
        let space = Space { backend, config };
        space.put_reserve().await?;
        Ok(space)
    }

    /// Writes the reserve object: room that garbage collection frees to write its lease
    /// when the store is full (see `gc`).
    pub(crate) async fn put_reserve(&self) -> Result<(), SpaceError> {
        self.backend
            .put(
                layout::RESERVE_KEY,
                Bytes::from(vec![0u8; layout::RESERVE_LEN]),
                PutMode::Overwrite,
            )
            .await?;
        Ok(())
    }

    /// Opens an existing space, refusing one of an unknown format version.
    pub async fn open(backend: Arc<dyn Backend>) -> Result<Space, SpaceError> {
        let location = backend.describe();
        let bytes = match backend.get(layout::CONFIG_KEY).await {
            Ok(b) => b,
            Err(BackendError::NotFound { .. }) => return Err(SpaceError::NotASpace { location }),
            Err(e) => return Err(e.into()),
        };
        let config = SpaceConfig::decode(&bytes)
            .map_err(|source| SpaceError::Config { location, source })?;
        Ok(Space { backend, config })
    }

    pub fn config(&self) -> &SpaceConfig {
        &self.config
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    pub fn describe(&self) -> String {
        self.backend.describe()
    }

    /// Ids of every recovery point, oldest first.
    pub async fn point_ids(&self) -> Result<Vec<PointId>, SpaceError> {
        let mut ids: Vec<PointId> = self
            .backend
            .list(layout::POINTS_PREFIX)
            .try_filter_map(|o| async move { Ok(layout::parse_record_key(&o.key)) })
            .try_collect()
            .await?;
        ids.sort();
        Ok(ids)
    }

    /// Every recovery point record, oldest first.
    pub async fn list_points(&self) -> Result<Vec<PointRecord>, SpaceError> {
        let ids = self.point_ids().await?;
        self.load_points(&ids).await
    }

    /// Whether a point's record exists (one `stat`; used to tell a point deleted while
    /// we worked from a damaged one).
    pub async fn point_exists(&self, id: &PointId) -> Result<bool, SpaceError> {
        Ok(self.backend.stat(&layout::record_key(id)).await?.is_some())
    }

    /// Loads the records of `ids`, skipping any deleted meanwhile, in the given order.
    pub async fn load_points(&self, ids: &[PointId]) -> Result<Vec<PointRecord>, SpaceError> {
        let loaded: Vec<Option<PointRecord>> = futures::stream::iter(ids.iter().copied())
            .map(|id| async move {
                match self.load_point(&id).await {
                    // Deleted between the listing and the read.
                    Err(SpaceError::PointNotFound(_)) => Ok(None),
                    other => other.map(Some),
                }
            })
            .buffered(METADATA_CONCURRENCY)
            .try_collect()
            .await?;
        Ok(loaded.into_iter().flatten().collect())
    }

    /// One record.
    pub async fn load_point(&self, id: &PointId) -> Result<PointRecord, SpaceError> {
        let key = layout::record_key(id);
        let bytes = match self.backend.get(&key).await {
            Ok(b) => b,
            Err(BackendError::NotFound { .. }) => {
                return Err(SpaceError::PointNotFound(id.to_string()));
            }
            Err(e) => return Err(e.into()),
        };
        let record = PointRecord::decode(&bytes).map_err(|source| SpaceError::DamagedRecord {
            point: id.to_string(),
            key: key.clone(),
            source,
        })?;
        if record.id != *id {
            return Err(SpaceError::DamagedRecord {
                point: id.to_string(),
                key,
                source: cairn_format::record::RecordError::Malformed(format!(
                    "record names point {}",
                    record.id
                )),
            });
        }
        Ok(record)
    }

    /// Resolves what an operator typed: `latest`, a full id, or a unique id prefix
    /// (at least 4 characters).
    pub async fn resolve_point(&self, spec: &str) -> Result<PointId, SpaceError> {
        let ids = self.point_ids().await?;
        resolve_in(&ids, spec)
    }

    /// Resolves several at once, against one listing of the space.
    pub async fn resolve_points(&self, specs: &[String]) -> Result<Vec<PointId>, SpaceError> {
        let ids = self.point_ids().await?;
        specs.iter().map(|s| resolve_in(&ids, s)).collect()
    }

    /// The disk of a point an operator means: the named one, or the only one.
    pub fn choose_disk<'a>(
        record: &'a PointRecord,
        disk: Option<&str>,
    ) -> Result<&'a DiskRecord, SpaceError> {
        let available = || {
            record
                .disks
                .iter()
                .map(|d| d.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        match disk {
            Some(name) => record.disk(name).ok_or_else(|| SpaceError::DiskNotInPoint {
                point: record.id,
                disk: name.to_string(),
                available: available(),
            }),
            None if record.disks.len() == 1 => Ok(&record.disks[0]),
            None => Err(SpaceError::DiskNotChosen {
                point: record.id,
                count: record.disks.len(),
                available: available(),
            }),
        }
    }

    /// Loads and checks one disk's index against its record.
    pub async fn load_index(
        &self,
        record: &PointRecord,
        disk: &DiskRecord,
    ) -> Result<DiskIndex, SpaceError> {
        let damaged = |problem: String| SpaceError::DamagedIndex {
            point: record.id,
            disk: disk.name.clone(),
            problem,
        };
        let bytes = match self.backend.get(&disk.index).await {
            Ok(b) => b,
            Err(BackendError::NotFound { .. }) => {
                return Err(damaged(format!("index object {} is missing", disk.index)));
            }
            Err(e) => return Err(e.into()),
        };
        let index = DiskIndex::decode(&bytes).map_err(|e| damaged(e.to_string()))?;
        if DiskIndex::checksum_of(&bytes) != disk.index_checksum {
            return Err(damaged(
                "index checksum differs from the one in the point record".into(),
            ));
        }
        if index.disk_size != disk.size || index.chunk_size != record.chunk_size {
            return Err(damaged(format!(
                "index describes {} bytes in {}-byte chunks, record says {} bytes in {}-byte chunks",
                index.disk_size, index.chunk_size, disk.size, record.chunk_size
            )));
        }
        Ok(index)
    }
}

/// Resolves `spec` among `ids` (sorted oldest first).
fn resolve_in(ids: &[PointId], spec: &str) -> Result<PointId, SpaceError> {
    if spec == "latest" {
        return ids.last().copied().ok_or(SpaceError::NoPoints);
    }
    if let Ok(id) = spec.parse::<PointId>() {
        return if ids.contains(&id) {
            Ok(id)
        } else {
            Err(SpaceError::PointNotFound(spec.to_string()))
        };
    }
    let want = spec.to_ascii_lowercase();
    let matches: Vec<PointId> = if want.len() >= 4 {
        ids.iter()
            .copied()
            .filter(|id| id.to_string().starts_with(&want))
            .collect()
    } else {
        Vec::new()
    };
    match matches.as_slice() {
        [one] => Ok(*one),
        [] => Err(SpaceError::PointNotFound(spec.to_string())),
        many => Err(SpaceError::AmbiguousPoint {
            prefix: spec.to_string(),
            matches: many
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}
