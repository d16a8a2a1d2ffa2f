//! The 2-level event-channel ABI against a shared-info page in guest memory.

use std::sync::atomic::{AtomicU32, Ordering};

use super::*;
use vmcraft_memory::{layout::MemoryLayout, GuestRam};

#[derive(Default)]
struct Counter(AtomicU32);

impl Upcall for Counter {
    fn raise(&self, _vcpu: u32) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

const SHARED_INFO: u64 = 0x2000;

fn setup() -> (GuestRam, EventChannels, Arc<Counter>) {
    let ram = GuestRam::new(&MemoryLayout::x86_64(1 << 20).unwrap()).unwrap();
    let counter = Arc::new(Counter::default());
    let ch = EventChannels::new(
        ram.memory().clone(),
        GuestAddress(SHARED_INFO),
        counter.clone(),
    )
    .unwrap();
    (ram, ch, counter)
}

fn word(ram: &GuestRam, offset: u64, port: u32) -> u64 {
    ram.memory()
        .read_obj(GuestAddress(
            SHARED_INFO + offset + 8 * u64::from(port / 64),
        ))
        .unwrap()
}

fn vcpu_byte(ram: &GuestRam, vcpu: u32, field: u64) -> u8 {
    ram.memory()
        .read_obj(GuestAddress(
            SHARED_INFO + VCPU_INFO_SIZE * u64::from(vcpu) + field,
        ))
        .unwrap()
}

fn selector(ram: &GuestRam, vcpu: u32) -> u64 {
    ram.memory()
        .read_obj(GuestAddress(
            SHARED_INFO + VCPU_INFO_SIZE * u64::from(vcpu) + 8,
        ))
        .unwrap()
}

#[test]
fn a_channel_goes_through_its_life() {
    let (_ram, ch, _) = setup();
    let port = ch.alloc_unbound(0).unwrap();
    assert_ne!(port, 0, "port 0 is reserved");
    assert_eq!(ch.status(port), Ok(PortStatus::Unbound { remote_dom: 0 }));
    let backend = ch.bind_backend(port, 7, 0).unwrap();
    assert_eq!(ch.status(port), Ok(PortStatus::Interdomain { backend: 7 }));
    assert!(backend.notified.read().is_err(), "nothing sent yet");
    ch.send(port).unwrap();
    ch.send(port).unwrap();
    assert_eq!(backend.notified.read().unwrap(), 2);
    ch.close(port).unwrap();
    assert_eq!(ch.status(port), Ok(PortStatus::Closed));
    assert_eq!(ch.send(port), Err(EvtchnError::BadPort(port)));
    // The port is free for reuse.
    assert_eq!(ch.alloc_unbound(0), Ok(port));
}

#[test]
fn raising_sets_pending_selector_and_upcall_once() {
    let (ram, ch, upcalls) = setup();
    let port = 130; // word 2, bit 2
    for _ in 0..port {
        ch.alloc_unbound(0).unwrap();
    }
    let _b = ch.bind_backend(port, 1, 3).unwrap();
    ch.notify_guest(port).unwrap();
    assert_eq!(word(&ram, PENDING_OFFSET, port), 1 << 2);
    assert_eq!(selector(&ram, 3), 1 << 2);
    assert_eq!(vcpu_byte(&ram, 3, 0), 1, "upcall_pending");
    assert_eq!(upcalls.0.load(Ordering::SeqCst), 1);
    // Still pending: no second upcall.
    ch.notify_guest(port).unwrap();
    assert_eq!(upcalls.0.load(Ordering::SeqCst), 1);
    // The guest handles it (clears selector, pending, upcall_pending); the next
    // event raises a new upcall.
    let m = ram.memory();
    m.write_obj(0u64, GuestAddress(SHARED_INFO + VCPU_INFO_SIZE * 3 + 8))
        .unwrap();
    m.write_obj(0u64, GuestAddress(SHARED_INFO + PENDING_OFFSET + 16))
        .unwrap();
    m.write_obj(0u8, GuestAddress(SHARED_INFO + VCPU_INFO_SIZE * 3))
        .unwrap();
    ch.notify_guest(port).unwrap();
    assert_eq!(upcalls.0.load(Ordering::SeqCst), 2);
}

#[test]
fn masks_hold_events_until_unmask() {
    let (ram, ch, upcalls) = setup();
    let port = ch.alloc_unbound(0).unwrap();
    let _b = ch.bind_backend(port, 1, 0).unwrap();
    // The guest masks the port.
    ram.memory()
        .write_obj(1u64 << port, GuestAddress(SHARED_INFO + MASK_OFFSET))
        .unwrap();
    ch.notify_guest(port).unwrap();
    assert_eq!(
        word(&ram, PENDING_OFFSET, port),
        1 << port,
        "pending is still set"
    );
    assert_eq!(selector(&ram, 0), 0);
    assert_eq!(upcalls.0.load(Ordering::SeqCst), 0);
    ch.unmask(port).unwrap();
    assert_eq!(word(&ram, MASK_OFFSET, port), 0);
    assert_eq!(selector(&ram, 0), 1);
    assert_eq!(
        upcalls.0.load(Ordering::SeqCst),
        1,
        "unmask re-raises a pending port"
    );
}

#[test]
fn a_vcpu_masking_upcalls_gets_the_flag_but_no_interrupt() {
    let (ram, ch, upcalls) = setup();
    let port = ch.alloc_unbound(0).unwrap();
    let _b = ch.bind_backend(port, 1, 1).unwrap();
    ram.memory()
        .write_obj(1u8, GuestAddress(SHARED_INFO + VCPU_INFO_SIZE + 1))
        .unwrap();
    ch.notify_guest(port).unwrap();
    assert_eq!(vcpu_byte(&ram, 1, 0), 1);
    assert_eq!(upcalls.0.load(Ordering::SeqCst), 0);
}

#[test]
fn bad_ports_and_pages_are_refused() {
    let (_ram, ch, _) = setup();
    for port in [0, 5, MAX_PORTS, u32::MAX] {
        assert_eq!(
            ch.send(port),
            Err(EvtchnError::BadPort(port)),
            "send {port}"
        );
        assert_eq!(ch.notify_guest(port), Err(EvtchnError::BadPort(port)));
    }
    assert_eq!(ch.close(0), Err(EvtchnError::BadPort(0)));
    assert!(matches!(
        ch.bind_backend(0, 1, 0),
        Err(EvtchnError::BadPort(0))
    ));
    let p = ch.alloc_unbound(0).unwrap();
    assert!(matches!(
        ch.bind_backend(p, 1, MAX_VCPUS),
        Err(EvtchnError::BadVcpu(_))
    ));
    assert_eq!(ch.status(MAX_PORTS), Err(EvtchnError::BadPort(MAX_PORTS)));
    let ram = GuestRam::new(&MemoryLayout::x86_64(1 << 20).unwrap()).unwrap();
    for at in [0x2001, (1 << 20) - 0x800, 1 << 40] {
        assert!(matches!(
            EventChannels::new(
                ram.memory().clone(),
                GuestAddress(at),
                Arc::new(Counter::default())
            ),
            Err(EvtchnError::BadSharedInfo(_))
        ));
    }
    // Every port can be allocated once.
    let (_ram, ch, _) = setup();
    for _ in 1..MAX_PORTS {
        ch.alloc_unbound(0).unwrap();
    }
    assert_eq!(ch.alloc_unbound(0), Err(EvtchnError::NoFreePort));
}

#[test]
fn the_guest_drives_channels_through_event_channel_op() {
    use crate::hypercall::{errno, HypercallArgs, HypercallContext, HypercallTable};
    let (ram, ch, _) = setup();
    let ch = Arc::new(ch);
    let mut table = HypercallTable::new();
    ch.register_hypercalls(&mut table).unwrap();
    let ctx = HypercallContext::physical(0, ram.memory());
    let call = |cmd: u64, arg: u64| {
        table.dispatch(
            &ctx,
            HypercallArgs {
                nr: HYPERVISOR_EVENT_CHANNEL_OP,
                args: [cmd, arg, 0, 0, 0],
            },
        )
    };
    let arg = 0x8000u64;
    // alloc_unbound { dom: 0 (self), remote_dom: 0, port: out }
    ram.memory().write_obj(0u64, GuestAddress(arg)).unwrap();
    assert_eq!(call(op::ALLOC_UNBOUND, arg), 0);
    let port: u32 = ram.memory().read_obj(GuestAddress(arg + 4)).unwrap();
    assert_eq!(port, 1);
    let backend = ch.bind_backend(port, 9, 0).unwrap();
    // send { port }
    ram.memory().write_obj(port, GuestAddress(arg)).unwrap();
    assert_eq!(call(op::SEND, arg), 0);
    assert_eq!(backend.notified.read().unwrap(), 1);
    // status { dom, port, status: out, vcpu: out, u: out }
    ram.memory().write_obj(port, GuestAddress(arg + 4)).unwrap();
    assert_eq!(call(op::STATUS, arg), 0);
    assert_eq!(
        ram.memory().read_obj::<u32>(GuestAddress(arg + 8)).unwrap(),
        2
    );
    assert_eq!(
        ram.memory()
            .read_obj::<u64>(GuestAddress(arg + 16))
            .unwrap(),
        9
    );
    // Errors: a bad port, a bad pointer, an unknown command.
    ram.memory().write_obj(4000u32, GuestAddress(arg)).unwrap();
    assert_eq!(call(op::SEND, arg), -errno::EINVAL);
    assert_eq!(call(op::SEND, 1 << 40), -errno::EFAULT);
    assert_eq!(call(77, arg), -errno::ENOSYS);
    // The FIFO ABI is refused, so a guest keeps 2-level.
    assert_eq!(call(op::INIT_CONTROL, arg), -errno::ENOSYS);
    // close { port }
    ram.memory().write_obj(port, GuestAddress(arg)).unwrap();
    assert_eq!(call(op::CLOSE, arg), 0);
    assert_eq!(call(op::SEND, arg), -errno::EINVAL);
}

/// Clear every page's dirty bit; then `pages()` lists the pages written since.
fn dirty_pages_after(ram: &GuestRam, f: impl FnOnce()) -> Vec<u64> {
    use std::ops::Deref;
    use vm_memory::{bitmap::Bitmap, GuestMemoryBackend, GuestMemoryRegion};
    let region = ram.memory().iter().next().unwrap();
    region.deref().bitmap().reset();
    f();
    (0..256)
        .filter(|p| region.bitmap().dirty_at(p * 4096))
        .map(|p| p as u64 * 4096)
        .collect()
}

#[test]
fn a_send_marks_the_shared_info_page_dirty_for_migration() {
    let (ram, ch, _) = setup();
    let port = ch.alloc_unbound(0).unwrap();
    let _end = ch.bind_backend(port, 1, 0).unwrap();
    // From a backend: pending, selector and upcall-pending bits, all in shared info.
    assert_eq!(
        dirty_pages_after(&ram, || ch.notify_guest(port).unwrap()),
        [SHARED_INFO]
    );
    // The guest masks the port; the unmask the VMM does writes the mask word.
    ram.memory()
        .write_obj(1u64 << port, GuestAddress(SHARED_INFO + MASK_OFFSET))
        .unwrap();
    assert_eq!(
        dirty_pages_after(&ram, || ch.unmask(port).unwrap()),
        [SHARED_INFO]
    );
}

#[test]
fn the_table_saves_and_restores_and_refuses_what_does_not_fit() {
    let (_ram, ch, _) = setup();
    let backend_port = ch.alloc_unbound(0).unwrap();
    let _end = ch.bind_backend(backend_port, 1, 0).unwrap();
    let guest_port = ch.alloc_unbound(7).unwrap();
    let saved = ch.save_state();
    // The same set-up elsewhere: the backend bound to the same port.
    let (_ram2, other, _) = setup();
    let p = other.alloc_unbound(0).unwrap();
    let _end2 = other.bind_backend(p, 1, 0).unwrap();
    other.restore_state(&saved).unwrap();
    assert_eq!(
        other.status(guest_port),
        Ok(PortStatus::Unbound { remote_dom: 7 })
    );
    assert_eq!(other.save_state(), saved);
    // A machine without that backend refuses it, and keeps its table.
    let (_ram3, bare, _) = setup();
    let before = bare.save_state();
    assert!(matches!(
        bare.restore_state(&saved),
        Err(EvtchnError::BadState { port, .. }) if port == backend_port
    ));
    assert_eq!(bare.save_state(), before);
    // Nor may a snapshot drop a backend's port.
    let mut dropped = saved.clone();
    dropped.ports.retain(|(p, _)| *p != backend_port);
    assert!(other.restore_state(&dropped).is_err());
    // Ports out of range, twice, or free.
    for bad in [
        vec![(MAX_PORTS, Slot::Unbound { remote_dom: 0 })],
        vec![(5, Slot::Unbound { remote_dom: 0 }); 2],
        vec![(5, Slot::Free)],
    ] {
        assert!(bare.restore_state(&ChannelsState { ports: bad }).is_err());
    }
}

#[test]
fn a_guest_places_its_shared_info_and_vcpu_info_and_loses_no_event() {
    let ram = GuestRam::new(&MemoryLayout::x86_64(1 << 20).unwrap()).unwrap();
    let counter = Arc::new(Counter::default());
    let ch = EventChannels::unplaced(ram.memory().clone(), counter.clone());
    let port = ch.bind_ipi(1).unwrap();
    // Nowhere to deliver yet: nothing happens, nothing breaks.
    ch.send(port).unwrap();
    assert_eq!(counter.0.load(Ordering::SeqCst), 0);
    assert_eq!(ch.shared_info(), None);
    // A page that is not one is refused.
    for bad in [0x2100, 1 << 40] {
        assert_eq!(
            ch.place_shared_info(GuestAddress(bad)),
            Err(EvtchnError::BadSharedInfo(bad))
        );
    }
    // The page the guest gives is fresh: whatever it held is gone.
    ram.memory()
        .write_slice(&[0xffu8; 4096], GuestAddress(0x5000))
        .unwrap();
    ch.place_shared_info(GuestAddress(0x5000)).unwrap();
    assert_eq!(ch.shared_info(), Some(GuestAddress(0x5000)));
    let read = |at: u64| ram.memory().read_obj::<u64>(GuestAddress(at)).unwrap();
    assert_eq!(read(0x5000 + MASK_OFFSET), 0);
    // vCPU 1's slot in the page gets the IPI.
    ch.send(port).unwrap();
    assert_eq!(counter.0.load(Ordering::SeqCst), 1);
    assert_eq!(read(0x5000 + VCPU_INFO_SIZE + 8), 1 << (port / 64));
    // vcpu_info moves: its contents come along, every selector bit is set, and an
    // upcall makes the guest look.
    for bad in [0x6fc8, 0x6003, 1 << 40] {
        assert_eq!(
            ch.register_vcpu_info(1, GuestAddress(bad)),
            Err(EvtchnError::BadVcpuInfo(bad)),
            "{bad:#x}"
        );
    }
    assert_eq!(
        ch.register_vcpu_info(MAX_VCPUS, GuestAddress(0x6000)),
        Err(EvtchnError::BadVcpu(MAX_VCPUS))
    );
    ch.register_vcpu_info(1, GuestAddress(0x6040)).unwrap();
    assert_eq!(counter.0.load(Ordering::SeqCst), 2);
    assert_eq!(read(0x6048), u64::MAX);
    assert_eq!(
        ram.memory().read_obj::<u8>(GuestAddress(0x6040)).unwrap(),
        1
    );
    // The guest takes the events; the next one lands in the new place.
    ram.memory().write_obj(0u64, GuestAddress(0x6048)).unwrap();
    ram.memory()
        .write_obj(0u64, GuestAddress(0x5000 + PENDING_OFFSET))
        .unwrap();
    ch.send(port).unwrap();
    assert_eq!(read(0x6048), 1 << (port / 64));
    assert_eq!(counter.0.load(Ordering::SeqCst), 3);
}

#[test]
fn virtual_irqs_and_ipis_are_per_vcpu_ports() {
    let (ram, ch, counter) = setup();
    let timer = ch.bind_virq(0, 0).unwrap();
    assert_eq!(
        ch.bind_virq(0, 0),
        Err(EvtchnError::VirqBound { virq: 0, vcpu: 0 })
    );
    let other = ch.bind_virq(0, 1).unwrap();
    assert_ne!(timer, other);
    assert_eq!(
        ch.bind_virq(NR_VIRQS, 0),
        Err(EvtchnError::BadVirq(NR_VIRQS))
    );
    assert_eq!(
        ch.bind_virq(1, MAX_VCPUS),
        Err(EvtchnError::BadVcpu(MAX_VCPUS))
    );
    assert_eq!(ch.status(other), Ok(PortStatus::Virq { virq: 0, vcpu: 1 }));
    // A virtual IRQ is the VMM's to raise, not the guest's to send.
    assert_eq!(ch.send(timer), Err(EvtchnError::BadPort(timer)));
    assert!(ch.raise_virq(0, 1));
    assert!(!ch.raise_virq(5, 1), "not bound");
    assert_eq!(selector(&ram, 1), 1 << (other / 64));
    assert_eq!(selector(&ram, 0), 0);
    assert_eq!(counter.0.load(Ordering::SeqCst), 1);
    let ipi = ch.bind_ipi(0).unwrap();
    assert_eq!(ch.status(ipi), Ok(PortStatus::Ipi { vcpu: 0 }));
    ch.send(ipi).unwrap();
    assert_eq!(vcpu_byte(&ram, 0, 0), 1);
    // bind_vcpu moves a backend's port, not a per-vCPU one.
    let p = ch.alloc_unbound(0).unwrap();
    ch.send(p).unwrap(); // an unbound port: goes nowhere, as in Xen
    ch.bind_vcpu(p, 1).unwrap();
    let b = ch.bind_backend(p, 3, 0).unwrap();
    ch.bind_vcpu(b.port, 1).unwrap();
    ch.notify_guest(b.port).unwrap();
    assert_ne!(selector(&ram, 1) & (1 << (b.port / 64)), 0);
    assert_eq!(ch.bind_vcpu(ipi, 1), Err(EvtchnError::BadPort(ipi)));
    assert_eq!(
        ch.bind_vcpu(p, MAX_VCPUS),
        Err(EvtchnError::BadVcpu(MAX_VCPUS))
    );
}

#[test]
fn a_snapshot_keeps_virtual_irq_and_ipi_ports() {
    let (_ram, ch, _) = setup();
    let virq = ch.bind_virq(2, 1).unwrap();
    let ipi = ch.bind_ipi(1).unwrap();
    let state = ch.save_state();
    let (_ram2, restored, _) = setup();
    restored.restore_state(&state).unwrap();
    assert_eq!(
        restored.status(virq),
        Ok(PortStatus::Virq { virq: 2, vcpu: 1 })
    );
    assert_eq!(restored.status(ipi), Ok(PortStatus::Ipi { vcpu: 1 }));
    let bad = ChannelsState {
        ports: vec![(
            4,
            Slot::Virq {
                virq: NR_VIRQS,
                vcpu: 0,
            },
        )],
    };
    assert!(matches!(
        restored.restore_state(&bad),
        Err(EvtchnError::BadState { port: 4, .. })
    ));
}

#[test]
fn a_kick_delivers_an_upcall_left_pending() {
    let (ram, ch, counter) = setup();
    assert!(!ch.kick(0), "nothing pending");
    ch.register_vcpu_info(0, GuestAddress(0x6000)).unwrap();
    assert_eq!(counter.0.load(Ordering::SeqCst), 1);
    // The upcall could not be taken (no vector yet): a kick delivers it again.
    assert!(ch.kick(0));
    assert_eq!(counter.0.load(Ordering::SeqCst), 2);
    // Masked upcalls stay masked.
    ram.memory().write_obj(1u8, GuestAddress(0x6001)).unwrap();
    assert!(!ch.kick(0));
    assert!(!ch.kick(MAX_VCPUS), "no such vCPU");
}

/// Takes an upcall only once enabled, as a local APIC takes an MSI.
#[derive(Default)]
struct LateApic {
    enabled: std::sync::atomic::AtomicBool,
    owed: std::sync::atomic::AtomicBool,
    taken: AtomicU32,
}

impl Upcall for LateApic {
    fn raise(&self, _vcpu: u32) {
        let enabled = self.enabled.load(Ordering::SeqCst);
        self.owed.store(!enabled, Ordering::SeqCst);
        if enabled {
            self.taken.fetch_add(1, Ordering::SeqCst);
        }
    }
    fn owed(&self, _vcpu: u32) -> bool {
        self.owed.load(Ordering::SeqCst)
    }
}

#[test]
fn an_upcall_the_guest_could_not_take_is_raised_again_with_the_next_event() {
    let ram = GuestRam::new(&MemoryLayout::x86_64(1 << 20).unwrap()).unwrap();
    let apic = Arc::new(LateApic::default());
    let ch = EventChannels::new(
        ram.memory().clone(),
        GuestAddress(SHARED_INFO),
        apic.clone(),
    )
    .unwrap();
    let (a, b) = (ch.bind_ipi(0).unwrap(), ch.bind_ipi(0).unwrap());
    ch.send(a).unwrap();
    assert_eq!(apic.taken.load(Ordering::SeqCst), 0, "not enabled yet");
    apic.enabled.store(true, Ordering::SeqCst);
    // Port b's word is flagged already: without the debt, no upcall would come.
    ch.send(b).unwrap();
    assert_eq!(apic.taken.load(Ordering::SeqCst), 1);
    assert!(!apic.owed(0));
    ch.send(b).unwrap();
    assert_eq!(
        apic.taken.load(Ordering::SeqCst),
        1,
        "pending already: nothing owed"
    );
}

#[test]
fn an_upcall_the_guest_lost_after_taking_it_is_recovered_by_the_next_event() {
    let (ram, ch, counter) = setup();
    let (a, b) = (ch.bind_ipi(0).unwrap(), ch.bind_ipi(0).unwrap());
    ch.send(a).unwrap();
    assert_eq!(counter.0.load(Ordering::SeqCst), 1);
    // The upcall was taken, then lost (the guest reset its local APIC): the flags
    // stay set. Another port's event still brings an upcall.
    ch.send(b).unwrap();
    assert_eq!(counter.0.load(Ordering::SeqCst), 2);
    assert_eq!(selector(&ram, 0), 1);
    // The same port again while pending: the guest has not seen it; no more.
    ch.send(b).unwrap();
    assert_eq!(counter.0.load(Ordering::SeqCst), 2);
}
