//! A jail for a VMM process, after Firecracker's jailer: new mount, PID and network
//! namespaces (and a user namespace when not started as root), a root directory that
//! holds only the files the VM needs, no capabilities, resource limits, and cgroup v2
//! limits when the host has cgroup v2.
//!
//! The jail's root is a tmpfs mounted in the jail's own mount namespace, on the
//! directory given if it exists, else on its parent (the files to bind in are opened
//! first, so the tmpfs hiding their paths does not matter): the mount points made for
//! the bound files and `/proc` live in it, and nothing is created on the host's disk,
//! so nothing is left behind however the VMM ends, killed included.
//!
//! [`Jail::enter`] forks: the child is PID 1 of the new PID namespace and continues as
//! the jailed VMM ([`Entered::Jailed`]); the caller's process waits for it and learns
//! how it ended ([`Entered::Outside`]). Call it while the process has one thread (before
//! any VM, device or log thread starts), after opening whatever must come from outside
//! (a TAP device of the host's network namespace, say): descriptors stay open across it.
//!
//! ```no_run
//! use vmcraft_sandbox::jail::{Entered, Jail};
//!
//! let jail = Jail::new("/srv/jail/vm1")
//!     .bind("/dev/kvm", "/dev/kvm", true)
//!     .bind("/var/lib/images/vm1.img", "/disk.img", true)
//!     .open_files(64);
//! match jail.enter()? {
//!     Entered::Jailed => { /* build and run the VM here: only /dev/kvm, /disk.img, /proc */ }
//!     Entered::Outside(status) => std::process::exit(status.code().unwrap_or(1)),
//! }
//! # Ok::<(), vmcraft_sandbox::jail::JailError>(())
//! ```

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use thiserror::Error;

/// Errors from entering a jail: each says which step failed, on which path.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum JailError {
    /// The process has more than one thread (a fork would copy only the caller).
    #[error("the process has {0} threads: enter the jail before starting any")]
    Threads(usize),
    /// A step failed.
    #[error("jail: cannot {step} {path:?}")]
    Step {
        /// What was being done.
        step: &'static str,
        /// On which path (empty when none).
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// cgroup limits were asked for and the host has no cgroup v2 hierarchy there.
    #[error("no cgroup v2 hierarchy at {0:?} (the host mounts cgroup v1 or none)")]
    NoCgroupV2(PathBuf),
}

/// How a [`Jail::enter`] call returns.
#[derive(Debug)]
pub enum Entered {
    /// This process is the jailed one: carry on and run the VM.
    Jailed,
    /// This is the original process; the jailed one ended with this status.
    Outside(ExitStatus),
}

/// A file or directory of the host made visible inside the jail.
#[derive(Debug, Clone)]
struct Bind {
    host: PathBuf,
    inside: PathBuf,
    writable: bool,
}

/// cgroup v2 limits for the jailed process.
#[derive(Debug, Clone, Default)]
pub struct CgroupLimits {
    /// The cgroup to create (or use) and move the process into, e.g.
    /// `/sys/fs/cgroup/vmcraft/vm1`; its parent must delegate the controllers.
    pub path: PathBuf,
    /// `cpu.max`: at most `quota` µs of CPU per `period` µs.
    pub cpu_max: Option<(u64, u64)>,
    /// `memory.max`, bytes.
    pub memory_max: Option<u64>,
}

/// What the jailed process may see and use (see the module documentation).
#[derive(Debug, Clone)]
pub struct Jail {
    root: PathBuf,
    binds: Vec<Bind>,
    new_network: bool,
    open_files: Option<u64>,
    address_space: Option<u64>,
    cgroup: Option<CgroupLimits>,
    forward: Vec<libc::c_int>,
}

/// The jailed child, for the signal forwarder (0 when there is none).
static CHILD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn forward_signal(signal: libc::c_int) {
    let child = CHILD.load(std::sync::atomic::Ordering::SeqCst);
    if child > 0 {
        // SAFETY: kill is async-signal-safe and only sends a signal.
        unsafe { libc::kill(child, signal) };
    }
}

impl Jail {
    /// A jail rooted at directory `root` (created if missing; it should be empty: what
    /// is in it is visible inside). By default it has a network namespace of its own
    /// (no interfaces but loopback) and no limits.
    pub fn new(root: impl Into<PathBuf>) -> Jail {
        Jail {
            root: root.into(),
            binds: Vec::new(),
            new_network: true,
            open_files: None,
            address_space: None,
            cgroup: None,
            forward: Vec::new(),
        }
    }

    /// Pass `signals`, sent to the process that waits outside, on to the jailed one
    /// (whose PID, in a namespace of its own, the sender does not know): a VMM's
    /// control signals. The jailed process should handle them from its start.
    pub fn forward_signals(mut self, signals: &[libc::c_int]) -> Jail {
        self.forward = signals.to_vec();
        self
    }

    /// Make the host's `host` (a file, device node or directory) visible at `inside`
    /// (an absolute path in the jail), read-only unless `writable`.
    pub fn bind(
        mut self,
        host: impl Into<PathBuf>,
        inside: impl Into<PathBuf>,
        writable: bool,
    ) -> Jail {
        self.binds.push(Bind {
            host: host.into(),
            inside: inside.into(),
            writable,
        });
        self
    }

    /// Keep the host's network namespace (`false`), e.g. to open a TAP inside.
    pub fn new_network(mut self, new: bool) -> Jail {
        self.new_network = new;
        self
    }

    /// At most `n` open descriptors (`RLIMIT_NOFILE`).
    pub fn open_files(mut self, n: u64) -> Jail {
        self.open_files = Some(n);
        self
    }

    /// At most `bytes` of address space (`RLIMIT_AS`): guest RAM counts, so leave it
    /// room.
    pub fn address_space(mut self, bytes: u64) -> Jail {
        self.address_space = Some(bytes);
        self
    }

    /// cgroup v2 limits (an error at [`enter`](Self::enter) if the host has none).
    pub fn cgroup(mut self, limits: CgroupLimits) -> Jail {
        self.cgroup = Some(limits);
        self
    }

    /// Enter the jail: see the module documentation.
    pub fn enter(self) -> Result<Entered, JailError> {
        let threads = fs::read_dir("/proc/self/task")
            .map_err(step("count the threads in", "/proc/self/task"))?
            .count();
        if threads != 1 {
            return Err(JailError::Threads(threads));
        }
        if let Some(cgroup) = &self.cgroup {
            join_cgroup(cgroup, std::process::id())?;
        }
        // SAFETY: geteuid has no preconditions.
        let root_user = unsafe { libc::geteuid() } == 0;
        let (uid, gid) = (
            // SAFETY: as above.
            unsafe { libc::geteuid() },
            // SAFETY: getegid has no preconditions.
            unsafe { libc::getegid() },
        );
        // The PID namespace (and the user namespace that allows it when not root) is
        // the caller's to make: it applies to the children it forks. The mount and
        // network namespaces are made by the child alone, after the fork: made here,
        // the child's pivot_root would move this process into the jail too.
        let mut flags = libc::CLONE_NEWPID;
        if !root_user {
            flags |= libc::CLONE_NEWUSER;
        }
        // SAFETY: unshare only changes this (single-threaded) process's namespaces.
        check(unsafe { libc::unshare(flags) }).map_err(step("unshare the namespaces of", ""))?;
        if !root_user {
            map_user(uid, gid)?;
        }
        // Unwritten output would be written twice, by both processes.
        let _ = io::Write::flush(&mut io::stdout());
        // A pipe the child watches: this process holds its write end for as long as it
        // lives, so a child whose parent died before its parent-death signal was set
        // sees the pipe hang up, and ends.
        let (alive_read, alive_write) = pipe()?;
        // SAFETY: the process has one thread (checked above), so the child gets a
        // consistent copy of everything; it goes on with ordinary Rust code.
        let pid = unsafe { libc::fork() };
        match pid {
            -1 => Err(step("fork into", "")(io::Error::last_os_error())),
            0 => {
                drop(alive_write);
                self.inside(alive_read).map_err(|e| {
                    // The parent reports the status; say why here.
                    eprintln!("vmcraft jail: {e}");
                    e
                })?;
                Ok(Entered::Jailed)
            }
            child => {
                drop(alive_read);
                CHILD.store(child, std::sync::atomic::Ordering::SeqCst);
                for &signal in &self.forward {
                    // SAFETY: the handler only reads an atomic and calls kill, both
                    // async-signal-safe; the struct is zeroed, then given the handler
                    // and an empty mask.
                    unsafe {
                        let mut action: libc::sigaction = std::mem::zeroed();
                        action.sa_sigaction = forward_signal as extern "C" fn(libc::c_int) as usize;
                        libc::sigemptyset(&mut action.sa_mask);
                        libc::sigaction(signal, &action, std::ptr::null_mut());
                    }
                }
                wait_for(child).map(Entered::Outside)
            }
        }
    }

    /// The jailed child's set-up: its own mount and network namespaces, mounts, the
    /// new root, limits, capabilities.
    fn inside(&self, parent_alive: std::os::fd::OwnedFd) -> Result<(), JailError> {
        let mut flags = libc::CLONE_NEWNS;
        if self.new_network {
            flags |= libc::CLONE_NEWNET;
        }
        // SAFETY: unshare only changes this (single-threaded) process's namespaces.
        check(unsafe { libc::unshare(flags) })
            .map_err(step("unshare the mount and network namespaces of", ""))?;
        // Die with the process that waits for us.
        // SAFETY: PR_SET_PDEATHSIG takes a signal number.
        check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) })
            .map_err(step("set the parent-death signal of", ""))?;
        // If the parent died before that, no signal will come: its end of the pipe has
        // closed.
        if parent_gone(&parent_alive) {
            return Err(step("outlive", "the process that waits for the jail")(
                io::Error::from(io::ErrorKind::BrokenPipe),
            ));
        }
        drop(parent_alive);
        // Nothing mounted from here on reaches the host's mount namespace.
        mount(None, Path::new("/"), None, libc::MS_REC | libc::MS_PRIVATE)
            .map_err(step("make private", "/"))?;
        // The files to bind in, held open: the tmpfs below may hide their paths.
        let sources = self
            .binds
            .iter()
            .map(|bind| {
                use std::os::unix::fs::OpenOptionsExt;
                let file = fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_PATH)
                    .open(&bind.host)
                    .map_err(step("find", &bind.host))?;
                let is_dir = file.metadata().map_err(step("find", &bind.host))?.is_dir();
                Ok((file, is_dir))
            })
            .collect::<Result<Vec<_>, JailError>>()?;
        // The root is a tmpfs mounted in this namespace only, on the directory named if
        // it exists, else on its parent: nothing is made on the host's disk, so nothing
        // is left there however the VMM ends.
        let root = self.root_mount()?;
        mount(
            Some(Path::new("tmpfs")),
            &root,
            Some("tmpfs"),
            libc::MS_NOSUID | libc::MS_NODEV,
        )
        .map_err(step("mount a tmpfs at", &root))?;
        for (bind, (source, is_dir)) in self.binds.iter().zip(&sources) {
            use std::os::fd::AsRawFd;
            let target = root.join(bind.inside.strip_prefix("/").unwrap_or(&bind.inside));
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent).map_err(step("create", parent))?;
            }
            if *is_dir {
                fs::create_dir_all(&target).map_err(step("create", &target))?;
            } else if !target.exists() {
                fs::File::create(&target).map_err(step("create", &target))?;
            }
            let source_path = PathBuf::from(format!("/proc/self/fd/{}", source.as_raw_fd()));
            mount(Some(&source_path), &target, None, libc::MS_BIND)
                .map_err(step("bind-mount", &bind.host))?;
            if !bind.writable {
                let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY;
                mount(None, &target, None, flags).map_err(step("make read-only", &target))?;
            }
        }
        drop(sources);
        // This PID namespace's own /proc (the VMM reads /proc/self).
        let proc_dir = root.join("proc");
        fs::create_dir_all(&proc_dir).map_err(step("create", &proc_dir))?;
        let nosuid = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        mount(Some(Path::new("proc")), &proc_dir, Some("proc"), nosuid)
            .map_err(step("mount proc at", &proc_dir))?;
        pivot_into(&root)?;
        if let Some(n) = self.open_files {
            set_limit(libc::RLIMIT_NOFILE, n)?;
        }
        if let Some(bytes) = self.address_space {
            set_limit(libc::RLIMIT_AS, bytes)?;
        }
        drop_capabilities()
    }
}

impl Jail {
    /// Where the jail's tmpfs goes: the root directory if it exists, else its parent
    /// (which must), so that nothing need be created on the host.
    fn root_mount(&self) -> Result<PathBuf, JailError> {
        if self.root.is_dir() {
            return Ok(self.root.clone());
        }
        match self.root.parent() {
            Some(parent) if parent.is_dir() && !parent.as_os_str().is_empty() => {
                Ok(parent.to_path_buf())
            }
            _ => Err(step("find the directory of", &self.root)(io::Error::from(
                io::ErrorKind::NotFound,
            ))),
        }
    }
}

/// Make `root` the root directory and forget the old one. When the old root is the
/// initramfs (rootfs), which `pivot_root` refuses with `EINVAL`, the jail's root is
/// moved over it and entered with `chroot`, as `switch_root` does; with every
/// capability dropped afterwards, the process cannot leave it.
fn pivot_into(root: &Path) -> Result<(), JailError> {
    std::env::set_current_dir(root).map_err(step("enter", root))?;
    let dot = c".";
    // SAFETY: pivot_root reads two valid NUL-terminated paths. With both "." the old
    // root ends up stacked on the new one, which the unmount below detaches.
    let pivoted =
        check(unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } as i32);
    match pivoted {
        Ok(()) => {
            // SAFETY: umount2 reads a valid NUL-terminated path.
            check(unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) })
                .map_err(step("detach the old root from", root))?;
        }
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            mount(Some(Path::new(".")), Path::new("/"), None, libc::MS_MOVE)
                .map_err(step("move over the initramfs", root))?;
            // SAFETY: chroot reads a valid NUL-terminated path.
            check(unsafe { libc::chroot(dot.as_ptr()) }).map_err(step("chroot into", root))?;
        }
        Err(e) => return Err(step("pivot_root into", root)(e)),
    }
    std::env::set_current_dir("/").map_err(step("enter", "/"))
}

/// In a new user namespace: map the caller's uid and gid to root inside.
fn map_user(uid: libc::uid_t, gid: libc::gid_t) -> Result<(), JailError> {
    let write = |file: &str, text: String| fs::write(file, text).map_err(step("write", file));
    write("/proc/self/setgroups", "deny".into())?;
    write("/proc/self/uid_map", format!("0 {uid} 1"))?;
    write("/proc/self/gid_map", format!("0 {gid} 1"))
}

/// Create (if needed) the cgroup, write its limits, and move `pid` into it.
fn join_cgroup(limits: &CgroupLimits, pid: u32) -> Result<(), JailError> {
    let mut hierarchy = limits.path.as_path();
    while let Some(parent) = hierarchy.parent() {
        if parent.join("cgroup.controllers").exists() {
            hierarchy = parent;
        } else {
            break;
        }
    }
    if !hierarchy.join("cgroup.controllers").exists() {
        return Err(JailError::NoCgroupV2(hierarchy.to_path_buf()));
    }
    write_cgroup(limits, pid)
}

/// Write `limits` into the cgroup directory and add `pid` (plain file writes, so the
/// format is tested against any directory).
fn write_cgroup(limits: &CgroupLimits, pid: u32) -> Result<(), JailError> {
    let dir = &limits.path;
    fs::create_dir_all(dir).map_err(step("create the cgroup", dir))?;
    // The parent hands the controllers down to its children (cgroup v2's delegation).
    if let Some(parent) = dir.parent() {
        let control = parent.join("cgroup.subtree_control");
        let mut wanted = Vec::new();
        if limits.cpu_max.is_some() {
            wanted.push("+cpu");
        }
        if limits.memory_max.is_some() {
            wanted.push("+memory");
        }
        if !wanted.is_empty() {
            fs::write(&control, wanted.join(" ")).map_err(step("write", &control))?;
        }
    }
    let write = |name: &str, value: String| {
        let file = dir.join(name);
        fs::write(&file, value).map_err(step("write", &file))
    };
    if let Some((quota, period)) = limits.cpu_max {
        write("cpu.max", format!("{quota} {period}\n"))?;
    }
    if let Some(bytes) = limits.memory_max {
        write("memory.max", format!("{bytes}\n"))?;
    }
    write("cgroup.procs", format!("{pid}\n"))
}

fn set_limit(resource: libc::__rlimit_resource_t, value: u64) -> Result<(), JailError> {
    let limit = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: setrlimit reads the struct, which lives across the call.
    check(unsafe { libc::setrlimit(resource, &limit) }).map_err(step("set a resource limit on", ""))
}

/// Drop every capability: from the bounding set (so none can come back with exec), the
/// ambient set, and the effective, permitted and inheritable sets; then forbid gaining
/// privileges.
fn drop_capabilities() -> Result<(), JailError> {
    for cap in 0.. {
        // SAFETY: PR_CAPBSET_READ takes a capability number.
        if unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap) } < 0 {
            break; // past the last capability this kernel knows
        }
        // SAFETY: PR_CAPBSET_DROP takes a capability number.
        check(unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap) })
            .map_err(step("drop a capability from the bounding set of", ""))?;
    }
    // SAFETY: PR_CAP_AMBIENT_CLEAR_ALL takes no further arguments.
    check(unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    })
    .map_err(step("clear the ambient capabilities of", ""))?;
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset reads a version-3 header and two data words, both valid for the
    // call.
    check(unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } as i32)
        .map_err(step("drop the capabilities of", ""))?;
    // SAFETY: PR_SET_NO_NEW_PRIVS takes 1.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })
        .map_err(step("forbid new privileges to", ""))
}

fn wait_for(child: libc::pid_t) -> Result<ExitStatus, JailError> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes the status through a valid pointer.
        let rc = unsafe { libc::waitpid(child, &mut status, 0) };
        if rc == child {
            return Ok(ExitStatus::from_raw(status));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(step("wait for the jailed process in", "")(e));
        }
    }
}

fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
) -> io::Result<()> {
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other);
    let source = source.map(c).transpose()?;
    let target = c(target)?;
    let fstype = fstype
        .map(CString::new)
        .transpose()
        .map_err(io::Error::other)?;
    let ptr = |s: &Option<CString>| s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is a valid NUL-terminated string or null, and mount reads
    // them only during the call; no data argument.
    check(unsafe {
        libc::mount(
            ptr(&source),
            target.as_ptr(),
            ptr(&fstype),
            flags,
            std::ptr::null(),
        )
    })
}

/// A pipe, both ends closed on exec.
fn pipe() -> Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd), JailError> {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })
        .map_err(step("make a pipe for", ""))?;
    // SAFETY: pipe2 succeeded: both descriptors are open and owned by nobody else.
    Ok(unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    })
}

/// Whether the write end of `read`'s pipe has closed (nothing is ever written).
fn parent_gone(read: &std::os::fd::OwnedFd) -> bool {
    use std::os::fd::AsRawFd;
    let mut poll = libc::pollfd {
        fd: read.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes one pollfd, which lives across the call.
    let rc = unsafe { libc::poll(&mut poll, 1, 0) };
    rc > 0 && poll.revents & (libc::POLLHUP | libc::POLLIN) != 0
}

fn check(rc: i32) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn step(what: &'static str, path: impl AsRef<Path>) -> impl FnOnce(io::Error) -> JailError {
    let path = path.as_ref().to_path_buf();
    move |source| JailError::Step {
        step: what,
        path,
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_limits_are_written_as_cgroup_v2_reads_them() {
        let dir = std::env::temp_dir().join(format!("vmcraft-cgroup-{}", std::process::id()));
        let limits = CgroupLimits {
            path: dir.join("vm1"),
            cpu_max: Some((50_000, 100_000)),
            memory_max: Some(256 << 20),
        };
        write_cgroup(&limits, 4242).unwrap();
        let read = |f: &str| fs::read_to_string(dir.join("vm1").join(f)).unwrap();
        assert_eq!(read("cpu.max"), "50000 100000\n");
        assert_eq!(read("memory.max"), "268435456\n");
        assert_eq!(read("cgroup.procs"), "4242\n");
        assert_eq!(
            fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap(),
            "+cpu +memory"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_host_without_cgroup_v2_is_an_error_naming_it() {
        let limits = CgroupLimits {
            path: PathBuf::from("/nonexistent/vmcraft"),
            ..Default::default()
        };
        assert!(matches!(
            join_cgroup(&limits, 1),
            Err(JailError::NoCgroupV2(_))
        ));
    }

    #[test]
    fn a_process_with_threads_is_refused() {
        // The test harness runs this on a thread of its own.
        let result = Jail::new("/nonexistent").enter();
        assert!(
            matches!(result, Err(JailError::Threads(n)) if n > 1),
            "{result:?}"
        );
    }
}
