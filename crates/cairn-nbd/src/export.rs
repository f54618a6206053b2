//! What an NBD export is backed by: the [`BlockExport`] trait, and [`FileExport`], a raw
//! file or block device on the local machine.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use crate::handshake::ExportInfo;
use crate::proto::{STATE_HOLE, STATE_ZERO};

/// One extent of `base:allocation`: `len` bytes with `flags` (`STATE_HOLE`, `STATE_ZERO`).
pub type Extent = (u32, u32);

/// The storage behind one export. Offsets and lengths are already checked against the
/// export's size by the server loop.
#[async_trait::async_trait]
pub trait BlockExport: Send + Sync {
    fn info(&self) -> ExportInfo;
    async fn read(&self, offset: u64, len: u32) -> std::io::Result<Vec<u8>>;
    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> std::io::Result<()>;
    async fn flush(&self) -> std::io::Result<()>;
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> std::io::Result<()>;
    /// Zeroes a range; `may_punch` when the client allows a hole (no `NO_HOLE` flag).
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        may_punch: bool,
        fua: bool,
    ) -> std::io::Result<()>;
    /// Extents covering `[offset, offset + len)` from its start (the last may be short of
    /// the end; at least one).
    async fn block_status(&self, offset: u64, len: u32) -> std::io::Result<Vec<Extent>>;
    /// A signal that the export is going away. When it returns `Some(rx)` and the value
    /// becomes `true`, every connection serving the export stops taking new requests,
    /// lets the requests in flight finish and send their replies, then closes cleanly.
    /// `None` (the default): the export lasts as long as its connections.
    fn closed(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        None
    }
    /// The file behind an export whose [`Self::write`] without FUA is exactly a
    /// positioned write of the data into this file at the same offset, and nothing else.
    /// When `Some`, the server may put a large write's payload into the file itself,
    /// moved from the socket with `splice(2)` instead of read into a buffer first (one
    /// copy of the data instead of two). `None` (the default): every write goes through
    /// [`Self::write`].
    fn direct_file(&self) -> Option<&File> {
        None
    }
}

/// Requests up to this size do their file I/O inline on the runtime thread.
const INLINE_IO: u32 = 256 * 1024;

/// A raw file (or block device) exported as is.
pub struct FileExport {
    file: Arc<File>,
    info: ExportInfo,
}

impl FileExport {
    pub fn open(
        path: &std::path::Path,
        name: &str,
        read_only: bool,
    ) -> std::io::Result<FileExport> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)?;
        let size = rustix::fs::seek(&file, rustix::fs::SeekFrom::End(0))?;
        Ok(FileExport {
            file: Arc::new(file),
            info: ExportInfo {
                name: name.to_string(),
                description: path.display().to_string(),
                size,
                read_only,
                // One file, one page cache: writes on any connection are visible to all,
                // and fdatasync covers them all.
                multi_conn: true,
            },
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&File) -> std::io::Result<T> + Send + 'static,
    ) -> std::io::Result<T> {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || f(&file))
            .await
            .map_err(std::io::Error::other)?
    }
}

/// Reads `len` bytes at `offset` into a new buffer: a pooled one (see
/// [`crate::server::pool`]) when large, else a fresh one read into without zeroing it.
/// Shared with the other file-backed exports (cairn-volume), like the helpers below.
pub fn read_at(file: &File, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    use crate::server::pool;
    if pool::pooled(len) {
        let mut buf = pool::take(len);
        file.read_exact_at(&mut buf, offset)?;
        return Ok(buf);
    }
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        let at = offset + buf.len() as u64;
        match rustix::io::pread(file, rustix::buffer::spare_capacity(&mut buf), at) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    buf.truncate(len);
    Ok(buf)
}

/// Punches a hole (keeps the size).
pub fn punch(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let flags = rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
    rustix::fs::fallocate(file, flags, offset, len)?;
    Ok(())
}

/// Makes a range read as zeros, allocated: `FALLOC_FL_ZERO_RANGE`, else zeros written.
pub fn zero_range(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let flags = rustix::fs::FallocateFlags::ZERO_RANGE | rustix::fs::FallocateFlags::KEEP_SIZE;
    if rustix::fs::fallocate(file, flags, offset, len).is_ok() {
        return Ok(());
    }
    let zeros = vec![0u8; usize::try_from(len.min(1 << 20)).unwrap_or(1 << 20)];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64);
        file.write_all_at(&zeros[..usize::try_from(n).unwrap_or(0)], offset + done)?;
        done += n;
    }
    Ok(())
}

/// `base:allocation` extents of a file from `SEEK_DATA`/`SEEK_HOLE`.
pub fn extents(file: &File, offset: u64, len: u32) -> std::io::Result<Vec<Extent>> {
    use rustix::fs::{SeekFrom, seek};
    let end = offset + u64::from(len);
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < end && out.len() < 1024 {
        let data = match seek(file, SeekFrom::Data(pos)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => end,
            // No hole support here: all data.
            Err(_) => return Ok(vec![(len, 0)]),
        };
        let (stop, flags) = if data > pos {
            (data.min(end), STATE_HOLE | STATE_ZERO)
        } else {
            let hole = seek(file, SeekFrom::Hole(pos)).unwrap_or(end);
            (hole.min(end), 0)
        };
        // Each extent is at most `len` long, which fits u32.
        out.push((u32::try_from(stop - pos).unwrap_or(u32::MAX), flags));
        pos = stop;
    }
    Ok(out)
}

#[async_trait::async_trait]
impl BlockExport for FileExport {
    fn info(&self) -> ExportInfo {
        self.info.clone()
    }

    async fn read(&self, offset: u64, len: u32) -> std::io::Result<Vec<u8>> {
        let read = move |f: &File| read_at(f, offset, len as usize);
        if len <= INLINE_IO {
            // A small read is a copy from the page cache (or one device read): cheaper
            // than the hand-off to the blocking pool and back.
            read(&self.file)
        } else {
            self.blocking(read).await
        }
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> std::io::Result<()> {
        let inline = data.len() <= INLINE_IO as usize && !fua;
        let write = move |f: &File| {
            f.write_all_at(&data, offset)?;
            crate::server::pool::give(data);
            if fua {
                rustix::fs::fdatasync(f)?;
            }
            Ok(())
        };
        if inline {
            write(&self.file)
        } else {
            self.blocking(write).await
        }
    }

    async fn flush(&self) -> std::io::Result<()> {
        self.blocking(|f| Ok(rustix::fs::fdatasync(f)?)).await
    }

    fn direct_file(&self) -> Option<&File> {
        (!self.info.read_only).then_some(&*self.file)
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> std::io::Result<()> {
        self.blocking(move |f| {
            // Trim is advisory: a filesystem that cannot punch simply keeps the data.
            let _ = punch(f, offset, u64::from(len));
            if fua {
                rustix::fs::fdatasync(f)?;
            }
            Ok(())
        })
        .await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        may_punch: bool,
        fua: bool,
    ) -> std::io::Result<()> {
        self.blocking(move |f| {
            if !(may_punch && punch(f, offset, u64::from(len)).is_ok()) {
                zero_range(f, offset, u64::from(len))?;
            }
            if fua {
                rustix::fs::fdatasync(f)?;
            }
            Ok(())
        })
        .await
    }

    async fn block_status(&self, offset: u64, len: u32) -> std::io::Result<Vec<Extent>> {
        self.blocking(move |f| extents(f, offset, len)).await
    }
}
