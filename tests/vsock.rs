//! virtio-vsock on real KVM with a guest that is its own small driver
//! (`Guest::VIRTIO_VSOCK`), the host side as Firecracker's (Unix sockets): a session
//! both ways through credit exhaustion, a port nobody listens on, many connections,
//! the host connecting in; a guest that holds a connection across 1,000 snapshot
//! restores and reconnects after each (one of them with a new context id), then two
//! clones of one snapshot at once, each with its own context id and socket;
//! and the same guest migrated while its connection streams.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use vmcraft::builder::MachineBuilder;
use vmcraft::devices::serial::SharedBuffer;
use vmcraft::devices::virtio::vsock::device::Vsock;
use vmcraft::devices::virtio::vsock::door::{BoundSocket, Door};
use vmcraft::devices::virtio::vsock::hybrid::{self, listener_path};
use vmcraft::devices::virtio::vsock::muxer::Limits;
use vmcraft::machine::Machine;
use vmcraft::vcpu::VcpuConfig;
use vmcraft_guest_kit::Guest;

/// A scratch directory, removed with everything in it.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("vmcraft-vsock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One connection the echo listener took: bytes echoed, and whether its peer closed.
#[derive(Default)]
struct Echoed {
    bytes: AtomicU64,
    closed: AtomicBool,
}

/// An echo listener at `<uds>_1234`: each connection on its own thread, every byte
/// written back.
struct Echo {
    connections: Arc<Mutex<Vec<Arc<Echoed>>>>,
}

impl Echo {
    fn start(uds: &Path) -> Echo {
        let listener = UnixListener::bind(listener_path(uds, 1234)).unwrap();
        let connections: Arc<Mutex<Vec<Arc<Echoed>>>> = Arc::default();
        let list = connections.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let echoed = Arc::new(Echoed::default());
                list.lock().unwrap().push(echoed.clone());
                std::thread::spawn(move || {
                    let mut buf = [0u8; 8192];
                    loop {
                        match stream.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if stream.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                                echoed.bytes.fetch_add(n as u64, Ordering::SeqCst);
                            }
                        }
                    }
                    echoed.closed.store(true, Ordering::SeqCst);
                });
            }
        });
        Echo { connections }
    }

    fn count(&self) -> usize {
        self.connections.lock().unwrap().len()
    }

    fn nth(&self, i: usize) -> Option<Arc<Echoed>> {
        self.connections.lock().unwrap().get(i).cloned()
    }

    /// Wait until connection `i` exists and has echoed at least `bytes`.
    fn wait_for(&self, i: usize, bytes: u64) -> bool {
        eventually(30, || {
            self.nth(i)
                .is_some_and(|c| c.bytes.load(Ordering::SeqCst) >= bytes)
        })
    }
}

fn vsock(cid: u64, uds: &Path) -> Box<Vsock> {
    let door = Door::open(BoundSocket::bind(uds).unwrap()).unwrap();
    Box::new(Vsock::new(cid, Arc::new(door), Limits::default(), "vsock").unwrap())
}

fn pattern(salt: u8, i: usize) -> u8 {
    (i as u8).wrapping_mul(7).wrapping_add(salt)
}

#[test]
fn a_guest_talks_to_the_host_both_ways_within_its_credit() {
    let dir = Dir::new("session");
    let uds = dir.0.join("v.sock");
    let echo = Echo::start(&uds);
    let vm = start_virtio_vm(Guest::VIRTIO_VSOCK, 0, vec![vsock(3, &uds)]);
    assert!(
        eventually(60, || String::from_utf8_lossy(&vm.serial.contents())
            .contains("listening")),
        "{}",
        String::from_utf8_lossy(&vm.serial.contents())
    );
    // The host connects to the guest's port 5000 through the device's socket.
    let (mut stream, host_port) = hybrid::connect(&uds, 5000).expect("the guest accepts");
    assert!(host_port >= 1 << 30, "host port {host_port}");
    let sent: Vec<u8> = (0..4096).map(|i| pattern(0x55, i)).collect();
    stream.write_all(&sent).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut back = vec![0u8; 4096];
    stream.read_exact(&mut back).unwrap();
    assert_eq!(back, sent, "the guest's echo");
    drop(stream);
    let VirtioVm {
        running,
        serial,
        transports,
    } = vm;
    drop(transports);
    finish(running, &serial, "the vsock session");
    assert!(String::from_utf8_lossy(&serial.contents()).contains("vsock ok"));
    // The stream of 256 KiB, then 32 at once of 1000 bytes each.
    assert_eq!(echo.count(), 33);
    assert_eq!(echo.nth(0).unwrap().bytes.load(Ordering::SeqCst), 256 << 10);
    for i in 1..33 {
        assert_eq!(echo.nth(i).unwrap().bytes.load(Ordering::SeqCst), 1000);
    }
    assert!(
        !uds.exists(),
        "the device's socket is removed with the machine"
    );
}

/// A client that never sends its `CONNECT` line, one that asks for a port nobody
/// listens on, and a garbage line: each is closed, the device serves on.
#[test]
fn host_clients_that_misbehave_are_closed_and_the_device_serves_on() {
    let dir = Dir::new("clients");
    let uds = dir.0.join("v.sock");
    let _echo = Echo::start(&uds);
    let vm = start_virtio_vm(Guest::VIRTIO_VSOCK, 0, vec![vsock(3, &uds)]);
    assert!(eventually(60, || String::from_utf8_lossy(
        &vm.serial.contents()
    )
    .contains("listening")));
    let closed = |mut s: UnixStream| {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 64];
        matches!(s.read(&mut b), Ok(0) | Err(_))
    };
    let mut garbage = UnixStream::connect(&uds).unwrap();
    garbage.write_all(b"HELLO there\n").unwrap();
    assert!(
        closed(garbage),
        "a line that is not CONNECT closes the stream"
    );
    let mut long = UnixStream::connect(&uds).unwrap();
    long.write_all(&[b'1'; 100]).unwrap();
    assert!(closed(long), "a line past 32 bytes closes the stream");
    assert!(
        hybrid::connect(&uds, 7).is_err(),
        "a port the guest does not listen on is refused"
    );
    let silent = UnixStream::connect(&uds).unwrap();
    // The guest still takes its connection.
    let (mut stream, _) = hybrid::connect(&uds, 5000).expect("the guest accepts");
    let sent: Vec<u8> = (0..4096).map(|i| pattern(0x55, i)).collect();
    stream.write_all(&sent).unwrap();
    let mut back = vec![0u8; 4096];
    stream.read_exact(&mut back).unwrap();
    assert_eq!(back, sent);
    drop(stream);
    finish(vm.running, &vm.serial, "the vsock session");
    drop(silent);
}

/// Restore `dir`'s snapshot with a vsock of context id `cid` at `uds`.
fn restore(dir: &Path, cid: u64, uds: &Path, serial: &SharedBuffer) -> Machine {
    let (mut b, saved) = MachineBuilder::from_snapshot(dir, Box::new(serial.clone())).unwrap();
    b.add_virtio(vsock(cid, uds)).unwrap();
    b.start_restored(&saved).unwrap()
}

#[test]
fn a_guest_reconnects_after_each_of_1000_restores() {
    const CYCLES: usize = 1000;
    let dir = Dir::new("restores");
    let uds = dir.0.join("v.sock");
    let snaps = [dir.0.join("a"), dir.0.join("b")];
    let echo = Echo::start(&uds);
    let serial = SharedBuffer::new();
    let mut b = machine_builder(16 << 20, Box::new(serial.clone()));
    b.add_virtio(vsock(3, &uds)).unwrap();
    let guest = Guest::VIRTIO_VSOCK;
    b.load(guest.image()).unwrap();
    let mut m = b.start(&[VcpuConfig::at(guest.entry(0, 1))]).unwrap();
    assert!(echo.wait_for(0, 8), "the agent's first connection");
    for cycle in 0..CYCLES {
        let snap = &snaps[cycle % 2];
        m.snapshot(snap).unwrap();
        drop(m);
        // Halfway, a clone with a context id of its own.
        let cid = if cycle == CYCLES / 2 { 4 } else { 3 };
        m = restore(snap, cid, &uds, &serial);
        assert!(
            echo.wait_for(cycle + 1, 8),
            "cycle {cycle}: no new connection echoing ({} connections; the VM: {:?}); {}",
            echo.count(),
            m.stop_reason(),
            String::from_utf8_lossy(&serial.contents())
        );
        // The connection of the machine before it is closed on the host side.
        assert!(
            eventually(10, || echo
                .nth(cycle)
                .unwrap()
                .closed
                .load(Ordering::SeqCst)),
            "cycle {cycle}: the old connection is still open"
        );
    }
    assert_eq!(echo.count(), CYCLES + 1, "one connection per run, no more");
    assert_eq!(m.stop_reason(), None, "the agent never failed a reconnect");
    // Two clones of one snapshot running at once, each with a context id and a
    // socket of its own: each reconnects through its own.
    m.snapshot(&snaps[0]).unwrap();
    drop(m);
    assert!(!uds.exists());
    let clones: Vec<_> = [(5, "a.sock"), (6, "b.sock")]
        .into_iter()
        .map(|(cid, name)| {
            let uds = dir.0.join(name);
            let echo = Echo::start(&uds);
            let serial = SharedBuffer::new();
            let m = restore(&snaps[0], cid, &uds, &serial);
            (m, echo, uds, serial)
        })
        .collect();
    for (m, echo, _, serial) in &clones {
        assert!(
            echo.wait_for(0, 8),
            "a clone did not reconnect ({:?}): {}",
            m.stop_reason(),
            String::from_utf8_lossy(&serial.contents())
        );
    }
    for (m, _, uds, _) in clones {
        drop(m);
        assert!(!uds.exists());
    }
}

#[test]
fn a_guest_streaming_through_a_migration_reconnects_at_the_destination() {
    use std::net::{TcpListener, TcpStream};
    use vmcraft::migration::{IncomingOptions, MigrationAuth, MigrationOptions};
    let dir = Dir::new("migration");
    let (src_uds, dst_uds) = (dir.0.join("src.sock"), dir.0.join("dst.sock"));
    // Both machines' guests reach the same service (one echo per socket name).
    let src_echo = Echo::start(&src_uds);
    let dst_echo = Echo::start(&dst_uds);
    let serial = SharedBuffer::new();
    let mut b = machine_builder(16 << 20, Box::new(serial.clone()));
    b.add_virtio(vsock(3, &src_uds)).unwrap();
    let guest = Guest::VIRTIO_VSOCK;
    b.load(guest.image()).unwrap();
    let src = b.start(&[VcpuConfig::at(guest.entry(0, 1))]).unwrap();
    assert!(src_echo.wait_for(0, 8 * 100), "the agent streams");
    let auth = || {
        MigrationAuth::shared_secret(b"a secret both VMMs were given, 32 bytes".to_vec()).unwrap()
    };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dst_serial = SharedBuffer::new();
    let (dst_uds2, dst_serial2) = (dst_uds.clone(), dst_serial.clone());
    let dst = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        sandboxed();
        let (mut b, incoming) = MachineBuilder::accept_migration(
            stream,
            &auth(),
            &IncomingOptions::new(16 << 20),
            Box::new(dst_serial2),
        )
        .unwrap();
        b.add_virtio(vsock(3, &dst_uds2)).unwrap();
        incoming.start(b).unwrap()
    });
    src.migrate(
        TcpStream::connect(addr).unwrap(),
        &auth(),
        MigrationOptions::default(),
    )
    .unwrap();
    let before = src_echo.nth(0).unwrap().bytes.load(Ordering::SeqCst);
    drop(src);
    let dst = dst.join().unwrap();
    // The source's stream ends where the host side sees it (end of file), never
    // left hanging; the agent at the destination connects again and streams on.
    assert!(eventually(10, || src_echo
        .nth(0)
        .unwrap()
        .closed
        .load(Ordering::SeqCst)));
    assert_eq!(src_echo.count(), 1);
    assert!(
        dst_echo.wait_for(0, 8 * 100),
        "the agent streams at the destination: {}",
        String::from_utf8_lossy(&dst_serial.contents())
    );
    assert!(before >= 8 * 100);
    assert_eq!(dst.stop_reason(), None);
    drop(dst);
    assert!(!src_uds.exists() && !dst_uds.exists());
}
