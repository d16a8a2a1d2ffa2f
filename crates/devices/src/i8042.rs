//! The i8042 keyboard controller, with a keyboard behind it: enough of both for
//! Linux's `i8042` and `atkbd` drivers to probe them (controller self test, the
//! command byte, interface test, keyboard identification) and for the CPU-reset
//! command (0xfe) to reset the machine. There is no auxiliary (mouse) port: the
//! controller fails the auxiliary interface test, which is how a PC without one
//! answers.
//!
//! The register model ([`Controller`]) is plain code, unit tested; [`I8042`] puts it
//! on the port bus with the keyboard interrupt (IRQ 1) on an eventfd for KVM's irqfd.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;
use vmm_sys_util::eventfd::EventFd;

use crate::state::StateError;
use crate::stop::{DeviceStop, StopLatch};

/// First port of the i8042 (data port); the command/status port is at +4.
pub const I8042_BASE: u16 = 0x60;
/// Ports covered: 0x60 to 0x64.
pub const I8042_SIZE: u16 = 5;
/// The keyboard's interrupt line.
pub const I8042_KBD_IRQ: u32 = 1;

const DATA: PioAddressOffset = 0;
const COMMAND: PioAddressOffset = 4;

/// Status register: output buffer full.
pub const STATUS_OBF: u8 = 1 << 0;
/// Status register: system flag (mirrors the command byte's).
pub const STATUS_SYS: u8 = 1 << 2;
/// Status register: the last write was to the command port.
pub const STATUS_CMD: u8 = 1 << 3;
/// Status register: keyboard not inhibited.
pub const STATUS_UNLOCKED: u8 = 1 << 4;

/// Command byte: keyboard interrupt enabled.
pub const CTR_KBD_INT: u8 = 1 << 0;
/// Command byte: system flag.
pub const CTR_SYS: u8 = 1 << 2;
/// Command byte: keyboard disabled.
pub const CTR_KBD_DISABLE: u8 = 1 << 4;
/// Command byte: auxiliary port disabled.
pub const CTR_AUX_DISABLE: u8 = 1 << 5;
/// Command byte: scancode translation.
pub const CTR_XLATE: u8 = 1 << 6;

/// Bytes the output buffer holds (a real controller holds one; the keyboard behind
/// it queues a few more).
pub const OUTPUT_CAPACITY: usize = 16;

/// Ctrl, Alt and Delete pressed, then released, in scancode set 1 (what the
/// controller hands the driver when it translates).
const CTRL_ALT_DEL_SET1: [u8; 8] = [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];
/// The same in scancode set 2 (the keyboard's own, untranslated).
const CTRL_ALT_DEL_SET2: [u8; 11] = [
    0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14,
];

/// The keyboard cannot take a key sequence now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the i8042's output buffer has room for {room} of the {needed} bytes of the key sequence (the guest is not reading its keyboard)")]
pub struct KeyboardBusy {
    /// Bytes free in the output buffer.
    pub room: usize,
    /// Bytes the sequence needs.
    pub needed: usize,
}

/// Keyboard answers.
const KBD_ACK: u8 = 0xfa;
const KBD_BAT_OK: u8 = 0xaa;
const KBD_ECHO: u8 = 0xee;

/// What the controller expects the next data-port byte to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum DataTarget {
    /// A command to the keyboard.
    Keyboard,
    /// The parameter of keyboard command `0`.
    KeyboardParam(u8),
    /// The new command byte (after 0x60).
    CommandByte,
    /// The new output port (after 0xd1).
    OutputPort,
    /// A byte to place in the output buffer as if the keyboard sent it (after 0xd2).
    KeyboardOutput,
    /// A byte for the auxiliary device, which does not exist (after 0xd3, 0xd4).
    Aux,
}

/// What a register write asks of the machine.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Effects {
    /// Raise the keyboard interrupt.
    pub irq: bool,
    /// Reset the CPU.
    pub reset: bool,
}

/// The controller's registers and the keyboard's replies. Every input is a byte;
/// every reply goes through a bounded output buffer. It is also the i8042's state in a
/// snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Controller {
    command_byte: u8,
    output_port: u8,
    output: VecDeque<u8>,
    target: DataTarget,
    last_was_command: bool,
}

impl Default for Controller {
    fn default() -> Self {
        Controller {
            command_byte: CTR_KBD_INT | CTR_SYS | CTR_XLATE,
            output_port: 0x03, // reset line high, A20 on
            output: VecDeque::with_capacity(OUTPUT_CAPACITY),
            target: DataTarget::Keyboard,
            last_was_command: false,
        }
    }
}

impl Controller {
    /// The status register.
    pub fn status(&self) -> u8 {
        let mut s = STATUS_UNLOCKED;
        if !self.output.is_empty() {
            s |= STATUS_OBF;
        }
        if self.command_byte & CTR_SYS != 0 {
            s |= STATUS_SYS;
        }
        if self.last_was_command {
            s |= STATUS_CMD;
        }
        s
    }

    /// The command byte.
    pub fn command_byte(&self) -> u8 {
        self.command_byte
    }

    /// The keyboard sends Ctrl+Alt+Del (each key pressed, then released), in the
    /// scancode set the driver reads: set 1 while the controller translates, else
    /// set 2. The whole sequence or nothing: a partial one would leave keys down.
    pub fn press_ctrl_alt_del(&mut self) -> Result<Effects, KeyboardBusy> {
        let bytes: &[u8] = if self.command_byte & CTR_XLATE != 0 {
            &CTRL_ALT_DEL_SET1
        } else {
            &CTRL_ALT_DEL_SET2
        };
        let room = OUTPUT_CAPACITY - self.output.len();
        if room < bytes.len() {
            return Err(KeyboardBusy {
                room,
                needed: bytes.len(),
            });
        }
        Ok(self.push(bytes))
    }

    /// Read port `offset` (0 data, 4 status); a data read takes the oldest byte of
    /// the output buffer (0 when empty) and asks for the interrupt again when more
    /// bytes wait.
    pub fn read(&mut self, offset: PioAddressOffset) -> (u8, Effects) {
        match offset {
            DATA => {
                let byte = self.output.pop_front().unwrap_or(0);
                (byte, self.interrupt_if_pending())
            }
            COMMAND => (self.status(), Effects::default()),
            _ => (0xff, Effects::default()),
        }
    }

    /// Write `value` to port `offset` (0 data, 4 command).
    pub fn write(&mut self, offset: PioAddressOffset, value: u8) -> Effects {
        match offset {
            DATA => {
                self.last_was_command = false;
                self.write_data(value)
            }
            COMMAND => {
                self.last_was_command = true;
                self.command(value)
            }
            _ => Effects::default(),
        }
    }

    /// Put `bytes` in the output buffer, as many as fit.
    fn enqueue(&mut self, bytes: &[u8]) {
        let room = OUTPUT_CAPACITY - self.output.len();
        self.output.extend(bytes.iter().take(room));
    }

    /// Keyboard bytes: they raise the interrupt.
    fn push(&mut self, bytes: &[u8]) -> Effects {
        self.enqueue(bytes);
        self.interrupt_if_pending()
    }

    /// A reply to a controller command, without an interrupt (drivers poll for it).
    fn reply(&mut self, byte: u8) -> Effects {
        self.enqueue(&[byte]);
        Effects::default()
    }

    fn interrupt_if_pending(&self) -> Effects {
        Effects {
            irq: !self.output.is_empty() && self.command_byte & CTR_KBD_INT != 0,
            reset: false,
        }
    }

    fn command(&mut self, cmd: u8) -> Effects {
        self.target = DataTarget::Keyboard;
        match cmd {
            0x20 => return self.reply(self.command_byte),
            0x60 => self.target = DataTarget::CommandByte,
            0xa7 => self.command_byte |= CTR_AUX_DISABLE,
            0xa8 => self.command_byte &= !CTR_AUX_DISABLE,
            // Auxiliary interface test: 0x01, clock line stuck low: no auxiliary port.
            0xa9 => return self.reply(0x01),
            0xaa => return self.reply(0x55), // controller self test passed
            0xab => return self.reply(0x00), // keyboard interface test passed
            0xad => self.command_byte |= CTR_KBD_DISABLE,
            0xae => self.command_byte &= !CTR_KBD_DISABLE,
            0xc0 => return self.reply(0x00), // input port
            0xd0 => return self.reply(self.output_port),
            0xd1 => self.target = DataTarget::OutputPort,
            0xd2 => self.target = DataTarget::KeyboardOutput,
            0xd3 | 0xd4 => self.target = DataTarget::Aux,
            0xfe => {
                return Effects {
                    irq: false,
                    reset: true,
                }
            }
            _ => {}
        }
        Effects::default()
    }

    fn write_data(&mut self, value: u8) -> Effects {
        let target = std::mem::replace(&mut self.target, DataTarget::Keyboard);
        match target {
            DataTarget::CommandByte => {
                self.command_byte = value;
                self.interrupt_if_pending()
            }
            DataTarget::OutputPort => {
                self.output_port = value;
                Effects::default()
            }
            DataTarget::KeyboardOutput => self.push(&[value]),
            DataTarget::Aux => Effects::default(),
            DataTarget::KeyboardParam(0xf0) if value == 0 => self.push(&[KBD_ACK, 0x02]),
            DataTarget::KeyboardParam(_) => self.push(&[KBD_ACK]),
            DataTarget::Keyboard => self.keyboard(value),
        }
    }

    /// A command to the keyboard: it answers through the output buffer.
    fn keyboard(&mut self, cmd: u8) -> Effects {
        match cmd {
            // Set LEDs, typematic rate, scancode set: a parameter follows.
            0xed | 0xf3 | 0xf0 => {
                self.target = DataTarget::KeyboardParam(cmd);
                self.push(&[KBD_ACK])
            }
            0xee => self.push(&[KBD_ECHO]),
            // Identify: an MF2 keyboard behind translation.
            0xf2 => self.push(&[KBD_ACK, 0xab, 0x83]),
            0xff => self.push(&[KBD_ACK, KBD_BAT_OK]),
            _ => self.push(&[KBD_ACK]),
        }
    }
}

/// The i8042 on the port bus: resets go to the stop latch, the keyboard interrupt to
/// an eventfd.
#[derive(Debug)]
pub struct I8042 {
    controller: Mutex<Controller>,
    latch: Arc<StopLatch>,
    irq: Option<EventFd>,
}

impl vmcraft_snapshot::Versioned for Controller {
    const VERSION: u32 = 1;
}

impl I8042 {
    /// An i8042 that reports resets to `latch` and raises the keyboard interrupt on
    /// `irq` (register it with KVM as the irqfd of [`I8042_KBD_IRQ`]), if given.
    pub fn new(latch: Arc<StopLatch>, irq: Option<EventFd>) -> Self {
        I8042 {
            controller: Mutex::new(Controller::default()),
            latch,
            irq,
        }
    }

    fn apply(&self, effects: Effects) {
        if effects.reset {
            self.latch.request(DeviceStop::Reset);
        }
        if effects.irq {
            if let Some(irq) = &self.irq {
                if let Err(e) = irq.write(1) {
                    log::warn!("i8042: cannot raise the keyboard interrupt: {e}");
                }
            }
        }
    }

    /// Press Ctrl+Alt+Del on the keyboard (Firecracker's `SendCtrlAltDel`): Linux's
    /// keyboard driver restarts the machine, which ends in a reset through this
    /// controller.
    pub fn send_ctrl_alt_del(&self) -> Result<(), KeyboardBusy> {
        let effects = self.controller().press_ctrl_alt_del()?;
        self.apply(effects);
        Ok(())
    }

    /// The controller's state, for a snapshot.
    pub fn save_state(&self) -> Controller {
        self.controller().clone()
    }

    /// Put back a state from [`I8042::save_state`].
    pub fn restore_state(&self, state: &Controller) -> Result<(), StateError> {
        if state.output.len() > OUTPUT_CAPACITY {
            return Err(StateError::new(
                "i8042",
                format!(
                    "{} bytes in a {OUTPUT_CAPACITY}-byte output buffer",
                    state.output.len()
                ),
            ));
        }
        *self.controller() = state.clone();
        Ok(())
    }

    fn controller(&self) -> std::sync::MutexGuard<'_, Controller> {
        self.controller.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl DevicePio for I8042 {
    fn pio_read(&self, _: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0xff);
        // The controller's registers are bytes; wider accesses read all ones.
        if let [byte] = data {
            let (value, effects) = self.controller().read(offset);
            *byte = value;
            self.apply(effects);
        }
    }

    fn pio_write(&self, _: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        // Wider accesses are ignored.
        if let [byte] = data {
            let effects = self.controller().write(offset, *byte);
            self.apply(effects);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctrl_alt_del_comes_in_the_set_the_driver_reads_and_whole_or_not_at_all() {
        let mut c = Controller::default();
        // Translating (the default): set 1, with the interrupt.
        let effects = c.press_ctrl_alt_del().unwrap();
        assert!(effects.irq);
        let drain = |c: &mut Controller| -> Vec<u8> {
            std::iter::from_fn(|| (c.status() & STATUS_OBF != 0).then(|| c.read(DATA).0)).collect()
        };
        assert_eq!(drain(&mut c), CTRL_ALT_DEL_SET1);
        // Untranslated: set 2.
        c.write(COMMAND, 0x60);
        c.write(DATA, CTR_KBD_INT);
        c.press_ctrl_alt_del().unwrap();
        assert_eq!(drain(&mut c), CTRL_ALT_DEL_SET2);
        // A guest that does not read: refused once it would not fit, nothing queued.
        c.write(COMMAND, 0x60);
        c.write(DATA, CTR_XLATE);
        c.write(COMMAND, 0xd2); // one byte as if the keyboard sent it
        c.write(DATA, 0x2a);
        c.press_ctrl_alt_del().unwrap();
        assert_eq!(
            c.press_ctrl_alt_del().unwrap_err(),
            KeyboardBusy { room: 7, needed: 8 }
        );
        assert_eq!(drain(&mut c).len(), 9);
    }

    #[test]
    fn state_round_trips_and_an_overlong_output_buffer_is_refused() {
        let a = I8042::new(Arc::new(StopLatch::default()), None);
        a.pio_write(PioAddress(I8042_BASE), 4, &[0xaa]); // self-test: a reply queued
        let saved = a.save_state();
        let b = I8042::new(Arc::new(StopLatch::default()), None);
        b.restore_state(&saved).unwrap();
        assert_eq!(b.save_state(), saved);
        let mut bad = saved;
        bad.output = std::iter::repeat_n(0u8, OUTPUT_CAPACITY + 1).collect();
        assert_eq!(
            b.restore_state(&bad).unwrap_err().to_string(),
            "cannot restore the i8042: 17 bytes in a 16-byte output buffer"
        );
    }

    /// Linux's `i8042_command`: write the command, the parameter bytes, then poll
    /// for the reply bytes.
    fn command(c: &mut Controller, cmd: u8, params: &[u8], replies: usize) -> Vec<u8> {
        c.write(COMMAND, cmd);
        for &p in params {
            c.write(DATA, p);
        }
        (0..replies)
            .map(|_| {
                assert_ne!(c.status() & STATUS_OBF, 0, "reply to {cmd:#x} missing");
                c.read(DATA).0
            })
            .collect()
    }

    #[test]
    fn linux_probe_sequence_gets_the_answers_of_a_pc() {
        let mut c = Controller::default();
        // i8042_flush: nothing pending.
        assert_eq!(c.status() & STATUS_OBF, 0);
        // Self test, then read and write the command byte.
        assert_eq!(command(&mut c, 0xaa, &[], 1), [0x55]);
        let ctr = command(&mut c, 0x20, &[], 1)[0];
        assert_eq!(ctr, CTR_KBD_INT | CTR_SYS | CTR_XLATE);
        command(&mut c, 0x60, &[ctr & !CTR_KBD_INT], 0);
        assert_eq!(command(&mut c, 0x20, &[], 1), [ctr & !CTR_KBD_INT]);
        // No auxiliary port: the loop gets no echo, the interface test fails.
        c.write(COMMAND, 0xd3);
        c.write(DATA, 0x5a);
        assert_eq!(c.status() & STATUS_OBF, 0);
        assert_eq!(command(&mut c, 0xa9, &[], 1), [0x01]);
        // Keyboard interface test, then the keyboard itself: reset, identify.
        assert_eq!(command(&mut c, 0xab, &[], 1), [0x00]);
        c.write(DATA, 0xff);
        assert_eq!((c.read(DATA).0, c.read(DATA).0), (KBD_ACK, KBD_BAT_OK));
        c.write(DATA, 0xf2);
        let id: Vec<u8> = (0..3).map(|_| c.read(DATA).0).collect();
        assert_eq!(id, [KBD_ACK, 0xab, 0x83]);
        // Set LEDs: the command and its parameter are each acknowledged.
        c.write(DATA, 0xed);
        assert_eq!(c.read(DATA).0, KBD_ACK);
        c.write(DATA, 0x07);
        assert_eq!(c.read(DATA).0, KBD_ACK);
        assert_eq!(c.status() & STATUS_OBF, 0);
    }

    #[test]
    fn keyboard_bytes_interrupt_when_enabled_and_the_buffer_is_bounded() {
        let mut c = Controller::default();
        assert!(c.write(DATA, 0xf4).irq, "ack with the interrupt enabled");
        assert!(!c.read(DATA).1.irq, "nothing more pending");
        command(&mut c, 0x60, &[CTR_SYS], 0);
        assert!(!c.write(DATA, 0xf4).irq, "interrupt disabled");
        c.read(DATA);
        for _ in 0..100 {
            c.write(DATA, 0xf2);
        }
        let mut n = 0;
        while c.status() & STATUS_OBF != 0 {
            c.read(DATA);
            n += 1;
        }
        assert_eq!(n, OUTPUT_CAPACITY);
        assert_eq!(c.read(DATA).0, 0, "empty reads 0");
    }

    #[test]
    fn reset_command_requests_a_reset() {
        let latch = Arc::new(StopLatch::default());
        let dev = I8042::new(latch.clone(), None);
        dev.pio_write(PioAddress(0x60), 4, &[0x20]);
        dev.pio_write(PioAddress(0x60), 4, &[0xfe, 0]); // wrong width: ignored
        assert_eq!(latch.peek(), None);
        dev.pio_write(PioAddress(0x60), 0, &[0xfe]); // data port: not a command
        assert_eq!(latch.peek(), None);
        dev.pio_write(PioAddress(0x60), 4, &[0xfe]);
        assert_eq!(latch.peek(), Some(DeviceStop::Reset));
    }

    #[test]
    fn the_interrupt_reaches_the_eventfd() {
        let irq = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let dev = I8042::new(
            Arc::new(StopLatch::default()),
            Some(irq.try_clone().unwrap()),
        );
        dev.pio_write(PioAddress(0x60), 0, &[0xee]);
        assert_eq!(irq.read().unwrap(), 1);
        let mut b = [0];
        dev.pio_read(PioAddress(0x60), 0, &mut b);
        assert_eq!(b, [KBD_ECHO]);
    }
}
