//! Serving a virtqueue: the loop every device shares, and the checks every chain gets.

use thiserror::Error;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vmcraft_memory::GuestMemory;

use super::Interrupt;

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

/// Complete every available chain of `queue` with `handle`, which returns the bytes
/// it wrote into the chain (the used length). With EVENT_IDX, notifications are
/// suppressed while serving and re-enabled at the end with a final check for chains
/// that raced in; the interrupt is raised only if the driver asked for it. Returns
/// how many chains were completed; a protocol error stops serving at once.
pub fn serve_available(
    queue: &mut Queue,
    mem: &GuestMemory,
    interrupt: &Interrupt,
    mut handle: impl FnMut(DescriptorChain<&GuestMemory>) -> Result<u32, ProtocolError>,
) -> Result<usize, ProtocolError> {
    let mut served = 0;
    let result = loop {
        if queue.event_idx_enabled() {
            queue
                .disable_notification(mem)
                .map_err(ProtocolError::Ring)?;
        }
        loop {
            let chain = match queue.iter(mem) {
                Ok(mut it) => it.next(),
                Err(e) => return Err(ProtocolError::Ring(e)),
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let written = handle(chain)?;
            queue
                .add_used(mem, head, written)
                .map_err(ProtocolError::Ring)?;
            served += 1;
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
        interrupt.signal_used_queue();
    }
    result
}
