//! Shared by the benchmarks.

/// Exit with a clear message when /dev/kvm cannot be opened read-write.
pub fn require_kvm(bench: &str) {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        eprintln!("the {bench} benchmark runs real guests and needs /dev/kvm (read-write): {e}");
        std::process::exit(1);
    }
}
