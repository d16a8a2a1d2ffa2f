//! `HYPERVISOR_hvm_op` (34) as an HVM guest's Xen drivers use it (Xen's
//! `public/hvm/hvm_op.h` and `params.h`): `HVMOP_get_param` for where the xenstore and
//! console rings are (`HVM_PARAM_STORE_PFN`, `STORE_EVTCHN`, `CONSOLE_PFN`,
//! `CONSOLE_EVTCHN`), `HVMOP_set_param` for how event-channel upcalls are delivered
//! (`HVM_PARAM_CALLBACK_IRQ`), and `HVMOP_set_evtchn_upcall_vector` for a per-vCPU
//! upcall vector.
//!
//! `struct xen_hvm_param` on x86-64: `domid` (u16) at 0, padding, `index` (u32) at 4,
//! `value` (u64) at 8. `struct xen_hvm_evtchn_upcall_vector`: `vcpu` (u32) at 0,
//! `vector` (u8) at 4.

use std::sync::{Arc, Mutex};
use vmcraft_pv_wire::xen::{HvmEvtchnUpcallVector, HvmParam};

use crate::hypercall::{HypercallContext, HypercallFault, OpHypercall};

/// `HYPERVISOR_hvm_op`.
pub const HYPERVISOR_HVM_OP: u64 = 34;

/// `HVMOP_*` commands served.
pub mod op {
    /// Set a parameter.
    pub const SET_PARAM: u64 = 0;
    /// Read a parameter.
    pub const GET_PARAM: u64 = 1;
    /// A vCPU's upcall vector.
    pub const SET_EVTCHN_UPCALL_VECTOR: u64 = 23;
}

/// `HVM_PARAM_*` indices.
pub mod param {
    /// How upcalls are delivered (the guest sets it).
    pub const CALLBACK_IRQ: u32 = 0;
    /// The xenstore ring's frame.
    pub const STORE_PFN: u32 = 1;
    /// The xenstore's event channel.
    pub const STORE_EVTCHN: u32 = 2;
    /// The console ring's frame.
    pub const CONSOLE_PFN: u32 = 17;
    /// The console's event channel.
    pub const CONSOLE_EVTCHN: u32 = 18;
    /// Parameters there are (`HVM_NR_PARAMS`).
    pub const COUNT: u32 = 39;
}

/// `DOMID_SELF`.
const DOMID_SELF: u16 = 0x7ff0;

/// How the guest asked for upcalls (`HVM_PARAM_CALLBACK_IRQ`, its top byte the type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Callback {
    /// Not set (0).
    None,
    /// A GSI (type 0).
    Gsi(u32),
    /// A PCI device's INTx (type 1): segment, bus, device/function, pin.
    PciIntx(u64),
    /// An interrupt vector on every vCPU (type 2), as Linux asks.
    Vector(u8),
}

impl Callback {
    /// Decode a `HVM_PARAM_CALLBACK_IRQ` value.
    pub fn decode(value: u64) -> Option<Callback> {
        match value >> 56 {
            _ if value == 0 => Some(Callback::None),
            0 => u32::try_from(value).ok().map(Callback::Gsi),
            1 => Some(Callback::PciIntx(value & ((1 << 56) - 1))),
            // Vectors below 0x10 are the CPU's own.
            2 => u8::try_from(value & ((1 << 56) - 1))
                .ok()
                .filter(|v| *v >= 0x10)
                .map(Callback::Vector),
            _ => None,
        }
    }
}

/// Receives the guest's choice of upcall delivery.
pub trait UpcallRoute: Send + Sync {
    /// The guest set `HVM_PARAM_CALLBACK_IRQ` to `callback`.
    fn callback(&self, callback: Callback);
    /// The guest asked for `vector` on `vcpu` (`HVMOP_set_evtchn_upcall_vector`).
    fn vcpu_vector(&self, vcpu: u32, vector: u8);
}

/// A guest's HVM parameters.
pub struct HvmParams {
    values: Mutex<[u64; param::COUNT as usize]>,
    vcpus: u32,
    route: Arc<dyn UpcallRoute>,
}

impl std::fmt::Debug for HvmParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HvmParams")
            .field("vcpus", &self.vcpus)
            .finish_non_exhaustive()
    }
}

impl HvmParams {
    /// Parameters for a guest of `vcpus` vCPUs whose xenstore ring is frame
    /// `store_pfn` on channel `store_evtchn` and console ring `console_pfn` on
    /// `console_evtchn`; upcall choices go to `route`.
    pub fn new(
        vcpus: u32,
        store: (u64, u32),
        console: (u64, u32),
        route: Arc<dyn UpcallRoute>,
    ) -> Self {
        let mut values = [0u64; param::COUNT as usize];
        values[param::STORE_PFN as usize] = store.0;
        values[param::STORE_EVTCHN as usize] = u64::from(store.1);
        values[param::CONSOLE_PFN as usize] = console.0;
        values[param::CONSOLE_EVTCHN as usize] = u64::from(console.1);
        HvmParams {
            values: Mutex::new(values),
            vcpus,
            route,
        }
    }

    /// Every parameter's value, for a snapshot.
    pub fn values(&self) -> Vec<u64> {
        self.values
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .to_vec()
    }

    /// Put back a snapshot's values and the upcall route the guest chose with
    /// them; checked (as many values as parameters, a callback that decodes), and on
    /// an error nothing changes.
    pub fn restore(&self, values: &[u64]) -> Result<(), HypercallFault> {
        let invalid = |value| HypercallFault::Invalid { index: 1, value };
        if values.len() != param::COUNT as usize {
            return Err(invalid(values.len() as u64));
        }
        let callback = values[param::CALLBACK_IRQ as usize];
        let route = match callback {
            0 => None,
            v => Some(Callback::decode(v).ok_or(invalid(v))?),
        };
        self.values
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .copy_from_slice(values);
        if let Some(callback) = route {
            self.route.callback(callback);
        }
        Ok(())
    }

    /// Set parameter `index` on the VMM's side (where the store or console ring is,
    /// once its service runs); `false` if there is no such parameter.
    pub fn set_host(&self, index: u32, value: u64) -> bool {
        match self
            .values
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(index as usize)
        {
            Some(v) => {
                *v = value;
                true
            }
            None => false,
        }
    }

    /// A parameter's value.
    pub fn get(&self, index: u32) -> Option<u64> {
        self.values
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(index as usize)
            .copied()
    }
}

impl OpHypercall for HvmParams {
    const NR: u64 = HYPERVISOR_HVM_OP;
    const NAME: &'static str = "hvm_op";

    /// One `hvm_op` call: `command` with its argument structure at `arg`.
    fn op(
        &self,
        ctx: &HypercallContext<'_>,
        command: u64,
        arg: u64,
    ) -> Result<u64, HypercallFault> {
        let invalid = |value: u64| HypercallFault::Invalid { index: 1, value };
        match command {
            op::SET_PARAM | op::GET_PARAM => {
                let mut param: HvmParam = ctx.read_obj(arg)?;
                let HvmParam {
                    domid,
                    index,
                    value,
                    ..
                } = param;
                if domid != DOMID_SELF {
                    return Err(invalid(u64::from(domid)));
                }
                if index >= param::COUNT {
                    return Err(invalid(u64::from(index)));
                }
                if command == op::GET_PARAM {
                    param.value = self.get(index).ok_or(invalid(u64::from(index)))?;
                    ctx.write_obj(arg, &param)?;
                    return Ok(0);
                }
                if index != param::CALLBACK_IRQ {
                    return Err(HypercallFault::NotPermitted(
                        "only HVM_PARAM_CALLBACK_IRQ is the guest's to set",
                    ));
                }
                let callback = Callback::decode(value).ok_or(invalid(value))?;
                self.values.lock().unwrap_or_else(|p| p.into_inner())[index as usize] = value;
                self.route.callback(callback);
                Ok(0)
            }
            op::SET_EVTCHN_UPCALL_VECTOR => {
                let HvmEvtchnUpcallVector { vcpu, vector, .. } = ctx.read_obj(arg)?;
                if vcpu >= self.vcpus {
                    return Err(invalid(u64::from(vcpu)));
                }
                if vector < 0x10 {
                    return Err(invalid(u64::from(vector)));
                }
                self.route.vcpu_vector(vcpu, vector);
                Ok(0)
            }
            other => Err(HypercallFault::Invalid {
                index: 0,
                value: other,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};
    use vmcraft_memory::GuestMemory;

    #[derive(Default)]
    struct Seen(Mutex<Vec<String>>);

    impl UpcallRoute for Seen {
        fn callback(&self, c: Callback) {
            self.0.lock().unwrap().push(format!("{c:?}"));
        }
        fn vcpu_vector(&self, vcpu: u32, vector: u8) {
            self.0
                .lock()
                .unwrap()
                .push(format!("vcpu {vcpu} vector {vector:#x}"));
        }
    }

    fn param_struct(mem: &GuestMemory, domid: u16, index: u32, value: u64) {
        let mut b = [0u8; 16];
        b[0..2].copy_from_slice(&domid.to_le_bytes());
        b[4..8].copy_from_slice(&index.to_le_bytes());
        b[8..16].copy_from_slice(&value.to_le_bytes());
        mem.write_slice(&b, GuestAddress(0x1000)).unwrap();
    }

    #[test]
    fn a_guest_reads_where_its_rings_are_and_sets_its_upcall() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let seen = Arc::new(Seen::default());
        let hvm = HvmParams::new(2, (0xfeff0, 3), (0xfeff1, 4), seen.clone());
        let ctx = HypercallContext::physical(0, &mem);
        let value = |mem: &GuestMemory| mem.read_obj::<u64>(GuestAddress(0x1008)).unwrap();
        for (index, want) in [
            (param::STORE_PFN, 0xfeff0),
            (param::STORE_EVTCHN, 3),
            (param::CONSOLE_PFN, 0xfeff1),
            (param::CONSOLE_EVTCHN, 4),
        ] {
            param_struct(&mem, DOMID_SELF, index, 0);
            assert_eq!(hvm.op(&ctx, op::GET_PARAM, 0x1000), Ok(0));
            assert_eq!(value(&mem), want);
        }
        // Linux's choice: vector 0xf3 on every vCPU (type 2).
        param_struct(&mem, DOMID_SELF, param::CALLBACK_IRQ, 2 << 56 | 0xf3);
        assert_eq!(hvm.op(&ctx, op::SET_PARAM, 0x1000), Ok(0));
        assert_eq!(hvm.get(param::CALLBACK_IRQ), Some(2 << 56 | 0xf3));
        // A per-vCPU vector.
        mem.write_slice(&[1, 0, 0, 0, 0xf3], GuestAddress(0x2000))
            .unwrap();
        assert_eq!(hvm.op(&ctx, op::SET_EVTCHN_UPCALL_VECTOR, 0x2000), Ok(0));
        assert_eq!(
            *seen.0.lock().unwrap(),
            ["Vector(243)", "vcpu 1 vector 0xf3"]
        );
    }

    #[test]
    fn what_is_not_the_guests_is_refused() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let hvm = HvmParams::new(1, (1, 1), (2, 2), Arc::new(Seen::default()));
        let ctx = HypercallContext::physical(0, &mem);
        let errno = |r: Result<u64, HypercallFault>| r.unwrap_err().errno();
        param_struct(&mem, DOMID_SELF, param::STORE_PFN, 0x1234);
        assert_eq!(errno(hvm.op(&ctx, op::SET_PARAM, 0x1000)), 1);
        assert_eq!(hvm.get(param::STORE_PFN), Some(1));
        param_struct(&mem, 5, param::STORE_PFN, 0);
        assert_eq!(errno(hvm.op(&ctx, op::GET_PARAM, 0x1000)), 22);
        param_struct(&mem, DOMID_SELF, param::COUNT, 0);
        assert_eq!(errno(hvm.op(&ctx, op::GET_PARAM, 0x1000)), 22);
        // Vectors below 0x10, unknown types, vCPUs past the last.
        for bad in [2 << 56 | 0x0f, 7 << 56 | 1, 2 << 56 | 0x1ff] {
            param_struct(&mem, DOMID_SELF, param::CALLBACK_IRQ, bad);
            assert_eq!(errno(hvm.op(&ctx, op::SET_PARAM, 0x1000)), 22, "{bad:#x}");
        }
        mem.write_slice(&[1, 0, 0, 0, 0xf3], GuestAddress(0x2000))
            .unwrap();
        assert_eq!(
            errno(hvm.op(&ctx, op::SET_EVTCHN_UPCALL_VECTOR, 0x2000)),
            22
        );
        assert_eq!(errno(hvm.op(&ctx, op::GET_PARAM, 1 << 40)), 14);
        assert_eq!(errno(hvm.op(&ctx, 99, 0x1000)), 22);
        assert_eq!(Callback::decode(0), Some(Callback::None));
        assert_eq!(Callback::decode(9), Some(Callback::Gsi(9)));
    }

    #[test]
    fn the_table_dispatches_hvm_op_here() {
        use crate::hypercall::{HypercallArgs, HypercallTable};
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let hvm = Arc::new(HvmParams::new(1, (7, 1), (8, 2), Arc::new(Seen::default())));
        let mut table = HypercallTable::new();
        table.register_op(hvm.clone()).unwrap();
        let ctx = HypercallContext::physical(0, &mem);
        param_struct(&mem, DOMID_SELF, param::STORE_PFN, 0);
        let args = HypercallArgs::from_registers(HYPERVISOR_HVM_OP, op::GET_PARAM, 0x1000, 0, 0, 0);
        assert_eq!(table.dispatch(&ctx, args), 0);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x1008)).unwrap(), 7);
    }
}
