//! Grant tables, version 1: how a guest lets a backend reach chosen pages of its
//! memory.
//!
//! The table lives in guest memory: entry `ref` is `{u16 flags; u16 domid; u32
//! frame}` (8 bytes). The guest grants by writing `domid` and `frame`, a write
//! barrier, then `flags` (`GTF_permit_access`, plus `GTF_readonly` for read-only
//! access). The backend (the VMM, acting as domain `backend_domid`):
//! * maps a grant: the entry must permit access to this domain, and to writing if a
//!   writable mapping is asked; the backend then sets `GTF_reading` (and
//!   `GTF_writing`) with a compare-and-swap on the live flags, so the grant cannot
//!   change under it (a guest that wants to revoke sees the in-use bits and must
//!   wait; that is the guest's side of the protocol, as in Xen);
//! * unmaps: clears the bits it set;
//! * copies to or from a granted frame, never across its page.
//!
//! The table is in frames of 512 entries. The embedding program may lay them out
//! itself ([`GrantTable::new`]), or a guest places each frame where it wants it
//! ([`GrantTable::unplaced`], then [`GrantTable::place_frame`]: an HVM guest's
//! `XENMEM_add_to_physmap` of `XENMAPSPACE_grant_table`); an entry in a frame not
//! placed is not a grant. [`op`] serves the guest's `grant_table_op`.

pub mod op;

use std::sync::atomic::AtomicU64;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Mutex;

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, VolatileMemory};
use vmcraft_memory::GuestMemory;

/// Bytes per grant entry (v1).
pub const ENTRY_SIZE: u64 = 8;
/// Entries per frame (v1).
pub const ENTRIES_PER_FRAME: u32 = (PAGE / ENTRY_SIZE) as u32;
/// Where a frame is not placed.
const UNPLACED: u64 = u64::MAX;
/// Page size of granted frames.
pub const PAGE: u64 = 4096;
/// `GTF_permit_access`: the grant type that lets the named domain map the frame.
pub const GTF_PERMIT_ACCESS: u16 = 1;
/// The grant type field.
pub const GTF_TYPE_MASK: u16 = 3;
/// Read-only grant.
pub const GTF_READONLY: u16 = 1 << 2;
/// Set by the backend while the frame is mapped for reading.
pub const GTF_READING: u16 = 1 << 3;
/// Set by the backend while the frame is mapped for writing.
pub const GTF_WRITING: u16 = 1 << 4;

/// Why a grant operation failed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum GrantError {
    /// The reference is outside the table.
    #[error("grant reference {0} is outside the table")]
    BadRef(u32),
    /// The entry does not grant access (type) or grants it to another domain.
    #[error("grant {gref} is not for domain {domid} (flags {flags:#x}, domid {granted})")]
    NotGranted {
        /// The reference.
        gref: u32,
        /// Who asked.
        domid: u16,
        /// The entry's flags.
        flags: u16,
        /// The entry's domid.
        granted: u16,
    },
    /// A write to a read-only grant.
    #[error("grant {0} is read-only")]
    ReadOnly(u32),
    /// The frame is outside guest memory.
    #[error("grant {gref} names frame {frame:#x}, outside guest memory")]
    BadFrame {
        /// The reference.
        gref: u32,
        /// The frame.
        frame: u32,
    },
    /// A copy that would cross its page.
    #[error("a copy of {len} bytes at offset {offset} crosses the granted page")]
    CrossesPage {
        /// Offset in the page.
        offset: u64,
        /// Length.
        len: usize,
    },
    /// The table is not in guest memory.
    #[error("the grant table ({entries} entries at {addr:#x}) is outside guest memory")]
    BadTable {
        /// Its address.
        addr: u64,
        /// Its size in entries.
        entries: u32,
    },
    /// A frame index past the table's size, or a frame not one page of guest RAM.
    #[error("grant-table frame {index} cannot go at {addr:#x} (the table has {frames} frames; a frame is a page of guest memory)")]
    BadFrameSlot {
        /// The frame's index.
        index: u32,
        /// Where it was to go.
        addr: u64,
        /// The table's size in frames.
        frames: u32,
    },
    /// The guest kept changing the entry while it was being mapped.
    #[error("grant {0} changed while it was being mapped")]
    Unstable(u32),
    /// The mapping was already released.
    #[error("grant {0} is not mapped")]
    NotMapped(u32),
}

/// A mapped grant: the frame it names, and whether it may be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// The reference.
    pub gref: u32,
    /// Guest-physical address of the page.
    pub page: GuestAddress,
    /// Whether the backend may write it.
    pub writable: bool,
}

/// Direction of a grant copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyDirection {
    /// From the granted page into the caller's buffer.
    FromGuest,
    /// From the caller's buffer into the granted page.
    ToGuest,
}

/// One guest's grant table, seen from a backend acting as `backend_domid`.
pub struct GrantTable {
    memory: GuestMemory,
    /// Each frame's guest-physical address, or [`UNPLACED`].
    frames: Vec<AtomicU64>,
    entries: u32,
    backend_domid: u16,
    /// Per reference, how many mappings the backend holds (reads, writes).
    held: Mutex<Vec<(u32, u32)>>,
}

impl std::fmt::Debug for GrantTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrantTable")
            .field("frames", &self.frames)
            .field("entries", &self.entries)
            .field("backend_domid", &self.backend_domid)
            .finish_non_exhaustive()
    }
}

impl GrantTable {
    /// The `entries`-entry table at `table` (8-aligned, inside guest memory).
    pub fn new(
        memory: GuestMemory,
        table: GuestAddress,
        entries: u32,
        backend_domid: u16,
    ) -> Result<Self, GrantError> {
        let bad = GrantError::BadTable {
            addr: table.0,
            entries,
        };
        let len = u64::from(entries) * ENTRY_SIZE;
        if entries == 0 || !table.0.is_multiple_of(8) || !memory.check_range(table, len as usize) {
            return Err(bad);
        }
        let table_frames = entries.div_ceil(ENTRIES_PER_FRAME);
        Ok(GrantTable {
            memory,
            frames: (0..u64::from(table_frames))
                .map(|i| AtomicU64::new(table.0 + i * PAGE))
                .collect(),
            entries,
            backend_domid,
            held: Mutex::new(vec![(0, 0); entries as usize]),
        })
    }

    /// A table of `frames` frames, none placed yet: the guest places them
    /// ([`place_frame`](Self::place_frame)). The VMM acts as domain
    /// `backend_domid`.
    pub fn unplaced(memory: GuestMemory, frames: u32, backend_domid: u16) -> Self {
        let entries = frames.saturating_mul(ENTRIES_PER_FRAME);
        GrantTable {
            memory,
            frames: (0..frames).map(|_| AtomicU64::new(UNPLACED)).collect(),
            entries,
            backend_domid,
            held: Mutex::new(vec![(0, 0); entries as usize]),
        }
    }

    /// Put frame `index` at `at` (a page of guest memory), as a fresh frame: zeroed,
    /// granting nothing. A frame placed again moves.
    pub fn place_frame(&self, index: u32, at: GuestAddress) -> Result<(), GrantError> {
        let bad = GrantError::BadFrameSlot {
            index,
            addr: at.0,
            frames: self.max_frames(),
        };
        let slot = self.frames.get(index as usize).ok_or(bad.clone())?;
        if !at.0.is_multiple_of(PAGE) || !self.memory.check_range(at, PAGE as usize) {
            return Err(bad);
        }
        self.memory
            .write_slice(&[0u8; PAGE as usize], at)
            .map_err(|_| bad)?;
        slot.store(at.0, Ordering::SeqCst);
        Ok(())
    }

    /// Where each frame is placed (`None`: not placed), for a snapshot: the entries
    /// themselves are guest memory.
    pub fn placed_frames(&self) -> Vec<Option<u64>> {
        self.frames
            .iter()
            .map(|f| Some(f.load(Ordering::SeqCst)).filter(|&a| a != UNPLACED))
            .collect()
    }

    /// Put the frames back where a snapshot had them, leaving their contents (the
    /// restored memory) alone. Checked: as many frames as this table has, each a
    /// page of guest memory; on an error nothing changes.
    pub fn restore_frames(&self, placed: &[Option<u64>]) -> Result<(), GrantError> {
        if placed.len() != self.frames.len() {
            return Err(GrantError::BadFrameSlot {
                index: placed.len() as u32,
                addr: 0,
                frames: self.max_frames(),
            });
        }
        for (index, at) in placed.iter().enumerate() {
            if let Some(at) = *at {
                if !at.is_multiple_of(PAGE)
                    || !self.memory.check_range(GuestAddress(at), PAGE as usize)
                {
                    return Err(GrantError::BadFrameSlot {
                        index: index as u32,
                        addr: at,
                        frames: self.max_frames(),
                    });
                }
            }
        }
        for (slot, at) in self.frames.iter().zip(placed) {
            slot.store(at.unwrap_or(UNPLACED), Ordering::SeqCst);
        }
        Ok(())
    }

    /// The table's size in frames.
    pub fn max_frames(&self) -> u32 {
        self.frames.len() as u32
    }

    /// Frames in use: one past the last placed (Xen's `nr_grant_frames`).
    pub fn frames_in_use(&self) -> u32 {
        self.frames
            .iter()
            .rposition(|f| f.load(Ordering::SeqCst) != UNPLACED)
            .map_or(0, |i| i as u32 + 1)
    }

    /// Where entry `gref` is, if its frame is placed.
    fn entry_addr(&self, gref: u32) -> Result<GuestAddress, GrantError> {
        if gref >= self.entries {
            return Err(GrantError::BadRef(gref));
        }
        let frame = self.frames[(gref / ENTRIES_PER_FRAME) as usize].load(Ordering::SeqCst);
        if frame == UNPLACED {
            return Err(GrantError::BadRef(gref));
        }
        Ok(GuestAddress(
            frame + u64::from(gref % ENTRIES_PER_FRAME) * ENTRY_SIZE,
        ))
    }

    /// Entries in the table (`query_size`).
    pub fn size(&self) -> u32 {
        self.entries
    }

    /// Run `f` on entry `gref`'s live flags word (the guest changes it concurrently).
    fn with_flags<R>(&self, gref: u32, f: impl FnOnce(&AtomicU16) -> R) -> Result<R, GrantError> {
        let addr = self.entry_addr(gref)?;
        let slice = self
            .memory
            .get_slice(addr, 2)
            .map_err(|_| GrantError::BadRef(gref))?;
        let flags = slice
            .get_atomic_ref::<AtomicU16>(0)
            .map_err(|_| GrantError::BadRef(gref))?;
        let result = f(flags);
        // The in-use bits the host sets and clears are guest memory it wrote: mark the
        // page dirty (an atomic through a reference marks nothing by itself), so a
        // migration copies it again. Loads mark it too, which costs only a resend.
        vm_memory::bitmap::Bitmap::mark_dirty(slice.bitmap(), 0, 2);
        Ok(result)
    }

    /// Map grant `gref` for reading, or for writing as well.
    pub fn map(&self, gref: u32, writable: bool) -> Result<Mapping, GrantError> {
        let entry = self.entry_addr(gref)?;
        let in_use = if writable {
            GTF_READING | GTF_WRITING
        } else {
            GTF_READING
        };
        // A guest flipping the entry can make the compare-and-swap fail; give up
        // after a few tries rather than spin on a hostile guest.
        for _ in 0..16 {
            let current = self.with_flags(gref, |f| f.load(Ordering::Acquire))?;
            let domid: u16 = self
                .memory
                .read_obj(GuestAddress(entry.0 + 2))
                .map_err(|_| GrantError::BadRef(gref))?;
            if current & GTF_TYPE_MASK != GTF_PERMIT_ACCESS || domid != self.backend_domid {
                return Err(GrantError::NotGranted {
                    gref,
                    domid: self.backend_domid,
                    flags: current,
                    granted: domid,
                });
            }
            if writable && current & GTF_READONLY != 0 {
                return Err(GrantError::ReadOnly(gref));
            }
            let swapped = self.with_flags(gref, |f| {
                f.compare_exchange(
                    current,
                    current | in_use,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
            })?;
            if !swapped {
                continue;
            }
            // The frame is read after the in-use bits are set: the guest may not
            // change a grant in use.
            let frame: u32 = self
                .memory
                .read_obj(GuestAddress(entry.0 + 4))
                .map_err(|_| GrantError::BadRef(gref))?;
            let page = GuestAddress(u64::from(frame) * PAGE);
            if !self.memory.check_range(page, PAGE as usize) {
                self.release_bits(gref, writable);
                return Err(GrantError::BadFrame { gref, frame });
            }
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            let h = &mut held[gref as usize];
            h.0 += 1;
            if writable {
                h.1 += 1;
            }
            return Ok(Mapping {
                gref,
                page,
                writable,
            });
        }
        Err(GrantError::Unstable(gref))
    }

    /// Clear the in-use bits no other mapping of `gref` still needs.
    fn release_bits(&self, gref: u32, writable: bool) {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let (reads, writes) = held[gref as usize];
        let mut clear = 0;
        if reads == 0 {
            clear |= GTF_READING;
        }
        if writable && writes == 0 {
            clear |= GTF_WRITING;
        }
        let _ = self.with_flags(gref, |f| f.fetch_and(!clear, Ordering::AcqRel));
    }

    /// Release a mapping.
    pub fn unmap(&self, mapping: Mapping) -> Result<(), GrantError> {
        {
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            let h = held
                .get_mut(mapping.gref as usize)
                .ok_or(GrantError::BadRef(mapping.gref))?;
            if h.0 == 0 || (mapping.writable && h.1 == 0) {
                return Err(GrantError::NotMapped(mapping.gref));
            }
            h.0 -= 1;
            if mapping.writable {
                h.1 -= 1;
            }
        }
        self.release_bits(mapping.gref, mapping.writable);
        Ok(())
    }

    /// Copy between `buf` and granted page `gref` at `offset` (the grant is mapped for
    /// the copy and released after). A copy never crosses the page.
    pub fn copy(
        &self,
        gref: u32,
        offset: u64,
        buf: &mut [u8],
        direction: CopyDirection,
    ) -> Result<(), GrantError> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > PAGE) {
            return Err(GrantError::CrossesPage {
                offset,
                len: buf.len(),
            });
        }
        let mapping = self.map(gref, direction == CopyDirection::ToGuest)?;
        let at = GuestAddress(mapping.page.0 + offset);
        let result = match direction {
            CopyDirection::FromGuest => self.memory.read_slice(buf, at),
            CopyDirection::ToGuest => self.memory.write_slice(buf, at),
        };
        self.unmap(mapping)?;
        result.map_err(|_| GrantError::BadFrame {
            gref,
            frame: (mapping.page.0 / PAGE) as u32,
        })
    }
}

#[cfg(test)]
mod tests;
