//! Interrupt lines for devices: an allocator that knows which lines of a PC the legacy
//! devices own, so a new device never shares the RTC's or the keyboard's line.

use thiserror::Error;

/// Lines of KVM's in-kernel IOAPIC (GSIs 0 to 23).
pub const IOAPIC_PINS: u32 = 24;

/// ISA lines a PC's legacy devices own: 0 timer, 1 keyboard, 2 cascade, 3 COM2,
/// 4 COM1, 8 RTC, 12 PS/2 mouse, 13 FPU; 14 and 15 belong to the IDE channels.
pub const LEGACY_LINES: [u32; 10] = [0, 1, 2, 3, 4, 8, 12, 13, 14, 15];

/// Errors from the allocator.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum IrqError {
    /// Every line the allocator manages is in use.
    #[error("no interrupt line is free")]
    Exhausted,
    /// A line that is not an IOAPIC pin.
    #[error("IRQ {0} is not an IOAPIC pin (0 to 23)")]
    NotAPin(u32),
    /// A line already given out.
    #[error("IRQ {0} is already in use")]
    InUse(u32),
}

/// Hands out interrupt lines: first the IOAPIC-only lines 16 to 23, which no legacy
/// device can claim, then the ISA lines no PC device owns (5, 6, 7, 9, 10, 11).
///
/// ```
/// use vmcraft_devices::irq::IrqAllocator;
/// let mut irqs = IrqAllocator::pc();
/// irqs.reserve(11)?; // taken by something the allocator does not manage
/// assert_eq!(irqs.allocate()?, 16);
/// assert_eq!(irqs.allocate()?, 17);
/// # Ok::<(), vmcraft_devices::irq::IrqError>(())
/// ```
#[derive(Debug, Clone)]
pub struct IrqAllocator {
    free: Vec<u32>,
}

impl IrqAllocator {
    /// The lines of a PC with the legacy devices of [`LEGACY_LINES`].
    pub fn pc() -> Self {
        let free = (16..IOAPIC_PINS)
            .chain((0..16).filter(|l| !LEGACY_LINES.contains(l)))
            .collect();
        IrqAllocator { free }
    }

    /// The next free line.
    pub fn allocate(&mut self) -> Result<u32, IrqError> {
        if self.free.is_empty() {
            return Err(IrqError::Exhausted);
        }
        Ok(self.free.remove(0))
    }

    /// Take `line` out of the pool (a device wired by hand).
    pub fn reserve(&mut self, line: u32) -> Result<(), IrqError> {
        if line >= IOAPIC_PINS {
            return Err(IrqError::NotAPin(line));
        }
        let at = self
            .free
            .iter()
            .position(|&l| l == line)
            .ok_or(IrqError::InUse(line))?;
        self.free.remove(at);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_lines_are_never_handed_out() {
        let mut irqs = IrqAllocator::pc();
        let mut got = Vec::new();
        while let Ok(l) = irqs.allocate() {
            got.push(l);
        }
        assert_eq!(
            got,
            vec![16, 17, 18, 19, 20, 21, 22, 23, 5, 6, 7, 9, 10, 11]
        );
        assert_eq!(irqs.allocate(), Err(IrqError::Exhausted));
        for l in LEGACY_LINES {
            assert!(!got.contains(&l), "line {l}");
        }
    }

    #[test]
    fn reserved_lines_are_skipped_and_refused_twice() {
        let mut irqs = IrqAllocator::pc();
        irqs.reserve(16).unwrap();
        assert_eq!(irqs.reserve(16), Err(IrqError::InUse(16)));
        assert_eq!(irqs.reserve(8), Err(IrqError::InUse(8)), "the RTC's");
        assert_eq!(irqs.reserve(24), Err(IrqError::NotAPin(24)));
        assert_eq!(irqs.allocate(), Ok(17));
    }
}
