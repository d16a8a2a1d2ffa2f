//! The messages of a migration, as they travel inside the channel's records: one
//! message per record, its first byte a tag. Decoding is plain code over bytes that
//! came from the peer: every length is checked against what the message may
//! legitimately hold before anything is allocated, and a message the receiver does
//! not expect at that point of the protocol is the receiver's error, not this module's.

use std::fmt;

use vmcraft_memory::PAGE_SIZE;

/// Pages per [`Message::Pages`] at most: with its tag and address, 15 pages fit one
/// Noise record (65,535 bytes less the 16-byte tag).
pub const MAX_RUN: usize = 15;
/// Bytes of state per [`Message::StateData`] at most.
pub const STATE_CHUNK: usize = 60 << 10;
/// Bytes of a peer's [`Message::Abort`] text at most.
pub const MAX_TEXT: usize = 512;
/// Bytes of a message's plaintext at most (a Noise record's 65,535 less its tag).
pub const MAX_MESSAGE: usize = 65_535 - 16;

mod tag {
    pub const HELLO: u8 = 1;
    pub const KEEPALIVE: u8 = 2;
    pub const INFO: u8 = 3;
    pub const PAGES: u8 = 4;
    pub const STATE: u8 = 5;
    pub const STATE_DATA: u8 = 6;
    pub const READY: u8 = 7;
    pub const COMMIT: u8 = 8;
    pub const STARTED: u8 = 9;
    pub const ABORT: u8 = 10;
    pub const CONFIG: u8 = 11;
    pub const ACCEPTED: u8 = 12;
}

/// The version of this protocol; the destination's [`Message::Hello`] carries it.
pub const PROTOCOL_VERSION: u32 = 3;
/// Bytes of a [`Message::Config`]'s JSON at most (one record).
pub const MAX_CONFIG: usize = STATE_CHUNK;

/// One message of the migration protocol (see the [module](super) documentation for
/// who sends which, and when).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message<'a> {
    /// Destination to source, first after the handshake: the destination holds the
    /// keys (this is the source's proof of it) and speaks this protocol version.
    Hello {
        /// [`PROTOCOL_VERSION`].
        version: u32,
    },
    /// Source to destination while it waits to begin: the session is still wanted.
    KeepAlive,
    /// Source to destination: the machine about to come.
    Info {
        /// Bytes of guest RAM.
        ram_bytes: u64,
        /// vCPUs.
        vcpus: u32,
    },
    /// Source to destination, after INFO when the machine was built from a
    /// configuration: its `MachineConfig` as JSON, which the destination checks
    /// against its own before any memory comes.
    Config(&'a [u8]),
    /// Destination to source, after CONFIG: the machine fits here; memory may come.
    Accepted,
    /// Source to destination: pages of guest RAM from a page-aligned address.
    Pages {
        /// The guest-physical address of the first page.
        addr: u64,
        /// Whole pages, 1 to [`MAX_RUN`] of them.
        data: &'a [u8],
    },
    /// Source to destination: the state file follows in [`Message::StateData`], this
    /// many bytes.
    State {
        /// Bytes of the state file.
        len: u64,
    },
    /// Source to destination: the next bytes of the state file.
    StateData(&'a [u8]),
    /// Destination to source: everything has come and checks out; it will run the
    /// guest once the source commits.
    Ready,
    /// Source to destination: the source has stopped for good; run the guest.
    Commit,
    /// Destination to source: the guest runs here.
    Started,
    /// Either way: giving up, and why (text from the peer: see [`PeerText`]).
    Abort(&'a [u8]),
}

/// What is wrong with a message from the peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// An empty record.
    #[error("an empty message")]
    Empty,
    /// A tag no message has.
    #[error("a message of unknown tag {0}")]
    UnknownTag(u8),
    /// A message whose length is wrong for its kind.
    #[error("a {kind} message of {len} bytes (it must be {expected})")]
    Length {
        /// The message's kind.
        kind: &'static str,
        /// Its length, tag included.
        len: usize,
        /// What it must be.
        expected: &'static str,
    },
    /// Pages at an address that is not page-aligned.
    #[error("pages at {0:#x}, which is not page-aligned")]
    Misaligned(u64),
}

impl<'a> Message<'a> {
    /// The message's kind, for errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "HELLO",
            Message::KeepAlive => "KEEPALIVE",
            Message::Info { .. } => "INFO",
            Message::Config(_) => "CONFIG",
            Message::Accepted => "ACCEPTED",
            Message::Pages { .. } => "PAGES",
            Message::State { .. } => "STATE",
            Message::StateData(_) => "STATE_DATA",
            Message::Ready => "READY",
            Message::Commit => "COMMIT",
            Message::Started => "STARTED",
            Message::Abort(_) => "ABORT",
        }
    }

    /// Append the message's bytes to `out`. Pages, state data and abort texts longer
    /// than their bounds are the sender's bug: they are cut to the bound.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match *self {
            Message::Hello { version } => {
                out.push(tag::HELLO);
                out.extend_from_slice(&version.to_le_bytes());
            }
            Message::KeepAlive => out.push(tag::KEEPALIVE),
            Message::Info { ram_bytes, vcpus } => {
                out.push(tag::INFO);
                out.extend_from_slice(&ram_bytes.to_le_bytes());
                out.extend_from_slice(&vcpus.to_le_bytes());
            }
            Message::Config(json) => {
                out.push(tag::CONFIG);
                out.extend_from_slice(&json[..json.len().min(MAX_CONFIG)]);
            }
            Message::Accepted => out.push(tag::ACCEPTED),
            Message::Pages { addr, data } => {
                out.push(tag::PAGES);
                out.extend_from_slice(&addr.to_le_bytes());
                out.extend_from_slice(&data[..data.len().min(MAX_RUN * PAGE_SIZE as usize)]);
            }
            Message::State { len } => {
                out.push(tag::STATE);
                out.extend_from_slice(&len.to_le_bytes());
            }
            Message::StateData(data) => {
                out.push(tag::STATE_DATA);
                out.extend_from_slice(&data[..data.len().min(STATE_CHUNK)]);
            }
            Message::Ready => out.push(tag::READY),
            Message::Commit => out.push(tag::COMMIT),
            Message::Started => out.push(tag::STARTED),
            Message::Abort(text) => {
                out.push(tag::ABORT);
                out.extend_from_slice(&text[..text.len().min(MAX_TEXT)]);
            }
        }
    }

    /// Decode one message, checking its length for its kind.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, WireError> {
        let (&t, body) = bytes.split_first().ok_or(WireError::Empty)?;
        let exact = |kind, n: usize, expected| {
            if body.len() == n {
                Ok(())
            } else {
                Err(WireError::Length {
                    kind,
                    len: bytes.len(),
                    expected,
                })
            }
        };
        let u64_at = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |at: usize| u32::from_le_bytes(body[at..at + 4].try_into().unwrap_or([0; 4]));
        Ok(match t {
            tag::HELLO => {
                exact("HELLO", 4, "5 bytes")?;
                Message::Hello { version: u32_at(0) }
            }
            tag::KEEPALIVE => {
                exact("KEEPALIVE", 0, "1 byte")?;
                Message::KeepAlive
            }
            tag::INFO => {
                exact("INFO", 12, "13 bytes")?;
                Message::Info {
                    ram_bytes: u64_at(0),
                    vcpus: u32_at(8),
                }
            }
            tag::CONFIG => {
                if body.is_empty() || body.len() > MAX_CONFIG {
                    return Err(WireError::Length {
                        kind: "CONFIG",
                        len: bytes.len(),
                        expected: "2 to 61,441 bytes",
                    });
                }
                Message::Config(body)
            }
            tag::ACCEPTED => {
                exact("ACCEPTED", 0, "1 byte")?;
                Message::Accepted
            }
            tag::PAGES => {
                let pages = body.len().saturating_sub(8);
                let page = PAGE_SIZE as usize;
                if body.len() < 8 + page || pages % page != 0 || pages > MAX_RUN * page {
                    return Err(WireError::Length {
                        kind: "PAGES",
                        len: bytes.len(),
                        expected: "9 bytes and 1 to 15 whole pages",
                    });
                }
                let addr = u64_at(0);
                if addr % PAGE_SIZE != 0 {
                    return Err(WireError::Misaligned(addr));
                }
                Message::Pages {
                    addr,
                    data: &body[8..],
                }
            }
            tag::STATE => {
                exact("STATE", 8, "9 bytes")?;
                Message::State { len: u64_at(0) }
            }
            tag::STATE_DATA => {
                if body.is_empty() || body.len() > STATE_CHUNK {
                    return Err(WireError::Length {
                        kind: "STATE_DATA",
                        len: bytes.len(),
                        expected: "2 to 61,441 bytes",
                    });
                }
                Message::StateData(body)
            }
            tag::READY => {
                exact("READY", 0, "1 byte")?;
                Message::Ready
            }
            tag::COMMIT => {
                exact("COMMIT", 0, "1 byte")?;
                Message::Commit
            }
            tag::STARTED => {
                exact("STARTED", 0, "1 byte")?;
                Message::Started
            }
            tag::ABORT => {
                if body.len() > MAX_TEXT {
                    return Err(WireError::Length {
                        kind: "ABORT",
                        len: bytes.len(),
                        expected: "at most 513 bytes",
                    });
                }
                Message::Abort(body)
            }
            other => return Err(WireError::UnknownTag(other)),
        })
    }
}

/// Text that came from the peer, made safe to print: control characters (terminal
/// escapes, line breaks that would forge a line of our own log) are shown escaped,
/// invalid UTF-8 replaced, and the whole cut at [`MAX_TEXT`] bytes.
///
/// ```
/// use vmcraft::migration::wire::PeerText;
/// let forged = PeerText::new(b"no\nminimal-vmm: migrated to 10.0.0.1\x1b[2J");
/// assert_eq!(forged.to_string(), "no\\nminimal-vmm: migrated to 10.0.0.1\\u{1b}[2J");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerText(String);

impl PeerText {
    /// The safe form of `bytes`.
    pub fn new(bytes: &[u8]) -> Self {
        let text = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_TEXT)]);
        let mut safe = String::with_capacity(text.len());
        for c in text.chars() {
            if c.is_control() {
                safe.extend(c.escape_default());
            } else {
                safe.push(c);
            }
        }
        PeerText(safe)
    }
}

impl fmt::Display for PeerText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The largest state file a machine of `ram_bytes` and `vcpus` may send: device and
/// vCPU state is small, but the balloon's page list grows with RAM (a generous 8
/// bytes a page) and each vCPU's registers and MSRs take a few KiB (a generous
/// 256 KiB each).
pub fn state_limit(ram_bytes: u64, vcpus: u32) -> u64 {
    let limit = (4u64 << 20)
        .saturating_add((ram_bytes / PAGE_SIZE).saturating_mul(8))
        .saturating_add(u64::from(vcpus).saturating_mul(256 << 10));
    limit.min(vmcraft_snapshot::MAX_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_decodes_as_it_was_encoded() {
        let page = vec![7u8; 4096 * 3];
        let state = vec![1u8; 100];
        for m in [
            Message::Hello { version: 2 },
            Message::KeepAlive,
            Message::Info {
                ram_bytes: 1 << 30,
                vcpus: 4,
            },
            Message::Pages {
                addr: 0x10_0000,
                data: &page,
            },
            Message::State { len: 12345 },
            Message::StateData(&state),
            Message::Ready,
            Message::Commit,
            Message::Started,
            Message::Abort(b"no room"),
            Message::Config(br#"{"memory_mib": 64}"#),
            Message::Accepted,
        ] {
            let mut out = Vec::new();
            m.encode(&mut out);
            assert!(out.len() <= MAX_MESSAGE, "{}", m.kind());
            assert_eq!(Message::decode(&out).unwrap(), m);
        }
    }

    #[test]
    fn lengths_and_alignment_are_checked_before_use() {
        assert_eq!(Message::decode(&[]), Err(WireError::Empty));
        assert_eq!(Message::decode(&[99]), Err(WireError::UnknownTag(99)));
        assert!(matches!(
            Message::decode(&[tag::INFO, 0, 0]),
            Err(WireError::Length { kind: "INFO", .. })
        ));
        assert!(matches!(
            Message::decode(&[tag::COMMIT, 0]),
            Err(WireError::Length { kind: "COMMIT", .. })
        ));
        let pages = |addr: u64, n: usize| {
            let mut m = vec![tag::PAGES];
            m.extend_from_slice(&addr.to_le_bytes());
            m.extend(vec![0u8; n]);
            m
        };
        assert!(Message::decode(&pages(0, 4096 * 15)).is_ok());
        assert!(Message::decode(&pages(0, 4096 * 16)).is_err(), "16 pages");
        assert!(Message::decode(&pages(0, 0)).is_err(), "no page");
        assert!(Message::decode(&pages(0, 4095)).is_err(), "part of a page");
        assert_eq!(
            Message::decode(&pages(0x1001, 4096)),
            Err(WireError::Misaligned(0x1001))
        );
        assert!(Message::decode(&[tag::STATE_DATA]).is_err(), "empty data");
        let mut long = vec![tag::ABORT];
        long.extend(vec![b'a'; MAX_TEXT + 1]);
        assert!(Message::decode(&long).is_err());
    }

    #[test]
    fn peer_text_cannot_forge_a_line_or_drive_the_terminal() {
        let t = PeerText::new(b"x\r\nminimal-vmm: ok\x1b]0;title\x07\xff");
        let s = t.to_string();
        assert!(!s.chars().any(char::is_control), "{s}");
        assert!(s.contains("\\n") && s.contains("\\u{1b}") && s.contains('\u{fffd}'));
        assert_eq!(PeerText::new(&[b'a'; 2000]).to_string().len(), MAX_TEXT);
    }

    #[test]
    fn the_state_limit_grows_with_ram_and_vcpus_within_the_file_bound() {
        assert!(state_limit(128 << 20, 1) < 6 << 20);
        assert!(state_limit(1 << 30, 8) > state_limit(128 << 20, 1));
        assert_eq!(state_limit(u64::MAX, u32::MAX), vmcraft_snapshot::MAX_FILE);
    }
}
