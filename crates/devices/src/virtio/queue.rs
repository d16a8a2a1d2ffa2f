//! Serving a virtqueue: the loop every device shares, and the checks every chain gets.

use thiserror::Error;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vmcraft_memory::poll::AdaptivePoll;
use vmcraft_memory::GuestMemory;
use vmm_sys_util::eventfd::EventFd;

use super::QueueInterrupt;

/// A broken descriptor chain or ring: the device needs a reset.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The chain loops, is longer than the queue or points at a descriptor outside it.
    #[error("descriptor chain does not end within the queue (loop or bad next index)")]
    UnterminatedChain,
    /// A descriptor's buffer lies outside guest memory.
    #[error("descriptor buffer outside guest memory")]
    BufferOutsideMemory(#[source] virtio_queue::Error),
    /// Bytes could not be copied into or out of the guest's buffers (a buffer the
    /// descriptors name is not in guest memory).
    #[error("cannot copy the {what} through the guest's buffers")]
    BufferCopy {
        /// What was being copied.
        what: &'static str,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// A descriptor's buffer is not (wholly) in guest memory.
    #[error("descriptor buffer of {len} bytes at {addr:#x} is not in guest memory")]
    BufferNotInMemory {
        /// The descriptor's guest address.
        addr: u64,
        /// The descriptor's length.
        len: usize,
    },
    /// The chain's buffer lengths add up to more than the address space.
    #[error("descriptor chain's lengths overflow")]
    LengthOverflow,
    /// No writable byte for the status.
    #[error("no writable byte for the status")]
    NoStatusByte,
    /// The ring itself is broken (available index, ring addresses).
    #[error("virtqueue broken")]
    Ring(#[source] virtio_queue::Error),
}

/// Check that `chain` ends by itself and return its descriptor count. DescriptorChain
/// stops after `queue size` descriptors or at an index outside the table; then the
/// last descriptor it gave still has NEXT set.
pub fn check_chain(chain: &DescriptorChain<&GuestMemory>) -> Result<usize, ProtocolError> {
    let mut last_has_next = true;
    let mut count = 0usize;
    for desc in chain.clone() {
        last_has_next = desc.has_next();
        count += 1;
    }
    if count == 0 || last_has_next {
        return Err(ProtocolError::UnterminatedChain);
    }
    Ok(count)
}

/// What serves a queue's chains. [`complete_each`] makes one of a closure that
/// completes each chain as it comes; a device that gathers work across chains (merged
/// reads of adjacent sectors, say) holds chains back from [`handle`](Self::handle) and
/// completes them in [`finish`](Self::finish), which the serving loops call after
/// every batch, before they raise an interrupt, poll or return.
pub trait ChainHandler {
    /// Serve one chain: `Some(used length)` completes it now; `None` holds it, and
    /// [`finish`](Self::finish) must complete it.
    fn handle(
        &mut self,
        chain: DescriptorChain<&GuestMemory>,
    ) -> Result<Option<u32>, ProtocolError>;

    /// Complete every chain held back, calling `complete(head index, used length)` for
    /// each. Called after every batch, also when the batch stopped at a protocol error.
    fn finish(
        &mut self,
        complete: &mut dyn FnMut(u16, u32) -> Result<(), ProtocolError>,
    ) -> Result<(), ProtocolError> {
        let _ = complete;
        Ok(())
    }
}

/// A [`ChainHandler`] that completes each chain as it comes: `handle` returns the
/// bytes it wrote into the chain (the used length).
pub fn complete_each<F>(handle: F) -> CompleteEach<F>
where
    F: FnMut(DescriptorChain<&GuestMemory>) -> Result<u32, ProtocolError>,
{
    CompleteEach(handle)
}

/// See [`complete_each`].
#[derive(Debug)]
pub struct CompleteEach<F>(F);

impl<F> ChainHandler for CompleteEach<F>
where
    F: FnMut(DescriptorChain<&GuestMemory>) -> Result<u32, ProtocolError>,
{
    fn handle(
        &mut self,
        chain: DescriptorChain<&GuestMemory>,
    ) -> Result<Option<u32>, ProtocolError> {
        (self.0)(chain).map(Some)
    }
}

/// Complete the available chains of `queue` with `handle`, which returns the bytes
/// it wrote into the chain (the used length). See [`serve_with`].
///
/// ```
/// # use vmcraft_devices::virtio::queue::{serve_available, ProtocolError};
/// # use vmm_sys_util::eventfd::EventFd;
/// # fn f(queue: &mut virtio_queue::Queue, mem: &vmcraft_memory::GuestMemory,
/// #      interrupt: &vmcraft_devices::virtio::Interrupt, requeue: &EventFd)
/// #      -> Result<(), ProtocolError> {
/// // A device that takes every chain and writes nothing into it.
/// let served = serve_available(queue, mem, interrupt.queue(0), requeue, |_chain| Ok(0))?;
/// # let _ = served; Ok(()) }
/// ```
pub fn serve_available(
    queue: &mut Queue,
    mem: &GuestMemory,
    interrupt: QueueInterrupt<'_>,
    requeue: &EventFd,
    handle: impl FnMut(DescriptorChain<&GuestMemory>) -> Result<u32, ProtocolError>,
) -> Result<usize, ProtocolError> {
    serve_with(queue, mem, interrupt, requeue, complete_each(handle))
}

/// Serve the available chains of `queue` with `handle`. With EVENT_IDX,
/// notifications are suppressed while serving and re-enabled at the end with a final
/// check for chains that raced in; the interrupt is raised only if the driver asked
/// for it. Returns how many chains were completed; a protocol error stops serving at
/// once.
///
/// At most [`SERVE_BUDGET`] chains per call, however fast the driver adds more: past
/// that it signals `requeue` (the queue's own notifier, see
/// [`ActiveQueues::requeue`](super::ActiveQueues::requeue)), so that the device's
/// event loop calls it again after it has looked at its other queues and at a stop
/// request, and returns.
pub fn serve_with(
    queue: &mut Queue,
    mem: &GuestMemory,
    interrupt: QueueInterrupt<'_>,
    requeue: &EventFd,
    mut handle: impl ChainHandler,
) -> Result<usize, ProtocolError> {
    let mut served = 0;
    let result = loop {
        if queue.event_idx_enabled() {
            queue
                .disable_notification(mem)
                .map_err(ProtocolError::Ring)?;
        }
        served += complete_available(queue, mem, SERVE_BUDGET - served, &mut handle, interrupt)?;
        if served >= SERVE_BUDGET {
            // Notifications stay as they are: the requeue is the wake-up. If the write
            // fails the counter is saturated and the loop wakes anyway.
            let _ = requeue.write(1);
            break Ok(served);
        }
        if !queue.event_idx_enabled()
            || !queue
                .enable_notification(mem)
                .map_err(ProtocolError::Ring)?
        {
            break Ok(served);
        }
    };
    if served > 0 && queue.needs_notification(mem).map_err(ProtocolError::Ring)? {
        interrupt.signal();
    }
    result
}

/// The most chains one call of [`serve_with`], [`serve_available`] or [`serve_polling`]
/// completes before it yields to its thread's event loop (which then sees a stop
/// request or another queue, and calls it again).
pub const SERVE_BUDGET: usize = 1024;

/// Like [`serve_available`], for a device that keeps up with a busy driver: after each
/// batch it raises the interrupt (if the driver asked) and, with the driver's
/// notifications still suppressed, polls the available ring for the next chain for
/// `poll`'s window before it re-enables them. A busy driver then neither notifies nor
/// waits for the device thread to wake; an idle one costs at most one window.
///
/// At most [`SERVE_BUDGET`] chains per call: past that it signals `requeue` (the
/// queue's own notifier) so that its event loop calls it again, and returns. Returns how
/// many chains were completed; a protocol error stops serving at once.
pub fn serve_polling(
    queue: &mut Queue,
    mem: &GuestMemory,
    interrupt: QueueInterrupt<'_>,
    poll: &mut AdaptivePoll,
    requeue: &EventFd,
    mut handle: impl ChainHandler,
) -> Result<usize, ProtocolError> {
    poll.woke();
    let mut served = 0;
    loop {
        queue
            .disable_notification(mem)
            .map_err(ProtocolError::Ring)?;
        let now = complete_available(queue, mem, SERVE_BUDGET - served, &mut handle, interrupt)?;
        served += now;
        if now > 0 && queue.needs_notification(mem).map_err(ProtocolError::Ring)? {
            interrupt.signal();
        }
        if served >= SERVE_BUDGET {
            // Notifications stay off: the requeue is the wake-up. If the write fails
            // the counter is saturated and the loop wakes anyway.
            let _ = requeue.write(1);
            return Ok(served);
        }
        if poll.poll(|| has_available(queue, mem)) {
            continue;
        }
        if !queue
            .enable_notification(mem)
            .map_err(ProtocolError::Ring)?
        {
            poll.sleeping();
            return Ok(served);
        }
    }
}

/// Take up to `limit` available chains to `handle`, then let it finish the ones it held;
/// returns how many were taken (all completed, unless an error is returned).
fn complete_available(
    queue: &mut Queue,
    mem: &GuestMemory,
    limit: usize,
    handle: &mut impl ChainHandler,
    interrupt: QueueInterrupt<'_>,
) -> Result<usize, ProtocolError> {
    let mut served = 0;
    let taken = loop {
        if served >= limit {
            break Ok(());
        }
        let chain = match queue.iter(mem) {
            Ok(mut it) => it.next(),
            Err(e) => break Err(ProtocolError::Ring(e)),
        };
        let Some(chain) = chain else { break Ok(()) };
        let head = chain.head_index();
        match handle.handle(chain) {
            Ok(Some(written)) => {
                if let Err(e) = queue.add_used(mem, head, written) {
                    break Err(ProtocolError::Ring(e));
                }
            }
            Ok(None) => {}
            Err(e) => break Err(e),
        }
        served += 1;
    };
    // Held chains are completed even when the batch ended in an error: their I/O was
    // accepted and the driver is owed its status.
    let finished = handle.finish(&mut |head, written| {
        queue
            .add_used(mem, head, written)
            .map_err(ProtocolError::Ring)
    });
    super::DeviceCounters::add(&interrupt.interrupt().counters().chains, served as u64);
    taken.and(finished).map(|()| served)
}

/// Whether the driver has made a chain available that the device has not taken. A
/// ring that cannot be read counts as ready, so that serving it reports the error.
fn has_available(queue: &Queue, mem: &GuestMemory) -> bool {
    queue
        .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
        .map_or(true, |idx| idx.0 != queue.next_avail())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_util::desc;
    use crate::virtio::Interrupt;
    use std::time::Duration;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    /// `count` one-descriptor chains on a fresh queue of `size` with EVENT_IDX.
    fn queue_with_chains(
        mem: &GuestMemory,
        size: u16,
        count: u16,
    ) -> (MockSplitQueue<'_, GuestMemory>, Queue) {
        let mock = MockSplitQueue::new(mem, size);
        let descs: Vec<_> = (0..count).map(|_| desc(0x8_0000, 16, 0, 0)).collect();
        mock.add_desc_chains(&descs, 0).unwrap();
        let mut q: Queue = mock.create_queue().unwrap();
        q.set_event_idx(true);
        (mock, q)
    }

    fn avail_event(mem: &GuestMemory, mock: &MockSplitQueue<'_, GuestMemory>, size: u16) -> u16 {
        mem.read_obj(GuestAddress(mock.used_addr().0 + 4 + 8 * u64::from(size)))
            .unwrap()
    }

    fn busy_poll(max: Duration) -> AdaptivePoll {
        let mut poll = AdaptivePoll::new(max);
        while poll.window() < poll.max() {
            poll.after_sleep(Duration::ZERO);
        }
        poll
    }

    #[test]
    fn polling_takes_a_chain_the_driver_adds_during_the_window_without_a_notification() {
        let mem = crate::virtio::mmio::tests::memory();
        let (mock, mut q) = queue_with_chains(&mem, 16, 2);
        // Hide the second chain from the device; a "driver" thread publishes it later.
        let avail_idx = GuestAddress(mock.avail_addr().0 + 2);
        mem.write_obj(1u16, avail_idx).unwrap();
        let interrupt = Interrupt::new().unwrap();
        let requeue = EventFd::new(EFD_NONBLOCK).unwrap();
        // The window must outlast the driver thread's reaction to the first completion
        // however loaded the host is; the call then spins one window out at the end.
        let mut poll = busy_poll(Duration::from_secs(1));
        let driver_mem = mem.clone();
        let used_idx = GuestAddress(mock.used_addr().0 + 2);
        let driver = std::thread::spawn(move || {
            while driver_mem.read_obj::<u16>(used_idx).unwrap() == 0 {
                std::thread::yield_now();
            }
            // Long after a device without polling would have gone to sleep.
            std::thread::sleep(Duration::from_millis(10));
            driver_mem.write_obj(2u16, avail_idx).unwrap();
        });
        let mut handled = 0;
        let served = serve_polling(
            &mut q,
            &mem,
            interrupt.queue(0),
            &mut poll,
            &requeue,
            complete_each(|_| {
                handled += 1;
                Ok(0)
            }),
        )
        .unwrap();
        driver.join().unwrap();
        assert_eq!(
            (served, handled),
            (2, 2),
            "the late chain was found by polling"
        );
        assert_eq!(poll.stats().misses, 1, "then the window ran out");
        // Each batch raised the interrupt the driver asked for (used_event 0).
        assert_eq!(interrupt.status(), crate::virtio::INT_VRING);
        // The window ran out with nothing more: notifications are back on, asking
        // for the next chain.
        assert_eq!(avail_event(&mem, &mock, 16), 2);
        assert!(requeue.read().is_err(), "no requeue: the call finished");
    }

    #[test]
    fn without_polling_it_serves_and_re_enables_notifications() {
        let mem = crate::virtio::mmio::tests::memory();
        let (mock, mut q) = queue_with_chains(&mem, 16, 3);
        let interrupt = Interrupt::new().unwrap();
        let requeue = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut poll = AdaptivePoll::off();
        let served = serve_polling(
            &mut q,
            &mem,
            interrupt.queue(0),
            &mut poll,
            &requeue,
            complete_each(|_| Ok(0)),
        );
        assert_eq!(served.unwrap(), 3);
        assert_eq!(avail_event(&mem, &mock, 16), 3);
        assert_eq!(poll.stats(), Default::default());
    }

    #[test]
    fn a_driver_that_keeps_the_queue_full_gets_a_bounded_turn_and_a_requeue() {
        let mem = crate::virtio::mmio::tests::memory();
        let extra = 76;
        let (_mock, mut q) = queue_with_chains(&mem, 2048, SERVE_BUDGET as u16 + extra);
        let interrupt = Interrupt::new().unwrap();
        let requeue = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut poll = busy_poll(Duration::from_micros(50));
        let first = serve_polling(
            &mut q,
            &mem,
            interrupt.queue(0),
            &mut poll,
            &requeue,
            complete_each(|_| Ok(0)),
        );
        assert_eq!(first.unwrap(), SERVE_BUDGET);
        assert_eq!(
            requeue.read().unwrap(),
            1,
            "the event loop is asked to call again"
        );
        let second = serve_polling(
            &mut q,
            &mem,
            interrupt.queue(0),
            &mut poll,
            &requeue,
            complete_each(|_| Ok(0)),
        );
        assert_eq!(second.unwrap(), usize::from(extra));
        assert!(requeue.read().is_err());
    }

    /// The same bound without polling, for every device that serves through
    /// `serve_available`: with and without EVENT_IDX, a call stops at the budget and
    /// asks its event loop to come back for the rest.
    #[test]
    fn serve_available_gives_a_bounded_turn_and_a_requeue() {
        for event_idx in [false, true] {
            let mem = crate::virtio::mmio::tests::memory();
            let extra = 13;
            let (_mock, mut q) = queue_with_chains(&mem, 2048, SERVE_BUDGET as u16 + extra);
            q.set_event_idx(event_idx);
            let interrupt = Interrupt::new().unwrap();
            let requeue = EventFd::new(EFD_NONBLOCK).unwrap();
            let first = serve_available(&mut q, &mem, interrupt.queue(0), &requeue, |_| Ok(0));
            assert_eq!(first.unwrap(), SERVE_BUDGET, "event_idx {event_idx}");
            assert_eq!(requeue.read().unwrap(), 1, "the event loop is asked back");
            let second = serve_available(&mut q, &mem, interrupt.queue(0), &requeue, |_| Ok(0));
            assert_eq!(second.unwrap(), usize::from(extra));
            assert!(requeue.read().is_err(), "nothing left: no requeue");
        }
    }

    #[test]
    fn a_broken_chain_stops_polling_with_the_protocol_error() {
        let mem = crate::virtio::mmio::tests::memory();
        let (_mock, mut q) = queue_with_chains(&mem, 16, 2);
        let interrupt = Interrupt::new().unwrap();
        let requeue = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut poll = busy_poll(Duration::from_secs(30));
        let mut calls = 0;
        let r = serve_polling(
            &mut q,
            &mem,
            interrupt.queue(0),
            &mut poll,
            &requeue,
            complete_each(|_| {
                calls += 1;
                Err(ProtocolError::NoStatusByte)
            }),
        );
        assert!(matches!(r, Err(ProtocolError::NoStatusByte)));
        assert_eq!(calls, 1, "nothing more is served after the error");
    }
}
