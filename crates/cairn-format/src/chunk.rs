//! Chunk envelopes: how one chunk's content is stored.
//!
//! ```text
//! offset size field
//!      0    4 magic "CRNC"
//!      4    1 envelope version (1)
//!      5    1 compression: 0 = none (raw), 1 = zstd
//!      6    1 encryption: 0 = none (reserved: 1 = XChaCha20-Poly1305 AEAD)
//!      7    1 reserved, 0
//!      8    4 plain length, u32 little endian
//!     12    4 CRC-32C of the payload (bytes 16..), u32 little endian
//!     16    - payload: the plain bytes, or a zstd frame of them
//! ```
//!
//! The CRC covers what is stored, so damage at rest is detected before decompression;
//! the chunk id (BLAKE3 of the plain content) is checked again after it, so a chunk can
//! never be returned under the wrong id. A chunk is stored raw when compression would not
//! make it smaller.

use crate::id::ChunkId;

pub const MAGIC: &[u8; 4] = b"CRNC";
pub const ENVELOPE_VERSION: u8 = 1;
pub const HEADER_LEN: usize = 16;
/// The largest chunk the format allows (the largest chunk size a space may choose).
pub const MAX_PLAIN_LEN: usize = 16 << 20;

const COMPRESSION_NONE: u8 = 0;
const COMPRESSION_ZSTD: u8 = 1;
const ENCRYPTION_NONE: u8 = 0;

/// Why a stored chunk could not be opened. Every variant means the stored bytes are
/// damaged (or not a chunk at all); retrying the read does not help unless the damage
/// happened in transit.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChunkError {
    #[error("stored chunk is truncated ({len} bytes stored)")]
    Truncated { len: usize },
    #[error("stored object is not a chunk (bad magic)")]
    BadMagic,
    #[error("chunk envelope version {0} is not supported (this cairn reads versions 1 and 2)")]
    UnsupportedVersion(u8),
    #[error("chunk is encrypted (scheme {0}) but this space has no key")]
    Encrypted(u8),
    #[error("unknown compression {0} in chunk header")]
    UnknownCompression(u8),
    #[error("plain length {0} in chunk header exceeds the 16 MiB limit")]
    TooLarge(u32),
    #[error("checksum mismatch: stored CRC-32C {stored:08x}, computed {computed:08x}")]
    Checksum { stored: u32, computed: u32 },
    #[error("decompression failed: {0}")]
    Decompress(String),
    #[error("decompressed length {got} differs from header's {expected}")]
    Length { expected: usize, got: usize },
    #[error("content hash {got} does not match chunk id {expected}")]
    HashMismatch { expected: ChunkId, got: ChunkId },
    #[error("grain table: {0}")]
    Table(String),
    #[error(
        "grain {grain} (bytes {start}..{end} of the chunk) is damaged: its content does not match its chaining value"
    )]
    GrainDamaged {
        grain: usize,
        start: usize,
        end: usize,
    },
}

/// Seals chunks; holds a reusable zstd context and scratch buffer (create one per
/// thread).
pub struct ChunkCodec {
    compressor: zstd::bulk::Compressor<'static>,
    level: i32,
    scratch: Vec<u8>,
}

impl ChunkCodec {
    /// A codec compressing at zstd `level` (1..=19 are sensible; 0 means zstd's default).
    pub fn new(level: i32) -> std::io::Result<Self> {
        Ok(ChunkCodec {
            compressor: zstd::bulk::Compressor::new(level)?,
            level,
            scratch: Vec::new(),
        })
    }

    pub fn level(&self) -> i32 {
        self.level
    }

    /// The zstd context, for [`crate::framed::seal`].
    pub fn compressor(&mut self) -> &mut zstd::bulk::Compressor<'static> {
        &mut self.compressor
    }

    /// Seals `plain` into a stored envelope, compressed when that is smaller.
    pub fn seal(&mut self, plain: &[u8]) -> std::io::Result<Vec<u8>> {
        assert!(
            plain.len() <= MAX_PLAIN_LEN,
            "chunk larger than the format allows"
        );
        // Compress into the reused scratch buffer (its spare capacity: no zero-filling,
        // no fresh pages), then copy what is kept into an exact-size envelope.
        let bound = zstd::zstd_safe::compress_bound(plain.len());
        self.scratch.clear();
        self.scratch.reserve(bound);
        let n = self
            .compressor
            .compress_to_buffer(plain, &mut self.scratch)?;
        let (compression, payload) = if n < plain.len() {
            (COMPRESSION_ZSTD, &self.scratch[..n])
        } else {
            (COMPRESSION_NONE, plain)
        };
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.extend_from_slice(&[0u8; HEADER_LEN]);
        out.extend_from_slice(payload);
        write_header(&mut out, compression, plain.len());
        Ok(out)
    }
}

fn write_header(out: &mut [u8], compression: u8, plain_len: usize) {
    let crc = crc32c::crc32c(&out[HEADER_LEN..]);
    out[0..4].copy_from_slice(MAGIC);
    out[4] = ENVELOPE_VERSION;
    out[5] = compression;
    out[6] = ENCRYPTION_NONE;
    out[7] = 0;
    // MAX_PLAIN_LEN fits in u32.
    out[8..12].copy_from_slice(&u32::try_from(plain_len).unwrap_or(u32::MAX).to_le_bytes());
    out[12..16].copy_from_slice(&crc.to_le_bytes());
}

/// The parsed header of a stored chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub compressed: bool,
    pub plain_len: usize,
    pub crc: u32,
}

/// Parses and checks the header and the stored checksum (no decompression).
pub fn check_stored(stored: &[u8]) -> Result<ChunkHeader, ChunkError> {
    if stored.len() < HEADER_LEN {
        return Err(ChunkError::Truncated { len: stored.len() });
    }
    if &stored[0..4] != MAGIC {
        return Err(ChunkError::BadMagic);
    }
    if stored[4] != ENVELOPE_VERSION {
        return Err(ChunkError::UnsupportedVersion(stored[4]));
    }
    if stored[6] != ENCRYPTION_NONE {
        return Err(ChunkError::Encrypted(stored[6]));
    }
    let compressed = match stored[5] {
        COMPRESSION_NONE => false,
        COMPRESSION_ZSTD => true,
        other => return Err(ChunkError::UnknownCompression(other)),
    };
    let plain_len = u32::from_le_bytes(stored[8..12].try_into().expect("4 bytes"));
    if plain_len as usize > MAX_PLAIN_LEN {
        return Err(ChunkError::TooLarge(plain_len));
    }
    let crc = u32::from_le_bytes(stored[12..16].try_into().expect("4 bytes"));
    let computed = crc32c::crc32c(&stored[HEADER_LEN..]);
    if computed != crc {
        return Err(ChunkError::Checksum {
            stored: crc,
            computed,
        });
    }
    Ok(ChunkHeader {
        compressed,
        plain_len: plain_len as usize,
        crc,
    })
}

/// Opens a stored chunk into `out` (cleared first): checks the stored checksum,
/// decompresses, and checks that the content hashes to `expected`.
pub fn open_chunk_into(
    stored: &[u8],
    expected: &ChunkId,
    out: &mut Vec<u8>,
) -> Result<(), ChunkError> {
    if crate::framed::is_framed(stored) {
        return crate::framed::open_into(stored, None, expected, out);
    }
    let header = check_stored(stored)?;
    let payload = &stored[HEADER_LEN..];
    out.clear();
    if header.compressed {
        out.reserve(header.plain_len);
        let mut d =
            zstd::bulk::Decompressor::new().map_err(|e| ChunkError::Decompress(e.to_string()))?;
        d.decompress_to_buffer(payload, out)
            .map_err(|e| ChunkError::Decompress(e.to_string()))?;
    } else {
        out.extend_from_slice(payload);
    }
    if out.len() != header.plain_len {
        return Err(ChunkError::Length {
            expected: header.plain_len,
            got: out.len(),
        });
    }
    let got = ChunkId::of(out);
    if got != *expected {
        return Err(ChunkError::HashMismatch {
            expected: *expected,
            got,
        });
    }
    Ok(())
}

/// Opens a stored chunk into a new buffer; see [`open_chunk_into`].
pub fn open_chunk(stored: &[u8], expected: &ChunkId) -> Result<Vec<u8>, ChunkError> {
    let mut out = Vec::new();
    open_chunk_into(stored, expected, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn incompressible_is_stored_raw() {
        let data = crate::testdata::noise(1, 100_000);
        let mut c = ChunkCodec::new(1).unwrap();
        let sealed = c.seal(&data).unwrap();
        let h = check_stored(&sealed).unwrap();
        assert!(!h.compressed);
        assert_eq!(sealed.len(), HEADER_LEN + data.len());
        assert_eq!(open_chunk(&sealed, &ChunkId::of(&data)).unwrap(), data);
    }

    #[test]
    fn damage_is_detected() {
        let data = vec![1u8; 50_000];
        let id = ChunkId::of(&data);
        let sealed = ChunkCodec::new(3).unwrap().seal(&data).unwrap();
        let mut flipped = sealed.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x40;
        assert!(matches!(
            open_chunk(&flipped, &id),
            Err(ChunkError::Checksum { .. })
        ));
        assert!(matches!(
            open_chunk(&sealed[..10], &id),
            Err(ChunkError::Truncated { len: 10 })
        ));
        assert!(matches!(
            open_chunk(&sealed[..sealed.len() - 3], &id),
            Err(ChunkError::Checksum { .. })
        ));
        let other = ChunkId::of(b"other");
        assert!(matches!(
            open_chunk(&sealed, &other),
            Err(ChunkError::HashMismatch { .. })
        ));
        let mut v2 = sealed.clone();
        v2[4] = 9;
        assert_eq!(open_chunk(&v2, &id), Err(ChunkError::UnsupportedVersion(9)));
    }

    proptest! {
        #[test]
        fn seal_open_round_trip(data in proptest::collection::vec(any::<u8>(), 0..70_000), level in 1i32..6) {
            let id = ChunkId::of(&data);
            let sealed = ChunkCodec::new(level).unwrap().seal(&data).unwrap();
            prop_assert_eq!(open_chunk(&sealed, &id).unwrap(), data);
        }

        #[test]
        fn open_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = open_chunk(&bytes, &ChunkId::ZERO);
        }
    }
}
