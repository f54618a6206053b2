//! The disk pool: a folder of sparse files plus metadata (docs/FORMAT.md, "disk pool").
//!
//! ```text
//! pool.json                                  kind, version, id, location name, space
//! servers/<server>/server.json               desired state (running/stopped), hooks
//! servers/<server>/lock                      flock'ed by the process that has its disks open
//! servers/<server>/disks/<disk>.raw          the disk's data, a sparse file
//! servers/<server>/disks/<disk>.json         size, origin (clones)
//! servers/<server>/disks/<disk>.cbt          changed-block map (see cbt.rs)
//! servers/<server>/disks/<disk>.present      a clone's hydration map (see clone.rs)
//! servers/<server>/disks/<disk>.cow          copy-before-write buffer while a point is taken
//! control.sock                               the serving process's control socket
//! ```
//!
//! A pool belongs to one location, and a location has one recovery space: `pool.json`
//! names it (path and id). Metadata files are replaced atomically.

use std::fs::File;
use std::path::{Path, PathBuf};

use cairn_format::id::PointId;
use cairn_format::name::validate;
use serde::{Deserialize, Serialize};

use crate::error::VolumeError;
use crate::mapfile::write_atomic;

pub const POOL_VERSION: u32 = 1;
const KIND: &str = "cairn-disk-pool";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolMeta {
    pub kind: String,
    pub version: u32,
    pub id: uuid::Uuid,
    /// The location this pool belongs to (one daemon, its pool, its space).
    pub location: String,
    /// Where the location's recovery space is (a folder path).
    pub space: String,
    /// The space's id, to tell it apart from any other.
    pub space_id: uuid::Uuid,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServerState {
    Running,
    Stopped,
}

impl std::fmt::Display for ServerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ServerState::Running => "running",
            ServerState::Stopped => "stopped",
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerMeta {
    pub name: String,
    /// The state the operator asked for; the serving process attaches running servers.
    pub state: ServerState,
    /// Run (with `sh -c`) before the disks are frozen for a point, e.g. a guest fsfreeze.
    #[serde(default)]
    pub pre_hook: Option<String>,
    /// Run right after the freeze (whether or not it succeeded), e.g. a guest thaw.
    #[serde(default)]
    pub post_hook: Option<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// Where a clone's content comes from until it is hydrated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Origin {
    pub space_id: uuid::Uuid,
    pub point: PointId,
    pub disk: String,
    pub chunk_size: u32,
    /// The pin that keeps the point from deletion until hydration completes.
    pub pin: uuid::Uuid,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskMeta {
    pub server: String,
    pub name: String,
    pub size: u64,
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// Set while the disk is an unhydrated clone.
    #[serde(default)]
    pub origin: Option<Origin>,
}

/// The files of one disk.
#[derive(Debug, Clone)]
pub struct DiskPaths {
    pub data: PathBuf,
    pub meta: PathBuf,
    pub cbt: PathBuf,
    pub present: PathBuf,
    pub cow: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Pool {
    root: PathBuf,
    meta: PoolMeta,
}

/// Splits `server/disk`, validating both names.
pub fn parse_disk_spec(spec: &str) -> Result<(String, String), VolumeError> {
    let (s, d) = spec
        .split_once('/')
        .ok_or_else(|| VolumeError::DiskSpec(spec.to_string()))?;
    validate("server", s)?;
    validate("disk", d)?;
    Ok((s.to_string(), d.to_string()))
}

/// Checks a disk size: non-zero, a multiple of 512, at most 2^62.
pub fn check_size(size: u64) -> Result<(), VolumeError> {
    let why = if size == 0 {
        "a disk cannot be empty"
    } else if !size.is_multiple_of(512) {
        "it must be a multiple of 512 bytes"
    } else if size > 1 << 62 {
        "it is too large"
    } else {
        return Ok(());
    };
    Err(VolumeError::BadSize {
        size,
        why: why.into(),
    })
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, VolumeError> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| VolumeError::Malformed {
                path: path.to_path_buf(),
                detail: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(VolumeError::io("cannot read", path, e)),
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), VolumeError> {
    let mut body = serde_json::to_vec_pretty(value).expect("serializes");
    body.push(b'\n');
    write_atomic(path, &body).map_err(|e| VolumeError::io("cannot write", path, e))
}

impl Pool {
    /// Creates a pool for the location `location` whose recovery space is `space`.
    pub fn init(
        root: &Path,
        location: &str,
        space: &str,
        space_id: uuid::Uuid,
    ) -> Result<Pool, VolumeError> {
        validate("location", location)?;
        if root.join("pool.json").exists() {
            return Err(VolumeError::PoolExists {
                path: root.to_path_buf(),
            });
        }
        std::fs::create_dir_all(root.join("servers"))
            .map_err(|e| VolumeError::io("cannot create pool folder", root, e))?;
        let meta = PoolMeta {
            kind: KIND.into(),
            version: POOL_VERSION,
            id: uuid::Uuid::new_v4(),
            location: location.into(),
            space: space.into(),
            space_id,
            created_at: chrono::Utc::now(),
        };
        write_json(&root.join("pool.json"), &meta)?;
        Ok(Pool {
            root: root.to_path_buf(),
            meta,
        })
    }

    pub fn open(root: &Path) -> Result<Pool, VolumeError> {
        let path = root.join("pool.json");
        let meta: PoolMeta = read_json(&path)?.ok_or_else(|| VolumeError::NotAPool {
            path: root.to_path_buf(),
        })?;
        if meta.kind != KIND {
            return Err(VolumeError::Malformed {
                path,
                detail: format!("kind {:?} is not a Cairn disk pool", meta.kind),
            });
        }
        if meta.version != POOL_VERSION {
            return Err(VolumeError::Malformed {
                path,
                detail: format!(
                    "pool format version {} is not supported (this cairn reads {POOL_VERSION})",
                    meta.version
                ),
            });
        }
        Ok(Pool {
            root: root.to_path_buf(),
            meta,
        })
    }

    /// Whether `root` holds a pool (a pool.json).
    pub fn exists(root: &Path) -> bool {
        root.join("pool.json").is_file()
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn meta(&self) -> &PoolMeta {
        &self.meta
    }

    pub fn control_socket(&self) -> PathBuf {
        self.root.join("control.sock")
    }

    fn server_dir(&self, server: &str) -> PathBuf {
        self.root.join("servers").join(server)
    }

    pub fn create_server(
        &self,
        name: &str,
        pre_hook: Option<String>,
        post_hook: Option<String>,
    ) -> Result<ServerMeta, VolumeError> {
        validate("server", name)?;
        let dir = self.server_dir(name);
        if dir.join("server.json").exists() {
            return Err(VolumeError::ServerExists(name.into()));
        }
        std::fs::create_dir_all(dir.join("disks"))
            .map_err(|e| VolumeError::io("cannot create server folder", &dir, e))?;
        let meta = ServerMeta {
            name: name.into(),
            state: ServerState::Stopped,
            pre_hook,
            post_hook,
            created_at: chrono::Utc::now(),
        };
        write_json(&dir.join("server.json"), &meta)?;
        Ok(meta)
    }

    pub fn server(&self, name: &str) -> Result<ServerMeta, VolumeError> {
        validate("server", name)?;
        read_json(&self.server_dir(name).join("server.json"))?.ok_or_else(|| {
            VolumeError::NoServer {
                server: name.into(),
                pool: self.root.clone(),
            }
        })
    }

    pub fn servers(&self) -> Result<Vec<ServerMeta>, VolumeError> {
        let dir = self.root.join("servers");
        let mut out = Vec::new();
        let entries =
            std::fs::read_dir(&dir).map_err(|e| VolumeError::io("cannot list", &dir, e))?;
        for e in entries {
            let e = e.map_err(|e| VolumeError::io("cannot list", &dir, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if validate("server", &name).is_ok()
                && let Some(m) = read_json::<ServerMeta>(&e.path().join("server.json"))?
            {
                out.push(m);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    pub fn save_server(&self, meta: &ServerMeta) -> Result<(), VolumeError> {
        write_json(&self.server_dir(&meta.name).join("server.json"), meta)
    }

    /// Deletes a server that has no disks and is not in use.
    pub fn delete_server(&self, name: &str) -> Result<(), VolumeError> {
        self.server(name)?;
        let _lock = self.lock_server(name, "server delete")?;
        let disks = self.disks(name)?;
        if !disks.is_empty() {
            return Err(VolumeError::ServerHasDisks {
                server: name.into(),
                disks: disks
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        let dir = self.server_dir(name);
        std::fs::remove_dir_all(&dir).map_err(|e| VolumeError::io("cannot delete", &dir, e))
    }

    /// Takes the server's lock (without waiting): only one process has a server's disks
    /// open at a time. `what` is shown to whoever finds it taken.
    pub fn lock_server(&self, server: &str, what: &str) -> Result<ServerLock, VolumeError> {
        let path = self.server_dir(server).join("lock");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| VolumeError::io("cannot open lock", &path, e))?;
        use rustix::fs::{FlockOperation, flock};
        if flock(&file, FlockOperation::NonBlockingLockExclusive).is_err() {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            return Err(VolumeError::InUse {
                server: server.into(),
                holder: if holder.trim().is_empty() {
                    "another process".into()
                } else {
                    holder.trim().to_string()
                },
            });
        }
        let holder = format!("`{what}` (pid {})", std::process::id());
        let _ = file.set_len(0);
        let _ = std::os::unix::fs::FileExt::write_all_at(&file, holder.as_bytes(), 0);
        Ok(ServerLock { _file: file })
    }

    pub fn disk_paths(&self, server: &str, disk: &str) -> DiskPaths {
        let d = self.server_dir(server).join("disks");
        DiskPaths {
            data: d.join(format!("{disk}.raw")),
            meta: d.join(format!("{disk}.json")),
            cbt: d.join(format!("{disk}.cbt")),
            present: d.join(format!("{disk}.present")),
            cow: d.join(format!("{disk}.cow")),
        }
    }

    pub fn disks(&self, server: &str) -> Result<Vec<DiskMeta>, VolumeError> {
        let dir = self.server_dir(server).join("disks");
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.server(server)?;
                return Ok(out);
            }
            Err(e) => return Err(VolumeError::io("cannot list", &dir, e)),
        };
        for e in entries {
            let e = e.map_err(|e| VolumeError::io("cannot list", &dir, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(disk) = name.strip_suffix(".json")
                && validate("disk", disk).is_ok()
                && let Some(m) = read_json::<DiskMeta>(&e.path())?
            {
                out.push(m);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    pub fn disk(&self, server: &str, disk: &str) -> Result<DiskMeta, VolumeError> {
        self.server(server)?;
        validate("disk", disk)?;
        match read_json(&self.disk_paths(server, disk).meta)? {
            Some(m) => Ok(m),
            None => Err(VolumeError::NoDisk {
                server: server.into(),
                disk: disk.into(),
                available: {
                    let names: Vec<String> =
                        self.disks(server)?.into_iter().map(|d| d.name).collect();
                    if names.is_empty() {
                        "no disks".into()
                    } else {
                        names.join(", ")
                    }
                },
            }),
        }
    }

    pub fn save_disk(&self, meta: &DiskMeta) -> Result<(), VolumeError> {
        write_json(&self.disk_paths(&meta.server, &meta.name).meta, meta)
    }

    /// Creates an empty (sparse, all zeros) disk. The caller holds the server's lock.
    pub fn create_disk(
        &self,
        server: &str,
        disk: &str,
        size: u64,
        origin: Option<Origin>,
    ) -> Result<DiskMeta, VolumeError> {
        self.server(server)?;
        validate("disk", disk)?;
        check_size(size)?;
        let paths = self.disk_paths(server, disk);
        if paths.meta.exists() {
            return Err(VolumeError::DiskExists {
                server: server.into(),
                disk: disk.into(),
            });
        }
        let f = File::create(&paths.data)
            .map_err(|e| VolumeError::io("cannot create disk file", &paths.data, e))?;
        f.set_len(size)
            .map_err(|e| VolumeError::io("cannot size disk file", &paths.data, e))?;
        f.sync_all()
            .map_err(|e| VolumeError::io("cannot sync disk file", &paths.data, e))?;
        let meta = DiskMeta {
            server: server.into(),
            name: disk.into(),
            size,
            created_at: chrono::Utc::now(),
            origin,
        };
        // The metadata last: a disk exists once its .json does.
        self.save_disk(&meta)?;
        Ok(meta)
    }

    /// Removes a disk's files (metadata first). The caller holds the server's lock.
    pub fn remove_disk_files(&self, server: &str, disk: &str) -> Result<(), VolumeError> {
        let p = self.disk_paths(server, disk);
        for f in [&p.meta, &p.cbt, &p.present, &p.cow, &p.data] {
            match std::fs::remove_file(f) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(VolumeError::io("cannot delete", f, e)),
            }
        }
        Ok(())
    }
}

/// Held while a process has a server's disks open; released on drop (or process death).
#[derive(Debug)]
pub struct ServerLock {
    _file: File,
}
