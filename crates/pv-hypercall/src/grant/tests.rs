//! Grant table v1 from the backend's side, against a guest that grants, revokes and
//! lies.

use super::*;
use vmcraft_memory::{layout::MemoryLayout, GuestRam};

const TABLE: u64 = 0x1000;
const BACKEND: u16 = 0;
const FRAME: u32 = 0x20; // guest page 0x20000

fn setup() -> (GuestRam, GrantTable) {
    let ram = GuestRam::new(&MemoryLayout::x86_64(1 << 20).unwrap()).unwrap();
    let table = GrantTable::new(ram.memory().clone(), GuestAddress(TABLE), 16, BACKEND).unwrap();
    (ram, table)
}

/// The guest's side: domid and frame, then flags.
fn grant(ram: &GuestRam, gref: u32, domid: u16, frame: u32, flags: u16) {
    let at = TABLE + u64::from(gref) * ENTRY_SIZE;
    let m = ram.memory();
    m.write_obj(domid, GuestAddress(at + 2)).unwrap();
    m.write_obj(frame, GuestAddress(at + 4)).unwrap();
    m.write_obj(flags, GuestAddress(at)).unwrap();
}

fn flags(ram: &GuestRam, gref: u32) -> u16 {
    ram.memory()
        .read_obj(GuestAddress(TABLE + u64::from(gref) * ENTRY_SIZE))
        .unwrap()
}

#[test]
fn map_marks_the_entry_in_use_until_unmap() {
    let (ram, t) = setup();
    grant(&ram, 3, BACKEND, FRAME, GTF_PERMIT_ACCESS);
    let m = t.map(3, true).unwrap();
    assert_eq!(m.page, GuestAddress(u64::from(FRAME) * PAGE));
    assert_eq!(
        flags(&ram, 3),
        GTF_PERMIT_ACCESS | GTF_READING | GTF_WRITING
    );
    let r = t.map(3, false).unwrap();
    t.unmap(m).unwrap();
    assert_eq!(
        flags(&ram, 3),
        GTF_PERMIT_ACCESS | GTF_READING,
        "a reader remains"
    );
    t.unmap(r).unwrap();
    assert_eq!(flags(&ram, 3), GTF_PERMIT_ACCESS);
    assert_eq!(t.unmap(r), Err(GrantError::NotMapped(3)));
}

#[test]
fn checks_on_domid_readonly_type_and_frame() {
    let (ram, t) = setup();
    grant(&ram, 1, 5, FRAME, GTF_PERMIT_ACCESS);
    assert!(matches!(
        t.map(1, false),
        Err(GrantError::NotGranted { granted: 5, .. })
    ));
    grant(&ram, 2, BACKEND, FRAME, GTF_PERMIT_ACCESS | GTF_READONLY);
    assert_eq!(t.map(2, true), Err(GrantError::ReadOnly(2)));
    assert!(t.map(2, false).is_ok());
    grant(&ram, 4, BACKEND, FRAME, 0); // revoked
    assert!(matches!(
        t.map(4, false),
        Err(GrantError::NotGranted { .. })
    ));
    grant(&ram, 5, BACKEND, 0xffff_ffff, GTF_PERMIT_ACCESS);
    assert!(matches!(t.map(5, false), Err(GrantError::BadFrame { .. })));
    assert_eq!(
        flags(&ram, 5),
        GTF_PERMIT_ACCESS,
        "a failed map leaves no marks"
    );
    assert_eq!(t.map(16, false), Err(GrantError::BadRef(16)));
    assert_eq!(t.map(u32::MAX, false), Err(GrantError::BadRef(u32::MAX)));
}

#[test]
fn copies_stay_inside_their_page() {
    let (ram, t) = setup();
    grant(&ram, 0, BACKEND, FRAME, GTF_PERMIT_ACCESS);
    let mut data = *b"granted!";
    t.copy(0, 100, &mut data, CopyDirection::ToGuest).unwrap();
    let mut back = [0u8; 8];
    t.copy(0, 100, &mut back, CopyDirection::FromGuest).unwrap();
    assert_eq!(&back, b"granted!");
    assert_eq!(flags(&ram, 0), GTF_PERMIT_ACCESS, "released after the copy");
    let mut big = [0u8; 16];
    assert!(matches!(
        t.copy(0, PAGE - 8, &mut big, CopyDirection::FromGuest),
        Err(GrantError::CrossesPage { .. })
    ));
    assert!(matches!(
        t.copy(0, u64::MAX, &mut big, CopyDirection::FromGuest),
        Err(GrantError::CrossesPage { .. })
    ));
    grant(&ram, 1, BACKEND, FRAME, GTF_PERMIT_ACCESS | GTF_READONLY);
    assert_eq!(
        t.copy(1, 0, &mut data, CopyDirection::ToGuest),
        Err(GrantError::ReadOnly(1))
    );
}

#[test]
fn the_table_must_be_in_memory() {
    let ram = GuestRam::new(&MemoryLayout::x86_64(1 << 20).unwrap()).unwrap();
    for (at, n) in [
        (0x1001, 4),
        ((1 << 20) - 8, 2),
        (0x1000, 0),
        (u64::MAX - 7, 1),
    ] {
        assert!(matches!(
            GrantTable::new(ram.memory().clone(), GuestAddress(at), n, 0),
            Err(GrantError::BadTable { .. })
        ));
    }
}

#[test]
fn the_in_use_bits_mark_the_table_page_dirty_for_migration() {
    use std::ops::Deref;
    use vm_memory::{bitmap::Bitmap, GuestMemoryBackend, GuestMemoryRegion};
    let (ram, t) = setup();
    grant(&ram, 3, BACKEND, FRAME, GTF_PERMIT_ACCESS);
    let region = ram.memory().iter().next().unwrap();
    region.deref().bitmap().reset();
    let m = t.map(3, true).unwrap();
    assert!(region.bitmap().dirty_at(TABLE as usize));
    region.deref().bitmap().reset();
    t.unmap(m).unwrap();
    assert!(region.bitmap().dirty_at(TABLE as usize), "the release too");
    assert!(!region.bitmap().dirty_at(TABLE as usize + 4096));
}
