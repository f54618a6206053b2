//! Serves one raw file over NBD, for benchmarks against qemu-nbd and nbdkit:
//! `cargo run --release -p cairn-nbd --example serve_file -- FILE 127.0.0.1:10809 NAME`

use std::sync::Arc;

use cairn_nbd::export::{BlockExport, FileExport};
use cairn_nbd::handshake::ExportInfo;
use cairn_nbd::server::{Exports, serve_tcp};

struct One(Arc<FileExport>);

impl Exports for One {
    fn list(&self) -> Vec<ExportInfo> {
        vec![self.0.info()]
    }
    fn open(&self, name: &str) -> Option<Arc<dyn BlockExport>> {
        (name == self.0.info().name).then(|| self.0.clone() as Arc<dyn BlockExport>)
    }
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, file, addr, name] = args.as_slice() else {
        eprintln!("usage: serve_file FILE ADDR NAME");
        std::process::exit(2);
    };
    let export = Arc::new(FileExport::open(std::path::Path::new(file), name, false)?);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let listener = tokio::net::TcpListener::bind(addr).await?;
            serve_tcp(listener, Arc::new(One(export))).await
        })
}
