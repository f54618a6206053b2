//! Framed chunk envelopes (envelope version 2): a chunk stored as independent frames, one
//! per 64 KiB *grain*, behind a table that holds each grain's BLAKE3 chaining value.
//!
//! ```text
//! offset size field
//!      0    4 magic "CRNC"
//!      4    1 envelope version (2)
//!      5    1 grain shift: grain size = 1 << shift (16 = 64 KiB; 10 ..= 24)
//!      6    1 encryption: 0 = none
//!      7    1 reserved, 0
//!      8    4 plain length, u32 LE (≤ 16 MiB)
//!     12    4 grain count n = ceil(plain length / grain size), u32 LE
//!     16   32 base chunk id (a patch), or 32 zero bytes (a standalone chunk)
//!     48    4 CRC-32C of bytes 0..48 followed by the table, u32 LE
//!     52    4 reserved, 0
//!     56 40·n table, per grain: stored length u32 LE, kind u8 (0 raw, 1 zstd frame,
//!             2 zeros, 3 in the base chunk, 4 delta over the base's grain), 3 reserved
//!             zero bytes, chaining value (32)
//! 56+40n    - the frames of the raw, zstd and delta grains, in grain order
//! ```
//!
//! Envelope version 3 is version 2 plus kind 4, written only for a patch that holds a
//! delta grain (so that a reader without kind 4 refuses it by version). A **delta** frame
//! stores only the 4 KiB blocks (a sixteenth of a grain) of the grain that differ from
//! the base's grain:
//!
//! ```text
//!      0    2 block mask, u16 LE: bit i = block i (grain size / 16 bytes) is stored
//!      2    1 payload codec: 0 raw, 1 zstd
//!      3    1 reserved, 0
//!      4    - payload: the stored blocks' content in block order (the last block of a
//!             short grain is short), raw or one zstd frame
//! ```
//!
//! Its chaining value is the whole grain's (the base's grain with the blocks written
//! over it), so a delta grain is verified like any other once applied.
//!
//! The chaining values are those of BLAKE3's own tree (grains are aligned power-of-two
//! subtrees), so merging them gives the chunk id — the BLAKE3 of the whole content, the
//! same id a version-1 envelope of the same content has. That makes a grain verifiable
//! on its own: check the table's CRC, check that the table's values merge to the id, then
//! hash the one grain read. A chunk of a single grain stores its id as its value.
//!
//! A **patch** is a chunk whose grains of kind 3 are those of another chunk, its base
//! (always a standalone chunk: patches are never stacked). It is what an incremental
//! point stores for a chunk of which few grains changed: the changed grains only.

/// A grain's BLAKE3 chaining value (its subtree of the chunk's hash tree).
pub use blake3::hazmat::ChainingValue;
use blake3::hazmat::{
    HasherExt, Mode, left_subtree_len, merge_subtrees_non_root, merge_subtrees_root,
};

use crate::chunk::{ChunkError, MAGIC, MAX_PLAIN_LEN};
use crate::id::ChunkId;

pub const VERSION: u8 = 2;
/// The version of a patch holding delta grains (kind 4).
pub const VERSION_DELTA: u8 = 3;
/// Blocks per grain in a delta frame's mask.
pub const DELTA_BLOCKS: usize = 16;
/// Bytes before a delta frame's payload.
pub const DELTA_HEADER: usize = 4;

/// Whether stored bytes are a framed envelope (version 2 or 3), not version 1.
pub fn is_framed(stored: &[u8]) -> bool {
    matches!(stored.get(4), Some(&(VERSION | VERSION_DELTA)))
}
/// The grain size Cairn writes.
pub const GRAIN_SHIFT: u8 = 16;
pub const GRAIN: usize = 1 << GRAIN_SHIFT;
pub const HEADER_LEN: usize = 56;
pub const ENTRY_LEN: usize = 40;

/// How a grain is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Raw = 0,
    Zstd = 1,
    Zero = 2,
    Base = 3,
    Delta = 4,
}

impl Kind {
    /// Whether decoding the grain needs the base's grain.
    pub fn needs_base(self) -> bool {
        matches!(self, Kind::Base | Kind::Delta)
    }
}

/// One grain's table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub stored_len: u32,
    pub kind: Kind,
    pub cv: ChainingValue,
}

/// A parsed header and table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub plain_len: usize,
    pub grain_shift: u8,
    pub base: Option<ChunkId>,
    pub entries: Vec<Entry>,
    /// Offset of each grain's frame in the stored object (its length is the entry's).
    pub offsets: Vec<usize>,
}

/// Grains of a chunk of `plain_len` bytes.
pub fn grain_count(plain_len: usize, grain: usize) -> usize {
    plain_len.div_ceil(grain).max(1)
}

/// Bytes of header and table of a chunk of `plain_len` bytes (with Cairn's grain size).
pub fn table_len(plain_len: usize) -> usize {
    HEADER_LEN + ENTRY_LEN * grain_count(plain_len, GRAIN)
}

impl Header {
    pub fn grain(&self) -> usize {
        1 << self.grain_shift
    }

    /// Plain byte range of grain `g`.
    pub fn grain_range(&self, g: usize) -> std::ops::Range<usize> {
        let s = g * self.grain();
        s..(s + self.grain()).min(self.plain_len)
    }

    /// Stored byte range of grain `g`'s frame (empty for zero and base grains).
    pub fn frame_range(&self, g: usize) -> std::ops::Range<usize> {
        self.offsets[g]..self.offsets[g] + self.entries[g].stored_len as usize
    }

    /// The id the table's chaining values merge to.
    pub fn root(&self) -> ChunkId {
        let cvs: Vec<ChainingValue> = self.entries.iter().map(|e| e.cv).collect();
        root_of(&cvs, self.plain_len, self.grain())
    }

    /// Bytes of header and table.
    pub fn table_len(&self) -> usize {
        HEADER_LEN + ENTRY_LEN * self.entries.len()
    }

    /// The block size of delta frames.
    pub fn block(&self) -> usize {
        self.grain() / DELTA_BLOCKS
    }
}

/// The byte ranges (within a grain of `grain_len` bytes, blocks of `block` bytes) of the
/// blocks a delta mask names; `None` if it names a block past the grain's end.
pub fn delta_blocks(
    mask: u16,
    grain_len: usize,
    block: usize,
) -> Option<impl Iterator<Item = std::ops::Range<usize>>> {
    let blocks = grain_len.div_ceil(block);
    if blocks < DELTA_BLOCKS && mask >> blocks != 0 {
        return None;
    }
    Some(
        (0..DELTA_BLOCKS)
            .filter(move |b| mask & (1 << b) != 0)
            .map(move |b| b * block..((b + 1) * block).min(grain_len)),
    )
}

/// The mask of the delta blocks (of `block` bytes) that `[from, to)` (within a grain)
/// touches.
pub fn delta_mask(from: usize, to: usize, block: usize) -> u16 {
    if from >= to {
        return 0;
    }
    let (a, b) = (from / block, to.div_ceil(block).min(DELTA_BLOCKS));
    (a..b).fold(0, |m, i| m | 1 << i)
}

/// The chaining value of grain `g` of a chunk with `grains` grains (the hash itself when
/// the chunk is a single grain).
pub fn grain_cv(data: &[u8], g: usize, grains: usize, grain: usize) -> ChainingValue {
    if grains == 1 {
        return *blake3::hash(data).as_bytes();
    }
    let mut h = blake3::Hasher::new();
    h.set_input_offset((g * grain) as u64);
    h.update(data);
    h.finalize_non_root()
}

/// Every grain's chaining value of `plain` (Cairn's grain size), and the chunk id.
pub fn cvs_of(plain: &[u8]) -> (Vec<ChainingValue>, ChunkId) {
    let n = grain_count(plain.len(), GRAIN);
    let cvs: Vec<ChainingValue> = if plain.is_empty() {
        vec![*blake3::hash(plain).as_bytes()]
    } else {
        plain
            .chunks(GRAIN)
            .enumerate()
            .map(|(g, d)| grain_cv(d, g, n, GRAIN))
            .collect()
    };
    let id = root_of(&cvs, plain.len(), GRAIN);
    (cvs, id)
}

/// The chaining values of a chunk of `plain_len` zeros (computed once per length).
pub fn zero_cvs(plain_len: usize) -> std::sync::Arc<Vec<ChainingValue>> {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};
    static CACHE: OnceLock<Mutex<HashMap<usize, Arc<Vec<ChainingValue>>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(v) = cache.lock().expect("poisoned").get(&plain_len) {
        return v.clone();
    }
    let v = Arc::new(cvs_of(&vec![0u8; plain_len]).0);
    cache.lock().expect("poisoned").insert(plain_len, v.clone());
    v
}

/// Merges grains' chaining values into the root hash (BLAKE3's tree: the left subtree
/// holds the largest power of two of 1 KiB chunks that leaves the right one non-empty;
/// every split of more than one grain falls on a grain boundary).
pub fn root_of(cvs: &[ChainingValue], plain_len: usize, grain: usize) -> ChunkId {
    fn subtree(cvs: &[ChainingValue], first: usize, len: u64, grain: u64) -> ChainingValue {
        if len <= grain {
            return cvs[first];
        }
        let left = left_subtree_len(len);
        let l = subtree(cvs, first, left, grain);
        let r = subtree(
            cvs,
            first + usize::try_from(left / grain).expect("grain index fits: below plain_len"),
            len - left,
            grain,
        );
        merge_subtrees_non_root(&l, &r, Mode::Hash)
    }
    if cvs.len() == 1 {
        return ChunkId(cvs[0]);
    }
    let (len, g) = (plain_len as u64, grain as u64);
    let left = left_subtree_len(len);
    let l = subtree(cvs, 0, left, g);
    let r = subtree(
        cvs,
        usize::try_from(left / g).expect("grain index fits: below plain_len"),
        len - left,
        g,
    );
    ChunkId(*merge_subtrees_root(&l, &r, Mode::Hash).as_bytes())
}

/// What to store for one grain when sealing.
#[derive(Debug, Clone, Copy)]
pub enum Grain<'a> {
    /// Plain content (compressed when that is smaller; all zeros become a zero grain).
    Data(&'a [u8]),
    /// An already stored frame (copied from another patch of the same base).
    Stored { kind: Kind, bytes: &'a [u8] },
    /// The base chunk's grain.
    Base,
    /// Zeros.
    Zero,
    /// The grain's whole new content, of which only the blocks in `mask` differ from the
    /// base's grain: stored as a delta (kind 4).
    Delta { mask: u16, data: &'a [u8] },
}

/// Seals grains into a framed envelope. `cvs` are the grains' chaining values (of the
/// content each grain stands for, base grains included); `base` is required when any grain
/// is [`Grain::Base`]. Returns the chunk id and the stored bytes.
pub fn seal(
    compressor: &mut zstd::bulk::Compressor<'static>,
    plain_len: usize,
    base: Option<ChunkId>,
    grains: &[Grain<'_>],
    cvs: &[ChainingValue],
) -> std::io::Result<(ChunkId, Vec<u8>)> {
    assert!(
        plain_len <= MAX_PLAIN_LEN,
        "chunk larger than the format allows"
    );
    let n = grain_count(plain_len, GRAIN);
    assert_eq!(grains.len(), n, "one grain spec per grain");
    assert_eq!(cvs.len(), n, "one chaining value per grain");
    let table_end = HEADER_LEN + ENTRY_LEN * n;
    let mut out = vec![0u8; table_end];
    let mut scratch = Vec::new();
    let mut blocks = Vec::new();
    let mut delta = false;
    for (g, grain) in grains.iter().enumerate() {
        let (kind, stored) = match *grain {
            Grain::Data(d) if crate::zero::is_zero(d) => (Kind::Zero, 0),
            Grain::Data(d) => {
                scratch.clear();
                scratch.reserve(zstd::zstd_safe::compress_bound(d.len()));
                let c = compressor.compress_to_buffer(d, &mut scratch)?;
                if c < d.len() {
                    out.extend_from_slice(&scratch[..c]);
                    (Kind::Zstd, c)
                } else {
                    out.extend_from_slice(d);
                    (Kind::Raw, d.len())
                }
            }
            Grain::Stored { kind, bytes } => {
                delta |= kind == Kind::Delta;
                out.extend_from_slice(bytes);
                (kind, bytes.len())
            }
            Grain::Delta { mask, data } => {
                assert!(base.is_some(), "a delta grain needs a base");
                delta = true;
                blocks.clear();
                for r in delta_blocks(mask, data.len(), GRAIN / DELTA_BLOCKS)
                    .expect("the mask fits the grain")
                {
                    blocks.extend_from_slice(&data[r]);
                }
                out.extend_from_slice(&mask.to_le_bytes());
                scratch.clear();
                scratch.reserve(zstd::zstd_safe::compress_bound(blocks.len()));
                let c = compressor.compress_to_buffer(&blocks, &mut scratch)?;
                if c < blocks.len() {
                    out.extend_from_slice(&[1, 0]);
                    out.extend_from_slice(&scratch[..c]);
                    (Kind::Delta, DELTA_HEADER + c)
                } else {
                    out.extend_from_slice(&[0, 0]);
                    out.extend_from_slice(&blocks);
                    (Kind::Delta, DELTA_HEADER + blocks.len())
                }
            }
            Grain::Base => {
                assert!(base.is_some(), "a base grain needs a base");
                (Kind::Base, 0)
            }
            Grain::Zero => (Kind::Zero, 0),
        };
        let e = &mut out[HEADER_LEN + ENTRY_LEN * g..HEADER_LEN + ENTRY_LEN * (g + 1)];
        e[0..4].copy_from_slice(&u32::try_from(stored).expect("grain fits").to_le_bytes());
        e[4] = kind as u8;
        e[8..40].copy_from_slice(&cvs[g]);
    }
    out[0..4].copy_from_slice(MAGIC);
    out[4] = if delta { VERSION_DELTA } else { VERSION };
    out[5] = GRAIN_SHIFT;
    out[8..12].copy_from_slice(&u32::try_from(plain_len).expect("fits").to_le_bytes());
    out[12..16].copy_from_slice(&u32::try_from(n).expect("fits").to_le_bytes());
    if let Some(b) = base {
        out[16..48].copy_from_slice(&b.0);
    }
    let crc = table_crc(&out[..table_end]);
    out[48..52].copy_from_slice(&crc.to_le_bytes());
    Ok((root_of(cvs, plain_len, GRAIN), out))
}

fn table_crc(head: &[u8]) -> u32 {
    let c = crc32c::crc32c(&head[..48]);
    crc32c::crc32c_append(c, &head[HEADER_LEN..])
}

/// Parses and checks the header and table (`bytes` may hold more: the frames).
pub fn parse_header(bytes: &[u8]) -> Result<Header, ChunkError> {
    if bytes.len() < HEADER_LEN {
        return Err(ChunkError::Truncated { len: bytes.len() });
    }
    if &bytes[0..4] != MAGIC {
        return Err(ChunkError::BadMagic);
    }
    if !is_framed(bytes) {
        return Err(ChunkError::UnsupportedVersion(bytes[4]));
    }
    let deltas = bytes[4] == VERSION_DELTA;
    if bytes[6] != 0 {
        return Err(ChunkError::Encrypted(bytes[6]));
    }
    let shift = bytes[5];
    if !(10..=24).contains(&shift) {
        return Err(ChunkError::Table(format!("grain shift {shift}")));
    }
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
    let plain_len = u32_at(8);
    if plain_len as usize > MAX_PLAIN_LEN {
        return Err(ChunkError::TooLarge(plain_len));
    }
    let plain_len = plain_len as usize;
    let grain = 1usize << shift;
    let n = u32_at(12) as usize;
    if n != grain_count(plain_len, grain) {
        return Err(ChunkError::Table(format!(
            "{n} grains for {plain_len} bytes"
        )));
    }
    let table_end = HEADER_LEN + ENTRY_LEN * n;
    if bytes.len() < table_end {
        return Err(ChunkError::Truncated { len: bytes.len() });
    }
    let crc = u32_at(48);
    let computed = table_crc(&bytes[..table_end]);
    if crc != computed {
        return Err(ChunkError::Checksum {
            stored: crc,
            computed,
        });
    }
    let base = ChunkId(bytes[16..48].try_into().expect("32 bytes"));
    let base = (!base.is_zero()).then_some(base);
    let mut entries = Vec::with_capacity(n);
    let mut offsets = Vec::with_capacity(n);
    let mut at = table_end;
    for g in 0..n {
        let e = &bytes[HEADER_LEN + ENTRY_LEN * g..HEADER_LEN + ENTRY_LEN * (g + 1)];
        let stored_len = u32::from_le_bytes(e[0..4].try_into().expect("4 bytes"));
        let kind = match e[4] {
            0 => Kind::Raw,
            1 => Kind::Zstd,
            2 => Kind::Zero,
            3 if base.is_some() => Kind::Base,
            4 if base.is_some() && deltas => Kind::Delta,
            k => return Err(ChunkError::Table(format!("grain {g} has kind {k}"))),
        };
        let want = (g * grain..((g + 1) * grain).min(plain_len)).len();
        let ok = match kind {
            Kind::Raw => stored_len as usize == want,
            Kind::Zstd => (stored_len as usize) < want + 1024,
            Kind::Zero | Kind::Base => stored_len == 0,
            Kind::Delta => {
                (DELTA_HEADER..want + DELTA_HEADER + 1024).contains(&(stored_len as usize))
            }
        };
        if !ok {
            return Err(ChunkError::Table(format!(
                "grain {g}: {stored_len} stored bytes for kind {kind:?}"
            )));
        }
        offsets.push(at);
        at += stored_len as usize;
        entries.push(Entry {
            stored_len,
            kind,
            cv: e[8..40].try_into().expect("32 bytes"),
        });
    }
    Ok(Header {
        plain_len,
        grain_shift: shift,
        base,
        entries,
        offsets,
    })
}

/// Decodes grain `g` (raw, zstd or zero) from its stored frame into `out` (exactly the
/// grain's length).
pub fn decode_grain(h: &Header, g: usize, frame: &[u8], out: &mut [u8]) -> Result<(), ChunkError> {
    let e = &h.entries[g];
    match e.kind {
        Kind::Raw => out.copy_from_slice(frame),
        Kind::Zero => out.fill(0),
        Kind::Zstd => {
            let n = zstd::bulk::decompress_to_buffer(frame, out)
                .map_err(|err| ChunkError::Decompress(format!("grain {g}: {err}")))?;
            if n != out.len() {
                return Err(ChunkError::Length {
                    expected: out.len(),
                    got: n,
                });
            }
        }
        Kind::Base | Kind::Delta => {
            return Err(ChunkError::Table(format!("grain {g} needs its base")));
        }
    }
    Ok(())
}

/// Applies delta grain `g`'s frame to `out`, which holds the base's grain (exactly the
/// grain's length): the stored blocks are written over it.
pub fn apply_delta(h: &Header, g: usize, frame: &[u8], out: &mut [u8]) -> Result<(), ChunkError> {
    let bad = |what: &str| ChunkError::Table(format!("grain {g}: delta {what}"));
    if frame.len() < DELTA_HEADER || frame[3] != 0 {
        return Err(bad("frame too short or reserved byte set"));
    }
    let mask = u16::from_le_bytes([frame[0], frame[1]]);
    let ranges: Vec<_> = delta_blocks(mask, out.len(), h.block())
        .ok_or_else(|| bad("mask names blocks past the grain"))?
        .collect();
    let total: usize = ranges.iter().map(ExactSizeIterator::len).sum();
    let payload = &frame[DELTA_HEADER..];
    let decoded;
    let plain = match frame[2] {
        0 => payload,
        1 => {
            decoded = zstd::bulk::decompress(payload, total)
                .map_err(|err| ChunkError::Decompress(format!("grain {g}: {err}")))?;
            &decoded[..]
        }
        c => return Err(bad(&format!("codec {c}"))),
    };
    if plain.len() != total {
        return Err(ChunkError::Length {
            expected: total,
            got: plain.len(),
        });
    }
    let mut at = 0;
    for r in ranges {
        let n = r.len();
        out[r].copy_from_slice(&plain[at..at + n]);
        at += n;
    }
    Ok(())
}

/// Checks grain `g`'s decoded content against its chaining value.
pub fn check_grain(h: &Header, g: usize, plain: &[u8]) -> Result<(), ChunkError> {
    let cv = grain_cv(plain, g, h.entries.len(), h.grain());
    if cv != h.entries[g].cv {
        let r = h.grain_range(g);
        return Err(ChunkError::GrainDamaged {
            grain: g,
            start: r.start,
            end: r.end,
        });
    }
    Ok(())
}

/// Opens a whole framed chunk into `out`: `base` is the base's verified content, needed
/// when the chunk is a patch. The content is checked against `expected` as a whole.
pub fn open_into(
    stored: &[u8],
    base: Option<&[u8]>,
    expected: &ChunkId,
    out: &mut Vec<u8>,
) -> Result<(), ChunkError> {
    let h = parse_header(stored)?;
    if h.base.is_some() && base.is_none_or(|b| b.len() != h.plain_len) {
        return Err(ChunkError::Table("a patch opened without its base".into()));
    }
    out.clear();
    out.resize(h.plain_len, 0);
    for g in 0..h.entries.len() {
        let r = h.grain_range(g);
        let kind = h.entries[g].kind;
        if kind.needs_base() {
            out[r.clone()].copy_from_slice(&base.expect("checked")[r.clone()]);
        }
        if kind == Kind::Base {
            continue;
        }
        let f = h.frame_range(g);
        let frame = stored
            .get(f)
            .ok_or(ChunkError::Truncated { len: stored.len() })?;
        if kind == Kind::Delta {
            apply_delta(&h, g, frame, &mut out[r])?;
        } else {
            decode_grain(&h, g, frame, &mut out[r])?;
        }
    }
    let end = h.offsets.last().copied().unwrap_or(0)
        + h.entries.last().map_or(0, |e| e.stored_len as usize);
    if stored.len() != end.max(h.table_len()) {
        return Err(ChunkError::Table(format!(
            "{} stored bytes, the table accounts for {end}",
            stored.len()
        )));
    }
    let got = ChunkId::of(out);
    if got != *expected {
        // Name the damaged grain where the table can tell.
        if h.root() == *expected {
            for g in 0..h.entries.len() {
                check_grain(&h, g, &out[h.grain_range(g)])?;
            }
        }
        return Err(ChunkError::HashMismatch {
            expected: *expected,
            got,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn comp() -> zstd::bulk::Compressor<'static> {
        zstd::bulk::Compressor::new(1).unwrap()
    }

    fn sealed(plain: &[u8]) -> (ChunkId, Vec<u8>) {
        let (cvs, id) = cvs_of(plain);
        let grains: Vec<Grain> = plain
            .chunks(GRAIN)
            .map(Grain::Data)
            .chain(plain.is_empty().then_some(Grain::Zero))
            .collect();
        let (id2, out) = seal(&mut comp(), plain.len(), None, &grains, &cvs).unwrap();
        assert_eq!(id, id2);
        (id, out)
    }

    #[test]
    fn root_is_the_blake3_hash() {
        for len in [
            512,
            1024,
            65536,
            65537,
            131072,
            200_000,
            4 << 20,
            (4 << 20) - 512,
        ] {
            let data = crate::testdata::noise(len as u64, len);
            assert_eq!(cvs_of(&data).1, ChunkId::of(&data), "length {len}");
        }
    }

    #[test]
    fn grains_are_verifiable_alone_and_damage_is_found() {
        let mut data = crate::testdata::noise(3, 300_000);
        data[65_536..140_000].fill(0);
        let (id, stored) = sealed(&data);
        let h = parse_header(&stored).unwrap();
        assert_eq!(h.root(), id);
        assert_eq!(h.entries[1].kind, Kind::Zero);
        for g in 0..h.entries.len() {
            let r = h.grain_range(g);
            let mut out = vec![0u8; r.len()];
            decode_grain(&h, g, &stored[h.frame_range(g)], &mut out).unwrap();
            check_grain(&h, g, &out).unwrap();
            assert_eq!(out, data[r]);
        }
        let mut out = Vec::new();
        open_into(&stored, None, &id, &mut out).unwrap();
        assert_eq!(out, data);
        let mut bad = stored.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(open_into(&bad, None, &id, &mut out).is_err());
        let mut bad = stored.clone();
        bad[HEADER_LEN + 10] ^= 1;
        assert!(matches!(
            parse_header(&bad),
            Err(ChunkError::Checksum { .. })
        ));
    }

    #[test]
    fn a_patch_reads_through_its_base() {
        let base = crate::testdata::noise(5, 4 << 20);
        let (base_id, _) = sealed(&base);
        let (base_cvs, _) = cvs_of(&base);
        let mut new = base.clone();
        new[GRAIN * 7..GRAIN * 7 + 100].fill(9);
        new[GRAIN * 40..GRAIN * 41].fill(0);
        let (cvs, id) = cvs_of(&new);
        let grains: Vec<Grain> = (0..64)
            .map(|g| {
                if cvs[g] == base_cvs[g] {
                    Grain::Base
                } else {
                    Grain::Data(&new[g * GRAIN..(g + 1) * GRAIN])
                }
            })
            .collect();
        let (pid, patch) = seal(&mut comp(), new.len(), Some(base_id), &grains, &cvs).unwrap();
        assert_eq!(pid, id);
        assert!(patch.len() < HEADER_LEN + ENTRY_LEN * 64 + GRAIN + 200);
        let mut out = Vec::new();
        open_into(&patch, Some(&base), &id, &mut out).unwrap();
        assert_eq!(out, new);
        assert!(open_into(&patch, None, &id, &mut out).is_err());
        let h = parse_header(&patch).unwrap();
        assert_eq!(h.base, Some(base_id));
        assert_eq!(h.entries[40].kind, Kind::Zero);
    }

    /// A patch over `base` whose grain `g` has the blocks of `masks[g]` (clipped to the
    /// grain) replaced by noise: delta grains where a mask is set, base grains elsewhere.
    fn delta_patch(base: &[u8], masks: &[u16], seed: u64) -> (ChunkId, Vec<u8>, Vec<u8>) {
        let (base_id, _) = sealed(base);
        let block = GRAIN / DELTA_BLOCKS;
        let mut new = base.to_vec();
        let n = grain_count(base.len(), GRAIN);
        let mut clipped = vec![0u16; n];
        for g in 0..n {
            let r = g * GRAIN..((g + 1) * GRAIN).min(base.len());
            let blocks = r.len().div_ceil(block);
            let m = masks[g % masks.len()]
                & u16::MAX
                    .checked_shr(16 - u32::try_from(blocks.min(16)).unwrap())
                    .unwrap_or(u16::MAX);
            clipped[g] = m;
            for br in delta_blocks(m, r.len(), block).unwrap() {
                let noise = crate::testdata::noise(seed + (r.start + br.start) as u64, br.len());
                new[r.start + br.start..r.start + br.end].copy_from_slice(&noise);
            }
        }
        let (cvs, id) = cvs_of(&new);
        let grains: Vec<Grain> = (0..n)
            .map(|g| match clipped[g] {
                0 => Grain::Base,
                mask => Grain::Delta {
                    mask,
                    data: &new[g * GRAIN..((g + 1) * GRAIN).min(new.len())],
                },
            })
            .collect();
        let (pid, patch) = seal(&mut comp(), new.len(), Some(base_id), &grains, &cvs).unwrap();
        assert_eq!(pid, id);
        (id, patch, new)
    }

    #[test]
    fn delta_grains_store_only_their_blocks() {
        // A short last grain whose last block is short.
        let base = crate::testdata::noise(5, (4 << 20) - 5000);
        let mut masks = vec![0u16; 64];
        masks[3] = 1 | 1 << 15;
        masks[63] = 1 << 14;
        let (id, patch, new) = delta_patch(&base, &masks, 9);
        assert_eq!(patch[4], VERSION_DELTA);
        let h = parse_header(&patch).unwrap();
        assert_eq!(h.entries[3].kind, Kind::Delta);
        assert_eq!(h.entries[63].kind, Kind::Delta);
        assert_eq!(h.entries[4].kind, Kind::Base);
        // Noise does not compress: raw blocks, the last grain's last one short.
        assert_eq!(h.entries[3].stored_len as usize, DELTA_HEADER + 2 * 4096);
        assert_eq!(h.entries[63].stored_len as usize, DELTA_HEADER + 3192);
        let mut out = Vec::new();
        open_into(&patch, Some(&base), &id, &mut out).unwrap();
        assert!(out == new);
        // Verified as a whole grain: a damaged payload is named.
        let mut bad = patch.clone();
        let at = h.frame_range(3).start + DELTA_HEADER + 100;
        bad[at] ^= 1;
        assert!(matches!(
            open_into(&bad, Some(&base), &id, &mut out),
            Err(ChunkError::GrainDamaged { grain: 3, .. })
        ));
        // A mask naming blocks past a short grain's end is refused.
        let mut out = base[63 * GRAIN..].to_vec();
        let frame = [0xff, 0xff, 0, 0];
        assert!(apply_delta(&h, 63, &frame, &mut out).is_err());
        assert!(decode_grain(&h, 3, &patch[h.frame_range(3)], &mut vec![0; GRAIN]).is_err());
        assert_eq!(delta_mask(0, 1, 4096), 1);
        assert_eq!(delta_mask(4095, 4097, 4096), 0b11);
        assert_eq!(delta_mask(0, GRAIN, 4096), u16::MAX);
        assert_eq!(delta_mask(7, 7, 4096), 0);
    }

    proptest! {
        #[test]
        fn round_trip(len in 1usize..300_000, seed in 0u64..1000) {
            let data = crate::testdata::noise(seed, len);
            let (id, stored) = sealed(&data);
            prop_assert_eq!(id, ChunkId::of(&data));
            let mut out = Vec::new();
            open_into(&stored, None, &id, &mut out).unwrap();
            prop_assert_eq!(out, data);
        }

        #[test]
        fn delta_round_trip(
            len in 1usize..300_000,
            seed in 0u64..1000,
            masks in proptest::collection::vec(any::<u16>(), 1..6),
        ) {
            let base = crate::testdata::noise(seed, len);
            let (id, patch, new) = delta_patch(&base, &masks, seed + 1);
            let mut out = Vec::new();
            open_into(&patch, Some(&base), &id, &mut out).unwrap();
            prop_assert!(out == new);
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = parse_header(&bytes);
            let _ = open_into(&bytes, None, &ChunkId::ZERO, &mut Vec::new());
        }
    }
}
