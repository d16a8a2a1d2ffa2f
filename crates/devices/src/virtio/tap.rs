//! A TAP interface: whole Ethernet frames in and out of the host's network stack.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use thiserror::Error;

/// `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
/// Longest interface name, terminating NUL excluded.
pub const MAX_NAME: usize = 15;

/// `struct ifreq` as TUNSETIFF reads it: a name and flags (40 bytes on x86-64).
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Errors from opening a TAP interface.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TapError {
    /// The name is empty, too long or has a NUL.
    #[error("invalid TAP interface name {0:?} (1 to 15 bytes, no NUL)")]
    InvalidName(String),
    /// A number of queues out of range.
    #[error("{0} TAP queues (1 to 256)")]
    Queues(u16),
    /// /dev/net/tun could not be opened.
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] io::Error),
    /// The kernel refused to create or attach the interface.
    #[error("cannot attach to TAP interface {name:?} (needs CAP_NET_ADMIN or an interface owned by this user)")]
    Attach {
        /// The interface.
        name: String,
        /// The ioctl's error.
        #[source]
        source: io::Error,
    },
}

/// An open TAP interface (non-blocking, without packet information headers).
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Create or attach to TAP interface `name`.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        Self::attach(name, IFF_TAP | IFF_NO_PI)
    }

    /// Create or attach to multi-queue TAP interface `name` and open `queues` of its
    /// queues (1 to 256), one per virtio-net queue pair: the host's stack steers each
    /// flow to one of them. With one queue this is [`Tap::open`]. An interface made
    /// without `multi_queue` cannot be attached with several: the kernel refuses it
    /// and the error names the interface.
    pub fn open_queues(name: &str, queues: u16) -> Result<Vec<Tap>, TapError> {
        match queues {
            0 | 257.. => Err(TapError::Queues(queues)),
            1 => Ok(vec![Self::open(name)?]),
            n => (0..n)
                .map(|_| Self::attach(name, IFF_TAP | IFF_NO_PI | IFF_MULTI_QUEUE))
                .collect(),
        }
    }

    fn attach(name: &str, flags: libc::c_short) -> Result<Tap, TapError> {
        if name.is_empty() || name.len() > MAX_NAME || name.contains('\0') {
            return Err(TapError::InvalidName(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq {
            name: [0; 16],
            flags,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `req` is laid out
        // as (40 bytes, name first, flags at offset 16); the fd is open.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) };
        if rc < 0 {
            return Err(TapError::Attach {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(Tap {
            file,
            name: name.to_string(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl super::net::FrameIo for Tap {
    fn recv_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }
    fn send_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        (&self.file).write(frame).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_counts_out_of_range_are_refused_before_the_kernel_sees_them() {
        for n in [0, 257] {
            assert!(matches!(
                Tap::open_queues("t0", n),
                Err(TapError::Queues(_))
            ));
        }
    }

    #[test]
    fn bad_names_are_refused_before_the_kernel_sees_them() {
        for name in ["", "a-name-that-is-too-long", "nul\0"] {
            assert!(
                matches!(Tap::open(name), Err(TapError::InvalidName(_))),
                "{name:?}"
            );
        }
    }
}
