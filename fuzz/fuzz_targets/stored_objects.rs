//! Every decoder of stored bytes, fed arbitrary input: none may panic, and a chunk that
//! opens must hash to the id it was opened under.
#![no_main]

use cairn_format::chunk::open_chunk;
use cairn_format::config::SpaceConfig;
use cairn_format::id::ChunkId;
use cairn_format::index::DiskIndex;
use cairn_format::record::PointRecord;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    match selector % 4 {
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
        _ => {
            let _ = SpaceConfig::decode(rest);
        }
    }
});
