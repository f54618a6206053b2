//! The tokio server loop: owns sockets, drives the sans-IO handshake, then serves
//! requests concurrently (up to [`MAX_IN_FLIGHT`] per connection, replies in completion
//! order). A client that breaks the protocol loses its own connection, never the server
//! or other clients.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;

use cairn_format::zero::is_zero;

use crate::export::BlockExport;
use crate::handshake::{ExportCatalog, ExportInfo, Handshake, HandshakeStep, Negotiated};
use crate::proto::*;
use crate::wire::{self, REQUEST_HEADER_LEN, Request};

/// Requests served at once on one connection.
pub const MAX_IN_FLIGHT: u32 = 64;
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
        tokio::spawn(async move {
            if let Err(e) = serve_connection(stream, exports).await {
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
        tokio::spawn(async move {
            if let Err(e) = serve_connection(stream, exports).await {
                tracing::info!("nbd unix client: {e}");
            }
        });
    }
}

/// Serves one connection: handshake, then transmission until the client disconnects.
pub async fn serve_connection<S>(
    mut stream: S,
    exports: Arc<dyn Exports>,
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
    transmission(stream, leftover, negotiated, export).await
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

async fn transmission<S>(
    stream: S,
    leftover: BytesMut,
    neg: Negotiated,
    export: Arc<dyn BlockExport>,
) -> Result<(), ConnectionError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (rd, wr) = tokio::io::split(stream);
    let mut rd = std::io::Cursor::new(leftover.to_vec()).chain(rd);
    // Each request's task writes its own reply, whole, under this lock: replies go out in
    // completion order without a hop through a writer task.
    let wr = Arc::new(tokio::sync::Mutex::new(wr));
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT as usize));
    let failed = Arc::new(std::sync::Mutex::new(None::<std::io::Error>));
    let neg = Arc::new(neg);
    let result = async {
        loop {
            let mut header = [0u8; REQUEST_HEADER_LEN];
            match rd.read_exact(&mut header).await {
                Ok(_) => {}
                // The client hung up without NBD_CMD_DISC: a hard disconnect.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e.into()),
            }
            let req = Request::parse(&header)?;
            let mut payload = vec![0u8; req.payload_len()];
            rd.read_exact(&mut payload).await?;
            if req.command == CMD_DISC {
                return Ok(());
            }
            if let Some(e) = failed.lock().expect("poisoned").take() {
                return Err(ConnectionError::Io(e));
            }
            if slots.available_permits() == MAX_IN_FLIGHT as usize {
                // Nothing else in flight (queue depth 1): serve it right here, saving a
                // task hand-off on the latency path.
                let reply = handle(&*export, &neg, req, payload).await;
                reply.send(&mut *wr.lock().await).await?;
                continue;
            }
            let permit = slots.clone().acquire_owned().await.expect("semaphore open");
            let (export, neg, wr, failed) =
                (export.clone(), neg.clone(), wr.clone(), failed.clone());
            tokio::spawn(async move {
                let reply = handle(&*export, &neg, req, payload).await;
                if let Err(e) = reply.send(&mut *wr.lock().await).await {
                    *failed.lock().expect("poisoned") = Some(e);
                }
                drop(permit);
            });
        }
    }
    .await;
    // Let in-flight requests finish and their replies go out, then close.
    let _ = slots.acquire_many(MAX_IN_FLIGHT).await;
    let mut wr = wr.lock().await;
    let closed = async {
        wr.flush().await?;
        wr.shutdown().await
    }
    .await;
    result.and(closed.map_err(ConnectionError::from))
}

fn errno_of(e: &std::io::Error) -> u32 {
    match e.raw_os_error() {
        Some(28) => ENOSPC,
        Some(1 | 13 | 30) => EPERM,
        Some(12) => ENOMEM,
        _ => EIO,
    }
}

/// One reply: a header, and a read's data sent from its own buffer (never copied).
struct Reply {
    head: Vec<u8>,
    data: Vec<u8>,
}

impl Reply {
    async fn send<W: AsyncWrite + Unpin>(&self, wr: &mut W) -> std::io::Result<()> {
        wr.write_all(&self.head).await?;
        if !self.data.is_empty() {
            wr.write_all(&self.data).await?;
        }
        Ok(())
    }
}

impl From<Vec<u8>> for Reply {
    fn from(head: Vec<u8>) -> Self {
        Reply {
            head,
            data: Vec::new(),
        }
    }
}

async fn handle(
    export: &dyn BlockExport,
    neg: &Negotiated,
    req: Request,
    payload: Vec<u8>,
) -> Reply {
    let mut out = Vec::with_capacity(64);
    let s = neg.structured;
    if let Err((errno, msg)) = req.check(neg.export.size, neg.export.read_only) {
        wire::error_reply(&mut out, s, req.handle, errno, msg);
        return out.into();
    }
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let result = match req.command {
        CMD_READ => match export.read(req.offset, req.len).await {
            Ok(data) => {
                if s && req.flags & CMD_FLAG_DF == 0 && !data.is_empty() && is_zero(&data) {
                    wire::hole_reply(&mut out, req.handle, req.offset, req.len);
                    return out.into();
                }
                wire::read_reply_header(&mut out, s, req.handle, req.offset, data.len());
                return Reply { head: out, data };
            }
            Err(e) => Err(e),
        },
        CMD_WRITE => export.write(req.offset, payload, fua).await,
        CMD_FLUSH => export.flush().await,
        CMD_TRIM => export.trim(req.offset, req.len, fua).await,
        CMD_CACHE => Ok(()),
        CMD_WRITE_ZEROES => {
            if req.flags & CMD_FLAG_FAST_ZERO != 0 && req.flags & CMD_FLAG_NO_HOLE != 0 {
                // A fast zero that may not punch could be slow: let the client write.
                wire::error_reply(
                    &mut out,
                    s,
                    req.handle,
                    ENOTSUP,
                    "fast zero unavailable with NO_HOLE",
                );
                return out.into();
            }
            export
                .write_zeroes(req.offset, req.len, req.flags & CMD_FLAG_NO_HOLE == 0, fua)
                .await
        }
        CMD_BLOCK_STATUS => {
            if !neg.base_allocation {
                wire::error_reply(
                    &mut out,
                    s,
                    req.handle,
                    EINVAL,
                    "no meta context was negotiated",
                );
                return out.into();
            }
            match export.block_status(req.offset, req.len).await {
                Ok(mut ext) => {
                    if req.flags & CMD_FLAG_REQ_ONE != 0 {
                        ext.truncate(1);
                    }
                    wire::block_status_reply(&mut out, req.handle, &ext);
                    return out.into();
                }
                Err(e) => Err(e),
            }
        }
        _ => Err(std::io::Error::from_raw_os_error(22)),
    };
    match result {
        Ok(()) => wire::ok_reply(&mut out, s, req.handle),
        Err(e) => wire::error_reply(&mut out, s, req.handle, errno_of(&e), &e.to_string()),
    }
    out.into()
}
