//! The few reads and writes of the shared `kvm_run` page that kvm-ioctls does not
//! expose after an exit has been returned: the port I/O header and data (to complete
//! reads and to learn the access size of string I/O) and the MMIO data (to complete
//! reads). All unsafe access to `kvm_run` lives here.

use kvm_bindings::{
    kvm_run, KVM_EXIT_INTERNAL_ERROR, KVM_EXIT_IO, KVM_EXIT_IO_OUT, KVM_EXIT_MMIO, KVM_EXIT_XEN,
    KVM_EXIT_XEN_HCALL,
};

use crate::exit::XenHypercall;

/// The header of a port I/O exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PioHeader {
    pub port: u16,
    /// Bytes per access: 1, 2 or 4.
    pub size: usize,
    /// Accesses (more than one for string I/O).
    pub count: usize,
    pub write: bool,
}

/// The header and data of the port I/O exit in `run`, or `None` if `run` does not
/// hold a well-formed one (wrong exit reason, bad size, data outside the mapping).
pub(crate) fn pio(run: &mut kvm_run, run_size: usize) -> Option<(PioHeader, &mut [u8])> {
    if run.exit_reason != KVM_EXIT_IO {
        return None;
    }
    // SAFETY: the exit reason is KVM_EXIT_IO, so `io` is the union member KVM wrote;
    // it is plain data (integers) for which any bit pattern is valid.
    let io = unsafe { run.__bindgen_anon_1.io };
    let size = usize::from(io.size);
    let count = io.count as usize;
    let len = size.checked_mul(count)?;
    let offset = usize::try_from(io.data_offset).ok()?;
    if !matches!(size, 1 | 2 | 4) || offset.checked_add(len)? > run_size {
        return None;
    }
    let base = (run as *mut kvm_run).cast::<u8>();
    // `run` starts the vCPU's kvm_run mapping of `run_size` bytes
    // (KVM_GET_VCPU_MMAP_SIZE), and `offset + len <= run_size` was checked above.
    // SAFETY: the slice lies inside that mapping, and it borrows `run` mutably, so
    // nothing else in this program aliases it while it lives.
    let data = unsafe { std::slice::from_raw_parts_mut(base.add(offset), len) };
    let header = PioHeader {
        port: io.port,
        size,
        count,
        write: u32::from(io.direction) == KVM_EXIT_IO_OUT,
    };
    Some((header, data))
}

/// The data buffer of the MMIO exit in `run` (its `len` bytes), or `None`.
pub(crate) fn mmio_data(run: &mut kvm_run) -> Option<&mut [u8]> {
    if run.exit_reason != KVM_EXIT_MMIO {
        return None;
    }
    // SAFETY: the exit reason is KVM_EXIT_MMIO, so `mmio` is the member KVM wrote; it
    // is plain data. The returned slice borrows from `run`.
    let mmio = unsafe { &mut run.__bindgen_anon_1.mmio };
    let len = (mmio.len as usize).min(mmio.data.len());
    Some(&mut mmio.data[..len])
}

/// KVM's suberror for an internal-error exit.
pub(crate) fn internal_suberror(run: &kvm_run) -> u32 {
    if run.exit_reason != KVM_EXIT_INTERNAL_ERROR {
        return 0;
    }
    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the member
    // KVM wrote; it is plain data.
    unsafe { run.__bindgen_anon_1.internal.suberror }
}

/// The Xen hypercall of the `KVM_EXIT_XEN` exit in `run`, or `None` if `run` holds
/// another exit (or another kind of Xen exit).
pub(crate) fn xen_hypercall(run: &kvm_run) -> Option<XenHypercall> {
    if run.exit_reason != KVM_EXIT_XEN {
        return None;
    }
    // SAFETY: the exit reason is KVM_EXIT_XEN, so `xen` is the member KVM wrote; it is
    // plain data (integers), valid for any bit pattern.
    let xen = unsafe { run.__bindgen_anon_1.xen };
    if xen.type_ != KVM_EXIT_XEN_HCALL {
        return None;
    }
    // SAFETY: the type is KVM_EXIT_XEN_HCALL, so `hcall` is the member KVM wrote;
    // plain integers.
    let hcall = unsafe { xen.u.hcall };
    Some(XenHypercall {
        nr: hcall.input,
        params: hcall.params,
        longmode: hcall.longmode != 0,
        cpl: hcall.cpl as u8,
    })
}

/// The Xen hypercall of the exit in `run`, or the exit reason if it is none (an exit
/// vmcraft does not handle).
pub(crate) fn xen_or_reason(run: &kvm_run) -> Result<XenHypercall, u32> {
    xen_hypercall(run).ok_or(run.exit_reason)
}

/// Set the result of the Xen hypercall exit in `run` (KVM puts it in the guest's
/// `rax` on the next KVM_RUN). Does nothing if `run` holds another exit.
pub(crate) fn set_xen_result(run: &mut kvm_run, result: i64) {
    if xen_hypercall(run).is_none() {
        return;
    }
    // The exit is a KVM_EXIT_XEN hypercall (checked above), so `xen.u.hcall` is the
    // member KVM reads the result from (writing a union field needs no unsafe).
    run.__bindgen_anon_1.xen.u.hcall.result = result as u64;
}

/// Ask the next (or current) KVM_RUN on the vCPU owning `run` to return at once.
/// Called from the kick signal handler on the vCPU's own thread.
///
/// # Safety
/// `run` must point to a live kvm_run mapping.
pub(crate) unsafe fn request_immediate_exit(run: *mut kvm_run) {
    // SAFETY: the caller guarantees `run` points to a live mapping; a volatile byte
    // store is what KVM expects for this flag, which it reads at KVM_RUN entry.
    unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_xen_hypercall_exit_is_read_and_answered_in_place() {
        let mut run = kvm_run {
            exit_reason: KVM_EXIT_XEN,
            ..Default::default()
        };
        let mut xen = kvm_bindings::kvm_xen_exit {
            type_: KVM_EXIT_XEN_HCALL,
            ..Default::default()
        };
        xen.u.hcall = kvm_bindings::kvm_xen_exit__bindgen_ty_1__bindgen_ty_1 {
            longmode: 1,
            cpl: 0,
            input: 32,
            params: [4, 0xffff_c900_0000_fe98, 0, 0, 0, 0],
            ..Default::default()
        };
        run.__bindgen_anon_1.xen = xen;
        let call = xen_hypercall(&run).expect("a hypercall");
        assert_eq!(
            call,
            XenHypercall {
                nr: 32,
                params: [4, 0xffff_c900_0000_fe98, 0, 0, 0, 0],
                longmode: true,
                cpl: 0
            }
        );
        set_xen_result(&mut run, -38);
        // SAFETY: the exit written above is a Xen hypercall; plain integers.
        let result = unsafe { run.__bindgen_anon_1.xen.u.hcall.result };
        assert_eq!(result as i64, -38);
        // Another exit, or another kind of Xen exit, is none.
        run.__bindgen_anon_1.xen.type_ = 2;
        assert_eq!(xen_hypercall(&run), None);
        assert_eq!(xen_or_reason(&run), Err(KVM_EXIT_XEN));
        run.exit_reason = KVM_EXIT_IO;
        assert_eq!(xen_hypercall(&run), None);
        set_xen_result(&mut run, 0); // does nothing to a port exit
        assert_eq!(internal_suberror(&run), 0);
    }
}
