//! The fixed-newstyle handshake, as a sans-IO state machine.
//!
//! The server loop feeds whatever bytes arrived to [`Handshake::step`], sends what
//! [`Handshake::take_output`] returns, and repeats until the step says `Done` (enter
//! transmission with the negotiated export) or `Abort` (the client left politely).
//! An `Err` means the client broke a mandatory rule: the connection is closed.

use crate::proto::*;

/// What the server knows of one export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
    pub size: u64,
    pub read_only: bool,
    /// Whether writes through one connection are visible to reads through another and a
    /// flush on one covers writes completed on all (true for a shared local file).
    pub multi_conn: bool,
}

impl ExportInfo {
    /// The transmission flags advertised for this export.
    pub fn transmission_flags(&self) -> u16 {
        let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_DF;
        if self.read_only {
            f |= TFLAG_READ_ONLY;
        } else {
            f |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
        }
        if self.multi_conn {
            f |= TFLAG_CAN_MULTI_CONN;
        }
        f
    }
}

/// The exports a server offers.
pub trait ExportCatalog {
    fn lookup(&self, name: &str) -> Option<ExportInfo>;
    fn list(&self) -> Vec<ExportInfo>;
}

/// The outcome of a successful handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub export: ExportInfo,
    pub structured: bool,
    /// Whether `base:allocation` was selected (its id is [`BASE_ALLOCATION_ID`]).
    pub base_allocation: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeStep {
    /// More input is needed (nothing was consumed).
    NeedMore,
    /// One message was handled; call again.
    Continue,
    /// Enter transmission.
    Done(Negotiated),
    /// The client sent `NBD_OPT_ABORT`; close after sending the output.
    Abort,
}

/// A client that broke a mandatory rule of the handshake: close the connection.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    #[error("client flags {0:#x} are not understood")]
    ClientFlags(u32),
    #[error("option magic {0:#x} is wrong")]
    BadMagic(u64),
    #[error("option {option} carries {len} bytes, more than the 64 KiB allowed")]
    OptionTooLong { option: u32, len: u32 },
    #[error("no export named {0:?} (NBD_OPT_EXPORT_NAME cannot be refused politely)")]
    UnknownExport(String),
}

enum State {
    ClientFlags,
    Options,
    Finished,
}

/// The server side of one connection's handshake.
pub struct Handshake {
    state: State,
    no_zeroes: bool,
    structured: bool,
    base_allocation: bool,
    out: Vec<u8>,
}

impl Default for Handshake {
    fn default() -> Self {
        Self::new()
    }
}

/// Reads a big-endian integer at the front of `b`, advancing it.
fn take<const N: usize>(b: &mut &[u8]) -> Option<[u8; N]> {
    if b.len() < N {
        return None;
    }
    let (head, rest) = b.split_at(N);
    *b = rest;
    head.try_into().ok()
}

fn take_u16(b: &mut &[u8]) -> Option<u16> {
    take::<2>(b).map(u16::from_be_bytes)
}

fn take_u32(b: &mut &[u8]) -> Option<u32> {
    take::<4>(b).map(u32::from_be_bytes)
}

/// A length-prefixed (u32) UTF-8 string of at most [`MAX_STRING`] bytes.
fn take_string(b: &mut &[u8]) -> Option<String> {
    let len = take_u32(b)? as usize;
    if len > MAX_STRING || b.len() < len {
        return None;
    }
    let (s, rest) = b.split_at(len);
    *b = rest;
    String::from_utf8(s.to_vec())
        .ok()
        .filter(|s| !s.contains('\0'))
}

impl Handshake {
    /// A new handshake; its output already holds the server's greeting.
    pub fn new() -> Handshake {
        let mut out = Vec::with_capacity(18);
        out.extend_from_slice(&NBDMAGIC.to_be_bytes());
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        Handshake {
            state: State::ClientFlags,
            no_zeroes: false,
            structured: false,
            base_allocation: false,
            out,
        }
    }

    /// Bytes to send to the client now.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    fn reply(&mut self, option: u32, kind: u32, data: &[u8]) {
        self.out
            .extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        self.out.extend_from_slice(&option.to_be_bytes());
        self.out.extend_from_slice(&kind.to_be_bytes());
        self.out
            .extend_from_slice(&wire_len(data.len()).to_be_bytes());
        self.out.extend_from_slice(data);
    }

    fn error(&mut self, option: u32, kind: u32, message: &str) {
        self.reply(option, kind, message.as_bytes());
    }

    /// Handles at most one message from `input`; returns the bytes consumed.
    pub fn step(
        &mut self,
        input: &[u8],
        catalog: &dyn ExportCatalog,
    ) -> Result<(usize, HandshakeStep), HandshakeError> {
        match self.state {
            State::Finished => Ok((0, HandshakeStep::NeedMore)),
            State::ClientFlags => {
                let mut b = input;
                let Some(flags) = take_u32(&mut b) else {
                    return Ok((0, HandshakeStep::NeedMore));
                };
                if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
                    return Err(HandshakeError::ClientFlags(flags));
                }
                self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
                self.state = State::Options;
                Ok((4, HandshakeStep::Continue))
            }
            State::Options => {
                let mut b = input;
                let (Some(magic), Some(option), Some(len)) = (
                    take::<8>(&mut b).map(u64::from_be_bytes),
                    take_u32(&mut b),
                    take_u32(&mut b),
                ) else {
                    return Ok((0, HandshakeStep::NeedMore));
                };
                if magic != IHAVEOPT {
                    return Err(HandshakeError::BadMagic(magic));
                }
                if len > MAX_OPTION_LEN {
                    return Err(HandshakeError::OptionTooLong { option, len });
                }
                if b.len() < len as usize {
                    return Ok((0, HandshakeStep::NeedMore));
                }
                let data = &b[..len as usize];
                let step = self.option(option, data, catalog)?;
                Ok((16 + len as usize, step))
            }
        }
    }

    fn option(
        &mut self,
        option: u32,
        data: &[u8],
        catalog: &dyn ExportCatalog,
    ) -> Result<HandshakeStep, HandshakeError> {
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(data).into_owned();
                let export = catalog
                    .lookup(&name)
                    .ok_or(HandshakeError::UnknownExport(name))?;
                self.out.extend_from_slice(&export.size.to_be_bytes());
                self.out
                    .extend_from_slice(&export.transmission_flags().to_be_bytes());
                if !self.no_zeroes {
                    self.out.extend_from_slice(&[0u8; 124]);
                }
                Ok(self.finish(export))
            }
            OPT_ABORT => {
                self.reply(option, REP_ACK, &[]);
                self.state = State::Finished;
                Ok(HandshakeStep::Abort)
            }
            OPT_LIST => {
                if !data.is_empty() {
                    self.error(option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
                    return Ok(HandshakeStep::Continue);
                }
                for export in catalog.list() {
                    let mut d = Vec::with_capacity(4 + export.name.len());
                    d.extend_from_slice(&wire_len(export.name.len()).to_be_bytes());
                    d.extend_from_slice(export.name.as_bytes());
                    d.extend_from_slice(export.description.as_bytes());
                    self.reply(option, REP_SERVER, &d);
                }
                self.reply(option, REP_ACK, &[]);
                Ok(HandshakeStep::Continue)
            }
            OPT_STARTTLS => {
                self.error(option, REP_ERR_POLICY, "TLS is not offered by this server");
                Ok(HandshakeStep::Continue)
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    self.error(
                        option,
                        REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                } else {
                    self.structured = true;
                    self.reply(option, REP_ACK, &[]);
                }
                Ok(HandshakeStep::Continue)
            }
            OPT_INFO | OPT_GO => Ok(self.info_or_go(option, data, catalog)),
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.meta_context(option, data, catalog);
                Ok(HandshakeStep::Continue)
            }
            _ => {
                self.error(option, REP_ERR_UNSUP, "option not supported");
                Ok(HandshakeStep::Continue)
            }
        }
    }

    fn finish(&mut self, export: ExportInfo) -> HandshakeStep {
        self.state = State::Finished;
        HandshakeStep::Done(Negotiated {
            export,
            structured: self.structured,
            base_allocation: self.structured && self.base_allocation,
        })
    }

    fn info_or_go(
        &mut self,
        option: u32,
        data: &[u8],
        catalog: &dyn ExportCatalog,
    ) -> HandshakeStep {
        let mut b = data;
        let parsed = (|| {
            let name = take_string(&mut b)?;
            let n = take_u16(&mut b)?;
            let mut requests = Vec::with_capacity(usize::from(n));
            for _ in 0..n {
                requests.push(take_u16(&mut b)?);
            }
            b.is_empty().then_some((name, requests))
        })();
        let Some((name, requests)) = parsed else {
            self.error(option, REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO data");
            return HandshakeStep::Continue;
        };
        let Some(export) = catalog.lookup(&name) else {
            self.error(
                option,
                REP_ERR_UNKNOWN,
                &format!("no export named {name:?}"),
            );
            return HandshakeStep::Continue;
        };
        let mut d = Vec::with_capacity(12);
        d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        d.extend_from_slice(&export.size.to_be_bytes());
        d.extend_from_slice(&export.transmission_flags().to_be_bytes());
        self.reply(option, REP_INFO, &d);
        for r in requests {
            let mut d = r.to_be_bytes().to_vec();
            match r {
                INFO_NAME => d.extend_from_slice(export.name.as_bytes()),
                INFO_DESCRIPTION => d.extend_from_slice(export.description.as_bytes()),
                _ => continue,
            }
            self.reply(option, REP_INFO, &d);
        }
        // Always advertise block sizes: clients then never exceed our payload limit.
        let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [1u32, 4096, MAX_PAYLOAD] {
            d.extend_from_slice(&v.to_be_bytes());
        }
        self.reply(option, REP_INFO, &d);
        self.reply(option, REP_ACK, &[]);
        if option == OPT_GO {
            self.finish(export)
        } else {
            HandshakeStep::Continue
        }
    }

    fn meta_context(&mut self, option: u32, data: &[u8], catalog: &dyn ExportCatalog) {
        let mut b = data;
        let parsed = (|| {
            let name = take_string(&mut b)?;
            let n = take_u32(&mut b)?;
            let mut queries = Vec::new();
            for _ in 0..n {
                queries.push(take_string(&mut b)?);
            }
            b.is_empty().then_some((name, queries))
        })();
        let Some((name, queries)) = parsed else {
            self.error(option, REP_ERR_INVALID, "malformed meta context request");
            return;
        };
        if option == OPT_SET_META_CONTEXT && !self.structured {
            self.error(
                option,
                REP_ERR_INVALID,
                "negotiate structured replies first",
            );
            return;
        }
        if catalog.lookup(&name).is_none() {
            self.error(
                option,
                REP_ERR_UNKNOWN,
                &format!("no export named {name:?}"),
            );
            return;
        }
        let listing = option == OPT_LIST_META_CONTEXT;
        let matched = queries.iter().any(|q| q == BASE_ALLOCATION)
            || (listing && (queries.is_empty() || queries.iter().any(|q| q == "base:")));
        if matched {
            let id = if listing { 0 } else { BASE_ALLOCATION_ID };
            let mut d = id.to_be_bytes().to_vec();
            d.extend_from_slice(BASE_ALLOCATION.as_bytes());
            self.reply(option, REP_META_CONTEXT, &d);
        }
        if !listing {
            self.base_allocation = matched;
        }
        self.reply(option, REP_ACK, &[]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    struct One;
    impl ExportCatalog for One {
        fn lookup(&self, name: &str) -> Option<ExportInfo> {
            (name == "s/d").then(|| ExportInfo {
                name: name.into(),
                description: "d".into(),
                size: 4096,
                read_only: false,
                multi_conn: true,
            })
        }
        fn list(&self) -> Vec<ExportInfo> {
            self.lookup("s/d").into_iter().collect()
        }
    }

    fn option(code: u32, data: &[u8]) -> Vec<u8> {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(&wire_len(data.len()).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    fn run(input: &[u8]) -> (Result<HandshakeStep, HandshakeError>, Vec<u8>) {
        let mut hs = Handshake::new();
        let mut out = hs.take_output();
        let mut pos = 0;
        loop {
            match hs.step(&input[pos..], &One) {
                Err(e) => return (Err(e), out),
                Ok((used, step)) => {
                    pos += used;
                    out.extend(hs.take_output());
                    match step {
                        HandshakeStep::Continue => {}
                        other => return (Ok(other), out),
                    }
                }
            }
        }
    }

    #[test]
    fn go_with_structured_replies_and_base_allocation() {
        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend(option(OPT_STRUCTURED_REPLY, &[]));
        let mut meta = 3u32.to_be_bytes().to_vec();
        meta.extend_from_slice(b"s/d");
        meta.extend_from_slice(&1u32.to_be_bytes());
        meta.extend_from_slice(&wire_len(BASE_ALLOCATION.len()).to_be_bytes());
        meta.extend_from_slice(BASE_ALLOCATION.as_bytes());
        input.extend(option(OPT_SET_META_CONTEXT, &meta));
        let mut go = 3u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"s/d");
        go.extend_from_slice(&0u16.to_be_bytes());
        input.extend(option(OPT_GO, &go));
        let (step, _) = run(&input);
        match step.unwrap() {
            HandshakeStep::Done(n) => {
                assert!(n.structured && n.base_allocation);
                assert_eq!(n.export.size, 4096);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_export_in_go_is_an_error_reply_not_a_close() {
        let mut input = 1u32.to_be_bytes().to_vec();
        let mut go = 4u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"nope");
        go.extend_from_slice(&0u16.to_be_bytes());
        input.extend(option(OPT_GO, &go));
        input.extend(option(OPT_ABORT, &[]));
        let (step, out) = run(&input);
        assert_eq!(step.unwrap(), HandshakeStep::Abort);
        assert!(out.windows(4).any(|w| w == REP_ERR_UNKNOWN.to_be_bytes()));
    }

    proptest! {
        #[test]
        fn arbitrary_input_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = run(&bytes);
        }

        #[test]
        fn input_split_anywhere_gives_the_same_result(cut in 0usize..60) {
            let mut input = 3u32.to_be_bytes().to_vec();
            input.extend(option(OPT_LIST, &[]));
            input.extend(option(OPT_EXPORT_NAME, b"s/d"));
            let cut = cut.min(input.len());
            // Feeding a prefix never consumes a partial message.
            let mut hs = Handshake::new();
            let mut pos = 0;
            while let Ok((used, step)) = hs.step(&input[pos..cut], &One) {
                pos += used;
                if used == 0 || !matches!(step, HandshakeStep::Continue) { break; }
            }
            prop_assert!(pos <= cut);
            let (step, _) = run(&input);
            prop_assert!(matches!(step, Ok(HandshakeStep::Done(_))));
        }
    }
}
