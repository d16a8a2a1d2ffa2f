//! Real guests on real KVM: entry modes, port and MMIO accesses of every width, serial
//! output, and the ways a VM stops.

mod common;

use common::*;
use vm_memory::Bytes;
use vmcraft::vcpu::{ExitKind, StopReason, VcpuConfig};
use vmcraft_guest_kit::{abi, Guest};

const GREETING: &[u8] =
    b"Hello from a vmcraft guest! I run at CPL 3 in long mode; every byte you read crossed the emulated 16550.\n";

#[test]
fn real_mode_guest_prints_and_exits() {
    let (vm, serial, _) =
        TestVm::new(Guest::REAL_MODE_HELLO).start(&one(Guest::REAL_MODE_HELLO, 0));
    let out = vm.run_for(TIMEOUT).unwrap();
    assert_eq!(out.reason, vmcraft_guest_kit::exited(0x42));
    assert_eq!(serial.contents(), b"real mode\n");
}

#[test]
fn long_mode_cpl3_guest_greets_byte_exact_through_the_16550() {
    let (vm, serial, _) = TestVm::new(Guest::HELLO).start(&one(Guest::HELLO, 0));
    let stats_source = vm.vcpu_count();
    assert_eq!(stats_source, 1);
    let out = vm.run_for(TIMEOUT).unwrap();
    assert_eq!(
        (out.reason, out.vcpu),
        (vmcraft_guest_kit::exited(0), Some(0))
    );
    assert_eq!(serial.contents(), GREETING);
}

#[test]
fn exit_statistics_count_every_trapped_access() {
    let (vm, _, _) = TestVm::new(Guest::HELLO).start(&one(Guest::HELLO, 0));
    assert!(eventually(20, || vm.stop_reason().is_some()));
    let stats = vm.stats(0).unwrap();
    let bytes = GREETING.len() as u64;
    assert_eq!(
        stats.count(ExitKind::PioWrite),
        bytes + 1,
        "one write per byte, plus the exit"
    );
    assert!(
        stats.count(ExitKind::PioRead) >= bytes,
        "at least one LSR poll per byte"
    );
    assert!(stats.nanos(ExitKind::PioWrite) > 0);
    assert_eq!(vm.total_stats(), stats);
    vm.wait().unwrap();
}

#[test]
fn pio_and_mmio_of_every_width_reach_the_device() {
    let (vm, _, dev) = TestVm::new(Guest::PIO_MMIO).start(&one(Guest::PIO_MMIO, 0));
    let out = vm.run_for(TIMEOUT).unwrap();
    assert_eq!(
        out.reason,
        vmcraft_guest_kit::exited(0),
        "guest-side check number {:?} failed",
        out.reason
    );
    let p = u64::from(abi::TEST_PORT);
    let m = abi::TEST_MMIO;
    let expected: Vec<(u64, Vec<u8>)> = vec![
        (p, vec![0x11]),
        (p, vec![0x33, 0x22]),
        (p, vec![0x77, 0x66, 0x55, 0x44]),
        (p + 1, b"r".to_vec()),
        (p + 1, b"e".to_vec()),
        (p + 1, b"p".to_vec()),
        (p + 1, b"!".to_vec()),
        (m, vec![0x11]),
        (m + 2, vec![0x33, 0x22]),
        (m + 4, vec![0x77, 0x66, 0x55, 0x44]),
        (m + 8, vec![0xff, 0xee, 0xdd, 0xcc, 0xbb, 0xaa, 0x99, 0x88]),
    ];
    assert_eq!(dev.lock().unwrap().writes, expected);
}

#[test]
fn debug_exit_code_comes_back() {
    let (vm, _, _) = TestVm::new(Guest::EXIT_CODE).start(&one(Guest::EXIT_CODE, 0xdead_beef));
    assert_eq!(
        vm.run_for(TIMEOUT).unwrap().reason,
        vmcraft_guest_kit::exited(0xdead_beef)
    );
}

#[test]
fn i8042_reset_stops_the_vm() {
    let (vm, _, _) = TestVm::new(Guest::I8042_RESET).start(&one(Guest::I8042_RESET, 0));
    let out = vm.run_for(TIMEOUT).unwrap();
    assert_eq!((out.reason, out.vcpu), (StopReason::Reset, Some(0)));
}

#[test]
fn triple_fault_stops_the_vm() {
    let (vm, _, _) = TestVm::new(Guest::TRIPLE_FAULT).start(&one(Guest::TRIPLE_FAULT, 0));
    let out = vm.run_for(TIMEOUT).unwrap();
    assert_eq!((out.reason, out.vcpu), (StopReason::TripleFault, Some(0)));
}

fn counter(vm: &vmcraft::machine::Machine, index: u32) -> u64 {
    vm.vm()
        .memory()
        .read_obj(Guest::counter_addr(index))
        .unwrap()
}

fn counters(n: u32) -> Vec<VcpuConfig> {
    (0..n)
        .map(|i| VcpuConfig::at(Guest::COUNTER.entry(i, 0)))
        .collect()
}

#[test]
fn two_vcpus_run_at_once_and_stop_on_request() {
    let (vm, _, _) = TestVm::new(Guest::COUNTER).start(&counters(2));
    assert!(eventually(20, || counter(&vm, 0) > 1000 && counter(&vm, 1) > 1000));
    // Both make progress over the same window.
    let before = (counter(&vm, 0), counter(&vm, 1));
    assert!(eventually(20, || counter(&vm, 0) > before.0
        && counter(&vm, 1) > before.1));
    vm.stop();
    let out = vm.run_for(TIMEOUT).unwrap();
    assert_eq!((out.reason, out.vcpu), (StopReason::Requested, None));
}

#[test]
fn pause_freezes_the_guest_and_resume_continues_it() {
    let (vm, _, _) = TestVm::new(Guest::COUNTER).start(&counters(2));
    assert!(eventually(20, || counter(&vm, 0) > 0 && counter(&vm, 1) > 0));
    for _ in 0..3 {
        vm.pause();
        let frozen = (counter(&vm, 0), counter(&vm, 1));
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(
            (counter(&vm, 0), counter(&vm, 1)),
            frozen,
            "a paused guest must not run"
        );
        vm.resume();
        assert!(eventually(20, || counter(&vm, 0) > frozen.0
            && counter(&vm, 1) > frozen.1));
    }
    vm.stop();
    vm.run_for(TIMEOUT).unwrap();
}

#[test]
fn every_kick_is_seen() {
    let (vm, _, _) = TestVm::new(Guest::COUNTER).start(&counters(1));
    assert!(eventually(20, || counter(&vm, 0) > 0));
    for i in 1..=50 {
        vm.kick(0).unwrap();
        assert!(
            eventually(10, || vm.kicks_seen(0).unwrap() >= i),
            "kick {i} was lost"
        );
    }
    assert!(vm.stats(0).unwrap().count(ExitKind::Kicked) >= 1);
    assert!(matches!(
        vm.kick(1),
        Err(vmcraft::vcpu::VmError::NoSuchVcpu { index: 1, count: 1 })
    ));
    vm.stop();
    vm.run_for(TIMEOUT).unwrap();
}

#[test]
fn dirty_pages_merge_guest_and_vmm_writes() {
    let mut t = TestVm::new(Guest::COUNTER);
    {
        let (ram, fd) = t.builder.vm_mut().ram_mut();
        ram.set_dirty_logging(fd, true).unwrap();
    }
    // A VMM write after logging started (the same bytes again, so unchecked).
    Guest::COUNTER.load(t.builder.memory()).unwrap();
    let (vm, _, _) = t.start(&counters(1));
    assert!(eventually(20, || counter(&vm, 0) > 0));
    vm.pause();
    let dirty = vm.vm().ram().take_dirty_pages(vm.vm().fd()).unwrap();
    assert!(
        dirty.contains(Guest::counter_addr(0)),
        "guest write missing"
    );
    assert!(
        dirty.contains(vm_memory::GuestAddress(abi::LOAD_ADDR)),
        "VMM write missing"
    );
    vm.resume();
    let c = counter(&vm, 0);
    assert!(eventually(20, || counter(&vm, 0) > c));
    vm.pause();
    let again = vm.vm().ram().take_dirty_pages(vm.vm().fd()).unwrap();
    assert!(again.contains(Guest::counter_addr(0)));
    assert!(
        !again.contains(vm_memory::GuestAddress(abi::LOAD_ADDR)),
        "log was not cleared"
    );
    vm.stop();
    vm.run_for(TIMEOUT).unwrap();
}

#[test]
fn an_unmodified_style_driver_uses_the_emulated_ata_disk() {
    use std::sync::Arc;
    use vmcraft::devices::ata::AtaDisk;
    let mut t = TestVm::new(Guest::ATA_BENCH);
    let scratch = ScratchImage::new("ata-guest", 1 << 20);
    let disk = Arc::new(AtaDisk::new(scratch.file(), false).unwrap());
    let buses = t.builder.buses_mut();
    buses
        .register_pio(AtaDisk::COMMAND_BASE, 8, disk.clone())
        .unwrap();
    buses.register_pio(AtaDisk::CONTROL_BASE, 1, disk).unwrap();
    let (running, serial, _) = t.start(&one(Guest::ATA_BENCH, 4));
    let outcome = running.run_for(TIMEOUT).unwrap();
    let image = scratch.contents();
    assert_eq!(
        outcome.reason,
        vmcraft_guest_kit::exited(0),
        "{:?}",
        serial.contents()
    );
    assert_eq!(serial.contents(), b"ata ok\n");
    for (i, word) in image[40 * 512..40 * 512 + 4096].chunks_exact(4).enumerate() {
        let want = (i as u32).wrapping_mul(0x0100_0193) ^ 0xa7a;
        assert_eq!(
            u32::from_le_bytes(word.try_into().unwrap()),
            want,
            "word {i}"
        );
    }
}

/// The probe sees the VMM's hypervisor leaf from kernel mode on every host, and from
/// user mode wherever the host can fault CPUID (hardware-assisted KVM always can; a
/// nested host only with `cpuid_fault`).
#[test]
fn the_host_probe_finds_the_vmm_leaf_from_kernel_mode() {
    require_kvm();
    let probe = vmcraft::vcpu::probe::probe_host().unwrap();
    assert!(probe.cpuid_traps_at_cpl0, "{probe}");
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let flags = cpuinfo.lines().find(|l| l.starts_with("flags")).unwrap();
    let faulting = flags.split_whitespace().any(|f| f == "cpuid_fault");
    let hardware = flags.split_whitespace().any(|f| f == "vmx" || f == "svm");
    if faulting || hardware {
        assert!(probe.cpuid_traps_at_cpl3, "{probe}");
    }
    assert!(probe.pio_exit > std::time::Duration::ZERO, "{probe}");
}

#[test]
fn boot_tables_are_written_only_when_an_entry_needs_them() {
    use vmcraft::vcpu::mode::{boot_table_ranges, GDT_ADDR, PML4_ADDR};
    // Real mode runs without them: the GDT's and PML4's pages stay as they were.
    let vm = TestVm::new(Guest::REAL_MODE_HELLO);
    let memory = vm.builder.memory().clone();
    let (running, serial, _) = vm.start(&one(Guest::REAL_MODE_HELLO, 0));
    assert_eq!(
        running.run_for(TIMEOUT).unwrap().reason,
        vmcraft_guest_kit::exited(0x42)
    );
    assert_eq!(serial.contents(), b"real mode\n");
    let gdt: u64 = memory
        .read_obj(vm_memory::GuestAddress(GDT_ADDR + 8))
        .unwrap();
    let pml4: u64 = memory.read_obj(vm_memory::GuestAddress(PML4_ADDR)).unwrap();
    assert_eq!(
        (gdt, pml4),
        (0, 0),
        "boot tables written for a real-mode entry"
    );

    // A long-mode entry gets them; an image loaded over them is refused, naming both.
    let mut b = machine_builder(16 << 20, Box::new(std::io::sink()));
    b.load(Guest::HELLO.image()).unwrap();
    let tables = boot_table_ranges()[1];
    let overlay = [0x90u8; 16];
    b.load(vmcraft::memory::layout::Image {
        name: "overlay",
        addr: tables.start + 0x100,
        bytes: &overlay,
    })
    .unwrap();
    let e = b
        .start(&[VcpuConfig::at(Guest::HELLO.entry(0, 0))])
        .unwrap_err();
    let msg = format!("{e}: {}", std::error::Error::source(&e).unwrap());
    assert!(
        msg.contains("boot page tables") && msg.contains("overlay"),
        "{msg}"
    );

    // Two images on one range are refused when the second is loaded.
    let mut b = machine_builder(16 << 20, Box::new(std::io::sink()));
    b.load(Guest::HELLO.image()).unwrap();
    let e = b.load(Guest::COUNTER.image()).unwrap_err();
    let msg = format!("{}", std::error::Error::source(&e).unwrap());
    assert!(
        msg.contains("counter") && msg.contains("overlaps hello"),
        "{msg}"
    );
}

/// A kernel loaded from bytes in memory boots (the tiny ELF kernel: a newline on
/// COM1, then a reset through the i8042), and the vCPU count is given once: starting
/// other than the vCPUs the ACPI tables describe is refused.
#[test]
fn a_kernel_from_memory_boots_and_the_vcpu_count_must_match_its_tables() {
    use std::io::Cursor;
    let serial = vmcraft::devices::serial::SharedBuffer::new();
    let load = |vcpus: u32| {
        let mut b = common::machine_builder(32 << 20, Box::new(serial.clone()));
        let loaded = b
            .load_linux(
                &mut Cursor::new(vmcraft_guest_kit::ELF_RESET),
                None::<&mut std::fs::File>,
                "console=ttyS0",
                vcpus,
            )
            .unwrap();
        (b, loaded)
    };
    let (b, loaded) = load(2);
    let err = b.start(&[VcpuConfig::at(loaded.entry)]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the kernel was told of 2 vCPUs, 1 were started"
    );
    let (b, loaded) = load(1);
    let machine = b.start(&[VcpuConfig::at(loaded.entry)]).unwrap();
    let outcome = machine.run_for(TIMEOUT).unwrap();
    assert_eq!(outcome.reason, StopReason::Reset);
    assert_eq!(serial.contents(), b"\n");
}
