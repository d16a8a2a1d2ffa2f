//! The 2-level ABI's raise path, on any storage of its words (guest memory in a VMM,
//! loom atomics in the model check).

/// The words the ABI touches for one guest.
pub(crate) trait Words {
    /// `pending[word] |= mask`, returning the old word.
    fn pending_fetch_or(&self, word: u32, mask: u64) -> u64;
    /// `mask[word]`.
    fn mask_load(&self, word: u32) -> u64;
    /// `vcpu_info[vcpu].evtchn_pending_sel |= mask`, returning the old selector.
    fn selector_fetch_or(&self, vcpu: u32, mask: u64) -> u64;
    /// `vcpu_info[vcpu].evtchn_upcall_pending = 1`.
    fn set_upcall_pending(&self, vcpu: u32);
    /// `vcpu_info[vcpu].evtchn_upcall_mask != 0`.
    fn upcall_masked(&self, vcpu: u32) -> bool;
}

/// Raise `port` toward `vcpu`; returns whether the upcall must be delivered.
pub(crate) fn raise(w: &impl Words, port: u32, vcpu: u32) -> bool {
    let bit = 1u64 << (port % 64);
    if w.pending_fetch_or(port / 64, bit) & bit != 0 {
        return false; // already pending: the guest will see it
    }
    if w.mask_load(port / 64) & bit != 0 {
        return false; // masked: unmask raises it again
    }
    deliver(w, port, vcpu)
}

/// Flag `port`'s word in the selector and set `upcall_pending`; returns whether the
/// upcall must be delivered: unless upcalls are masked, yes, for every port that
/// became pending, even if its word was flagged already.
///
/// Xen skips the upcall when the word was flagged: the guest, it reasons, has one
/// coming. That holds when the upcall is a line Xen keeps asserting while
/// `upcall_pending` is set (Xen's HVM callback vector), not when it is one edge through
/// a local APIC, as here: a guest that resets its APIC while the edge waits in it
/// (Linux does, as it brings the APIC up) loses it, and with the flags left set no
/// event would ever raise another. An upcall per newly pending port costs at most a
/// spurious interrupt, and the next event recovers a lost one.
pub(crate) fn deliver(w: &impl Words, port: u32, vcpu: u32) -> bool {
    let sel = 1u64 << (port / 64);
    w.selector_fetch_or(vcpu, sel);
    w.set_upcall_pending(vcpu);
    !w.upcall_masked(vcpu)
}
