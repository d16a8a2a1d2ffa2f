//! Hypercalls: Xen's x86-64 register convention, a dispatch table the embedding
//! program extends, and per-hypercall counters.
//!
//! The guest puts the hypercall number in `rax` and up to five arguments in `rdi`,
//! `rsi`, `rdx`, `r10` and `r8`, then traps; the result comes back in `rax`, a
//! negative errno on failure. VMCALL does not reach userspace on KVM here, so the
//! trap is a write to a hypercall port (advertised in CPUID leaf 0x40000001), which
//! exits from any privilege level; the table itself does not care how the trap
//! arrived. A guest reads the leaves from kernel mode: CPUID at CPL 3 is not
//! intercepted on every host (see `vmcraft_vcpu`'s table of what traps where).
//!
//! Pointer arguments are guest-physical addresses for vmcraft's own guests
//! ([`HypercallContext::physical`]); a paging guest such as Linux passes linear
//! addresses, which [`HypercallContext::linear`] translates page by page through the
//! calling vCPU's page tables, as Xen does for HVM guests.
//!
//! ```
//! use std::sync::Arc;
//! use vmcraft_pv_hypercall::hypercall::{errno, HypercallArgs, HypercallContext, HypercallTable};
//! use vmcraft_memory::{layout::MemoryLayout, GuestRam};
//!
//! let ram = GuestRam::new(&MemoryLayout::x86_64(1 << 20).unwrap()).unwrap();
//! let mut table = HypercallTable::new();
//! table.register(42, "add", Arc::new(|_: &HypercallContext<'_>, a: &[u64; 5]| Ok(a[0] + a[1]))).unwrap();
//! let ctx = HypercallContext::physical(0, ram.memory());
//! assert_eq!(table.dispatch(&ctx, HypercallArgs { nr: 42, args: [2, 3, 0, 0, 0] }), 5);
//! assert_eq!(table.dispatch(&ctx, HypercallArgs { nr: 7, args: [0; 5] }), -errno::ENOSYS);
//! assert_eq!(table.count(42), 1);
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use thiserror::Error;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend};
use vmcraft_memory::GuestMemory;

/// The errno values hypercalls return (negated in `rax`).
pub mod errno {
    /// Not permitted.
    pub const EPERM: i64 = 1;
    /// Bad address: a pointer argument outside guest memory.
    pub const EFAULT: i64 = 14;
    /// Invalid argument.
    pub const EINVAL: i64 = 22;
    /// No such hypercall.
    pub const ENOSYS: i64 = 38;
}

/// A hypercall as the guest made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HypercallArgs {
    /// The number (`rax`).
    pub nr: u64,
    /// `rdi`, `rsi`, `rdx`, `r10`, `r8`.
    pub args: [u64; 5],
}

impl HypercallArgs {
    /// Decode from the guest's general registers.
    pub fn from_registers(rax: u64, rdi: u64, rsi: u64, rdx: u64, r10: u64, r8: u64) -> Self {
        HypercallArgs {
            nr: rax,
            args: [rdi, rsi, rdx, r10, r8],
        }
    }
}

/// Why a hypercall failed; becomes a negative errno for the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum HypercallFault {
    /// A pointer argument outside guest memory.
    #[error("guest address {addr:#x} (+{len} bytes) is outside guest memory")]
    BadAddress {
        /// The address.
        addr: u64,
        /// Bytes wanted there.
        len: usize,
    },
    /// An argument out of range.
    #[error("invalid argument {index}: {value:#x}")]
    Invalid {
        /// Which argument (0 = rdi).
        index: usize,
        /// Its value.
        value: u64,
    },
    /// An operation the guest may not do.
    #[error("not permitted: {0}")]
    NotPermitted(&'static str),
    /// A sub-command this VMM does not serve.
    #[error("sub-command {0} is not served")]
    Unsupported(u64),
}

impl HypercallFault {
    /// The errno the guest sees.
    pub fn errno(&self) -> i64 {
        match self {
            HypercallFault::BadAddress { .. } => errno::EFAULT,
            HypercallFault::Invalid { .. } => errno::EINVAL,
            HypercallFault::NotPermitted(_) => errno::EPERM,
            HypercallFault::Unsupported(_) => errno::ENOSYS,
        }
    }
}

/// How a hypercall's pointer arguments name guest memory.
#[derive(Clone, Copy)]
pub enum Addresses<'a> {
    /// Guest-physical addresses.
    Physical,
    /// Linear addresses of the calling vCPU, translated by the function (to a
    /// guest-physical address, `None` if nothing maps it).
    Linear(&'a dyn Fn(u64) -> Option<u64>),
}

impl std::fmt::Debug for Addresses<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Addresses::Physical => "Physical",
            Addresses::Linear(_) => "Linear",
        })
    }
}

/// What a hypercall handler gets besides its arguments.
#[derive(Debug, Clone, Copy)]
pub struct HypercallContext<'a> {
    /// The calling vCPU.
    pub vcpu: u32,
    /// Guest memory, for pointer arguments.
    pub memory: &'a GuestMemory,
    /// What pointer arguments are.
    pub addresses: Addresses<'a>,
}

const PAGE: u64 = 4096;

impl<'a> HypercallContext<'a> {
    /// A call from `vcpu` whose pointer arguments are guest-physical addresses.
    pub fn physical(vcpu: u32, memory: &'a GuestMemory) -> Self {
        HypercallContext {
            vcpu,
            memory,
            addresses: Addresses::Physical,
        }
    }

    /// A call from `vcpu` whose pointer arguments are linear addresses, which
    /// `translate` turns into guest-physical ones.
    pub fn linear(
        vcpu: u32,
        memory: &'a GuestMemory,
        translate: &'a dyn Fn(u64) -> Option<u64>,
    ) -> Self {
        HypercallContext {
            vcpu,
            memory,
            addresses: Addresses::Linear(translate),
        }
    }

    /// The guest-physical pieces of `[addr, addr + len)`: one per page touched for
    /// linear addresses.
    fn pieces(&self, addr: u64, len: usize) -> Result<Vec<(GuestAddress, usize)>, HypercallFault> {
        let fault = HypercallFault::BadAddress { addr, len };
        let end = addr.checked_add(len as u64).ok_or(fault)?;
        match self.addresses {
            Addresses::Physical => Ok(vec![(GuestAddress(addr), len)]),
            Addresses::Linear(translate) => {
                let mut pieces = Vec::new();
                let mut at = addr;
                while at < end {
                    let page_end = (at | (PAGE - 1)).saturating_add(1).min(end);
                    let gpa = translate(at).ok_or(fault)?;
                    pieces.push((GuestAddress(gpa), (page_end - at) as usize));
                    at = page_end;
                }
                Ok(pieces)
            }
        }
    }

    /// The guest-physical address of the argument at `addr`, which must not cross a
    /// page (a structure the handler accesses in place, atomically).
    pub fn resolve(&self, addr: u64, len: usize) -> Result<GuestAddress, HypercallFault> {
        match self.pieces(addr, len)?.as_slice() {
            [(gpa, _)] if self.memory.check_range(*gpa, len) => Ok(*gpa),
            _ => Err(HypercallFault::BadAddress { addr, len }),
        }
    }

    /// Copy `len` bytes from guest address `addr` (a pointer argument).
    pub fn read(&self, addr: u64, len: usize) -> Result<Vec<u8>, HypercallFault> {
        let mut buf = vec![0u8; len];
        self.read_into(addr, &mut buf)?;
        Ok(buf)
    }

    /// Fill `buf` from guest address `addr`.
    pub fn read_into(&self, addr: u64, buf: &mut [u8]) -> Result<(), HypercallFault> {
        let len = buf.len();
        let mut done = 0;
        for (gpa, n) in self.pieces(addr, len)? {
            self.memory
                .read_slice(&mut buf[done..done + n], gpa)
                .map_err(|_| HypercallFault::BadAddress { addr, len })?;
            done += n;
        }
        Ok(())
    }

    /// Read an argument structure (one of [`vmcraft_pv_wire::xen`]'s, say) from
    /// guest address `addr`.
    pub fn read_obj<T: ByteValued + Default>(&self, addr: u64) -> Result<T, HypercallFault> {
        let mut value = T::default();
        self.read_into(addr, value.as_mut_slice())?;
        Ok(value)
    }

    /// Write an argument structure back to guest address `addr` (as Xen copies a
    /// whole structure back with its out fields filled in).
    pub fn write_obj<T: ByteValued>(&self, addr: u64, value: &T) -> Result<(), HypercallFault> {
        self.write(addr, value.as_slice())
    }

    /// Copy `data` to guest address `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), HypercallFault> {
        let len = data.len();
        let mut done = 0;
        for (gpa, n) in self.pieces(addr, len)? {
            self.memory
                .write_slice(&data[done..done + n], gpa)
                .map_err(|_| HypercallFault::BadAddress { addr, len })?;
            done += n;
        }
        Ok(())
    }
}

/// A hypercall implementation: returns a non-negative result or a fault.
pub trait Hypercall: Send + Sync {
    /// Handle one call.
    fn call(&self, ctx: &HypercallContext<'_>, args: &[u64; 5]) -> Result<u64, HypercallFault>;
}

impl<F> Hypercall for F
where
    F: Fn(&HypercallContext<'_>, &[u64; 5]) -> Result<u64, HypercallFault> + Send + Sync,
{
    fn call(&self, ctx: &HypercallContext<'_>, args: &[u64; 5]) -> Result<u64, HypercallFault> {
        self(ctx, args)
    }
}

/// A Xen `*_op` hypercall: a sub-command in its first argument and the guest address of
/// that command's argument structure in its second (`memory_op`, `hvm_op`,
/// `sched_op`, `event_channel_op`, ...). [`HypercallTable::register_op`] serves one.
pub trait OpHypercall: Send + Sync + 'static {
    /// The hypercall's number.
    const NR: u64;
    /// Its name, for errors and statistics.
    const NAME: &'static str;
    /// One call: `command` and the guest address `arg` of its argument.
    fn op(&self, ctx: &HypercallContext<'_>, command: u64, arg: u64)
        -> Result<u64, HypercallFault>;
}

/// Errors from building a table.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TableError {
    /// The number is taken.
    #[error("hypercall {nr} is already registered as {name:?}")]
    Taken {
        /// The number.
        nr: u64,
        /// Who has it.
        name: &'static str,
    },
}

struct Entry {
    name: &'static str,
    handler: Arc<dyn Hypercall>,
    calls: AtomicU64,
}

/// Hypercall numbers to handlers, with a call counter each.
#[derive(Default)]
pub struct HypercallTable {
    entries: HashMap<u64, Entry>,
    unknown: AtomicU64,
}

impl std::fmt::Debug for HypercallTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<_> = self.entries.iter().map(|(nr, e)| (*nr, e.name)).collect();
        names.sort();
        f.debug_struct("HypercallTable")
            .field("entries", &names)
            .finish()
    }
}

impl HypercallTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Serve `handler`'s `*_op` hypercall ([`OpHypercall`]).
    pub fn register_op<T: OpHypercall>(&mut self, handler: Arc<T>) -> Result<(), TableError> {
        self.register(
            T::NR,
            T::NAME,
            Arc::new(move |ctx: &HypercallContext<'_>, a: &[u64; 5]| handler.op(ctx, a[0], a[1])),
        )
    }

    /// Add hypercall `nr`.
    pub fn register(
        &mut self,
        nr: u64,
        name: &'static str,
        handler: Arc<dyn Hypercall>,
    ) -> Result<(), TableError> {
        if let Some(e) = self.entries.get(&nr) {
            return Err(TableError::Taken { nr, name: e.name });
        }
        self.entries.insert(
            nr,
            Entry {
                name,
                handler,
                calls: AtomicU64::new(0),
            },
        );
        Ok(())
    }

    /// Take every hypercall of `other` into this table (its counters with it); a
    /// number both tables serve is refused, and nothing is taken then.
    pub fn absorb(&mut self, other: HypercallTable) -> Result<(), TableError> {
        if let Some((nr, _)) = other
            .entries
            .iter()
            .find(|(nr, _)| self.entries.contains_key(nr))
        {
            return Err(TableError::Taken {
                nr: *nr,
                name: self.entries[nr].name,
            });
        }
        self.entries.extend(other.entries);
        self.unknown
            .fetch_add(other.unknown.into_inner(), Ordering::Relaxed);
        Ok(())
    }

    /// Run a call; the value for the guest's `rax` (negative errno on failure).
    pub fn dispatch(&self, ctx: &HypercallContext<'_>, call: HypercallArgs) -> i64 {
        let Some(entry) = self.entries.get(&call.nr) else {
            self.unknown.fetch_add(1, Ordering::Relaxed);
            return -errno::ENOSYS;
        };
        entry.calls.fetch_add(1, Ordering::Relaxed);
        match entry.handler.call(ctx, &call.args) {
            // Results are reported as non-negative i64; larger values would read as
            // errors, so they are refused.
            Ok(v) => i64::try_from(v).unwrap_or(-errno::EINVAL),
            Err(fault) => -fault.errno(),
        }
    }

    /// Calls of `nr` so far.
    pub fn count(&self, nr: u64) -> u64 {
        self.entries
            .get(&nr)
            .map_or(0, |e| e.calls.load(Ordering::Relaxed))
    }

    /// Calls of unknown numbers so far.
    pub fn unknown_calls(&self) -> u64 {
        self.unknown.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_absorbs_another_unless_they_share_a_number() {
        let handler = |v: u64| -> Arc<dyn Hypercall> {
            Arc::new(move |_: &HypercallContext<'_>, _: &[u64; 5]| Ok(v))
        };
        let mut a = HypercallTable::new();
        a.register(1, "one", handler(1)).unwrap();
        let mut b = HypercallTable::new();
        b.register(2, "two", handler(2)).unwrap();
        a.absorb(b).unwrap();
        let mut c = HypercallTable::new();
        c.register(2, "again", handler(3)).unwrap();
        c.register(3, "three", handler(3)).unwrap();
        assert_eq!(
            a.absorb(c).unwrap_err(),
            TableError::Taken { nr: 2, name: "two" }
        );
        let names: Vec<_> = a.entries.values().map(|e| e.name).collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }
    use vmcraft_memory::{layout::MemoryLayout, GuestRam};

    fn ram() -> GuestRam {
        GuestRam::new(&MemoryLayout::x86_64(1 << 20).unwrap()).unwrap()
    }

    #[test]
    fn linear_arguments_are_translated_page_by_page() {
        let ram = ram();
        // Linear page 0x10 maps to physical page 0x21 and linear page 0x11 to 0x20:
        // an argument across the two is split; an unmapped page is a bad address.
        let translate = |gva: u64| match gva >> 12 {
            0x10 => Some(0x21000 | (gva & 0xfff)),
            0x11 => Some(0x20000 | (gva & 0xfff)),
            _ => None,
        };
        let ctx = HypercallContext::linear(0, ram.memory(), &translate);
        ctx.write(0x10ffc, &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
        let m = ram.memory();
        assert_eq!(
            m.read_obj::<u32>(GuestAddress(0x21ffc)).unwrap(),
            0x0403_0201
        );
        assert_eq!(
            m.read_obj::<u32>(GuestAddress(0x20000)).unwrap(),
            0x0807_0605
        );
        assert_eq!(ctx.read(0x10ffe, 4).unwrap(), vec![3, 4, 5, 6]);
        assert_eq!(
            ctx.read(0x11ffe, 4),
            Err(HypercallFault::BadAddress {
                addr: 0x11ffe,
                len: 4
            })
        );
        assert_eq!(ctx.resolve(0x10010, 8), Ok(GuestAddress(0x21010)));
        assert!(
            ctx.resolve(0x10ffc, 8).is_err(),
            "a page-crossing structure"
        );
        assert!(
            ctx.read(u64::MAX - 1, 4).is_err(),
            "wraps the address space"
        );
    }

    #[test]
    fn errors_map_to_xen_errnos() {
        let ram = ram();
        let ctx = HypercallContext::physical(1, ram.memory());
        let mut t = HypercallTable::new();
        // Copies a 4-byte value from one guest address to another; arg 2 must be 0.
        let copy = |ctx: &HypercallContext<'_>, a: &[u64; 5]| {
            if a[2] != 0 {
                return Err(HypercallFault::Invalid {
                    index: 2,
                    value: a[2],
                });
            }
            let v = ctx.read(a[0], 4)?;
            ctx.write(a[1], &v)?;
            Ok(4)
        };
        t.register(1, "copy", Arc::new(copy)).unwrap();
        assert_eq!(
            t.register(1, "again", Arc::new(copy)),
            Err(TableError::Taken {
                nr: 1,
                name: "copy"
            })
        );
        ram.memory()
            .write_obj(0xabcd_u32, GuestAddress(0x100))
            .unwrap();
        let call = |args| HypercallArgs { nr: 1, args };
        assert_eq!(t.dispatch(&ctx, call([0x100, 0x200, 0, 0, 0])), 4);
        assert_eq!(
            ram.memory().read_obj::<u32>(GuestAddress(0x200)).unwrap(),
            0xabcd
        );
        assert_eq!(
            t.dispatch(&ctx, call([0x100, 0x200, 9, 0, 0])),
            -errno::EINVAL
        );
        assert_eq!(
            t.dispatch(&ctx, call([1 << 40, 0x200, 0, 0, 0])),
            -errno::EFAULT
        );
        assert_eq!(
            t.dispatch(&ctx, call([0x100, u64::MAX - 1, 0, 0, 0])),
            -errno::EFAULT
        );
        assert_eq!(
            t.dispatch(
                &ctx,
                HypercallArgs {
                    nr: 99,
                    args: [0; 5]
                }
            ),
            -errno::ENOSYS
        );
        assert_eq!((t.count(1), t.count(99), t.unknown_calls()), (4, 0, 1));
    }

    #[test]
    fn arguments_come_from_the_xen_registers() {
        let a = HypercallArgs::from_registers(7, 1, 2, 3, 4, 5);
        assert_eq!((a.nr, a.args), (7, [1, 2, 3, 4, 5]));
    }
}
