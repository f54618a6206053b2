//! Cairn's recovery space: a deduplicating, compressed store of recovery points.
//!
//! A [`Space`] lives on a [`Backend`] (a local folder by default). Operations take a
//! space and options and return a report; the CLI is a thin shell over them:
//! [`create::create_point`], [`restore::restore_disk`], [`rollback::plan_rollback`] and
//! [`rollback::apply_rollback`], [`verify::verify`], [`gc::delete_points`], [`gc::gc`],
//! [`gc::prune_plan`].
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use std::sync::Arc;
//! use cairn_format::config::SpaceConfig;
//! use cairn_store::backend::ObjectStoreBackend;
//! use cairn_store::create::{create_point, CreateOptions, DiskSource};
//! use cairn_store::progress::NoProgress;
//! use cairn_store::restore::{restore_disk, RestoreOptions};
//! use cairn_store::Space;
//!
//! let dir = tempfile::tempdir().unwrap();
//! let image = dir.path().join("root.img");
//! std::fs::write(&image, vec![42u8; 1 << 20]).unwrap();
//!
//! let space = Space::init(Arc::new(ObjectStoreBackend::memory()), SpaceConfig::new(64 << 10, 1).unwrap())
//!     .await.unwrap();
//! let opts = CreateOptions::new(vec![DiskSource { name: "root".into(), path: image.clone() }]);
//! let point = create_point(&space, &opts, &NoProgress).await.unwrap();
//! assert_eq!(point.stats.chunks_new, 1); // 16 identical chunks, stored once
//!
//! let out = dir.path().join("restored.img");
//! restore_disk(&space, &point, None, &out, &RestoreOptions::default(), &NoProgress).await.unwrap();
//! assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&image).unwrap());
//! # });
//! ```

pub mod backend;
pub mod create;
pub mod error;
pub mod fetch;
pub mod gc;
pub mod image;
pub mod lock;
pub mod pins;
pub mod progress;
pub mod restore;
pub mod retention;
pub mod rollback;
pub mod source;
pub mod space;
pub mod verify;

pub use backend::Backend;
pub use error::SpaceError;
pub use space::Space;
