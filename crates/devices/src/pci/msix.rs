//! MSI-X (PCI 3.0 §6.8.2): the capability, the vector table and the pending-bit
//! array (PBA) of one function, and the vectors its device threads fire.
//!
//! The table lives in a BAR: each 16-byte entry holds a message address, data and a
//! vector control word whose bit 0 masks the vector. [`MsixTable`] decodes the
//! guest's accesses to it and to the PBA and says what changed ([`TableChange`]): a
//! vector's message (the embedding program points its KVM MSI route at it) or its
//! mask. [`MsixVectors`] is what the device's threads hold: [`MsixVectors::fire`]
//! signals a vector's irqfd, or, while the vector or the whole function is masked (or
//! MSI-X is off, or the function may not master the bus), sets its pending bit
//! instead; unmasking delivers a pending vector once.
//!
//! ```
//! use vmcraft_devices::pci::msix::{MsixTable, MsixVectors, TableChange};
//! let vectors = std::sync::Arc::new(MsixVectors::new(2).unwrap());
//! let mut table = MsixTable::new(vectors.clone());
//! // Vectors start masked: a fire is held pending.
//! vectors.fire(1);
//! assert!(vectors.pending(1));
//! // The guest writes entry 1's message, turns bus mastering and MSI-X on, unmasks
//! // entry 1.
//! assert_eq!(table.write(16, &0xfee0_0000u32.to_le_bytes()), [TableChange::Message(1)]);
//! table.write(24, &0x41u32.to_le_bytes());
//! table.set_bus_master(true);
//! table.set_control(0x8000);
//! assert_eq!(table.write(28, &0u32.to_le_bytes()), [TableChange::Unmasked(1)]);
//! // The pending fire was delivered on its irqfd.
//! assert!(!vectors.pending(1));
//! assert_eq!(vectors.irqfd(1).unwrap().read().unwrap(), 1);
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The MSI-X capability's id.
pub const CAPABILITY_ID: u8 = 0x11;
/// Bytes of one table entry.
pub const ENTRY_SIZE: u64 = 16;
/// The most vectors a function has (the table size field is 11 bits).
pub const MAX_VECTORS: u16 = 2048;
/// Message control: MSI-X enable.
pub const CONTROL_ENABLE: u16 = 1 << 15;
/// Message control: every vector masked.
pub const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Vector control: masked.
const VECTOR_MASKED: u32 = 1;

/// A vector's message: where the write goes and what it writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct MsiMessage {
    /// The address (the local APIC's window on x86).
    pub address: u64,
    /// The data (the vector and delivery mode on x86).
    pub data: u32,
}

/// What a table write changed, for the embedding program to follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableChange {
    /// This vector's message changed: route it anew.
    Message(u16),
    /// This vector was unmasked (a pending fire was delivered).
    Unmasked(u16),
    /// This vector was masked.
    Masked(u16),
}

/// The vectors of one function as its device threads see them: an irqfd each, a
/// mask each (the vector's, the function's or MSI-X off), a pending bit each.
#[derive(Debug)]
pub struct MsixVectors {
    /// Whether MSI-X is enabled (message control's enable bit).
    enabled: AtomicBool,
    irqfds: Vec<EventFd>,
    masked: Vec<AtomicBool>,
    pending: Vec<AtomicBool>,
}

impl MsixVectors {
    /// `count` vectors (1 to [`MAX_VECTORS`]), all masked, each with a fresh eventfd
    /// to register as a KVM irqfd on the vector's route.
    pub fn new(count: u16) -> std::io::Result<Self> {
        if count == 0 || count > MAX_VECTORS {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{count} MSI-X vectors (1 to {MAX_VECTORS})"),
            ));
        }
        Ok(MsixVectors {
            enabled: AtomicBool::new(false),
            irqfds: (0..count)
                .map(|_| EventFd::new(EFD_NONBLOCK))
                .collect::<Result<_, _>>()?,
            masked: (0..count).map(|_| AtomicBool::new(true)).collect(),
            pending: (0..count).map(|_| AtomicBool::new(false)).collect(),
        })
    }

    /// Whether the guest has enabled MSI-X.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::SeqCst)
    }

    /// How many vectors.
    pub fn count(&self) -> u16 {
        self.irqfds.len() as u16
    }

    /// Vector `vector`'s irqfd.
    pub fn irqfd(&self, vector: u16) -> Option<&EventFd> {
        self.irqfds.get(usize::from(vector))
    }

    /// Whether vector `vector` is pending (fired while masked).
    pub fn pending(&self, vector: u16) -> bool {
        self.pending
            .get(usize::from(vector))
            .is_some_and(|p| p.load(Ordering::SeqCst))
    }

    /// Signal vector `vector`: its irqfd, or its pending bit while it is masked. A
    /// vector past the table (a driver's choice: "no vector" is 0xffff) does nothing.
    pub fn fire(&self, vector: u16) {
        let i = usize::from(vector);
        let (Some(masked), Some(pending)) = (self.masked.get(i), self.pending.get(i)) else {
            return;
        };
        if masked.load(Ordering::SeqCst) {
            pending.store(true, Ordering::SeqCst);
            // Unmasked meanwhile: deliver it here unless the unmasking side did.
            if masked.load(Ordering::SeqCst) || !pending.swap(false, Ordering::SeqCst) {
                return;
            }
        }
        self.signal(i);
    }

    fn signal(&self, i: usize) {
        // A saturated counter means an interrupt is pending at KVM already.
        let _ = self.irqfds[i].write(1);
    }

    fn set_masked(&self, i: usize, masked: bool) {
        self.masked[i].store(masked, Ordering::SeqCst);
        if !masked && self.pending[i].swap(false, Ordering::SeqCst) {
            self.signal(i);
        }
    }
}

/// One table entry as the guest wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Entry {
    address_low: u32,
    address_high: u32,
    data: u32,
    control: u32,
}

impl Default for Entry {
    fn default() -> Self {
        // Every vector starts masked (PCI 3.0 §6.8.2.9).
        Entry {
            address_low: 0,
            address_high: 0,
            data: 0,
            control: VECTOR_MASKED,
        }
    }
}

/// The MSI-X state of a function in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsixState {
    /// Message control's enable and function-mask bits.
    pub control: u16,
    /// Each entry: address low, address high, data, vector control.
    pub entries: Vec<[u32; 4]>,
    /// Each vector's pending bit.
    pub pending: Vec<bool>,
}

/// A function's MSI-X table, PBA and message control. See the
/// [module documentation](self).
#[derive(Debug)]
pub struct MsixTable {
    vectors: Arc<MsixVectors>,
    entries: Vec<Entry>,
    control: u16,
    /// The command register's Bus Master Enable: without it the function may not
    /// write memory, and an MSI-X message is a memory write.
    bus_master: bool,
}

impl MsixTable {
    /// The table of `vectors`, every entry masked, MSI-X off.
    pub fn new(vectors: Arc<MsixVectors>) -> Self {
        MsixTable {
            entries: vec![Entry::default(); usize::from(vectors.count())],
            vectors,
            control: 0,
            bus_master: false,
        }
    }

    /// The command register's Bus Master Enable bit. While it is clear no vector
    /// signals: a fire sets the vector's pending bit, delivered once the bit is set
    /// again (and the vector unmasked), as for a masked vector.
    pub fn set_bus_master(&mut self, on: bool) {
        if self.bus_master != on {
            self.bus_master = on;
            self.update_masks();
        }
    }

    /// The vectors the device threads fire.
    pub fn vectors(&self) -> &Arc<MsixVectors> {
        &self.vectors
    }

    /// Bytes the table takes in its BAR.
    pub fn table_size(&self) -> u64 {
        self.entries.len() as u64 * ENTRY_SIZE
    }

    /// Bytes the PBA takes in its BAR (a bit per vector, in whole qwords).
    pub fn pba_size(&self) -> u64 {
        (self.entries.len() as u64).div_ceil(64) * 8
    }

    /// The capability's body (after its id and next pointer): message control (table
    /// size − 1), table offset and BAR, PBA offset and BAR; and which of its bits the
    /// guest may write (enable and function mask).
    pub fn capability(
        &self,
        table_bar: u8,
        table_offset: u32,
        pba_bar: u8,
        pba_offset: u32,
    ) -> ([u8; 10], [u8; 2]) {
        let mut body = [0u8; 10];
        body[0..2].copy_from_slice(&(self.entries.len() as u16 - 1).to_le_bytes());
        body[2..6].copy_from_slice(&(table_offset | u32::from(table_bar & 7)).to_le_bytes());
        body[6..10].copy_from_slice(&(pba_offset | u32::from(pba_bar & 7)).to_le_bytes());
        (body, (CONTROL_ENABLE | CONTROL_FUNCTION_MASK).to_le_bytes())
    }

    /// Whether MSI-X is enabled.
    pub fn enabled(&self) -> bool {
        self.control & CONTROL_ENABLE != 0
    }

    /// The message control bits the guest wrote (enable, function mask): each
    /// vector's effective mask follows, and vectors unmasked by it deliver what was
    /// pending.
    pub fn set_control(&mut self, control: u16) {
        self.control = control & (CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        self.update_masks();
    }

    /// Message control's enable and function-mask bits.
    pub fn control(&self) -> u16 {
        self.control
    }

    fn effectively_masked(&self, i: usize) -> bool {
        !self.enabled()
            || !self.bus_master
            || self.control & CONTROL_FUNCTION_MASK != 0
            || self.entries[i].control & VECTOR_MASKED != 0
    }

    fn update_masks(&self) {
        self.vectors.enabled.store(self.enabled(), Ordering::SeqCst);
        for i in 0..self.entries.len() {
            self.vectors.set_masked(i, self.effectively_masked(i));
        }
    }

    /// Vector `vector`'s message, if the vector exists.
    pub fn message(&self, vector: u16) -> Option<MsiMessage> {
        self.entries.get(usize::from(vector)).map(|e| MsiMessage {
            address: u64::from(e.address_high) << 32 | u64::from(e.address_low),
            data: e.data,
        })
    }

    /// A read of the table at `offset` (4 or 8 bytes, aligned); anything else reads
    /// all ones.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        let value = |off: u64| -> Option<u32> {
            let e = self.entries.get(usize::try_from(off / ENTRY_SIZE).ok()?)?;
            Some(match off % ENTRY_SIZE {
                0 => e.address_low,
                4 => e.address_high,
                8 => e.data,
                _ => e.control,
            })
        };
        match (data.len(), offset % data.len().max(1) as u64) {
            (4, 0) => match value(offset) {
                Some(v) => data.copy_from_slice(&v.to_le_bytes()),
                None => data.fill(0xff),
            },
            (8, 0) => match (value(offset), value(offset + 4)) {
                (Some(lo), Some(hi)) => {
                    data[..4].copy_from_slice(&lo.to_le_bytes());
                    data[4..].copy_from_slice(&hi.to_le_bytes());
                }
                _ => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    /// A write to the table at `offset` (4 or 8 bytes, aligned; anything else is
    /// ignored). Returns what changed, in order: an 8-byte write of the data and the
    /// vector control may change the message and then the mask.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Vec<TableChange> {
        let dwords: Vec<u32> = match data.len() {
            4 if offset.is_multiple_of(4) => {
                vec![u32::from_le_bytes([data[0], data[1], data[2], data[3]])]
            }
            8 if offset.is_multiple_of(8) => vec![
                u32::from_le_bytes([data[0], data[1], data[2], data[3]]),
                u32::from_le_bytes([data[4], data[5], data[6], data[7]]),
            ],
            _ => return Vec::new(),
        };
        let mut changes = Vec::new();
        let mut at = offset;
        for d in dwords {
            // An 8-byte address write changes one message, said once.
            match self.write_dword(at, d) {
                Some(c) if !changes.contains(&c) => changes.push(c),
                _ => {}
            }
            at += 4;
        }
        changes
    }

    fn write_dword(&mut self, offset: u64, value: u32) -> Option<TableChange> {
        let i = usize::try_from(offset / ENTRY_SIZE).ok()?;
        if i >= self.entries.len() {
            return None;
        }
        let vector = i as u16;
        let was_masked = self.effectively_masked(i);
        let entry = &mut self.entries[i];
        match offset % ENTRY_SIZE {
            0 | 4 | 8 => {
                let field = match offset % ENTRY_SIZE {
                    0 => &mut entry.address_low,
                    4 => &mut entry.address_high,
                    _ => &mut entry.data,
                };
                if *field == value {
                    return None;
                }
                *field = value;
                Some(TableChange::Message(vector))
            }
            _ => {
                // Only the mask bit is defined; the rest is reserved.
                entry.control = value & VECTOR_MASKED;
                let masked = self.effectively_masked(i);
                self.vectors.set_masked(i, masked);
                match (was_masked, masked) {
                    (true, false) => Some(TableChange::Unmasked(vector)),
                    (false, true) => Some(TableChange::Masked(vector)),
                    _ => None,
                }
            }
        }
    }

    /// A read of the PBA at `offset` (4 or 8 bytes, aligned): a bit per vector.
    /// The PBA is read-only; writes to it are ignored.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        if !matches!(data.len(), 4 | 8) || !offset.is_multiple_of(data.len() as u64) {
            data.fill(0xff);
            return;
        }
        for (i, byte) in data.iter_mut().enumerate() {
            let first = (offset + i as u64) * 8;
            *byte = (0..8)
                .filter(|bit| u16::try_from(first + bit).is_ok_and(|v| self.vectors.pending(v)))
                .fold(0, |b, bit| b | 1 << bit);
        }
    }

    /// The table, the control bits and the pending bits, for a snapshot.
    pub fn save(&self) -> MsixState {
        MsixState {
            control: self.control,
            entries: self
                .entries
                .iter()
                .map(|e| [e.address_low, e.address_high, e.data, e.control])
                .collect(),
            pending: (0..self.vectors.count())
                .map(|v| self.vectors.pending(v))
                .collect(),
        }
    }

    /// Put back a snapshot's table (for as many vectors as this one has), control
    /// and pending bits; each vector's route must then be set from
    /// [`message`](Self::message). Pending vectors that are unmasked are delivered.
    pub fn restore(&mut self, state: &MsixState) -> Result<(), String> {
        let n = self.entries.len();
        if state.entries.len() != n || state.pending.len() != n {
            return Err(format!(
                "{} entries and {} pending bits saved for a table of {n}",
                state.entries.len(),
                state.pending.len()
            ));
        }
        if state.control & !(CONTROL_ENABLE | CONTROL_FUNCTION_MASK) != 0 {
            return Err(format!(
                "message control {:#x} has reserved bits",
                state.control
            ));
        }
        for (e, s) in self.entries.iter_mut().zip(&state.entries) {
            *e = Entry {
                address_low: s[0],
                address_high: s[1],
                data: s[2],
                control: s[3] & VECTOR_MASKED,
            };
        }
        for (p, &saved) in self.vectors.pending.iter().zip(&state.pending) {
            p.store(saved, Ordering::SeqCst);
        }
        self.control = state.control;
        self.update_masks();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table of `n` vectors whose function masters the bus (as a driver sets it).
    fn table(n: u16) -> MsixTable {
        let mut t = MsixTable::new(Arc::new(MsixVectors::new(n).unwrap()));
        t.set_bus_master(true);
        t
    }

    #[test]
    fn without_bus_mastering_a_vector_holds_its_fire_pending() {
        let mut t = table(2);
        t.set_control(CONTROL_ENABLE);
        t.write(12, &0u32.to_le_bytes()); // vector 0 unmasked
        t.vectors().fire(0);
        assert_eq!(fired(&t, 0), 1);
        // Bus Master Enable cleared: no message may be written.
        t.set_bus_master(false);
        t.vectors().fire(0);
        assert_eq!(fired(&t, 0), 0);
        assert!(t.vectors().pending(0));
        // Set again: what was held is delivered, once.
        t.set_bus_master(true);
        assert_eq!(fired(&t, 0), 1);
        assert!(!t.vectors().pending(0));
        // A new table starts without it (the command register starts at 0).
        let fresh = MsixTable::new(Arc::new(MsixVectors::new(1).unwrap()));
        assert!(fresh.effectively_masked(0));
    }

    fn fired(t: &MsixTable, v: u16) -> u64 {
        t.vectors().irqfd(v).unwrap().read().unwrap_or(0)
    }

    fn read32(t: &MsixTable, offset: u64) -> u32 {
        let mut d = [0u8; 4];
        t.read(offset, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn entries_start_masked_and_read_back_what_was_written() {
        let mut t = table(3);
        assert_eq!((t.table_size(), t.pba_size()), (48, 8));
        for v in 0..3 {
            assert_eq!(read32(&t, v * 16 + 12), 1);
        }
        assert_eq!(
            t.write(32, &0xfee0_1000u32.to_le_bytes()),
            [TableChange::Message(2)]
        );
        assert_eq!(t.write(32, &0xfee0_1000u32.to_le_bytes()), [], "unchanged");
        assert_eq!(
            t.write(40, &0x4021u32.to_le_bytes()),
            [TableChange::Message(2)]
        );
        assert_eq!(
            t.message(2),
            Some(MsiMessage {
                address: 0xfee0_1000,
                data: 0x4021
            })
        );
        // 8-byte access of the address.
        assert_eq!(
            t.write(16, &0x1_fee0_2000u64.to_le_bytes()),
            [TableChange::Message(1)]
        );
        // Data and control at once: the message, then the mask.
        t.set_control(CONTROL_ENABLE);
        assert_eq!(
            t.write(24, &(0x22u64).to_le_bytes()),
            [TableChange::Message(1), TableChange::Unmasked(1)]
        );
        t.set_control(0);
        let mut q = [0u8; 8];
        t.read(16, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x1_fee0_2000);
        // Reserved control bits read as 0; odd accesses and entries past the table.
        t.write(12, &u32::MAX.to_le_bytes());
        assert_eq!(read32(&t, 12), 1);
        assert_eq!(t.write(48, &[0; 4]), []);
        assert_eq!(read32(&t, 48), u32::MAX);
        assert_eq!(t.write(2, &[0; 4]), []);
        let mut b = [0u8; 2];
        t.read(0, &mut b);
        assert_eq!(b, [0xff; 2]);
    }

    #[test]
    fn a_masked_vector_holds_its_fire_pending_until_unmasked() {
        let mut t = table(2);
        t.set_control(CONTROL_ENABLE);
        t.vectors().fire(0);
        assert_eq!(fired(&t, 0), 0);
        let mut pba = [0u8; 8];
        t.read_pba(0, &mut pba);
        assert_eq!(pba[0], 1);
        assert_eq!(t.write(12, &0u32.to_le_bytes()), [TableChange::Unmasked(0)]);
        assert_eq!(fired(&t, 0), 1, "delivered at unmask");
        t.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
        t.vectors().fire(0);
        assert_eq!(fired(&t, 0), 1, "unmasked: straight to the irqfd");
        // The function mask holds every vector.
        t.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        t.vectors().fire(0);
        assert_eq!(fired(&t, 0), 0);
        assert!(t.vectors().pending(0));
        t.set_control(CONTROL_ENABLE);
        assert_eq!(fired(&t, 0), 1);
        // MSI-X off holds them too.
        t.set_control(0);
        t.vectors().fire(0);
        assert_eq!(fired(&t, 0), 0);
        assert_eq!(t.write(12, &1u32.to_le_bytes()), [], "masked either way");
        // A vector past the table does nothing.
        t.vectors().fire(0xffff);
    }

    #[test]
    fn the_capability_says_the_size_and_where_the_table_and_pba_are() {
        let t = table(5);
        let (body, writable) = t.capability(1, 0x2000, 1, 0x3000);
        assert_eq!(u16::from_le_bytes([body[0], body[1]]), 4);
        assert_eq!(u32::from_le_bytes(body[2..6].try_into().unwrap()), 0x2001);
        assert_eq!(u32::from_le_bytes(body[6..10].try_into().unwrap()), 0x3001);
        assert_eq!(u16::from_le_bytes(writable), 0xc000);
        assert!(MsixVectors::new(0).is_err());
        assert!(MsixVectors::new(MAX_VECTORS + 1).is_err());
    }

    #[test]
    fn a_saved_table_restores_and_delivers_what_is_pending_and_unmasked() {
        let mut t = table(2);
        t.write(0, &0xfee0_0000u32.to_le_bytes());
        t.write(8, &0x31u32.to_le_bytes());
        t.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        t.write(12, &0u32.to_le_bytes());
        t.vectors().fire(0);
        let mut state = t.save();
        assert_eq!(state.pending, [true, false]);
        state.control = CONTROL_ENABLE;
        let mut again = table(2);
        again.restore(&state).unwrap();
        assert_eq!(again.message(0), t.message(0));
        assert_eq!(
            fired(&again, 0),
            1,
            "pending and unmasked after the restore"
        );
        assert!(table(3).restore(&state).is_err());
        state.control = 1;
        assert!(table(2).restore(&state).is_err());
    }
}
