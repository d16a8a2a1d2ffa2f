//! `--diagnose`: what this host's KVM intercepts, from vmcraft's probe, with the CPU
//! and its flags.

use std::error::Error;
use std::process::ExitCode;

/// `--diagnose`: the CPU, whether its kernel offers CPUID faulting, and what the probe
/// VM found.
pub fn diagnose() -> Result<ExitCode, Box<dyn Error>> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        cpuinfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map_or("unknown", |(_, v)| v.trim())
    };
    let flags = field("flags");
    let has_flag = |f: &str| flags.split_whitespace().any(|x| x == f);
    println!(
        "minimal-vmm: host CPU: {} ({}); cpuid_fault: {}; hardware virtualization visible: {}",
        field("model name"),
        field("vendor_id"),
        if has_flag("cpuid_fault") { "yes" } else { "no" },
        if has_flag("vmx") || has_flag("svm") {
            "yes"
        } else {
            "no (nested KVM: CPL 0 is emulated)"
        }
    );
    if vmcraft::vcpu::probe::kernel_mode_emulated() == Some(true) {
        println!(
            "minimal-vmm: the guest's kernel mode is emulated here: boot a Linux kernel as its ELF vmlinux (a bzImage decompresses itself many times slower; .ci/extract-vmlinux extracts the vmlinux)"
        );
    }
    let probe = vmcraft::vcpu::probe::probe_host()?;
    for line in probe.to_string().lines() {
        println!("minimal-vmm: {line}");
    }
    Ok(ExitCode::SUCCESS)
}
