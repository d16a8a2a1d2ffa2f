//! Shared by the benchmarks.

/// Exit with a clear message when /dev/kvm cannot be opened read-write.
/// Also puts every thread vmcraft starts from here on under its seccomp filter, as the
/// example VMM runs them (`VMCRAFT_SECCOMP=log` logs forbidden calls instead of killing
/// the process).
pub fn require_kvm(bench: &str) {
    let on_violation = match std::env::var("VMCRAFT_SECCOMP").as_deref() {
        Ok("log") => vmcraft::sandbox::Violation::Log,
        _ => vmcraft::sandbox::Violation::KillProcess,
    };
    if let Err(e) = vmcraft::sandbox::enable(vmcraft::sandbox::Policy {
        on_violation,
        ..Default::default()
    }) {
        eprintln!("the {bench} benchmark runs under vmcraft's seccomp filters, which failed: {e}");
        std::process::exit(1);
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        eprintln!("the {bench} benchmark runs real guests and needs /dev/kvm (read-write): {e}");
        std::process::exit(1);
    }
}

/// CPU time (ns) of this process's thread named `name`, from schedstat.
#[allow(dead_code)] // not every benchmark looks at threads
pub fn thread_cpu_ns(name: &str) -> Option<u64> {
    // Threads come and go while we look: skip the ones that vanish.
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let dir = task.path();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        if comm.trim_end() == name {
            let sched = std::fs::read_to_string(dir.join("schedstat")).ok()?;
            return sched.split_whitespace().next()?.parse().ok();
        }
    }
    None
}

/// The CPU time (ns) of this process's threads whose names start with `prefix`.
#[allow(dead_code)] // not every benchmark looks at threads
pub fn threads_cpu_ns(prefix: &str) -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task")
        .expect("tasks")
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.starts_with(prefix) {
            total += thread_cpu_ns(comm.trim_end()).unwrap_or(0);
        }
    }
    total
}

/// A scratch disk image of `bytes`, filled with data (so reads hit real blocks),
/// removed on drop.
#[allow(dead_code)]
pub struct Image {
    /// Its path.
    pub path: std::path::PathBuf,
    /// The open file.
    pub file: std::fs::File,
}

#[allow(dead_code)]
impl Image {
    /// Create it.
    pub fn new(name: &str, bytes: u64) -> Image {
        use std::os::unix::fs::FileExt;
        let path =
            std::env::temp_dir().join(format!("vmcraft-bench-{name}-{}.img", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("create the image");
        let chunk = vec![0xa5u8; 1 << 20];
        for i in 0..bytes >> 20 {
            file.write_all_at(&chunk, i << 20).expect("fill the image");
        }
        Image { path, file }
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The benchmark's row filter: the arguments after `cargo bench --bench NAME --` that
/// are not flags (cargo adds `--bench`); a row runs if its name contains any of them,
/// or if there are none.
#[allow(dead_code)] // not every benchmark has rows to pick
pub fn row_filter() -> impl Fn(&str) -> bool {
    let words: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    move |name| words.is_empty() || words.iter().any(|w| name.contains(w.as_str()))
}
