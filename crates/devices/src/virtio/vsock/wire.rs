//! virtio-vsock's wire format (virtio 1.2 §5.10.6; Linux's
//! `include/uapi/linux/virtio_vsock.h`): the 44-byte packet header, its operations and
//! flags, and the checks a header from the guest passes before anything acts on it.

use vm_memory::ByteValued;

/// The host's context id (`VMADDR_CID_HOST`).
pub const HOST_CID: u64 = 2;
/// Context ids a guest may not have: 0 and 1 are reserved, 2 is the host, and
/// `u32::MAX` is `VMADDR_CID_ANY` (Linux's CIDs are 32-bit).
pub fn valid_guest_cid(cid: u64) -> bool {
    (3..u64::from(u32::MAX)).contains(&cid)
}

/// `VIRTIO_VSOCK_TYPE_STREAM`: the only type served (no SEQPACKET feature).
pub const TYPE_STREAM: u16 = 1;

/// `VIRTIO_VSOCK_OP_*`.
pub mod op {
    /// Not an operation.
    pub const INVALID: u16 = 0;
    /// Connect.
    pub const REQUEST: u16 = 1;
    /// Accept.
    pub const RESPONSE: u16 = 2;
    /// Refuse or tear down.
    pub const RST: u16 = 3;
    /// No more data one way or both (flags).
    pub const SHUTDOWN: u16 = 4;
    /// Data.
    pub const RW: u16 = 5;
    /// The sender's credit.
    pub const CREDIT_UPDATE: u16 = 6;
    /// Asks for the peer's credit.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// `VIRTIO_VSOCK_SHUTDOWN_RCV`: the sender will receive no more.
pub const SHUTDOWN_RCV: u32 = 1;
/// `VIRTIO_VSOCK_SHUTDOWN_SEND`: the sender will send no more.
pub const SHUTDOWN_SEND: u32 = 2;

/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`: every connection is gone (after a restore
/// or a migration); the guest's CID is read again.
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// `struct virtio_vsock_hdr`, little-endian and packed.
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PacketHeader {
    /// Sender's context id.
    pub src_cid: u64,
    /// Receiver's context id.
    pub dst_cid: u64,
    /// Sender's port.
    pub src_port: u32,
    /// Receiver's port.
    pub dst_port: u32,
    /// Payload bytes after the header (RW only).
    pub len: u32,
    /// Socket type.
    pub kind: u16,
    /// Operation.
    pub op: u16,
    /// Operation flags (SHUTDOWN's).
    pub flags: u32,
    /// The sender's receive buffer for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has taken out of that buffer, in all.
    pub fwd_cnt: u32,
}

// SAFETY: plain little-endian integers, packed, no padding; any bit pattern is a
// valid value.
unsafe impl ByteValued for PacketHeader {}

/// The header's size on the wire.
pub const HEADER_SIZE: usize = std::mem::size_of::<PacketHeader>();

/// Why a header from the guest is refused (answered with RST where a connection
/// can be named, dropped otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderError {
    /// Not the guest's own context id.
    #[error("source context id {0} is not the guest's")]
    SourceCid(u64),
    /// Not addressed to the host.
    #[error("destination context id {0} is not the host's")]
    DestinationCid(u64),
    /// Not a stream.
    #[error("socket type {0} (only streams, type 1)")]
    Type(u16),
    /// An operation that does not exist.
    #[error("operation {0}")]
    Operation(u16),
    /// A payload on an operation that has none, or one longer than the chain holds.
    #[error("{op} with a payload of {len} bytes (the chain holds {room})")]
    Length {
        /// The operation.
        op: u16,
        /// The header's length.
        len: u32,
        /// The bytes after the header in the chain.
        room: usize,
    },
    /// Shutdown flags other than RCV and SEND.
    #[error("shutdown flags {0:#x}")]
    Flags(u32),
}

impl PacketHeader {
    /// The header in the first [`HEADER_SIZE`] bytes of `bytes`, if there are as
    /// many.
    pub fn parse(bytes: &[u8]) -> Option<PacketHeader> {
        let mut h = PacketHeader::default();
        h.as_mut_slice().copy_from_slice(bytes.get(..HEADER_SIZE)?);
        Some(h)
    }

    /// Check a header the guest sent on the tx queue, with `room` payload bytes
    /// following it in its chain, from the guest whose context id is `guest_cid`.
    pub fn check_from_guest(&self, guest_cid: u64, room: usize) -> Result<(), HeaderError> {
        let (src_cid, dst_cid, kind, op, len, flags) = (
            self.src_cid,
            self.dst_cid,
            self.kind,
            self.op,
            self.len,
            self.flags,
        );
        if src_cid != guest_cid {
            return Err(HeaderError::SourceCid(src_cid));
        }
        if dst_cid != HOST_CID {
            return Err(HeaderError::DestinationCid(dst_cid));
        }
        if kind != TYPE_STREAM {
            return Err(HeaderError::Type(kind));
        }
        if !(op::REQUEST..=op::CREDIT_REQUEST).contains(&op) {
            return Err(HeaderError::Operation(op));
        }
        let carries = op == op::RW;
        if (!carries && len != 0) || (carries && len as usize > room) {
            return Err(HeaderError::Length { op, len, room });
        }
        if op == op::SHUTDOWN && flags & !(SHUTDOWN_RCV | SHUTDOWN_SEND) != 0 {
            return Err(HeaderError::Flags(flags));
        }
        Ok(())
    }

    /// A header from the host (`host_port`) to the guest (`guest_cid`,
    /// `guest_port`), a stream packet of operation `op`; the credit fields are the
    /// connection's to fill.
    pub fn to_guest(guest_cid: u64, host_port: u32, guest_port: u32, op: u16) -> Self {
        PacketHeader {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: host_port,
            dst_port: guest_port,
            kind: TYPE_STREAM,
            op,
            ..PacketHeader::default()
        }
    }

    /// The reset that answers this packet from the guest (its ports swapped).
    pub fn reset_reply(&self) -> Self {
        PacketHeader::to_guest(self.src_cid, self.dst_port, self.src_port, op::RST)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_guest(op: u16) -> PacketHeader {
        PacketHeader {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1024,
            dst_port: 52,
            kind: TYPE_STREAM,
            op,
            ..PacketHeader::default()
        }
    }

    #[test]
    fn the_header_is_linuxs_44_bytes() {
        assert_eq!(HEADER_SIZE, 44);
        let mut h = from_guest(op::RW);
        h.len = 0x0102_0304;
        let bytes = h.as_slice();
        assert_eq!(PacketHeader::parse(bytes), Some(h));
        assert_eq!(PacketHeader::parse(&bytes[..43]), None);
        assert_eq!(&bytes[..8], &3u64.to_le_bytes());
        assert_eq!(&bytes[24..28], &0x0102_0304u32.to_le_bytes(), "len at 24");
        assert_eq!(&bytes[28..30], &1u16.to_le_bytes(), "type at 28");
        assert_eq!(&bytes[30..32], &op::RW.to_le_bytes(), "op at 30");
    }

    #[test]
    fn a_guest_header_is_checked_field_by_field() {
        assert_eq!(from_guest(op::REQUEST).check_from_guest(3, 0), Ok(()));
        let mut rw = from_guest(op::RW);
        rw.len = 100;
        assert_eq!(rw.check_from_guest(3, 100), Ok(()));
        assert!(matches!(
            rw.check_from_guest(3, 99),
            Err(HeaderError::Length { .. })
        ));
        assert_eq!(rw.check_from_guest(4, 100), Err(HeaderError::SourceCid(3)));
        let mut to_other = from_guest(op::REQUEST);
        to_other.dst_cid = 5;
        assert_eq!(
            to_other.check_from_guest(3, 0),
            Err(HeaderError::DestinationCid(5))
        );
        let mut dgram = from_guest(op::REQUEST);
        dgram.kind = 2;
        assert_eq!(dgram.check_from_guest(3, 0), Err(HeaderError::Type(2)));
        for bad in [op::INVALID, 8, 0xffff] {
            assert_eq!(
                from_guest(bad).check_from_guest(3, 0),
                Err(HeaderError::Operation(bad))
            );
        }
        let mut request_with_data = from_guest(op::REQUEST);
        request_with_data.len = 1;
        assert!(request_with_data.check_from_guest(3, 10).is_err());
        let mut shutdown = from_guest(op::SHUTDOWN);
        shutdown.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
        assert_eq!(shutdown.check_from_guest(3, 0), Ok(()));
        shutdown.flags = 4;
        assert_eq!(shutdown.check_from_guest(3, 0), Err(HeaderError::Flags(4)));
    }

    #[test]
    fn a_reset_answers_with_the_ports_swapped() {
        let r = from_guest(op::REQUEST).reset_reply();
        let (src, dst, sp, dp, o) = (r.src_cid, r.dst_cid, r.src_port, r.dst_port, r.op);
        assert_eq!((src, dst, sp, dp, o), (HOST_CID, 3, 52, 1024, op::RST));
    }

    #[test]
    fn guest_cids_exclude_the_reserved_ones() {
        for cid in [0, 1, 2, u64::from(u32::MAX), 1 << 40] {
            assert!(!valid_guest_cid(cid), "{cid}");
        }
        assert!(valid_guest_cid(3) && valid_guest_cid(u64::from(u32::MAX) - 1));
    }
}
