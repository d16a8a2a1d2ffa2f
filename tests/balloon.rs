//! virtio-balloon on real KVM, with a driver of our own at CPL 3: the host sets a
//! target, the guest inflates to it and the host frees those pages (guest RAM's
//! resident size falls); the host lowers the target, the guest deflates and uses the
//! pages it gets back.

mod common;

use common::*;
use vmcraft::devices::serial::SharedBuffer;
use vmcraft::devices::virtio::balloon::Balloon;
use vmcraft::vcpu::VcpuConfig;
use vmcraft_guest_kit::Guest;

#[test]
fn inflated_pages_leave_the_host_and_deflated_ones_come_back_to_the_guest() {
    let serial = SharedBuffer::new();
    let mut b = machine_builder(64 << 20, Box::new(serial.clone()));
    let (balloon, control) = Balloon::new("vballoon").unwrap();
    b.add_virtio(Box::new(balloon)).unwrap();
    let guest = Guest::BALLOON;
    b.load(guest.image()).unwrap();
    let m = b.start(&[VcpuConfig::at(guest.entry(0, 0))]).unwrap();
    let said = |what: &str| String::from_utf8_lossy(&serial.contents()).contains(what);
    assert!(eventually(30, || said("ready")), "{:?}", serial.contents());
    let ram = m.running.vm().ram();
    let before = ram.resident_bytes().unwrap();

    // 12 MiB of the guest's 16 MiB pool.
    control.set_target(3072);
    // The guest writes `actual`, then says so.
    assert!(
        eventually(30, || said("inflated 0x0000000000000c00")),
        "actual {} inflated {}: {}",
        control.actual(),
        control.inflated_pages(),
        String::from_utf8_lossy(&serial.contents())
    );
    assert_eq!((control.actual(), control.inflated_pages()), (3072, 3072));
    let after = ram.resident_bytes().unwrap();
    assert!(
        after + (11 << 20) <= before,
        "resident {} KiB before, {} KiB after inflating 12 MiB",
        before >> 10,
        after >> 10
    );
    assert_eq!(
        (control.redundant_pages(), control.pages_outside_ram()),
        (0, 0)
    );

    // Half of it back: the guest writes and checks every page it gets.
    control.set_target(1536);
    assert!(eventually(30, || said("deflated ok 0x0000000000000600")));
    assert_eq!(control.inflated_pages(), 1536);
    control.set_target(0);
    assert!(eventually(30, || said("deflated ok 0x0000000000000000")));
    assert_eq!(control.inflated_pages(), 0);
    assert!(m.running.stop_reason().is_none(), "{:?}", serial.contents());
    m.running.request_stop();
    m.running.wait().unwrap();
}
