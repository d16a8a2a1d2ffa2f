//! The host's memory pressure: Linux's pressure stall information,
//! `/proc/pressure/memory`:
//!
//! ```text
//! some avg10=1.23 avg60=0.45 avg300=0.10 total=123456
//! full avg10=0.50 avg60=0.20 avg300=0.05 total=65432
//! ```
//!
//! `some avg10` is the share of the last ten seconds in which at least one task waited
//! for memory.
//!
//! ```
//! use vmcraft_balancer::psi::Pressure;
//!
//! let p = Pressure::parse("some avg10=15.00 avg60=2.00 avg300=0.50 total=1\nfull avg10=1.00 avg60=0.20 avg300=0.05 total=1\n").unwrap();
//! assert_eq!(p.some_avg10, 15.0);
//! assert_eq!(p.level(), 0.5); // halfway from 5 % to 25 %
//! ```

use thiserror::Error;

/// A pressure file that does not parse.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PsiError {
    /// No `some` line with an `avg10` field.
    #[error("no \"some avg10=\" in the pressure file")]
    NoSome,
    /// A number that does not parse.
    #[error("\"{0}\" is not a percentage")]
    BadNumber(String),
    /// The file could not be read.
    #[error("cannot read {0}")]
    Read(String),
}

/// Below this share of stalled time (percent) the host is calm.
pub const CALM: f64 = 5.0;
/// At or above this share (percent) the host is under full pressure.
pub const PRESSED: f64 = 25.0;

/// The memory pressure figures the balancer uses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pressure {
    /// `some avg10`, percent.
    pub some_avg10: f64,
    /// `full avg10`, percent (0 where the kernel has no `full` line).
    pub full_avg10: f64,
}

impl Pressure {
    /// Parse the text of `/proc/pressure/memory`.
    pub fn parse(text: &str) -> Result<Self, PsiError> {
        let avg10 = |kind: &str| -> Result<Option<f64>, PsiError> {
            let Some(line) = text
                .lines()
                .find(|l| l.split_whitespace().next() == Some(kind))
            else {
                return Ok(None);
            };
            let Some(field) = line
                .split_whitespace()
                .find_map(|f| f.strip_prefix("avg10="))
            else {
                return Ok(None);
            };
            let v: f64 = field
                .parse()
                .map_err(|_| PsiError::BadNumber(field.chars().take(32).collect()))?;
            if !(0.0..=100.0).contains(&v) {
                return Err(PsiError::BadNumber(field.chars().take(32).collect()));
            }
            Ok(Some(v))
        };
        Ok(Pressure {
            some_avg10: avg10("some")?.ok_or(PsiError::NoSome)?,
            full_avg10: avg10("full")?.unwrap_or(0.0),
        })
    }

    /// Read the host's `/proc/pressure/memory`.
    pub fn read() -> Result<Self, PsiError> {
        let path = "/proc/pressure/memory";
        let text =
            std::fs::read_to_string(path).map_err(|e| PsiError::Read(format!("{path}: {e}")))?;
        Self::parse(&text)
    }

    /// Read it again from `file`, `/proc/pressure/memory` opened once (a thread
    /// that may not open files by path, as a sandboxed one, keeps it open).
    pub fn read_from(file: &std::fs::File) -> Result<Self, PsiError> {
        use std::os::unix::fs::FileExt;
        let mut buf = [0u8; 512];
        let n = file
            .read_at(&mut buf, 0)
            .map_err(|e| PsiError::Read(format!("/proc/pressure/memory: {e}")))?;
        Self::parse(&String::from_utf8_lossy(&buf[..n]))
    }

    /// The pressure as the balancer takes it, 0 to 1: 0 below [`CALM`], 1 at
    /// [`PRESSED`] and above, linear between.
    pub fn level(&self) -> f64 {
        ((self.some_avg10 - CALM) / (PRESSED - CALM)).clamp(0.0, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_the_kernel_writes_and_refuses_the_rest() {
        let p = Pressure::parse("some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n").unwrap();
        assert_eq!((p.some_avg10, p.full_avg10, p.level()), (0.0, 0.0, 0.0));
        let p = Pressure::parse(
            "some avg10=40.10 avg60=2 avg300=1 total=9\nfull avg10=3.5 avg60=1 avg300=0 total=3\n",
        )
        .unwrap();
        assert_eq!((p.some_avg10, p.full_avg10, p.level()), (40.1, 3.5, 1.0));
        assert_eq!(Pressure::parse(""), Err(PsiError::NoSome));
        assert_eq!(Pressure::parse("full avg10=1.0"), Err(PsiError::NoSome));
        assert!(matches!(
            Pressure::parse("some avg10=lots"),
            Err(PsiError::BadNumber(_))
        ));
        assert!(matches!(
            Pressure::parse("some avg10=250.0"),
            Err(PsiError::BadNumber(_))
        ));
        assert!(matches!(
            Pressure::parse("some avg10=NaN"),
            Err(PsiError::BadNumber(_))
        ));
    }

    #[test]
    fn this_host_reports_a_pressure_if_it_has_the_file() {
        // Hosts without PSI (CONFIG_PSI off) give an error naming the file.
        match Pressure::read() {
            Ok(p) => {
                assert!((0.0..=1.0).contains(&p.level()));
                // Read again through the file kept open: still the kernel's format.
                let f = std::fs::File::open("/proc/pressure/memory").unwrap();
                for _ in 0..2 {
                    assert!((0.0..=1.0).contains(&Pressure::read_from(&f).unwrap().level()));
                }
            }
            Err(e) => assert!(e.to_string().contains("/proc/pressure/memory"), "{e}"),
        }
    }
}
