//! Defence in depth for vmcraft VMMs: what a VMM thread may ask of the host kernel.
//!
//! A guest is an attacker from its first instruction, and the threads that serve it
//! parse what it wrote. If one of them is ever subverted, a seccomp-bpf filter bounds
//! what it can do next: each kind of thread ([`ThreadKind`]) gets an allowlist of the
//! system calls that kind makes ([`filter::rules`]), and anything else meets the
//! policy's [`Violation`] action (by default the process is killed, as Firecracker
//! does).
//!
//! vmcraft's crates start every thread they own through [`spawn`], which installs the
//! thread's filter before its body runs once a process has called [`enable`], and
//! reports a filter that could not be installed as an error to whoever started the
//! thread. A process that never calls [`enable`] runs unfiltered.
//!
//! ```no_run
//! use vmcraft_sandbox::{Policy, ThreadKind, Violation};
//!
//! // Before the first VM starts: every vmcraft thread filters itself from now on.
//! vmcraft_sandbox::enable(Policy { on_violation: Violation::KillProcess, create_beneath: None })?;
//! // The thread that runs the event loop can filter itself too.
//! vmcraft_sandbox::enter(ThreadKind::Main)?;
//! # Ok::<(), vmcraft_sandbox::SandboxError>(())
//! ```

pub mod filter;
pub mod jail;

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{mpsc, OnceLock};
use std::thread::JoinHandle;

use thiserror::Error;

pub use filter::{ThreadKind, Violation};

/// How the filters are built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// What a system call outside a thread's allowlist meets.
    pub on_violation: Violation,
    /// A directory, open in this process, in which the main thread may still open
    /// and create files once filtered: `openat2` relative to this descriptor is
    /// allowed to it and nothing else ([`open_beneath`] opens that way, resolving
    /// no path outside the directory). `None`: the main thread opens no file at all.
    pub create_beneath: Option<RawFd>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            on_violation: Violation::KillProcess,
            create_beneath: None,
        }
    }
}

/// The argument of `openat2` (`struct open_how` of `<linux/openat2.h>`, its first
/// version: 24 bytes).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// How [`open_beneath`] opens a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beneath {
    /// An existing file, for reading.
    Read,
    /// An existing file, for reading and writing.
    ReadWrite,
    /// For reading and writing, created (mode 0600) if missing; nothing truncated.
    Create,
}

/// Open `path` (relative) beneath the directory `dir`: the kernel resolves it with
/// `RESOLVE_BENEATH` and `RESOLVE_NO_MAGICLINKS`, so an absolute path, `..` leading
/// out, or a symbolic link pointing out of `dir` is refused (`EXDEV`, `ELOOP`). The
/// one way a filtered main thread opens files, when its [`Policy::create_beneath`] is
/// `dir`. Does not block on a FIFO put in the file's place (`O_NONBLOCK`); the caller
/// checks what it got.
pub fn open_beneath(dir: &impl AsFd, path: &Path, how: Beneath) -> io::Result<File> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the path"))?;
    let access = match how {
        Beneath::Read => libc::O_RDONLY,
        Beneath::ReadWrite => libc::O_RDWR,
        Beneath::Create => libc::O_RDWR | libc::O_CREAT,
    };
    let how = OpenHow {
        flags: (access | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK) as u64,
        // openat2 refuses a mode without O_CREAT.
        mode: if how == Beneath::Create { 0o600 } else { 0 },
        resolve: libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: openat2 reads the NUL-terminated path and `how` (its size passed with
    // it), both alive for the call, and returns a new descriptor or -1; nothing else
    // in this process is touched.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_fd().as_raw_fd(),
            path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by openat2 and is owned by nothing else.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd as RawFd) }))
}

/// Errors from building or installing filters, or from starting a thread.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SandboxError {
    /// seccompiler refused the rules (a bug in the allowlist).
    #[error("cannot build the seccomp filter: {filter}")]
    Build {
        /// Which filter.
        filter: &'static str,
        /// What seccompiler said.
        #[source]
        source: seccompiler::BackendError,
    },
    /// seccompiler could not compile the filter to BPF.
    #[error("cannot compile the seccomp filter: {filter}")]
    Compile {
        /// Which filter.
        filter: &'static str,
        /// What seccompiler said.
        #[source]
        source: seccompiler::BackendError,
    },
    /// The kernel refused the filter (no seccomp, or too many filters).
    #[error("cannot install the seccomp filter for {kind:?} threads")]
    Install {
        /// The thread kind.
        kind: ThreadKind,
        /// What the kernel said.
        #[source]
        source: seccompiler::Error,
    },
    /// [`enable`] was called a second time with another policy.
    #[error("filters are already enabled with {current:?}, not {requested:?}")]
    AlreadyEnabled {
        /// The policy in force.
        current: Policy,
        /// The one asked for.
        requested: Policy,
    },
    /// The thread could not be created.
    #[error("cannot start thread {name:?}")]
    Spawn {
        /// The thread's name.
        name: String,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// The thread ended before it said whether its filter was installed.
    #[error("thread {name:?} ended before installing its filter")]
    Vanished {
        /// The thread's name.
        name: String,
    },
}

/// The compiled filters, one per thread kind, once [`enable`] was called.
static ENABLED: OnceLock<(Policy, filter::Compiled)> = OnceLock::new();

/// From now on, every thread vmcraft starts through [`spawn`] installs its kind's
/// filter under `policy`. Compiles every filter first, so a broken allowlist is an
/// error here, not in a thread. Calling it again with the same policy does nothing;
/// filters cannot be relaxed once enabled.
pub fn enable(policy: Policy) -> Result<(), SandboxError> {
    if let Some((current, _)) = ENABLED.get() {
        return match *current == policy {
            true => Ok(()),
            false => Err(SandboxError::AlreadyEnabled {
                current: *current,
                requested: policy,
            }),
        };
    }
    let compiled = filter::Compiled::new(policy)?;
    // A racing `enable` may have won; then its policy is checked like above.
    let (current, _) = ENABLED.get_or_init(|| (policy, compiled));
    if *current != policy {
        return Err(SandboxError::AlreadyEnabled {
            current: *current,
            requested: policy,
        });
    }
    Ok(())
}

/// The policy in force, if [`enable`] was called.
pub fn enabled() -> Option<Policy> {
    ENABLED.get().map(|(policy, _)| *policy)
}

/// Install `kind`'s filter on the calling thread, if filters are enabled. A filter is
/// for the rest of the thread's life.
pub fn enter(kind: ThreadKind) -> Result<(), SandboxError> {
    match ENABLED.get() {
        Some((_, compiled)) => compiled.install(kind),
        None => Ok(()),
    }
}

/// Start a thread named `name` that runs `body` under `kind`'s filter (when filters
/// are enabled). Returns once the filter is in place, or with the error that kept it
/// out (then `body` never runs).
pub fn spawn<T, F>(kind: ThreadKind, name: &str, body: F) -> Result<Thread<T>, SandboxError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let builder = std::thread::Builder::new().name(name.to_owned());
    let spawn_error = |source| SandboxError::Spawn {
        name: name.to_owned(),
        source,
    };
    if ENABLED.get().is_none() {
        let handle = builder.spawn(move || Some(body())).map_err(spawn_error)?;
        return Ok(Thread { handle });
    }
    let (told, installed) = mpsc::sync_channel(1);
    let handle = builder
        .spawn(move || {
            let entered = enter(kind);
            let ok = entered.is_ok();
            // The spawner waits for this; if it has gone, nobody needs the answer.
            let _ = told.send(entered);
            // Without its filter the thread must not serve a guest: it returns at
            // once, and the spawner returns the error.
            ok.then(body)
        })
        .map_err(spawn_error)?;
    match installed.recv() {
        Ok(Ok(())) => Ok(Thread { handle }),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(e)
        }
        Err(_) => Err(SandboxError::Vanished {
            name: name.to_owned(),
        }),
    }
}

/// A thread started by [`spawn`]: its body runs under its filter.
#[derive(Debug)]
pub struct Thread<T> {
    /// `None` only if the filter failed, which `spawn` reported instead of returning
    /// this.
    handle: JoinHandle<Option<T>>,
}

impl<T> Thread<T> {
    /// Wait for the thread to end; `Err` carries its panic.
    pub fn join(self) -> std::thread::Result<T> {
        self.handle.join().and_then(|value| {
            value.ok_or_else(|| Box::new("the thread's filter was not installed") as _)
        })
    }

    /// The thread itself (to unpark it, or read its name).
    pub fn thread(&self) -> &std::thread::Thread {
        self.handle.thread()
    }

    /// Whether the thread has ended.
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// Every test in this binary enables the same policy (it is process-wide).
    const REFUSE: Policy = Policy {
        on_violation: Violation::Errno(libc::EPERM as u32),
        create_beneath: None,
    };

    /// The errno of a call that returned `rc`: call it right after that call.
    fn errno_of(rc: libc::c_long) -> Option<i32> {
        (rc < 0).then(|| std::io::Error::last_os_error().raw_os_error().unwrap())
    }

    #[test]
    fn every_filter_compiles_under_every_action() {
        for kind in ThreadKind::ALL {
            for action in [
                Violation::KillProcess,
                Violation::Trap,
                Violation::Errno(1),
                Violation::Log,
            ] {
                let program = filter::program(kind, action).unwrap();
                assert!(program.len() > 10, "{kind:?}");
            }
        }
    }

    #[test]
    fn a_device_thread_cannot_open_files_or_sockets_but_does_its_io() {
        enable(REFUSE).unwrap();
        let (r, w) = std::io::pipe().unwrap();
        let thread = spawn(ThreadKind::DeviceIo, "sandbox-test", move || {
            // SAFETY: socket takes no pointers.
            let socket =
                errno_of(unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) }.into());
            // SAFETY: open reads a valid NUL-terminated path.
            let open =
                errno_of(unsafe { libc::open(c"/etc/passwd".as_ptr(), libc::O_RDONLY) }.into());
            let wrote = std::io::Write::write(&mut &w, b"x").map(|n| n as i64);
            (socket, open, wrote.unwrap_or(-1))
        })
        .unwrap();
        let (socket, open, wrote) = thread.join().unwrap();
        assert_eq!(socket, Some(libc::EPERM), "socket refused");
        assert_eq!(open, Some(libc::EACCES), "open refused, always with EACCES");
        assert_eq!(wrote, 1, "writing to a descriptor it was given works");
        let mut byte = [0u8];
        std::io::Read::read_exact(&mut &r, &mut byte).unwrap();
        // This (unfiltered) test thread still opens files.
        assert!(std::fs::File::open("/proc/self/status").is_ok());
    }

    #[test]
    fn a_vcpu_thread_may_issue_kvm_ioctls_only() {
        enable(REFUSE).unwrap();
        let Ok(kvm) = std::fs::File::open("/dev/kvm") else {
            eprintln!("no /dev/kvm: the KVM half is not checked");
            return;
        };
        let tty = std::fs::File::open("/dev/null").unwrap();
        let thread = spawn(ThreadKind::Vcpu, "sandbox-vcpu", move || {
            // SAFETY: KVM_GET_API_VERSION (0xae00) takes no argument.
            let version = unsafe { libc::ioctl(kvm.as_raw_fd(), 0xae00, 0) };
            let mut size: libc::c_int = 0;
            // SAFETY: FIONREAD writes one int through the pointer, which is valid.
            let fionread = unsafe { libc::ioctl(tty.as_raw_fd(), libc::FIONREAD, &mut size) };
            (version, errno_of(fionread.into()))
        })
        .unwrap();
        let (version, fionread) = thread.join().unwrap();
        assert_eq!(version, 12, "KVM's API version");
        assert_eq!(fionread, Some(libc::EPERM), "a terminal ioctl is refused");
    }

    #[test]
    fn enabling_again_with_another_policy_is_an_error() {
        enable(REFUSE).unwrap();
        enable(REFUSE).unwrap();
        let other = Policy {
            on_violation: Violation::KillProcess,
            create_beneath: None,
        };
        assert!(matches!(
            enable(other),
            Err(SandboxError::AlreadyEnabled { .. })
        ));
        assert_eq!(enabled(), Some(REFUSE));
    }

    /// Under the default policy a forbidden call kills the whole process (checked in a
    /// child: this test binary run again, which must die of SIGSYS), while opening a
    /// file is only refused.
    #[test]
    fn under_the_default_policy_a_forbidden_call_kills_the_process() {
        use std::os::unix::process::ExitStatusExt;
        const CHILD: &str = "VMCRAFT_SANDBOX_KILL_CHILD";
        if std::env::var_os(CHILD).is_some() {
            return;
        }
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "tests::killed_child",
                "--nocapture",
                "--include-ignored",
            ])
            .env(CHILD, "1")
            .status()
            .unwrap();
        assert_eq!(status.signal(), Some(libc::SIGSYS), "{status:?}");
    }

    /// The child of the test above: does nothing unless run as that child.
    #[test]
    fn killed_child() {
        if std::env::var_os("VMCRAFT_SANDBOX_KILL_CHILD").is_none() {
            return;
        }
        enable(Policy::default()).unwrap();
        let thread = spawn(ThreadKind::PvBackend, "doomed", || {
            // SAFETY: open reads a valid NUL-terminated path.
            let open = unsafe { libc::open(c"/etc/passwd".as_ptr(), libc::O_RDONLY) };
            assert_eq!(errno_of(open.into()), Some(libc::EACCES));
            // SAFETY: socket takes no pointers.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) }
        })
        .unwrap();
        let _ = thread.join();
        // Only reached if the call was allowed: exit normally, which the parent
        // reports as a failure.
    }

    /// The main thread, filtered with a [`Policy::create_beneath`] directory, creates
    /// files in it and nowhere else: `..`, an absolute path and a link out are
    /// refused by the kernel's resolution, another directory by the filter, a plain
    /// open as always (checked in a child, this test binary run again: the policy is
    /// process-wide).
    #[test]
    fn the_main_thread_creates_files_beneath_its_directory_only() {
        const CHILD: &str = "VMCRAFT_SANDBOX_BENEATH_CHILD";
        if std::env::var_os(CHILD).is_some() {
            return;
        }
        let dir = std::env::temp_dir().join(format!("vmcraft-beneath-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("inner")).unwrap();
        std::os::unix::fs::symlink("/etc", dir.join("out")).unwrap();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "tests::beneath_child", "--nocapture"])
            .env(CHILD, &dir)
            .output()
            .unwrap();
        let made = std::fs::read(dir.join("inner/made"));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(made.unwrap(), b"beneath");
    }

    /// The child of the test above: does nothing unless run as that child.
    #[test]
    fn beneath_child() {
        use std::io::Write;
        let Some(dir) = std::env::var_os("VMCRAFT_SANDBOX_BENEATH_CHILD") else {
            return;
        };
        let dir = std::fs::File::open(dir).unwrap();
        let other = std::fs::File::open(std::env::temp_dir()).unwrap();
        enable(Policy {
            on_violation: Violation::Errno(libc::EPERM as u32),
            create_beneath: Some(dir.as_raw_fd()),
        })
        .unwrap();
        let thread = spawn(ThreadKind::Main, "beneath", move || {
            let mut made = open_beneath(&dir, Path::new("inner/made"), Beneath::Create).unwrap();
            made.write_all(b"beneath").unwrap();
            for how in [Beneath::Read, Beneath::ReadWrite] {
                open_beneath(&dir, Path::new("inner/made"), how).unwrap();
            }
            let missing = open_beneath(&dir, Path::new("inner/missing"), Beneath::Read);
            assert_eq!(
                missing.err().and_then(|e| e.raw_os_error()),
                Some(libc::ENOENT)
            );
            let errno = |r: io::Result<File>| r.err().and_then(|e| e.raw_os_error());
            assert_eq!(
                errno(open_beneath(&dir, Path::new("../escaped"), Beneath::Create)),
                Some(libc::EXDEV)
            );
            assert_eq!(
                errno(open_beneath(
                    &dir,
                    Path::new("/tmp/escaped"),
                    Beneath::Create
                )),
                Some(libc::EXDEV)
            );
            assert_eq!(
                errno(open_beneath(&dir, Path::new("out/passwd"), Beneath::Create)),
                Some(libc::EXDEV)
            );
            assert_eq!(
                errno(open_beneath(&other, Path::new("escaped"), Beneath::Create)),
                Some(libc::EPERM)
            );
            // SAFETY: open reads a valid NUL-terminated path.
            let open = unsafe { libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY) };
            assert_eq!(errno_of(open.into()), Some(libc::EACCES));
        })
        .unwrap();
        thread.join().unwrap();
    }
}
