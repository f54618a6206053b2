//! The tokio server loop: owns sockets, drives the sans-IO handshake, then serves
//! requests concurrently (up to [`MAX_IN_FLIGHT`] per connection, replies in completion
//! order). A client that breaks the protocol loses its own connection, never the server
//! or other clients.

use std::borrow::Cow;
use std::future::Future;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use cairn_format::zero::is_zero;

use crate::export::{BlockExport, Extent};
use crate::handshake::{ExportCatalog, ExportInfo, Handshake, HandshakeStep, Negotiated};
use crate::proto::*;
use crate::wire::{self, REQUEST_HEADER_LEN, Request};

/// Requests served at once on one connection.
pub const MAX_IN_FLIGHT: u32 = 64;
/// Write payload bytes held by requests in flight on one connection: once there are
/// this many, the connection reads no more requests until some finish.
pub const MAX_IN_FLIGHT_BYTES: usize = 32 << 20;
/// Time a client has to finish the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// The exports a server offers, and how to open them.
pub trait Exports: Send + Sync {
    fn list(&self) -> Vec<ExportInfo>;
    fn open(&self, name: &str) -> Option<Arc<dyn BlockExport>>;
    /// The export a client asks for by name: by default one of [`Self::list`]; a catalog
    /// may also offer exports it does not list (opened on demand).
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        self.list().into_iter().find(|e| e.name == name)
    }
}

struct Catalog<'a>(&'a dyn Exports);

impl ExportCatalog for Catalog<'_> {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        self.0.lookup(name)
    }
    fn list(&self) -> Vec<ExportInfo> {
        self.0.list()
    }
}

/// Why a connection ended abnormally (logged, never fatal to the server).
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("handshake: {0}")]
    Handshake(#[from] crate::handshake::HandshakeError),
    #[error("protocol: {0}")]
    Wire(#[from] wire::WireError),
    #[error("handshake not finished within {0:?}")]
    Timeout(Duration),
    #[error("handshake data exceeds the limit")]
    TooMuch,
    #[error("export {0:?} disappeared")]
    Gone(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Accepts connections forever on a TCP listener.
pub async fn serve_tcp(
    listener: tokio::net::TcpListener,
    exports: Arc<dyn Exports>,
) -> std::io::Result<()> {
    loop {
        let (stream, peer) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let exports = exports.clone();
        let poller = Poller::of(&stream, false);
        tokio::spawn(async move {
            if let Err(e) = serve(stream, exports, poller).await {
                tracing::info!("nbd client {peer}: {e}");
            }
        });
    }
}

/// Accepts connections forever on a Unix-socket listener.
pub async fn serve_unix(
    listener: tokio::net::UnixListener,
    exports: Arc<dyn Exports>,
) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let exports = exports.clone();
        let poller = Poller::of(&stream, true);
        tokio::spawn(async move {
            if let Err(e) = serve(stream, exports, poller).await {
                tracing::info!("nbd unix client: {e}");
            }
        });
    }
}

/// Serves one connection: handshake, then transmission until the client disconnects.
pub async fn serve_connection<S>(
    stream: S,
    exports: Arc<dyn Exports>,
) -> Result<(), ConnectionError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    serve(stream, exports, None).await
}

/// [`serve_connection`], polling a TCP or Unix socket at queue depth 1 (see [`Poller`]).
async fn serve<S>(
    mut stream: S,
    exports: Arc<dyn Exports>,
    poller: Option<Poller>,
) -> Result<(), ConnectionError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let negotiated =
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut stream, &*exports)).await {
            Ok(r) => r?,
            Err(_) => return Err(ConnectionError::Timeout(HANDSHAKE_TIMEOUT)),
        };
    let Some((negotiated, leftover)) = negotiated else {
        return Ok(());
    };
    let export = exports
        .open(&negotiated.export.name)
        .ok_or_else(|| ConnectionError::Gone(negotiated.export.name.clone()))?;
    let _counted = crate::stats::ConnectionGuard::new();
    transmission(stream, leftover, negotiated, export, poller).await
}

/// Runs the handshake; on success returns the negotiation and any bytes the client
/// already sent beyond it (its first requests).
async fn handshake<S>(
    stream: &mut S,
    exports: &dyn Exports,
) -> Result<Option<(Negotiated, BytesMut)>, ConnectionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let catalog = Catalog(exports);
    let mut hs = Handshake::new();
    let mut buf = BytesMut::with_capacity(4096);
    stream.write_all(&hs.take_output()).await?;
    loop {
        let (used, step) = hs.step(&buf, &catalog)?;
        let _ = buf.split_to(used);
        let out = hs.take_output();
        if !out.is_empty() {
            stream.write_all(&out).await?;
        }
        match step {
            HandshakeStep::Continue => continue,
            HandshakeStep::Done(n) => return Ok(Some((n, buf))),
            HandshakeStep::Abort => return Ok(None),
            HandshakeStep::NeedMore => {
                if buf.len() > 2 * MAX_OPTION_LEN as usize {
                    return Err(ConnectionError::TooMuch);
                }
                if stream.read_buf(&mut buf).await? == 0 {
                    return Ok(None);
                }
            }
        }
    }
}

/// Bytes asked of the socket per read: a queue of small requests arrives in one read.
const READ_BUF: usize = 256 * 1024;
/// A write payload longer than this is read straight into its own buffer; shorter ones
/// are copied out of the read buffer.
const BUFFERED_PAYLOAD: usize = 64 * 1024;
/// Reply data gathered before the batch is written.
const BATCH_BYTES: usize = 1 << 20;
/// How long a latency-bound connection polls its socket for the next request before it
/// sleeps (see [`Poller`]).
const POLL_WINDOW: Duration = Duration::from_micros(100);
/// Requests in a row at queue depth 1 before a connection starts polling.
const POLL_AFTER: u32 = 8;
/// Only requests up to this size count: for larger ones the copying, not the wake-up,
/// is the latency (and a client streaming large requests, such as nbdcopy, needs the
/// CPU a poller would take).
const POLL_MAX_LEN: u32 = 64 * 1024;
/// A request that arrives sooner than this after a reply was sent before the client
/// could have seen that reply: the client does not wait for replies (it is busy with
/// other requests), and polling would only take CPU from it.
const TOO_SOON: Duration = Duration::from_micros(3);

/// The queue-depth-1 streak after a request arrived: one longer if it came within the
/// polling window of a reply sent alone (but not too soon to be an answer to it).
fn after_arrival(streak: u32, replied_alone: Option<Instant>) -> u32 {
    match replied_alone.map(|t| t.elapsed()) {
        Some(gap) if (TOO_SOON..POLL_WINDOW).contains(&gap) => streak.saturating_add(1),
        _ => 0,
    }
}

/// Busy-polling for a client that sends one small request at a time, each right after
/// the reply to the one before (queue depth 1).
///
/// Sleeping between such requests costs a cross-CPU wake-up per request on the server
/// side (and one on the client's); in a VM each is an interrupt to a halted vCPU, tens
/// of microseconds (measured here: 4 KiB reads at queue depth 1, 9-11k IOPS when the
/// server sleeps, 24-28k when it polls). So after such a reply the connection polls its
/// socket with non-blocking reads for up to [`POLL_WINDOW`] before it sleeps, yielding
/// the CPU between reads (the poll holds its runtime worker thread for that long). It polls only after [`POLL_AFTER`] requests in a row that
/// each came alone, were at most [`POLL_MAX_LEN`] long, and arrived within the window
/// of the reply before them but not sooner than [`TOO_SOON`] (an idle, slow or
/// streaming client costs no spinning); one poll that sees nothing ends the streak; at
/// most half the cores' worth of connections (at least one) poll at the same time.
struct Poller {
    /// A duplicate of the connection's socket, read with `MSG_DONTWAIT` (and duplicated
    /// again for a [`Splicer`]).
    fd: std::os::fd::OwnedFd,
    /// Whether it is a Unix-domain socket (else TCP).
    unix: bool,
}

static POLLING: AtomicUsize = AtomicUsize::new(0);

fn max_pollers() -> usize {
    static MAX: OnceLock<usize> = OnceLock::new();
    *MAX.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get() / 2)
            .max(1)
    })
}

enum Polled {
    /// Bytes arrived (0: the client closed).
    Got(usize),
    /// Nothing within the window.
    Quiet,
    /// Enough connections are polling already.
    Busy,
}

impl Poller {
    fn of(socket: &impl std::os::fd::AsFd, unix: bool) -> Option<Poller> {
        let fd = socket.as_fd().try_clone_to_owned().ok()?;
        Some(Poller { fd, unix })
    }

    /// A [`Splicer`] for this socket (must run inside the runtime).
    fn splicer(&self) -> std::io::Result<Splicer> {
        use rustix::pipe::{PipeFlags, fcntl_getpipe_size, fcntl_setpipe_size, pipe_with};
        let fd = self.fd.try_clone()?;
        let sock = if self.unix {
            Dup::Unix(tokio::net::UnixStream::from_std(fd.into())?)
        } else {
            Dup::Tcp(tokio::net::TcpStream::from_std(fd.into())?)
        };
        let (r, w) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        // Over the system's or the user's pipe limits the pipe keeps its default size.
        let cap = match fcntl_setpipe_size(&w, PIPE_BYTES) {
            Ok(n) => n,
            Err(_) => fcntl_getpipe_size(&w)?,
        };
        Ok(Splicer {
            sock,
            r,
            w,
            cap,
            usable: true,
        })
    }

    fn poll(&self, buf: &mut [u8]) -> std::io::Result<Polled> {
        if POLLING.fetch_add(1, Ordering::Relaxed) >= max_pollers() {
            POLLING.fetch_sub(1, Ordering::Relaxed);
            return Ok(Polled::Busy);
        }
        let start = Instant::now();
        let r = loop {
            match rustix::net::recv(&self.fd, &mut *buf, rustix::net::RecvFlags::DONTWAIT) {
                Ok((n, _)) => break Ok(Polled::Got(n)),
                Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => {}
                Err(e) => break Err(e.into()),
            }
            if start.elapsed() >= POLL_WINDOW {
                break Ok(Polled::Quiet);
            }
            // Let the client run if it shares this CPU.
            std::thread::yield_now();
        };
        POLLING.fetch_sub(1, Ordering::Relaxed);
        r
    }
}

/// Large buffers (read data, write payloads) kept for reuse instead of being freed.
///
/// Freeing a few hundred KiB at a time lets the allocator hand the memory back to the
/// kernel, and taking it again costs a page fault per 4 KiB (in a VM whose free memory
/// is reported to the host, a host fault too): measured here, a 1 GiB sequential read
/// of 256 KiB requests took 100–165k page faults and four times the CPU without this.
pub(crate) mod pool {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Smaller buffers come cheaply from the allocator.
    const MIN: usize = 64 << 10;
    const CLASSES: usize = 7; // 64 KiB .. 4 MiB, powers of two
    const MAX: usize = MIN << (CLASSES - 1);
    /// Bytes kept at most, over all classes.
    const BUDGET: usize = 16 << 20;

    static FREE: [Mutex<Vec<Vec<u8>>>; CLASSES] = [const { Mutex::new(Vec::new()) }; CLASSES];
    static KEPT: AtomicUsize = AtomicUsize::new(0);

    fn class(len: usize) -> usize {
        (len.max(MIN).next_power_of_two() / MIN).trailing_zeros() as usize
    }

    /// Whether buffers of `len` bytes come from the pool (smaller ones are cheap to
    /// allocate, larger ones are rare).
    pub(crate) fn pooled(len: usize) -> bool {
        (MIN..=MAX).contains(&len)
    }

    /// A buffer of `len` bytes; its content is whatever it held before (zeros when new).
    pub(crate) fn take(len: usize) -> Vec<u8> {
        if !pooled(len) {
            return vec![0u8; len];
        }
        let c = class(len);
        let mut v = match FREE[c].lock().expect("poisoned").pop() {
            Some(v) => {
                KEPT.fetch_sub(v.capacity(), Ordering::Relaxed);
                v
            }
            None => vec![0u8; MIN << c],
        };
        v.truncate(len);
        v
    }

    /// Keeps a buffer for a later [`take`] (or frees it when the pool is full).
    pub(crate) fn give(mut v: Vec<u8>) {
        let cap = v.capacity();
        if !pooled(cap) || !cap.is_power_of_two() {
            return;
        }
        if KEPT.fetch_add(cap, Ordering::Relaxed) + cap > BUDGET {
            KEPT.fetch_sub(cap, Ordering::Relaxed);
            return;
        }
        // Kept whole and initialised, so `take` hands it out without zeroing it.
        v.resize(cap, 0);
        FREE[class(cap)].lock().expect("poisoned").push(v);
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn buffers_come_back_in_their_class() {
            assert_eq!(super::class(1), 0);
            assert_eq!(super::class(64 << 10), 0);
            assert_eq!(super::class((64 << 10) + 1), 1);
            assert_eq!(super::class(4 << 20), 6);
            let mut v = super::take(300 << 10);
            assert_eq!((v.len(), v.capacity()), (300 << 10, 512 << 10));
            v.fill(7);
            let p = v.as_ptr();
            super::give(v);
            let again = super::take(257 << 10);
            assert_eq!((again.len(), again.capacity()), (257 << 10, 512 << 10));
            assert_eq!(again.as_ptr(), p, "the same buffer, reused");
            assert_eq!(super::take(5 << 20).len(), 5 << 20);
            assert_eq!(super::take(10), vec![0; 10]);
        }
    }
}

/// Received bytes not yet parsed: `buf[lo..hi]`.
struct RecvBuf {
    buf: Vec<u8>,
    lo: usize,
    hi: usize,
}

impl RecvBuf {
    fn new(leftover: &[u8]) -> RecvBuf {
        let mut buf = vec![0u8; (2 * READ_BUF).max(leftover.len() + READ_BUF)];
        buf[..leftover.len()].copy_from_slice(leftover);
        RecvBuf {
            buf,
            lo: 0,
            hi: leftover.len(),
        }
    }

    fn data(&self) -> &[u8] {
        &self.buf[self.lo..self.hi]
    }

    fn consume(&mut self, n: usize) {
        self.lo += n;
        if self.lo == self.hi {
            (self.lo, self.hi) = (0, 0);
        }
    }

    /// Room for the next read (at least half of [`READ_BUF`]).
    fn spare(&mut self) -> &mut [u8] {
        if self.buf.len() - self.hi < READ_BUF / 2 {
            self.buf.copy_within(self.lo..self.hi, 0);
            (self.lo, self.hi) = (0, self.hi - self.lo);
        }
        &mut self.buf[self.hi..]
    }

    /// [`RecvBuf::spare`], or only room for the rest of a request header.
    fn spare_for(&mut self, header_only: bool) -> &mut [u8] {
        let have = self.hi - self.lo;
        let spare = self.spare();
        if header_only && have < REQUEST_HEADER_LEN {
            &mut spare[..REQUEST_HEADER_LEN - have]
        } else {
            spare
        }
    }

    fn filled(&mut self, n: usize) {
        self.hi += n;
    }
}

/// The transmission phase of one connection, as one task that owns the socket:
///
/// 1. every whole request in the read buffer is parsed and its export call polled once,
///    right here; one that completes (a small page-cache read or write) has its reply
///    added to the batch, one that does not (a large or slow request) moves to a task
///    of its own and its outcome comes back through a channel;
/// 2. the batch is written with one vectored write (headers and read data, no copy);
/// 3. the task waits for more requests, a finished request, or the export's `closed`
///    (after polling the socket for a moment if the client works at queue depth 1, see
///    [`Poller`]).
///
/// At most [`MAX_IN_FLIGHT`] requests (and [`MAX_IN_FLIGHT_BYTES`] of write payloads)
/// wait in tasks; replies go out in completion order.
/// When the export's [`BlockExport::closed`] turns true, requests in flight finish and
/// are answered, later ones are refused with `ESHUTDOWN`, and the connection closes as
/// soon as nothing is in flight.
async fn transmission<S>(
    mut stream: S,
    leftover: BytesMut,
    neg: Negotiated,
    export: Arc<dyn BlockExport>,
    poller: Option<Poller>,
) -> Result<(), ConnectionError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let neg = Arc::new(neg);
    let structured = neg.structured;
    let mut closed = export.closed();
    let mut rbuf = RecvBuf::new(&leftover);
    drop(leftover);
    let mut batch = Batch::default();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Request, Outcome)>();
    let mut in_flight = 0u32;
    let mut in_flight_bytes = 0usize;
    let mut reading = true;
    // The export is going away: requests still in flight finish, new ones are refused
    // with ESHUTDOWN (the client must then disconnect), and once nothing is in flight
    // the connection closes.
    let mut closing = false;
    let mut outcome: Result<(), ConnectionError> = Ok(());
    // When the last reply went out alone (one small request, nothing else in flight).
    let mut replied_alone: Option<Instant> = None;
    // Requests in a row that came alone, each within the polling window of the reply
    // before it (see `after_arrival`).
    let mut streak = 0u32;
    // The last request was a write too large for the read buffer: the next is likely
    // one too, so only its header is read into the buffer and its payload goes straight
    // into its own (no copy out of the read buffer).
    let mut large_writes = false;
    // Large writes into a plain file: their payloads are spliced from the socket into
    // the file (see `Splicer`), as long as that works.
    let direct = export.direct_file();
    let mut splice_ok = direct.is_some();
    let mut splicer: Option<Splicer> = None;
    loop {
        if !closing && closed.as_ref().is_some_and(|c| *c.borrow()) {
            closing = true;
        }
        // 1. Serve every whole request already received.
        let mut more = false;
        let mut served = 0usize;
        let mut small = true;
        while reading && (closing || room(in_flight, in_flight_bytes)) {
            let Some(header) = rbuf.data().first_chunk::<REQUEST_HEADER_LEN>() else {
                break;
            };
            let req = match Request::parse(header) {
                Ok(r) => r,
                Err(e) => {
                    // Nothing after this can be followed: answer what is in flight, close.
                    outcome = Err(e.into());
                    reading = false;
                    break;
                }
            };
            let len = req.payload_len();
            large_writes = len > BUFFERED_PAYLOAD;
            let payload = if len <= BUFFERED_PAYLOAD {
                let Some(p) = rbuf
                    .data()
                    .get(REQUEST_HEADER_LEN..REQUEST_HEADER_LEN + len)
                else {
                    break;
                };
                let p = p.to_vec();
                rbuf.consume(REQUEST_HEADER_LEN + len);
                p
            } else {
                rbuf.consume(REQUEST_HEADER_LEN);
                let spliced = match direct {
                    Some(file) if !closing && splice_ok && req.flags & CMD_FLAG_FUA == 0 => {
                        let ok = req.check(neg.export.size, neg.export.read_only).is_ok();
                        let sp = match (&mut splicer, poller.as_ref()) {
                            (Some(sp), _) => Some(sp),
                            (None, Some(p)) if ok => match p.splicer() {
                                Ok(sp) => Some(splicer.insert(sp)),
                                Err(e) => {
                                    tracing::debug!("nbd: no splicing: {e}");
                                    splice_ok = false;
                                    None
                                }
                            },
                            _ => None,
                        };
                        sp.filter(|_| ok).map(|sp| (sp, file))
                    }
                    _ => None,
                };
                if let Some((sp, file)) = spliced {
                    // Whatever of the payload came with the header goes in first.
                    let have = rbuf.data().len().min(len);
                    let head = std::os::unix::fs::FileExt::write_all_at(
                        file,
                        &rbuf.data()[..have],
                        req.offset,
                    );
                    rbuf.consume(have);
                    let at = req.offset + have as u64;
                    let r = match sp
                        .write(&mut stream, &mut batch, file, at, len - have)
                        .await
                    {
                        Ok(r) => r,
                        Err(e) => {
                            outcome = Err(e);
                            reading = false;
                            break;
                        }
                    };
                    if !sp.usable {
                        splicer = None;
                        splice_ok = false;
                    }
                    crate::stats::count_write(u64::from(req.len));
                    served += 1;
                    small = false;
                    batch.push(structured, req, head.and(r).into());
                    if batch.data_bytes >= BATCH_BYTES {
                        more = true;
                        break;
                    }
                    continue;
                }
                let mut p = pool::take(len);
                let have = rbuf.data().len().min(len);
                p[..have].copy_from_slice(&rbuf.data()[..have]);
                rbuf.consume(have);
                if let Err(e) = read_payload(&mut stream, &mut p[have..], &mut batch).await {
                    outcome = Err(e);
                    reading = false;
                    break;
                }
                p
            };
            if req.command == CMD_DISC {
                reading = false;
                break;
            }
            served += 1;
            small &= req.len <= POLL_MAX_LEN;
            if closing {
                let refused = Outcome::Failed(ESHUTDOWN, "the export is shutting down".into());
                batch.push(structured, req, refused);
                continue;
            }
            let mut call = Box::pin(execute(export.clone(), neg.clone(), req, payload));
            match poll_once(&mut call).await {
                Some(o) => batch.push(structured, req, o),
                None => {
                    in_flight += 1;
                    in_flight_bytes += req.payload_len();
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let _ = tx.send((req, call.await));
                    });
                }
            }
            if batch.data_bytes >= BATCH_BYTES {
                more = true;
                break;
            }
        }
        while let Ok((req, o)) = rx.try_recv() {
            in_flight -= 1;
            in_flight_bytes -= req.payload_len();
            served += 1;
            small &= req.len <= POLL_MAX_LEN;
            batch.push(structured, req, o);
        }
        // 2. Send the replies.
        batch.write_to(&mut stream).await?;
        if more {
            continue;
        }
        if (closing || !reading) && in_flight == 0 {
            break;
        }
        if served > 0 {
            replied_alone = (served == 1 && small && in_flight == 0).then(Instant::now);
            if replied_alone.is_none() {
                streak = 0;
            }
        }
        // 3. Wait; first poll for a moment if the client works at queue depth 1.
        if let Some(p) = poller.as_ref().filter(|_| {
            streak >= POLL_AFTER && replied_alone.is_some() && reading && !closing && in_flight == 0
        }) {
            match p.poll(rbuf.spare()) {
                Ok(Polled::Got(0)) => {
                    reading = false;
                    continue;
                }
                Ok(Polled::Got(n)) => {
                    rbuf.filled(n);
                    streak = after_arrival(streak, replied_alone);
                    continue;
                }
                Ok(Polled::Quiet) => streak = 0,
                Ok(Polled::Busy) => {}
                Err(e) => {
                    outcome = Err(e.into());
                    reading = false;
                    continue;
                }
            }
        }
        tokio::select! {
            biased;
            Some((req, o)) = rx.recv(), if in_flight > 0 => {
                in_flight -= 1;
                in_flight_bytes -= req.payload_len();
                batch.push(structured, req, o);
            }
            r = stream.read(rbuf.spare_for(large_writes)), if reading && (closing || room(in_flight, in_flight_bytes)) => match r {
                // The client hung up without NBD_CMD_DISC: a hard disconnect.
                Ok(0) => reading = false,
                Ok(n) => {
                    rbuf.filled(n);
                    streak = after_arrival(streak, replied_alone);
                }
                Err(e) => {
                    outcome = Err(e.into());
                    reading = false;
                }
            },
            r = changed(&mut closed), if !closing && closed.is_some() => {
                if r.is_err() {
                    // Nobody can close it any more.
                    closed = None;
                }
            }
            else => break,
        }
    }
    let closing = async {
        stream.flush().await?;
        stream.shutdown().await
    }
    .await;
    outcome.and(closing.map_err(ConnectionError::from))
}

/// Capacity asked for the pipe a connection splices write payloads through: a whole
/// 1 MiB request at once (the kernel's default limit for an unprivileged process).
const PIPE_BYTES: usize = 1 << 20;

/// A duplicate of a connection's socket, as a tokio stream that is only used to wait
/// for data.
enum Dup {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl Dup {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        match self {
            Dup::Tcp(s) => s.as_fd(),
            Dup::Unix(s) => s.as_fd(),
        }
    }
}

/// Moves large write payloads from the socket into the export's file with `splice(2)`:
/// socket to a pipe (the pipe takes references to the received pages, no copy), pipe to
/// the file at the write's offset (the one copy, into the page cache). Reading the
/// payload into a buffer and `pwrite`-ing it costs two copies, and on a machine where
/// the client runs on the other core the copies are the work: per GiB written, about
/// a third less CPU for the server (see BENCHMARKS.md, "NBD server").
///
/// The write is done in order, on the connection's task, before the next request is
/// read, so it holds no payload in memory beyond the pipe and cannot be reordered with
/// a later request (earlier requests still in flight may finish before or after it, as
/// the protocol allows).
struct Splicer {
    /// A duplicate of the connection's socket, registered with the reactor to wait for
    /// data (the connection's own stream stays registered as well).
    sock: Dup,
    /// The pipe, non-blocking at both ends; empty between calls.
    r: std::os::fd::OwnedFd,
    w: std::os::fd::OwnedFd,
    /// Its capacity in bytes.
    cap: usize,
    /// False after the file refused a splice: the connection goes back to buffers.
    usable: bool,
}

impl Splicer {
    /// Writes the next `len` payload bytes from the socket into `file` at `offset`.
    /// `Err`: the connection broke; `Ok(r)`: the payload was consumed and `r` is the
    /// outcome of the write. If the socket or the file refuses a splice, the rest of the
    /// payload goes through a buffer and `pwrite` (which reports the error if it
    /// persists), and the splicer becomes unusable.
    async fn write<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        batch: &mut Batch,
        file: &std::fs::File,
        mut offset: u64,
        mut len: usize,
    ) -> Result<std::io::Result<()>, ConnectionError> {
        use rustix::pipe::{SpliceFlags, splice};
        use std::os::unix::fs::FileExt;
        while len > 0 {
            // Payload bytes in the pipe, and the file's refusal if it refused them.
            let (mut in_pipe, mut refused) =
                match self.fill(stream, batch, len.min(self.cap)).await? {
                    Some(n) => (n, None),
                    None => (
                        0,
                        Some(std::io::Error::from(std::io::ErrorKind::Unsupported)),
                    ),
                };
            len -= in_pipe;
            while in_pipe > 0 && refused.is_none() {
                let mut at = offset;
                match splice(
                    &self.r,
                    None,
                    file,
                    Some(&mut at),
                    in_pipe,
                    SpliceFlags::empty(),
                ) {
                    Ok(0) => refused = Some(std::io::ErrorKind::WriteZero.into()),
                    Ok(m) => {
                        in_pipe -= m;
                        offset += m as u64;
                    }
                    Err(rustix::io::Errno::INTR) => {}
                    Err(e) => refused = Some(e.into()),
                }
            }
            if let Some(e) = refused {
                tracing::debug!("nbd: splicing a write failed ({e}): using buffers");
                self.usable = false;
                let mut rest = pool::take(in_pipe + len);
                self.drain(&mut rest[..in_pipe])?;
                read_payload(stream, &mut rest[in_pipe..], batch).await?;
                let r = file.write_all_at(&rest, offset);
                pool::give(rest);
                return Ok(r);
            }
        }
        Ok(Ok(()))
    }

    /// Moves up to `want` bytes (at least one) from the socket into the empty pipe;
    /// replies waiting in `batch` are sent first if the socket has nothing yet. `None`:
    /// the socket cannot be spliced from (nothing was moved).
    async fn fill<S: AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        batch: &mut Batch,
        want: usize,
    ) -> Result<Option<usize>, ConnectionError> {
        use rustix::io::Errno;
        use rustix::pipe::{SpliceFlags, splice};
        let once = |fd: std::os::fd::BorrowedFd<'_>| loop {
            match splice(fd, None, &self.w, None, want, SpliceFlags::NONBLOCK) {
                Ok(0) => break Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)),
                Ok(n) => break Ok(Some(n)),
                Err(Errno::INTR) => {}
                Err(Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP) => break Ok(None),
                Err(e) => break Err(std::io::Error::from(e)),
            }
        };
        let fd = self.sock.as_fd();
        match once(fd) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            r => return Ok(r?),
        }
        batch.write_to(stream).await?;
        loop {
            let r = match &self.sock {
                Dup::Tcp(s) => {
                    s.readable().await?;
                    s.try_io(tokio::io::Interest::READABLE, || once(fd))
                }
                Dup::Unix(s) => {
                    s.readable().await?;
                    s.try_io(tokio::io::Interest::READABLE, || once(fd))
                }
            };
            match r {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                r => return Ok(r?),
            }
        }
    }

    /// Reads exactly `buf.len()` bytes out of the pipe (they are in it).
    fn drain(&self, mut buf: &mut [u8]) -> std::io::Result<()> {
        while !buf.is_empty() {
            match rustix::io::read(&self.r, &mut *buf) {
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => buf = &mut buf[n..],
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// Fills `buf` from the stream; replies waiting in `batch` are sent first whenever the
/// read has to wait (not before every read: under a stream of large writes, their
/// replies then go out together).
async fn read_payload<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    mut buf: &mut [u8],
    batch: &mut Batch,
) -> Result<(), ConnectionError> {
    while !buf.is_empty() {
        let now = {
            let mut read = std::pin::pin!(stream.read(buf));
            poll_once(&mut read).await
        };
        let n = match now {
            Some(r) => r?,
            None => {
                batch.write_to(stream).await?;
                stream.read(buf).await?
            }
        };
        if n == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
        buf = &mut buf[n..];
    }
    Ok(())
}

/// Whether a connection may take another request: fewer than [`MAX_IN_FLIGHT`] in
/// flight, holding less than [`MAX_IN_FLIGHT_BYTES`] of write payloads.
fn room(in_flight: u32, in_flight_bytes: usize) -> bool {
    in_flight < MAX_IN_FLIGHT && in_flight_bytes < MAX_IN_FLIGHT_BYTES
}

async fn changed(rx: &mut Option<tokio::sync::watch::Receiver<bool>>) -> Result<(), ()> {
    match rx {
        Some(rx) => rx.changed().await.map_err(|_| ()),
        None => std::future::pending().await,
    }
}

/// Polls a future once; `None` if it is not ready.
async fn poll_once<F: Future + Unpin>(f: &mut F) -> Option<F::Output> {
    std::future::poll_fn(|cx| match Pin::new(&mut *f).poll(cx) {
        Poll::Ready(v) => Poll::Ready(Some(v)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

/// Replies waiting to be written: their headers in one buffer, each read's data in its
/// own (written from there, never copied).
#[derive(Default)]
struct Batch {
    heads: Vec<u8>,
    /// (end of this reply's header in `heads`, its data)
    data: Vec<(usize, Vec<u8>)>,
    data_bytes: usize,
}

impl Batch {
    fn push(&mut self, structured: bool, req: Request, outcome: Outcome) {
        let (out, s, h) = (&mut self.heads, structured, req.handle);
        match outcome {
            Outcome::Done => wire::ok_reply(out, s, h),
            Outcome::Data(d) => {
                wire::read_reply_header(out, s, h, req.offset, d.len());
                self.data_bytes += d.len();
                self.data.push((out.len(), d));
            }
            Outcome::Hole => wire::hole_reply(out, h, req.offset, req.len),
            Outcome::Extents(ext) => wire::block_status_reply(out, h, &ext),
            Outcome::Failed(errno, msg) => wire::error_reply(out, s, h, errno, &msg),
        }
    }

    /// Writes every reply (one vectored write when the socket takes it all) and empties
    /// the batch.
    async fn write_to<W: AsyncWrite + Unpin>(&mut self, wr: &mut W) -> std::io::Result<()> {
        if self.heads.is_empty() {
            return Ok(());
        }
        let mut slices = Vec::with_capacity(2 * self.data.len() + 1);
        let mut from = 0;
        for (end, data) in &self.data {
            slices.push(IoSlice::new(&self.heads[from..*end]));
            slices.push(IoSlice::new(data));
            from = *end;
        }
        if from < self.heads.len() {
            slices.push(IoSlice::new(&self.heads[from..]));
        }
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            let n = wr.write_vectored(rest).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut rest, n);
        }
        wr.flush().await?;
        self.heads.clear();
        for (_, data) in self.data.drain(..) {
            pool::give(data);
        }
        self.data_bytes = 0;
        Ok(())
    }
}

fn errno_of(e: &std::io::Error) -> u32 {
    match e.raw_os_error() {
        Some(28) => ENOSPC,
        Some(1 | 13 | 30) => EPERM,
        Some(12) => ENOMEM,
        // A stopped server's disk: the client should reconnect later.
        Some(108) => ESHUTDOWN,
        _ => EIO,
    }
}

/// What became of one request; [`Batch::push`] turns it into its reply.
enum Outcome {
    Done,
    Data(Vec<u8>),
    /// A read of zeros, sent as one hole chunk (structured replies only).
    Hole,
    Extents(Vec<Extent>),
    Failed(u32, Cow<'static, str>),
}

impl From<std::io::Result<()>> for Outcome {
    fn from(r: std::io::Result<()>) -> Self {
        match r {
            Ok(()) => Outcome::Done,
            Err(e) => Outcome::Failed(errno_of(&e), e.to_string().into()),
        }
    }
}

async fn execute(
    export: Arc<dyn BlockExport>,
    neg: Arc<Negotiated>,
    req: Request,
    payload: Vec<u8>,
) -> Outcome {
    if let Err((errno, msg)) = req.check(neg.export.size, neg.export.read_only) {
        return Outcome::Failed(errno, msg.into());
    }
    let fua = req.flags & CMD_FLAG_FUA != 0;
    match req.command {
        CMD_READ => crate::stats::count_read(u64::from(req.len)),
        CMD_WRITE => crate::stats::count_write(u64::from(req.len)),
        _ => crate::stats::count_other(),
    }
    match req.command {
        CMD_READ => match export.read(req.offset, req.len).await {
            Ok(data) => {
                let df = req.flags & CMD_FLAG_DF != 0;
                if neg.structured && !df && !data.is_empty() && is_zero(&data) {
                    pool::give(data);
                    Outcome::Hole
                } else {
                    Outcome::Data(data)
                }
            }
            Err(e) => Err(e).into(),
        },
        CMD_WRITE => export.write(req.offset, payload, fua).await.into(),
        CMD_FLUSH => export.flush().await.into(),
        CMD_TRIM => export.trim(req.offset, req.len, fua).await.into(),
        CMD_CACHE => Outcome::Done,
        CMD_WRITE_ZEROES => {
            if req.flags & CMD_FLAG_FAST_ZERO != 0 && req.flags & CMD_FLAG_NO_HOLE != 0 {
                // A fast zero that may not punch could be slow: let the client write.
                return Outcome::Failed(ENOTSUP, "fast zero unavailable with NO_HOLE".into());
            }
            let may_punch = req.flags & CMD_FLAG_NO_HOLE == 0;
            export
                .write_zeroes(req.offset, req.len, may_punch, fua)
                .await
                .into()
        }
        CMD_BLOCK_STATUS => {
            if !neg.base_allocation {
                return Outcome::Failed(EINVAL, "no meta context was negotiated".into());
            }
            match export.block_status(req.offset, req.len).await {
                Ok(mut ext) => {
                    if req.flags & CMD_FLAG_REQ_ONE != 0 {
                        ext.truncate(1);
                    }
                    Outcome::Extents(ext)
                }
                Err(e) => Err(e).into(),
            }
        }
        _ => Outcome::Failed(EINVAL, "unknown command".into()),
    }
}
