//! The one lifecycle of a device thread (a virtio device's I/O thread, a PV or Xen
//! backend's): wait on its eventfds, stop when told, and park at a safe point (between
//! requests, everything it took answered) while the VMM takes a snapshot, then go on
//! where it was ([`Gate`]). Pausing parks threads; it never kills and re-creates
//! them.
//!
//! ```
//! use std::sync::Arc;
//! use vmcraft_devices::lifecycle::{epoll_for, Gate, Leave};
//! use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
//!
//! let gate = Arc::new(Gate::new().unwrap());
//! let (work, stop) = (EventFd::new(EFD_NONBLOCK).unwrap(), EventFd::new(EFD_NONBLOCK).unwrap());
//! let epoll = epoll_for(&work, &stop, &gate.wake).unwrap();
//! gate.enter();
//! let g = gate.clone();
//! let thread = std::thread::spawn(move || {
//!     let _leave = Leave(&g);
//!     let mut served = 0;
//!     while vmcraft_devices::lifecycle::wait(&epoll, &work, &g) {
//!         served += 1;
//!     }
//!     served
//! });
//! gate.pause_all(); // returns once the thread has parked
//! gate.resume_all();
//! stop.write(1).unwrap();
//! thread.join().unwrap();
//! ```

use std::os::fd::AsRawFd;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// Parks device threads for a snapshot: [`Gate::pause_all`] signals `wake` (every
/// thread's epoll set has it; nobody reads it until the resume) and waits until every
/// live thread has parked.
#[derive(Debug)]
pub struct Gate {
    /// Readable while the threads are to park.
    pub wake: EventFd,
    state: std::sync::Mutex<GateState>,
    changed: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    paused: bool,
    parked: usize,
    live: usize,
}

impl Gate {
    /// A gate no thread has entered yet.
    pub fn new() -> std::io::Result<Gate> {
        Ok(Gate {
            wake: EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)?,
            state: std::sync::Mutex::new(GateState::default()),
            changed: std::sync::Condvar::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A thread that will park at this gate starts (call before spawning it; it
    /// [`Leave`]s when it ends).
    pub fn enter(&self) {
        self.lock().live += 1;
    }

    /// A thread parks until the resume.
    pub fn park(&self) {
        let mut g = self.lock();
        g.parked += 1;
        self.changed.notify_all();
        while g.paused {
            g = self.changed.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        g.parked -= 1;
    }

    /// Pause every live thread at its next safe point (between requests) and wait
    /// until each has parked: what each took from its ring is answered by then.
    pub fn pause_all(&self) {
        let mut g = self.lock();
        g.paused = true;
        // Saturation means a wake-up is pending anyway.
        let _ = self.wake.write(1);
        while g.parked < g.live {
            g = self.changed.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Let the threads parked by [`pause_all`](Self::pause_all) serve again.
    pub fn resume_all(&self) {
        let mut g = self.lock();
        // Reading resets the counter; an error means it was already zero.
        let _ = self.wake.read();
        g.paused = false;
        self.changed.notify_all();
    }

    /// A thread ends.
    pub fn leave(&self) {
        let mut g = self.lock();
        g.live -= 1;
        self.changed.notify_all();
    }
}

/// The epoll token of a backend's own eventfd in the set of [`epoll_for`].
pub const PORT: u64 = 0;
/// The epoll token of the stop eventfd, in every backend thread's set.
pub const STOP: u64 = 1;
/// The epoll token of the gate's wake eventfd, in every backend thread's set.
pub const GATE: u64 = 2;

/// The tokens (below 64) of the fds that one wake-up found ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ready(u64);

impl Ready {
    /// Whether the fd of `token` was ready.
    pub fn has(self, token: u64) -> bool {
        token < 64 && self.0 & 1 << token != 0
    }
}

/// Wait for the next wake-up of a backend thread's `epoll` (with the stop at [`STOP`]
/// and the gate's wake at [`GATE`]), parking at `gate` whenever it is paused: the
/// tokens found ready, or None on stop or a failed wait (logged for `who`).
pub fn next_ready(epoll: &Epoll, gate: &Gate, who: &str) -> Option<Ready> {
    next_ready_within(epoll, gate, who, None)
}

/// [`next_ready`] for a thread that also works every `period` (the balancer): the
/// tokens found ready (none when the period passed first), or None on stop or a
/// failed wait. Parked time does not count towards the period.
pub fn next_ready_within(
    epoll: &Epoll,
    gate: &Gate,
    who: &str,
    period: Option<std::time::Duration>,
) -> Option<Ready> {
    let mut events = [EpollEvent::default(); 8];
    let ms = period.map_or(-1, |p| i32::try_from(p.as_millis()).unwrap_or(i32::MAX));
    loop {
        let n = match epoll.wait(ms, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("{who}: epoll_wait failed, it stops serving: {e}");
                return None;
            }
        };
        let ready = Ready(events[..n].iter().fold(0, |bits, e| {
            bits | 1u64.checked_shl(e.data() as u32).unwrap_or(0)
        }));
        if ready.has(STOP) {
            return None;
        }
        if ready.has(GATE) {
            gate.park();
            continue;
        }
        return Some(ready);
    }
}

/// Wait until `fd` (token [`PORT`]) is readable and reset it, parking at `gate`
/// whenever it is paused; returns false on stop.
pub fn wait(epoll: &Epoll, fd: &EventFd, gate: &Gate) -> bool {
    let ready = next_ready(epoll, gate, "PV backend").is_some();
    if ready {
        // Reading resets the counter; an error means it was already zero.
        let _ = fd.read();
    }
    ready
}

/// An epoll set over a backend's eventfd ([`PORT`]), its stop ([`STOP`]) and its gate
/// ([`GATE`]).
pub fn epoll_for(fd: &EventFd, stop: &EventFd, pause: &EventFd) -> std::io::Result<Epoll> {
    epoll_over(&[(fd, PORT), (stop, STOP), (pause, GATE)])
}

/// An epoll set over `fds`, each readable under its token.
pub fn epoll_over(fds: &[(&EventFd, u64)]) -> std::io::Result<Epoll> {
    let epoll = Epoll::new()?;
    for (fd, token) in fds {
        epoll.ctl(
            ControlOperation::Add,
            fd.as_raw_fd(),
            EpollEvent::new(EventSet::IN, *token),
        )?;
    }
    Ok(epoll)
}

/// Leaves the gate when a thread ends, however it ends.
#[derive(Debug)]
pub struct Leave<'a>(pub &'a Gate);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn fd() -> EventFd {
        EventFd::new(EFD_NONBLOCK).unwrap()
    }

    #[test]
    fn a_wake_up_names_its_ready_fds_and_a_stop_ends_the_wait() {
        let (port, stop, wake, extra) = (fd(), fd(), fd(), fd());
        let gate = Gate::new().unwrap();
        let _ = wake;
        let epoll = epoll_for(&port, &stop, &gate.wake).unwrap();
        epoll
            .ctl(
                ControlOperation::Add,
                extra.as_raw_fd(),
                EpollEvent::new(EventSet::IN, 5),
            )
            .unwrap();
        port.write(1).unwrap();
        extra.write(1).unwrap();
        let ready = next_ready(&epoll, &gate, "test").unwrap();
        assert!(ready.has(PORT) && ready.has(5));
        assert!(!ready.has(3) && !ready.has(64), "only what was ready");
        // `wait` resets the port; the extra fd stays ready until read.
        assert!(wait(&epoll, &port, &gate));
        assert!(port.read().is_err(), "read back to zero");
        extra.read().unwrap();
        stop.write(1).unwrap();
        port.write(1).unwrap();
        assert_eq!(next_ready(&epoll, &gate, "test"), None, "a stop wins");
        assert!(!wait(&epoll, &port, &gate));
    }
}
