//! The client side, for the programs that drive a VMM's API from Rust (the
//! `api-call` example, tests, benchmarks): one request on a stream, its answer read
//! by its `Content-Length` (the connection may stay open for the next).
//!
//! ```no_run
//! let mut vmm = std::os::unix::net::UnixStream::connect("/tmp/vmcraft.sock")?;
//! let (status, body) = vmcraft_api::client::call(&mut vmm, "GET", "/", "")?;
//! assert_eq!(status, 200, "{body}");
//! # Ok::<(), std::io::Error>(())
//! ```

use std::io::{self, Read, Write};

/// The most of an answer read (a VMM's answers are a few KiB).
pub const MAX_ANSWER: usize = 1 << 20;

/// Send `method path` with the JSON `body` (none if empty), read one answer: its
/// status code and body.
pub fn call(
    stream: &mut (impl Read + Write),
    method: &str,
    path: &str,
    body: &str,
) -> io::Result<(u16, String)> {
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes())?;
    let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "the connection closed after {:?}",
                    String::from_utf8_lossy(&got)
                ),
            ));
        }
        got.extend_from_slice(&buf[..n]);
        if got.len() > MAX_ANSWER {
            return Err(invalid(format!("an answer over {MAX_ANSWER} bytes")));
        }
        let text = String::from_utf8_lossy(&got);
        let Some(at) = text.find("\r\n\r\n") else {
            continue;
        };
        let len: usize = text[..at]
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .unwrap_or(0);
        if got.len() >= at + 4 + len {
            let status = text
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| invalid(format!("a bad status line in {text:?}")))?;
            return Ok((status, text[at + 4..at + 4 + len].to_string()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream whose reads give `answer` in pieces of `piece` bytes and whose
    /// writes are kept.
    struct Canned {
        answer: Vec<u8>,
        piece: usize,
        sent: Vec<u8>,
    }

    impl Read for Canned {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.piece.min(buf.len()).min(self.answer.len());
            buf[..n].copy_from_slice(&self.answer[..n]);
            self.answer.drain(..n);
            Ok(n)
        }
    }

    impl Write for Canned {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.sent.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn canned(answer: &str, piece: usize) -> Canned {
        Canned {
            answer: answer.as_bytes().to_vec(),
            piece,
            sent: Vec::new(),
        }
    }

    #[test]
    fn an_answer_in_any_pieces_is_read_by_its_length() {
        for piece in [1, 7, 4096] {
            let mut s = canned(
                "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}HTTP/1.1 204",
                piece,
            );
            assert_eq!(call(&mut s, "GET", "/", "").unwrap(), (200, "{}".into()));
            let sent = String::from_utf8(s.sent).unwrap();
            assert!(sent.starts_with("GET / HTTP/1.1\r\n") && sent.ends_with("\r\n\r\n"));
        }
        let mut s = canned("HTTP/1.1 204 No Content\r\n\r\n", 3);
        assert_eq!(
            call(&mut s, "PUT", "/vm", r#"{"state":"Paused"}"#).unwrap(),
            (204, String::new())
        );
        assert!(String::from_utf8(s.sent)
            .unwrap()
            .ends_with(r#"{"state":"Paused"}"#));
    }

    #[test]
    fn a_closed_or_broken_answer_is_an_error() {
        let eof = call(&mut canned("HTTP/1.1 200 OK\r\n", 64), "GET", "/", "").unwrap_err();
        assert_eq!(eof.kind(), io::ErrorKind::UnexpectedEof);
        let bad = call(&mut canned("HELLO\r\n\r\n", 64), "GET", "/", "").unwrap_err();
        assert_eq!(bad.kind(), io::ErrorKind::InvalidData);
    }
}
