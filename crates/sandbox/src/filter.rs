//! The allowlists: which system calls each kind of vmcraft thread makes.
//!
//! Each list was taken from what the threads do (the test suite, the benchmarks and the
//! Linux-guest tier run under the filters; `Violation::Log` and the kernel's audit
//! records, type 1326, show what a list misses) and is kept as narrow as that: no VMM
//! thread opens files, creates sockets or executes programs once a VM runs, so
//! `open`, `execve`, `ptrace` and their kin are in no list, and `socket` and
//! `connect` in one only: a vsock device's host door
//! ([`ThreadKind::HostSockets`]), which makes Unix sockets and nothing else. The one
//! exception to opening is the main thread's files beneath one directory the process names in
//! its [`Policy`](crate::Policy) (`openat2` relative to that descriptor only: the
//! snapshots a control API writes). vCPU threads may
//! `ioctl` only with KVM's request numbers; device threads not at all, and backend
//! threads only to raise a guest's interrupt as an MSI (`KVM_SIGNAL_MSI`: an HVM Xen
//! guest's per-vCPU event-channel upcall).
//!
//! Opening a file is refused with `EACCES` rather than met with the policy's action:
//! glibc's allocator opens `/proc/sys/vm/overcommit_memory` lazily, from whichever
//! thread first trims a malloc arena, and carries on when it cannot. A second filter
//! does that (the kernel applies the strictest answer of all a thread's filters, and an
//! error beats "allow"), so no thread opens anything either way.
//!
//! The kernel stacks filters: a thread started by a filtered thread keeps its parent's
//! filter under its own. vCPU threads start device threads (a driver starting its
//! device), and the main thread starts vCPU and backend threads, so each kind that
//! starts threads allows everything the threads it starts need
//! ([`allowed`] is built that way, and a test checks it).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::SandboxError;

/// The kinds of thread a vmcraft VMM runs, each with its own allowlist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The thread that builds VMs and waits for them: the broadest list (it creates
    /// VMs, vCPUs and devices), still without files opened by path, sockets or exec.
    Main,
    /// A vCPU thread (or a scheduler worker running vCPUs): `KVM_RUN` and the exits it
    /// handles, which include a driver starting or resetting a device (threads and
    /// eventfds are created and closed there).
    Vcpu,
    /// A virtio device's I/O thread: its event loop and its backend's I/O.
    DeviceIo,
    /// A paravirtual backend's thread: rings in guest memory, the disk image, the
    /// console's output.
    PvBackend,
    /// The control API's thread: clients accepted on a socket bound beforehand, their
    /// requests read and answered; nothing opened, no KVM, no ioctl.
    Api,
    /// A vsock device's host door: accepts host clients on the device's socket
    /// (bound beforehand) and connects to the Unix sockets the guest's connections
    /// go to (`socket` for `AF_UNIX` only, and `connect`), the one kind that makes
    /// sockets. Started with the machine, by an unfiltered main thread; its streams
    /// are handed to the device's I/O thread, which never connects anything. Also a
    /// vhost-user device's link, which passes its backend's calls on as interrupts
    /// and connects to a restarted backend.
    HostSockets,
    /// Every thread of a vhost-user backend process (vmcraft's devices served to
    /// another VMM): the connection accepted on a socket bound beforehand, the
    /// frontend's memory files mapped, the device's I/O (a disk image opened
    /// beforehand), the daemon's threads and eventfds; no KVM, nothing opened, no
    /// socket made.
    VhostUserBackend,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 7] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::DeviceIo,
        ThreadKind::PvBackend,
        ThreadKind::Api,
        ThreadKind::HostSockets,
        ThreadKind::VhostUserBackend,
    ];

    fn index(self) -> usize {
        self as usize
    }

    /// The name of this kind's filter, for errors.
    pub fn filter_name(self) -> &'static str {
        match self {
            ThreadKind::Main => "the main thread's allowlist",
            ThreadKind::Vcpu => "the vCPU threads' allowlist",
            ThreadKind::DeviceIo => "the device I/O threads' allowlist",
            ThreadKind::PvBackend => "the PV backend threads' allowlist",
            ThreadKind::Api => "the API thread's allowlist",
            ThreadKind::HostSockets => {
                "the host-socket threads' allowlist (vsock door, vhost-user link)"
            }
            ThreadKind::VhostUserBackend => "the vhost-user backend's allowlist",
        }
    }
}

/// What a system call outside the allowlist meets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// The whole process is killed (SIGSYS, no handler runs): the default.
    KillProcess,
    /// The thread gets SIGSYS (a handler can report which call it was).
    Trap,
    /// The call fails with this errno and the thread goes on.
    Errno(u32),
    /// The call is allowed and logged by the kernel (for building an allowlist).
    Log,
}

impl Violation {
    fn action(self) -> SeccompAction {
        match self {
            Violation::KillProcess => SeccompAction::KillProcess,
            Violation::Trap => SeccompAction::Trap,
            Violation::Errno(errno) => SeccompAction::Errno(errno),
            Violation::Log => SeccompAction::Log,
        }
    }
}

/// What every thread of a Rust program makes: memory for the allocator, futexes,
/// signals and the thread's own exit, time, reads and writes on the descriptors it was
/// given, and closing them (`fcntl(F_GETFD)` is how debug builds of std check a
/// descriptor they close).
const COMMON: &[libc::c_long] = &[
    // Refused with EACCES by the second filter, never opened (see the module docs).
    libc::SYS_open,
    libc::SYS_openat,
    libc::SYS_fcntl,
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_restart_syscall,
];

/// Event loops and eventfds.
const EVENTS: &[libc::c_long] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_ppoll,
    libc::SYS_poll,
];

/// Disk images (already open): positioned and vectored I/O, syncs, hole punching.
const DISK: &[libc::c_long] = &[
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
    libc::SYS_fallocate,
    libc::SYS_lseek,
];

/// Sockets already connected (the console's), TAP devices, and copying between
/// descriptors (`std::io::copy` uses `sendfile` and `splice`).
const STREAMS: &[libc::c_long] = &[
    libc::SYS_sendfile,
    libc::SYS_splice,
    libc::SYS_copy_file_range,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
];

/// The API's clients: accepting them on the socket bound before, a send timeout on
/// each (a client that never reads cannot hold the thread), and the socket file
/// removed when the API ends.
const API: &[libc::c_long] = &[
    libc::SYS_accept4,
    libc::SYS_accept,
    libc::SYS_setsockopt,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
];

/// A vsock device's host door and a vhost-user device's link: clients accepted, the
/// guest's connections made, a restarted backend connected to again (`socket` is
/// allowed for `AF_UNIX` only, in [`rules`]) with its timeouts set, a socket file
/// removed when the device ends.
const HOST_SOCKETS: &[libc::c_long] = &[
    // The link thread's own event loop.
    libc::SYS_epoll_create1,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_setsockopt,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
];

/// A vhost-user backend beyond its device's I/O: its one connection accepted (and
/// SIGPIPE ignored on it), the
/// frontend's memory files examined (their length, before mapping), its socket file
/// removed at the end.
const VHOST_USER_BACKEND: &[libc::c_long] = &[
    // The daemon's connection ignores SIGPIPE (a frontend gone mid-write).
    libc::SYS_rt_sigaction,
    libc::SYS_accept4,
    libc::SYS_accept,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_newfstatat,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
];

/// Starting, naming and joining threads, and creating the descriptors a device needs
/// when a driver starts it (eventfds, epoll instances, duplicates).
const THREADS: &[libc::c_long] = &[
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
    libc::SYS_seccomp,
    libc::SYS_eventfd2,
    libc::SYS_epoll_create1,
    libc::SYS_dup,
];

/// What the main thread makes beyond the threads it starts: waiting for children it
/// started, signals to its own threads, measuring its memory, writing snapshots and
/// migrating.
const MAIN: &[libc::c_long] = &[
    libc::SYS_wait4,
    libc::SYS_kill,
    // How much of guest RAM is resident (the example's memory report).
    libc::SYS_mincore,
    libc::SYS_getrusage,
    // Snapshots, written into files opened beforehand (truncated first), after
    // checking on the descriptor that neither backs the guest's memory.
    libc::SYS_ftruncate,
    libc::SYS_fstat,
    // A migration's connection, made beforehand: its timeouts and Nagle's algorithm.
    libc::SYS_setsockopt,
];

/// KVM's ioctl type byte (`KVMIO`): every KVM request number carries it in bits 8..16.
const KVMIO: u64 = 0xae;

/// The system calls `kind` may make (ioctl aside: see [`rules`]).
pub fn allowed(kind: ThreadKind) -> Vec<libc::c_long> {
    let mut calls: Vec<libc::c_long> = match kind {
        ThreadKind::DeviceIo => [COMMON, EVENTS, DISK, STREAMS].concat(),
        ThreadKind::PvBackend => [COMMON, EVENTS, DISK].concat(),
        ThreadKind::Api => [COMMON, EVENTS, STREAMS, API].concat(),
        // The vhost-user link speaks the protocol (messages with descriptors).
        ThreadKind::HostSockets => [COMMON, EVENTS, STREAMS, HOST_SOCKETS].concat(),
        ThreadKind::VhostUserBackend => {
            [COMMON, EVENTS, DISK, STREAMS, THREADS, VHOST_USER_BACKEND].concat()
        }
        // A driver starting its device starts the device's thread from here.
        ThreadKind::Vcpu => [
            allowed(ThreadKind::DeviceIo),
            allowed(ThreadKind::PvBackend),
            THREADS.to_vec(),
        ]
        .concat(),
        ThreadKind::Main => [allowed(ThreadKind::Vcpu), MAIN.to_vec()].concat(),
    };
    calls.sort_unstable();
    calls.dedup();
    calls
}

/// The rules for `kind`: system call number to the conditions it is allowed under (no
/// conditions: always). vCPU threads may `ioctl` with KVM's request numbers only, the
/// main thread with any (it sets up TAP devices and terminals), the others not at all.
pub fn rules(kind: ThreadKind) -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = allowed(kind)
        .into_iter()
        .map(|call| (call, Vec::new()))
        .collect();
    match kind {
        ThreadKind::Main => {
            map.insert(libc::SYS_ioctl, Vec::new());
        }
        ThreadKind::Vcpu => {
            map.insert(libc::SYS_ioctl, kvm_ioctls_only());
        }
        ThreadKind::PvBackend => {
            map.insert(libc::SYS_ioctl, signal_msi_only());
        }
        ThreadKind::HostSockets => {
            map.insert(libc::SYS_socket, unix_sockets_only());
        }
        ThreadKind::DeviceIo | ThreadKind::Api | ThreadKind::VhostUserBackend => {}
    }
    map
}

/// `socket` allowed for the `AF_UNIX` domain only.
fn unix_sockets_only() -> Vec<SeccompRule> {
    let domain = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        libc::AF_UNIX as u64,
    )
    .expect("a valid condition");
    vec![SeccompRule::new(vec![domain]).expect("a valid rule")]
}

/// `KVM_SIGNAL_MSI`: `_IOW(KVMIO, 0xa5, struct kvm_msi)` (32 bytes).
pub const KVM_SIGNAL_MSI: u64 = 0x4020_aea5;

/// `openat2` allowed relative to descriptor `dir` only (the main thread's files
/// beneath [`Policy::create_beneath`](crate::Policy::create_beneath)); the kernel's
/// `RESOLVE_BENEATH`, which [`open_beneath`](crate::open_beneath) passes, keeps
/// the path inside it.
fn openat2_beneath(dir: std::os::fd::RawFd) -> Vec<SeccompRule> {
    let dirfd = SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, dir as u64)
        .expect("a valid condition");
    vec![SeccompRule::new(vec![dirfd]).expect("a valid rule")]
}

/// ioctl allowed with the request `KVM_SIGNAL_MSI` only.
fn signal_msi_only() -> Vec<SeccompRule> {
    let request =
        SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, KVM_SIGNAL_MSI)
            .expect("a valid condition");
    vec![SeccompRule::new(vec![request]).expect("a valid rule")]
}

/// ioctl allowed when its request number is one of KVM's (type byte `KVMIO`).
fn kvm_ioctls_only() -> Vec<SeccompRule> {
    let kvm_type = SeccompCondition::new(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(0xff00),
        KVMIO << 8,
    )
    .expect("a valid condition");
    vec![SeccompRule::new(vec![kvm_type]).expect("a valid rule")]
}

/// The calls refused with an error instead of the policy's action (see the module
/// documentation).
const REFUSED: &[libc::c_long] = &[libc::SYS_open, libc::SYS_openat];

/// Every kind's filter, compiled to BPF, and the refusals every thread gets.
#[derive(Debug)]
pub(crate) struct Compiled {
    programs: Vec<BpfProgram>,
    refusals: BpfProgram,
}

impl Compiled {
    pub(crate) fn new(policy: crate::Policy) -> Result<Self, SandboxError> {
        let programs = ThreadKind::ALL
            .iter()
            .map(|&kind| {
                let mut rules = rules(kind);
                if let (ThreadKind::Main, Some(dir)) = (kind, policy.create_beneath) {
                    rules.insert(libc::SYS_openat2, openat2_beneath(dir));
                }
                compile(
                    kind.filter_name(),
                    rules,
                    policy.on_violation.action(),
                    SeccompAction::Allow,
                )
            })
            .collect::<Result<_, _>>()?;
        Ok(Compiled {
            programs,
            refusals: refusals()?,
        })
    }

    pub(crate) fn install(&self, kind: ThreadKind) -> Result<(), SandboxError> {
        let install = |program| {
            seccompiler::apply_filter(program)
                .map_err(|source| SandboxError::Install { kind, source })
        };
        install(&self.refusals)?;
        install(&self.programs[kind.index()])
    }
}

/// The filter that answers `open` and `openat` with `EACCES` and allows the rest (the
/// allowlist decides those).
pub fn refusals() -> Result<BpfProgram, SandboxError> {
    let rules = REFUSED.iter().map(|&call| (call, Vec::new())).collect();
    compile(
        "the refusals",
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
    )
}

/// `kind`'s filter under `on_violation`, compiled for this machine.
pub fn program(kind: ThreadKind, on_violation: Violation) -> Result<BpfProgram, SandboxError> {
    compile(
        kind.filter_name(),
        rules(kind),
        on_violation.action(),
        SeccompAction::Allow,
    )
}

/// Build filter `name` from `rules` (matching calls meet `matched`, others `otherwise`)
/// and compile it for x86-64.
fn compile(
    name: &'static str,
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    otherwise: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, SandboxError> {
    let filter =
        SeccompFilter::new(rules, otherwise, matched, TargetArch::x86_64).map_err(|source| {
            SandboxError::Build {
                filter: name,
                source,
            }
        })?;
    filter.try_into().map_err(|source| SandboxError::Compile {
        filter: name,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kind that starts threads of another kind allows everything they need (the
    /// kernel applies the parent's filter to them too).
    #[test]
    fn each_kind_allows_what_the_threads_it_starts_need() {
        let covers = |parent: ThreadKind, child: ThreadKind| {
            let p = allowed(parent);
            let missing: Vec<_> = allowed(child)
                .into_iter()
                .filter(|c| !p.contains(c))
                .collect();
            assert!(
                missing.is_empty(),
                "{parent:?} lacks {missing:?} of {child:?}"
            );
            assert!(
                p.contains(&libc::SYS_seccomp),
                "{parent:?} cannot filter a child"
            );
        };
        covers(ThreadKind::Vcpu, ThreadKind::DeviceIo);
        covers(ThreadKind::Main, ThreadKind::Vcpu);
        covers(ThreadKind::Main, ThreadKind::PvBackend);
    }

    #[test]
    fn no_kind_opens_files_makes_sockets_or_executes() {
        for kind in ThreadKind::ALL {
            let calls = allowed(kind);
            assert!(
                !rules(kind).contains_key(&libc::SYS_socket) || kind == ThreadKind::HostSockets,
                "{kind:?} makes sockets"
            );
            if kind != ThreadKind::HostSockets {
                assert!(!calls.contains(&libc::SYS_connect), "{kind:?} connects");
            }
            for forbidden in [
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_ptrace,
                libc::SYS_mount,
            ] {
                assert!(!calls.contains(&forbidden), "{kind:?} allows {forbidden}");
            }
        }
        assert!(!rules(ThreadKind::DeviceIo).contains_key(&libc::SYS_ioctl));
        assert!(!rules(ThreadKind::HostSockets).contains_key(&libc::SYS_ioctl));
        assert_eq!(
            rules(ThreadKind::HostSockets).get(&libc::SYS_socket),
            Some(&unix_sockets_only()),
            "the vsock door makes Unix sockets, nothing else"
        );
        assert_eq!(
            rules(ThreadKind::PvBackend).get(&libc::SYS_ioctl),
            Some(&signal_msi_only()),
            "a backend may raise an MSI, nothing else"
        );
    }
}
