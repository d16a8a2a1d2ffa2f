//! How much host memory a VMM process and its guest RAM use (procfs and mincore(2)).
//!
//! The VMM's own overhead is the process's resident memory minus the guest RAM that is
//! resident: [`ProcessMemory::current`] gives the first, [`GuestRam::resident_bytes`]
//! the second.
//!
//! [`GuestRam::resident_bytes`]: crate::GuestRam::resident_bytes

use std::io;

/// Resident memory of the current process, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessMemory {
    /// Resident set size now (`VmRSS`).
    pub rss: u64,
    /// The highest resident set size so far (`VmHWM`).
    pub peak_rss: u64,
}

impl ProcessMemory {
    /// Read `/proc/self/status`.
    pub fn current() -> io::Result<ProcessMemory> {
        Self::parse(&std::fs::read_to_string("/proc/self/status")?)
    }

    /// Read it again from `status`, `/proc/self/status` opened earlier: a process whose
    /// threads may no longer open files (see `vmcraft-sandbox`) opens it before, and
    /// reads it whenever it needs to (each read from offset 0 is a fresh snapshot).
    pub fn read_from(status: &std::fs::File) -> io::Result<ProcessMemory> {
        use std::os::unix::fs::FileExt;
        let mut text = vec![0u8; 8192];
        let mut len = 0;
        loop {
            let n = status.read_at(&mut text[len..], len as u64)?;
            if n == 0 {
                break;
            }
            len += n;
            if len == text.len() {
                text.resize(len * 2, 0);
            }
        }
        Self::parse(&String::from_utf8_lossy(&text[..len]))
    }

    fn parse(status: &str) -> io::Result<ProcessMemory> {
        parse_status(status).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "/proc/self/status has no VmRSS or VmHWM line",
            )
        })
    }
}

fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix(':')?;
        let kib: u64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
        kib.checked_mul(1024)
    })
}

/// Parse `VmRSS` and `VmHWM` out of a `/proc/<pid>/status` text.
pub(crate) fn parse_status(status: &str) -> Option<ProcessMemory> {
    Some(ProcessMemory {
        rss: kib_field(status, "VmRSS")?,
        peak_rss: kib_field(status, "VmHWM")?,
    })
}

/// Count the resident pages of `len` bytes of this process's memory at `addr` (page
/// aligned), with mincore(2).
///
/// # Safety
///
/// `addr..addr + len` must be mapped in this process for the duration of the call.
pub(crate) unsafe fn resident_bytes_of(addr: *mut u8, len: usize) -> io::Result<u64> {
    let page = crate::PAGE_SIZE as usize;
    let mut vec = vec![0u8; len.div_ceil(page)];
    // SAFETY: the caller guarantees the range is mapped; `vec` has one byte for each
    // page of it, which is what mincore writes.
    let rc = unsafe { libc::mincore(addr.cast(), len, vec.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(vec.iter().filter(|&&b| b & 1 != 0).count() as u64 * page as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tminimal-vmm\nVmPeak:\t  150000 kB\nVmHWM:\t    2336 kB\nVmRSS:\t    2300 kB\nThreads:\t2\n";

    #[test]
    fn status_fields_are_read_in_bytes() {
        let m = parse_status(STATUS).unwrap();
        assert_eq!(m.peak_rss, 2336 * 1024);
        assert_eq!(m.rss, 2300 * 1024);
        assert_eq!(parse_status("VmRSS: 1 kB\n"), None);
        assert_eq!(parse_status("VmRSS: x kB\nVmHWM: 1 kB\n"), None);
    }

    #[test]
    fn an_open_status_file_reads_again_and_again() {
        let file = std::fs::File::open("/proc/self/status").unwrap();
        let first = ProcessMemory::read_from(&file).unwrap();
        let grown = vec![1u8; 64 << 20];
        let second = ProcessMemory::read_from(&file).unwrap();
        assert!(first.rss > 0);
        assert!(
            second.peak_rss >= first.peak_rss + (60 << 20),
            "a fresh snapshot: {first:?} then {second:?}"
        );
        drop(std::hint::black_box(grown));
    }

    #[test]
    fn this_process_has_a_resident_set() {
        let m = ProcessMemory::current().unwrap();
        assert!(m.rss > 0 && m.peak_rss >= m.rss, "{m:?}");
    }
}
