//! The hypercalls an unmodified Linux makes on vmcraft's Xen platform, with arbitrary
//! commands, argument structures and linear-to-physical mappings: `xen_version`,
//! `memory_op` (`add_to_physmap` of the shared-info page and grant frames),
//! `hvm_op`, `event_channel_op` (2-level, virtual IRQs, IPIs), `grant_table_op` and
//! `vcpu_op` (`register_vcpu_info`). Every result is a value or an errno Xen uses,
//! never a panic; whatever the guest placed is inside its RAM.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vmcraft_memory::vm_memory::{Bytes, GuestAddress};
use vmcraft_memory::{layout::MemoryLayout, GuestRam};
use vmcraft_pv_hypercall::evtchn::{EventChannels, Upcall, HYPERVISOR_EVENT_CHANNEL_OP};
use vmcraft_pv_hypercall::grant::op::HYPERVISOR_GRANT_TABLE_OP;
use vmcraft_pv_hypercall::grant::GrantTable;
use vmcraft_pv_hypercall::hvm::{Callback, HvmParams, UpcallRoute, HYPERVISOR_HVM_OP};
use vmcraft_pv_hypercall::hvm_guest::HvmGuestCalls;
use vmcraft_pv_hypercall::hypercall::{HypercallArgs, HypercallContext};
use vmcraft_pv_hypercall::physmap::HYPERVISOR_VCPU_OP;
use vmcraft_pv_hypercall::reservation::HYPERVISOR_MEMORY_OP;
use vmcraft_pv_hypercall::version::HYPERVISOR_XEN_VERSION;

mod calls;

const RAM: u64 = 1 << 20;

struct Quiet;

impl Upcall for Quiet {
    fn raise(&self, vcpu: u32) {
        assert!(vcpu < 32);
    }
}

impl UpcallRoute for Quiet {
    fn callback(&self, _: Callback) {}
    fn vcpu_vector(&self, vcpu: u32, vector: u8) {
        assert!(vcpu < 2 && vector >= 0x10);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((map, input)) = data.split_first() else {
        return;
    };
    let ram = GuestRam::new(&MemoryLayout::x86_64(RAM).unwrap()).unwrap();
    let mem = ram.memory();
    let channels = Arc::new(EventChannels::unplaced(mem.clone(), Arc::new(Quiet)));
    let grants = Arc::new(GrantTable::unplaced(mem.clone(), 4, 0));
    let params = Arc::new(HvmParams::new(2, (0x90, 1), (0x91, 2), Arc::new(Quiet)));
    let table = HvmGuestCalls {
        channels: channels.clone(),
        grants: grants.clone(),
        params,
        reservation: None,
        shutdown: None,
        domid: 1,
        vcpus: 2,
    }
    .table()
    .unwrap();
    // Linear pages map to physical ones by a rotation the input chooses; the top
    // linear pages map nowhere.
    let shift = u64::from(*map);
    let translate = move |gva: u64| {
        let page = gva >> 12;
        (page < 0x200).then(|| (((page + shift) % (RAM >> 12)) << 12) | (gva & 0xfff))
    };
    let ctx = HypercallContext::linear(0, mem, &translate);
    for word in calls::calls(input, 5) {
        let word = |i: usize| word[i];
        let nr = [
            HYPERVISOR_XEN_VERSION,
            HYPERVISOR_MEMORY_OP,
            HYPERVISOR_HVM_OP,
            HYPERVISOR_EVENT_CHANNEL_OP,
            HYPERVISOR_GRANT_TABLE_OP,
            HYPERVISOR_VCPU_OP,
        ][(word(0) % 6) as usize];
        let command = word(1) % 26;
        let pointer = word(2) % (0x201 << 12);
        // vcpu_op's second argument is the vCPU, its third the struct; the count of
        // grant_table_op is usually 1.
        let args = match nr {
            HYPERVISOR_VCPU_OP => [command, word(3) % 3, pointer, 0, 0],
            HYPERVISOR_GRANT_TABLE_OP => [command, pointer, word(3) % 3, 0, 0],
            _ => [command, pointer, word(3), 0, 0],
        };
        // The argument structure's bytes: 32 of them, where the call looks.
        if let Some(at) = translate(pointer) {
            let _ = mem.write_obj(word(4), GuestAddress(at));
            let _ = mem.write_obj(word(3), GuestAddress(at + 8));
            let _ = mem.write_obj(word(4).rotate_left(17) % (RAM >> 12), GuestAddress(at + 16));
        }
        let r = table.dispatch(&ctx, HypercallArgs { nr, args });
        // EEXIST: a virtual IRQ bound twice; ENOSPC: no free port.
        calls::assert_xen_result(r, &[17, 28], (nr, args));
        if let Some(at) = channels.shared_info() {
            assert!(at.0 % 4096 == 0 && at.0 + 4096 <= RAM);
        }
        assert!(grants.frames_in_use() <= grants.max_frames());
    }
});
