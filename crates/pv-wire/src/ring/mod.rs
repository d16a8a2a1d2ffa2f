//! Shared request/response rings, layout-compatible with Xen's `io/ring.h`.
//!
//! The shared page starts with a 64-byte header, `req_prod, req_event, rsp_prod,
//! rsp_event` (free-running `u32` indices; slot = index & (entries - 1)) and padding,
//! followed by the entries: `max(size of request, size of response)` bytes each, as
//! many as fit rounded down to a power of two. The front end keeps `req_prod_pvt` and
//! `rsp_cons` privately, the back end `rsp_prod_pvt` and `req_cons`.
//!
//! Notification suppression is ring.h's: a producer publishes its index, issues a
//! full barrier and notifies only if `new - event < new - old` (wrapping); a consumer
//! about to sleep sets `event = cons + 1`, issues a full barrier and checks again.
//!
//! The back end never trusts the shared page: it copies each request out once
//! before decoding it (so the guest cannot change it between check and use) and
//! rejects a producer index that claims more unconsumed entries than the ring holds.
//! The front end checks the back end the same way.
//!
//! A guest maps its ring page and reaches it through [`RawRingMemory`]; the host
//! side reaches the same page through guest memory (`vmcraft-pv-hypercall`'s
//! `GuestRingMemory`). Both ends below share one page:
//!
//! ```
//! use vmcraft_pv_wire::ring::{BackRing, Entry, FrontRing, RawRingMemory};
//!
//! #[derive(Debug, Clone, Copy, PartialEq)]
//! struct Ping(u64);
//! impl Entry for Ping {
//!     const SIZE: usize = 8;
//!     fn encode(&self, out: &mut [u8]) { out[..8].copy_from_slice(&self.0.to_le_bytes()) }
//!     fn decode(b: &[u8]) -> Self { Ping(u64::from_le_bytes(b[..8].try_into().unwrap())) }
//! }
//!
//! #[repr(C, align(4096))]
//! struct Page([u8; 4096]);
//! let mut page = Page([0; 4096]);
//! // SAFETY: the page is 4096-aligned, 4096 bytes, and outlives both ends.
//! let shared = unsafe { RawRingMemory::new(page.0.as_mut_ptr(), 4096) };
//! let mut front = FrontRing::<_, Ping, Ping>::init(shared).unwrap();
//! assert_eq!(front.entries(), 256); // (4096 - 64) / 8 = 504, rounded down
//! let mut back = BackRing::<_, Ping, Ping>::attach(shared).unwrap();
//! front.push_request(&Ping(7)).unwrap();
//! assert!(front.publish_requests()); // the back end asked to be told
//! let req = back.pop_request().unwrap().unwrap();
//! back.push_response(&Ping(req.0 * 6)).unwrap();
//! back.publish_responses();
//! assert_eq!(front.pop_response().unwrap(), Some(Ping(42)));
//! ```

use core::marker::PhantomData;
use core::sync::atomic::{fence, Ordering};

/// Bytes before the first entry.
pub const HEADER_SIZE: usize = 64;
/// The largest entry a ring may hold (requests are copied out through a buffer of
/// this size).
pub const MAX_ENTRY_SIZE: usize = 512;

/// Offset of `req_prod` in the header: the front end's published request index.
pub const REQ_PROD: usize = 0;
/// Offset of `req_event`: the request index at which the back end wants a
/// notification.
pub const REQ_EVENT: usize = 4;
/// Offset of `rsp_prod`: the back end's published response index.
pub const RSP_PROD: usize = 8;
/// Offset of `rsp_event`: the response index at which the front end wants a
/// notification.
pub const RSP_EVENT: usize = 12;

/// The memory a ring lives in: guest memory, a host mapping, or a raw page.
pub trait RingMemory {
    /// Size in bytes.
    fn size(&self) -> usize;
    /// Load the `u32` at `offset` (4-aligned) with acquire ordering.
    fn load_u32(&self, offset: usize) -> u32;
    /// Store `value` at `offset` (4-aligned) with release ordering.
    fn store_u32(&self, offset: usize, value: u32);
    /// Copy bytes out.
    fn read(&self, offset: usize, buf: &mut [u8]);
    /// Copy bytes in.
    fn write(&self, offset: usize, data: &[u8]);
    /// A full barrier (ring.h's `mb()`), between publishing an index and reading the
    /// other side's event index.
    fn full_fence(&self) {
        fence(Ordering::SeqCst);
    }
}

/// A request or response: its wire form is `SIZE` bytes.
pub trait Entry: Sized {
    /// Bytes on the ring.
    const SIZE: usize;
    /// Write the wire form into `out` (`SIZE` bytes).
    fn encode(&self, out: &mut [u8]);
    /// Read the wire form from `bytes` (`SIZE` bytes, a private copy).
    fn decode(bytes: &[u8]) -> Self;
}

/// Errors from a ring.
///
/// Display and Error are written out rather than derived: this module depends on
/// nothing but `core`, so guests compile the very same source (see the guest kit's
/// Rust guests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RingError {
    /// The memory cannot hold the header and one entry, or an entry is too large.
    BadLayout {
        /// Bytes available.
        size: usize,
        /// Bytes per entry.
        entry_size: usize,
    },
    /// No free slot for a request.
    Full,
    /// The other side's producer index claims more unconsumed entries than the ring
    /// holds.
    ProducerOverflow {
        /// Entries claimed.
        claimed: u32,
        /// Ring size.
        entries: u32,
    },
    /// A response with no consumed request to answer.
    NoRequestToAnswer,
}

impl core::fmt::Display for RingError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            RingError::BadLayout { size, entry_size } => write!(
                f,
                "a {size}-byte page cannot hold a ring of {entry_size}-byte entries"
            ),
            RingError::Full => write!(f, "the ring is full"),
            RingError::ProducerOverflow { claimed, entries } => write!(
                f,
                "the producer claims {claimed} unconsumed entries in a ring of {entries}"
            ),
            RingError::NoRequestToAnswer => write!(f, "more responses than requests"),
        }
    }
}

impl core::error::Error for RingError {}

/// Entry count and size of a ring in a given amount of memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingLayout {
    /// Entries (a power of two).
    pub entries: u32,
    /// Bytes per entry.
    pub entry_size: usize,
}

impl RingLayout {
    /// The layout ring.h gives requests `Req` and responses `Rsp` in `bytes`.
    pub fn new<Req: Entry, Rsp: Entry>(bytes: usize) -> Result<Self, RingError> {
        let entry_size = entry_size::<Req, Rsp>();
        let bad = RingError::BadLayout {
            size: bytes,
            entry_size,
        };
        if entry_size == 0 || entry_size > MAX_ENTRY_SIZE || bytes <= HEADER_SIZE {
            return Err(bad);
        }
        let fit = (bytes - HEADER_SIZE) / entry_size;
        if fit == 0 {
            return Err(bad);
        }
        let fit = u32::try_from(fit).unwrap_or(u32::MAX);
        // Round down to a power of two.
        let entries = 1u32 << (31 - fit.leading_zeros());
        Ok(RingLayout {
            entries,
            entry_size,
        })
    }

    /// Where entry `index` is, for entries of `entry_size` bytes (the callers pass a
    /// constant, so the multiply is a shift or a constant).
    #[inline]
    fn offset(&self, index: u32, entry_size: usize) -> usize {
        HEADER_SIZE + (index & (self.entries - 1)) as usize * entry_size
    }
}

/// The bytes of one ring slot: the larger of the request and the response.
const fn entry_size<Req: Entry, Rsp: Entry>() -> usize {
    if Req::SIZE > Rsp::SIZE {
        Req::SIZE
    } else {
        Rsp::SIZE
    }
}

/// Whether a producer that moved its index from `old` to `new` must notify a
/// consumer that asked to hear at `event` (ring.h's check, wrapping).
#[inline]
pub fn need_notify(old: u32, new: u32, event: u32) -> bool {
    new.wrapping_sub(event) < new.wrapping_sub(old)
}

#[inline]
fn unconsumed(prod: u32, cons: u32, entries: u32) -> Result<u32, RingError> {
    let claimed = prod.wrapping_sub(cons);
    if claimed > entries {
        return Err(RingError::ProducerOverflow { claimed, entries });
    }
    Ok(claimed)
}

/// Run `f` on a zeroed scratch buffer of exactly `len` bytes (at most
/// [`MAX_ENTRY_SIZE`]), sized to the smallest of a few stack arrays so small entries do
/// not pay for clearing a large one.
#[inline(always)]
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    if len <= 16 {
        f(&mut [0u8; 16][..len])
    } else if len <= 128 {
        f(&mut [0u8; 128][..len])
    } else {
        f(&mut [0u8; MAX_ENTRY_SIZE][..len])
    }
}

#[inline]
fn read_entry<M: RingMemory, T: Entry>(
    mem: &M,
    layout: &RingLayout,
    index: u32,
    entry_size: usize,
) -> T {
    // One copy out of shared memory; decoding works on the private copy only.
    with_scratch(T::SIZE, |bytes| {
        mem.read(layout.offset(index, entry_size), bytes);
        T::decode(bytes)
    })
}

#[inline]
fn write_entry<M: RingMemory, T: Entry>(
    mem: &M,
    layout: &RingLayout,
    index: u32,
    entry_size: usize,
    value: &T,
) {
    with_scratch(T::SIZE, |bytes| {
        value.encode(bytes);
        mem.write(layout.offset(index, entry_size), bytes);
    })
}

/// The front end (the guest's driver side): pushes requests, pops responses.
#[derive(Debug)]
pub struct FrontRing<M, Req, Rsp> {
    mem: M,
    layout: RingLayout,
    req_prod_pvt: u32,
    rsp_cons: u32,
    /// The back end's response index as last read (validated).
    rsp_prod_seen: u32,
    /// The request index as last published.
    req_published: u32,
    _types: PhantomData<fn(Req) -> Rsp>,
}

impl<M: RingMemory, Req: Entry, Rsp: Entry> FrontRing<M, Req, Rsp> {
    const ENTRY_SIZE: usize = entry_size::<Req, Rsp>();

    /// Initialise the shared header (a new ring filling `mem`) and attach to it.
    pub fn init(mem: M) -> Result<Self, RingError> {
        RingLayout::new::<Req, Rsp>(mem.size())?;
        mem.write(0, &[0u8; HEADER_SIZE]);
        mem.store_u32(REQ_EVENT, 1);
        mem.store_u32(RSP_EVENT, 1);
        Self::attach(mem)
    }

    /// Attach to a ring whose header is already set up, continuing from its
    /// published indices.
    pub fn attach(mem: M) -> Result<Self, RingError> {
        let layout = RingLayout::new::<Req, Rsp>(mem.size())?;
        let req_prod_pvt = mem.load_u32(REQ_PROD);
        let rsp_cons = mem.load_u32(RSP_PROD);
        Ok(FrontRing {
            mem,
            layout,
            req_prod_pvt,
            rsp_cons,
            rsp_prod_seen: rsp_cons,
            req_published: req_prod_pvt,
            _types: PhantomData,
        })
    }

    /// Entries in the ring.
    pub fn entries(&self) -> u32 {
        self.layout.entries
    }

    /// Requests that can still be pushed before responses are consumed.
    #[inline]
    pub fn free_requests(&self) -> u32 {
        self.layout.entries - self.req_prod_pvt.wrapping_sub(self.rsp_cons)
    }

    /// Queue a request (not yet visible to the back end).
    #[inline]
    pub fn push_request(&mut self, req: &Req) -> Result<(), RingError> {
        if self.free_requests() == 0 {
            return Err(RingError::Full);
        }
        write_entry(
            &self.mem,
            &self.layout,
            self.req_prod_pvt,
            Self::ENTRY_SIZE,
            req,
        );
        self.req_prod_pvt = self.req_prod_pvt.wrapping_add(1);
        Ok(())
    }

    /// Publish queued requests; returns whether the back end must be notified.
    #[inline]
    pub fn publish_requests(&mut self) -> bool {
        let old = self.req_published;
        let new = self.req_prod_pvt;
        self.req_published = new;
        // The store is a release: the entries are visible before the index.
        self.mem.store_u32(REQ_PROD, new);
        self.mem.full_fence();
        need_notify(old, new, self.mem.load_u32(REQ_EVENT))
    }

    /// Responses published but not yet popped.
    #[inline]
    pub fn unconsumed_responses(&self) -> Result<u32, RingError> {
        unconsumed(
            self.mem.load_u32(RSP_PROD),
            self.rsp_cons,
            self.layout.entries,
        )
    }

    /// Pop the next response, if one is published. The shared index is read again
    /// only when the responses seen last time are used up.
    #[inline]
    pub fn pop_response(&mut self) -> Result<Option<Rsp>, RingError> {
        if self.rsp_cons == self.rsp_prod_seen {
            let prod = self.mem.load_u32(RSP_PROD);
            if unconsumed(prod, self.rsp_cons, self.layout.entries)? == 0 {
                return Ok(None);
            }
            self.rsp_prod_seen = prod;
        }
        let rsp = read_entry(&self.mem, &self.layout, self.rsp_cons, Self::ENTRY_SIZE);
        self.rsp_cons = self.rsp_cons.wrapping_add(1);
        Ok(Some(rsp))
    }

    /// Before sleeping: ask to be notified of the next response, then check once
    /// more. Returns whether responses are waiting (then do not sleep).
    pub fn final_check_for_responses(&mut self) -> Result<bool, RingError> {
        if self.unconsumed_responses()? > 0 {
            return Ok(true);
        }
        self.mem.store_u32(RSP_EVENT, self.rsp_cons.wrapping_add(1));
        self.mem.full_fence();
        Ok(self.unconsumed_responses()? > 0)
    }
}

/// The back end (the VMM's device side): pops requests, pushes responses.
#[derive(Debug)]
pub struct BackRing<M, Req, Rsp> {
    mem: M,
    layout: RingLayout,
    rsp_prod_pvt: u32,
    req_cons: u32,
    /// The front end's request index as last read (validated).
    req_prod_seen: u32,
    /// The response index as last published.
    rsp_published: u32,
    _types: PhantomData<fn(Req) -> Rsp>,
}

impl<M: RingMemory, Req: Entry, Rsp: Entry> BackRing<M, Req, Rsp> {
    const ENTRY_SIZE: usize = entry_size::<Req, Rsp>();

    /// Attach to a ring (filling `mem`) the front end has initialised, continuing
    /// from its published responses.
    pub fn attach(mem: M) -> Result<Self, RingError> {
        let layout = RingLayout::new::<Req, Rsp>(mem.size())?;
        let start = mem.load_u32(RSP_PROD);
        Ok(BackRing {
            mem,
            layout,
            rsp_prod_pvt: start,
            req_cons: start,
            req_prod_seen: start,
            rsp_published: start,
            _types: PhantomData,
        })
    }

    /// Entries in the ring.
    pub fn entries(&self) -> u32 {
        self.layout.entries
    }

    /// Requests published but not yet popped (never more than the responses the
    /// ring has room for). A producer index claiming more than a ring of
    /// unconsumed requests is an error.
    #[inline]
    pub fn unconsumed_requests(&self) -> Result<u32, RingError> {
        let req = unconsumed(
            self.mem.load_u32(REQ_PROD),
            self.req_cons,
            self.layout.entries,
        )?;
        let room = self.layout.entries - self.req_cons.wrapping_sub(self.rsp_prod_pvt);
        Ok(req.min(room))
    }

    /// Pop the next request, copied out of shared memory once. The shared index is
    /// read again only when the requests seen last time are used up.
    #[inline]
    pub fn pop_request(&mut self) -> Result<Option<Req>, RingError> {
        let room = self.layout.entries - self.req_cons.wrapping_sub(self.rsp_prod_pvt);
        if room == 0 {
            return Ok(None);
        }
        if self.req_cons == self.req_prod_seen {
            let prod = self.mem.load_u32(REQ_PROD);
            if unconsumed(prod, self.req_cons, self.layout.entries)? == 0 {
                return Ok(None);
            }
            self.req_prod_seen = prod;
        }
        let req = read_entry(&self.mem, &self.layout, self.req_cons, Self::ENTRY_SIZE);
        self.req_cons = self.req_cons.wrapping_add(1);
        Ok(Some(req))
    }

    /// Queue a response to a popped request (not yet visible to the front end).
    #[inline]
    pub fn push_response(&mut self, rsp: &Rsp) -> Result<(), RingError> {
        if self.rsp_prod_pvt == self.req_cons {
            return Err(RingError::NoRequestToAnswer);
        }
        write_entry(
            &self.mem,
            &self.layout,
            self.rsp_prod_pvt,
            Self::ENTRY_SIZE,
            rsp,
        );
        self.rsp_prod_pvt = self.rsp_prod_pvt.wrapping_add(1);
        Ok(())
    }

    /// Publish queued responses; returns whether the front end must be notified.
    #[inline]
    pub fn publish_responses(&mut self) -> bool {
        let old = self.rsp_published;
        let new = self.rsp_prod_pvt;
        self.rsp_published = new;
        self.mem.store_u32(RSP_PROD, new);
        self.mem.full_fence();
        need_notify(old, new, self.mem.load_u32(RSP_EVENT))
    }

    /// Before sleeping: ask to be notified of the next request, then check once
    /// more. Returns whether requests are waiting (then do not sleep).
    pub fn final_check_for_requests(&mut self) -> Result<bool, RingError> {
        if self.unconsumed_requests()? > 0 {
            return Ok(true);
        }
        self.mem.store_u32(REQ_EVENT, self.req_cons.wrapping_add(1));
        self.mem.full_fence();
        Ok(self.unconsumed_requests()? > 0)
    }
}

/// A ring in memory reached through a raw pointer, for `no_std` code (a guest's own
/// view of its ring page).
#[derive(Debug, Clone, Copy)]
pub struct RawRingMemory {
    base: *mut u8,
    size: usize,
}

impl RawRingMemory {
    /// A ring of `size` bytes at `base`.
    ///
    /// # Safety
    ///
    /// `base` must be 8-aligned and valid for reads and writes of `size` bytes for as
    /// long as this value (or a copy) is used; the other side may write it at any
    /// time, which is why every access is volatile or atomic.
    pub unsafe fn new(base: *mut u8, size: usize) -> Self {
        RawRingMemory { base, size }
    }

    #[inline]
    fn atomic(&self, offset: usize) -> &core::sync::atomic::AtomicU32 {
        assert!(
            offset.is_multiple_of(4) && offset + 4 <= self.size,
            "index offset {offset}"
        );
        // SAFETY: the range is inside the region `new`'s contract makes valid, and
        // 4-aligned (base is 8-aligned); AtomicU32 has the layout of u32, and every
        // access to these words goes through atomics.
        unsafe { &*(self.base.add(offset) as *const core::sync::atomic::AtomicU32) }
    }
}

impl RingMemory for RawRingMemory {
    #[inline]
    fn size(&self) -> usize {
        self.size
    }
    #[inline]
    fn load_u32(&self, offset: usize) -> u32 {
        self.atomic(offset).load(Ordering::Acquire)
    }
    #[inline]
    fn store_u32(&self, offset: usize, value: u32) {
        self.atomic(offset).store(value, Ordering::Release)
    }
    #[inline]
    fn read(&self, offset: usize, buf: &mut [u8]) {
        assert!(offset + buf.len() <= self.size, "read past the ring");
        let mut i = 0;
        // Whole 8-byte words where aligned, then bytes.
        if offset.is_multiple_of(8) {
            while i + 8 <= buf.len() {
                // SAFETY: in bounds (checked above) of the region `new` makes valid,
                // and 8-aligned (base is 8-aligned, offset + i is a multiple of 8).
                let w =
                    unsafe { core::ptr::read_volatile(self.base.add(offset + i) as *const u64) };
                buf[i..i + 8].copy_from_slice(&w.to_ne_bytes());
                i += 8;
            }
        }
        for (j, b) in buf.iter_mut().enumerate().skip(i) {
            // SAFETY: in bounds (checked above) of the region `new` makes valid.
            *b = unsafe { core::ptr::read_volatile(self.base.add(offset + j)) };
        }
    }
    #[inline]
    fn write(&self, offset: usize, data: &[u8]) {
        assert!(offset + data.len() <= self.size, "write past the ring");
        let mut i = 0;
        if offset.is_multiple_of(8) {
            while i + 8 <= data.len() {
                let w = u64::from_ne_bytes(data[i..i + 8].try_into().expect("8 bytes"));
                // SAFETY: as in `read`: in bounds and 8-aligned.
                unsafe { core::ptr::write_volatile(self.base.add(offset + i) as *mut u64, w) };
                i += 8;
            }
        }
        for (j, b) in data.iter().enumerate().skip(i) {
            // SAFETY: in bounds (checked above) of the region `new` makes valid.
            unsafe { core::ptr::write_volatile(self.base.add(offset + j), *b) };
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests;

#[cfg(all(test, loom))]
mod loom_tests;
