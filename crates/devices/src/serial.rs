//! The 16550 UART from `vm-superio` on the port bus.
//!
//! * Output goes to any `Write` (stdout, a file, a [`SharedBuffer`] in tests).
//! * The interrupt is an eventfd: register it with KVM as an irqfd (IRQ 4 for COM1).
//! * Input comes from any readable fd through [`SerialInput`], an `event-manager`
//!   subscriber. Bytes that do not fit the UART's FIFO are kept and delivered when the
//!   guest drains it: input is never dropped.

use crate::state::StateError;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;
use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// COM1's first port.
pub const COM1_BASE: u16 = 0x3f8;
/// COM1's legacy IRQ.
pub const COM1_IRQ: u32 = 4;
/// Ports a 16550 covers.
pub const SERIAL_SIZE: u16 = 8;

/// An eventfd as a `vm-superio` interrupt trigger.
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Signals an eventfd when the guest has emptied the receive FIFO.
#[derive(Debug)]
pub struct RxSpace(EventFd);

impl SerialEvents for RxSpace {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        // A failed write only means the counter is saturated: a wakeup is pending anyway.
        let _ = self.0.write(1);
    }
}

type Uart = Serial<EventFdTrigger, RxSpace, Box<dyn Write + Send>>;

/// Bytes in the UART's receive FIFO (vm-superio's, which it does not export).
const UART_FIFO: usize = 64;

/// The state of a [`SerialDevice`] in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialState {
    /// DLL, DLH, IER, IIR, LCR, LSR, MCR, MSR, SCR.
    pub registers: [u8; 9],
    /// Received bytes the guest has not read.
    pub in_buffer: Vec<u8>,
}

impl vmcraft_snapshot::Versioned for SerialState {
    const VERSION: u32 = 1;
}

/// A 16550 UART.
pub struct SerialDevice {
    uart: Mutex<Uart>,
    irq: EventFd,
    rx_space: EventFd,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice").finish_non_exhaustive()
    }
}

impl SerialDevice {
    /// A UART whose output goes to `out`.
    pub fn new(out: Box<dyn Write + Send>) -> io::Result<Self> {
        let irq = EventFd::new(EFD_NONBLOCK)?;
        let rx_space = EventFd::new(EFD_NONBLOCK)?;
        let uart = Serial::with_events(
            EventFdTrigger(irq.try_clone()?),
            RxSpace(rx_space.try_clone()?),
            out,
        );
        Ok(SerialDevice {
            uart: Mutex::new(uart),
            irq,
            rx_space,
        })
    }

    /// The interrupt eventfd, to register as a KVM irqfd.
    pub fn irq_eventfd(&self) -> &EventFd {
        &self.irq
    }

    /// Queue `bytes` as received input; returns how many fit in the FIFO.
    pub fn enqueue_input(&self, bytes: &[u8]) -> usize {
        let mut uart = self.lock();
        let room = uart.fifo_capacity().min(bytes.len());
        if room == 0 {
            return 0;
        }
        uart.enqueue_raw_bytes(&bytes[..room]).unwrap_or(0)
    }

    /// The UART's registers and receive FIFO, for a snapshot.
    pub fn save_state(&self) -> SerialState {
        let s = self.lock().state();
        SerialState {
            registers: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer,
        }
    }

    /// Put back the registers and FIFO of [`SerialDevice::save_state`]; the output
    /// and the interrupt stay this device's.
    pub fn restore_state(&self, state: &SerialState) -> Result<(), StateError> {
        if state.in_buffer.len() > UART_FIFO {
            return Err(StateError::new(
                "16550 UART",
                format!(
                    "{} bytes in a {}-byte receive FIFO",
                    state.in_buffer.len(),
                    UART_FIFO
                ),
            ));
        }
        let [dll, dlh, ier, iir, lcr, lsr, mcr, msr, scr] = state.registers;
        let regs = vm_superio::serial::SerialState {
            baud_divisor_low: dll,
            baud_divisor_high: dlh,
            interrupt_enable: ier,
            interrupt_identification: iir,
            line_control: lcr,
            line_status: lsr,
            modem_control: mcr,
            modem_status: msr,
            scratch: scr,
            in_buffer: state.in_buffer.clone(),
        };
        let broken = |e: &dyn std::fmt::Debug| StateError::new("16550 UART", format!("{e:?}"));
        let trigger = EventFdTrigger(self.irq.try_clone().map_err(|e| broken(&e))?);
        let rx = RxSpace(self.rx_space.try_clone().map_err(|e| broken(&e))?);
        let mut uart = self.lock();
        // Take the output writer over into the restored UART.
        let placeholder = Serial::with_events(
            EventFdTrigger(self.irq.try_clone().map_err(|e| broken(&e))?),
            RxSpace(self.rx_space.try_clone().map_err(|e| broken(&e))?),
            Box::new(io::sink()) as Box<dyn Write + Send>,
        );
        let out = std::mem::replace(&mut *uart, placeholder).into_writer();
        // The FIFO size was checked above, the only thing from_state refuses.
        *uart = Serial::from_state(&regs, trigger, rx, out).map_err(|e| broken(&e))?;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Uart> {
        self.uart.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl DevicePio for SerialDevice {
    fn pio_read(&self, _: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0xff);
        // The 16550's registers are bytes; wider accesses read as all ones.
        if let ([byte], Ok(offset)) = (data, u8::try_from(offset)) {
            *byte = self.lock().read(offset);
        }
    }

    fn pio_write(&self, _: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let ([byte], Ok(offset)) = (data, u8::try_from(offset)) {
            // An error here is a failed write to the output or the interrupt eventfd;
            // the guest cannot be told, and the UART stays consistent, so keep going.
            let _ = self.lock().write(offset, *byte);
        }
    }
}

/// An `event-manager` subscriber feeding a readable fd into a [`SerialDevice`].
pub struct SerialInput<R: Read + AsRawFd + Send> {
    serial: Arc<SerialDevice>,
    input: R,
    pending: Vec<u8>,
    pending_start: usize,
    reading: bool,
}

const INPUT_CHUNK: usize = 64;

impl<R: Read + AsRawFd + Send> SerialInput<R> {
    /// Feed `input` into `serial`.
    pub fn new(serial: Arc<SerialDevice>, input: R) -> Self {
        SerialInput {
            serial,
            input,
            pending: Vec::with_capacity(INPUT_CHUNK),
            pending_start: 0,
            reading: true,
        }
    }

    /// Move as much pending input as fits into the FIFO; true when none is left.
    fn flush(&mut self) -> bool {
        let n = self
            .serial
            .enqueue_input(&self.pending[self.pending_start..]);
        self.pending_start += n;
        if self.pending_start == self.pending.len() {
            self.pending.clear();
            self.pending_start = 0;
            true
        } else {
            false
        }
    }

    fn input_events(&self) -> Events {
        Events::new(&self.input, EventSet::IN)
    }
}

impl<R: Read + AsRawFd + Send> MutEventSubscriber for SerialInput<R> {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.serial.rx_space.as_raw_fd() {
            let _ = self.serial.rx_space.read();
            if self.flush() && !self.reading {
                self.reading = ops.add(self.input_events()).is_ok();
            }
            return;
        }
        if events.event_set().contains(EventSet::IN) && self.pending.is_empty() {
            let mut buf = [0u8; INPUT_CHUNK];
            match self.input.read(&mut buf) {
                Ok(0) => {
                    let _ = ops.remove(self.input_events());
                    self.reading = false;
                    return;
                }
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    let _ = ops.remove(self.input_events());
                    self.reading = false;
                    return;
                }
            }
            if !self.flush() {
                // The FIFO is full: stop reading until the guest drains it.
                let _ = ops.remove(self.input_events());
                self.reading = false;
            }
        } else if events
            .event_set()
            .intersects(EventSet::HANG_UP | EventSet::ERROR)
        {
            let _ = ops.remove(self.input_events());
            self.reading = false;
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        // Registration failures leave the UART without input, which the guest sees as
        // an idle line; the output side keeps working.
        let _ = ops.add(self.input_events());
        let _ = ops.add(Events::new(&self.serial.rx_space, EventSet::IN));
    }
}

/// A cloneable in-memory writer, to capture serial output.
#[derive(Debug, Clone, Default)]
pub struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

impl SharedBuffer {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy of everything written so far.
    pub fn contents(&self) -> Vec<u8> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Write for SharedBuffer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use event_manager::{EventManager, SubscriberOps};
    use std::os::unix::net::UnixStream;

    const DATA: u16 = 0;
    const IER: u16 = 1;
    const LSR: u16 = 5;

    #[test]
    fn state_round_trips_and_an_overfull_fifo_is_refused() {
        let out = SharedBuffer::new();
        let a = SerialDevice::new(Box::new(out.clone())).unwrap();
        a.pio_write(PioAddress(0), IER, &[0x05]);
        a.enqueue_input(b"abc");
        let saved = a.save_state();
        assert_eq!(saved.in_buffer, b"abc");
        let b = SerialDevice::new(Box::new(SharedBuffer::new())).unwrap();
        b.restore_state(&saved).unwrap();
        assert_eq!(b.save_state(), saved);
        let mut data = [0u8];
        b.pio_read(PioAddress(0), DATA, &mut data);
        assert_eq!(data, *b"a", "the restored FIFO is read in order");
        let mut too_much = saved.clone();
        too_much.in_buffer = vec![0; UART_FIFO + 1];
        let err = b.restore_state(&too_much).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot restore the 16550 UART: 65 bytes in a 64-byte receive FIFO"
        );
    }

    fn read(s: &SerialDevice, off: u16) -> u8 {
        let mut b = [0u8];
        s.pio_read(PioAddress(COM1_BASE), off, &mut b);
        b[0]
    }

    #[test]
    fn output_is_byte_exact_and_raises_the_interrupt() {
        let out = SharedBuffer::new();
        let s = SerialDevice::new(Box::new(out.clone())).unwrap();
        s.pio_write(PioAddress(COM1_BASE), IER, &[0x02]); // THR-empty interrupt
        for b in b"hi\n\x00\xff" {
            assert_ne!(read(&s, LSR) & 0x20, 0);
            s.pio_write(PioAddress(COM1_BASE), DATA, &[*b]);
        }
        s.pio_write(PioAddress(COM1_BASE), DATA, b"xy"); // wide: ignored
        assert_eq!(out.contents(), b"hi\n\x00\xff");
        assert!(s.irq_eventfd().read().unwrap() >= 1);
    }

    #[test]
    fn input_beyond_the_fifo_is_kept_until_the_guest_reads() {
        let s = Arc::new(SerialDevice::new(Box::new(io::sink())).unwrap());
        let (mut host, guest_side) = UnixStream::pair().unwrap();
        guest_side.set_nonblocking(true).unwrap();
        let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
        em.add_subscriber(Arc::new(Mutex::new(SerialInput::new(
            s.clone(),
            guest_side,
        ))));
        let sent: Vec<u8> = (0..200u32).map(|i| (i % 251) as u8).collect();
        host.write_all(&sent).unwrap();
        let mut got = Vec::new();
        for _ in 0..1000 {
            em.run_with_timeout(10).unwrap();
            while read(&s, LSR) & 0x01 != 0 {
                got.push(read(&s, DATA));
            }
            if got.len() == sent.len() {
                break;
            }
        }
        assert_eq!(got, sent);
    }
}
