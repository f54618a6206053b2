//! A read-only NBD export of one disk of a recovery point, read straight from the
//! recovery space: each read fetches (and verifies) the chunks it covers; the last few
//! chunks are cached, so sequential reads fetch each chunk once. Zero chunks are holes.

use std::sync::{Arc, Mutex};

use cairn_format::id::{ChunkRef, PointId};
use cairn_format::index::DiskIndex;
use cairn_nbd::export::{BlockExport, Extent};
use cairn_nbd::handshake::ExportInfo;
use cairn_nbd::proto::{STATE_HOLE, STATE_ZERO};
use cairn_store::Space;
use cairn_store::fetch::fetch_chunk;

const CACHED_CHUNKS: usize = 8;

pub struct PointExport {
    space: Arc<Space>,
    point: PointId,
    index: DiskIndex,
    info: ExportInfo,
    cache: Mutex<Vec<(ChunkRef, Arc<Vec<u8>>)>>,
}

impl PointExport {
    /// Opens disk `disk` of point `point` as export `name`.
    pub async fn open(
        space: Arc<Space>,
        point: PointId,
        disk: &str,
        name: &str,
    ) -> Result<PointExport, cairn_store::SpaceError> {
        let record = space.load_point(&point).await?;
        let d = Space::choose_disk(&record, Some(disk))?;
        let index = space.load_index(&record, d).await?;
        let info = ExportInfo {
            name: name.to_string(),
            description: format!("recovery point {point}, disk {disk} (read-only)"),
            size: index.disk_size,
            read_only: true,
            multi_conn: true,
        };
        Ok(PointExport {
            space,
            point,
            index,
            info,
            cache: Mutex::new(Vec::new()),
        })
    }

    async fn chunk(&self, id: ChunkRef) -> std::io::Result<Arc<Vec<u8>>> {
        if let Some((_, d)) = self
            .cache
            .lock()
            .expect("poisoned")
            .iter()
            .find(|(c, _)| *c == id)
        {
            return Ok(d.clone());
        }
        let data = Arc::new(fetch_chunk(self.space.backend(), id).await.map_err(|e| {
            std::io::Error::other(format!(
                "recovery point {}: chunk {}: {e}",
                self.point, id.id
            ))
        })?);
        let mut cache = self.cache.lock().expect("poisoned");
        if cache.len() >= CACHED_CHUNKS {
            cache.remove(0);
        }
        cache.push((id, data.clone()));
        Ok(data)
    }
}

fn denied() -> std::io::Error {
    std::io::Error::from_raw_os_error(rustix::io::Errno::PERM.raw_os_error())
}

#[async_trait::async_trait]
impl BlockExport for PointExport {
    fn info(&self) -> ExportInfo {
        self.info.clone()
    }

    async fn read(&self, offset: u64, len: u32) -> std::io::Result<Vec<u8>> {
        let mut out = vec![0u8; len as usize];
        let cs = u64::from(self.index.chunk_size);
        let end = offset + u64::from(len);
        let mut pos = offset;
        while pos < end {
            let c = pos / cs;
            let (start, stop) = self.index.chunk_range(c);
            let to = stop.min(end);
            let id = self.index.chunk_ref(c);
            if !id.id.is_zero() {
                let data = self.chunk(id).await?;
                let from = usize::try_from(pos - start).expect("fits");
                let n = usize::try_from(to - pos).expect("fits");
                let at = usize::try_from(pos - offset).expect("fits");
                out[at..at + n].copy_from_slice(&data[from..from + n]);
            }
            pos = to;
        }
        Ok(out)
    }

    async fn write(&self, _: u64, _: Vec<u8>, _: bool) -> std::io::Result<()> {
        Err(denied())
    }

    async fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }

    async fn trim(&self, _: u64, _: u32, _: bool) -> std::io::Result<()> {
        Err(denied())
    }

    async fn write_zeroes(&self, _: u64, _: u32, _: bool, _: bool) -> std::io::Result<()> {
        Err(denied())
    }

    async fn block_status(&self, offset: u64, len: u32) -> std::io::Result<Vec<Extent>> {
        let cs = u64::from(self.index.chunk_size);
        let end = offset + u64::from(len);
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < 1024 {
            let c = pos / cs;
            let to = self.index.chunk_range(c).1.min(end);
            let flags = if self.index.chunks[usize::try_from(c).expect("fits")].is_zero() {
                STATE_HOLE | STATE_ZERO
            } else {
                0
            };
            let n = u32::try_from(to - pos).expect("within len");
            match out.last_mut() {
                Some(l) if l.1 == flags => l.0 += n,
                _ => out.push((n, flags)),
            }
            pos = to;
        }
        Ok(out)
    }
}
