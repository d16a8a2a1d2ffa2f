use std::os::unix::fs::FileExt;

use vm_memory::{Bytes, GuestAddress};
use vmcraft_memory::layout::MemoryLayout;
use vmcraft_memory::vectored::IoVecs;
use vmcraft_memory::GuestRam;

use super::*;

fn image_file(sectors: u64) -> File {
    let f = vmm_sys_util::tempfile::TempFile::new_with_prefix("/tmp/vmcraft-block")
        .unwrap()
        .into_file();
    for s in 0..sectors {
        f.write_all_at(&[s as u8; SECTOR_SIZE as usize], s * SECTOR_SIZE)
            .unwrap();
    }
    f
}

fn ram() -> GuestRam {
    GuestRam::new(&MemoryLayout::x86_64(16 << 20).unwrap()).unwrap()
}

#[test]
fn ranges_inside_the_image_only() {
    let image = BlockImage::open(image_file(8), false).unwrap();
    assert_eq!(image.sectors(), 8);
    assert_eq!(image.range(0, 8), Ok(0));
    assert_eq!(image.range(7, 1), Ok(7 * SECTOR_SIZE));
    assert_eq!(
        image.range(7, 2),
        Err(OutOfRange {
            start: 7,
            count: 2,
            sectors: 8
        })
    );
    assert!(image.range(u64::MAX, 2).is_err());
    assert!(image.range(9, 0).is_err());
}

#[test]
fn a_partial_last_sector_is_not_part_of_the_image() {
    let f = image_file(2);
    f.set_len(2 * SECTOR_SIZE + 100).unwrap();
    assert_eq!(BlockImage::open(f, false).unwrap().sectors(), 2);
}

#[test]
fn a_read_only_image_refuses_every_write_and_keeps_its_data() {
    let image = BlockImage::open(image_file(4), true).unwrap();
    let denied = |r: io::Result<()>| r.unwrap_err().kind() == io::ErrorKind::PermissionDenied;
    assert!(denied(image.write_at(&[9; 512], 0)));
    assert!(denied(image.write_zeroes(0, 512)));
    assert!(denied(image.discard(0, 512)));
    let ram = ram();
    let mut vecs = IoVecs::default();
    let mut data = vecs.gather(ram.memory());
    data.push(GuestAddress(0x1000), 512).unwrap();
    assert!(denied(image.write(&mut data, 0)));
    let mut back = [0u8; 512];
    image.read_at(&mut back, 0).unwrap();
    assert_eq!(back, [0; 512]);
}

#[test]
fn write_through_syncs_each_write_and_flush_always_syncs() {
    let image = BlockImage::open(image_file(4), false).unwrap();
    image.write_at(&[1; 512], 0).unwrap();
    assert_eq!(image.syncs(), 0);
    image.flush().unwrap();
    assert_eq!(image.syncs(), 1);
    image.set_write_through(true);
    image.write_at(&[2; 512], 512).unwrap();
    image.write_zeroes(1024, 512).unwrap();
    assert_eq!(image.syncs(), 3);
}

#[test]
fn zeroes_and_discard_leave_the_size_alone() {
    let image = BlockImage::open(image_file(4), false).unwrap();
    image.write_zeroes(512, 1024).unwrap();
    image.discard(0, 512).unwrap();
    let mut back = [1u8; 1024];
    image.read_at(&mut back, 512).unwrap();
    assert_eq!(back, [0; 1024]);
    assert_eq!(image.file().metadata().unwrap().len(), 4 * SECTOR_SIZE);
}

/// Hold reads of sectors `first..first+count`, one per request, each into its own
/// page at `0x10000 + 0x1000 * i`; flush; return (tag, offset, ok) per request.
fn merged_run(
    image: &BlockImage,
    first: u64,
    count: u64,
) -> (Vec<(u32, u64, bool)>, u64, GuestRam) {
    let ram = ram();
    let mut vecs = IoVecs::default();
    let mut data = vecs.gather(ram.memory());
    let mut run = MergedReads::default();
    for i in 0..count {
        let offset = image.range(first + i, 1).unwrap();
        assert!(run.continues(offset, &data));
        data.push(GuestAddress(0x10000 + 0x1000 * i), 512).unwrap();
        run.hold(i as u32, offset, SECTOR_SIZE, &data);
    }
    assert!(!run.continues(0, &data) || first == 0 && count == 0);
    let mut answers = Vec::new();
    run.flush(image, &mut data, |tag, offset, r| {
        answers.push((tag, offset, r.is_ok()))
    });
    assert!(run.is_empty());
    assert_eq!(data.vectors(), 0);
    (answers, run.reads(), ram)
}

#[test]
fn adjacent_reads_take_one_read_and_each_gets_its_own_sector() {
    let image = BlockImage::open(image_file(16), false).unwrap();
    let (answers, reads, ram) = merged_run(&image, 3, 5);
    assert_eq!(reads, 1);
    let want: Vec<_> = (0..5)
        .map(|i| (i, (3 + i as u64) * SECTOR_SIZE, true))
        .collect();
    assert_eq!(answers, want);
    for i in 0..5u64 {
        let mut got = [0u8; 512];
        ram.memory()
            .read_slice(&mut got, GuestAddress(0x10000 + 0x1000 * i))
            .unwrap();
        assert_eq!(got, [(3 + i) as u8; 512], "request {i}");
    }
}

#[test]
fn a_failed_merged_read_fails_only_the_requests_it_must() {
    let image = BlockImage::open(image_file(16), false).unwrap();
    // The file shrinks under the image: the run's last two sectors are gone.
    image.file().set_len(6 * SECTOR_SIZE).unwrap();
    let (answers, reads, ram) = merged_run(&image, 2, 6);
    assert_eq!(reads, 1 + 6, "one merged read, then each alone");
    let ok: Vec<bool> = answers.iter().map(|a| a.2).collect();
    assert_eq!(ok, [true, true, true, true, false, false]);
    let mut got = [0u8; 512];
    ram.memory()
        .read_slice(&mut got, GuestAddress(0x10000 + 0x3000))
        .unwrap();
    assert_eq!(got, [5; 512]);
}

#[test]
fn a_read_elsewhere_does_not_continue_the_run() {
    let ram = ram();
    let mut vecs = IoVecs::default();
    let mut data = vecs.gather(ram.memory());
    let mut run = MergedReads::default();
    data.push(GuestAddress(0x10000), 512).unwrap();
    run.hold((), 0, SECTOR_SIZE, &data);
    assert!(run.continues(512, &data));
    assert!(!run.continues(1024, &data));
    assert!(!run.continues(0, &data));
}
