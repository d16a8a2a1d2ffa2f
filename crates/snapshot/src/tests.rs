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
