//! The vmcraft snapshot file: a VM's state as named, versioned, checksummed sections,
//! each a serde value encoded with `postcard`.
//!
//! Every component of a VM (a vCPU, the in-kernel irqchip, a device, the PV channel)
//! saves itself as one section under a name of its own (`vcpu0`, `serial`,
//! `virtio-mmio0`, ...) with the version of its state struct. Restoring asks for a
//! section by name and by the version it understands; whatever is wrong with the
//! file is an error that names the section, never a panic:
//!
//! - not a snapshot, or a snapshot of another format version;
//! - truncated anywhere, or with bytes after its last section;
//! - a section whose checksum (CRC-32 of its body) does not match, so one flipped bit
//!   in the file is caught before any of it is decoded;
//! - a section missing, of another version, or whose body does not decode as the
//!   state struct (or decodes with bytes left over).
//!
//! A checksum catches accidents (a bit flipped on the disk, a truncated copy), not
//! edits: whoever can write the file can recompute every CRC. Against that, sign it:
//! [`SnapshotBuilder::to_signed_bytes`] appends a last section,
//! [`SIGNATURE_SECTION`], holding an HMAC-SHA256 under a key of the caller's over
//! every byte before it (the header included), and [`Snapshot::verify`] refuses a
//! file whose signature is missing or does not match that key.
//!
//! Guest memory is not in this file: it goes in a sparse file of its own (see
//! `vmcraft_memory::snapshot`), so that a restore can map it copy-on-write.
//!
//! ```
//! use vmcraft_snapshot::{Snapshot, SnapshotBuilder};
//!
//! #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
//! struct Counter { value: u64 }
//!
//! let mut b = SnapshotBuilder::new();
//! b.add("counter", 1, &Counter { value: 7 }).unwrap();
//! let bytes = b.to_bytes();
//!
//! let snapshot = Snapshot::parse(bytes).unwrap();
//! assert_eq!(snapshot.get::<Counter>("counter", 1).unwrap(), Counter { value: 7 });
//! // A reader that only knows version 2 of the struct is told what it found.
//! assert_eq!(
//!     snapshot.get::<Counter>("counter", 2).unwrap_err().to_string(),
//!     "snapshot section \"counter\" is version 1; this build reads version 2"
//! );
//! ```

use std::collections::BTreeMap;
use std::io::Write;
use std::ops::Range;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

/// The first eight bytes of every snapshot file.
pub const MAGIC: [u8; 8] = *b"VMCRSNAP";
/// The version of the container format this crate reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// The most sections a snapshot may hold.
pub const MAX_SECTIONS: u32 = 4096;
/// The longest section name, in bytes.
pub const MAX_NAME: usize = 64;
/// The largest snapshot file [`Snapshot::read_file`] accepts (device and vCPU state;
/// guest memory lives in its own file).
pub const MAX_FILE: u64 = 256 << 20;

/// The name of the section that signs a snapshot (always its last).
pub const SIGNATURE_SECTION: &str = "hmac-sha256";
/// The shortest signing key accepted.
pub const MIN_KEY: usize = 32;

/// Bytes of the header: magic, format version, section count, total length, CRC.
const HEADER: usize = 8 + 4 + 4 + 8 + 4;

/// What can be wrong with writing or reading a snapshot.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// The file could not be read or written.
    #[error("cannot {what} snapshot file {path}")]
    Io {
        /// "read", "write", ...
        what: &'static str,
        /// The file.
        path: String,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// The file does not start with [`MAGIC`].
    #[error("not a vmcraft snapshot (it does not start with \"VMCRSNAP\")")]
    NotASnapshot,
    /// A snapshot of another container format version.
    #[error("snapshot format version {found}; this build reads version {supported}")]
    FormatVersion {
        /// The file's version.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// The header's checksum does not match.
    #[error("the snapshot header is corrupted (checksum mismatch)")]
    HeaderChecksum,
    /// More sections than [`MAX_SECTIONS`].
    #[error("the snapshot claims {0} sections (at most {max})", max = MAX_SECTIONS)]
    TooManySections(u32),
    /// The file is shorter (or longer) than its header says.
    #[error("the snapshot is {actual} bytes long but its header says {expected}")]
    Length {
        /// What the header says.
        expected: u64,
        /// What the file holds.
        actual: u64,
    },
    /// The file ends inside `what`.
    #[error("the snapshot ends inside {what} (offset {offset}, {needed} more bytes needed)")]
    Truncated {
        /// Which part: "the header of section 3", "section \"vcpu0\"".
        what: String,
        /// Where that part starts.
        offset: u64,
        /// How many bytes it needed beyond the end.
        needed: u64,
    },
    /// Bytes after the last section.
    #[error("{0} bytes follow the last section")]
    TrailingBytes(u64),
    /// A section name that is empty, too long, or not printable ASCII.
    #[error("section {index} has an invalid name")]
    BadName {
        /// The section's position in the file.
        index: u32,
    },
    /// Two sections with one name.
    #[error("section \"{0}\" appears twice")]
    Duplicate(String),
    /// A section's body does not match its checksum.
    #[error("snapshot section \"{section}\" is corrupted (checksum mismatch)")]
    Checksum {
        /// The section.
        section: String,
    },
    /// A section the restore needs is not there.
    #[error("the snapshot has no section \"{section}\"")]
    Missing {
        /// The section.
        section: String,
    },
    /// A section of a version this build does not read.
    #[error(
        "snapshot section \"{section}\" is version {found}; this build reads version {supported}"
    )]
    ComponentVersion {
        /// The section.
        section: String,
        /// The file's version of it.
        found: u32,
        /// The version the reader asked for.
        supported: u32,
    },
    /// A section's body does not decode as the state it should hold.
    #[error("snapshot section \"{section}\" does not decode")]
    Decode {
        /// The section.
        section: String,
        /// The decoder's error.
        #[source]
        source: postcard::Error,
    },
    /// A section's body decoded with bytes left over.
    #[error("snapshot section \"{section}\" has {extra} bytes after its state")]
    Leftover {
        /// The section.
        section: String,
        /// How many.
        extra: usize,
    },
    /// A value could not be encoded.
    #[error("cannot encode snapshot section \"{section}\"")]
    Encode {
        /// The section.
        section: String,
        /// The encoder's error.
        #[source]
        source: postcard::Error,
    },
    /// A signing key too short to resist guessing.
    #[error("a snapshot key of {0} bytes; at least 32 random bytes are needed")]
    WeakKey(usize),
    /// The snapshot carries no signature, and a key was given to check one.
    #[error("the snapshot is not signed")]
    Unsigned,
    /// The signature does not match the key: the snapshot was changed, or signed with
    /// another key.
    #[error("the snapshot's signature does not match the key: it was changed, or signed with another key")]
    BadSignature,
    /// A signature section that is not the last, or not an HMAC-SHA256.
    #[error("the snapshot's signature section is malformed or not its last section")]
    SignaturePlacement,
    /// A name the builder refuses (see [`SnapshotError::BadName`]) or adds twice.
    #[error("cannot add section \"{0}\": its name is invalid or already taken")]
    Name(String),
}

/// A state struct that knows the version of its own layout: bump `VERSION` whenever
/// a field changes, so an old snapshot is refused by name and version instead of
/// decoding into the wrong fields.
pub trait Versioned: Serialize + DeserializeOwned {
    /// The layout's version.
    const VERSION: u32;
}

fn valid_name(name: &[u8]) -> bool {
    !name.is_empty() && name.len() <= MAX_NAME && name.iter().all(|b| b.is_ascii_graphic())
}

fn crc(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// Bytes of an HMAC-SHA256.
const MAC: usize = 32;

fn hmac(key: &[u8]) -> hmac::Hmac<sha2::Sha256> {
    use hmac::Mac;
    // HMAC takes keys of any length.
    hmac::Hmac::<sha2::Sha256>::new_from_slice(key).unwrap_or_else(|_| unreachable!())
}

fn mac(key: &[u8], bytes: &[u8]) -> [u8; MAC] {
    use hmac::Mac;
    let mut m = hmac(key);
    m.update(bytes);
    m.finalize().into_bytes().into()
}

/// Collects sections, then writes them as one snapshot.
#[derive(Debug, Default)]
pub struct SnapshotBuilder {
    sections: BTreeMap<String, (u32, Vec<u8>)>,
}

impl SnapshotBuilder {
    /// An empty snapshot.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add `value` as section `name` (printable ASCII, at most [`MAX_NAME`] bytes,
    /// unique) at `version`.
    pub fn add<T: Serialize>(
        &mut self,
        name: &str,
        version: u32,
        value: &T,
    ) -> Result<&mut Self, SnapshotError> {
        if !valid_name(name.as_bytes())
            || name == SIGNATURE_SECTION
            || self.sections.contains_key(name)
            || self.sections.len() >= MAX_SECTIONS as usize
        {
            return Err(SnapshotError::Name(name.to_owned()));
        }
        let body = postcard::to_allocvec(value).map_err(|source| SnapshotError::Encode {
            section: name.to_owned(),
            source,
        })?;
        self.sections.insert(name.to_owned(), (version, body));
        Ok(self)
    }

    /// Add `value` as section `name` at its type's [`Versioned::VERSION`].
    pub fn put<T: Versioned>(&mut self, name: &str, value: &T) -> Result<&mut Self, SnapshotError> {
        self.add(name, T::VERSION, value)
    }

    /// The snapshot's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.encode(None)
    }

    /// The snapshot's bytes, signed with `key` (at least [`MIN_KEY`] bytes).
    pub fn to_signed_bytes(&self, key: &[u8]) -> Result<Vec<u8>, SnapshotError> {
        if key.len() < MIN_KEY {
            return Err(SnapshotError::WeakKey(key.len()));
        }
        Ok(self.encode(Some(key)))
    }

    fn encode(&self, key: Option<&[u8]>) -> Vec<u8> {
        let section = |name: &str, body: usize| 1 + name.len() + 4 + 8 + 4 + body;
        let body: usize = self
            .sections
            .iter()
            .map(|(name, (_, b))| section(name, b.len()))
            .sum();
        let signature = key.map_or(0, |_| section(SIGNATURE_SECTION, MAC));
        let total = HEADER + body + signature;
        let count = self.sections.len() + usize::from(key.is_some());
        let mut out = Vec::with_capacity(total);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(count as u32).to_le_bytes());
        out.extend_from_slice(&(total as u64).to_le_bytes());
        let header_crc = crc(&out);
        out.extend_from_slice(&header_crc.to_le_bytes());
        let put = |out: &mut Vec<u8>, name: &str, version: u32, body: &[u8]| {
            out.push(name.len() as u8);
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&version.to_le_bytes());
            out.extend_from_slice(&(body.len() as u64).to_le_bytes());
            out.extend_from_slice(&crc(body).to_le_bytes());
            out.extend_from_slice(body);
        };
        for (name, (version, body)) in &self.sections {
            put(&mut out, name, *version, body);
        }
        if let Some(key) = key {
            let mac = mac(key, &out);
            put(&mut out, SIGNATURE_SECTION, 1, &mac);
        }
        out
    }

    /// Write the snapshot to `path`: into a temporary file beside it, synced, then
    /// renamed over `path`, so a crash leaves either the old file or the whole new one.
    /// Returns the bytes written.
    pub fn write_file(&self, path: &Path) -> Result<u64, SnapshotError> {
        write_bytes_file(&self.to_bytes(), path)
    }
}

/// Write `bytes` (a snapshot's) to `path` as [`SnapshotBuilder::write_file`] does:
/// through a temporary file beside it, synced, then renamed over `path`.
pub fn write_bytes_file(bytes: &[u8], path: &Path) -> Result<u64, SnapshotError> {
    let io = |what, source| SnapshotError::Io {
        what,
        path: path.display().to_string(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = std::path::PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp).map_err(|e| io("create", e))?;
    f.write_all(bytes).map_err(|e| io("write", e))?;
    f.sync_all().map_err(|e| io("sync", e))?;
    std::fs::rename(&tmp, path).map_err(|e| io("rename into place", e))?;
    Ok(bytes.len() as u64)
}

/// Write `bytes` (a snapshot's, from [`SnapshotBuilder::to_bytes`] or
/// [`SnapshotBuilder::to_signed_bytes`]) over the whole of `file`, then sync it.
/// Returns the bytes written.
pub fn write_bytes_into(bytes: &[u8], file: &mut std::fs::File) -> Result<u64, SnapshotError> {
    use std::io::{Seek, SeekFrom};
    let io = |what, source| SnapshotError::Io {
        what,
        path: "(an open descriptor)".into(),
        source,
    };
    file.set_len(0).map_err(|e| io("truncate", e))?;
    file.seek(SeekFrom::Start(0)).map_err(|e| io("seek", e))?;
    file.write_all(bytes).map_err(|e| io("write", e))?;
    file.sync_all().map_err(|e| io("sync", e))?;
    Ok(bytes.len() as u64)
}

impl SnapshotBuilder {
    /// Write the snapshot over the whole of `file` (already open: a VMM under a
    /// filter that forbids opening files writes into descriptors it opened before),
    /// then sync it. Returns the bytes written.
    pub fn write_into(&self, file: &mut std::fs::File) -> Result<u64, SnapshotError> {
        write_bytes_into(&self.to_bytes(), file)
    }
}

/// One section of a parsed snapshot.
#[derive(Debug, Clone)]
struct Section {
    version: u32,
    body: Range<usize>,
}

/// A parsed, verified snapshot: every checksum matched; sections decode on demand.
#[derive(Debug)]
pub struct Snapshot {
    bytes: Vec<u8>,
    sections: BTreeMap<String, Section>,
    /// Where the signature section begins, if the snapshot is signed.
    signed_at: Option<usize>,
}

/// Reads little-endian fields from a byte slice, naming what it reads when it runs out.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: impl FnOnce() -> String) -> Result<&'a [u8], SnapshotError> {
        let left = (self.bytes.len() - self.at) as u64;
        if n > left {
            return Err(SnapshotError::Truncated {
                what: what(),
                offset: self.at as u64,
                needed: n - left,
            });
        }
        let start = self.at;
        self.at += n as usize;
        Ok(&self.bytes[start..self.at])
    }
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

impl Snapshot {
    /// Parse and verify a snapshot held in memory.
    pub fn parse(bytes: Vec<u8>) -> Result<Self, SnapshotError> {
        let mut c = Cursor {
            bytes: &bytes,
            at: 0,
        };
        let header = c.take(HEADER as u64, || "the snapshot header".into())?;
        if header[..8] != MAGIC {
            return Err(SnapshotError::NotASnapshot);
        }
        if crc(&header[..HEADER - 4]) != le_u32(&header[HEADER - 4..]) {
            return Err(SnapshotError::HeaderChecksum);
        }
        let version = le_u32(&header[8..]);
        if version != FORMAT_VERSION {
            return Err(SnapshotError::FormatVersion {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let count = le_u32(&header[12..]);
        if count > MAX_SECTIONS {
            return Err(SnapshotError::TooManySections(count));
        }
        let total = le_u64(&header[16..]);
        if total != bytes.len() as u64 {
            return Err(SnapshotError::Length {
                expected: total,
                actual: bytes.len() as u64,
            });
        }
        let mut sections = BTreeMap::new();
        let mut signed_at = None;
        for index in 0..count {
            if signed_at.is_some() {
                // Sections after the signature are not covered by it.
                return Err(SnapshotError::SignaturePlacement);
            }
            let section_start = c.at;
            let what = || format!("the header of section {index}");
            let len = c.take(1, what)?[0];
            let name = c.take(u64::from(len), what)?;
            if !valid_name(name) {
                return Err(SnapshotError::BadName { index });
            }
            // Printable ASCII is UTF-8.
            let name = String::from_utf8_lossy(name).into_owned();
            let fixed = c.take(16, what)?;
            let (version, body_len, body_crc) =
                (le_u32(fixed), le_u64(&fixed[4..]), le_u32(&fixed[12..]));
            let start = c.at;
            let body = c.take(body_len, || format!("section \"{name}\""))?;
            if crc(body) != body_crc {
                return Err(SnapshotError::Checksum { section: name });
            }
            let section = Section {
                version,
                body: start..c.at,
            };
            if name == SIGNATURE_SECTION {
                if version != 1 || body.len() != MAC {
                    return Err(SnapshotError::SignaturePlacement);
                }
                signed_at = Some(section_start);
            }
            if sections.insert(name.clone(), section).is_some() {
                return Err(SnapshotError::Duplicate(name));
            }
        }
        let extra = (bytes.len() - c.at) as u64;
        if extra != 0 {
            return Err(SnapshotError::TrailingBytes(extra));
        }
        Ok(Snapshot {
            bytes,
            sections,
            signed_at,
        })
    }

    /// Whether the snapshot carries a signature (checked only by
    /// [`Snapshot::verify`]).
    pub fn is_signed(&self) -> bool {
        self.signed_at.is_some()
    }

    /// Check the snapshot's signature against `key`: an unsigned snapshot, or one whose
    /// bytes (any of them, header included) changed since it was signed, is refused.
    pub fn verify(&self, key: &[u8]) -> Result<(), SnapshotError> {
        use hmac::Mac;
        let at = self.signed_at.ok_or(SnapshotError::Unsigned)?;
        let section = self
            .sections
            .get(SIGNATURE_SECTION)
            .ok_or(SnapshotError::Unsigned)?;
        let mut m = hmac(key);
        m.update(&self.bytes[..at]);
        m.verify_slice(&self.bytes[section.body.clone()])
            .map_err(|_| SnapshotError::BadSignature)
    }

    /// Read, parse and verify the snapshot at `path` (at most [`MAX_FILE`] bytes).
    pub fn read_file(path: &Path) -> Result<Self, SnapshotError> {
        let f = std::fs::File::open(path).map_err(|source| SnapshotError::Io {
            what: "open",
            path: path.display().to_string(),
            source,
        })?;
        Self::read_from(f, &path.display().to_string())
    }

    /// Read, parse and verify a snapshot from `reader` (at most [`MAX_FILE`] bytes),
    /// called `name` in errors. The header is read and checked first, and then only
    /// as many bytes as it announces: a reader that never ends (a device, a pipe)
    /// costs no more than that.
    pub fn read_from(reader: impl std::io::Read, name: &str) -> Result<Self, SnapshotError> {
        use std::io::Read;
        let io = |what, source| SnapshotError::Io {
            what,
            path: name.to_owned(),
            source,
        };
        let mut reader = reader;
        let mut header = [0u8; HEADER];
        let mut got = 0;
        while got < HEADER {
            match reader.read(&mut header[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io("read", e)),
            }
        }
        if got < HEADER {
            return Err(SnapshotError::Truncated {
                what: "the snapshot header".into(),
                offset: 0,
                needed: (HEADER - got) as u64,
            });
        }
        if header[..8] != MAGIC {
            return Err(SnapshotError::NotASnapshot);
        }
        if crc(&header[..HEADER - 4]) != le_u32(&header[HEADER - 4..]) {
            return Err(SnapshotError::HeaderChecksum);
        }
        let total = le_u64(&header[16..]);
        if total > MAX_FILE || total < HEADER as u64 {
            return Err(io(
                "read",
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("its header announces {total} bytes (at most {MAX_FILE})"),
                ),
            ));
        }
        let mut bytes = header.to_vec();
        // One byte past the announced length shows trailing bytes; the buffer grows
        // only as bytes actually come.
        reader
            .take(total - HEADER as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| io("read", e))?;
        Self::parse(bytes)
    }

    /// The names of the sections, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.sections.keys().map(String::as_str)
    }

    /// Whether section `name` is there.
    pub fn contains(&self, name: &str) -> bool {
        self.sections.contains_key(name)
    }

    /// Section `name`'s version and undecoded body.
    pub fn raw(&self, name: &str) -> Result<(u32, &[u8]), SnapshotError> {
        let s = self
            .sections
            .get(name)
            .ok_or_else(|| SnapshotError::Missing {
                section: name.to_owned(),
            })?;
        Ok((s.version, &self.bytes[s.body.clone()]))
    }

    /// Decode section `name`, which must be at its type's [`Versioned::VERSION`].
    pub fn load<T: Versioned>(&self, name: &str) -> Result<T, SnapshotError> {
        self.get(name, T::VERSION)
    }

    /// Decode section `name`, which must be at `version`.
    pub fn get<T: DeserializeOwned>(&self, name: &str, version: u32) -> Result<T, SnapshotError> {
        let (found, body) = self.raw(name)?;
        if found != version {
            return Err(SnapshotError::ComponentVersion {
                section: name.to_owned(),
                found,
                supported: version,
            });
        }
        let (value, rest) =
            postcard::take_from_bytes(body).map_err(|source| SnapshotError::Decode {
                section: name.to_owned(),
                source,
            })?;
        if !rest.is_empty() {
            return Err(SnapshotError::Leftover {
                section: name.to_owned(),
                extra: rest.len(),
            });
        }
        Ok(value)
    }
}

#[cfg(test)]
mod tests;
