//! The Xen back ends (the xenstore, the xenbus vbd handshake, the blkif threads)
//! against a front end written here that talks to them as Linux's xenbus and
//! xen-blkfront do, with every backend thread under its seccomp filter (what a
//! thread may not do kills the test).

mod common;

use std::io::Write;
use std::sync::Arc;

use std::io::{Seek, SeekFrom};
use std::time::{Duration, Instant};
use vm_memory::Bytes;
use vm_memory::GuestAddress;
use vmcraft::memory::GuestMemory;
use vmcraft::memory::{layout::MemoryLayout, GuestRam};
use vmcraft::pv::blkif::{Request, Response, Segment, OP_READ};
use vmcraft::pv::evtchn::EventChannels;
use vmcraft::pv::evtchn::Upcall;
use vmcraft::pv::grant::GrantTable;
use vmcraft::pv::grant::GTF_PERMIT_ACCESS;
use vmcraft::pv::hvm::{param, HvmParams};
use vmcraft::pv::hvm::{Callback, UpcallRoute};
use vmcraft::pv::ring::FrontRing;
use vmcraft::pv::ring::GuestRingMemory;
use vmcraft::pv::xenstore::wire::{Header, MsgType, HEADER_LEN};
use vmcraft::xen_hvm::{XenDisk, XenServices, CONSOLE_PAGE, STORE_PAGE};

struct NoUpcall;
impl Upcall for NoUpcall {
    fn raise(&self, _: u32) {}
}
impl UpcallRoute for NoUpcall {
    fn callback(&self, _: Callback) {}
    fn vcpu_vector(&self, _: u32, _: u8) {}
}

const SHARED_INFO: u64 = 0x10000;
const GRANT_FRAME: u64 = 0x20000;
const RING: u64 = 0x30000;
const DATA: u64 = 0x31000;

/// The guest's side: its memory, event channels and grants, and the store
/// client Linux's xenbus is.
struct Front {
    ram: GuestRam,
    channels: Arc<EventChannels>,
    store_port: u32,
    req_id: u32,
}

impl Front {
    fn mem(&self) -> &GuestMemory {
        self.ram.memory()
    }

    fn u32_at(&self, at: u64) -> u32 {
        self.mem().read_obj(GuestAddress(at)).unwrap()
    }

    /// One request on the store ring and its reply (watch events before it are
    /// skipped).
    fn xs(&mut self, ty: MsgType, payload: &[u8]) -> (u32, Vec<u8>) {
        let (req, rsp) = (STORE_PAGE, STORE_PAGE + 1024);
        self.req_id += 1;
        let header = Header {
            ty: ty as u32,
            req_id: self.req_id,
            tx_id: 0,
            len: payload.len() as u32,
        };
        let mut bytes = header.encode().to_vec();
        bytes.extend_from_slice(payload);
        let prod = self.u32_at(STORE_PAGE + 2052);
        for (i, b) in bytes.iter().enumerate() {
            let at = req + u64::from((prod + i as u32) % 1024);
            self.mem().write_obj(*b, GuestAddress(at)).unwrap();
        }
        self.mem()
            .write_obj(prod + bytes.len() as u32, GuestAddress(STORE_PAGE + 2052))
            .unwrap();
        self.channels.send(self.store_port).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (cons, prod) = (
                self.u32_at(STORE_PAGE + 2056),
                self.u32_at(STORE_PAGE + 2060),
            );
            if prod.wrapping_sub(cons) as usize >= HEADER_LEN {
                let read = |n: u32| -> u8 {
                    self.mem()
                        .read_obj(GuestAddress(rsp + u64::from((cons + n) % 1024)))
                        .unwrap()
                };
                let mut h = [0u8; HEADER_LEN];
                for (i, b) in h.iter_mut().enumerate() {
                    *b = read(i as u32);
                }
                let h = Header::decode(&h);
                let total = HEADER_LEN as u32 + h.len;
                if prod.wrapping_sub(cons) >= total {
                    let body: Vec<u8> = (HEADER_LEN as u32..total).map(read).collect();
                    self.mem()
                        .write_obj(cons + total, GuestAddress(STORE_PAGE + 2056))
                        .unwrap();
                    if h.ty != MsgType::WatchEvent as u32 {
                        assert_eq!(h.req_id, self.req_id);
                        return (h.ty, body);
                    }
                    continue;
                }
            }
            assert!(Instant::now() < deadline, "no reply from the store");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn read(&mut self, path: &str) -> String {
        let (ty, body) = self.xs(MsgType::Read, format!("{path}\0").as_bytes());
        assert_eq!(ty, MsgType::Read as u32, "read {path}: {body:?}");
        String::from_utf8(body).unwrap()
    }

    fn write(&mut self, path: &str, value: &str) {
        let (ty, body) = self.xs(MsgType::Write, format!("{path}\0{value}").as_bytes());
        assert_eq!(ty, MsgType::Write as u32, "write {path}: {body:?}");
    }

    fn wait_for(&mut self, path: &str, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.read(path) != want {
            assert!(Instant::now() < deadline, "{path} never became {want}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn grant(&self, gref: u32, frame: u64) {
        let entry = GRANT_FRAME + 8 * u64::from(gref);
        self.mem().write_obj(0u16, GuestAddress(entry + 2)).unwrap();
        self.mem()
            .write_obj(frame as u32, GuestAddress(entry + 4))
            .unwrap();
        self.mem()
            .write_obj(GTF_PERMIT_ACCESS, GuestAddress(entry))
            .unwrap();
    }
}

/// Read the page at `sector` into the page granted as 9 (at [`DATA`]) with request
/// `id` on `ring`, ring the back end on `port`, and wait for the response.
fn read_page(
    ring: &mut FrontRing<GuestRingMemory, Request, Response>,
    channels: &EventChannels,
    port: u32,
    id: u64,
    sector: u64,
) -> Response {
    let mut seg = [Segment::default(); 11];
    seg[0] = Segment {
        gref: 9,
        first_sect: 0,
        last_sect: 7,
    };
    ring.push_request(&Request {
        operation: OP_READ,
        nr_segments: 1,
        handle: 0,
        id,
        sector_number: sector,
        seg,
    })
    .unwrap();
    ring.publish_requests();
    channels.send(port).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(rsp) = ring.pop_response().unwrap() {
            return rsp;
        }
        assert!(Instant::now() < deadline, "no response to request {id}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A guest's memory with the pieces a Xen platform gives it: event channels with
/// the shared-info page placed, a one-frame grant table placed, the HVM parameters.
fn platform() -> (GuestRam, Arc<EventChannels>, Arc<GrantTable>, HvmParams) {
    let ram = GuestRam::new(&MemoryLayout::x86_64(16 << 20).unwrap()).unwrap();
    let mem = ram.memory().clone();
    let channels = Arc::new(EventChannels::unplaced(mem.clone(), Arc::new(NoUpcall)));
    channels
        .place_shared_info(GuestAddress(SHARED_INFO))
        .unwrap();
    let grants = Arc::new(GrantTable::unplaced(mem, 1, 0));
    grants.place_frame(0, GuestAddress(GRANT_FRAME)).unwrap();
    let params = HvmParams::new(1, (0, 0), (0, 0), Arc::new(NoUpcall));
    (ram, channels, grants, params)
}

#[test]
fn a_front_end_connects_reads_its_disk_and_closes_as_xen_blkfront_does() {
    common::sandboxed();
    let (ram, channels, grants, params) = platform();
    let mem = ram.memory().clone();
    let mut disk = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
    let image: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    disk.write_all(&image).unwrap();
    disk.seek(SeekFrom::Start(0)).unwrap();
    let services = XenServices::start_on(
        channels.clone(),
        grants.clone(),
        &params,
        mem.clone(),
        vec![XenDisk {
            file: disk,
            read_only: false,
        }],
        Box::new(std::io::sink()),
        None,
    )
    .unwrap();
    assert_eq!(params.get(param::STORE_PFN), Some(STORE_PAGE / 4096));
    assert_eq!(params.get(param::CONSOLE_PFN), Some(CONSOLE_PAGE / 4096));
    let mut front = Front {
        ram,
        channels: channels.clone(),
        store_port: params.get(param::STORE_EVTCHN).unwrap() as u32,
        req_id: 0,
    };
    // What xenbus and blkfront read.
    let (_, dir) = front.xs(MsgType::Directory, b"device/vbd\0");
    assert_eq!(dir, b"51712\0");
    let dev = "device/vbd/51712";
    assert_eq!(front.read(&format!("{dev}/virtual-device")), "51712");
    let backend = front.read(&format!("{dev}/backend"));
    assert_eq!(backend, "/local/domain/0/backend/vbd/1/51712");
    assert_eq!(front.read(&format!("{backend}/sectors")), "2048");
    assert_eq!(front.read(&format!("{backend}/state")), "2");
    // The front end's ring and channel, then Initialised.
    FrontRing::<_, Request, Response>::init(
        GuestRingMemory::new(mem.clone(), GuestAddress(RING), 4096).unwrap(),
    )
    .unwrap();
    front.grant(8, RING / 4096);
    let port = channels.alloc_unbound(0).unwrap();
    front.write(&format!("{dev}/ring-ref"), "8");
    front.write(&format!("{dev}/event-channel"), &port.to_string());
    front.write(&format!("{dev}/protocol"), "x86_64-abi");
    front.write(&format!("{dev}/state"), "3");
    front.wait_for(&format!("{backend}/state"), "4");
    // A read of sectors 8..16 into a granted page.
    let mut ring = FrontRing::<_, Request, Response>::attach(
        GuestRingMemory::new(mem.clone(), GuestAddress(RING), 4096).unwrap(),
    )
    .unwrap();
    front.grant(9, DATA / 4096);
    let rsp = read_page(&mut ring, &channels, port, 77, 8);
    assert_eq!((rsp.id, rsp.status), (77, 0));
    let mut page = vec![0u8; 4096];
    mem.read_slice(&mut page, GuestAddress(DATA)).unwrap();
    assert_eq!(page, image[4096..8192]);
    // The front end closes: the back end closes, and lets go of the ring.
    front.write(&format!("{dev}/state"), "5");
    front.wait_for(&format!("{backend}/state"), "6");
    let flags: u16 = mem.read_obj(GuestAddress(GRANT_FRAME + 8 * 8)).unwrap();
    assert_eq!(
        flags, GTF_PERMIT_ACCESS,
        "the ring's grant is no longer in use"
    );
    drop(services);
}

#[test]
fn a_front_end_with_bad_details_gets_the_back_end_closed_with_a_reason() {
    common::sandboxed();
    let (ram, channels, grants, params) = platform();
    let mem = ram.memory().clone();
    let _services = XenServices::start_on(
        channels.clone(),
        grants,
        &params,
        mem,
        vec![XenDisk {
            file: vmm_sys_util::tempfile::TempFile::new().unwrap().into_file(),
            read_only: true,
        }],
        Box::new(std::io::sink()),
        None,
    )
    .unwrap();
    let mut front = Front {
        ram,
        channels: channels.clone(),
        store_port: params.get(param::STORE_EVTCHN).unwrap() as u32,
        req_id: 0,
    };
    let dev = "device/vbd/51712";
    let backend = front.read(&format!("{dev}/backend"));
    assert_eq!(front.read(&format!("{backend}/info")), "4", "read-only");
    // A ring grant that was never given.
    let port = channels.alloc_unbound(0).unwrap();
    front.write(&format!("{dev}/ring-ref"), "300");
    front.write(&format!("{dev}/event-channel"), &port.to_string());
    front.write(&format!("{dev}/state"), "3");
    front.wait_for(&format!("{backend}/state"), "6");
    assert!(
        front
            .read(&format!("{backend}/error"))
            .contains("ring grant 300"),
        "the reason is in the back end's error node"
    );
}

/// What the console writes, for the test to read.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn the_console_carries_the_guests_output_out_and_the_hosts_input_in() {
    use std::os::unix::net::UnixStream;
    common::sandboxed();
    let (ram, channels, grants, params) = platform();
    let mem = ram.memory().clone();
    let out = Captured::default();
    let (mut host, guest_side) = UnixStream::pair().unwrap();
    let _services = XenServices::start_on(
        channels.clone(),
        grants,
        &params,
        mem.clone(),
        Vec::new(),
        Box::new(out.clone()),
        Some(std::fs::File::from(std::os::fd::OwnedFd::from(guest_side))),
    )
    .unwrap();
    let port = params.get(param::CONSOLE_EVTCHN).unwrap() as u32;
    let page = params.get(param::CONSOLE_PFN).unwrap() * 4096;
    assert_eq!(page, CONSOLE_PAGE);
    // xencons_interface: in[1024], out[2048], in_cons, in_prod, out_cons, out_prod.
    let (out_ring, in_cons, in_prod, out_prod) =
        (page + 1024, page + 3072, page + 3076, page + 3084);
    mem.write_slice(b"hello from hvc0\n", GuestAddress(out_ring))
        .unwrap();
    mem.write_obj(16u32, GuestAddress(out_prod)).unwrap();
    channels.send(port).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while out.0.lock().unwrap().as_slice() != b"hello from hvc0\n" {
        assert!(Instant::now() < deadline, "the output never came out");
        std::thread::sleep(Duration::from_millis(1));
    }
    // The host types more than the ring holds: it goes in as the guest reads.
    let typed: Vec<u8> = (0..1500u32).map(|i| b'a' + (i % 26) as u8).collect();
    host.write_all(&typed).unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < typed.len() {
        let (cons, prod) = (
            mem.read_obj::<u32>(GuestAddress(in_cons)).unwrap(),
            mem.read_obj::<u32>(GuestAddress(in_prod)).unwrap(),
        );
        for i in cons..prod {
            got.push(
                mem.read_obj::<u8>(GuestAddress(page + u64::from(i % 1024)))
                    .unwrap(),
            );
        }
        if prod != cons {
            // The guest has read them and says so.
            mem.write_obj(prod, GuestAddress(in_cons)).unwrap();
            channels.send(port).unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "the input stopped at {} bytes",
            got.len()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(got, typed);
}

/// The services saved with a front end connected and restored as a restore does
/// them (the platform made again on the same memory, grant frames and placement put
/// back, the services' state, then the event-channel table): the store answers with
/// what it held, the vbd stays connected on its ring and serves the next request.
#[test]
fn a_connected_front_end_survives_a_save_and_restore_of_the_services() {
    common::sandboxed();
    let (ram, channels, grants, params) = platform();
    let mem = ram.memory().clone();
    let mut disk = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
    let image: Vec<u8> = (0..1u32 << 20).map(|i| (i * 13 % 251) as u8).collect();
    disk.write_all(&image).unwrap();
    let disk_again = disk.try_clone().unwrap();
    let start = |channels: &Arc<EventChannels>, grants: &Arc<GrantTable>, params, file| {
        XenServices::start_on(
            channels.clone(),
            grants.clone(),
            params,
            mem.clone(),
            vec![XenDisk {
                file,
                read_only: false,
            }],
            Box::new(std::io::sink()),
            None,
        )
        .unwrap()
    };
    let services = start(&channels, &grants, &params, disk);
    let mut front = Front {
        ram,
        channels: channels.clone(),
        store_port: params.get(param::STORE_EVTCHN).unwrap() as u32,
        req_id: 0,
    };
    let dev = "device/vbd/51712";
    let backend = front.read(&format!("{dev}/backend"));
    FrontRing::<_, Request, Response>::init(
        GuestRingMemory::new(mem.clone(), GuestAddress(RING), 4096).unwrap(),
    )
    .unwrap();
    front.grant(8, RING / 4096);
    let port = channels.alloc_unbound(0).unwrap();
    front.write(&format!("{dev}/ring-ref"), "8");
    front.write(&format!("{dev}/event-channel"), &port.to_string());
    front.write(&format!("{dev}/protocol"), "x86_64-abi");
    front.write(&format!("{dev}/state"), "3");
    front.wait_for(&format!("{backend}/state"), "4");
    front.write("data/marker", "before the snapshot");

    // Save, and let the old process go.
    let state = services.pause();
    let (table, placement, frames) = (
        channels.save_state(),
        channels.placement(),
        grants.placed_frames(),
    );
    drop(services);

    // The platform made again on the same memory, as a restore makes it.
    let channels = Arc::new(EventChannels::unplaced(mem.clone(), Arc::new(NoUpcall)));
    let grants = Arc::new(GrantTable::unplaced(mem.clone(), 1, 0));
    let params = HvmParams::new(1, (0, 0), (0, 0), Arc::new(NoUpcall));
    let services = start(&channels, &grants, &params, disk_again);
    grants.restore_frames(&frames).unwrap();
    channels.restore_placement(&placement).unwrap();
    services.restore(&state).unwrap();
    channels.restore_state(&table).unwrap();
    front.channels = channels.clone();

    assert_eq!(front.read("data/marker"), "before the snapshot");
    assert_eq!(front.read(&format!("{backend}/state")), "4");
    let mut ring = FrontRing::<_, Request, Response>::attach(
        GuestRingMemory::new(mem.clone(), GuestAddress(RING), 4096).unwrap(),
    )
    .unwrap();
    front.grant(9, DATA / 4096);
    let rsp = read_page(&mut ring, &channels, port, 78, 16);
    assert_eq!((rsp.id, rsp.status), (78, 0));
    let mut page = vec![0u8; 4096];
    mem.read_slice(&mut page, GuestAddress(DATA)).unwrap();
    assert_eq!(page, image[8192..12288]);

    // A state that does not fit is refused, not applied.
    let fresh = start(
        &Arc::new(EventChannels::unplaced(mem.clone(), Arc::new(NoUpcall))),
        &Arc::new(GrantTable::unplaced(mem.clone(), 1, 0)),
        &HvmParams::new(1, (0, 0), (0, 0), Arc::new(NoUpcall)),
        vmm_sys_util::tempfile::TempFile::new().unwrap().into_file(),
    );
    let err = fresh.restore(&state).unwrap_err().to_string();
    assert!(err.contains("vbd 51712"), "{err}");
    drop(fresh);
    drop(services);
}
