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
use std::io;
use std::sync::Arc;
use std::time::Duration;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{ByteValued, Bytes, GuestAddress};
use vmcraft_block::{BlockImage, MergedReads};
use vmcraft_memory::poll::AdaptivePoll;
use vmcraft_memory::vectored::{Gather, IoVecs};
use vmcraft_memory::GuestMemory;
use vmm_sys_util::eventfd::EventFd;

use super::chain_buffers::{ChainBuffers, LoadedChain};
use super::queue::{check_chain, serve_polling, serve_with, ChainHandler, ProtocolError};
use super::worker::{spawn_queue, Worker};
use super::{
    read_config_bytes, ActivateError, ActiveQueues, Interrupt, VirtioDevice, F_EVENT_IDX,
    F_VERSION_1, INT_CONFIG,
};

/// Sector size: the unit of every virtio-blk address and length.
pub const SECTOR_SIZE: u64 = vmcraft_block::SECTOR_SIZE;
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

/// The backing image and the serial the guest reads with get-id.
#[derive(Debug)]
pub struct Disk {
    image: BlockImage,
    id: [u8; ID_BYTES],
}

impl Disk {
    /// A disk on `file` (its length, rounded down to whole sectors, is the capacity).
    /// `id` is the serial the guest reads with get-id (at most 20 bytes are kept).
    pub fn new(file: File, read_only: bool, id: &str) -> io::Result<Disk> {
        Ok(Disk::on(BlockImage::open(file, read_only)?, id))
    }

    /// A disk on an image already opened.
    pub fn on(image: BlockImage, id: &str) -> Disk {
        let mut serial = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        serial[..n].copy_from_slice(&id.as_bytes()[..n]);
        Disk { image, id: serial }
    }

    /// The image.
    pub fn image(&self) -> &BlockImage {
        &self.image
    }

    /// Capacity in sectors.
    pub fn sectors(&self) -> u64 {
        self.image.sectors()
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.image.read_only()
    }

    /// How many times the backing file has been synced.
    pub fn syncs(&self) -> u64 {
        self.image.syncs()
    }

    /// The backing file (for another kind of block device).
    pub fn into_file(self) -> File {
        self.image.into_file()
    }

    /// Byte offset of `sectors` sectors at `sector`, if they lie within the disk.
    fn range(&self, sector: u64, sectors: u64) -> Option<u64> {
        self.image.range(sector, sectors).ok()
    }
}

/// A disk's backing file could not be replaced.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplaceError {
    /// The new image is read-only where the old one was writable, or the other way:
    /// the driver negotiated its features on the old one.
    #[error("the new image is {new} where the disk is {old} (the driver negotiated on that)")]
    ReadOnly {
        /// What the new one is.
        new: &'static str,
        /// What the disk is.
        old: &'static str,
    },
}

/// The disk a virtio-blk device serves, replaceable while it runs (Firecracker's
/// `PATCH /drives/{id}`): a clone of [`Block::disk_slot`] kept by the embedder.
/// Requests a device thread is in the middle of finish on the old image; every
/// request after [`DiskSlot::replace`] returns goes to the new one, and a driver that
/// runs is told with a configuration-change interrupt (the capacity may differ).
#[derive(Debug, Clone)]
pub struct DiskSlot {
    inner: Arc<SlotInner>,
}

#[derive(Debug)]
struct SlotInner {
    disk: std::sync::RwLock<Arc<Disk>>,
    /// The driver's interrupt while the device is active.
    interrupt: std::sync::Mutex<Option<Arc<Interrupt>>>,
    /// Whether the driver took no FLUSH (each write synced): kept for a new image.
    write_through: std::sync::atomic::AtomicBool,
}

impl DiskSlot {
    fn new(disk: Disk) -> DiskSlot {
        DiskSlot {
            inner: Arc::new(SlotInner {
                disk: std::sync::RwLock::new(Arc::new(disk)),
                interrupt: std::sync::Mutex::new(None),
                write_through: false.into(),
            }),
        }
    }

    /// The disk served now.
    pub fn current(&self) -> Arc<Disk> {
        self.inner
            .disk
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Serve `image` from now on, under the serial the disk had. It must be
    /// read-only exactly when the disk was.
    pub fn replace(&self, image: BlockImage) -> Result<(), ReplaceError> {
        let what = |ro: bool| if ro { "read-only" } else { "writable" };
        let old = self.current();
        if image.read_only() != old.read_only() {
            return Err(ReplaceError::ReadOnly {
                new: what(image.read_only()),
                old: what(old.read_only()),
            });
        }
        image.set_write_through(
            self.inner
                .write_through
                .load(std::sync::atomic::Ordering::SeqCst),
        );
        let disk = Disk { image, id: old.id };
        *self.inner.disk.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(disk);
        if let Some(i) = self
            .inner
            .interrupt
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            i.raise(INT_CONFIG);
        }
        Ok(())
    }

    fn set_interrupt(&self, interrupt: Option<Arc<Interrupt>>) {
        *self
            .inner
            .interrupt
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = interrupt;
    }
}

/// The virtio-blk device.
#[derive(Debug)]
pub struct Block {
    disk: DiskSlot,
    config: [u8; CONFIG_SIZE],
    /// Each queue's maximum size (one queue unless [`Block::with_queues`]).
    queue_sizes: Vec<u16>,
    /// One I/O thread per queue while active.
    workers: Vec<Worker>,
    name: String,
    poll_max: Duration,
}

/// The most queues a block device takes ([`Block::with_queues`]).
pub const MAX_QUEUES: u16 = 16;

impl Block {
    /// A device serving `disk`; `name` names its I/O thread.
    pub fn new(disk: Disk, name: &str) -> Block {
        let mut config = [0u8; CONFIG_SIZE];
        let mut put = |at: usize, bytes: &[u8]| config[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, &disk.sectors().to_le_bytes());
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
            disk: DiskSlot::new(disk),
            config,
            queue_sizes: vec![QUEUE_SIZE],
            workers: Vec::new(),
            name: name.to_string(),
            poll_max: AdaptivePoll::DEFAULT_MAX,
        }
    }

    /// Serve `queues` request queues (1 to [`MAX_QUEUES`]; VIRTIO_BLK_F_MQ past one),
    /// each on its own I/O thread: with a transport that gives each queue its own
    /// interrupt (virtio-pci's MSI-X), a guest submits and completes on each vCPU's
    /// queue without the others. Out-of-range counts are clamped.
    pub fn with_queues(mut self, queues: u16) -> Block {
        let n = queues.clamp(1, MAX_QUEUES);
        self.queue_sizes = vec![QUEUE_SIZE; usize::from(n)];
        self.config[34..36].copy_from_slice(&n.to_le_bytes());
        self
    }

    /// The slot of the disk it serves, to replace the disk while it runs.
    pub fn disk_slot(&self) -> DiskSlot {
        self.disk.clone()
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
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        let bit = |b: u32| 1u64 << b;
        let mut f = F_VERSION_1
            | F_EVENT_IDX
            | bit(VIRTIO_BLK_F_FLUSH)
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_SIZE_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE);
        if self.queue_sizes.len() > 1 {
            f |= bit(VIRTIO_BLK_F_MQ);
        }
        if self.disk.current().read_only() {
            f |= bit(VIRTIO_BLK_F_RO);
        } else {
            f |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // The capacity is the disk served now (it may have been replaced).
        let mut config = self.config;
        config[..8].copy_from_slice(&self.disk.current().sectors().to_le_bytes());
        read_config_bytes(&config, offset, data)
    }

    fn activate(&mut self, mut active: ActiveQueues) -> Result<(), ActivateError> {
        let queues = active.take_all_ready()?;
        let slot = self.disk.clone();
        let write_through = active.driver_features & (1 << VIRTIO_BLK_F_FLUSH) == 0;
        slot.inner
            .write_through
            .store(write_through, std::sync::atomic::Ordering::SeqCst);
        slot.current().image.set_write_through(write_through);
        slot.set_interrupt(Some(active.interrupt.clone()));
        let mut workers = Vec::with_capacity(queues.len());
        for (index, mut queue) in queues.into_iter().enumerate() {
            let (mem, interrupt, slot) =
                (active.mem.clone(), active.interrupt.clone(), slot.clone());
            let mut buffers = ChainBuffers::default();
            let (mut run, mut data) = (ReadRun::default(), IoVecs::default());
            let requeue = active.requeue(index)?;
            let mut poll = AdaptivePoll::new(self.poll_max);
            let serve = move |_: &vmm_sys_util::epoll::Epoll, _| {
                // The disk of this serving call: a replacement takes effect at the next.
                let disk = slot.current();
                let handler = BlockQueue::new(&mem, &disk, &mut buffers, &mut run, &mut data);
                serve_polling(
                    &mut queue,
                    &mem,
                    interrupt.queue(index as u16),
                    &mut poll,
                    &requeue,
                    handler,
                )
                .map(drop)
            };
            // One queue: the device's one I/O thread; several: one per queue.
            let thread = if self.queue_sizes.len() == 1 {
                format!("{}-io", self.name)
            } else {
                format!("{}-q{index}", self.name)
            };
            let notifier = active.requeue(index)?;
            let worker = spawn_queue(
                thread,
                &self.name,
                notifier,
                active.interrupt.clone(),
                serve,
            )?;
            workers.push(worker);
        }
        self.workers = workers;
        Ok(())
    }

    fn reset(&mut self) {
        // Dropping the workers stops and joins the I/O threads.
        self.workers.clear();
        self.disk.set_interrupt(None);
    }

    fn workers(&self) -> &[Worker] {
        &self.workers
    }
}

/// Serve the available requests of `queue` as the device thread does (see
/// [`serve_with`], whose budget signals `requeue`), reads of adjacent sectors merged;
/// returns how many were completed. `buffers` is reused from request to request.
pub fn serve_queue(
    queue: &mut Queue,
    mem: &GuestMemory,
    disk: &Disk,
    interrupt: &Interrupt,
    requeue: &EventFd,
    buffers: &mut ChainBuffers,
) -> Result<usize, ProtocolError> {
    let (mut run, mut data) = (ReadRun::default(), IoVecs::default());
    let handler = BlockQueue::new(mem, disk, buffers, &mut run, &mut data);
    serve_with(queue, mem, interrupt.queue(0), requeue, handler)
}

/// Execute one request chain against `disk`; returns the bytes written into the
/// chain (data and status), the `len` of its used element. Data moves between the
/// image and guest memory in one `preadv`/`pwritev`, with no copy in between.
pub fn execute(
    chain: DescriptorChain<&GuestMemory>,
    mem: &GuestMemory,
    disk: &Disk,
    buffers: &mut ChainBuffers,
) -> Result<u32, ProtocolError> {
    let used = execute_or_hold(chain, mem, disk, buffers, None)?;
    // Without a run nothing is held.
    Ok(used.unwrap_or(1))
}

/// [`execute`], except that with a `run` a read that continues it is held there (and
/// `None` returned) to be done with its neighbours; any other request first does the
/// held reads, so that no request overtakes a read that came before it.
fn execute_or_hold(
    chain: DescriptorChain<&GuestMemory>,
    mem: &GuestMemory,
    disk: &Disk,
    buffers: &mut ChainBuffers,
    run: Option<(&mut ReadRun, &mut Gather<'_>)>,
) -> Result<Option<u32>, ProtocolError> {
    let head = chain.head_index();
    let count = check_chain(&chain)?;
    let oversized = chain.clone().any(|d| d.len() > SIZE_MAX) || count > SEG_MAX as usize + 2;
    let mut request = buffers.load(mem, chain)?;
    // The status is the last device-writable byte; the data area is what precedes it.
    let Some(data_room) = request.writable_len().checked_sub(1) else {
        return Err(ProtocolError::NoStatusByte);
    };
    let mut header = RequestHeader::default();
    let readable = !oversized && request.read(0, header.as_mut_slice()).is_ok();
    if let Some((run, data)) = run {
        if readable && header.kind == VIRTIO_BLK_T_IN && data_room > 0 {
            if let Some(offset) = read_offset(&header, &request, data_room, disk) {
                if !run.continues(offset, data) {
                    run.flush(data, mem, disk);
                }
                run.hold(&request, data, head, offset, data_room)?;
                return Ok(None);
            }
        }
        run.flush(data, mem, disk);
    }
    let (status, written) = if readable {
        run_request(header, &mut request, data_room, disk)
    } else {
        (VIRTIO_BLK_S_IOERR, 0)
    };
    request
        .write(data_room, &[status as u8])
        .map_err(|e| ProtocolError::BufferCopy {
            what: "status byte",
            source: io::Error::other(e),
        })?;
    Ok(Some(written as u32 + 1))
}

/// The image offset a read of `data_room` bytes reads from, if the read is valid: no
/// data after the header, whole sectors, within the disk.
fn read_offset(
    header: &RequestHeader,
    request: &LoadedChain<'_>,
    data_room: usize,
    disk: &Disk,
) -> Option<u64> {
    let len = data_room as u64;
    let payload = request.readable_len() - std::mem::size_of::<RequestHeader>();
    if payload != 0 || !len.is_multiple_of(SECTOR_SIZE) {
        return None;
    }
    disk.range(header.sector, len / SECTOR_SIZE)
}

/// Reads of adjacent sectors from consecutive chains, merged by the block engine
/// ([`MergedReads`]); each chain still gets its own status. The data's guest ranges
/// are gathered in the [`Gather`] that [`BlockQueue`] carries for one serving call.
#[derive(Debug, Default)]
struct ReadRun {
    merged: MergedReads<HeldRead>,
    /// Chains whose I/O is done, to be completed: (head index, used length).
    done: Vec<(u16, u32)>,
}

/// One chain held in a [`ReadRun`].
#[derive(Debug, Clone, Copy)]
struct HeldRead {
    head: u16,
    /// Where its status byte goes.
    status: GuestAddress,
    bytes: usize,
}

impl ReadRun {
    /// Whether a read at image offset `offset` can join the run gathered in `data`.
    fn continues(&self, offset: u64, data: &Gather<'_>) -> bool {
        self.merged.continues(offset, data)
    }

    /// Hold `request`'s read of `bytes` bytes at `offset` (the caller checked both).
    fn hold(
        &mut self,
        request: &LoadedChain<'_>,
        data: &mut Gather<'_>,
        head: u16,
        offset: u64,
        bytes: usize,
    ) -> Result<(), ProtocolError> {
        let status = request
            .writable_address(bytes)
            .ok_or(ProtocolError::NoStatusByte)?;
        request
            .gather_writable(0, bytes, data)
            .map_err(|source| ProtocolError::BufferCopy {
                what: "read data",
                source,
            })?;
        let held = HeldRead {
            head,
            status,
            bytes,
        };
        self.merged.hold(held, offset, bytes as u64, data);
        Ok(())
    }

    /// Do every held read, write each chain's status and move it to the done list.
    fn flush(&mut self, data: &mut Gather<'_>, mem: &GuestMemory, disk: &Disk) {
        let done = &mut self.done;
        self.merged
            .flush(&disk.image, data, |held, offset, result| {
                let (status, used) = match result {
                    Ok(()) => (VIRTIO_BLK_S_OK, held.bytes as u32 + 1),
                    Err(e) => {
                        log::warn!(
                            "virtio-blk: read of {} bytes at byte {offset} failed: {e}",
                            held.bytes
                        );
                        (VIRTIO_BLK_S_IOERR, 1)
                    }
                };
                if let Err(e) = mem.write_obj(status as u8, held.status) {
                    // Resolved in guest memory when the chain was held: cannot happen.
                    log::warn!("virtio-blk: status byte at {:#x}: {e}", held.status.0);
                }
                done.push((held.head, used));
            });
    }
}

/// The device thread's handler for one serving call: requests in order, adjacent
/// reads merged.
struct BlockQueue<'a> {
    mem: &'a GuestMemory,
    disk: &'a Disk,
    buffers: &'a mut ChainBuffers,
    run: &'a mut ReadRun,
    data: Gather<'a>,
}

impl<'a> BlockQueue<'a> {
    fn new(
        mem: &'a GuestMemory,
        disk: &'a Disk,
        buffers: &'a mut ChainBuffers,
        run: &'a mut ReadRun,
        data: &'a mut IoVecs,
    ) -> Self {
        BlockQueue {
            mem,
            disk,
            buffers,
            run,
            data: data.gather(mem),
        }
    }
}

impl ChainHandler for BlockQueue<'_> {
    fn handle(
        &mut self,
        chain: DescriptorChain<&GuestMemory>,
    ) -> Result<Option<u32>, ProtocolError> {
        execute_or_hold(
            chain,
            self.mem,
            self.disk,
            self.buffers,
            Some((self.run, &mut self.data)),
        )
    }

    fn finish(
        &mut self,
        complete: &mut dyn FnMut(u16, u32) -> Result<(), ProtocolError>,
    ) -> Result<(), ProtocolError> {
        self.run.flush(&mut self.data, self.mem, self.disk);
        for (head, used) in self.run.done.drain(..) {
            complete(head, used)?;
        }
        Ok(())
    }
}

/// Carry out a request whose header is read; returns its status and how many data
/// bytes it wrote into the chain.
fn run_request(
    header: RequestHeader,
    request: &mut LoadedChain<'_>,
    data_room: usize,
    disk: &Disk,
) -> (u32, usize) {
    const HEADER: usize = std::mem::size_of::<RequestHeader>();
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
    let payload = request.readable_len() - HEADER;
    let status_only = |status| (status, 0);
    match header.kind {
        VIRTIO_BLK_T_IN => {
            let len = data_room as u64;
            if payload != 0 || !len.is_multiple_of(SECTOR_SIZE) {
                return status_only(VIRTIO_BLK_S_IOERR);
            }
            let Some(offset) = disk.range(header.sector, len / SECTOR_SIZE) else {
                return status_only(VIRTIO_BLK_S_IOERR);
            };
            match io(request.read_file(disk.image.file(), offset, 0, data_room)) {
                VIRTIO_BLK_S_OK => (VIRTIO_BLK_S_OK, data_room),
                failed => status_only(failed),
            }
        }
        VIRTIO_BLK_T_OUT => {
            let len = payload as u64;
            if data_room != 0 || !len.is_multiple_of(SECTOR_SIZE) || disk.read_only() {
                return status_only(VIRTIO_BLK_S_IOERR);
            }
            let Some(offset) = disk.range(header.sector, len / SECTOR_SIZE) else {
                return status_only(VIRTIO_BLK_S_IOERR);
            };
            let written = request.write_file(disk.image.file(), offset, HEADER, payload);
            status_only(io(disk.image.completed_write(written)))
        }
        VIRTIO_BLK_T_FLUSH => status_only(io(disk.image.flush())),
        VIRTIO_BLK_T_GET_ID => {
            let n = data_room.min(ID_BYTES);
            match io(request.write(0, &disk.id[..n]).map_err(io::Error::other)) {
                VIRTIO_BLK_S_OK => (VIRTIO_BLK_S_OK, n),
                failed => status_only(failed),
            }
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if disk.read_only() || data_room != 0 {
                return status_only(VIRTIO_BLK_S_IOERR);
            }
            // One segment per request (max_discard_seg = max_write_zeroes_seg = 1).
            let mut seg = DiscardSegment::default();
            if payload != std::mem::size_of::<DiscardSegment>()
                || request.read(HEADER, seg.as_mut_slice()).is_err()
            {
                return status_only(VIRTIO_BLK_S_IOERR);
            }
            let zeroes = header.kind == VIRTIO_BLK_T_WRITE_ZEROES;
            if seg.flags & !1 != 0 || (!zeroes && seg.flags != 0) {
                return status_only(VIRTIO_BLK_S_UNSUPP);
            }
            if seg.num_sectors > MAX_DISCARD_SECTORS {
                return status_only(VIRTIO_BLK_S_IOERR);
            }
            let Some(offset) = disk.range(seg.sector, u64::from(seg.num_sectors)) else {
                return status_only(VIRTIO_BLK_S_IOERR);
            };
            let len = u64::from(seg.num_sectors) * SECTOR_SIZE;
            if zeroes {
                status_only(io(disk.image.write_zeroes(offset, len)))
            } else {
                status_only(io(disk.image.discard(offset, len)))
            }
        }
        _ => status_only(VIRTIO_BLK_S_UNSUPP),
    }
}

#[cfg(test)]
#[path = "block_tests.rs"]
mod tests;
