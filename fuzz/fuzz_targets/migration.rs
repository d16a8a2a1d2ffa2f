//! The migration destination's receiver under any messages: bytes cut into records
//! (a length byte each) are decoded as the channel would hand them over, and fed to
//! the receiver of a 2 MiB machine. Decoding and receiving never panic, pages land only
//! inside guest RAM, and the state file gathered never exceeds what was announced or
//! the bound for the machine's size.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmcraft::migration::wire::{state_limit, Message};
use vmcraft::migration::{Received, Receiver};
use vmcraft_memory::layout::MemoryLayout;
use vmcraft_memory::GuestRam;

const RAM: u64 = 2 << 20;

fuzz_target!(|data: &[u8]| {
    let ram = GuestRam::new(&MemoryLayout::x86_64(RAM).unwrap()).unwrap();
    let vcpus = u32::from(data.first().copied().unwrap_or(1));
    let mut receiver = Receiver::new(ram.memory().clone(), RAM, vcpus);
    let mut rest = data.get(1..).unwrap_or_default();
    // Page-sized messages are rare in random bytes: a length byte of 0xff stands for
    // a PAGES message of one page, its address the next two bytes (in pages).
    let mut scratch = Vec::new();
    while let Some((&len, tail)) = rest.split_first() {
        let record: &[u8] = if len == 0xff && tail.len() >= 2 {
            let page = u64::from(u16::from_le_bytes([tail[0], tail[1]]));
            scratch.clear();
            scratch.push(4);
            scratch.extend_from_slice(&(page * 4096).to_le_bytes());
            scratch.extend(std::iter::repeat_n(tail[0], 4096));
            rest = &tail[2..];
            &scratch
        } else {
            let n = usize::from(len).min(tail.len());
            let (record, after) = tail.split_at(n);
            rest = after;
            record
        };
        let Ok(message) = Message::decode(record) else {
            continue;
        };
        match receiver.take(message) {
            Ok(Received::State(state)) => {
                assert!(state.len() as u64 <= state_limit(RAM, vcpus));
                return;
            }
            Ok(Received::More) => {}
            Err(_) => return,
        }
    }
});
