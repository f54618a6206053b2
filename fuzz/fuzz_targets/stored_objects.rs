//! Every decoder of stored bytes, fed arbitrary input: none may panic, and a chunk (or a
//! patch over its base) that opens must hash to the id it was opened under.
#![no_main]

use cairn_format::chunk::open_chunk;
use cairn_format::config::SpaceConfig;
use cairn_format::id::ChunkId;
use cairn_format::index::DiskIndex;
use cairn_format::record::PointRecord;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    match selector % 5 {
        0 => {
            let id = ChunkId::of(b"fuzz");
            if let Ok(plain) = open_chunk(rest, &id) {
                assert_eq!(ChunkId::of(&plain), id);
            }
        }
        1 => {
            if let Ok(index) = DiskIndex::decode(rest) {
                assert_eq!(DiskIndex::decode(&index.encode()).unwrap(), index);
            }
        }
        2 => {
            let _ = PointRecord::decode(rest);
        }
        3 => {
            // A framed patch (base and delta grains) over a base of the length it claims.
            if let Ok(h) = cairn_format::framed::parse_header(rest) {
                let base = vec![7u8; h.plain_len];
                let id = ChunkId::of(b"fuzz");
                let mut out = Vec::new();
                if cairn_format::framed::open_into(rest, Some(&base), &id, &mut out).is_ok() {
                    assert_eq!(ChunkId::of(&out), id);
                }
            }
        }
        _ => {
            let _ = SpaceConfig::decode(rest);
        }
    }
});
