//! Snapshots, restores and live migration, measured:
//!
//! 1. Snapshot and restore against guest RAM (64 MiB to 1 GiB, all of it but the
//!    first 32 MiB written by the guest): how long the guest is paused, the whole
//!    snapshot, the pages written, and the restore (state read, memory mapped
//!    copy-on-write, devices and vCPUs put back, threads started; the median and the
//!    largest of 5) beside a fresh start of the same machine measured in the same run
//!    (its median of 5). The target: restore time flat whatever the RAM, at most 5 ms.
//! 2. Live migration over localhost TCP of a 256 MiB guest dirtying 0, 1,000 and
//!    10,000 pages per second: total time, pre-copy rounds, pages sent, downtime (from
//!    the pause to the destination running), beside the time plain TCP takes to carry
//!    the guest's written memory once on the same link. The target: downtime at most
//!    50 ms at 10,000 pages per second. Where `qemu-system-x86_64` is installed, QEMU
//!    migrates a 256 MiB VM of its own on the same link, its RAM filled from 16 MiB on
//!    with the same amount of data (its loader device) and its vCPU idle in the
//!    firmware, with no bandwidth limit: the reference for the 0 pages/s row (QEMU's
//!    own total time and downtime, from `query-migrate`).
//!
//! ```text
//! cargo bench --bench migration
//! ```

mod common;

use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use vmcraft::builder::MachineBuilder;
use vmcraft::devices::serial::SharedBuffer;
use vmcraft::machine::Machine;
use vmcraft::migration::wire::Message;
use vmcraft::migration::{
    Channel, IncomingOptions, Limits, MigrationAuth, MigrationOptions, PEER_TIMEOUT,
};
use vmcraft::vcpu::VcpuConfig;
use vmcraft_guest_kit::Guest;

fn auth() -> MigrationAuth {
    MigrationAuth::shared_secret(b"the benchmark's secret, 32 bytes or more".to_vec())
        .expect("a long secret")
}

/// The host TSC's rate in MHz (the guest's runs at the same rate).
fn tsc_mhz() -> u64 {
    // SAFETY: rdtsc has no preconditions on x86-64.
    let t0 = unsafe { core::arch::x86_64::_rdtsc() };
    let start = Instant::now();
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: as above.
    let t1 = unsafe { core::arch::x86_64::_rdtsc() };
    ((t1 - t0) as f64 / start.elapsed().as_secs_f64() / 1e6) as u64
}

/// A dirtier guest over all but the first 32 MiB of `ram_mib`, at `rate` pages/s;
/// returns once it has written its whole span.
fn dirtier(ram_mib: u64, rate: u64, mhz: u64) -> (Machine, SharedBuffer) {
    let serial = SharedBuffer::new();
    let mut b = MachineBuilder::new(ram_mib << 20, Box::new(serial.clone())).expect("machine");
    let guest = Guest::DIRTIER;
    b.load(guest.image()).expect("load");
    let param = rate | (ram_mib - 32) << 24 | mhz << 40;
    let m = b
        .start(&[VcpuConfig::at(guest.entry(0, param))])
        .expect("start");
    let start = Instant::now();
    while !String::from_utf8_lossy(&serial.contents()).contains("filled") {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the guest never filled its span"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    (m, serial)
}

/// Restores (and fresh starts) measured per RAM size.
const RESTORES: usize = 5;

/// The median and the largest of `times`.
fn median_and_max(times: &mut [Duration]) -> (Duration, Duration) {
    times.sort();
    (times[times.len() / 2], times[times.len() - 1])
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn snapshots(mhz: u64) {
    println!("snapshot and restore against guest RAM (all but 32 MiB written by the guest)");
    println!(
        "{:>8} {:>10} {:>12} {:>14} {:>12} {:>12} {:>14} {:>10}",
        "RAM MiB",
        "pause ms",
        "snapshot ms",
        "pages written",
        "restore ms",
        "restore max",
        "fresh start ms",
        "restore/fresh"
    );
    let dir = std::env::temp_dir().join(format!("vmcraft-bench-snapshot-{}", std::process::id()));
    let only = common::row_filter();
    for ram in [64u64, 256, 1024] {
        if !only(&format!("snapshot {ram}")) {
            continue;
        }
        let (m, _) = dirtier(ram, 0, mhz);
        let report = m.snapshot(&dir).expect("snapshot");
        drop(m);
        // The restore: state read, memory mapped, everything put back, vCPUs started;
        // and a fresh start of the same machine for reference. Each RESTORES times,
        // alternating, the median kept (a host's VM teardown and writeback land on
        // one now and then).
        let mut restores = Vec::new();
        let mut fresh_starts = Vec::new();
        for _ in 0..RESTORES {
            let t = Instant::now();
            let (b, saved) =
                MachineBuilder::from_snapshot(&dir, Box::new(std::io::sink())).expect("read");
            let restored = b.start_restored(&saved).expect("restore");
            restores.push(t.elapsed());
            drop(restored);
            let t = Instant::now();
            let mut b = MachineBuilder::new(ram << 20, Box::new(std::io::sink())).expect("machine");
            b.load(Guest::DIRTIER.image()).expect("load");
            let fresh = b
                .start(&[VcpuConfig::at(Guest::DIRTIER.entry(0, 0))])
                .expect("start");
            fresh_starts.push(t.elapsed());
            drop(fresh);
        }
        let (restore, restore_max) = median_and_max(&mut restores);
        let (fresh_time, _) = median_and_max(&mut fresh_starts);
        println!(
            "{:>8} {:>10.2} {:>12.1} {:>14} {:>12.2} {:>12.2} {:>14.2} {:>10.2}",
            ram,
            ms(report.pause),
            ms(report.total),
            report.memory.written,
            ms(restore),
            ms(restore_max),
            ms(fresh_time),
            restore.as_secs_f64() / fresh_time.as_secs_f64()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// How long plain TCP on localhost takes to carry `bytes`, in 1 MiB writes.
fn tcp_reference(bytes: u64) -> Duration {
    let l = TcpListener::bind("127.0.0.1:0").expect("listen");
    let addr = l.local_addr().expect("address");
    let reader = std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        std::io::copy(&mut s, &mut std::io::sink()).expect("read")
    });
    let mut s = TcpStream::connect(addr).expect("connect");
    let buf = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        std::io::Write::write_all(&mut s, &buf[..n]).expect("write");
        left -= n as u64;
    }
    drop(s);
    reader.join().expect("reader");
    t.elapsed()
}

/// How long the migration's channel (Noise, ChaCha20-Poly1305) takes to carry `bytes`
/// of pages over localhost TCP, in PAGES messages of 15 pages, received and
/// authenticated at the other end.
fn channel_reference(bytes: u64) -> Duration {
    let l = TcpListener::bind("127.0.0.1:0").expect("listen");
    let addr = l.local_addr().expect("address");
    let limits = Limits {
        peer: PEER_TIMEOUT,
        handshake: PEER_TIMEOUT,
        deadline: None,
    };
    let runs = bytes / (15 * 4096);
    let reader = std::thread::spawn(move || {
        let (s, _) = l.accept().expect("accept");
        let mut c = Channel::respond(s, &auth(), limits).expect("handshake");
        for _ in 0..runs {
            assert!(matches!(c.recv().expect("record"), Message::Pages { .. }));
        }
    });
    let mut c = Channel::initiate(TcpStream::connect(addr).expect("connect"), &auth(), limits)
        .expect("handshake");
    let pages = vec![0x5au8; 15 * 4096];
    let t = Instant::now();
    for i in 0..runs {
        c.send(&Message::Pages {
            addr: i * 15 * 4096,
            data: &pages,
        })
        .expect("send");
    }
    c.flush().expect("flush");
    reader.join().expect("reader");
    t.elapsed()
}

fn migrations(mhz: u64) {
    const RAM: u64 = 256;
    println!();
    println!(
        "live migration over localhost TCP, {RAM} MiB guest ({} MiB written by it)",
        RAM - 32
    );
    println!(
        "{:>12} {:>10} {:>7} {:>12} {:>12} {:>12} {:>16}",
        "dirty pg/s",
        "total ms",
        "rounds",
        "pages sent",
        "downtime ms",
        "final pages",
        "TCP floor ms"
    );
    let floor = tcp_reference((RAM - 32) << 20);
    let sealed = channel_reference((RAM - 32) << 20);
    println!(
        "the channel (Noise_XXpsk3_25519_ChaChaPoly_SHA256) carries the {} MiB in {:.1} ms, plain TCP in {:.1} ms: {:.2}x",
        RAM - 32,
        ms(sealed),
        ms(floor),
        sealed.as_secs_f64() / floor.as_secs_f64()
    );
    let only = common::row_filter();
    for rate in [0u64, 1_000, 10_000] {
        if !only(&format!("migrate {rate}")) {
            continue;
        }
        let (src, _) = dirtier(RAM, rate, mhz);
        // Let the rate settle.
        std::thread::sleep(Duration::from_millis(200));
        let l = TcpListener::bind("127.0.0.1:0").expect("listen");
        let addr = l.local_addr().expect("address");
        let dst = std::thread::spawn(move || {
            let (s, _) = l.accept().expect("accept");
            let (b, incoming) = MachineBuilder::accept_migration(
                s,
                &auth(),
                &IncomingOptions::new(RAM << 20),
                Box::new(std::io::sink()),
            )
            .expect("receive");
            incoming.start(b).expect("start")
        });
        let report = src
            .migrate(
                TcpStream::connect(addr).expect("connect"),
                &auth(),
                MigrationOptions::default(),
            )
            .expect("migrate");
        let dst = dst.join().expect("destination");
        drop(dst);
        drop(src);
        println!(
            "{:>12} {:>10.1} {:>7} {:>12} {:>12.2} {:>12} {:>16.1}",
            rate,
            ms(report.total),
            report.rounds.len(),
            report.pages_sent(),
            ms(report.downtime),
            report.final_pages,
            ms(floor)
        );
    }
}

/// One QMP command on a connected monitor; returns the reply line.
fn qmp(stream: &mut std::io::BufReader<std::os::unix::net::UnixStream>, command: &str) -> String {
    use std::io::{BufRead, Write};
    stream
        .get_mut()
        .write_all(format!("{command}\n").as_bytes())
        .expect("QMP write");
    loop {
        let mut line = String::new();
        stream.read_line(&mut line).expect("QMP read");
        if line.contains("\"return\"") || line.contains("\"error\"") || line.is_empty() {
            return line;
        }
    }
}

/// The number after `"key":` in a JSON line.
fn json_number(line: &str, key: &str) -> Option<f64> {
    let at = line.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = line[at..].trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// QEMU migrating an idle 256 MiB VM whose RAM holds `filled` bytes of data from
/// 16 MiB on: (total ms, downtime ms) as QEMU reports them.
fn qemu_reference(filled: u64) -> Option<(f64, f64)> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let dir = std::env::temp_dir().join(format!("vmcraft-bench-qemu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).ok()?;
    let fill = dir.join("fill.bin");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&fill).ok()?);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..filled / 8 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            f.write_all(&x.to_le_bytes()).ok()?;
        }
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let qemu = |monitor: &std::path::Path, incoming: bool| {
        let mut c = Command::new("qemu-system-x86_64");
        c.args([
            "-accel",
            "kvm",
            "-m",
            "256M",
            "-display",
            "none",
            "-nodefaults",
        ])
        .arg("-device")
        .arg(format!(
            "loader,file={},addr=0x1000000,force-raw=on",
            fill.display()
        ))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", monitor.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        if incoming {
            c.arg("-incoming").arg(format!("tcp:127.0.0.1:{port}"));
        }
        c.spawn()
    };
    let (src_mon, dst_mon) = (dir.join("src.sock"), dir.join("dst.sock"));
    let mut dst = qemu(&dst_mon, true).ok()?;
    let mut src = qemu(&src_mon, false).ok()?;
    let connect = |path: &std::path::Path| {
        let start = Instant::now();
        loop {
            if let Ok(s) = std::os::unix::net::UnixStream::connect(path) {
                let mut r = std::io::BufReader::new(s);
                let mut greeting = String::new();
                std::io::BufRead::read_line(&mut r, &mut greeting).ok()?;
                qmp(&mut r, r#"{"execute":"qmp_capabilities"}"#);
                return Some(r);
            }
            if start.elapsed() > Duration::from_secs(20) {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let result = (|| {
        let mut mon = connect(&src_mon)?;
        connect(&dst_mon)?;
        // Let the firmware settle into its idle loop.
        std::thread::sleep(Duration::from_millis(500));
        qmp(
            &mut mon,
            r#"{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":1099511627776}}"#,
        );
        qmp(
            &mut mon,
            &format!(r#"{{"execute":"migrate","arguments":{{"uri":"tcp:127.0.0.1:{port}"}}}}"#),
        );
        let start = Instant::now();
        loop {
            let line = qmp(&mut mon, r#"{"execute":"query-migrate"}"#);
            if line.contains("\"completed\"") {
                return Some((
                    json_number(&line, "total-time")?,
                    json_number(&line, "downtime")?,
                ));
            }
            if line.contains("\"failed\"") || start.elapsed() > Duration::from_secs(60) {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    })();
    let _ = src.kill();
    let _ = dst.kill();
    let _ = src.wait();
    let _ = dst.wait();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn main() {
    common::require_kvm("migration");
    let mhz = tsc_mhz();
    snapshots(mhz);
    migrations(mhz);
    if common::row_filter()("qemu") {
        match qemu_reference(224 << 20) {
            Some((total, downtime)) => println!(
                "{:>12} {:>10.1} {:>7} {:>12} {:>12.2} {:>12} {:>16}",
                "QEMU, 0", total, "", "", downtime, "", "(QEMU's figures)"
            ),
            None => {
                println!("(no QEMU reference: qemu-system-x86_64 with KVM is not available here)")
            }
        }
    }
}
