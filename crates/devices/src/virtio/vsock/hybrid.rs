//! Firecracker's "hybrid vsock" on the host: vsock connections as Unix socket
//! streams, so the agents and tools written for Firecracker work unchanged (and
//! rust-vmm's `vhost-device-vsock`, which speaks the same).
//!
//! * The host connects to the device's socket (`uds_path`) and writes
//!   `CONNECT <port>\n`; once the guest accepts, the device writes
//!   `OK <host port>\n` and from then on the stream is the connection's. A guest that
//!   refuses, a port that is not a number, or a line that is not that command: the
//!   device closes the stream.
//! * A guest that connects to host port `P` reaches whoever listens on the Unix
//!   socket `<uds_path>_P`; nobody: the guest gets a reset.
//!
//! This module is the command line's reading, bounded and plain (a fuzz target's):
//! the bytes of a stream that has not connected yet go to a [`CommandReader`] until
//! it has a whole line.
//!
//! ```
//! use vmcraft_devices::virtio::vsock::hybrid::{CommandReader, Command, ok_line};
//! let mut r = CommandReader::default();
//! assert_eq!(r.feed(b"CONNECT 5"), Ok(None)); // more to come
//! assert_eq!(r.feed(b"2\n"), Ok(Some(Command::Connect(52))));
//! assert_eq!(ok_line(1 << 30), "OK 1073741824\n");
//! ```

use std::path::{Path, PathBuf};

/// The longest command line taken (`CONNECT ` and ten digits and the newline, with
/// room to spare); a longer one is refused.
pub const MAX_LINE: usize = 32;

/// What a host client asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Connect to the guest's port.
    Connect(u32),
}

/// A command line refused: the device closes the stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    /// No newline within [`MAX_LINE`] bytes.
    #[error("no newline in the first {MAX_LINE} bytes")]
    TooLong,
    /// Not `CONNECT <port>`.
    #[error("not a CONNECT command: {0:?}")]
    NotConnect(String),
    /// The port is not a decimal number that fits 32 bits.
    #[error("not a port: {0:?}")]
    Port(String),
    /// Bytes after the newline before the guest accepted (the stream is not the
    /// connection's until `OK` came).
    #[error("{0} bytes sent after the command, before OK")]
    Early(usize),
}

/// The bytes of a command line as they arrive.
#[derive(Debug, Default, Clone)]
pub struct CommandReader {
    line: Vec<u8>,
    done: bool,
}

impl CommandReader {
    /// Take `bytes`: the command once its line is whole, `None` until then.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Option<Command>, CommandError> {
        if self.done {
            return Err(CommandError::Early(bytes.len()));
        }
        let Some(end) = bytes.iter().position(|&b| b == b'\n') else {
            if self.line.len() + bytes.len() > MAX_LINE {
                return Err(CommandError::TooLong);
            }
            self.line.extend_from_slice(bytes);
            return Ok(None);
        };
        if self.line.len() + end + 1 > MAX_LINE {
            return Err(CommandError::TooLong);
        }
        if end + 1 < bytes.len() {
            return Err(CommandError::Early(bytes.len() - end - 1));
        }
        self.line.extend_from_slice(&bytes[..end]);
        self.done = true;
        parse(&self.line).map(Some)
    }
}

fn parse(line: &[u8]) -> Result<Command, CommandError> {
    let text = String::from_utf8_lossy(line);
    let line = text.strip_suffix('\r').unwrap_or(&text);
    let Some(port) = line.strip_prefix("CONNECT ") else {
        return Err(CommandError::NotConnect(line.to_string()));
    };
    let port = port.trim();
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(CommandError::Port(port.to_string()));
    }
    port.parse()
        .map(Command::Connect)
        .map_err(|_| CommandError::Port(port.to_string()))
}

/// The line that tells the host client its connection is the guest's, and the host
/// port it has.
pub fn ok_line(host_port: u32) -> String {
    format!("OK {host_port}\n")
}

/// Where a guest's connection to host port `port` goes: `<uds_path>_<port>`.
pub fn listener_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut p = uds_path.as_os_str().to_owned();
    p.push(format!("_{port}"));
    PathBuf::from(p)
}

/// The host's side of a connection to the guest's port `port`, through the device's
/// socket at `uds_path`: connects, sends `CONNECT <port>`, and waits (blocking, up to
/// `wait`) for `OK <host port>`. Returns the stream, the guest's from then on, and its
/// host port. A guest that refuses closes the stream: that is an error
/// ([`std::io::ErrorKind::ConnectionRefused`]).
pub fn connect_with_timeout(
    uds_path: &Path,
    port: u32,
    wait: std::time::Duration,
) -> std::io::Result<(std::os::unix::net::UnixStream, u32)> {
    use std::io::{Error, ErrorKind, Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(uds_path)?;
    stream.set_read_timeout(Some(wait))?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    // Byte by byte: what follows the line is the guest's.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.last() != Some(&b'\n') {
        if line.len() > MAX_LINE {
            return Err(Error::new(ErrorKind::InvalidData, "no OK line"));
        }
        match stream.read(&mut byte)? {
            0 => {
                return Err(Error::new(
                    ErrorKind::ConnectionRefused,
                    format!("the guest refused port {port}"),
                ))
            }
            _ => line.push(byte[0]),
        }
    }
    let text = String::from_utf8_lossy(&line);
    let host_port = text
        .strip_prefix("OK ")
        .and_then(|rest| rest.trim_end().parse().ok())
        .ok_or_else(|| Error::new(ErrorKind::InvalidData, format!("not an OK line: {text:?}")))?;
    stream.set_read_timeout(None)?;
    Ok((stream, host_port))
}

/// [`connect_with_timeout`] waiting up to 5 s.
pub fn connect(
    uds_path: &Path,
    port: u32,
) -> std::io::Result<(std::os::unix::net::UnixStream, u32)> {
    connect_with_timeout(uds_path, port, std::time::Duration::from_secs(5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connect_line_in_any_pieces_gives_its_port() {
        let line = b"CONNECT 4294967295\n";
        for split in 0..line.len() {
            let mut r = CommandReader::default();
            let first = r.feed(&line[..split]).unwrap();
            assert_eq!(first, None);
            assert_eq!(r.feed(&line[split..]), Ok(Some(Command::Connect(u32::MAX))));
        }
        let mut r = CommandReader::default();
        assert_eq!(r.feed(b"CONNECT 52\r\n"), Ok(Some(Command::Connect(52))));
        assert_eq!(r.feed(b"x"), Err(CommandError::Early(1)));
    }

    #[test]
    fn anything_else_is_refused_by_name() {
        let refuse = |bytes: &[u8]| CommandReader::default().feed(bytes).unwrap_err();
        assert!(matches!(
            refuse(b"connect 52\n"),
            CommandError::NotConnect(_)
        ));
        assert!(matches!(refuse(b"CONNECT\n"), CommandError::NotConnect(_)));
        assert!(matches!(
            refuse(b"CONNECT 4294967296\n"),
            CommandError::Port(_)
        ));
        assert!(matches!(refuse(b"CONNECT -1\n"), CommandError::Port(_)));
        assert!(matches!(refuse(b"CONNECT +1\n"), CommandError::Port(_)));
        assert!(matches!(refuse(b"CONNECT \n"), CommandError::Port(_)));
        assert_eq!(refuse(b"CONNECT 52\nhello"), CommandError::Early(5));
        assert_eq!(refuse(&[b'1'; 40]), CommandError::TooLong);
        let mut r = CommandReader::default();
        r.feed(&[b'C'; 30]).unwrap();
        assert_eq!(r.feed(b"xyz\n"), Err(CommandError::TooLong));
    }

    #[test]
    fn a_guests_connection_goes_to_the_ports_socket() {
        assert_eq!(
            listener_path(Path::new("/run/vm/v.sock"), 52),
            PathBuf::from("/run/vm/v.sock_52")
        );
    }
}
