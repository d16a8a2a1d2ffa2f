//! virtio-blk on a raw image file.
//!
//! One request queue, served on the device's own I/O thread. Requests: read, write,
//! flush, get-id, discard and write-zeroes; a read-only mode; capacity, block size and
//! the limits below in the configuration space. A flush is completed only once
//! `fdatasync` has returned, so an acknowledged flush means the data is durable.
//!
//! Two kinds of bad input are told apart:
//! * a bad request in a well-formed chain (sector past the end, a length that is not a
//!   multiple of 512, data of the wrong direction, an unknown type, a write to a
//!   read-only disk) gets an error status (`IOERR` or `UNSUPP`) and the queue goes on;
//! * a broken chain (a loop, a chain longer than the queue, a buffer outside guest
//!   memory, no room for the status byte) or a broken ring (an available index that
//!   jumps more than the queue size) marks the device NEEDS_RESET.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{DescriptorChain, Queue, Reader, Writer};
use vm_memory::ByteValued;
use vmcraft_memory::poll::AdaptivePoll;
use vmcraft_memory::GuestMemory;

use super::queue::{check_chain, serve_available, serve_polling, ProtocolError};
use super::worker::{spawn_device, Worker};
use super::{
    read_config_bytes, ActivateError, ActiveQueues, Interrupt, VirtioDevice, F_EVENT_IDX,
    F_VERSION_1,
};

/// Sector size: the unit of every virtio-blk address and length.
pub const SECTOR_SIZE: u64 = 512;
/// Entries in the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most data segments in one request (advertised as `seg_max`).
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest data segment (advertised as `size_max`).
pub const SIZE_MAX: u32 = 1 << 20;
/// Most sectors one discard or write-zeroes segment may cover.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// Length of the get-id answer.
pub const ID_BYTES: usize = 20;
/// Size of the configuration space (`struct virtio_blk_config`).
pub const CONFIG_SIZE: usize = 60;

/// The request header every chain starts with.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct RequestHeader {
    /// Request type (`VIRTIO_BLK_T_*`).
    pub kind: u32,
    /// Reserved.
    pub reserved: u32,
    /// First sector.
    pub sector: u64,
}

// SAFETY: plain integers with no padding; any bit pattern is a valid value.
unsafe impl ByteValued for RequestHeader {}

/// One segment of a discard or write-zeroes request.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct DiscardSegment {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
    /// Bit 0: the device may unmap (write-zeroes only).
    pub flags: u32,
}

// SAFETY: plain integers with no padding; any bit pattern is a valid value.
unsafe impl ByteValued for DiscardSegment {}

/// The backing image and what the device may do with it.
#[derive(Debug)]
pub struct Disk {
    file: File,
    sectors: u64,
    read_only: bool,
    id: [u8; ID_BYTES],
    /// Make every completed write stable before its status: set when the driver did
    /// not accept VIRTIO_BLK_F_FLUSH (virtio 1.2 §5.2.6: then it may rely on that).
    write_through: std::sync::atomic::AtomicBool,
    /// How many times the backing file was synced (for tests and statistics).
    syncs: std::sync::atomic::AtomicU64,
}

impl Disk {
    /// A disk on `file` (its length, rounded down to whole sectors, is the capacity).
    /// `id` is the serial the guest reads with get-id (at most 20 bytes are kept).
    pub fn new(file: File, read_only: bool, id: &str) -> io::Result<Disk> {
        // Seeking to the end sizes block devices too (their metadata says 0 bytes).
        let sectors = io::Seek::seek(&mut &file, io::SeekFrom::End(0))? / SECTOR_SIZE;
        let mut serial = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        serial[..n].copy_from_slice(&id.as_bytes()[..n]);
        Ok(Disk {
            file,
            sectors,
            read_only,
            id: serial,
            write_through: false.into(),
            syncs: 0.into(),
        })
    }

    /// Sync every completed write before its status (`true`), or only on FLUSH. The
    /// device sets this at activation from whether the driver accepted
    /// VIRTIO_BLK_F_FLUSH.
    pub fn set_write_through(&self, on: bool) {
        self.write_through
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// How many times the backing file has been synced.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// `fdatasync` the backing file.
    fn sync(&self) -> io::Result<()> {
        self.syncs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.file.sync_data()
    }

    /// After a completed write: sync it if every write must be stable.
    fn settle(&self, written: io::Result<()>) -> io::Result<()> {
        written?;
        if self
            .write_through
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            self.sync()?;
        }
        Ok(())
    }

    /// Capacity in sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The backing file (for another kind of block device).
    pub fn into_file(self) -> File {
        self.file
    }

    /// Byte offset of `sectors` sectors at `sector`, if they lie within the disk.
    fn range(&self, sector: u64, sectors: u64) -> Option<u64> {
        let end = sector.checked_add(sectors)?;
        (end <= self.sectors).then_some(sector * SECTOR_SIZE)
    }
}

/// The virtio-blk device.
#[derive(Debug)]
pub struct Block {
    disk: Arc<Disk>,
    config: [u8; CONFIG_SIZE],
    worker: Option<Worker>,
    name: String,
    poll_max: Duration,
}

impl Block {
    /// A device serving `disk`; `name` names its I/O thread.
    pub fn new(disk: Disk, name: &str) -> Block {
        let mut config = [0u8; CONFIG_SIZE];
        let mut put = |at: usize, bytes: &[u8]| config[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, &disk.sectors.to_le_bytes());
        put(8, &SIZE_MAX.to_le_bytes());
        put(12, &SEG_MAX.to_le_bytes());
        put(20, &(SECTOR_SIZE as u32).to_le_bytes());
        put(34, &1u16.to_le_bytes()); // num_queues
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(40, &1u32.to_le_bytes()); // max_discard_seg
        put(44, &8u32.to_le_bytes()); // discard_sector_alignment: 4 KiB
        put(48, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(52, &1u32.to_le_bytes()); // max_write_zeroes_seg
        put(56, &[1]); // write_zeroes_may_unmap
        Block {
            disk: Arc::new(disk),
            config,
            worker: None,
            name: name.to_string(),
            poll_max: AdaptivePoll::DEFAULT_MAX,
        }
    }

    /// How long at most the I/O thread polls the queue for the driver's next request
    /// before it sleeps until notified (see [`serve_polling`]); zero turns polling
    /// off. Default: [`AdaptivePoll::DEFAULT_MAX`]. Takes effect at the next
    /// activation.
    pub fn with_poll_max(mut self, max: Duration) -> Block {
        self.poll_max = max;
        self
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let bit = |b: u32| 1u64 << b;
        let mut f = F_VERSION_1
            | F_EVENT_IDX
            | bit(VIRTIO_BLK_F_FLUSH)
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_SIZE_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE);
        if self.disk.read_only {
            f |= bit(VIRTIO_BLK_F_RO);
        } else {
            f |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data)
    }

    fn activate(&mut self, mut active: ActiveQueues) -> Result<(), ActivateError> {
        let [mut queue] = active.take_ready()?;
        let (mem, interrupt) = (active.mem.clone(), active.interrupt.clone());
        let disk = self.disk.clone();
        disk.set_write_through(active.driver_features & (1 << VIRTIO_BLK_F_FLUSH) == 0);
        let mut scratch = vec![0u8; 64 << 10];
        let requeue = active
            .notifiers
            .first()
            .ok_or(ActivateError::QueueNotReady(0))?
            .try_clone()
            .map_err(|source| ActivateError::Host {
                what: "duplicate the queue notifier",
                source,
            })?;
        let mut poll = AdaptivePoll::new(self.poll_max);
        let worker = spawn_device(&self.name, active, Vec::new(), move |_, _| {
            serve_polling(&mut queue, &mem, &interrupt, &mut poll, &requeue, |chain| {
                execute(chain, &mem, &disk, &mut scratch)
            })
            .map(drop)
        })?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        // Dropping the worker stops and joins the I/O thread.
        self.worker = None;
    }
}

/// Serve every available request of `queue` (see [`serve_available`]); returns how
/// many were completed.
pub fn serve_queue(
    queue: &mut Queue,
    mem: &GuestMemory,
    disk: &Disk,
    interrupt: &Interrupt,
    scratch: &mut [u8],
) -> Result<usize, ProtocolError> {
    serve_available(queue, mem, interrupt, |chain| {
        execute(chain, mem, disk, scratch)
    })
}

/// Execute one request chain against `disk`; returns the bytes written into the
/// chain (data and status), the `len` of its used element. `scratch` is the bounce
/// buffer (any size; 64 KiB is plenty).
pub fn execute(
    chain: DescriptorChain<&GuestMemory>,
    mem: &GuestMemory,
    disk: &Disk,
    scratch: &mut [u8],
) -> Result<u32, ProtocolError> {
    let count = check_chain(&chain)?;
    let oversized = chain.clone().any(|d| d.len() > SIZE_MAX) || count > SEG_MAX as usize + 2;
    let outside = ProtocolError::BufferOutsideMemory;
    let mut reader: Reader<'_, _> = Reader::new(mem, chain.clone()).map_err(outside)?;
    let mut writer: Writer<'_, _> = Writer::new(mem, chain).map_err(outside)?;
    let writable = writer.available_bytes();
    if writable == 0 {
        return Err(ProtocolError::NoStatusByte);
    }
    let mut status_writer = writer.split_at(writable - 1).map_err(ProtocolError::Ring)?;
    let status = if oversized {
        VIRTIO_BLK_S_IOERR
    } else {
        match reader.read_obj::<RequestHeader>() {
            Ok(header) => run(header, &mut reader, &mut writer, disk, scratch),
            Err(_) => VIRTIO_BLK_S_IOERR,
        }
    };
    // Cannot fail: the status writer has exactly one byte of room.
    let _ = status_writer.write_all(&[status as u8]);
    Ok(writer.bytes_written() as u32 + 1)
}

fn run<B: vm_memory::bitmap::BitmapSlice>(
    header: RequestHeader,
    reader: &mut Reader<'_, B>,
    writer: &mut Writer<'_, B>,
    disk: &Disk,
    scratch: &mut [u8],
) -> u32 {
    let io = |r: io::Result<()>| match r {
        Ok(()) => VIRTIO_BLK_S_OK,
        Err(e) => {
            log::warn!(
                "virtio-blk: request type {} at sector {} failed: {e}",
                header.kind,
                header.sector
            );
            VIRTIO_BLK_S_IOERR
        }
    };
    match header.kind {
        VIRTIO_BLK_T_IN => {
            let len = writer.available_bytes() as u64;
            if reader.available_bytes() != 0 || !len.is_multiple_of(SECTOR_SIZE) {
                return VIRTIO_BLK_S_IOERR;
            }
            let Some(offset) = disk.range(header.sector, len / SECTOR_SIZE) else {
                return VIRTIO_BLK_S_IOERR;
            };
            io(copy_to_guest(disk, offset, len, writer, scratch))
        }
        VIRTIO_BLK_T_OUT => {
            let len = reader.available_bytes() as u64;
            if writer.available_bytes() != 0 || !len.is_multiple_of(SECTOR_SIZE) || disk.read_only {
                return VIRTIO_BLK_S_IOERR;
            }
            let Some(offset) = disk.range(header.sector, len / SECTOR_SIZE) else {
                return VIRTIO_BLK_S_IOERR;
            };
            io(disk.settle(copy_from_guest(disk, offset, len, reader, scratch)))
        }
        VIRTIO_BLK_T_FLUSH => io(disk.sync()),
        VIRTIO_BLK_T_GET_ID => {
            let n = writer.available_bytes().min(ID_BYTES);
            io(writer.write_all(&disk.id[..n]))
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if disk.read_only || writer.available_bytes() != 0 {
                return VIRTIO_BLK_S_IOERR;
            }
            // One segment per request (max_discard_seg = max_write_zeroes_seg = 1).
            if reader.available_bytes() != std::mem::size_of::<DiscardSegment>() {
                return VIRTIO_BLK_S_IOERR;
            }
            let Ok(seg) = reader.read_obj::<DiscardSegment>() else {
                return VIRTIO_BLK_S_IOERR;
            };
            let zeroes = header.kind == VIRTIO_BLK_T_WRITE_ZEROES;
            if seg.flags & !1 != 0 || (!zeroes && seg.flags != 0) {
                return VIRTIO_BLK_S_UNSUPP;
            }
            if seg.num_sectors > MAX_DISCARD_SECTORS {
                return VIRTIO_BLK_S_IOERR;
            }
            let Some(offset) = disk.range(seg.sector, u64::from(seg.num_sectors)) else {
                return VIRTIO_BLK_S_IOERR;
            };
            let len = u64::from(seg.num_sectors) * SECTOR_SIZE;
            if zeroes {
                io(disk.settle(zero_range(disk, offset, len, scratch)))
            } else {
                // Discard is a hint: a file system without hole punching keeps the data.
                let _ = punch_hole(&disk.file, offset, len);
                io(disk.settle(Ok(())))
            }
        }
        _ => VIRTIO_BLK_S_UNSUPP,
    }
}

fn copy_to_guest<B: vm_memory::bitmap::BitmapSlice>(
    disk: &Disk,
    mut offset: u64,
    mut len: u64,
    writer: &mut Writer<'_, B>,
    scratch: &mut [u8],
) -> io::Result<()> {
    while len > 0 {
        let n = (len as usize).min(scratch.len());
        disk.file.read_exact_at(&mut scratch[..n], offset)?;
        writer.write_all(&scratch[..n])?;
        offset += n as u64;
        len -= n as u64;
    }
    Ok(())
}

fn copy_from_guest<B: vm_memory::bitmap::BitmapSlice>(
    disk: &Disk,
    mut offset: u64,
    mut len: u64,
    reader: &mut Reader<'_, B>,
    scratch: &mut [u8],
) -> io::Result<()> {
    while len > 0 {
        let n = (len as usize).min(scratch.len());
        reader.read_exact(&mut scratch[..n])?;
        disk.file.write_all_at(&scratch[..n], offset)?;
        offset += n as u64;
        len -= n as u64;
    }
    Ok(())
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    // SAFETY: fallocate only reads its integer arguments; the descriptor is open for as
    // long as `file` is borrowed.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

/// Zero a range: let the file system do it, or write zeroes.
fn zero_range(disk: &Disk, mut offset: u64, mut len: u64, scratch: &mut [u8]) -> io::Result<()> {
    if fallocate(
        &disk.file,
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
    .is_ok()
    {
        return Ok(());
    }
    scratch.fill(0);
    while len > 0 {
        let n = (len as usize).min(scratch.len());
        disk.file.write_all_at(&scratch[..n], offset)?;
        offset += n as u64;
        len -= n as u64;
    }
    Ok(())
}

#[cfg(test)]
#[path = "block_tests.rs"]
mod tests;
