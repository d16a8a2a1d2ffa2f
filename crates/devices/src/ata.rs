//! An ATA (IDE) disk driven by port I/O, the way an unmodified guest with no
//! paravirtual driver reaches a disk: task-file registers, a 16-bit data port, status
//! bits BSY/DRDY/DRQ/ERR, and the commands READ SECTORS, WRITE SECTORS, IDENTIFY
//! DEVICE and FLUSH CACHE (LBA28). Every 512-byte sector costs 256 data-port exits,
//! which is the point of having it: the full-virtualization baseline.
//!
//! Ports (primary channel): the command block at 0x1f0..=0x1f7 and device control /
//! alternate status at 0x3f6. Register the same device at both with
//! [`AtaDisk::COMMAND_BASE`] and [`AtaDisk::CONTROL_BASE`].
//!
//! A bad command, a sector outside the disk, or a drive other than 0 gets an error
//! status (ERR with ABRT or IDNF in the error register); nothing a guest writes can
//! make the device panic or touch bytes outside its file.

use std::fs::File;
use std::sync::Mutex;
use vmcraft_block::BlockImage;

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;

use crate::state::StateError;

/// Sector size.
pub const SECTOR: usize = 512;

/// Status: busy.
pub const BSY: u8 = 0x80;
/// Status: ready.
pub const DRDY: u8 = 0x40;
/// Status: seek complete (always set, as drives do).
pub const DSC: u8 = 0x10;
/// Status: data request (the data port has a sector for or from the guest).
pub const DRQ: u8 = 0x08;
/// Status: error (see the error register).
pub const ERR: u8 = 0x01;
/// Error: command aborted.
pub const ABRT: u8 = 0x04;
/// Error: sector not found.
pub const IDNF: u8 = 0x10;

/// READ SECTORS.
pub const CMD_READ_SECTORS: u8 = 0x20;
/// WRITE SECTORS.
pub const CMD_WRITE_SECTORS: u8 = 0x30;
/// IDENTIFY DEVICE.
pub const CMD_IDENTIFY: u8 = 0xec;
/// FLUSH CACHE.
pub const CMD_FLUSH_CACHE: u8 = 0xe7;
/// SET FEATURES (accepted, no effect).
pub const CMD_SET_FEATURES: u8 = 0xef;

/// The PIO transfer a disk is in the middle of (part of [`AtaState`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Transfer {
    /// None: the data port reads all ones and ignores writes.
    None,
    /// Sectors to hand to the guest: the buffer holds the current one, `left` more
    /// follow from `next_lba` on.
    Read {
        /// The sector to load once the buffer is drained.
        next_lba: u64,
        /// Sectors still to load after the current one.
        left: u32,
    },
    /// Sectors to take from the guest: the buffer fills the sector at `lba`, and
    /// `left` counts it and those after it.
    Write {
        /// The sector the buffer is written to once full.
        lba: u64,
        /// Sectors still to take, the current one included (at least 1).
        left: u32,
    },
}

/// The state of an [`AtaDisk`] in a snapshot: its task file, and the sector buffer and
/// position of a PIO transfer in progress. The image itself is the embedding
/// program's to keep (copied or shared with the restored machine).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AtaState {
    /// The disk's capacity in sectors (a restore on a disk of another size is refused).
    pub sectors: u64,
    /// Features, sector count, LBA low/mid/high, device/head, status, error and device
    /// control registers.
    pub registers: [u8; 9],
    /// The sector buffer (512 bytes).
    pub buffer: Vec<u8>,
    /// Bytes of the buffer already moved through the data port.
    pub position: u16,
    /// The transfer in progress.
    pub transfer: Transfer,
}

impl vmcraft_snapshot::Versioned for AtaState {
    const VERSION: u32 = 1;
}

#[derive(Debug)]
struct State {
    features: u8,
    count: u8,
    lba: [u8; 3],
    device: u8,
    status: u8,
    error: u8,
    control: u8,
    buf: [u8; SECTOR],
    pos: usize,
    transfer: Transfer,
}

/// The disk.
#[derive(Debug)]
pub struct AtaDisk {
    image: BlockImage,
    /// The image's size, at most LBA28's reach.
    sectors: u64,
    state: Mutex<State>,
}

impl AtaDisk {
    /// Base of the command block (primary channel).
    pub const COMMAND_BASE: u16 = 0x1f0;
    /// Device control / alternate status (primary channel).
    pub const CONTROL_BASE: u16 = 0x3f6;

    /// A disk on `file` (capacity: its length in whole sectors, at most 2^28 for
    /// LBA28).
    pub fn new(file: File, read_only: bool) -> std::io::Result<AtaDisk> {
        let image = BlockImage::open(file, read_only)?;
        Ok(AtaDisk {
            sectors: image.sectors().min(1 << 28),
            image,
            state: Mutex::new(State {
                features: 0,
                count: 0,
                lba: [0; 3],
                device: 0xa0,
                status: DRDY | DSC,
                error: 0,
                control: 0,
                buf: [0; SECTOR],
                pos: 0,
                transfer: Transfer::None,
            }),
        })
    }

    /// Capacity in sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The registers and any transfer in progress, for a snapshot (with the vCPUs
    /// paused, nothing changes it).
    pub fn save_state(&self) -> AtaState {
        let s = self.lock();
        AtaState {
            sectors: self.sectors,
            registers: [
                s.features, s.count, s.lba[0], s.lba[1], s.lba[2], s.device, s.status, s.error,
                s.control,
            ],
            buffer: s.buf.to_vec(),
            position: s.pos as u16,
            transfer: s.transfer,
        }
    }

    /// Put back the state of [`AtaDisk::save_state`], checked first: the same
    /// capacity, a whole sector buffer, a position inside it, a transfer that stays on
    /// the disk, and status bits this device sets (DRQ exactly while a transfer is in
    /// progress). The guest goes on with the transfer where it left it.
    pub fn restore_state(&self, state: &AtaState) -> Result<(), StateError> {
        let bad = |reason: String| Err(StateError::new("ATA disk", reason));
        if state.sectors != self.sectors {
            return bad(format!(
                "saved with {} sectors, this disk has {}",
                state.sectors, self.sectors
            ));
        }
        let Ok(buf) = <[u8; SECTOR]>::try_from(state.buffer.as_slice()) else {
            return bad(format!("a sector buffer of {} bytes", state.buffer.len()));
        };
        if usize::from(state.position) >= SECTOR {
            return bad(format!("position {} in a sector", state.position));
        }
        let [features, count, lba0, lba1, lba2, device, status, error, control] = state.registers;
        let (end, transferring) = match state.transfer {
            Transfer::None => (Some(0), false),
            Transfer::Read { next_lba, left } => (next_lba.checked_add(u64::from(left)), true),
            Transfer::Write { lba, left } if left > 0 => (lba.checked_add(u64::from(left)), true),
            Transfer::Write { .. } => return bad("a write with no sector left".into()),
        };
        if end.is_none_or(|end| end > self.sectors) {
            return bad(format!(
                "{:?} ends past the disk's {} sectors",
                state.transfer, self.sectors
            ));
        }
        if status & !(DRDY | DSC | DRQ | ERR) != 0 || (status & DRQ != 0) != transferring {
            return bad(format!(
                "status {status:#04x} with transfer {:?}",
                state.transfer
            ));
        }
        *self.lock() = State {
            features,
            count,
            lba: [lba0, lba1, lba2],
            device,
            status,
            error,
            control,
            buf,
            pos: usize::from(state.position),
            transfer: state.transfer,
        };
        Ok(())
    }

    /// The 512-byte IDENTIFY DEVICE block.
    fn identify(&self) -> [u8; SECTOR] {
        let mut w = [0u16; 256];
        let put_str = |w: &mut [u16; 256], at: usize, words: usize, s: &str| {
            let mut bytes = vec![b' '; 2 * words];
            bytes[..s.len().min(2 * words)]
                .copy_from_slice(&s.as_bytes()[..s.len().min(2 * words)]);
            for i in 0..words {
                // ATA strings: the first character in the high byte.
                w[at + i] = u16::from(bytes[2 * i]) << 8 | u16::from(bytes[2 * i + 1]);
            }
        };
        let lba28 = self.sectors.min(0x0fff_ffff) as u32;
        w[0] = 0x0040; // fixed device
        w[1] = 16383; // legacy CHS geometry
        w[3] = 16;
        w[6] = 63;
        put_str(&mut w, 10, 10, "VMCRAFT0001");
        put_str(&mut w, 23, 4, "1.0");
        put_str(&mut w, 27, 20, "vmcraft emulated ATA disk");
        w[47] = 0x8001; // READ/WRITE MULTIPLE: 1 sector
        w[49] = 1 << 9; // LBA supported
        w[53] = 0x0006; // words 64-70 and 88 valid
        w[60] = lba28 as u16;
        w[61] = (lba28 >> 16) as u16;
        w[80] = 0x007e; // ATA-1 to ATA-6
        w[82] = 0x4000;
        w[83] = 0x4000 | (1 << 12); // FLUSH CACHE supported
        w[84] = 0x4000;
        w[86] = 1 << 12; // FLUSH CACHE enabled
        w[87] = 0x4000;
        let mut out = [0u8; SECTOR];
        for (i, v) in w.iter().enumerate() {
            out[2 * i..2 * i + 2].copy_from_slice(&v.to_le_bytes());
        }
        out
    }

    fn fail(s: &mut State, error: u8) {
        s.status = DRDY | DSC | ERR;
        s.error = error;
        s.transfer = Transfer::None;
    }

    /// Start `command` from the task file.
    fn command(&self, s: &mut State, command: u8) {
        s.error = 0;
        s.pos = 0;
        s.transfer = Transfer::None;
        // Only drive 0 exists (bit 4 of the device register).
        if s.device & 0x10 != 0 {
            return Self::fail(s, ABRT);
        }
        let lba = u64::from(s.lba[0])
            | u64::from(s.lba[1]) << 8
            | u64::from(s.lba[2]) << 16
            | u64::from(s.device & 0x0f) << 24;
        let count = if s.count == 0 {
            256
        } else {
            u32::from(s.count)
        };
        let in_range = lba
            .checked_add(u64::from(count))
            .is_some_and(|end| end <= self.sectors);
        match command {
            CMD_READ_SECTORS | 0x21 => {
                if !in_range {
                    return Self::fail(s, IDNF | ABRT);
                }
                if self.load(s, lba).is_err() {
                    return Self::fail(s, ABRT);
                }
                s.transfer = Transfer::Read {
                    next_lba: lba + 1,
                    left: count - 1,
                };
                s.status = DRDY | DSC | DRQ;
            }
            CMD_WRITE_SECTORS | 0x31 => {
                if self.image.read_only() {
                    return Self::fail(s, ABRT);
                }
                if !in_range {
                    return Self::fail(s, IDNF | ABRT);
                }
                s.transfer = Transfer::Write { lba, left: count };
                s.status = DRDY | DSC | DRQ;
            }
            CMD_IDENTIFY => {
                s.buf = self.identify();
                s.transfer = Transfer::Read {
                    next_lba: 0,
                    left: 0,
                };
                s.status = DRDY | DSC | DRQ;
            }
            CMD_FLUSH_CACHE => match self.image.flush() {
                Ok(()) => s.status = DRDY | DSC,
                Err(_) => Self::fail(s, ABRT),
            },
            CMD_SET_FEATURES | 0x91 => s.status = DRDY | DSC,
            _ => Self::fail(s, ABRT),
        }
    }

    fn load(&self, s: &mut State, lba: u64) -> std::io::Result<()> {
        self.image.read_at(&mut s.buf, lba * SECTOR as u64)
    }

    /// The guest read `n` bytes (1, 2 or 4) from the data port.
    fn data_in(&self, s: &mut State, out: &mut [u8]) {
        let Transfer::Read { next_lba, left } = s.transfer else {
            out.fill(0xff);
            return;
        };
        let n = out.len().min(SECTOR - s.pos);
        out[..n].copy_from_slice(&s.buf[s.pos..s.pos + n]);
        out[n..].fill(0xff);
        s.pos += n;
        if s.pos < SECTOR {
            return;
        }
        s.pos = 0;
        if left == 0 {
            s.transfer = Transfer::None;
            s.status = DRDY | DSC;
        } else if self.load(s, next_lba).is_err() {
            Self::fail(s, ABRT);
        } else {
            s.transfer = Transfer::Read {
                next_lba: next_lba + 1,
                left: left - 1,
            };
        }
    }

    /// The guest wrote `data` (1, 2 or 4 bytes) to the data port.
    fn data_out(&self, s: &mut State, data: &[u8]) {
        let Transfer::Write { lba, left } = s.transfer else {
            return;
        };
        let n = data.len().min(SECTOR - s.pos);
        s.buf[s.pos..s.pos + n].copy_from_slice(&data[..n]);
        s.pos += n;
        if s.pos < SECTOR {
            return;
        }
        s.pos = 0;
        if self.image.write_at(&s.buf, lba * SECTOR as u64).is_err() {
            return Self::fail(s, ABRT);
        }
        if left <= 1 {
            s.transfer = Transfer::None;
            s.status = DRDY | DSC;
        } else {
            s.transfer = Transfer::Write {
                lba: lba + 1,
                left: left - 1,
            };
        }
    }
}

impl DevicePio for AtaDisk {
    fn pio_read(&self, base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        let mut s = self.lock();
        if base.0 == Self::CONTROL_BASE {
            // Alternate status.
            data.fill(0);
            data[0] = s.status;
            return;
        }
        if offset == 0 {
            return self.data_in(&mut s, data);
        }
        data.fill(0xff);
        let value = match offset {
            1 => s.error,
            2 => s.count,
            3 => s.lba[0],
            4 => s.lba[1],
            5 => s.lba[2],
            6 => s.device,
            7 => s.status,
            _ => return,
        };
        data[0] = value;
    }

    fn pio_write(&self, base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let mut s = self.lock();
        let Some(&value) = data.first() else {
            return;
        };
        if base.0 == Self::CONTROL_BASE {
            // Software reset: back to idle.
            if value & 0x04 != 0 && s.control & 0x04 == 0 {
                s.transfer = Transfer::None;
                s.status = DRDY | DSC;
                s.error = 0;
                s.pos = 0;
            }
            s.control = value;
            return;
        }
        match offset {
            0 => self.data_out(&mut s, data),
            1 => s.features = value,
            2 => s.count = value,
            3 => s.lba[0] = value,
            4 => s.lba[1] = value,
            5 => s.lba[2] = value,
            6 => s.device = value,
            7 => self.command(&mut s, value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// A disk on an anonymous scratch file, and a second handle to that file.
    fn disk(sectors: u64, read_only: bool) -> (AtaDisk, std::fs::File) {
        let f = vmm_sys_util::tempfile::TempFile::new_with_prefix("/tmp/vmcraft-ata")
            .unwrap()
            .into_file();
        f.set_len(sectors * SECTOR as u64).unwrap();
        let other = f.try_clone().unwrap();
        (AtaDisk::new(f, read_only).unwrap(), other)
    }

    const CMD: PioAddress = PioAddress(AtaDisk::COMMAND_BASE);

    fn out(d: &AtaDisk, off: u16, v: u8) {
        d.pio_write(CMD, off, &[v]);
    }
    fn inb(d: &AtaDisk, off: u16) -> u8 {
        let mut b = [0u8];
        d.pio_read(CMD, off, &mut b);
        b[0]
    }
    fn task(d: &AtaDisk, lba: u32, count: u8, cmd: u8) {
        out(d, 2, count);
        out(d, 3, lba as u8);
        out(d, 4, (lba >> 8) as u8);
        out(d, 5, (lba >> 16) as u8);
        out(d, 6, 0xe0 | ((lba >> 24) as u8 & 0x0f));
        out(d, 7, cmd);
    }
    fn read_words(d: &AtaDisk, n: usize) -> Vec<u8> {
        let mut v = Vec::new();
        for _ in 0..n {
            let mut w = [0u8; 2];
            d.pio_read(CMD, 0, &mut w);
            v.extend_from_slice(&w);
        }
        v
    }

    #[test]
    fn identify_reports_the_model_and_capacity() {
        let (d, _) = disk(1000, false);
        task(&d, 0, 0, CMD_IDENTIFY);
        assert_eq!(inb(&d, 7), DRDY | DSC | DRQ);
        let id = read_words(&d, 256);
        assert_eq!(inb(&d, 7), DRDY | DSC, "DRQ clears after 512 bytes");
        let model: Vec<u8> = id[54..94].chunks(2).flat_map(|c| [c[1], c[0]]).collect();
        assert!(model.starts_with(b"vmcraft emulated ATA disk"));
        assert_eq!(u32::from_le_bytes(id[120..124].try_into().unwrap()), 1000);
        assert_ne!(u16::from_le_bytes([id[98], id[99]]) & (1 << 9), 0, "LBA");
    }

    #[test]
    fn sectors_written_read_back_and_reach_the_file() {
        let (d, file) = disk(64, false);
        task(&d, 10, 2, CMD_WRITE_SECTORS);
        let data: Vec<u8> = (0..1024).map(|i| (i * 7 % 256) as u8).collect();
        for (i, w) in data.chunks(4).enumerate() {
            assert_eq!(inb(&d, 7) & DRQ, DRQ, "DRQ during the transfer ({i})");
            d.pio_write(CMD, 0, w); // 32-bit data port accesses
        }
        assert_eq!(inb(&d, 7), DRDY | DSC);
        task(&d, 0, 0, CMD_FLUSH_CACHE);
        assert_eq!(inb(&d, 7), DRDY | DSC);
        task(&d, 10, 2, CMD_READ_SECTORS);
        assert_eq!(read_words(&d, 512), data);
        assert_eq!(inb(&d, 7), DRDY | DSC);
        let mut on_disk = vec![0u8; 1024];
        file.read_exact_at(&mut on_disk, 10 * 512).unwrap();
        assert_eq!(on_disk, data);
    }

    #[test]
    fn bad_commands_and_sectors_get_error_status() {
        let (d, _) = disk(64, false);
        task(&d, 0, 1, 0x99);
        assert_eq!((inb(&d, 7) & ERR, inb(&d, 1)), (ERR, ABRT));
        task(&d, 64, 1, CMD_READ_SECTORS);
        assert_eq!((inb(&d, 7) & ERR, inb(&d, 1)), (ERR, IDNF | ABRT));
        task(&d, 0, 0, CMD_READ_SECTORS); // count 0 = 256 sectors > 64
        assert_eq!(inb(&d, 7) & ERR, ERR);
        // Drive 1 does not exist.
        out(&d, 6, 0xf0);
        out(&d, 7, CMD_IDENTIFY);
        assert_eq!(inb(&d, 7) & ERR, ERR);
        // The data port without a transfer reads all ones and ignores writes.
        assert_eq!(read_words(&d, 1), [0xff, 0xff]);
        d.pio_write(CMD, 0, &[1, 2]);
        // A new good command clears the error.
        task(&d, 0, 1, CMD_READ_SECTORS);
        assert_eq!(inb(&d, 7), DRDY | DSC | DRQ);
        assert_eq!(inb(&d, 1), 0);
        // Software reset abandons the transfer.
        d.pio_write(PioAddress(AtaDisk::CONTROL_BASE), 0, &[0x04]);
        assert_eq!(inb(&d, 7), DRDY | DSC);
    }

    /// A read and a write, each saved mid-sector and put back on another disk on the
    /// same image, go on where they were; states a disk cannot be in are refused.
    #[test]
    fn a_transfer_saved_mid_sector_goes_on_in_the_restored_disk() {
        let (d, file) = disk(64, false);
        let data: Vec<u8> = (0..1024).map(|i| (i * 13 % 251) as u8).collect();
        task(&d, 4, 2, CMD_WRITE_SECTORS);
        for w in data[..700].chunks(2) {
            d.pio_write(CMD, 0, w);
        }
        let saved = d.save_state();
        assert_eq!(saved.transfer, Transfer::Write { lba: 5, left: 1 });
        let restored = AtaDisk::new(file.try_clone().unwrap(), false).unwrap();
        restored.restore_state(&saved).unwrap();
        for w in data[700..].chunks(2) {
            restored.pio_write(CMD, 0, w);
        }
        assert_eq!(inb(&restored, 7), DRDY | DSC);
        task(&restored, 4, 2, CMD_READ_SECTORS);
        assert_eq!(read_words(&restored, 300), data[..600]);
        let saved = restored.save_state();
        let again = AtaDisk::new(file.try_clone().unwrap(), false).unwrap();
        again.restore_state(&saved).unwrap();
        assert_eq!(inb(&again, 7), DRDY | DSC | DRQ);
        assert_eq!(read_words(&again, 212), data[600..]);
        assert_eq!(inb(&again, 7), DRDY | DSC);
        assert_eq!(again.save_state().transfer, Transfer::None);

        let refused = |change: &dyn Fn(&mut AtaState), why: &str| {
            let mut s = saved.clone();
            change(&mut s);
            let e = again.restore_state(&s).unwrap_err();
            assert!(e.to_string().contains(why), "{e} (expected {why:?})");
            assert_eq!(e.device, "ATA disk");
        };
        refused(&|s| s.sectors = 65, "65 sectors");
        refused(&|s| s.buffer.pop().map_or((), drop), "511 bytes");
        refused(&|s| s.position = 512, "position 512");
        refused(
            &|s| {
                s.transfer = Transfer::Read {
                    next_lba: 60,
                    left: 5,
                }
            },
            "ends past",
        );
        refused(
            &|s| {
                s.transfer = Transfer::Write {
                    lba: u64::MAX,
                    left: 2,
                }
            },
            "ends past",
        );
        refused(
            &|s| s.transfer = Transfer::Write { lba: 0, left: 0 },
            "no sector left",
        );
        refused(&|s| s.registers[6] = BSY | DRDY, "status 0xc0");
        refused(&|s| s.registers[6] = DRDY | DSC, "status 0x50");
        // A refused state leaves the disk as it was.
        assert_eq!(inb(&again, 7), DRDY | DSC);
    }

    #[test]
    fn a_read_only_disk_aborts_writes() {
        let (d, _) = disk(8, true);
        task(&d, 0, 1, CMD_WRITE_SECTORS);
        assert_eq!((inb(&d, 7) & ERR, inb(&d, 1)), (ERR, ABRT));
    }
}
