//! Cairn's NBD server.
//!
//! The protocol (NetworkBlockDevice/nbd `doc/proto.md`) is implemented as a sans-IO core
//! — [`handshake`] (fixed newstyle: GO, INFO, LIST, EXPORT_NAME, ABORT, STRUCTURED_REPLY,
//! LIST/SET_META_CONTEXT with `base:allocation`) and [`wire`] (request parsing and
//! checking, simple and structured replies) — plus a tokio loop in [`server`] that owns
//! the sockets and serves many requests per connection concurrently, replying out of
//! order. Exports are anything that implements [`export::BlockExport`]; [`export::FileExport`]
//! serves a raw file or block device.
//!
//! Why hand-written: no crate serves NBD well enough (see docs/ARCHITECTURE.md).
//!
//! ```
//! use cairn_nbd::handshake::{ExportCatalog, ExportInfo, Handshake, HandshakeStep};
//!
//! struct One;
//! impl ExportCatalog for One {
//!     fn lookup(&self, name: &str) -> Option<ExportInfo> {
//!         (name == "web/root").then(|| ExportInfo {
//!             name: name.into(), description: String::new(), size: 1 << 20,
//!             read_only: true, multi_conn: true,
//!         })
//!     }
//!     fn list(&self) -> Vec<ExportInfo> { self.lookup("web/root").into_iter().collect() }
//! }
//!
//! let mut hs = Handshake::new();
//! assert_eq!(hs.take_output().len(), 18); // NBDMAGIC, IHAVEOPT, handshake flags
//! let mut input = 3u32.to_be_bytes().to_vec(); // client: fixed newstyle, no zeroes
//! input.extend_from_slice(&0x49484156454F5054u64.to_be_bytes());
//! input.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
//! input.extend_from_slice(&8u32.to_be_bytes());
//! input.extend_from_slice(b"web/root");
//! let (used, _) = hs.step(&input, &One).unwrap();
//! let (_, step) = hs.step(&input[used..], &One).unwrap();
//! assert!(matches!(step, HandshakeStep::Done(n) if n.export.size == 1 << 20));
//! assert_eq!(hs.take_output().len(), 10); // size and transmission flags
//! ```

pub mod export;
pub mod handshake;
pub mod proto;
pub mod server;
pub mod stats;
pub mod wire;
