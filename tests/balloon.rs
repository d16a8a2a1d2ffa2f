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
    let ram = m.vm().ram();
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
    assert!(m.stop_reason().is_none(), "{:?}", serial.contents());
    m.stop();
    m.wait().unwrap();
}

/// The balancer at work on a guest whose working set falls and rises: after the fall,
/// the balancer inflates the balloon over the pages the guest freed and the host gets
/// them back (guest RAM's resident size falls); after the rise, the guest has every
/// page it needs (taken back from the balloon) and every page it kept still holds what
/// it wrote.
#[test]
fn the_balancer_takes_back_what_a_guest_freed_and_gives_it_again_when_needed() {
    use std::sync::Arc;
    use std::time::Duration;
    use vmcraft::balancer::policy::{BalancerConfig, VmLimits};
    use vmcraft::balancing::{
        BalancedVm, Balancing, BalancingConfig, HostPressure, VirtioBalloonVm,
    };
    use vmcraft_guest_kit::Phased;

    const RAM: u64 = 64 << 20;
    let serial = SharedBuffer::new();
    let mut b = machine_builder(RAM, Box::new(serial.clone()));
    let (balloon, control) = Balloon::new("vballoon").unwrap();
    b.add_virtio(Box::new(balloon)).unwrap();
    let guest = Guest::PHASED;
    b.load(guest.image()).unwrap();
    let pool = Phased::pool_pages(RAM);
    let m = b.start(&[VcpuConfig::at(guest.entry(0, pool))]).unwrap();
    let said = |what: &str| String::from_utf8_lossy(&serial.contents()).contains(what);
    assert!(eventually(30, || said("ready")), "{:?}", serial.contents());
    let memory = m.vm().memory().clone();
    let status = || Phased::status(&memory).unwrap();

    // A working set of 40 MiB, all of it written.
    Phased::want(&memory, 10_240).unwrap();
    assert!(eventually(30, || status().working_set == 10_240));
    let ram = m.vm().ram();
    let full = ram.resident_bytes().unwrap();

    let vm = Arc::new(VirtioBalloonVm::new(control.clone(), RAM)) as Arc<dyn BalancedVm>;
    let balancing = Balancing::start(
        BalancingConfig {
            policy: BalancerConfig::default(),
            period: Duration::from_millis(20),
            budget_pages: RAM / 4096,
            pressure: HostPressure::Fixed(0.0),
        },
        vec![(
            vm,
            VmLimits {
                floor: 4_096,
                ceiling: RAM / 4096,
            },
        )],
    )
    .unwrap();
    // Down to 4 MiB: the estimate decays towards 4,096 + 1,024 pages used, and the
    // balloon takes what the guest no longer needs.
    Phased::want(&memory, 1_024).unwrap();
    assert!(
        eventually(60, || status().ballooned > 8_192
            && u64::from(status().ballooned) == u64::from(control.actual())),
        "{:?} target {} last step {:?}",
        status(),
        control.target(),
        balancing.last_step()
    );
    assert!(
        eventually(60, || ram.resident_bytes().unwrap() + (30 << 20) <= full),
        "resident {} KiB with 40 MiB in use, {} KiB with 4 MiB ({:?})",
        full >> 10,
        ram.resident_bytes().unwrap() >> 10,
        status()
    );
    // What the balancer read: the kernel's 4,096 pages and the 1,024 in use.
    assert!(
        eventually(30, || balancing
            .last_step()
            .and_then(|s| s.reports[0])
            .is_some_and(|r| r.used == 5_120)),
        "{:?}",
        balancing.last_step()
    );

    // Back up to 40 MiB: the guest takes its pages back from the balloon at once, and
    // the balancer follows the rise.
    Phased::want(&memory, 10_240).unwrap();
    assert!(eventually(30, || status().working_set == 10_240));
    assert!(status().deflated_on_oom > 0, "{:?}", status());
    assert!(
        eventually(30, || u64::from(control.target())
            <= RAM / 4096 - (4_096 + 10_240)),
        "target {} with 14,336 pages used",
        control.target()
    );
    // Down again and up again: every page kept is still checked by the guest.
    Phased::want(&memory, 2_048).unwrap();
    assert!(eventually(30, || status().ballooned > 8_192));
    Phased::want(&memory, 8_192).unwrap();
    assert!(eventually(30, || status().working_set == 8_192));
    drop(balancing);
    assert!(
        !said("bad page"),
        "{}",
        String::from_utf8_lossy(&serial.contents())
    );
    assert!(m.stop_reason().is_none(), "{:?}", serial.contents());
    assert_eq!(
        (control.redundant_pages(), control.pages_outside_ram()),
        (0, 0)
    );
    m.stop();
    m.wait().unwrap();
}
