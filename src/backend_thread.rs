//! What every backend thread of a paravirtual channel does between requests: wait on
//! its event channel's eventfd, stop when told, and park while the VMM takes a
//! snapshot ([`Gate`]).

use std::os::fd::AsRawFd;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// Parks the backend threads for a snapshot: [`PvBackends::pause`] signals `wake` (every
/// thread polls it; nobody reads it until the resume) and waits until every live
/// thread has parked.
pub(crate) struct Gate {
    pub(crate) wake: EventFd,
    pub(crate) state: std::sync::Mutex<GateState>,
    pub(crate) changed: std::sync::Condvar,
}

#[derive(Default)]
pub(crate) struct GateState {
    pub(crate) paused: bool,
    pub(crate) parked: usize,
    pub(crate) live: usize,
}

impl Gate {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A backend thread parks until the resume.
    pub(crate) fn park(&self) {
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
    pub(crate) fn pause_all(&self) {
        let mut g = self.lock();
        g.paused = true;
        // Saturation means a wake-up is pending anyway.
        let _ = self.wake.write(1);
        while g.parked < g.live {
            g = self.changed.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Let the threads parked by [`pause_all`](Self::pause_all) serve again.
    pub(crate) fn resume_all(&self) {
        let mut g = self.lock();
        // Reading resets the counter; an error means it was already zero.
        let _ = self.wake.read();
        g.paused = false;
        self.changed.notify_all();
    }

    /// A backend thread ends.
    pub(crate) fn leave(&self) {
        let mut g = self.lock();
        g.live -= 1;
        self.changed.notify_all();
    }
}

/// The epoll token of a backend's own eventfd in the set of [`epoll_for`].
pub(crate) const PORT: u64 = 0;
/// The epoll token of the stop eventfd, in every backend thread's set.
pub(crate) const STOP: u64 = 1;
/// The epoll token of the gate's wake eventfd, in every backend thread's set.
pub(crate) const GATE: u64 = 2;

/// The tokens (below 64) of the fds that one wake-up found ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ready(u64);

impl Ready {
    /// Whether the fd of `token` was ready.
    pub(crate) fn has(self, token: u64) -> bool {
        token < 64 && self.0 & 1 << token != 0
    }
}

/// Wait for the next wake-up of a backend thread's `epoll` (with the stop at [`STOP`]
/// and the gate's wake at [`GATE`]), parking at `gate` whenever it is paused: the
/// tokens found ready, or None on stop or a failed wait (logged for `who`).
pub(crate) fn next_ready(epoll: &Epoll, gate: &Gate, who: &str) -> Option<Ready> {
    let mut events = [EpollEvent::default(); 8];
    loop {
        let n = match epoll.wait(-1, &mut events) {
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
pub(crate) fn wait(epoll: &Epoll, fd: &EventFd, gate: &Gate) -> bool {
    let ready = next_ready(epoll, gate, "PV backend").is_some();
    if ready {
        // Reading resets the counter; an error means it was already zero.
        let _ = fd.read();
    }
    ready
}

/// An epoll set over a backend's eventfd ([`PORT`]), its stop ([`STOP`]) and its gate
/// ([`GATE`]).
pub(crate) fn epoll_for(fd: &EventFd, stop: &EventFd, pause: &EventFd) -> std::io::Result<Epoll> {
    let epoll = Epoll::new()?;
    for (fd, token) in [(fd, PORT), (stop, STOP), (pause, GATE)] {
        epoll.ctl(
            ControlOperation::Add,
            fd.as_raw_fd(),
            EpollEvent::new(EventSet::IN, token),
        )?;
    }
    Ok(epoll)
}

/// Leaves the gate when a backend thread ends, however it ends.
pub(crate) struct Leave<'a>(pub(crate) &'a Gate);

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
        let gate = Gate {
            wake: wake.try_clone().unwrap(),
            state: std::sync::Mutex::new(GateState::default()),
            changed: std::sync::Condvar::new(),
        };
        let epoll = epoll_for(&port, &stop, &wake).unwrap();
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
