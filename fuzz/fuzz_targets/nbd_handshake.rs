//! The NBD protocol core fed arbitrary client bytes: the handshake machine and the
//! request parser must never panic, and never consume more than they were given.
#![no_main]

use cairn_nbd::handshake::{ExportCatalog, ExportInfo, Handshake, HandshakeStep};
use cairn_nbd::wire::{REQUEST_HEADER_LEN, Request};
use libfuzzer_sys::fuzz_target;

struct One;
impl ExportCatalog for One {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        (name == "s/d").then(|| ExportInfo {
            name: name.into(),
            description: String::new(),
            size: 1 << 20,
            read_only: false,
            multi_conn: true,
        })
    }
    fn list(&self) -> Vec<ExportInfo> {
        self.lookup("s/d").into_iter().collect()
    }
}

fuzz_target!(|data: &[u8]| {
    let mut hs = Handshake::new();
    let mut pos = 0;
    while let Ok((used, step)) = hs.step(&data[pos..], &One) {
        assert!(used <= data.len() - pos);
        pos += used;
        let _ = hs.take_output();
        match step {
            HandshakeStep::Continue => {}
            HandshakeStep::Done(n) => {
                for chunk in data[pos..].chunks_exact(REQUEST_HEADER_LEN) {
                    if let Ok(r) = Request::parse(chunk.try_into().unwrap()) {
                        let _ = r.check(n.export.size, n.export.read_only);
                    }
                }
                break;
            }
            _ => break,
        }
    }
});
