//! A vmcraft device behind rust-vmm's vhost-user backend daemon.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryBackend, GuestMemoryRegion};
use vmcraft_devices::virtio::queue::ProtocolError;
use vmcraft_devices::virtio::Interrupt;
use vmcraft_memory::{GuestMemory, SharedRegion};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The frontend's memory as the vhost-user-backend crate keeps it.
pub type FrontendMemory = vm_memory::GuestMemoryAtomic<vm_memory::GuestMemoryMmap<()>>;

/// What a device served as a vhost-user backend provides.
pub trait ServedDevice: Send + Sync + 'static {
    /// The device's name, for logs.
    fn name(&self) -> &str;
    /// How many queues.
    fn queues(&self) -> usize;
    /// The largest size of each queue.
    fn queue_size(&self) -> u16;
    /// The virtio features offered (VERSION_1 and EVENT_IDX included).
    fn features(&self) -> u64;
    /// The features the driver took.
    fn acked_features(&self, features: u64) {
        let _ = features;
    }
    /// The configuration space.
    fn config(&self) -> Vec<u8> {
        Vec::new()
    }
    /// A descriptor whose input the device takes (a console's stdin), watched
    /// edge-triggered: [`read_input`](Self::read_input) reads it to its end.
    fn input(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// The input is readable (or a queue was served and there may be room for
    /// more): read what there is room for; returns the queue to serve with it.
    fn read_input(&self) -> Option<usize> {
        None
    }
    /// Serve what the driver made available on queue `index`; `interrupt` is
    /// signalled when the driver is to be told, `requeue` when the budget of one call
    /// is spent with chains left.
    fn serve(
        &self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
        interrupt: &Interrupt,
        requeue: &EventFd,
    ) -> Result<(), ProtocolError>;
}

/// The vhost-user backend of a [`ServedDevice`]. See the [crate documentation](crate).
pub struct Backend<D: ServedDevice> {
    device: D,
    /// The frontend's memory, mapped as vmcraft's device code takes it.
    memory: Mutex<Option<GuestMemory>>,
    /// Per queue: the interrupt the serving code signals (read after serving and
    /// passed on to the vring's call eventfd).
    interrupts: Vec<Interrupt>,
    /// Per queue: signalled by the serving code when it stops at its budget.
    requeues: Vec<EventFd>,
    /// Per queue: the driver broke the protocol; the queue is no longer served.
    broken: Vec<AtomicBool>,
    exit: (Mutex<Option<EventConsumer>>, EventNotifier),
}

impl<D: ServedDevice> std::fmt::Debug for Backend<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("device", &self.device.name())
            .finish_non_exhaustive()
    }
}

/// The vrings' type.
pub type Vring = VringRwLock<FrontendMemory>;

impl<D: ServedDevice> Backend<D> {
    /// A backend for `device`.
    pub fn new(device: D) -> io::Result<Self> {
        let n = device.queues();
        let interrupts = (0..n)
            .map(|_| Interrupt::new())
            .collect::<io::Result<_>>()?;
        let requeues = (0..n)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<_>>()?;
        let (consumer, notifier) = new_event_consumer_and_notifier(EventFlag::NONBLOCK)?;
        Ok(Backend {
            device,
            memory: Mutex::new(None),
            interrupts,
            requeues,
            broken: (0..n).map(|_| AtomicBool::new(false)).collect(),
            exit: (Mutex::new(Some(consumer)), notifier),
        })
    }

    /// The served device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The descriptors to register with the daemon's event loop (thread 0) as
    /// `(fd, events, event id)`: each queue's requeue, and the device's input.
    pub fn listeners(&self) -> Vec<(std::os::fd::RawFd, EventSet, u64)> {
        use std::os::fd::AsRawFd;
        let n = self.device.queues() as u64;
        let mut fds: Vec<_> = self
            .requeues
            .iter()
            .enumerate()
            .map(|(i, fd)| (fd.as_raw_fd(), EventSet::IN, n + 1 + i as u64))
            .collect();
        if let Some(fd) = self.device.input() {
            fds.push((fd, EventSet::IN | EventSet::EDGE_TRIGGERED, 2 * n + 1));
        }
        fds
    }

    /// Ask the daemon's event loop to end.
    pub fn request_exit(&self) {
        let _ = self.exit.1.notify();
    }

    fn serve_queue(&self, index: usize, vring: &Vring) -> io::Result<()> {
        if self.broken[index].load(Ordering::SeqCst) {
            return Ok(());
        }
        let Some(mem) = self
            .memory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        else {
            return Ok(());
        };
        let mut state = vring.get_mut();
        if !state.is_enabled() || !state.get_queue().ready() {
            return Ok(());
        }
        let served = self.device.serve(
            index,
            state.get_queue_mut(),
            &mem,
            &self.interrupts[index],
            &self.requeues[index],
        );
        // The serving code raised the interrupt: pass it to the frontend's call
        // eventfd (the one in force now).
        if self.interrupts[index].irq_eventfd().read().is_ok() {
            state.signal_used_queue()?;
        }
        if let Err(e) = served {
            log::error!(
                "{}: the driver broke the virtio protocol on queue {index}, which is no longer served: {e}",
                self.device.name()
            );
            self.broken[index].store(true, Ordering::SeqCst);
        }
        Ok(())
    }
}

impl<D: ServedDevice> VhostUserBackend for Backend<D> {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.device.queues()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.device.queue_size())
    }

    fn features(&self) -> u64 {
        self.device.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        self.device.acked_features(features)
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        let mut f = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK;
        if !self.device.config().is_empty() {
            f |= VhostUserProtocolFeatures::CONFIG;
        }
        f
    }

    fn set_event_idx(&self, _enabled: bool) {
        // Each vring's queue carries it (the daemon sets it from the features).
    }

    fn reset_device(&self) {
        for flag in &self.broken {
            flag.store(false, Ordering::SeqCst);
        }
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let config = self.device.config();
        let start = offset as usize;
        match start.checked_add(size as usize) {
            Some(end) if end <= config.len() => config[start..end].to_vec(),
            // Outside the configuration space: an empty answer, which the frontend
            // reads as a failure.
            _ => Vec::new(),
        }
    }

    fn update_memory(&self, mem: FrontendMemory) -> io::Result<()> {
        let snapshot = mem.memory();
        let mut regions = Vec::new();
        for region in snapshot.iter() {
            let file = region.file_offset().ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "the region at {:#x} has no memory file",
                        region.start_addr().0
                    ),
                )
            })?;
            regions.push((
                region.start_addr().0,
                region.len(),
                file.file(),
                file.start(),
            ));
        }
        let shared: Vec<SharedRegion<'_>> = regions
            .iter()
            .map(|&(guest_addr, size, file, offset)| SharedRegion {
                guest_addr,
                size,
                file,
                offset,
            })
            .collect();
        let mapped = vmcraft_memory::map_shared_regions(&shared)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        *self.memory.lock().unwrap_or_else(|p| p.into_inner()) = Some(mapped);
        Ok(())
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        if thread_index != 0 {
            return None;
        }
        let consumer = self
            .exit
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        let notifier = self.exit.1.try_clone().ok()?;
        Some((consumer, notifier))
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        let n = self.device.queues();
        let event = usize::from(device_event);
        let index = if event < n {
            event
        } else if let Some(index) = event.checked_sub(n + 1).filter(|&i| i < n) {
            // A requeue: the serving code stopped at its budget.
            let _ = self.requeues[index].read();
            index
        } else if event == 2 * n + 1 {
            match self.device.read_input() {
                Some(index) if index < n => index,
                _ => return Ok(()),
            }
        } else {
            return Ok(());
        };
        let Some(vring) = vrings.get(index) else {
            return Ok(());
        };
        self.serve_queue(index, vring)?;
        // Room made for input the device stopped reading (edge-triggered: it is told
        // once), or bytes waiting for buffers the driver just posted.
        if self.device.input().is_some() {
            if let Some(index) = self.device.read_input().filter(|&i| i < n) {
                if let Some(vring) = vrings.get(index) {
                    self.serve_queue(index, vring)?;
                }
            }
        }
        Ok(())
    }
}
