pub use cairn_format::testdata::noise;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cairn_format::config::SpaceConfig;
use cairn_format::record::PointRecord;
use cairn_store::Space;
use cairn_store::backend::{Backend, ObjectStoreBackend};
use cairn_store::create::{CreateOptions, DiskSource, ParentChoice, create_point};
use cairn_store::progress::NoProgress;
use cairn_store::restore::{RestoreOptions, restore_disk};

pub const CHUNK: u64 = 64 * 1024;

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

pub async fn fs_space(dir: &Path) -> Space {
    let root = dir.join("space");
    std::fs::create_dir_all(&root).unwrap();
    let backend: Arc<dyn Backend> = Arc::new(ObjectStoreBackend::local(&root).unwrap());
    Space::init(backend, SpaceConfig::new(CHUNK, 3).unwrap())
        .await
        .unwrap()
}

pub async fn mem_space() -> Space {
    Space::init(
        Arc::new(ObjectStoreBackend::memory()),
        SpaceConfig::new(CHUNK, 3).unwrap(),
    )
    .await
    .unwrap()
}

pub async fn point_of(space: &Space, disks: &[(&str, &Path)], parent: ParentChoice) -> PointRecord {
    let mut opts = CreateOptions::new(
        disks
            .iter()
            .map(|(n, p)| DiskSource {
                name: n.to_string(),
                path: p.to_path_buf(),
            })
            .collect(),
    );
    opts.parent = parent;
    create_point(space, &opts, &NoProgress).await.unwrap()
}

pub async fn restored(space: &Space, point: &PointRecord, disk: &str, dir: &Path) -> Vec<u8> {
    let out: PathBuf = dir.join(format!("restore-{}-{disk}", point.id));
    let _ = std::fs::remove_file(&out);
    restore_disk(
        space,
        point,
        Some(disk),
        &out,
        &RestoreOptions::default(),
        &NoProgress,
    )
    .await
    .unwrap();
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    data
}

/// The key of one stored chunk file of the space (under `dir/space`).
pub fn chunk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for shard in std::fs::read_dir(dir.join("space/chunks")).unwrap() {
        for f in std::fs::read_dir(shard.unwrap().path()).unwrap() {
            out.push(f.unwrap().path());
        }
    }
    out.sort();
    out
}
