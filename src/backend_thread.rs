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

    /// A backend thread ends.
    pub(crate) fn leave(&self) {
        let mut g = self.lock();
        g.live -= 1;
        self.changed.notify_all();
    }
}

/// Wait until `fd` (token 0) is readable, parking at `gate` whenever it is paused
/// (token 2); returns false on stop (token 1).
pub(crate) fn wait(epoll: &Epoll, fd: &EventFd, gate: &Gate) -> bool {
    let mut events = [EpollEvent::default(); 3];
    loop {
        match epoll.wait(-1, &mut events) {
            Ok(n) => {
                if events[..n].iter().any(|e| e.data() == 1) {
                    return false;
                }
                if events[..n].iter().any(|e| e.data() == 2) {
                    gate.park();
                    continue;
                }
                // Reading resets the counter; an error means it was already zero.
                let _ = fd.read();
                return true;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("PV backend: epoll_wait failed, the backend stops: {e}");
                return false;
            }
        }
    }
}

/// An epoll set over a backend's eventfd (token 0), its stop (1) and its gate (2).
pub(crate) fn epoll_for(fd: &EventFd, stop: &EventFd, pause: &EventFd) -> std::io::Result<Epoll> {
    let epoll = Epoll::new()?;
    for (fd, token) in [(fd, 0), (stop, 1), (pause, 2)] {
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
