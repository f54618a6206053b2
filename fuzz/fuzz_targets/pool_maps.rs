//! The pool's map files (changed-block maps, hydration maps), fed arbitrary input: the
//! decoder may refuse, never panic; what it accepts re-encodes to the same bitmap.
#![no_main]

use cairn_volume::mapfile::{decode, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz.cbt");
    if let Ok((header, map)) = decode::<serde_json::Value>(path, data) {
        let again = encode(&header, &map);
        let (_, back) = decode::<serde_json::Value>(path, &again).expect("re-encoded map decodes");
        assert_eq!(back.words(), map.words());
    }
});
