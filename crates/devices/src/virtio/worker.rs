//! The I/O thread of a virtio device: waits on its queue notifiers, any extra fds of
//! its backend and a stop eventfd, and calls the device's handler on each wakeup.
//!
//! A device written outside this crate uses it the way vmcraft's own do: in
//! [`VirtioDevice::activate`](super::VirtioDevice::activate), [`spawn_device`] with
//! the [`ActiveQueues`] and a handler that serves the queue the [`Token`] names (with
//! [`serve_available`](super::queue::serve_available)); keep the returned [`Worker`],
//! and drop it in `reset`. `examples/custom-device.rs` is a whole device in this form.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use vmcraft_sandbox::{Thread, ThreadKind};

use crate::lifecycle::{Gate, Leave};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::queue::ProtocolError;
use super::{ActivateError, ActiveQueues};
use vmcraft_memory::report::ErrorChain;

/// Start the I/O thread of device `name` on the notifiers of `active` and `fds`:
/// `serve` runs on every wakeup; a protocol error marks the device NEEDS_RESET and
/// ends the thread, leaving every other device alone.
pub fn spawn_device(
    name: &str,
    active: ActiveQueues,
    fds: Vec<std::os::fd::RawFd>,
    serve: impl FnMut(&Epoll, Token) -> Result<(), ProtocolError> + Send + 'static,
) -> Result<Worker, ActivateError> {
    spawn_serving(
        format!("{name}-io"),
        name,
        active.notifiers,
        active.interrupt,
        fds,
        serve,
    )
}

/// Like [`spawn_device`], for one queue of a device that serves each queue on its own
/// thread: thread `thread` of device `name`, woken by `notifier` only (its token is
/// [`Token::Queue`]`(0)`).
pub fn spawn_queue(
    thread: String,
    name: &str,
    notifier: EventFd,
    interrupt: Arc<super::Interrupt>,
    serve: impl FnMut(&Epoll, Token) -> Result<(), ProtocolError> + Send + 'static,
) -> Result<Worker, ActivateError> {
    spawn_serving(thread, name, vec![notifier], interrupt, Vec::new(), serve)
}

/// Like [`spawn_queue`], for a thread that serves several queues of a device (a
/// virtio-net queue pair): woken by `notifiers` (tokens [`Token::Queue`]`(i)` by
/// position) and `fds` ([`Token::Fd`]).
pub fn spawn_queues(
    thread: String,
    name: &str,
    notifiers: Vec<EventFd>,
    interrupt: Arc<super::Interrupt>,
    fds: Vec<std::os::fd::RawFd>,
    serve: impl FnMut(&Epoll, Token) -> Result<(), ProtocolError> + Send + 'static,
) -> Result<Worker, ActivateError> {
    spawn_serving(thread, name, notifiers, interrupt, fds, serve)
}

fn spawn_serving(
    thread: String,
    name: &str,
    notifiers: Vec<EventFd>,
    interrupt: Arc<super::Interrupt>,
    fds: Vec<std::os::fd::RawFd>,
    mut serve: impl FnMut(&Epoll, Token) -> Result<(), ProtocolError> + Send + 'static,
) -> Result<Worker, ActivateError> {
    let device = name.to_string();
    Worker::spawn(thread, notifiers, fds, move |epoll, token| {
        if let Token::Queue(_) = token {
            let counters = interrupt.counters();
            super::DeviceCounters::add(&counters.notifications, 1);
        }
        serve_or_stop(&device, &interrupt, serve(epoll, token), token)
    })
    .map_err(|source| ActivateError::Host {
        what: "spawn the I/O thread",
        source,
    })
}

/// What the I/O thread does after serving `token`: go on, or after a protocol
/// error, mark the device NEEDS_RESET and stop.
fn serve_or_stop(
    device: &str,
    interrupt: &super::Interrupt,
    served: Result<(), ProtocolError>,
    token: Token,
) -> Next {
    match served {
        Ok(()) => Next::Continue,
        Err(e) => {
            log::warn!(
                    "{device}: the guest broke the virtio protocol on {token:?}, the device needs a reset: {}",
                    ErrorChain(&e)
                );
            interrupt.device_error();
            Next::Stop
        }
    }
}

/// What the handler wants after serving a notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Keep serving.
    Continue,
    /// Stop the thread (the device met a guest protocol error and waits for a reset).
    Stop,
}

/// What woke the I/O thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Token {
    /// The driver notified this queue.
    Queue(usize),
    /// This extra fd (by position) is readable.
    Fd(usize),
}

/// A running I/O thread; dropping it stops and joins the thread. It parks at a safe
/// point (between wakeups, every chain it took completed) on [`Worker::pause`].
#[derive(Debug)]
pub struct Worker {
    stop: EventFd,
    gate: Arc<Gate>,
    thread: Option<Thread<()>>,
}

impl Worker {
    /// Spawn thread `name`, calling `on_event` each time the driver notifies a queue
    /// (once per wakeup, however many notifications it coalesced; and once per queue
    /// at start, for what was queued before) or one of `fds` is readable. The handler
    /// gets the [`Epoll`] (to pause or resume an fd) and the token.
    pub(crate) fn spawn(
        name: String,
        notifiers: Vec<EventFd>,
        fds: Vec<std::os::fd::RawFd>,
        mut on_event: impl FnMut(&Epoll, Token) -> Next + Send + 'static,
    ) -> io::Result<Worker> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let gate = Arc::new(Gate::new()?);
        let epoll = Epoll::new()?;
        let queues = notifiers.len() as u64;
        let stop_token = queues + fds.len() as u64;
        let gate_token = stop_token + 1;
        for (i, fd) in notifiers.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                fd.as_raw_fd(),
                EpollEvent::new(EventSet::IN, i as u64),
            )?;
        }
        for (j, fd) in fds.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                *fd,
                EpollEvent::new(EventSet::IN, queues + j as u64),
            )?;
        }
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, stop_token),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            gate.wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, gate_token),
        )?;
        let stop_clone = stop.try_clone()?;
        let label = name.clone();
        let thread_gate = gate.clone();
        gate.enter();
        let spawned = vmcraft_sandbox::spawn(ThreadKind::DeviceIo, &name, move || {
            let _stop = stop_clone;
            let _leave = Leave(&thread_gate);
            let mut events = vec![EpollEvent::default(); gate_token as usize + 1];
            // Serve what was queued before activation.
            for i in 0..notifiers.len() {
                if on_event(&epoll, Token::Queue(i)) == Next::Stop {
                    return;
                }
            }
            loop {
                let n = match epoll.wait(-1, &mut events) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::error!("{label}: epoll_wait failed, the device stops serving: {e}");
                        return;
                    }
                };
                if events[..n].iter().any(|ev| ev.data() == stop_token) {
                    return;
                }
                for ev in &events[..n] {
                    let token = ev.data();
                    if token == gate_token {
                        // A snapshot: everything taken so far is completed.
                        thread_gate.park();
                        continue;
                    }
                    let event = match notifiers.get(token as usize) {
                        Some(fd) => {
                            // Reading resets the counter; an error means it was zero.
                            let _ = fd.read();
                            Token::Queue(token as usize)
                        }
                        None => Token::Fd((token - queues) as usize),
                    };
                    if on_event(&epoll, event) == Next::Stop {
                        return;
                    }
                }
            }
        });
        let thread = match spawned {
            Ok(thread) => thread,
            Err(e) => {
                gate.leave();
                return Err(io::Error::other(e));
            }
        };
        Ok(Worker {
            stop,
            gate,
            thread: Some(thread),
        })
    }

    /// Park the thread at its next safe point (between wakeups, every chain it took
    /// completed) and return once it has; its queues and state stay as they are.
    pub fn pause(&self) {
        self.gate.pause_all();
    }

    /// Let the thread go on after [`pause`](Self::pause).
    pub fn resume(&self) {
        self.gate.resume_all();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // If the write fails the counter is saturated, so the thread will wake anyway.
        let _ = self.stop.write(1);
        // A thread parked for a snapshot goes back to its loop, and sees the stop.
        self.gate.resume_all();
        if let Some(t) = self.thread.take() {
            // A panic in the handler has already been reported by the panic hook.
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn a_paused_thread_serves_nothing_until_resumed_and_is_the_same_thread() {
        let a = EventFd::new(EFD_NONBLOCK).unwrap();
        let (tx, rx) = mpsc::channel();
        let worker = Worker::spawn(
            "test-pause".into(),
            vec![a.try_clone().unwrap()],
            Vec::new(),
            move |_, _| {
                tx.send(std::thread::current().id()).unwrap();
                Next::Continue
            },
        )
        .unwrap();
        let first = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        worker.pause();
        a.write(1).unwrap();
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "served while paused"
        );
        worker.resume();
        let after = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(after, first, "the thread parked, it was not re-created");
        // Dropped while paused, it still ends.
        worker.pause();
        drop(worker);
    }

    #[test]
    fn notifications_reach_the_handler_and_drop_joins() {
        let a = EventFd::new(EFD_NONBLOCK).unwrap();
        let b = EventFd::new(EFD_NONBLOCK).unwrap();
        let (tx, rx) = mpsc::channel();
        let worker = Worker::spawn(
            "test-worker".into(),
            vec![a.try_clone().unwrap(), b.try_clone().unwrap()],
            Vec::new(),
            move |_, token| {
                if let Token::Queue(q) = token {
                    tx.send(q).unwrap();
                }
                Next::Continue
            },
        )
        .unwrap();
        // The initial pass over every queue.
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 0);
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 1);
        b.write(1).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 1);
        a.write(1).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 0);
        drop(worker);
        // The thread is gone, and with it the sender.
        assert!(rx.recv_timeout(Duration::from_secs(5)).is_err());
    }

    #[test]
    fn a_stop_from_the_handler_ends_the_thread() {
        let a = EventFd::new(EFD_NONBLOCK).unwrap();
        let (tx, rx) = mpsc::channel();
        let _worker = Worker::spawn(
            "test-worker".into(),
            vec![a.try_clone().unwrap()],
            Vec::new(),
            move |_, token| {
                tx.send(token).unwrap();
                Next::Stop
            },
        )
        .unwrap();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)).unwrap(),
            Token::Queue(0)
        );
        a.write(1).unwrap();
        assert!(rx.recv_timeout(Duration::from_secs(5)).is_err());
    }
}
