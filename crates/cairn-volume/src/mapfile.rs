//! Bitmap files of a pool disk (`<disk>.cbt`, `<disk>.present`): a JSON header and the
//! bitmap's words, with a CRC-32C over all of it, replaced atomically (temp file, fsync,
//! rename, fsync of the folder). Layout (docs/FORMAT.md, "pool map file", version 1):
//!
//! ```text
//! "CRNM" | version u32 LE | header length u32 LE | header (JSON) | bit count u64 LE
//!        | words u64 LE ... | CRC-32C u32 LE of everything before
//! ```

use std::io::Write;
use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::bitmap::Bitmap;

const MAGIC: &[u8; 4] = b"CRNM";
pub const MAP_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("{path}: {detail}")]
    Corrupt { path: String, detail: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

fn corrupt(path: &Path, detail: impl Into<String>) -> MapError {
    MapError::Corrupt {
        path: path.display().to_string(),
        detail: detail.into(),
    }
}

fn io(path: &Path, source: std::io::Error) -> MapError {
    MapError::Io {
        path: path.display().to_string(),
        source,
    }
}

pub fn encode<H: Serialize>(header: &H, map: &Bitmap) -> Vec<u8> {
    let head = serde_json::to_vec(header).expect("header serializes");
    let words = map.words();
    let mut out = Vec::with_capacity(24 + head.len() + words.len() * 8);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&MAP_VERSION.to_le_bytes());
    out.extend_from_slice(
        &u32::try_from(head.len())
            .expect("small header")
            .to_le_bytes(),
    );
    out.extend_from_slice(&head);
    out.extend_from_slice(&map.len().to_le_bytes());
    for w in words {
        out.extend_from_slice(&w.to_le_bytes());
    }
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

pub fn decode<H: DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<(H, Bitmap), MapError> {
    if bytes.len() < 24 || &bytes[..4] != MAGIC {
        return Err(corrupt(path, "not a Cairn map file"));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32c::crc32c(body).to_le_bytes() != crc {
        return Err(corrupt(path, "checksum mismatch (damaged)"));
    }
    let u32_at = |at: usize| u32::from_le_bytes(body[at..at + 4].try_into().expect("4 bytes"));
    let version = u32_at(4);
    if version != MAP_VERSION {
        return Err(corrupt(path, format!("version {version} is not supported")));
    }
    let hlen = u32_at(8) as usize;
    let rest = body
        .get(12..)
        .filter(|r| r.len() >= hlen + 8)
        .ok_or_else(|| corrupt(path, "truncated"))?;
    let header: H = serde_json::from_slice(&rest[..hlen])
        .map_err(|e| corrupt(path, format!("bad header: {e}")))?;
    let rest = &rest[hlen..];
    let bits = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes"));
    let words: Vec<u64> = rest[8..]
        .chunks(8)
        .map(|c| c.try_into().map(u64::from_le_bytes))
        .collect::<Result<_, _>>()
        .map_err(|_| corrupt(path, "truncated bitmap"))?;
    let map = Bitmap::from_words(bits, &words).ok_or_else(|| corrupt(path, "bitmap length"))?;
    Ok((header, map))
}

/// Reads a map file; `Ok(None)` if it does not exist.
pub fn read<H: DeserializeOwned>(path: &Path) -> Result<Option<(H, Bitmap)>, MapError> {
    match std::fs::read(path) {
        Ok(b) => decode(path, &b).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path, e)),
    }
}

/// Replaces a map file atomically and durably.
pub fn write<H: Serialize>(path: &Path, header: &H, map: &Bitmap) -> Result<(), MapError> {
    write_atomic(path, &encode(header, map)).map_err(|e| io(path, e))
}

/// Writes `bytes` to `path` through a temp file, fsync and rename, then syncs the folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp-{}", uuid::Uuid::new_v4().simple()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Map files are read back after crashes and by hand-edited pools: no input may
        /// panic the decoder, and a damaged valid file is refused, never misread.
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200),
                               flip in any::<usize>(), bits in 0u64..500) {
            let _ = decode::<serde_json::Value>(Path::new("x"), &bytes);
            let m = Bitmap::new(bits);
            if bits > 0 { m.set(bits / 2); }
            let mut good = encode(&serde_json::json!({"k": 1}), &m);
            let at = flip % good.len();
            good[at] ^= 0x40;
            prop_assert!(decode::<serde_json::Value>(Path::new("x"), &good).is_err());
        }
    }

    #[test]
    fn round_trip_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.cbt");
        let m = Bitmap::new(130);
        m.set(0);
        m.set(129);
        write(&p, &serde_json::json!({"state": "clean"}), &m).unwrap();
        let (h, back): (serde_json::Value, Bitmap) = read(&p).unwrap().unwrap();
        assert_eq!(h["state"], "clean");
        assert_eq!(back.ones().collect::<Vec<_>>(), vec![0, 129]);
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[30] ^= 1;
        std::fs::write(&p, &bytes).unwrap();
        assert!(
            read::<serde_json::Value>(&p)
                .unwrap_err()
                .to_string()
                .contains("checksum")
        );
        assert!(
            read::<serde_json::Value>(&dir.path().join("none"))
                .unwrap()
                .is_none()
        );
    }
}
