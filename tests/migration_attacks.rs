//! The migration under attack, on real KVM: a proxy between two machines that flips,
//! drops, reorders, replays, injects and truncates the channel's records in either
//! direction, fake peers on each side, and authenticated peers that lie. Every case
//! ends with exactly one guest running to its correct end (the memcheck guest checks
//! all its memory), or, when the hand-over's outcome cannot be known, a paused source
//! and an error that says so.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use vmcraft::builder::MachineBuilder;
use vmcraft::devices::serial::SharedBuffer;
use vmcraft::machine::Machine;
use vmcraft::migration::wire::Message;
use vmcraft::migration::{
    Channel, IncomingOptions, Limits, MigrationAuth, MigrationError, MigrationOptions,
};
use vmcraft_guest_kit::memcheck_output;

const MIB: u64 = 16;
/// Long enough that the guest outlives a migration through the proxy.
const ROUNDS: u64 = 600;
const RAM: u64 = (MIB + 32) << 20;
/// Short enough that a dropped record ends a case quickly.
const PEER: Duration = Duration::from_secs(3);

/// What an undisturbed memcheck run prints (computed once).
fn expected() -> &'static str {
    static EXPECTED: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    EXPECTED.get_or_init(|| memcheck_output(MIB, ROUNDS))
}

fn auth() -> MigrationAuth {
    MigrationAuth::shared_secret(vec![0x42; 32]).unwrap()
}

fn options() -> MigrationOptions {
    MigrationOptions {
        peer_timeout: PEER,
        handshake_timeout: PEER,
        ..MigrationOptions::default()
    }
}

fn incoming() -> IncomingOptions {
    IncomingOptions {
        peer_timeout: PEER,
        handshake_timeout: PEER,
        ..IncomingOptions::new(RAM)
    }
}

fn listener() -> (TcpListener, std::net::SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

/// What the proxy does to one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Flip a bit of it.
    Flip,
    /// Leave it out.
    Drop,
    /// Send it after the next one.
    Swap,
    /// Send it twice.
    Replay,
    /// Send a record of random bytes before it.
    Inject,
    /// Send half of it, then close both connections.
    Truncate,
}

/// Which record: the `n`th (from 0, handshake included) going `to_destination` or
/// back, or the first source-to-destination record after the destination's READY
/// (the COMMIT).
#[derive(Debug, Clone, Copy)]
enum Target {
    ToDestination(usize),
    ToSource(usize),
    Commit,
}

/// Records going back: 0 the handshake's second message, 1 HELLO, 2 READY, 3 STARTED.
const READY: usize = 2;
const STARTED: usize = 3;

fn read_record(from: &mut TcpStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 2];
    from.read_exact(&mut len).ok()?;
    let mut record = len.to_vec();
    record.resize(2 + u16::from_be_bytes(len) as usize, 0);
    from.read_exact(&mut record[2..]).ok()?;
    Some(record)
}

/// A proxy that applies `action` to `target`; returns the address the source should
/// connect to, and the listener the destination should accept on.
fn tampering_proxy(target: Target, action: Action) -> (std::net::SocketAddr, TcpListener) {
    let (front, front_addr) = listener();
    let (back, back_addr) = listener();
    std::thread::spawn(move || {
        let (src, _) = front.accept().unwrap();
        let dst = TcpStream::connect(back_addr).unwrap();
        let ready_passed = Arc::new(AtomicBool::new(false));
        let pump = |mut from: TcpStream,
                    mut to: TcpStream,
                    forward: bool,
                    ready: Arc<AtomicBool>| {
            move || {
                let mut n = 0usize;
                let mut held: Option<Vec<u8>> = None;
                let mut after_ready = 0usize;
                while let Some(mut record) = read_record(&mut from) {
                    let hit = match target {
                        Target::ToDestination(i) => forward && i == n,
                        Target::ToSource(i) => !forward && i == n,
                        Target::Commit => {
                            forward && ready.load(Ordering::SeqCst) && after_ready == 0
                        }
                    };
                    if forward && ready.load(Ordering::SeqCst) {
                        after_ready += 1;
                    }
                    n += 1;
                    // Marked before READY goes on, so the COMMIT it draws is seen after.
                    if !forward && n == READY + 1 {
                        ready.store(true, Ordering::SeqCst);
                    }
                    let mut out: Vec<Vec<u8>> = Vec::new();
                    if hit {
                        match action {
                            Action::Flip => {
                                let last = record.len() - 1;
                                record[last / 2 + 1] ^= 0x10;
                                out.push(record);
                            }
                            Action::Drop => {}
                            Action::Swap => held = Some(record),
                            Action::Replay => {
                                out.push(record.clone());
                                out.push(record);
                            }
                            Action::Inject => {
                                let mut junk = 64u16.to_be_bytes().to_vec();
                                junk.extend(std::iter::repeat_with(|| fastrand::u8(..)).take(64));
                                out.push(junk);
                                out.push(record);
                            }
                            Action::Truncate => {
                                let _ = to.write_all(&record[..record.len() / 2]);
                                let _ = to.shutdown(std::net::Shutdown::Both);
                                let _ = from.shutdown(std::net::Shutdown::Both);
                                return;
                            }
                        }
                    } else {
                        out.push(record);
                        if let Some(h) = held.take() {
                            out.push(h);
                        }
                    }
                    for r in out {
                        if to.write_all(&r).is_err() {
                            return;
                        }
                    }
                }
                let _ = to.shutdown(std::net::Shutdown::Write);
            }
        };
        let back_pump = std::thread::spawn(pump(
            dst.try_clone().unwrap(),
            src.try_clone().unwrap(),
            false,
            ready_passed.clone(),
        ));
        pump(src, dst, true, ready_passed)();
        let _ = back_pump.join();
    });
    (front_addr, back)
}

struct Case {
    src: Machine,
    src_serial: SharedBuffer,
    result: Result<vmcraft::migration::MigrationReport, MigrationError>,
    dst: Result<Machine, MigrationError>,
    dst_serial: SharedBuffer,
}

/// Migrate a running memcheck guest through a proxy doing `action` to `target`.
fn attacked(target: Target, action: Action) -> Case {
    let src_serial = SharedBuffer::new();
    let src = start_memcheck(&src_serial, MIB, ROUNDS);
    assert!(eventually(60, || src_serial.contents().len() > 2 * 40));
    let (addr, back) = tampering_proxy(target, action);
    let dst_serial = SharedBuffer::new();
    let out = dst_serial.clone();
    let dst = std::thread::spawn(move || {
        let (stream, _) = back.accept().unwrap();
        sandboxed();
        let (b, incoming) =
            MachineBuilder::accept_migration(stream, &auth(), &incoming(), Box::new(out))?;
        incoming.start(b)
    });
    let result = src.migrate(TcpStream::connect(addr).unwrap(), &auth(), options());
    Case {
        src,
        src_serial,
        result,
        dst: dst.join().unwrap(),
        dst_serial,
    }
}

/// The migration failed before the hand-over: the source runs on to the correct end,
/// the destination has nothing.
fn source_runs_on(case: Case, what: &str) -> (MigrationError, MigrationError) {
    let Case {
        src,
        src_serial,
        result,
        dst,
        ..
    } = case;
    let src_err = result.expect_err(what);
    assert!(
        !matches!(src_err, MigrationError::Uncertain(_)),
        "{what}: {src_err}"
    );
    let dst_err = dst.expect_err(what);
    finish(src, &src_serial, what);
    assert_eq!(
        String::from_utf8_lossy(&src_serial.contents()),
        expected(),
        "{what}"
    );
    (src_err, dst_err)
}

fn tampered(e: &MigrationError) -> bool {
    matches!(e, MigrationError::Tampered { .. })
}

#[test]
fn a_changed_dropped_reordered_replayed_or_injected_record_to_the_destination_ends_it_and_the_source_runs_on(
) {
    for action in [
        Action::Flip,
        Action::Drop,
        Action::Swap,
        Action::Replay,
        Action::Inject,
    ] {
        // Record 2 is INFO, 40 a page run of the first round.
        for record in [2, 40] {
            let what = format!("{action:?} record {record} to the destination");
            let (src_err, dst_err) =
                source_runs_on(attacked(Target::ToDestination(record), action), &what);
            assert!(tampered(&dst_err), "{what}: the destination said {dst_err}");
            // The destination said why, and the source heard it (or saw it close).
            assert!(
                matches!(
                    src_err,
                    MigrationError::Aborted(_)
                        | MigrationError::Closed(_)
                        | MigrationError::Connection { .. }
                ),
                "{what}: the source said {src_err}"
            );
        }
    }
}

#[test]
fn a_stream_truncated_mid_record_ends_the_migration_and_the_source_runs_on() {
    let (src_err, dst_err) = source_runs_on(
        attacked(Target::ToDestination(100), Action::Truncate),
        "truncated",
    );
    assert!(matches!(dst_err, MigrationError::Closed(_)), "{dst_err}");
    assert!(
        matches!(
            src_err,
            MigrationError::Closed(_) | MigrationError::Connection { .. }
        ),
        "{src_err}"
    );
}

#[test]
fn a_handshake_message_changed_or_a_hello_forged_is_refused_before_anything_moves() {
    for (target, what) in [
        (Target::ToDestination(0), "the first handshake message"),
        (Target::ToSource(0), "the second handshake message"),
        (Target::ToDestination(1), "the third handshake message"),
        (Target::ToSource(1), "HELLO"),
    ] {
        let (src_err, _) = source_runs_on(attacked(target, Action::Flip), what);
        assert!(
            matches!(
                src_err,
                MigrationError::NotAuthenticated
                    | MigrationError::Closed(_)
                    | MigrationError::Connection { .. }
            ),
            "{what}: {src_err}"
        );
    }
}

#[test]
fn a_changed_or_lost_ready_makes_the_source_resume_and_the_destination_discard() {
    for action in [Action::Flip, Action::Drop] {
        let what = format!("{action:?} READY");
        let (src_err, dst_err) = source_runs_on(attacked(Target::ToSource(READY), action), &what);
        assert!(
            tampered(&src_err) || matches!(src_err, MigrationError::TimedOut(_)),
            "{what}: {src_err}"
        );
        // The source told the destination it gives up, or the destination timed out.
        assert!(
            matches!(
                dst_err,
                MigrationError::Aborted(_) | MigrationError::TimedOut(_)
            ),
            "{what}: {dst_err}"
        );
    }
}

/// STARTED changed or lost: the guest runs at the destination; the source cannot know
/// it and stays paused, saying so.
#[test]
fn a_lost_started_leaves_the_guest_at_the_destination_and_the_source_paused() {
    for action in [Action::Flip, Action::Drop] {
        let case = attacked(Target::ToSource(STARTED), action);
        let err = case.result.expect_err("the source cannot know");
        assert!(matches!(err, MigrationError::Uncertain(_)), "{err}");
        assert!(err.to_string().contains("stays paused"), "{err}");
        let before = case.src_serial.contents();
        // The destination runs the guest to its correct end...
        let dst = case.dst.expect("the destination runs");
        finish(dst, &case.dst_serial, "the destination");
        let mut whole = before.clone();
        whole.extend(case.dst_serial.contents());
        assert_eq!(String::from_utf8_lossy(&whole), expected());
        // ... while the source has stayed paused all along.
        assert!(case.src.stop_reason().is_none());
        assert_eq!(case.src_serial.contents(), before, "the source ran on");
    }
}

/// COMMIT lost: the destination never runs the guest, the source cannot know it and
/// stays paused; the operator resumes it and the guest goes on, nothing lost.
#[test]
fn a_lost_commit_runs_nothing_at_the_destination_and_leaves_the_source_to_the_operator() {
    let case = attacked(Target::Commit, Action::Drop);
    let err = case.result.expect_err("the source cannot know");
    assert!(matches!(err, MigrationError::Uncertain(_)), "{err}");
    let dst_err = case.dst.expect_err("no COMMIT, no guest");
    // It waited for COMMIT until its time ran out, or the source (whose time for
    // STARTED ran out about as soon) hung up.
    assert!(
        matches!(
            dst_err,
            MigrationError::TimedOut(_) | MigrationError::Closed(_)
        ),
        "{dst_err}"
    );
    assert!(case.dst_serial.contents().is_empty());
    let before = case.src_serial.contents();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(case.src_serial.contents(), before, "the source ran on");
    // The operator found the guest runs nowhere: resume it here.
    case.src.resume();
    finish(case.src, &case.src_serial, "the source, resumed");
    assert_eq!(
        String::from_utf8_lossy(&case.src_serial.contents()),
        expected()
    );
}

/// A fake destination: one that answers garbage, one that says nothing, one that
/// trickles. The source never pauses, gives up within its handshake limit, and runs on.
#[test]
fn fake_destinations_cannot_hold_or_fool_the_source() {
    let src_serial = SharedBuffer::new();
    let src = start_memcheck(&src_serial, MIB, ROUNDS);
    for behaviour in ["garbage", "silent", "trickle"] {
        let (l, addr) = listener();
        let fake = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            match behaviour {
                "garbage" => {
                    let _ = s.write_all(&[0, 48]);
                    let _ = s.write_all(&[0x55; 48]);
                    std::thread::sleep(Duration::from_secs(5));
                }
                "silent" => std::thread::sleep(Duration::from_secs(5)),
                _ => {
                    let _ = s.write_all(&[0, 200]);
                    for _ in 0..50 {
                        if s.write_all(&[1]).is_err() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        });
        let t = Instant::now();
        let err = src
            .migrate(TcpStream::connect(addr).unwrap(), &auth(), options())
            .unwrap_err();
        assert!(
            t.elapsed() < PEER + Duration::from_secs(2),
            "{behaviour}: {:?}",
            t.elapsed()
        );
        assert!(
            matches!(
                err,
                MigrationError::NotAuthenticated
                    | MigrationError::TimedOut(_)
                    | MigrationError::Protocol(_)
            ),
            "{behaviour}: {err}"
        );
        let _ = fake.join();
    }
    finish(src, &src_serial, "the source");
    assert_eq!(String::from_utf8_lossy(&src_serial.contents()), expected());
}

/// Strangers before the real source (junk, a wrong secret, one that connects and says
/// nothing): the destination drops each and takes the next; the real source migrates.
#[test]
fn the_destination_outlasts_strangers_and_takes_the_real_source() {
    let (l, addr) = listener();
    let dst_serial = SharedBuffer::new();
    let out = dst_serial.clone();
    let dst = std::thread::spawn(move || {
        sandboxed();
        let options = IncomingOptions {
            tries: 4,
            ..incoming()
        };
        let (b, incoming) =
            MachineBuilder::listen_for_migration(&l, &auth(), &options, || Box::new(out.clone()))?;
        incoming.start(b)
    });
    // Junk.
    let mut junk = TcpStream::connect(addr).unwrap();
    junk.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    // A wrong secret.
    let wrong = MigrationAuth::shared_secret(vec![7u8; 40]).unwrap();
    let err = Channel::initiate(
        TcpStream::connect(addr).unwrap(),
        &wrong,
        Limits {
            peer: PEER,
            handshake: PEER,
            deadline: None,
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            MigrationError::NotAuthenticated
                | MigrationError::Closed(_)
                | MigrationError::Connection { .. }
        ),
        "{err}"
    );
    // Silent: held only for the handshake's limit, which passes before the real
    // source comes.
    let _silent = TcpStream::connect(addr).unwrap();
    std::thread::sleep(PEER + Duration::from_millis(500));
    let src_serial = SharedBuffer::new();
    let src = start_memcheck(&src_serial, MIB, ROUNDS);
    assert!(eventually(60, || src_serial.contents().len() > 2 * 40));
    src.migrate(TcpStream::connect(addr).unwrap(), &auth(), options())
        .expect("the real source migrates");
    let before = src_serial.contents();
    let dst = dst.join().unwrap().expect("the destination runs");
    finish(dst, &dst_serial, "the destination");
    let mut whole = before;
    whole.extend(dst_serial.contents());
    assert_eq!(String::from_utf8_lossy(&whole), expected());
    drop(junk);
}

/// A source that holds the secret but lies: about the RAM, with pages outside it,
/// with a state larger than the machine can hold. Each is refused before anything is
/// allocated for it, with an error naming it.
#[test]
fn an_authenticated_source_that_lies_is_refused_within_bounds() {
    let limits = Limits {
        peer: PEER,
        handshake: PEER,
        deadline: None,
    };
    let page = vec![0xaa; 4096];
    type Lie = Box<dyn Fn(&mut Channel<TcpStream>) + Send>;
    let lies: Vec<(&str, Lie)> = vec![
        (
            "3 GiB of RAM",
            Box::new(|c| {
                c.send(&Message::Info {
                    ram_bytes: 3 << 30,
                    vcpus: 1,
                })
                .unwrap()
            }),
        ),
        (
            "pages past the RAM",
            Box::new(move |c| {
                c.send(&Message::Info {
                    ram_bytes: RAM,
                    vcpus: 1,
                })
                .unwrap();
                c.send(&Message::Pages {
                    addr: 8 << 30,
                    data: &page,
                })
                .unwrap();
            }),
        ),
        (
            "1 GiB of state",
            Box::new(|c| {
                c.send(&Message::Info {
                    ram_bytes: RAM,
                    vcpus: 1,
                })
                .unwrap();
                c.send(&Message::State { len: 1 << 30 }).unwrap();
            }),
        ),
        (
            "COMMIT before anything",
            Box::new(|c| c.send(&Message::Commit).unwrap()),
        ),
    ];
    for (what, lie) in lies {
        let (l, addr) = listener();
        let dst = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            MachineBuilder::accept_migration(s, &auth(), &incoming(), Box::new(std::io::sink()))
                .map(|_| ())
        });
        let mut c = Channel::initiate(TcpStream::connect(addr).unwrap(), &auth(), limits).unwrap();
        lie(&mut c);
        c.flush().unwrap();
        let err = dst.join().unwrap().expect_err(what);
        let expected = match what {
            "3 GiB of RAM" => matches!(err, MigrationError::RamMismatch { .. }),
            "1 GiB of state" => matches!(err, MigrationError::StateTooLarge { .. }),
            _ => matches!(err, MigrationError::Protocol(_)),
        };
        assert!(expected, "{what}: {err}");
        // The source is told why.
        match c.recv() {
            Ok(Message::Abort(text)) => assert!(!text.is_empty(), "{what}"),
            other => panic!("{what}: {other:?}"),
        }
    }
}
