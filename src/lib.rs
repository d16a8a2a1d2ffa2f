//! vmcraft: building blocks for virtual machine monitors on KVM.
//!
//! The member crates, re-exported behind features:
//!
//! | feature | crate | what |
//! |---|---|---|
//! | `memory` | [`memory`] | guest memory layout, KVM slots, dirty tracking, MMIO windows |
//! | `vcpu` | [`vcpu`] | vCPU setup and entry modes, Linux loading, the run loop |
//! | `devices` | [`devices`] | buses, 16550, i8042, RTC, debug exit |
//! | `machine` | [`machine`] | the glue: a VM running on the device buses, and the demo guest |
//!
//! A VM in about twenty lines (this is compiled by the tests):
//!
//! ```no_run
//! use std::sync::Arc;
//! use vmcraft::machine::{BusExitHandler, LegacyDevices};
//! use vmcraft::devices::{bus::IoBuses, stop::StopLatch};
//! use vmcraft::memory::{layout::MemoryLayout, GuestRam};
//! use vmcraft::vcpu::{RunningVm, VcpuConfig, Vm};
//! use vmcraft::guest_kit::Guest;
//!
//! let layout = MemoryLayout::x86_64(16 << 20)?;
//! let vm = Vm::new(GuestRam::new(&layout)?)?;
//! let stop = Arc::new(StopLatch::default());
//! let mut buses = IoBuses::new();
//! LegacyDevices::install(&mut buses, vm.fd(), Box::new(std::io::stdout()), stop.clone())?;
//! Guest::HELLO.load(vm.memory())?;
//! let handler = Arc::new(BusExitHandler::new(Arc::new(buses), stop));
//! let running = RunningVm::start(vm, &[VcpuConfig::at(Guest::HELLO.entry(0, 0))], handler)?;
//! let outcome = running.wait()?;
//! println!("guest stopped: {:?}", outcome.reason);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#[cfg(feature = "devices")]
pub use vmcraft_devices as devices;
#[cfg(feature = "machine")]
pub use vmcraft_guest_kit as guest_kit;
#[cfg(feature = "memory")]
pub use vmcraft_memory as memory;
#[cfg(feature = "vcpu")]
pub use vmcraft_vcpu as vcpu;

#[cfg(feature = "machine")]
pub mod machine;
