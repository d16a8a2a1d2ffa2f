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
/// upcall must be delivered (the word was not flagged and upcalls are not masked).
pub(crate) fn deliver(w: &impl Words, port: u32, vcpu: u32) -> bool {
    let sel = 1u64 << (port / 64);
    if w.selector_fetch_or(vcpu, sel) & sel != 0 {
        return false;
    }
    w.set_upcall_pending(vcpu);
    !w.upcall_masked(vcpu)
}
