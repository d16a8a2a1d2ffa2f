//! MSI routes: a GSI for each MSI-X vector of the machine's PCI functions, whose KVM
//! route follows the message the guest writes into the vector's table entry, so that
//! the vector's irqfd delivers straight to the local APIC the guest chose.
//!
//! KVM takes its routing table whole: setting one replaces its default, which routes
//! GSIs 0-15 to the PIC and the IOAPIC and 16-23 to the IOAPIC. [`GsiRoutes`] keeps
//! those entries and adds one MSI entry per vector, and sets the whole table again
//! each time a message changes (a guest does that when it moves an interrupt, rarely).

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_MAX_IRQ_ROUTES,
};
use kvm_ioctls::VmFd;
use thiserror::Error;

/// The first GSI for MSI routes (after the IOAPIC's 24 pins).
pub const FIRST_MSI_GSI: u32 = 24;
/// The most routes KVM's table holds.
pub const MAX_ROUTES: u32 = KVM_MAX_IRQ_ROUTES as u32;

/// Why a route could not be had or set.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum GsiError {
    /// No more GSIs for `count` more vectors.
    #[error("no GSIs left for {count} more MSI vectors (the table holds {max} routes)")]
    Exhausted {
        /// Vectors asked for.
        count: u32,
        /// KVM's limit.
        max: u32,
    },
    /// The GSI was never handed out.
    #[error("GSI {0} is not an MSI route of this VM")]
    Unknown(u32),
    /// KVM refused the table.
    #[error("KVM_SET_GSI_ROUTING")]
    Kvm(#[source] std::io::Error),
}

#[derive(Debug, Default)]
struct Table {
    /// GSI → (address, data); absent: allocated, no message yet.
    msi: BTreeMap<u32, Option<(u64, u32)>>,
    next: u32,
}

/// The VM's routing table. See the [module documentation](self).
#[derive(Debug)]
pub struct GsiRoutes {
    vm: std::fs::File,
    table: Mutex<Table>,
}

fn irqchip(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

fn msi(gsi: u32, address: u64, data: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    e.u.msi.address_lo = address as u32;
    e.u.msi.address_hi = (address >> 32) as u32;
    e.u.msi.data = data;
    e
}

/// KVM's default routes: GSIs 0-15 to the PIC and the IOAPIC, 16-23 to the IOAPIC.
fn default_routes() -> Vec<kvm_irq_routing_entry> {
    let mut routes = Vec::with_capacity(40);
    for gsi in 0..24 {
        routes.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < 16 {
            let chip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            routes.push(irqchip(gsi, chip, gsi % 8));
        }
    }
    routes
}

impl GsiRoutes {
    /// The routes of `vm` (its in-kernel IRQ chip created), KVM's defaults only.
    pub fn new(vm: &VmFd) -> std::io::Result<Self> {
        Ok(GsiRoutes {
            vm: crate::vm::dup_vm_fd(vm)?,
            table: Mutex::new(Table {
                msi: BTreeMap::new(),
                next: FIRST_MSI_GSI,
            }),
        })
    }

    /// `count` consecutive GSIs for MSI vectors (no route until
    /// [`set_msi`](Self::set_msi)); the first is returned.
    pub fn allocate(&self, count: u32) -> Result<u32, GsiError> {
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        let first = table.next;
        let exhausted = GsiError::Exhausted {
            count,
            max: MAX_ROUTES,
        };
        let end = first.checked_add(count).ok_or(GsiError::Exhausted {
            count,
            max: MAX_ROUTES,
        })?;
        // Every MSI route and the 40 default entries must fit KVM's table.
        if end - FIRST_MSI_GSI + 40 > MAX_ROUTES {
            return Err(exhausted);
        }
        for gsi in first..end {
            table.msi.insert(gsi, None);
        }
        table.next = end;
        Ok(first)
    }

    /// Route `gsi` (from [`allocate`](Self::allocate)) to the MSI message `address`,
    /// `data`, and set the table in KVM.
    pub fn set_msi(&self, gsi: u32, address: u64, data: u32) -> Result<(), GsiError> {
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = table.msi.get_mut(&gsi).ok_or(GsiError::Unknown(gsi))?;
        if *slot == Some((address, data)) {
            return Ok(());
        }
        *slot = Some((address, data));
        self.commit(&table)
    }

    /// The MSI routes set, as (GSI, address, data).
    pub fn routes(&self) -> Vec<(u32, u64, u32)> {
        let table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        table
            .msi
            .iter()
            .filter_map(|(&gsi, m)| m.map(|(a, d)| (gsi, a, d)))
            .collect()
    }

    fn commit(&self, table: &Table) -> Result<(), GsiError> {
        let mut entries = default_routes();
        entries.extend(
            table
                .msi
                .iter()
                .filter_map(|(&gsi, m)| m.map(|(a, d)| msi(gsi, a, d))),
        );
        let routing = KvmIrqRouting::from_entries(&entries)
            .map_err(|e| GsiError::Kvm(std::io::Error::other(format!("{e:?}"))))?;
        // SAFETY: KVM_SET_GSI_ROUTING reads a kvm_irq_routing header and the `nr`
        // entries that follow it, which the FAM wrapper holds contiguously for the
        // duration of the call; the fd is a VM fd; nothing is written back.
        let ret = unsafe {
            vmm_sys_util::ioctl::ioctl_with_ref(
                &self.vm,
                ioctls::KVM_SET_GSI_ROUTING(),
                routing.as_fam_struct_ref(),
            )
        };
        if ret < 0 {
            return Err(GsiError::Kvm(std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

mod ioctls {
    use kvm_bindings::KVMIO;
    vmm_sys_util::ioctl_iow_nr!(
        KVM_SET_GSI_ROUTING,
        KVMIO,
        0x6a,
        kvm_bindings::kvm_irq_routing
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_cover_every_ioapic_pin_and_the_pics() {
        let routes = default_routes();
        assert_eq!(routes.len(), 40);
        let pins: Vec<(u32, u32, u32)> = routes
            .iter()
            .map(|e| {
                // SAFETY: each entry was built as an irqchip route; reading that union
                // arm is reading what was written.
                unsafe { (e.gsi, e.u.irqchip.irqchip, e.u.irqchip.pin) }
            })
            .collect();
        assert!(pins.contains(&(0, KVM_IRQCHIP_PIC_MASTER, 0)));
        assert!(pins.contains(&(9, KVM_IRQCHIP_PIC_SLAVE, 1)));
        assert!(pins.contains(&(23, KVM_IRQCHIP_IOAPIC, 23)));
        assert!(!pins.iter().any(|p| p.0 >= 16 && p.1 != KVM_IRQCHIP_IOAPIC));
    }

    #[test]
    fn msi_routes_are_set_in_kvm_and_follow_their_messages() {
        let kvm = kvm_ioctls::Kvm::new().expect("open /dev/kvm");
        let vm = kvm.create_vm().expect("create a VM");
        vm.create_irq_chip().expect("in-kernel IRQ chip");
        let routes = GsiRoutes::new(&vm).unwrap();
        let first = routes.allocate(3).unwrap();
        assert_eq!(first, FIRST_MSI_GSI);
        assert_eq!(routes.allocate(2).unwrap(), FIRST_MSI_GSI + 3);
        routes.set_msi(first + 1, 0xfee0_0000, 0x41).unwrap();
        routes.set_msi(first + 1, 0xfee0_1000, 0x42).unwrap();
        routes.set_msi(first, 0xfee0_0000, 0x40).unwrap();
        assert_eq!(
            routes.routes(),
            [(first, 0xfee0_0000, 0x40), (first + 1, 0xfee0_1000, 0x42)]
        );
        assert!(matches!(routes.set_msi(7, 0, 0), Err(GsiError::Unknown(7))));
        assert!(matches!(
            routes.allocate(MAX_ROUTES),
            Err(GsiError::Exhausted { .. })
        ));
        // An irqfd on a routed GSI is accepted, and the IOAPIC's lines still are.
        let fd = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        vm.register_irqfd(&fd, first).unwrap();
        let line = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        vm.register_irqfd(&line, 5).unwrap();
        fd.write(1).unwrap();
        line.write(1).unwrap();
    }
}
