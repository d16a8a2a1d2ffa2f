//! blkif's wire format (`io/blkif.h`): requests, responses, segments, operation and
//! status codes. It depends on nothing but `core` and the ring's [`Entry`], so guests
//! compile the very same source for their front ends.

use crate::ring::Entry;

/// Read sectors into granted pages.
pub const OP_READ: u8 = 0;
/// Write sectors from granted pages.
pub const OP_WRITE: u8 = 1;
/// Write, then make everything durable.
pub const OP_WRITE_BARRIER: u8 = 2;
/// Make everything written so far durable.
pub const OP_FLUSH_DISKCACHE: u8 = 3;
/// Most segments in a direct request.
pub const MAX_SEGMENTS: usize = 11;
/// Sector size.
pub const SECTOR: u64 = 512;
/// Success.
pub const STATUS_OKAY: i16 = 0;
/// Failure.
pub const STATUS_ERROR: i16 = -1;
/// Unsupported operation.
pub const STATUS_EOPNOTSUPP: i16 = -2;

/// One segment of a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Segment {
    /// The granted page.
    pub gref: u32,
    /// First sector in the page (0..=7).
    pub first_sect: u8,
    /// Last sector in the page (first_sect..=7).
    pub last_sect: u8,
}

/// `blkif_request` (112 bytes on x86-64).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Request {
    /// `OP_*`.
    pub operation: u8,
    /// Segments used.
    pub nr_segments: u8,
    /// Virtual device handle.
    pub handle: u16,
    /// Echoed in the response.
    pub id: u64,
    /// First sector on the disk.
    pub sector_number: u64,
    /// The segments (the first `nr_segments` count).
    pub seg: [Segment; MAX_SEGMENTS],
}

impl Entry for Request {
    const SIZE: usize = 112;
    fn encode(&self, out: &mut [u8]) {
        out.fill(0);
        out[0] = self.operation;
        out[1] = self.nr_segments;
        out[2..4].copy_from_slice(&self.handle.to_le_bytes());
        out[8..16].copy_from_slice(&self.id.to_le_bytes());
        out[16..24].copy_from_slice(&self.sector_number.to_le_bytes());
        for (i, s) in self.seg.iter().enumerate() {
            let at = 24 + 8 * i;
            out[at..at + 4].copy_from_slice(&s.gref.to_le_bytes());
            out[at + 4] = s.first_sect;
            out[at + 5] = s.last_sect;
        }
    }
    fn decode(b: &[u8]) -> Self {
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]));
        let mut seg = [Segment::default(); MAX_SEGMENTS];
        for (i, s) in seg.iter_mut().enumerate() {
            let at = 24 + 8 * i;
            *s = Segment {
                gref: u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or([0; 4])),
                first_sect: b[at + 4],
                last_sect: b[at + 5],
            };
        }
        Request {
            operation: b[0],
            nr_segments: b[1],
            handle: u16::from_le_bytes([b[2], b[3]]),
            id: u64_at(8),
            sector_number: u64_at(16),
            seg,
        }
    }
}

/// `blkif_response` (16 bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Response {
    /// The request's id.
    pub id: u64,
    /// The request's operation.
    pub operation: u8,
    /// `STATUS_*`.
    pub status: i16,
}

impl Entry for Response {
    const SIZE: usize = 16;
    fn encode(&self, out: &mut [u8]) {
        out.fill(0);
        out[..8].copy_from_slice(&self.id.to_le_bytes());
        out[8] = self.operation;
        out[10..12].copy_from_slice(&self.status.to_le_bytes());
    }
    fn decode(b: &[u8]) -> Self {
        Response {
            id: u64::from_le_bytes(b[..8].try_into().unwrap_or([0; 8])),
            operation: b[8],
            status: i16::from_le_bytes([b[10], b[11]]),
        }
    }
}
