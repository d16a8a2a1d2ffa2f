//! A CMOS real-time clock (MC146818) at ports 0x70/0x71, good enough for Linux to read
//! the date: time and date registers from the host clock in BCD or binary as the guest
//! chooses, a never-set update-in-progress bit, a valid-RAM flag, and 128 bytes of CMOS
//! RAM for the rest.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;

/// Index port.
pub const RTC_BASE: u16 = 0x70;
/// Ports covered (index and data).
pub const RTC_SIZE: u16 = 2;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;
const B_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
const D_VALID_RAM: u8 = 0x80;
/// 32.768 kHz time base, 1024 Hz rate; bit 7 (update in progress) always clear.
const A_DEFAULT: u8 = 0x26;

/// A broken-down UTC date and time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateTime {
    /// Full year.
    pub year: u32,
    /// 1..=12.
    pub month: u8,
    /// 1..=31.
    pub day: u8,
    /// 0..=23.
    pub hour: u8,
    /// 0..=59.
    pub minute: u8,
    /// 0..=59.
    pub second: u8,
    /// 1 (Sunday) ..= 7.
    pub weekday: u8,
}

impl DateTime {
    /// The UTC date and time `secs` seconds after the Unix epoch.
    pub fn from_unix(secs: u64) -> Self {
        let days = secs / 86_400;
        let rem = secs % 86_400;
        // Civil-from-days (proleptic Gregorian), shifted so years start in March.
        let z = days as i64 + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
        let year = (yoe + era * 400 + i64::from(month <= 2)) as u32;
        DateTime {
            year,
            month,
            day,
            hour: (rem / 3600) as u8,
            minute: (rem / 60 % 60) as u8,
            second: (rem % 60) as u8,
            // 1970-01-01 was a Thursday (5 with Sunday = 1).
            weekday: ((days + 4) % 7 + 1) as u8,
        }
    }
}

fn to_bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

struct RtcState {
    index: u8,
    cmos: [u8; 128],
}

/// The CMOS RTC device.
pub struct Rtc {
    state: Mutex<RtcState>,
    clock: Box<dyn Fn() -> u64 + Send + Sync>,
}

impl std::fmt::Debug for Rtc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rtc").finish_non_exhaustive()
    }
}

impl Default for Rtc {
    fn default() -> Self {
        Self::new()
    }
}

/// The state of an [`Rtc`] in a snapshot: the index register and the CMOS bytes. The
/// time registers follow the clock, as a battery-backed RTC's would.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RtcSaved {
    /// The selected register.
    pub index: u8,
    /// The 128 bytes of CMOS.
    pub cmos: Vec<u8>,
}

impl vmcraft_snapshot::Versioned for RtcSaved {
    const VERSION: u32 = 1;
}

impl Rtc {
    /// The CMOS state, for a snapshot.
    pub fn save_state(&self) -> RtcSaved {
        let s = self.lock();
        RtcSaved {
            index: s.index,
            cmos: s.cmos.to_vec(),
        }
    }

    /// Put back a state from [`Rtc::save_state`].
    pub fn restore_state(&self, saved: &RtcSaved) -> Result<(), crate::state::StateError> {
        let cmos: [u8; 128] = saved.cmos.as_slice().try_into().map_err(|_| {
            crate::state::StateError::new(
                "CMOS RTC",
                format!("{} bytes of CMOS instead of 128", saved.cmos.len()),
            )
        })?;
        if saved.index >= 128 {
            return Err(crate::state::StateError::new(
                "CMOS RTC",
                format!("index register {} past the 128 CMOS bytes", saved.index),
            ));
        }
        *self.lock() = RtcState {
            index: saved.index,
            cmos,
        };
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RtcState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An RTC following the host's clock.
    pub fn new() -> Self {
        Self::with_clock(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        })
    }

    /// An RTC following `clock` (seconds since the Unix epoch), for tests and for
    /// guests that should see another time.
    pub fn with_clock(clock: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        let mut cmos = [0u8; 128];
        cmos[usize::from(REG_A)] = A_DEFAULT;
        cmos[usize::from(REG_B)] = B_24H;
        cmos[usize::from(REG_D)] = D_VALID_RAM;
        Rtc {
            state: Mutex::new(RtcState { index: 0, cmos }),
            clock: Box::new(clock),
        }
    }

    fn read_register(&self, state: &RtcState, index: u8) -> u8 {
        let b = state.cmos[usize::from(REG_B)];
        let enc = |v: u8| if b & B_BINARY != 0 { v } else { to_bcd(v) };
        let now = || DateTime::from_unix((self.clock)());
        match index {
            REG_SECONDS => enc(now().second),
            REG_MINUTES => enc(now().minute),
            REG_HOURS => {
                let h = now().hour;
                if b & B_24H != 0 {
                    enc(h)
                } else {
                    let h12 = if h % 12 == 0 { 12 } else { h % 12 };
                    enc(h12) | if h >= 12 { 0x80 } else { 0 }
                }
            }
            REG_WEEKDAY => enc(now().weekday),
            REG_DAY => enc(now().day),
            REG_MONTH => enc(now().month),
            REG_YEAR => enc((now().year % 100) as u8),
            REG_CENTURY => enc((now().year / 100) as u8),
            REG_C => 0,
            REG_D => D_VALID_RAM,
            i => state.cmos[usize::from(i & 0x7f)],
        }
    }
}

impl DevicePio for Rtc {
    fn pio_read(&self, _: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0xff);
        let [byte] = data else { return };
        let state = self.lock();
        *byte = match offset {
            0 => state.index,
            _ => self.read_register(&state, state.index),
        };
    }

    fn pio_write(&self, _: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let [value] = data else { return };
        let mut state = self.lock();
        match offset {
            // Bit 7 of the index port is the NMI mask, not part of the index.
            0 => state.index = value & 0x7f,
            _ => match state.index {
                // The clock follows the host; the status bits the guest may set are kept.
                REG_SECONDS | REG_MINUTES | REG_HOURS | REG_WEEKDAY | REG_DAY | REG_MONTH
                | REG_YEAR | REG_CENTURY | REG_C | REG_D => {}
                REG_A => state.cmos[usize::from(REG_A)] = value & 0x7f,
                i => state.cmos[usize::from(i)] = *value,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_a_wrong_cmos_or_index_is_refused() {
        let a = Rtc::with_clock(|| 0);
        a.pio_write(PioAddress(RTC_BASE), 0, &[0x30]);
        a.pio_write(PioAddress(RTC_BASE), 1, &[0x42]);
        let saved = a.save_state();
        let b = Rtc::with_clock(|| 0);
        b.restore_state(&saved).unwrap();
        assert_eq!(b.save_state(), saved);
        assert_eq!(read(&b, 0x30), 0x42);
        let short = RtcSaved {
            cmos: vec![0; 64],
            ..saved.clone()
        };
        assert_eq!(
            b.restore_state(&short).unwrap_err().to_string(),
            "cannot restore the CMOS RTC: 64 bytes of CMOS instead of 128"
        );
        let past = RtcSaved {
            index: 200,
            ..saved
        };
        assert!(b.restore_state(&past).is_err());
    }

    fn read(rtc: &Rtc, index: u8) -> u8 {
        rtc.pio_write(PioAddress(RTC_BASE), 0, &[index | 0x80]);
        let mut b = [0u8];
        rtc.pio_read(PioAddress(RTC_BASE), 1, &mut b);
        b[0]
    }

    #[test]
    fn dates_convert() {
        assert_eq!(
            DateTime::from_unix(0),
            DateTime {
                year: 1970,
                month: 1,
                day: 1,
                hour: 0,
                minute: 0,
                second: 0,
                weekday: 5
            }
        );
        // 2026-11-22 13:45:07 UTC, a Sunday.
        assert_eq!(
            DateTime::from_unix(1_795_355_107),
            DateTime {
                year: 2026,
                month: 11,
                day: 22,
                hour: 13,
                minute: 45,
                second: 7,
                weekday: 1
            }
        );
        // 2000-02-29, a leap day.
        assert_eq!(DateTime::from_unix(951_782_400).day, 29);
    }

    #[test]
    fn linux_reads_bcd_then_binary() {
        let rtc = Rtc::with_clock(|| 1_795_355_107);
        assert_eq!(read(&rtc, REG_A) & 0x80, 0, "never update-in-progress");
        assert_eq!(read(&rtc, REG_D), D_VALID_RAM);
        let fields = [
            REG_SECONDS,
            REG_MINUTES,
            REG_HOURS,
            REG_DAY,
            REG_MONTH,
            REG_YEAR,
            REG_CENTURY,
        ];
        let bcd: Vec<u8> = fields.iter().map(|&r| read(&rtc, r)).collect();
        assert_eq!(bcd, vec![0x07, 0x45, 0x13, 0x22, 0x11, 0x26, 0x20]);
        rtc.pio_write(PioAddress(RTC_BASE), 0, &[REG_B]);
        rtc.pio_write(PioAddress(RTC_BASE), 1, &[B_24H | B_BINARY]);
        let bin: Vec<u8> = fields.iter().map(|&r| read(&rtc, r)).collect();
        assert_eq!(bin, vec![7, 45, 13, 22, 11, 26, 20]);
        rtc.pio_write(PioAddress(RTC_BASE), 0, &[REG_B]);
        rtc.pio_write(PioAddress(RTC_BASE), 1, &[0]);
        assert_eq!(read(&rtc, REG_HOURS), 0x81, "1 PM in 12-hour BCD");
    }

    #[test]
    fn cmos_ram_keeps_values_and_ignores_wide_accesses() {
        let rtc = Rtc::with_clock(|| 0);
        rtc.pio_write(PioAddress(RTC_BASE), 0, &[0x40]);
        rtc.pio_write(PioAddress(RTC_BASE), 1, &[0x5a]);
        rtc.pio_write(PioAddress(RTC_BASE), 1, &[1, 2]);
        assert_eq!(read(&rtc, 0x40), 0x5a);
        let mut w = [0u8; 2];
        rtc.pio_read(PioAddress(RTC_BASE), 1, &mut w);
        assert_eq!(w, [0xff, 0xff]);
    }
}
