//! Transmission phase on the wire, sans-IO: request headers in, replies out.

use crate::proto::*;

pub const REQUEST_HEADER_LEN: usize = 28;

/// One request header (a write's payload follows it on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub handle: u64,
    pub offset: u64,
    pub len: u32,
}

/// A request stream that cannot be followed any further: close the connection.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("request magic {0:#x} is wrong")]
    BadMagic(u32),
    #[error("write of {0} bytes exceeds the 32 MiB limit")]
    WriteTooLarge(u32),
}

impl Request {
    /// Parses a request header.
    pub fn parse(h: &[u8; REQUEST_HEADER_LEN]) -> Result<Request, WireError> {
        let magic = u32::from_be_bytes(h[0..4].try_into().expect("4"));
        if magic != REQUEST_MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        let req = Request {
            flags: u16::from_be_bytes(h[4..6].try_into().expect("2")),
            command: u16::from_be_bytes(h[6..8].try_into().expect("2")),
            handle: u64::from_be_bytes(h[8..16].try_into().expect("8")),
            offset: u64::from_be_bytes(h[16..24].try_into().expect("8")),
            len: u32::from_be_bytes(h[24..28].try_into().expect("4")),
        };
        if req.command == CMD_WRITE && req.len > MAX_PAYLOAD {
            return Err(WireError::WriteTooLarge(req.len));
        }
        Ok(req)
    }

    /// Bytes of payload that follow the header.
    pub fn payload_len(&self) -> usize {
        if self.command == CMD_WRITE {
            self.len as usize
        } else {
            0
        }
    }

    /// Checks a request against the export; `Err` is the errno and a message for the reply.
    pub fn check(&self, size: u64, read_only: bool) -> Result<(), (u32, &'static str)> {
        let known =
            CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_FAST_ZERO;
        if self.flags & !known != 0 {
            return Err((EINVAL, "unknown command flags"));
        }
        let writes = matches!(self.command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
        if writes && read_only {
            return Err((EPERM, "export is read-only"));
        }
        match self.command {
            CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES | CMD_BLOCK_STATUS | CMD_CACHE => {
                if self.command == CMD_READ && self.len > MAX_PAYLOAD {
                    return Err((EINVAL, "read larger than 32 MiB"));
                }
                let end = self.offset.checked_add(u64::from(self.len));
                if end.is_none_or(|e| e > size) {
                    return Err((
                        if writes { ENOSPC } else { EINVAL },
                        "request beyond the end of the export",
                    ));
                }
                if self.command == CMD_BLOCK_STATUS && self.len == 0 {
                    return Err((EINVAL, "block status of zero length"));
                }
                Ok(())
            }
            CMD_FLUSH | CMD_DISC => Ok(()),
            _ => Err((EINVAL, "unknown command")),
        }
    }
}

/// A simple reply (no payload, or a read's data appended by the caller).
pub fn simple_reply(out: &mut Vec<u8>, handle: u64, error: u32) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&handle.to_be_bytes());
}

/// The header of a structured reply chunk; `len` bytes of payload must follow.
pub fn chunk_header(out: &mut Vec<u8>, flags: u16, kind: u16, handle: u64, len: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&handle.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// A final structured chunk with no payload (success of a command without data).
pub fn done_chunk(out: &mut Vec<u8>, handle: u64) {
    chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0);
}

/// An error, in the form the negotiation allows.
pub fn error_reply(out: &mut Vec<u8>, structured: bool, handle: u64, errno: u32, message: &str) {
    if structured {
        let msg = &message.as_bytes()[..message.len().min(MAX_STRING)];
        chunk_header(
            out,
            REPLY_FLAG_DONE,
            REPLY_TYPE_ERROR,
            handle,
            6 + wire_len(msg.len()),
        );
        out.extend_from_slice(&errno.to_be_bytes());
        out.extend_from_slice(&u16::try_from(msg.len()).unwrap_or(u16::MAX).to_be_bytes());
        out.extend_from_slice(msg);
    } else {
        simple_reply(out, handle, errno);
    }
}

/// Success of a command without data.
pub fn ok_reply(out: &mut Vec<u8>, structured: bool, handle: u64) {
    if structured {
        done_chunk(out, handle);
    } else {
        simple_reply(out, handle, 0);
    }
}

/// The header of a read's reply: one `OFFSET_DATA` chunk (structured) or a simple
/// reply; the `len` bytes of data follow it on the wire, sent from the caller's buffer.
pub fn read_reply_header(
    out: &mut Vec<u8>,
    structured: bool,
    handle: u64,
    offset: u64,
    len: usize,
) {
    if structured {
        chunk_header(
            out,
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            handle,
            8 + wire_len(len),
        );
        out.extend_from_slice(&offset.to_be_bytes());
    } else {
        simple_reply(out, handle, 0);
    }
}

/// A read of a range that is all zeros, as one `OFFSET_HOLE` chunk.
pub fn hole_reply(out: &mut Vec<u8>, handle: u64, offset: u64, len: u32) {
    chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE, handle, 12);
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// `base:allocation` extents as one final `BLOCK_STATUS` chunk.
pub fn block_status_reply(out: &mut Vec<u8>, handle: u64, extents: &[(u32, u32)]) {
    chunk_header(
        out,
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        handle,
        4 + 8 * wire_len(extents.len()),
    );
    out.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
    for (len, flags) in extents {
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn parse_and_check_never_panic(bytes in proptest::array::uniform28(any::<u8>()), size in any::<u64>(), ro in any::<bool>()) {
            if let Ok(r) = Request::parse(&bytes) {
                let _ = r.check(size, ro);
                prop_assert!(r.payload_len() <= MAX_PAYLOAD as usize);
            }
        }
    }

    #[test]
    fn checks_name_the_problem() {
        let r = |command, offset, len| Request {
            flags: 0,
            command,
            handle: 1,
            offset,
            len,
        };
        assert_eq!(
            r(CMD_WRITE, 0, 10).check(100, true),
            Err((EPERM, "export is read-only"))
        );
        assert_eq!(
            r(CMD_WRITE, 95, 10).check(100, false).unwrap_err().0,
            ENOSPC
        );
        assert_eq!(
            r(CMD_READ, u64::MAX, 10).check(100, false).unwrap_err().0,
            EINVAL
        );
        assert_eq!(r(99, 0, 0).check(100, false).unwrap_err().0, EINVAL);
        assert!(r(CMD_READ, 0, 100).check(100, true).is_ok());
    }
}
