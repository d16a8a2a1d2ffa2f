//! One vsock stream between a guest port and a host port: its state, the credit both
//! ways (virtio 1.2 §5.10.6.3), and the guest's bytes the host side has not taken yet.
//!
//! Plain code, no I/O: the device feeds it the guest's packets and what the host side
//! took, and asks it what to tell the guest. The guest may have only as many bytes in
//! flight as the host advertised (`buf_alloc` less what it has not forwarded), so the
//! bytes buffered here never pass `buf_alloc`; a guest that sends more, or whose
//! counters go backwards, has broken the protocol and the connection is reset.
//!
//! ```
//! use vmcraft_devices::virtio::vsock::conn::{Connection, Received};
//! use vmcraft_devices::virtio::vsock::wire::{op, PacketHeader};
//! // The guest connected to host port 52 from its port 1024.
//! let mut c = Connection::accepted(1024, 52, 64 * 1024);
//! let rw = PacketHeader {
//!     src_cid: 3, dst_cid: 2, src_port: 1024, dst_port: 52, len: 5, kind: 1,
//!     op: op::RW, buf_alloc: 4096, ..PacketHeader::default()
//! };
//! assert_eq!(c.receive(&rw, b"hello"), Ok(Received::Data));
//! assert_eq!(c.pending(), 5);
//! c.forwarded(5); // the host side took them
//! assert_eq!(c.pending(), 0);
//! ```

use std::collections::VecDeque;

use super::wire::{op, PacketHeader, SHUTDOWN_RCV, SHUTDOWN_SEND};

/// Where a connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// The host asked the guest to connect (REQUEST sent); no answer yet.
    Requested,
    /// Both ends may send (unless shut down).
    Established,
}

/// What a packet from the guest asks of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// Payload bytes were taken into the connection's buffer: forward them.
    Data,
    /// The guest accepted the host's request: the connection is established.
    Accepted,
    /// The guest will send no more (`SHUTDOWN_SEND`) or receive no more
    /// (`SHUTDOWN_RCV`), as the flags say, in all so far. Both: the connection ends.
    Shutdown(u32),
    /// The guest reset the connection: drop it.
    Reset,
    /// The guest asked for the host's credit: send a CREDIT_UPDATE.
    CreditRequested,
    /// Nothing to do beyond the credit the header carried.
    Nothing,
}

/// The guest broke the protocol on this connection: reset it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Violation {
    /// More payload than the host's free buffer.
    #[error("{len} bytes sent with {free} bytes of credit")]
    Overrun {
        /// The payload.
        len: u32,
        /// The credit the guest had.
        free: u32,
    },
    /// Its `fwd_cnt` went backwards, or past the bytes the host sent.
    #[error("fwd_cnt {got} after {was}, with {sent} bytes sent in all")]
    Counter {
        /// The new value.
        got: u32,
        /// The one before.
        was: u32,
        /// Bytes the host sent.
        sent: u32,
    },
    /// An operation that makes no sense in the connection's state (a RESPONSE to
    /// nothing, data before the answer, a REQUEST on an existing connection, data
    /// after the guest said it would send no more).
    #[error("operation {op} in state {state:?}")]
    State {
        /// The operation.
        op: u16,
        /// The state.
        state: State,
    },
}

/// One stream. See the [module documentation](self).
#[derive(Debug, Clone)]
pub struct Connection {
    guest_port: u32,
    host_port: u32,
    state: State,
    /// SHUTDOWN flags the guest has sent, in all.
    guest_shut: u32,
    /// The host's receive buffer, advertised.
    buf_alloc: u32,
    /// Bytes received from the guest, in all (wrapping, as the counters are).
    rx_cnt: u32,
    /// Of those, the bytes the host side has taken.
    fwd_cnt: u32,
    /// The `fwd_cnt` last told the guest.
    fwd_cnt_told: u32,
    /// The guest's receive buffer and what it has consumed of the host's bytes.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest, in all.
    tx_cnt: u32,
    /// The guest's bytes not taken by the host side yet (`rx_cnt - fwd_cnt` of them).
    pending: VecDeque<u8>,
}

impl Connection {
    fn new(guest_port: u32, host_port: u32, buf_alloc: u32, state: State) -> Self {
        Connection {
            guest_port,
            host_port,
            state,
            guest_shut: 0,
            buf_alloc,
            rx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_told: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            pending: VecDeque::new(),
        }
    }

    /// A connection the guest asked for (its REQUEST from `guest_port` to
    /// `host_port`), accepted by the host side: established once the RESPONSE goes
    /// out. The host buffers at most `buf_alloc` of the guest's bytes.
    pub fn accepted(guest_port: u32, host_port: u32, buf_alloc: u32) -> Self {
        Connection::new(guest_port, host_port, buf_alloc, State::Established)
    }

    /// A connection the host asks the guest for (a REQUEST goes out), until the guest
    /// answers.
    pub fn requested(guest_port: u32, host_port: u32, buf_alloc: u32) -> Self {
        Connection::new(guest_port, host_port, buf_alloc, State::Requested)
    }

    /// The guest's port.
    pub fn guest_port(&self) -> u32 {
        self.guest_port
    }

    /// The host's port.
    pub fn host_port(&self) -> u32 {
        self.host_port
    }

    /// Where it is.
    pub fn state(&self) -> State {
        self.state
    }

    /// SHUTDOWN flags the guest has sent so far.
    pub fn guest_shutdown(&self) -> u32 {
        self.guest_shut
    }

    /// The guest's bytes waiting for the host side.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// The guest's waiting bytes, as two slices (the buffer is a ring).
    pub fn pending_slices(&self) -> (&[u8], &[u8]) {
        self.pending.as_slices()
    }

    /// Bytes the host may send the guest now: its buffer less what it has not
    /// consumed of the host's bytes.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Bytes the guest may send the host now.
    pub fn credit(&self) -> u32 {
        self.buf_alloc
            .saturating_sub(self.rx_cnt.wrapping_sub(self.fwd_cnt))
    }

    /// Whether the guest should hear of the room the host has made: it has taken
    /// bytes since it last told the guest, and the credit the guest believes it has
    /// is under a quarter of the buffer (it may be waiting for more). Every packet the
    /// host sends carries the credit too, so a busy connection needs no updates.
    pub fn owes_credit_update(&self) -> bool {
        let freed = self.fwd_cnt.wrapping_sub(self.fwd_cnt_told);
        let believed = self
            .buf_alloc
            .saturating_sub(self.rx_cnt.wrapping_sub(self.fwd_cnt_told));
        freed > 0 && believed < self.buf_alloc / 4
    }

    /// A packet from the guest on this connection (its header checked with
    /// [`PacketHeader::check_from_guest`], `payload` the `len` bytes that follow).
    pub fn receive(&mut self, h: &PacketHeader, payload: &[u8]) -> Result<Received, Violation> {
        let (hop, len) = (h.op, h.len);
        self.take_peer_credit(h)?;
        let wrong = Violation::State {
            op: hop,
            state: self.state,
        };
        match (hop, self.state) {
            (op::RST, _) => Ok(Received::Reset),
            (op::RESPONSE, State::Requested) => {
                self.state = State::Established;
                Ok(Received::Accepted)
            }
            (op::RESPONSE | op::REQUEST, _) | (_, State::Requested) => Err(wrong),
            (op::RW, State::Established) => {
                if self.guest_shut & SHUTDOWN_SEND != 0 {
                    return Err(wrong);
                }
                let free = self.credit();
                if len > free {
                    return Err(Violation::Overrun { len, free });
                }
                self.rx_cnt = self.rx_cnt.wrapping_add(len);
                self.pending.extend(&payload[..len as usize]);
                Ok(Received::Data)
            }
            (op::SHUTDOWN, State::Established) => {
                self.guest_shut |= h.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                Ok(Received::Shutdown(self.guest_shut))
            }
            (op::CREDIT_REQUEST, State::Established) => Ok(Received::CreditRequested),
            (op::CREDIT_UPDATE, State::Established) => Ok(Received::Nothing),
            _ => Err(wrong),
        }
    }

    /// The guest's credit fields of `h`: its buffer may change, its `fwd_cnt` only
    /// grows, and never past the bytes sent to it.
    fn take_peer_credit(&mut self, h: &PacketHeader) -> Result<(), Violation> {
        let (buf_alloc, fwd_cnt) = (h.buf_alloc, h.fwd_cnt);
        let before = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        let after = self.tx_cnt.wrapping_sub(fwd_cnt);
        if after > before {
            return Err(Violation::Counter {
                got: fwd_cnt,
                was: self.peer_fwd_cnt,
                sent: self.tx_cnt,
            });
        }
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = fwd_cnt;
        Ok(())
    }

    /// The host side took `n` of the pending bytes (the first `n`).
    pub fn forwarded(&mut self, n: usize) {
        let n = n.min(self.pending.len());
        self.pending.drain(..n);
        self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
    }

    /// `n` bytes went to the guest (at most [`Connection::peer_credit`]).
    pub fn sent(&mut self, n: u32) {
        debug_assert!(n <= self.peer_credit());
        self.tx_cnt = self.tx_cnt.wrapping_add(n);
    }

    /// A header from the host to the guest on this connection, with the host's
    /// credit in it (which the guest now knows).
    pub fn header(&mut self, guest_cid: u64, operation: u16) -> PacketHeader {
        let mut h = PacketHeader::to_guest(guest_cid, self.host_port, self.guest_port, operation);
        h.buf_alloc = self.buf_alloc;
        h.fwd_cnt = self.fwd_cnt;
        self.fwd_cnt_told = self.fwd_cnt;
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::vsock::wire::HOST_CID;

    const GUEST: u64 = 3;

    /// A packet the guest sends on connection (guest port 1024, host port 52).
    fn from_guest(operation: u16, len: u32, buf_alloc: u32, fwd_cnt: u32) -> PacketHeader {
        PacketHeader {
            src_cid: GUEST,
            dst_cid: HOST_CID,
            src_port: 1024,
            dst_port: 52,
            len,
            kind: 1,
            op: operation,
            flags: 0,
            buf_alloc,
            fwd_cnt,
        }
    }

    #[test]
    fn the_guest_sends_only_what_the_host_advertised_and_the_buffer_stays_bounded() {
        let mut c = Connection::accepted(1024, 52, 16);
        assert_eq!(c.credit(), 16);
        let data = [7u8; 16];
        assert_eq!(
            c.receive(&from_guest(op::RW, 10, 0, 0), &data[..10]),
            Ok(Received::Data)
        );
        assert_eq!((c.pending(), c.credit()), (10, 6));
        assert_eq!(
            c.receive(&from_guest(op::RW, 7, 0, 0), &data[..7]),
            Err(Violation::Overrun { len: 7, free: 6 })
        );
        assert_eq!(c.pending(), 10, "nothing of an overrun is kept");
        c.forwarded(4);
        assert_eq!((c.pending(), c.credit()), (6, 10));
        assert!(!c.owes_credit_update(), "the guest believes it has 6 of 16");
        assert_eq!(
            c.receive(&from_guest(op::RW, 5, 0, 0), &data[..5]),
            Ok(Received::Data)
        );
        c.forwarded(1);
        assert!(c.owes_credit_update(), "the guest believes it has 1 of 16");
        let h = c.header(GUEST, op::CREDIT_UPDATE);
        let (b, f) = (h.buf_alloc, h.fwd_cnt);
        assert_eq!((b, f), (16, 5));
        assert!(!c.owes_credit_update());
        assert_eq!(
            c.receive(&from_guest(op::RW, 5, 0, 0), &data[..5]),
            Ok(Received::Data)
        );
        assert_eq!(c.pending(), 15);
        assert_eq!(c.credit(), 1);
    }

    #[test]
    fn the_host_sends_only_what_the_guest_advertised() {
        let mut c = Connection::accepted(1024, 52, 16);
        assert_eq!(c.peer_credit(), 0, "nothing known of the guest yet");
        c.receive(&from_guest(op::CREDIT_UPDATE, 0, 100, 0), &[])
            .unwrap();
        assert_eq!(c.peer_credit(), 100);
        c.sent(60);
        assert_eq!(c.peer_credit(), 40);
        // The guest consumed 50 of them.
        c.receive(&from_guest(op::CREDIT_UPDATE, 0, 100, 50), &[])
            .unwrap();
        assert_eq!(c.peer_credit(), 90);
        // A smaller buffer than in flight: no credit, never a negative one.
        c.receive(&from_guest(op::CREDIT_UPDATE, 0, 5, 50), &[])
            .unwrap();
        assert_eq!(c.peer_credit(), 0);
    }

    #[test]
    fn counters_that_go_backwards_or_past_what_was_sent_are_a_violation() {
        let mut c = Connection::accepted(1024, 52, 16);
        c.receive(&from_guest(op::CREDIT_UPDATE, 0, 100, 0), &[])
            .unwrap();
        c.sent(30);
        c.receive(&from_guest(op::CREDIT_UPDATE, 0, 100, 20), &[])
            .unwrap();
        assert!(matches!(
            c.receive(&from_guest(op::CREDIT_UPDATE, 0, 100, 10), &[]),
            Err(Violation::Counter { got: 10, .. })
        ));
        assert!(matches!(
            c.receive(&from_guest(op::CREDIT_UPDATE, 0, 100, 31), &[]),
            Err(Violation::Counter { got: 31, .. })
        ));
    }

    #[test]
    fn counters_wrap_as_the_guests_do() {
        let mut c = Connection::accepted(1024, 52, 16);
        c.tx_cnt = u32::MAX - 5;
        c.peer_fwd_cnt = u32::MAX - 5;
        c.receive(&from_guest(op::CREDIT_UPDATE, 0, 100, u32::MAX - 5), &[])
            .unwrap();
        c.sent(20);
        assert_eq!(c.peer_credit(), 80);
        c.receive(&from_guest(op::CREDIT_UPDATE, 0, 100, 14), &[])
            .unwrap();
        assert_eq!(c.peer_credit(), 100, "all 20 consumed across the wrap");
        c.rx_cnt = u32::MAX - 2;
        c.fwd_cnt = u32::MAX - 2;
        c.receive(&from_guest(op::RW, 8, 100, 14), &[1; 8]).unwrap();
        assert_eq!((c.pending(), c.credit()), (8, 8));
        c.forwarded(8);
        assert_eq!(c.credit(), 16);
    }

    #[test]
    fn the_states_take_only_their_operations() {
        let mut asked = Connection::requested(1024, 52, 16);
        assert!(matches!(
            asked.receive(&from_guest(op::RW, 1, 0, 0), &[1]),
            Err(Violation::State { .. })
        ));
        assert_eq!(
            asked.receive(&from_guest(op::RESPONSE, 0, 64, 0), &[]),
            Ok(Received::Accepted)
        );
        assert_eq!(asked.state(), State::Established);
        assert_eq!(asked.peer_credit(), 64);
        assert!(asked
            .receive(&from_guest(op::RESPONSE, 0, 64, 0), &[])
            .is_err());
        assert!(asked
            .receive(&from_guest(op::REQUEST, 0, 64, 0), &[])
            .is_err());
        assert_eq!(
            asked.receive(&from_guest(op::CREDIT_REQUEST, 0, 64, 0), &[]),
            Ok(Received::CreditRequested)
        );
        let mut shut = from_guest(op::SHUTDOWN, 0, 64, 0);
        shut.flags = SHUTDOWN_SEND;
        assert_eq!(
            asked.receive(&shut, &[]),
            Ok(Received::Shutdown(SHUTDOWN_SEND))
        );
        assert!(
            asked.receive(&from_guest(op::RW, 1, 64, 0), &[1]).is_err(),
            "data after the guest said it sends no more"
        );
        shut.flags = SHUTDOWN_RCV;
        assert_eq!(
            asked.receive(&shut, &[]),
            Ok(Received::Shutdown(SHUTDOWN_RCV | SHUTDOWN_SEND))
        );
        assert_eq!(
            asked.receive(&from_guest(op::RST, 0, 64, 0), &[]),
            Ok(Received::Reset)
        );
    }
}
