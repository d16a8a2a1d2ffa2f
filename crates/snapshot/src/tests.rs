use super::*;

#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq, Clone)]
struct Device {
    name: String,
    registers: Vec<u32>,
    level: Option<u8>,
}

fn sample() -> (SnapshotBuilder, Device, Vec<u64>) {
    let dev = Device {
        name: "uart".into(),
        registers: vec![1, 2, 3, 0xdead_beef],
        level: Some(4),
    };
    let words: Vec<u64> = (0..100).map(|i| i * 0x0101_0101).collect();
    let mut b = SnapshotBuilder::new();
    b.add("serial", 3, &dev).unwrap();
    b.add("vcpu0", 1, &words).unwrap();
    b.add("empty", 1, &()).unwrap();
    (b, dev, words)
}

#[test]
fn sections_round_trip_by_name_and_version() {
    let (b, dev, words) = sample();
    let s = Snapshot::parse(b.to_bytes()).unwrap();
    assert_eq!(s.names().collect::<Vec<_>>(), ["empty", "serial", "vcpu0"]);
    assert_eq!(s.get::<Device>("serial", 3).unwrap(), dev);
    assert_eq!(s.get::<Vec<u64>>("vcpu0", 1).unwrap(), words);
    s.get::<()>("empty", 1).unwrap();
    assert!(s.contains("serial") && !s.contains("rtc"));
    assert!(matches!(
        s.get::<Device>("rtc", 1),
        Err(SnapshotError::Missing { section }) if section == "rtc"
    ));
    assert!(matches!(
        s.get::<Device>("serial", 4),
        Err(SnapshotError::ComponentVersion {
            found: 3,
            supported: 4,
            ..
        })
    ));
}

#[test]
fn a_section_that_does_not_decode_as_the_state_is_named() {
    let (b, _, _) = sample();
    let s = Snapshot::parse(b.to_bytes()).unwrap();
    // A list of words is not a device.
    let err = s.get::<Device>("vcpu0", 1).unwrap_err();
    assert!(
        matches!(&err, SnapshotError::Decode { section, .. } | SnapshotError::Leftover { section, .. } if section == "vcpu0"),
        "{err}"
    );
    // A device decoded as a smaller struct leaves bytes over.
    assert!(matches!(
        s.get::<String>("serial", 3),
        Err(SnapshotError::Leftover { .. })
    ));
}

#[test]
fn every_truncation_is_an_error() {
    let (b, _, _) = sample();
    let bytes = b.to_bytes();
    for len in 0..bytes.len() {
        let err = Snapshot::parse(bytes[..len].to_vec()).unwrap_err();
        // Cut inside the header, the header itself is short; after it, the total
        // length no longer matches.
        assert!(
            matches!(
                err,
                SnapshotError::Truncated { .. } | SnapshotError::Length { .. }
            ),
            "cut at {len}: {err}"
        );
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(matches!(
        Snapshot::parse(longer),
        Err(SnapshotError::Length { .. })
    ));
}

#[test]
fn every_flipped_bit_is_caught_before_decoding() {
    let (b, _, _) = sample();
    let bytes = b.to_bytes();
    for i in 0..bytes.len() {
        for bit in 0..8 {
            let mut bad = bytes.clone();
            bad[i] ^= 1 << bit;
            // Either the parse fails, or (a flipped version or name byte) the section
            // no longer reads as the same thing.
            match Snapshot::parse(bad) {
                Err(_) => {}
                Ok(s) => {
                    let same = s.get::<Device>("serial", 3).is_ok()
                        && s.get::<Vec<u64>>("vcpu0", 1).is_ok()
                        && s.get::<()>("empty", 1).is_ok();
                    assert!(!same, "a flip of bit {bit} of byte {i} went unnoticed");
                }
            }
        }
    }
}

#[test]
fn header_errors_say_what_is_wrong() {
    let (b, _, _) = sample();
    let good = b.to_bytes();
    let mut not = good.clone();
    not[0] = b'X';
    assert!(matches!(
        Snapshot::parse(not),
        Err(SnapshotError::NotASnapshot)
    ));
    // Another format version, with a consistent checksum.
    let mut other = good.clone();
    other[8..12].copy_from_slice(&2u32.to_le_bytes());
    let c = crc(&other[..HEADER - 4]);
    other[HEADER - 4..HEADER].copy_from_slice(&c.to_le_bytes());
    assert_eq!(
        Snapshot::parse(other).unwrap_err().to_string(),
        "snapshot format version 2; this build reads version 1"
    );
    let mut many = good.clone();
    many[12..16].copy_from_slice(&(MAX_SECTIONS + 1).to_le_bytes());
    let c = crc(&many[..HEADER - 4]);
    many[HEADER - 4..HEADER].copy_from_slice(&c.to_le_bytes());
    assert!(matches!(
        Snapshot::parse(many),
        Err(SnapshotError::TooManySections(_))
    ));
    let mut corrupt = good;
    corrupt[13] ^= 1;
    assert!(matches!(
        Snapshot::parse(corrupt),
        Err(SnapshotError::HeaderChecksum)
    ));
}

#[test]
fn a_corrupted_section_is_named() {
    let (b, _, _) = sample();
    let mut bytes = b.to_bytes();
    let last = bytes.len() - 1; // inside "vcpu0"'s body, the last section
    bytes[last] ^= 0x40;
    assert_eq!(
        Snapshot::parse(bytes).unwrap_err().to_string(),
        "snapshot section \"vcpu0\" is corrupted (checksum mismatch)"
    );
}

#[test]
fn the_builder_refuses_bad_and_duplicate_names() {
    let mut b = SnapshotBuilder::new();
    b.add("ok", 1, &1u8).unwrap();
    for bad in ["", "ok", "has space", "ünïcode", &"x".repeat(MAX_NAME + 1)] {
        assert!(
            matches!(b.add(bad, 1, &1u8), Err(SnapshotError::Name(_))),
            "{bad:?}"
        );
    }
    b.add(&"x".repeat(MAX_NAME), 1, &1u8).unwrap();
}

#[test]
fn files_are_written_whole_and_read_back() {
    let dir = std::env::temp_dir().join(format!("vmcraft-snapshot-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("state");
    let (b, dev, _) = sample();
    b.write_file(&path).unwrap();
    assert!(!dir.join("state.partial").exists());
    let s = Snapshot::read_file(&path).unwrap();
    assert_eq!(s.get::<Device>("serial", 3).unwrap(), dev);
    let missing = Snapshot::read_file(&dir.join("nope")).unwrap_err();
    assert!(
        missing.to_string().starts_with("cannot open snapshot file"),
        "{missing}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Recompute every CRC in `bytes` (header and sections), as someone editing a
/// snapshot would.
fn recompute_checksums(bytes: &mut [u8]) {
    let header = HEADER - 4;
    let c = crc(&bytes[..header]);
    bytes[header..HEADER].copy_from_slice(&c.to_le_bytes());
    let count = le_u32(&bytes[12..]);
    let mut at = HEADER;
    for _ in 0..count {
        // An edit to a length leaves a file the parser refuses anyway.
        let Some(&name) = bytes.get(at) else { return };
        at += 1 + name as usize;
        if at + 16 > bytes.len() {
            return;
        }
        let len = le_u64(&bytes[at + 4..]) as usize;
        let body = at + 16;
        let Some(c) = bytes.get(body..body.saturating_add(len)).map(crc) else {
            return;
        };
        bytes[at + 12..at + 16].copy_from_slice(&c.to_le_bytes());
        at = body + len;
    }
}

#[test]
fn a_signed_snapshot_edited_with_its_checksums_recomputed_is_refused() {
    let (b, _, _) = sample();
    let key = [7u8; 32];
    let signed = b.to_signed_bytes(&key).unwrap();
    let s = Snapshot::parse(signed.clone()).unwrap();
    assert!(s.is_signed());
    s.verify(&key).unwrap();
    assert!(matches!(
        s.verify(&[8u8; 32]),
        Err(SnapshotError::BadSignature)
    ));
    // Every single-byte edit past the header, checksums made right again: the
    // file parses, and its signature refuses it.
    let mut refused = 0;
    for at in HEADER..signed.len() - MAC {
        let mut edited = signed.clone();
        edited[at] ^= 0x01;
        recompute_checksums(&mut edited);
        if edited == signed {
            // A checksum's own byte: made right again, nothing changed.
            refused += 1;
            continue;
        }
        match Snapshot::parse(edited) {
            Ok(s) => {
                assert!(s.verify(&key).is_err(), "an edit at {at} passed");
                refused += 1;
            }
            Err(_) => refused += 1,
        }
    }
    assert_eq!(refused, signed.len() - MAC - HEADER);
    // Unsigned: a key finds no signature.
    let plain = Snapshot::parse(b.to_bytes()).unwrap();
    assert!(matches!(plain.verify(&key), Err(SnapshotError::Unsigned)));
    assert!(matches!(
        b.to_signed_bytes(b"short"),
        Err(SnapshotError::WeakKey(5))
    ));
}

#[test]
fn an_endless_reader_is_refused_at_its_header_without_reading_on() {
    // /dev/zero: not a snapshot, refused after 28 bytes.
    let zero = std::fs::File::open("/dev/zero").unwrap();
    assert!(matches!(
        Snapshot::read_from(zero, "zero"),
        Err(SnapshotError::NotASnapshot)
    ));
    // A valid header announcing 200 MiB, then zeros for ever: read no further than
    // announced (and refused as not matching).
    let (b, _, _) = sample();
    let mut bytes = b.to_bytes();
    bytes[16..24].copy_from_slice(&(200u64 << 20).to_le_bytes());
    recompute_checksums(&mut bytes);
    let endless = std::io::Read::chain(&bytes[..HEADER], std::io::repeat(0));
    assert!(Snapshot::read_from(endless, "endless").is_err());
    // Announcing more than the largest file is refused at once.
    bytes[16..24].copy_from_slice(&(MAX_FILE + 1).to_le_bytes());
    recompute_checksums(&mut bytes);
    let endless = std::io::Read::chain(&bytes[..HEADER], std::io::repeat(0));
    assert!(matches!(
        Snapshot::read_from(endless, "endless"),
        Err(SnapshotError::Io { .. })
    ));
}
