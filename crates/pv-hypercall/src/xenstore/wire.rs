//! The xenstore wire protocol (Xen's `io/xs_wire.h`): a 16-byte header (`type`,
//! `req_id`, `tx_id`, `len`, little-endian u32s on x86) and at most
//! [`PAYLOAD_MAX`] bytes of payload, usually NUL-terminated strings.

/// The most payload bytes one message carries (`XENSTORE_PAYLOAD_MAX`).
pub const PAYLOAD_MAX: usize = 4096;
/// Bytes in a message header (`struct xsd_sockmsg`).
pub const HEADER_LEN: usize = 16;

/// Message types (`enum xsd_sockmsg_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum MsgType {
    /// `XS_CONTROL` (`XS_DEBUG`).
    Control = 0,
    /// `XS_DIRECTORY`.
    Directory = 1,
    /// `XS_READ`.
    Read = 2,
    /// `XS_GET_PERMS`.
    GetPerms = 3,
    /// `XS_WATCH`.
    Watch = 4,
    /// `XS_UNWATCH`.
    Unwatch = 5,
    /// `XS_TRANSACTION_START`.
    TransactionStart = 6,
    /// `XS_TRANSACTION_END`.
    TransactionEnd = 7,
    /// `XS_INTRODUCE`.
    Introduce = 8,
    /// `XS_RELEASE`.
    Release = 9,
    /// `XS_GET_DOMAIN_PATH`.
    GetDomainPath = 10,
    /// `XS_WRITE`.
    Write = 11,
    /// `XS_MKDIR`.
    Mkdir = 12,
    /// `XS_RM`.
    Rm = 13,
    /// `XS_SET_PERMS`.
    SetPerms = 14,
    /// `XS_WATCH_EVENT`.
    WatchEvent = 15,
    /// `XS_ERROR`.
    Error = 16,
    /// `XS_IS_DOMAIN_INTRODUCED`.
    IsDomainIntroduced = 17,
    /// `XS_RESUME`.
    Resume = 18,
    /// `XS_SET_TARGET`.
    SetTarget = 19,
    /// `XS_RESET_WATCHES` (`XS_SET_TARGET + 2`: `XS_RESTRICT` was removed).
    ResetWatches = 21,
    /// `XS_DIRECTORY_PART`.
    DirectoryPart = 22,
}

impl MsgType {
    /// The type numbered `n`, if there is one.
    pub fn from_u32(n: u32) -> Option<MsgType> {
        use MsgType::*;
        Some(match n {
            0 => Control,
            1 => Directory,
            2 => Read,
            3 => GetPerms,
            4 => Watch,
            5 => Unwatch,
            6 => TransactionStart,
            7 => TransactionEnd,
            8 => Introduce,
            9 => Release,
            10 => GetDomainPath,
            11 => Write,
            12 => Mkdir,
            13 => Rm,
            14 => SetPerms,
            15 => WatchEvent,
            16 => Error,
            17 => IsDomainIntroduced,
            18 => Resume,
            19 => SetTarget,
            21 => ResetWatches,
            22 => DirectoryPart,
            _ => return None,
        })
    }
}

/// A message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The message type, as sent (possibly not one of [`MsgType`]).
    pub ty: u32,
    /// The request's id, echoed in the reply.
    pub req_id: u32,
    /// The transaction (0: none).
    pub tx_id: u32,
    /// Payload bytes that follow.
    pub len: u32,
}

impl Header {
    /// Decode 16 bytes.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Header {
        let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Header {
            ty: word(0),
            req_id: word(4),
            tx_id: word(8),
            len: word(12),
        }
    }

    /// Encode to 16 bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        for (i, w) in [self.ty, self.req_id, self.tx_id, self.len]
            .into_iter()
            .enumerate()
        {
            b[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
        }
        b
    }
}

/// A whole message: its header and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The header (its `len` is the payload's).
    pub header: Header,
    /// The payload.
    pub payload: Vec<u8>,
}

impl Message {
    /// A message of type `ty` answering `req_id` in `tx_id`, carrying `payload`
    /// (at most [`PAYLOAD_MAX`] bytes: callers build replies within it).
    pub fn new(ty: MsgType, req_id: u32, tx_id: u32, payload: Vec<u8>) -> Message {
        debug_assert!(payload.len() <= PAYLOAD_MAX);
        Message {
            header: Header {
                ty: ty as u32,
                req_id,
                tx_id,
                len: payload.len() as u32,
            },
            payload,
        }
    }

    /// The message as bytes, header first.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER_LEN + self.payload.len());
        b.extend_from_slice(&self.header.encode());
        b.extend_from_slice(&self.payload);
        b
    }
}

/// A stream that broke the protocol: the connection cannot be trusted further.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize,
)]
pub enum WireError {
    /// A header announced more payload than a message may carry.
    #[error("a xenstore message announces {0} bytes of payload, over the {PAYLOAD_MAX} allowed")]
    PayloadTooLong(u32),
}

/// Cuts a byte stream (what a guest wrote into its request ring) into messages. It
/// holds at most one partial message ([`HEADER_LEN`] + [`PAYLOAD_MAX`] bytes).
#[derive(Debug, Default)]
pub struct Framer {
    partial: Vec<u8>,
}

impl Framer {
    /// The partial message held (for a snapshot).
    pub fn partial(&self) -> &[u8] {
        &self.partial
    }

    /// A framer holding `partial` again (from a snapshot): it must be a prefix of
    /// one message, as [`partial`](Self::partial) gave it.
    pub fn with_partial(partial: Vec<u8>) -> Result<Self, WireError> {
        let mut framer = Framer::default();
        if !framer.push(&partial)?.is_empty() {
            return Err(WireError::PayloadTooLong(u32::MAX));
        }
        Ok(framer)
    }

    /// Take `bytes`; returns every message they complete, or the error that broke
    /// the stream (the bytes after it are not looked at).
    pub fn push(&mut self, mut bytes: &[u8]) -> Result<Vec<Message>, WireError> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let want = if self.partial.len() < HEADER_LEN {
                HEADER_LEN - self.partial.len()
            } else {
                let h = self.header();
                HEADER_LEN + h.len as usize - self.partial.len()
            };
            let take = want.min(bytes.len());
            self.partial.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.partial.len() == HEADER_LEN {
                let h = self.header();
                if h.len as usize > PAYLOAD_MAX {
                    self.partial.clear();
                    return Err(WireError::PayloadTooLong(h.len));
                }
            }
            if self.partial.len() >= HEADER_LEN
                && self.partial.len() == HEADER_LEN + self.header().len as usize
            {
                let header = self.header();
                let payload = self.partial.split_off(HEADER_LEN);
                self.partial.clear();
                out.push(Message { header, payload });
            }
        }
        Ok(out)
    }

    fn header(&self) -> Header {
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&self.partial[..HEADER_LEN]);
        Header::decode(&h)
    }

    /// Bytes of a partial message held.
    pub fn pending(&self) -> usize {
        self.partial.len()
    }
}

/// The payload's NUL-terminated strings (a final string without its NUL counts too;
/// an empty payload has none).
pub fn strings(payload: &[u8]) -> Vec<&[u8]> {
    let body = payload.strip_suffix(&[0]).unwrap_or(payload);
    if payload.is_empty() {
        return Vec::new();
    }
    body.split(|&b| b == 0).collect()
}
