//! Disk images on the local machine: raw image files and block devices, read and written
//! at offsets (`pread`/`pwrite`) from the blocking pool, so many chunks move at once.
//!
//! Holes of sparse files are found with `SEEK_DATA` and never read: a sparse 16 GiB image
//! with 1 GiB of data costs 1 GiB of reads.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::SpaceError;

/// An open image (file or block device) and its size.
#[derive(Debug, Clone)]
pub struct Image {
    pub path: PathBuf,
    pub file: Arc<File>,
    pub size: u64,
    pub is_block_device: bool,
}

impl Image {
    /// Opens an image to read from. Its size must be a non-zero multiple of 512.
    pub fn open_read(path: &Path) -> Result<Image, SpaceError> {
        let file = File::open(path).map_err(|e| SpaceError::image("cannot open image", path, e))?;
        Self::from_file(path, file)
    }

    /// Opens an existing image to read and write. A block device is opened exclusively
    /// (`O_EXCL`): the kernel then refuses one that is mounted or otherwise in use.
    pub fn open_rw(path: &Path) -> Result<Image, SpaceError> {
        use std::os::unix::fs::OpenOptionsExt;
        let is_block = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device());
        let mut options = OpenOptions::new();
        options.read(true).write(true);
        if is_block {
            options.custom_flags(i32::try_from(rustix::fs::OFlags::EXCL.bits()).unwrap_or(0));
        }
        let file = options.open(path).map_err(|e| {
            let what = if e.raw_os_error() == Some(16) {
                "block device is in use (mounted?), refusing to write"
            } else {
                "cannot open image for writing"
            };
            SpaceError::image(what, path, e)
        })?;
        Self::from_file(path, file)
    }

    fn from_file(path: &Path, file: File) -> Result<Image, SpaceError> {
        let meta = file
            .metadata()
            .map_err(|e| SpaceError::image("cannot stat image", path, e))?;
        let ft = meta.file_type();
        let is_block_device = ft.is_block_device();
        let size = if is_block_device {
            rustix::fs::seek(&file, rustix::fs::SeekFrom::End(0))
                .map_err(|e| SpaceError::image("cannot size block device", path, e.into()))?
        } else if ft.is_file() {
            meta.len()
        } else {
            return Err(SpaceError::image(
                "not a regular file or block device:",
                path,
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "unsupported file type"),
            ));
        };
        if size == 0 {
            return Err(SpaceError::ImageEmpty {
                path: path.to_path_buf(),
            });
        }
        if size % 512 != 0 {
            return Err(SpaceError::ImageSizeUnaligned {
                path: path.to_path_buf(),
                size,
            });
        }
        Ok(Image {
            path: path.to_path_buf(),
            file: Arc::new(file),
            size,
            is_block_device,
        })
    }

    /// Whether `[start, end)` may hold data (false only for a hole of a sparse file).
    pub fn may_have_data(&self, start: u64, end: u64) -> bool {
        if self.is_block_device {
            return true;
        }
        match rustix::fs::seek(&*self.file, rustix::fs::SeekFrom::Data(start)) {
            Ok(next) => next < end,
            Err(rustix::io::Errno::NXIO) => false,
            Err(_) => true,
        }
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), SpaceError> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| SpaceError::image("cannot read image", &self.path, e))
    }

    /// Writes all of `buf` at `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), SpaceError> {
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| SpaceError::image("cannot write", &self.path, e))
    }

    /// Writes the non-zero parts of `buf` at `offset`, leaving zero runs of 64 KiB blocks
    /// unwritten: for a target known to read as zeros there (a fresh sparse file), so
    /// they stay holes. Returns the bytes written.
    pub fn write_nonzero_at(&self, buf: &[u8], offset: u64) -> Result<u64, SpaceError> {
        const BLOCK: usize = 64 * 1024;
        let mut written = 0;
        let mut run: Option<usize> = None;
        for (i, block) in buf.chunks(BLOCK).enumerate() {
            let zero = cairn_format::zero::is_zero(block);
            match (zero, run) {
                (false, None) => run = Some(i * BLOCK),
                (true, Some(start)) => {
                    self.write_at(&buf[start..i * BLOCK], offset + start as u64)?;
                    written += (i * BLOCK - start) as u64;
                    run = None;
                }
                _ => {}
            }
        }
        if let Some(start) = run {
            self.write_at(&buf[start..], offset + start as u64)?;
            written += (buf.len() - start) as u64;
        }
        Ok(written)
    }

    /// Starts flushing written data without making writers wait for it: called every so
    /// often during a restore, so that the final sync has little left to do.
    pub fn flush_behind(&self, flushing: &Arc<std::sync::atomic::AtomicBool>) {
        use std::sync::atomic::Ordering;
        if flushing.swap(true, Ordering::AcqRel) {
            return;
        }
        let file = self.file.clone();
        let flag = flushing.clone();
        std::thread::spawn(move || {
            let _ = rustix::fs::fdatasync(&*file);
            flag.store(false, Ordering::Release);
        });
    }

    /// Makes `[offset, offset+len)` read as zeros: a hole in a file (when the filesystem
    /// can punch one), zeros written otherwise.
    pub fn zero_range(&self, offset: u64, len: u64) -> Result<(), SpaceError> {
        if !self.is_block_device {
            let flags =
                rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
            if rustix::fs::fallocate(&*self.file, flags, offset, len).is_ok() {
                return Ok(());
            }
        }
        let zeros = vec![0u8; usize::try_from(len.min(1 << 20)).unwrap_or(1 << 20)];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64);
            self.write_at(&zeros[..usize::try_from(n).unwrap_or(0)], offset + done)?;
            done += n;
        }
        Ok(())
    }

    /// Flushes written data to stable storage.
    pub fn sync(&self) -> Result<(), SpaceError> {
        self.file
            .sync_all()
            .map_err(|e| SpaceError::image("cannot sync", &self.path, e))
    }
}

/// A pool of chunk-sized buffers, so the pipeline does not page-fault fresh memory for
/// every chunk. Holds at most `limit` idle buffers.
#[derive(Debug)]
pub struct BufferPool {
    size: usize,
    limit: usize,
    idle: std::sync::Mutex<Vec<Vec<u8>>>,
}

impl BufferPool {
    pub fn new(size: usize, limit: usize) -> Arc<BufferPool> {
        Arc::new(BufferPool {
            size,
            limit,
            idle: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// A buffer of exactly `len` (≤ the pool's size) bytes, contents unspecified.
    pub fn take(&self, len: usize) -> Vec<u8> {
        let mut buf = self
            .idle
            .lock()
            .expect("buffer pool poisoned")
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(self.size));
        buf.resize(len, 0);
        buf
    }

    pub fn give(&self, buf: Vec<u8>) {
        let mut idle = self.idle.lock().expect("buffer pool poisoned");
        if idle.len() < self.limit && buf.capacity() >= self.size {
            idle.push(buf);
        }
    }
}
