//! The vmcraft devices served as vhost-user backends.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use virtio_queue::Queue;
use vmcraft_devices::virtio::block::{Block, Disk};
use vmcraft_devices::virtio::chain_buffers::ChainBuffers;
use vmcraft_devices::virtio::queue::ProtocolError;
use vmcraft_devices::virtio::{Interrupt, VirtioDevice};
use vmcraft_memory::GuestMemory;
use vmm_sys_util::eventfd::EventFd;

use crate::backend::ServedDevice;

/// The largest queue a served device takes.
pub const QUEUE_SIZE: u16 = 1024;

/// virtio-blk on a raw image, served as vmcraft's in-process device serves it (reads
/// of adjacent sectors merged, data straight between the image and guest memory).
#[derive(Debug)]
pub struct BlockDevice {
    /// The in-process device, never started here: its features and configuration
    /// space.
    model: Block,
    disk: Arc<Disk>,
    queues: usize,
    buffers: Vec<Mutex<ChainBuffers>>,
}

impl BlockDevice {
    /// virtio-blk on `disk` with `queues` request queues (1 to 16).
    pub fn new(disk: Disk, queues: u16) -> BlockDevice {
        let queues = queues.clamp(1, vmcraft_devices::virtio::block::MAX_QUEUES);
        let model = Block::new(disk, "vhost-user-blk").with_queues(queues);
        let disk = model.disk_slot().current();
        BlockDevice {
            model,
            disk,
            queues: usize::from(queues),
            buffers: (0..queues).map(|_| Mutex::default()).collect(),
        }
    }
}

impl ServedDevice for BlockDevice {
    fn name(&self) -> &str {
        "vhost-user-blk"
    }

    fn queues(&self) -> usize {
        self.queues
    }

    fn queue_size(&self) -> u16 {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        self.model.features()
    }

    fn acked_features(&self, features: u64) {
        // Without FLUSH the driver expects each write on stable storage when it
        // completes.
        let flush =
            1u64 << vmcraft_devices::virtio::virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH;
        self.disk.image().set_write_through(features & flush == 0);
    }

    fn config(&self) -> Vec<u8> {
        let mut config = vec![0u8; vmcraft_devices::virtio::block::CONFIG_SIZE];
        self.model.read_config(0, &mut config);
        config
    }

    fn serve(
        &self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
        interrupt: &Interrupt,
        requeue: &EventFd,
    ) -> Result<(), ProtocolError> {
        let mut buffers = self.buffers[index]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        vmcraft_devices::virtio::block::serve_queue(
            queue,
            mem,
            &self.disk,
            interrupt,
            requeue,
            &mut buffers,
        )
        .map(drop)
    }
}

/// virtio-rng from the host's getrandom.
#[derive(Debug, Default)]
pub struct RngDevice {
    scratch: Mutex<Vec<u8>>,
}

impl ServedDevice for RngDevice {
    fn name(&self) -> &str {
        "vhost-user-rng"
    }

    fn queues(&self) -> usize {
        1
    }

    fn queue_size(&self) -> u16 {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        vmcraft_devices::virtio::F_VERSION_1 | vmcraft_devices::virtio::F_EVENT_IDX
    }

    fn serve(
        &self,
        _index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
        interrupt: &Interrupt,
        requeue: &EventFd,
    ) -> Result<(), ProtocolError> {
        let mut scratch = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        if scratch.is_empty() {
            scratch.resize(4096, 0);
        }
        vmcraft_devices::virtio::rng::serve_queue(queue, mem, interrupt, requeue, &mut scratch)
            .map(drop)
    }
}

/// virtio-console with one port: the guest's output to a writer (the backend's
/// stdout), its input from a descriptor (the backend's stdin, made non-blocking),
/// held in a bounded buffer until the driver posts receive buffers.
pub struct ConsoleDevice {
    output: Mutex<Box<dyn Write + Send>>,
    input: Option<Mutex<std::fs::File>>,
    input_fd: Option<RawFd>,
    pending: Mutex<vmcraft_devices::virtio::console::Pending>,
}

impl std::fmt::Debug for ConsoleDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleDevice")
            .field("input_fd", &self.input_fd)
            .finish_non_exhaustive()
    }
}

impl ConsoleDevice {
    /// A console writing to `output` and reading `input` (set non-blocking here).
    pub fn new(
        output: Box<dyn Write + Send>,
        input: Option<std::fs::File>,
    ) -> std::io::Result<ConsoleDevice> {
        if let Some(file) = &input {
            set_nonblocking(file)?;
        }
        Ok(ConsoleDevice {
            output: Mutex::new(output),
            input_fd: input.as_ref().map(AsRawFd::as_raw_fd),
            input: input.map(Mutex::new),
            pending: Mutex::default(),
        })
    }
}

impl ServedDevice for ConsoleDevice {
    fn name(&self) -> &str {
        "vhost-user-console"
    }

    fn queues(&self) -> usize {
        2
    }

    fn queue_size(&self) -> u16 {
        vmcraft_devices::virtio::console::QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        vmcraft_devices::virtio::F_VERSION_1 | vmcraft_devices::virtio::F_EVENT_IDX
    }

    fn config(&self) -> Vec<u8> {
        // cols, rows, max_nr_ports (1), emerg_wr.
        let mut config = vec![0u8; 12];
        config[4] = 1;
        config
    }

    fn input(&self) -> Option<RawFd> {
        self.input_fd
    }

    fn read_input(&self) -> Option<usize> {
        let input = self.input.as_ref()?;
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let mut file = input.lock().unwrap_or_else(|p| p.into_inner());
        let mut buf = [0u8; 4096];
        // To its end or to the buffer's: the descriptor is watched edge-triggered.
        while pending.room() > 0 {
            let want = pending.room().min(buf.len());
            match file.read(&mut buf[..want]) {
                Ok(0) => break,
                Ok(n) => {
                    pending.push(&buf[..n]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        (!pending.is_empty()).then_some(vmcraft_devices::virtio::console::RX_QUEUE)
    }

    fn serve(
        &self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
        interrupt: &Interrupt,
        requeue: &EventFd,
    ) -> Result<(), ProtocolError> {
        use vmcraft_devices::virtio::console::{transmit, RX_QUEUE, TX_QUEUE};
        match index {
            TX_QUEUE => {
                let mut out = self.output.lock().unwrap_or_else(|p| p.into_inner());
                vmcraft_devices::virtio::queue::serve_available(
                    queue,
                    mem,
                    interrupt.queue(0),
                    requeue,
                    |chain| transmit(chain, mem, &mut **out),
                )
                .map(drop)
            }
            RX_QUEUE => self
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .deliver(queue, mem, interrupt)
                .map(drop),
            _ => Ok(()),
        }
    }
}

/// Make `file`'s descriptor non-blocking.
fn set_nonblocking(file: &std::fs::File) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor `file` owns, with integer arguments.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
