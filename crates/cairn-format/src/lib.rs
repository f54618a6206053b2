//! Cairn's on-disk formats, as a sans-IO core.
//!
//! Everything a recovery space stores is defined here as bytes in, typed values out (and
//! back): the space config, chunk envelopes, disk indexes and recovery point records, and
//! the key layout that names them. Nothing here touches a file, a socket or a runtime, so
//! the formats can be unit-tested, property-tested and fuzzed in isolation; the store crate
//! (`cairn-store`) moves these bytes to and from a backend.
//!
//! The formats are drawn, with their versioning rules, in `docs/FORMAT.md`.
//!
//! ```
//! use cairn_format::chunk::{ChunkCodec, open_chunk};
//! use cairn_format::id::ChunkId;
//!
//! let data = vec![7u8; 64 * 1024];
//! let id = ChunkId::of(&data);
//! let mut codec = ChunkCodec::new(3).unwrap();
//! let sealed = codec.seal(&data).unwrap();
//! assert!(sealed.len() < data.len()); // compressed
//! let opened = open_chunk(&sealed, &id).unwrap();
//! assert_eq!(opened, data);
//! ```

pub mod chunk;
pub mod config;
pub mod framed;
pub mod id;
pub mod index;
pub mod layout;
pub mod name;
pub mod record;
pub mod testdata;
pub mod zero;
