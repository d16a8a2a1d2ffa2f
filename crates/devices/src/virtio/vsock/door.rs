//! A vsock device's host door: the one thread of a VMM that makes sockets.
//!
//! It accepts host clients on the device's socket (`uds_path`, bound before the VMM
//! entered its jail and filters) and connects to `<uds_path>_<port>` when the guest
//! connects to host port `port`, under its own filter
//! ([`ThreadKind::HostSockets`]: `socket` for `AF_UNIX` only, `connect`, `accept4`).
//! The streams it makes go, non-blocking, to the device's I/O thread, whose filter
//! stays without `socket` or `connect`. The door lives as long as the machine, across
//! the driver's resets and the device's restores; dropped, it removes the socket
//! file it was bound to.
//!
//! Bounds: at most [`MAX_WAITING_CLIENTS`] accepted clients wait for the device (a
//! driver that has not started it yet); past that, new ones are closed at once.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmcraft_sandbox::{Thread, ThreadKind};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::hybrid::listener_path;
use super::muxer::HostConnector;

/// Accepted clients waiting for the device to take them: past this many, more are
/// closed.
pub const MAX_WAITING_CLIENTS: usize = 64;

/// How long the device's thread waits for the door to connect (a Unix socket
/// connects or fails at once; this is for a door that is gone).
const CONNECT_WAIT: Duration = Duration::from_secs(2);

/// Why a door could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DoorError {
    /// A host resource (eventfd, epoll, the listener's mode) could not be had.
    #[error("vsock door: cannot {what}")]
    Host {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The thread could not be started under its filter.
    #[error("vsock door: cannot start its thread")]
    Spawn(#[source] vmcraft_sandbox::SandboxError),
}

/// A device's socket, bound at its path: the file is removed when this is dropped,
/// or by the [`Door`] it is opened into, so a VMM that fails before its machine runs
/// leaves nothing behind.
#[derive(Debug)]
pub struct BoundSocket {
    listener: Option<UnixListener>,
    path: PathBuf,
}

impl BoundSocket {
    /// Bind a new socket at `path` (which must not exist).
    pub fn bind(path: &Path) -> io::Result<BoundSocket> {
        Ok(BoundSocket {
            listener: Some(UnixListener::bind(path)?),
            path: path.to_owned(),
        })
    }

    /// Where it is bound.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn take(mut self) -> (UnixListener, PathBuf) {
        let listener = self.listener.take().expect("taken once");
        (listener, std::mem::take(&mut self.path))
    }
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        if self.listener.take().is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

type Reply = mpsc::SyncSender<io::Result<UnixStream>>;

struct Shared {
    accepted: Mutex<VecDeque<UnixStream>>,
    /// Signalled when a client is accepted.
    accepted_ready: EventFd,
    requests: Mutex<VecDeque<(u32, Reply)>>,
    /// Signalled when a connect is asked for.
    request_ready: EventFd,
}

/// A vsock device's host door. See the [module documentation](self).
pub struct Door {
    uds_path: PathBuf,
    shared: Arc<Shared>,
    stop: EventFd,
    thread: Option<Thread<()>>,
}

impl std::fmt::Debug for Door {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Door")
            .field("uds_path", &self.uds_path)
            .finish_non_exhaustive()
    }
}

fn host(what: &'static str) -> impl FnOnce(io::Error) -> DoorError {
    move |source| DoorError::Host { what, source }
}

impl Door {
    /// Open the door of the device whose socket is `socket` (its clients accepted
    /// from now on; the file removed when the door is dropped).
    pub fn open(socket: BoundSocket) -> Result<Door, DoorError> {
        // Until the thread owns it, `socket` removes the file if the door does not
        // open.
        let listener = socket.listener.as_ref().expect("bound until taken");
        listener
            .set_nonblocking(true)
            .map_err(host("make the listener non-blocking"))?;
        let shared = Arc::new(Shared {
            accepted: Mutex::new(VecDeque::new()),
            accepted_ready: EventFd::new(EFD_NONBLOCK).map_err(host("create an eventfd"))?,
            requests: Mutex::new(VecDeque::new()),
            request_ready: EventFd::new(EFD_NONBLOCK).map_err(host("create an eventfd"))?,
        });
        let stop = EventFd::new(EFD_NONBLOCK).map_err(host("create an eventfd"))?;
        let epoll = Epoll::new().map_err(host("create an epoll instance"))?;
        for (fd, token) in [
            (listener.as_raw_fd(), 0),
            (shared.request_ready.as_raw_fd(), 1),
            (stop.as_raw_fd(), 2),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(host("watch the door's descriptors"))?;
        }
        let thread_shared = shared.clone();
        let thread_stop = stop.try_clone().map_err(host("duplicate an eventfd"))?;
        // From here the thread owns the file.
        let (listener, path) = socket.take();
        let uds_path = path.clone();
        let thread = vmcraft_sandbox::spawn(ThreadKind::HostSockets, "vsock-door", move || {
            serve(&epoll, &listener, &thread_shared, &path);
            drop(thread_stop);
            // The socket file goes with the device (the VMM's own, bound by it).
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != io::ErrorKind::NotFound {
                    log::warn!("vsock: cannot remove the socket {}: {e}", path.display());
                }
            }
        })
        .map_err(|e| {
            let _ = std::fs::remove_file(&uds_path);
            DoorError::Spawn(e)
        })?;
        Ok(Door {
            uds_path,
            shared,
            stop,
            thread: Some(thread),
        })
    }

    /// The device's socket.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Signalled (readable) when clients wait to be taken.
    pub fn accepted_ready(&self) -> &EventFd {
        &self.shared.accepted_ready
    }

    /// The clients accepted since the last call (non-blocking streams), oldest
    /// first.
    pub fn take_accepted(&self) -> Vec<UnixStream> {
        let _ = self.shared.accepted_ready.read();
        let mut q = self
            .shared
            .accepted
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        q.drain(..).collect()
    }

    /// A connector for the device's thread: the guest's connections to host port
    /// `P` go to `<uds_path>_P`, made by the door.
    pub fn connector(&self) -> DoorConnector {
        DoorConnector {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Door {
    fn drop(&mut self) {
        // If the write fails the counter is saturated and the thread wakes anyway.
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The door's loop: accept clients, make connections, until stopped.
fn serve(epoll: &Epoll, listener: &UnixListener, shared: &Shared, uds_path: &Path) {
    let mut events = [EpollEvent::default(); 3];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("vsock door: epoll_wait failed, the door closes: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            match ev.data() {
                0 => accept_all(listener, shared),
                1 => connect_all(shared, uds_path),
                _ => return,
            }
        }
    }
}

fn accept_all(listener: &UnixListener, shared: &Shared) {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                let mut q = shared.accepted.lock().unwrap_or_else(|p| p.into_inner());
                if q.len() >= MAX_WAITING_CLIENTS {
                    log::warn!(
                        "vsock: {} host clients wait for the device: one more closed",
                        q.len()
                    );
                    continue;
                }
                if let Err(e) = set_nonblocking(&stream) {
                    log::warn!("vsock: a host client refused: {e}");
                    continue;
                }
                q.push_back(stream);
                drop(q);
                let _ = shared.accepted_ready.write(1);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => {
                // EMFILE and its kin: the client waits in the backlog for the next
                // wakeup rather than spinning here.
                log::warn!("vsock: cannot accept a host client: {e}");
                return;
            }
        }
    }
}

/// `O_NONBLOCK` through `fcntl` (std's `set_nonblocking` is an `ioctl`, which the
/// door's filter does not allow).
fn set_nonblocking(stream: &UnixStream) -> io::Result<()> {
    let fd = stream.as_raw_fd();
    // SAFETY: F_GETFL and F_SETFL on a descriptor `stream` owns; no memory passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn connect_all(shared: &Shared, uds_path: &Path) {
    let _ = shared.request_ready.read();
    loop {
        let next = shared
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front();
        let Some((port, reply)) = next else {
            return;
        };
        let made = UnixStream::connect(listener_path(uds_path, port)).and_then(|s| {
            set_nonblocking(&s)?;
            Ok(s)
        });
        // The asker may have given up waiting: then the stream is closed here.
        let _ = reply.send(made);
    }
}

/// What the device's thread connects through: asks the door, waits for its answer.
#[derive(Clone)]
pub struct DoorConnector {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for DoorConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DoorConnector")
    }
}

impl HostConnector for DoorConnector {
    type Stream = UnixStream;

    fn connect(&mut self, port: u32) -> io::Result<UnixStream> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.shared
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back((port, reply));
        self.shared.request_ready.write(1)?;
        answer
            .recv_timeout(CONNECT_WAIT)
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the vsock door did not answer"))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn temp_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "vmcraft-door-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn clients_are_accepted_connections_made_and_the_socket_removed() {
        let dir = temp_dir();
        let uds = dir.join("v.sock");
        let door = Door::open(BoundSocket::bind(&uds).unwrap()).unwrap();
        // A client, accepted and handed over.
        let mut client = UnixStream::connect(&uds).unwrap();
        client.write_all(b"CONNECT 52\n").unwrap();
        let mut taken = Vec::new();
        for _ in 0..500 {
            taken.extend(door.take_accepted());
            if !taken.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(taken.len(), 1);
        let mut line = [0u8; 11];
        taken[0].set_nonblocking(false).unwrap();
        taken[0].read_exact(&mut line).unwrap();
        assert_eq!(&line, b"CONNECT 52\n");
        // A connection to a listener at <uds>_1234, and one to nobody.
        let listener = UnixListener::bind(listener_path(&uds, 1234)).unwrap();
        let mut connector = door.connector();
        let mut made = connector.connect(1234).unwrap();
        let (mut far, _) = listener.accept().unwrap();
        made.set_nonblocking(false).unwrap();
        made.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        far.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        assert!(connector.connect(4321).is_err(), "nobody listens there");
        drop(door);
        assert!(!uds.exists(), "the door removes its socket");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
