use super::store::{Access, Perm, Quota, Store, XsError};
use super::wire::{Framer, Header, Message, MsgType, WireError, HEADER_LEN, PAYLOAD_MAX};
use super::Xenstore;
use std::collections::BTreeMap;

const GUEST: u16 = 1;

/// A store where domain 0 gave guest 1 its own directory, as a toolstack does.
fn guest_store() -> Xenstore {
    let mut xs = Xenstore::default();
    xs.store.mkdir(0, 0, b"/local/domain/1").unwrap();
    xs.store
        .set_perms(0, 0, b"/local/domain/1", &[perm(GUEST, Access::None)])
        .unwrap();
    xs
}

fn perm(dom: u16, access: Access) -> Perm {
    Perm { dom, access }
}

fn req(xs: &mut Xenstore, ty: MsgType, tx: u32, payload: &[u8]) -> Vec<Message> {
    xs.handle(GUEST, &Message::new(ty, 42, tx, payload.to_vec()))
}

fn reply(xs: &mut Xenstore, ty: MsgType, tx: u32, payload: &[u8]) -> (u32, Vec<u8>) {
    let out = req(xs, ty, tx, payload);
    assert_eq!(out[0].header.req_id, 42);
    (out[0].header.ty, out[0].payload.clone())
}

#[test]
fn headers_round_trip_and_the_framer_cuts_at_any_split() {
    let h = Header {
        ty: 11,
        req_id: 0xdead_beef,
        tx_id: 3,
        len: 5,
    };
    assert_eq!(Header::decode(&h.encode()), h);
    let msgs = [
        Message::new(MsgType::Write, 1, 0, b"a\0b".to_vec()),
        Message::new(MsgType::Read, 2, 0, Vec::new()),
        Message::new(MsgType::Directory, 3, 9, vec![7; PAYLOAD_MAX]),
    ];
    let stream: Vec<u8> = msgs.iter().flat_map(Message::to_bytes).collect();
    for cut in [1, 3, 16, 17, 100, 4096] {
        let mut f = Framer::default();
        let mut got = Vec::new();
        for chunk in stream.chunks(cut) {
            got.extend(f.push(chunk).unwrap());
        }
        assert_eq!(got, msgs, "chunks of {cut}");
        assert_eq!(f.pending(), 0);
    }
    // A header announcing more than PAYLOAD_MAX breaks the stream.
    let bad = Header {
        ty: 2,
        req_id: 0,
        tx_id: 0,
        len: PAYLOAD_MAX as u32 + 1,
    };
    let mut f = Framer::default();
    assert_eq!(
        f.push(&bad.encode()),
        Err(WireError::PayloadTooLong(PAYLOAD_MAX as u32 + 1))
    );
    assert!(f.pending() < HEADER_LEN);
}

#[test]
fn a_guest_reads_and_writes_its_own_tree_and_nothing_else() {
    let mut xs = guest_store();
    let ok = (MsgType::Write as u32, b"OK\0".to_vec());
    assert_eq!(
        reply(&mut xs, MsgType::Write, 0, b"device/vbd/768/state\x004"),
        ok
    );
    // The value may hold NULs: everything after the path's NUL.
    assert_eq!(reply(&mut xs, MsgType::Write, 0, b"data\0a\0b"), ok);
    assert_eq!(
        reply(&mut xs, MsgType::Read, 0, b"data\0").1,
        b"a\0b".to_vec()
    );
    assert_eq!(
        reply(
            &mut xs,
            MsgType::Read,
            0,
            b"/local/domain/1/device/vbd/768/state\0"
        )
        .1,
        b"4"
    );
    // Missing ancestors were made.
    assert_eq!(
        reply(&mut xs, MsgType::Directory, 0, b"device/vbd\0").1,
        b"768\0"
    );
    // Outside its directory: the root allows it nothing.
    let err = |e: &str| (MsgType::Error as u32, format!("{e}\0").into_bytes());
    assert_eq!(reply(&mut xs, MsgType::Read, 0, b"/local\0"), err("EACCES"));
    assert_eq!(reply(&mut xs, MsgType::Write, 0, b"/x\0y"), err("EACCES"));
    assert_eq!(
        reply(&mut xs, MsgType::Read, 0, b"nothing\0"),
        err("ENOENT")
    );
    // Bad paths and payloads.
    for bad in [&b"a//b\0"[..], b"a/\0", b"a b\0", b"\0", b"a\0b\0"] {
        assert_eq!(
            reply(&mut xs, MsgType::Read, 0, bad),
            err("EINVAL"),
            "{bad:?}"
        );
    }
    assert_eq!(reply(&mut xs, MsgType::Write, 0, b"novalue"), err("EINVAL"));
    assert_eq!(reply(&mut xs, MsgType::Introduce, 0, b""), err("ENOSYS"));
    let mut unknown = Message::new(MsgType::Read, 42, 0, b"x\0".to_vec());
    unknown.header.ty = 99;
    assert_eq!(xs.handle(GUEST, &unknown)[0].payload, b"EINVAL\0");
    // Domain paths, and removal.
    assert_eq!(
        reply(&mut xs, MsgType::GetDomainPath, 0, b"1\0").1,
        b"/local/domain/1\0"
    );
    assert_eq!(
        reply(&mut xs, MsgType::Rm, 0, b"device\0"),
        (MsgType::Rm as u32, b"OK\0".to_vec())
    );
    assert_eq!(
        reply(&mut xs, MsgType::Read, 0, b"device/vbd\0"),
        err("ENOENT")
    );
}

#[test]
fn permissions_are_applied_as_xenstored_applies_them() {
    let mut s = Store::default();
    // Domain 0 makes a backend directory guest 1 may read but not write, with one
    // node guest 1 may write.
    s.write(0, 0, b"/backend/vbd/1/768/state", b"2").unwrap();
    s.set_perms(
        0,
        0,
        b"/backend/vbd/1/768/state",
        &[perm(0, Access::None), perm(1, Access::Read)],
    )
    .unwrap();
    s.write(0, 0, b"/backend/vbd/1/768/free", b"").unwrap();
    s.set_perms(0, 0, b"/backend/vbd/1/768/free", &[perm(0, Access::Write)])
        .unwrap();
    assert_eq!(s.read(1, 0, b"/backend/vbd/1/768/state"), Ok(b"2".to_vec()));
    assert_eq!(
        s.write(1, 0, b"/backend/vbd/1/768/state", b"6"),
        Err(XsError::Acces)
    );
    assert_eq!(
        s.read(2, 0, b"/backend/vbd/1/768/state"),
        Err(XsError::Acces)
    );
    // Write-only for everyone: writable, not readable.
    assert_eq!(s.write(1, 0, b"/backend/vbd/1/768/free", b"x"), Ok(()));
    assert_eq!(
        s.read(1, 0, b"/backend/vbd/1/768/free"),
        Err(XsError::Acces)
    );
    // Only the owner changes permissions, and a guest cannot give a node away.
    assert_eq!(
        s.set_perms(1, 0, b"/backend/vbd/1/768/state", &[perm(1, Access::Both)]),
        Err(XsError::Acces)
    );
    s.mkdir(0, 0, b"/local/domain/1").unwrap();
    s.set_perms(0, 0, b"/local/domain/1", &[perm(1, Access::None)])
        .unwrap();
    s.write(1, 0, b"mine", b"v").unwrap();
    assert_eq!(s.get_perms(1, 0, b"mine"), Ok(vec![perm(1, Access::None)]));
    assert_eq!(
        s.set_perms(1, 0, b"mine", &[perm(2, Access::None)]),
        Err(XsError::Acces)
    );
    assert_eq!(
        s.set_perms(
            1,
            0,
            b"mine",
            &[perm(1, Access::Read), perm(2, Access::Write)]
        ),
        Ok(())
    );
    assert_eq!(s.write(2, 0, b"/local/domain/1/mine", b"w"), Ok(()));
}

#[test]
fn watches_fire_at_once_then_on_changes_at_or_below_and_on_removal_above() {
    let mut xs = guest_store();
    let s = &mut xs.store;
    s.watch(0, b"/local/domain/1/device", b"tok").unwrap();
    s.watch(1, b"device/vbd", b"rel").unwrap();
    assert_eq!(s.watch(1, b"device/vbd", b"rel"), Err(XsError::Exist));
    let ev = |p: &[u8], t: &[u8]| super::store::WatchEvent {
        path: p.to_vec(),
        token: t.to_vec(),
    };
    assert_eq!(s.take_events(0), [ev(b"/local/domain/1/device", b"tok")]);
    assert_eq!(s.take_events(1), [ev(b"device/vbd", b"rel")]);
    s.write(1, 0, b"device/vbd/768/ring-ref", b"8").unwrap();
    // The write made device, vbd, 768 and ring-ref: each fires what watches it.
    let zero = s.take_events(0);
    assert!(zero.contains(&ev(b"/local/domain/1/device/vbd/768/ring-ref", b"tok")));
    assert!(zero.contains(&ev(b"/local/domain/1/device", b"tok")));
    let one = s.take_events(1);
    // Relative watches report relative paths.
    assert!(
        one.contains(&ev(b"device/vbd/768/ring-ref", b"rel")),
        "{one:?}"
    );
    assert!(
        !one.contains(&ev(b"device", b"rel")),
        "above the watch: {one:?}"
    );
    // Removing an ancestor fires the watches below it.
    s.rm(0, 0, b"/local/domain/1/device").unwrap();
    assert!(s.take_events(1).contains(&ev(b"device", b"rel")));
    s.unwatch(1, b"device/vbd", b"rel").unwrap();
    s.write(1, 0, b"device/vbd/1", b"").unwrap();
    assert!(s.take_events(1).is_empty());
    assert_eq!(s.unwatch(1, b"device/vbd", b"rel"), Err(XsError::Noent));
    // Over the wire: the reply first, then the events.
    let out = req(&mut xs, MsgType::Watch, 0, b"x\0t\0");
    assert_eq!(out[0].payload, b"OK\0");
    assert_eq!(out[1].header.ty, MsgType::WatchEvent as u32);
    assert_eq!(out[1].payload, b"x\0t\0");
}

#[test]
fn transactions_commit_what_they_did_unless_something_they_touched_changed() {
    let mut s = guest_store().store;
    s.write(1, 0, b"a", b"1").unwrap();
    let t = s.transaction_start(1).unwrap();
    assert_eq!(s.read(1, t, b"a"), Ok(b"1".to_vec()));
    s.write(1, t, b"b", b"2").unwrap();
    // Not visible outside before the commit.
    assert_eq!(s.read(1, 0, b"b"), Err(XsError::Noent));
    // Another transaction's id is not this domain's to use.
    assert_eq!(s.read(2, t, b"a"), Err(XsError::Inval));
    s.transaction_end(1, t, true).unwrap();
    assert_eq!(s.read(1, 0, b"b"), Ok(b"2".to_vec()));
    // A conflict: what it read changed meanwhile.
    let t = s.transaction_start(1).unwrap();
    s.read(1, t, b"a").unwrap();
    s.write(1, t, b"c", b"3").unwrap();
    s.write(0, 0, b"/local/domain/1/a", b"changed").unwrap();
    assert_eq!(s.transaction_end(1, t, true), Err(XsError::Again));
    assert_eq!(s.read(1, 0, b"c"), Err(XsError::Noent));
    // Ended is ended; an abort changes nothing.
    assert_eq!(s.transaction_end(1, t, true), Err(XsError::Inval));
    let t = s.transaction_start(1).unwrap();
    s.rm(1, t, b"a").unwrap();
    s.transaction_end(1, t, false).unwrap();
    assert_eq!(s.read(1, 0, b"a"), Ok(b"changed".to_vec()));
    // Over the wire: the id comes back as a string.
    let mut xs = Xenstore { store: s };
    let (ty, id) = reply(&mut xs, MsgType::TransactionStart, 0, b"\0");
    assert_eq!(ty, MsgType::TransactionStart as u32);
    let id: u32 = std::str::from_utf8(&id[..id.len() - 1])
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(reply(&mut xs, MsgType::Write, id, b"d\0x").1, b"OK\0");
    assert_eq!(
        reply(&mut xs, MsgType::TransactionEnd, id, b"T\0").1,
        b"OK\0"
    );
    assert_eq!(xs.store.read(1, 0, b"d"), Ok(b"x".to_vec()));
}

#[test]
fn quotas_bound_what_a_guest_holds() {
    let mut xs = Xenstore {
        store: Store::new(Quota {
            nodes: 6,
            watches: 2,
            transactions: 1,
            pending_events: 3,
        }),
    };
    xs.store.mkdir(0, 0, b"/local/domain/1").unwrap();
    xs.store
        .set_perms(0, 0, b"/local/domain/1", &[perm(GUEST, Access::None)])
        .unwrap();
    let s = &mut xs.store;
    // Its directory and four nodes: five of six.
    for i in 0..4 {
        s.write(1, 0, format!("n{i}").as_bytes(), b"").unwrap();
    }
    assert_eq!(s.write(1, 0, b"a/b", b""), Err(XsError::Nospc));
    assert_eq!(s.write(1, 0, b"n4", b""), Ok(()));
    assert_eq!(s.write(1, 0, b"n5", b""), Err(XsError::Nospc));
    s.watch(1, b"n0", b"a").unwrap();
    s.watch(1, b"n1", b"a").unwrap();
    assert_eq!(s.watch(1, b"n2", b"a"), Err(XsError::Nospc));
    s.transaction_start(1).unwrap();
    assert_eq!(s.transaction_start(1), Err(XsError::Nospc));
    // Events past the bound drop the oldest.
    for _ in 0..5 {
        s.write(1, 0, b"n0", b"x").unwrap();
    }
    assert_eq!(s.take_events(1).len(), 3);
    assert!(s.dropped_events() >= 2);
}

/// Random writes, mkdirs and removals by domain 0 over a small name space agree with
/// a plain map (a node exists iff written or made below a kept ancestor, a removal
/// takes the subtree), and every node's parent exists.
#[test]
fn the_tree_agrees_with_a_model_over_random_operations() {
    let mut rng = fastrand::Rng::with_seed(0x5eed_1234_5678_9abc);
    for _case in 0..200 {
        let mut s = Store::default();
        let mut model: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        model.insert("/".into(), Vec::new());
        for _ in 0..60 {
            let depth = 1 + rng.u64(..3);
            let path: String = (0..depth)
                .map(|_| format!("/{}", ["a", "b", "c"][rng.u64(..3) as usize]))
                .collect();
            match rng.u64(..4) {
                0 | 1 => {
                    let v = vec![b'v'; rng.u64(..4) as usize];
                    s.write(0, 0, path.as_bytes(), &v).unwrap();
                    let mut p = path.as_str();
                    while let Some(i) = p.rfind('/') {
                        let up = if i == 0 { "/" } else { &p[..i] };
                        model.entry(up.to_string()).or_default();
                        p = up;
                        if p == "/" {
                            break;
                        }
                    }
                    model.insert(path.clone(), v);
                }
                2 => {
                    s.mkdir(0, 0, path.as_bytes()).unwrap();
                    let mut p = path.clone();
                    loop {
                        model.entry(p.clone()).or_default();
                        match p.rfind('/') {
                            Some(0) | None => break,
                            Some(i) => p.truncate(i),
                        }
                    }
                }
                _ => {
                    let expected = if model.contains_key(&path) {
                        Ok(())
                    } else {
                        Err(XsError::Noent)
                    };
                    assert_eq!(s.rm(0, 0, path.as_bytes()), expected);
                    model.retain(|k, _| !(k == &path || k.starts_with(&format!("{path}/"))));
                }
            }
            let dump: BTreeMap<String, Vec<u8>> = s.dump().into_iter().collect();
            assert_eq!(dump, model);
        }
    }
}

/// Two domains run transactions over the same keys with random interleavings: every
/// commit that succeeds leaves the store as if its transaction ran alone at its end
/// (each committed counter increment is counted once), and the failed ones change
/// nothing.
#[test]
fn concurrent_transactions_never_lose_an_increment() {
    let mut rng = fastrand::Rng::with_seed(0xabcd_ef01_2345_6789);
    for _case in 0..100 {
        let mut s = Store::default();
        s.write(0, 0, b"/counter", b"0").unwrap();
        let mut committed = 0u64;
        let mut open: Vec<(u16, u32, u64)> = Vec::new();
        for _ in 0..50 {
            if open.len() < 3 && rng.u64(..2) == 0 {
                let dom = 0;
                let t = s.transaction_start(dom).unwrap();
                let v: u64 = String::from_utf8(s.read(dom, t, b"/counter").unwrap())
                    .unwrap()
                    .parse()
                    .unwrap();
                s.write(dom, t, b"/counter", (v + 1).to_string().as_bytes())
                    .unwrap();
                open.push((dom, t, v));
            } else if !open.is_empty() {
                let (dom, t, _) = open.remove(rng.u64(..open.len() as u64) as usize);
                match s.transaction_end(dom, t, true) {
                    Ok(()) => committed += 1,
                    Err(e) => assert_eq!(e, XsError::Again),
                }
            }
        }
        let v: u64 = String::from_utf8(s.read(0, 0, b"/counter").unwrap())
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(v, committed);
    }
}

mod ring {
    use super::super::ring::{StoreRing, StoreRingError, ERROR_PROTO, ERROR_RINGIDX, RING_SIZE};
    use super::super::wire::{Framer, Header, Message, MsgType, PAYLOAD_MAX};
    use super::guest_store;
    use crate::ring::{HostRingMemory, RingMemory};

    /// The guest's side: writes requests, reads replies.
    struct Guest {
        page: HostRingMemory,
        framer: Framer,
    }

    impl Guest {
        fn send(&self, bytes: &[u8]) {
            let prod = self.page.load_u32(2052);
            for (i, b) in bytes.iter().enumerate() {
                let at = (prod.wrapping_add(i as u32) % RING_SIZE) as usize;
                self.page.write(at, &[*b]);
            }
            self.page
                .store_u32(2052, prod.wrapping_add(bytes.len() as u32));
        }
        fn receive(&mut self) -> Vec<Message> {
            let cons = self.page.load_u32(2056);
            let prod = self.page.load_u32(2060);
            let mut bytes = Vec::new();
            for i in 0..prod.wrapping_sub(cons) {
                let mut b = [0u8];
                self.page
                    .read(1024 + (cons.wrapping_add(i) % RING_SIZE) as usize, &mut b);
                bytes.push(b[0]);
            }
            self.page.store_u32(2056, prod);
            self.framer.push(&bytes).unwrap()
        }
    }

    fn pair() -> (Guest, StoreRing<HostRingMemory>) {
        let page = HostRingMemory::new(4096).unwrap();
        let ring = StoreRing::new(page.clone(), 1).unwrap();
        (
            Guest {
                page,
                framer: Framer::default(),
            },
            ring,
        )
    }

    #[test]
    fn requests_and_replies_cross_the_ring_and_wrap_around_it() {
        let mut xs = guest_store();
        let (mut g, mut r) = pair();
        // Server features: errors reported.
        assert_eq!(g.page.load_u32(2064), 2);
        let mut replies = Vec::new();
        for i in 0..200u32 {
            let w = Message::new(
                MsgType::Write,
                i,
                0,
                format!("k{}\0{}", i % 7, i).into_bytes(),
            );
            g.send(&w.to_bytes());
            r.serve(&mut xs).unwrap();
            replies.extend(g.receive());
        }
        assert_eq!(replies.len(), 200);
        assert!(replies
            .iter()
            .enumerate()
            .all(|(i, m)| m.header.req_id == i as u32 && m.payload == b"OK\0"));
        assert_eq!(xs.store.read(1, 0, b"k3"), Ok(b"199".to_vec()));
        // Far more than a ring of requests went through.
        assert!(g.page.load_u32(2048) > 4 * RING_SIZE);
    }

    #[test]
    fn a_guest_that_does_not_read_replies_gets_no_more_served_until_it_does() {
        let mut xs = guest_store();
        xs.store
            .write(1, 0, b"big", &vec![b'x'; PAYLOAD_MAX])
            .unwrap();
        let (mut g, mut r) = pair();
        let read = Message::new(MsgType::Read, 1, 0, b"big\0".to_vec()).to_bytes();
        g.send(&read);
        g.send(&read);
        let served = r.serve(&mut xs).unwrap();
        assert_eq!(served.requests, 2);
        assert_eq!(served.reply_bytes, RING_SIZE as usize);
        // The guest's third request waits: two replies are still queued.
        g.send(&read);
        assert_eq!(r.serve(&mut xs).unwrap().requests, 0);
        let mut got = Vec::new();
        for _ in 0..20 {
            got.extend(g.receive());
            r.serve(&mut xs).unwrap();
        }
        assert_eq!(got.len(), 3);
        assert!(got.iter().all(|m| m.payload.len() == PAYLOAD_MAX));
    }

    #[test]
    fn hostile_indices_and_overlong_payloads_end_the_service_with_the_error_word() {
        let mut xs = guest_store();
        let (g, mut r) = pair();
        g.page.store_u32(2052, RING_SIZE + 1);
        assert!(matches!(
            r.serve(&mut xs),
            Err(StoreRingError::RequestIndex { .. })
        ));
        assert_eq!(g.page.load_u32(2072), ERROR_RINGIDX);
        assert!(r.serve(&mut xs).is_err(), "served after the error");

        let (g, mut r) = pair();
        g.page.store_u32(2056, 5); // the reply consumer past our producer
        assert!(matches!(
            r.serve(&mut xs),
            Err(StoreRingError::ReplyIndex { .. })
        ));

        let (g, mut r) = pair();
        let h = Header {
            ty: 2,
            req_id: 0,
            tx_id: 0,
            len: PAYLOAD_MAX as u32 + 1,
        };
        g.send(&h.encode());
        assert!(matches!(r.serve(&mut xs), Err(StoreRingError::Protocol(_))));
        assert_eq!(g.page.load_u32(2072), ERROR_PROTO);
    }
}

mod xenbus {
    use super::super::store::{Store, XsError};
    use super::super::xenbus::{
        parse_u32, Action, DeviceInfo, FrontendDetails, FrontendError, XenbusDevice, XenbusState,
    };

    /// What Linux's xen-blkfront writes, as guest 1, then Initialised.
    fn blkfront_connects(s: &mut Store, dev: &XenbusDevice, ring_ref: &[u8], protocol: &[u8]) {
        let fe = dev.frontend.clone();
        let w = |s: &mut Store, k: &str, v: &[u8]| s.write(1, 0, format!("{fe}/{k}").as_bytes(), v);
        w(s, "ring-ref", ring_ref).unwrap();
        w(s, "event-channel", b"7").unwrap();
        w(s, "protocol", protocol).unwrap();
        w(s, "state", b"3").unwrap();
    }

    #[test]
    fn a_vbd_goes_from_initwait_to_connected_and_back_as_blkfront_drives_it() {
        let mut s = Store::default();
        let mut dev = XenbusDevice::create(&mut s, 1, 768, &DeviceInfo::vbd(2048, false)).unwrap();
        assert_eq!(dev.frontend, "/local/domain/1/device/vbd/768");
        assert_eq!(dev.backend, "/local/domain/0/backend/vbd/1/768");
        // What the guest finds, with its own permissions.
        assert_eq!(
            s.read(1, 0, b"device/vbd/768/backend"),
            Ok(dev.backend.clone().into_bytes())
        );
        assert_eq!(s.read(1, 0, b"device/vbd/768/state"), Ok(b"1".to_vec()));
        // xen-blkfront's first read: its virtual-device number.
        assert_eq!(
            s.read(1, 0, b"device/vbd/768/virtual-device"),
            Ok(b"768".to_vec())
        );
        assert_eq!(
            s.read(1, 0, b"device/vbd/768/device-type"),
            Ok(b"disk".to_vec())
        );
        let be = |k: &str| format!("/local/domain/0/backend/vbd/1/768/{k}").into_bytes();
        assert_eq!(s.read(1, 0, &be("state")), Ok(b"2".to_vec()));
        assert_eq!(s.read(1, 0, &be("sectors")), Ok(b"2048".to_vec()));
        assert_eq!(s.read(1, 0, &be("feature-flush-cache")), Ok(b"1".to_vec()));
        // ... but may not write the back end's, nor another guest read either.
        assert_eq!(s.write(1, 0, &be("state"), b"4"), Err(XsError::Acces));
        assert_eq!(s.read(2, 0, &be("state")), Err(XsError::Acces));
        assert_eq!(
            s.read(2, 0, b"/local/domain/1/device/vbd/768/state"),
            Err(XsError::Acces)
        );
        // Nothing to do until the front end is ready.
        assert_eq!(dev.frontend_changed(&mut s), Ok(None));
        blkfront_connects(&mut s, &dev, b"8", b"x86_64-abi");
        assert_eq!(
            dev.frontend_changed(&mut s),
            Ok(Some(Action::Connect(FrontendDetails {
                ring_ref: 8,
                event_channel: 7
            })))
        );
        dev.connected(&mut s).unwrap();
        assert_eq!(s.read(1, 0, &be("state")), Ok(b"4".to_vec()));
        assert_eq!(dev.state(), XenbusState::Connected);
        // The front end closes: Closing, Closed, disconnect; then it may come back.
        s.write(1, 0, b"device/vbd/768/state", b"5").unwrap();
        assert_eq!(dev.frontend_changed(&mut s), Ok(Some(Action::Disconnect)));
        assert_eq!(s.read(1, 0, &be("state")), Ok(b"6".to_vec()));
        s.write(1, 0, b"device/vbd/768/state", b"6").unwrap();
        assert_eq!(dev.frontend_changed(&mut s), Ok(None));
        assert_eq!(dev.state(), XenbusState::InitWait);
        blkfront_connects(&mut s, &dev, b"9", b"x86_64-abi");
        assert!(matches!(
            dev.frontend_changed(&mut s),
            Ok(Some(Action::Connect(FrontendDetails { ring_ref: 9, .. })))
        ));
    }

    #[test]
    fn bad_front_end_details_close_the_back_end() {
        for (ring_ref, protocol, want) in [
            (
                &b"8x"[..],
                &b"x86_64-abi"[..],
                FrontendError::BadNumber { key: "ring-ref" },
            ),
            (
                b"-1",
                b"x86_64-abi",
                FrontendError::BadNumber { key: "ring-ref" },
            ),
            (
                b"99999999999",
                b"x86_64-abi",
                FrontendError::BadNumber { key: "ring-ref" },
            ),
            (
                b"8",
                b"x86_32-abi",
                FrontendError::Protocol("x86_32-abi".into()),
            ),
        ] {
            let mut s = Store::default();
            let mut dev = XenbusDevice::create(&mut s, 1, 768, &DeviceInfo::vbd(8, true)).unwrap();
            blkfront_connects(&mut s, &dev, ring_ref, protocol);
            assert_eq!(dev.frontend_changed(&mut s), Err(want));
            assert_eq!(dev.state(), XenbusState::Closing);
        }
        // A multi-page ring is not offered.
        let mut s = Store::default();
        let mut dev = XenbusDevice::create(&mut s, 1, 768, &DeviceInfo::vbd(8, true)).unwrap();
        s.write(1, 0, b"device/vbd/768/ring-page-order", b"2")
            .unwrap();
        blkfront_connects(&mut s, &dev, b"8", b"x86_64-abi");
        assert_eq!(
            dev.frontend_changed(&mut s),
            Err(FrontendError::RingOrder(2))
        );
        // The VMM's own failure leaves the reason.
        let mut s = Store::default();
        let mut dev = XenbusDevice::create(&mut s, 1, 1, &DeviceInfo::console()).unwrap();
        dev.failed(&mut s, "no such grant").unwrap();
        // The guest may read why (the node inherits the back end's permissions).
        assert_eq!(
            s.read(1, 0, b"/local/domain/0/backend/console/1/1/error"),
            Ok(b"no such grant".to_vec())
        );
        assert_eq!(dev.state(), XenbusState::Closed);
    }

    #[test]
    fn numbers_are_parsed_strictly() {
        assert_eq!(parse_u32(b"0"), Some(0));
        assert_eq!(parse_u32(b"4294967295"), Some(u32::MAX));
        assert_eq!(parse_u32(b"12\0"), Some(12));
        for bad in [&b""[..], b"4294967296", b"+1", b" 1", b"1 ", b"0x10", b"\0"] {
            assert_eq!(parse_u32(bad), None, "{bad:?}");
        }
        assert_eq!(XenbusState::parse(b"4"), Some(XenbusState::Connected));
        assert_eq!(XenbusState::parse(b"9"), None);
    }
}
