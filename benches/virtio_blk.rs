//! virtio-blk from inside a guest: 4 KiB reads and writes per second, host CPU time per
//! request, VMM exits and guest notifications per request, at batch 1 and 32, with
//! EVENT_IDX and ioeventfd.
//!
//! ```text
//! cargo bench --bench virtio_blk
//! cargo bench --bench virtio_blk -- "read, batch 1"   # only the rows whose name contains it
//! ```
//!
//! The guest (`virtio_blk_bench`, CPL 3) keeps `batch` requests in flight behind one
//! notification each and polls the used ring. It reads or writes the first 16 MiB of
//! the disk in order (the device merges adjacent reads into one `preadv`, as QEMU
//! does), or at random 4 KiB-aligned offsets (nothing to merge). Host CPU per request is the device I/O
//! thread's CPU time (from /proc schedstat) plus the time the vCPU thread spent in the
//! VMM handling exits, divided by the requests. The reference row is the same 4 KiB
//! pread/pwrite on the same image file from the host, with no VM at all.
//! Each guest row runs three ways: as configured by default (the device thread polls
//! its queue before it sleeps; the driver asks for an interrupt after every completion,
//! although it polls the used ring); with a device thread that sleeps as soon as the
//! queue is empty; and with a polled queue, where the driver asks for no interrupts as
//! Linux's virtio-blk poll queues do (the difference is the interrupt's cost). Each row
//! also says what the device thread cost in the half second after the guest stopped
//! (the price of polling when nothing comes). Targets: at batch 1, at most 3 µs of host CPU
//! per read; at batch 32, at least 1 M reads/s and at most 0.05 exits per request.
//!
//! The transport section runs the same workload with the disk on virtio-mmio and as a
//! virtio-pci function with MSI-X (one queue, and four queues with a thread each and the
//! batch spread over them), each with interrupts wanted and with polled queues: the
//! difference per request between the two is what delivering the interrupts costs the
//! host on that transport (an IOAPIC line for MMIO, an MSI for PCI).

mod common;

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use vmcraft::builder::MachineBuilder;
use vmcraft::devices::serial::SharedBuffer;
use vmcraft::devices::virtio::block::{Block, Disk};
use vmcraft::memory::poll::AdaptivePoll;
use vmcraft::vcpu::VcpuConfig;
use vmcraft_guest_kit::Guest;

const DISK_BYTES: u64 = 16 << 20;
/// The device's threads: `vblk0-io`, or `vblk0-q<i>` per queue.
const IO_THREADS: &str = "vblk0-";
/// How long the device thread is watched after the guest stopped.
const IDLE: Duration = Duration::from_millis(500);

struct Run {
    requests: u64,
    elapsed: Duration,
    host_cpu_ns: u64,
    exits: u64,
    kicks: u64,
    /// The device thread's CPU time over [`IDLE`] after the guest stopped.
    idle_cpu_ns: u64,
}

/// How a guest row is run.
#[derive(Clone, Copy)]
struct Variant {
    label: &'static str,
    /// The device thread's maximum polling window (zero: it does not poll).
    poll: Duration,
    /// The guest's queue asks for no interrupts (a polled queue).
    polled_queue: bool,
}

const VARIANTS: [Variant; 3] = [
    Variant {
        label: "",
        poll: AdaptivePoll::DEFAULT_MAX,
        polled_queue: false,
    },
    Variant {
        label: ", device does not poll",
        poll: Duration::ZERO,
        polled_queue: false,
    },
    Variant {
        label: ", polled queue",
        poll: AdaptivePoll::DEFAULT_MAX,
        polled_queue: true,
    },
];

/// Where the disk is.
#[derive(Clone, Copy, PartialEq)]
enum Transport {
    Mmio,
    /// A virtio-pci function with MSI-X and this many queues.
    Pci(u16),
}

impl Transport {
    fn label(self) -> String {
        match self {
            Transport::Mmio => "mmio".into(),
            Transport::Pci(1) => "pci".into(),
            Transport::Pci(q) => format!("pci, {q} queues"),
        }
    }
}

/// The CPU time of every thread of the device (`vblk0-io` or one per queue).
fn device_cpu_ns() -> u64 {
    common::threads_cpu_ns(IO_THREADS)
}

fn guest_run(
    image: &common::Image,
    write: bool,
    random: bool,
    batch: u64,
    requests: u64,
    v: Variant,
    transport: Transport,
) -> Run {
    let poll = v.poll;
    let serial = SharedBuffer::new();
    let mut b = MachineBuilder::new(16 << 20, Box::new(serial.clone())).expect("machine");
    let disk = Disk::new(image.file.try_clone().expect("dup"), false, "bench").expect("disk");
    let block = Block::new(disk, "vblk0").with_poll_max(poll);
    let pci = match transport {
        Transport::Mmio => {
            b.add_virtio(Box::new(block)).expect("attach virtio-blk");
            0
        }
        Transport::Pci(queues) => {
            let slot = b
                .add_virtio_pci(Box::new(block.with_queues(queues)))
                .expect("attach virtio-blk on PCI");
            assert_eq!(slot.device, 1, "the guest drives function 1");
            let ecam = b
                .acpi(1)
                .devices
                .into_iter()
                .find_map(|d| match d {
                    vmcraft::acpi::AcpiDevice::PciHostBridge { ecam, .. } => Some(ecam),
                    _ => None,
                })
                .expect("a PCI host bridge");
            assert!(ecam.is_multiple_of(1 << 20) && ecam >> 20 < 0x1000);
            1 << 4 | u64::from(queues - 1) << 5 | (ecam >> 20) << 48
        }
    };
    let guest = Guest::VIRTIO_BLK_BENCH;
    b.load(guest.image()).expect("load");
    let param = 1
        | (u64::from(write) << 1)
        | (u64::from(random) << 2)
        | (u64::from(v.polled_queue) << 3)
        | pci
        | (batch << 8)
        | (requests << 16);
    let start = Instant::now();
    let running = b
        .start(&[VcpuConfig::at(guest.entry(0, param))])
        .expect("start");
    let outcome = running
        .wait_stopped(Some(Duration::from_secs(600)))
        .expect("the guest finishes");
    let elapsed = start.elapsed();
    let io_cpu = device_cpu_ns();
    assert!(io_cpu > 0, "the device's threads are running");
    // The guest has stopped: what its device threads cost while nothing comes.
    std::thread::sleep(IDLE);
    let idle_cpu_ns = device_cpu_ns().saturating_sub(io_cpu);
    let stats = running.total_stats();
    running.stop();
    running.wait().expect("stop");
    let console = String::from_utf8_lossy(&serial.contents()).into_owned();
    assert_eq!(
        outcome.reason,
        vmcraft_guest_kit::exited(0),
        "guest failed: {console}"
    );
    let kicks = console
        .lines()
        .find_map(|l| l.strip_prefix("kicks 0x"))
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .expect("kick count");
    // Exits made by the serial line reporting the kicks are not I/O: leave them out.
    let serial_exits = 23 * 2; // 23 bytes, each a THR write and an LSR read at most
    let exits = stats.total().saturating_sub(serial_exits);
    Run {
        requests,
        elapsed,
        host_cpu_ns: io_cpu + stats.total_nanos(),
        exits,
        kicks,
        idle_cpu_ns,
    }
}

fn host_reference(image: &common::Image, write: bool, requests: u64) -> Run {
    let mut buf = vec![0x5au8; 4096];
    let cpu_before = thread_cpu_ns_self();
    let start = Instant::now();
    let mut offset = 0u64;
    for _ in 0..requests {
        if write {
            image.file.write_all_at(&buf, offset).expect("pwrite");
        } else {
            image.file.read_exact_at(&mut buf, offset).expect("pread");
        }
        offset = (offset + 4096) % DISK_BYTES;
    }
    Run {
        requests,
        elapsed: start.elapsed(),
        host_cpu_ns: thread_cpu_ns_self() - cpu_before,
        exits: 0,
        kicks: 0,
        idle_cpu_ns: 0,
    }
}

/// What raising an interrupt through an irqfd costs the thread that writes it: on a
/// VM with KVM's in-kernel irqchip and one (idle) vCPU, `IRQFD_WRITES` writes to an
/// irqfd routed to an IOAPIC pin (what virtio-mmio's line is) and to one routed as an
/// MSI. Returns the writer's CPU ns per write for each.
fn irqfd_reference() -> (f64, f64) {
    use kvm_bindings::{
        kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQ_ROUTING_IRQCHIP,
        KVM_IRQ_ROUTING_MSI,
    };
    use vmm_sys_util::eventfd::EventFd;
    const IRQFD_WRITES: u64 = 200_000;
    let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
    let vm = kvm.create_vm().expect("VM");
    vm.create_irq_chip().expect("irqchip");
    let _vcpu = vm.create_vcpu(0).expect("vCPU");
    let mut routing = KvmIrqRouting::new(0).expect("routing");
    for pin in 0..24 {
        let mut e = kvm_irq_routing_entry {
            gsi: pin,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        e.u.irqchip.irqchip = KVM_IRQCHIP_IOAPIC;
        e.u.irqchip.pin = pin;
        routing.push(e).expect("route");
    }
    let mut msi = kvm_irq_routing_entry {
        gsi: 40,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    msi.u.msi.address_lo = 0xfee0_0000; // APIC 0
    msi.u.msi.data = 0x40; // vector 0x40, fixed, edge
    routing.push(msi).expect("route");
    vm.set_gsi_routing(&routing).expect("set routing");
    let per_write = |gsi: u32| {
        let fd = EventFd::new(0).expect("eventfd");
        vm.register_irqfd(&fd, gsi).expect("irqfd");
        let before = thread_cpu_ns_self();
        for _ in 0..IRQFD_WRITES {
            fd.write(1).expect("irqfd write");
        }
        (thread_cpu_ns_self() - before) as f64 / IRQFD_WRITES as f64
    };
    (per_write(16), per_write(40))
}

fn thread_cpu_ns_self() -> u64 {
    let sched = std::fs::read_to_string("/proc/thread-self/schedstat").expect("schedstat");
    sched
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .expect("schedstat format")
}

fn row(name: &str, r: &Run) {
    let n = r.requests as f64;
    println!(
        "{:<62} {:>12.0} {:>14.2} {:>10.4} {:>10.4} {:>14.1}",
        name,
        n / r.elapsed.as_secs_f64(),
        r.host_cpu_ns as f64 / n / 1e3,
        r.exits as f64 / n,
        r.kicks as f64 / n,
        r.idle_cpu_ns as f64 / 1e3,
    );
}

fn main() {
    common::require_kvm("virtio_blk");
    let image = common::Image::new("virtio-blk", DISK_BYTES);
    println!("virtio-blk, 4 KiB requests from a CPL-3 guest (EVENT_IDX, ioeventfd, irqfd)");
    println!(
        "{:<62} {:>12} {:>14} {:>10} {:>10} {:>14}",
        "", "requests/s", "host CPU µs/req", "exits/req", "kicks/req", "idle CPU µs"
    );
    let only = common::row_filter();
    for write in [false, true] {
        let op = if write { "write" } else { "read" };
        for (batch, requests, random) in [
            (1u64, 20_000u64, false),
            (32, 100_000, false),
            (32, 100_000, true),
        ] {
            let pattern = if random { ", random offsets" } else { "" };
            for v in VARIANTS {
                let name = format!("guest {op}, batch {batch}{pattern}{}", v.label);
                if only(&name) {
                    row(
                        &name,
                        &guest_run(&image, write, random, batch, requests, v, Transport::Mmio),
                    );
                }
            }
        }
        let name = format!("host p{op} (reference)");
        if only(&name) {
            row(&name, &host_reference(&image, write, 100_000));
        }
    }
    println!();
    println!("transports: the same requests on virtio-mmio and on virtio-pci with MSI-X");
    for write in [false, true] {
        let op = if write { "write" } else { "read" };
        for (batch, requests) in [(1u64, 20_000u64), (32, 100_000)] {
            let transports: &[Transport] = if batch == 1 {
                &[Transport::Mmio, Transport::Pci(1)]
            } else {
                &[Transport::Mmio, Transport::Pci(1), Transport::Pci(4)]
            };
            for &t in transports {
                let name = format!("{} {op}, batch {batch}", t.label());
                if !only(&name) {
                    continue;
                }
                let wanted = guest_run(&image, write, false, batch, requests, VARIANTS[0], t);
                row(&name, &wanted);
                let polled = guest_run(&image, write, false, batch, requests, VARIANTS[2], t);
                row(&format!("{name}, polled queues"), &polled);
                let per_request = |r: &Run| r.host_cpu_ns as f64 / r.requests as f64;
                println!(
                    "{:<62} {:>+14.2} µs of host CPU per request for its interrupts",
                    format!("{name}: interrupts"),
                    (per_request(&wanted) - per_request(&polled)) / 1e3
                );
            }
        }
    }
    if only("irqfd") {
        let (ioapic, msi) = irqfd_reference();
        println!(
            "irqfd write (reference): {:.2} µs of the writer's CPU routed to an IOAPIC pin, {:.2} µs as an MSI",
            ioapic / 1e3,
            msi / 1e3
        );
    }
    println!(
        "idle CPU: the device thread's CPU time in the {} ms after the guest stopped",
        IDLE.as_millis()
    );
    println!("targets: at batch 1, at most 3 µs of host CPU per read; at batch 32, at least 1 M reads/s and at most 0.05 exits per request");
}
