//! HTTP/1.1 as the API speaks it: one request at a time off a byte stream (parsed by
//! `httparse`), bounded, and a response written back. Only what Firecracker's API
//! uses is accepted: GET, PUT and PATCH, a body of `Content-Length` bytes (no chunked
//! bodies), `Expect: 100-continue` answered, persistent connections unless the client
//! says `Connection: close`.
//!
//! ```
//! use vmcraft_api::http::{Connection, Method};
//! let wire = b"PUT /actions HTTP/1.1\r\nContent-Length: 31\r\n\r\n{\"action_type\":\"InstanceStart\"}";
//! let mut conn = Connection::default();
//! let req = conn.read_request(&mut &wire[..], &mut std::io::sink()).unwrap().unwrap();
//! assert_eq!((req.method, req.path.as_str()), (Method::Put, "/actions"));
//! assert_eq!(req.body.len(), 31);
//! ```

use std::io::{Read, Write};

use thiserror::Error;

/// The most bytes of a request line and headers.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// The most bytes of a body (Firecracker's default `--http-api-max-payload-size`).
pub const MAX_BODY_BYTES: usize = 51_200;
/// The most headers.
const MAX_HEADERS: usize = 32;

/// The methods the API has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// GET.
    Get,
    /// PUT.
    Put,
    /// PATCH.
    Patch,
}

/// One request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRequest {
    /// Its method.
    pub method: Method,
    /// Its path (without a query, which the API does not use).
    pub path: String,
    /// Its body (empty if none).
    pub body: Vec<u8>,
    /// Whether the client asked to close the connection after the response.
    pub close: bool,
}

/// Why a request could not be read; the connection is answered with 400 (or not at
/// all, for I/O errors) and closed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum HttpError {
    /// The request line and headers, or the body, are larger than allowed.
    #[error("the request's {what} is larger than {limit} bytes")]
    TooLarge {
        /// Head or body.
        what: &'static str,
        /// The limit.
        limit: usize,
    },
    /// Not HTTP/1.x as the API speaks it.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// A method the API does not have.
    #[error("invalid HTTP method {0}")]
    Method(String),
    /// The stream failed.
    #[error("reading the request")]
    Io(#[from] std::io::Error),
}

/// The bytes read off one connection and not used yet (a client may send its next
/// request before the response to the last).
#[derive(Debug, Default)]
pub struct Connection {
    buf: Vec<u8>,
    /// Whether `100 Continue` was sent for the request being read.
    continued: bool,
}

impl Connection {
    /// Whether bytes of a next request were read and wait here (a client that sent
    /// it before the answer to the last).
    pub fn has_pending(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Read the next request from `stream` (`Ok(None)`: the client closed the
    /// connection between requests). `Expect: 100-continue` is answered on `out`.
    pub fn read_request(
        &mut self,
        stream: &mut impl Read,
        out: &mut impl Write,
    ) -> Result<Option<HttpRequest>, HttpError> {
        // The head: until the blank line.
        let head_len = loop {
            if let Some(at) = find(&self.buf, b"\r\n\r\n") {
                break at + 4;
            }
            if self.buf.len() > MAX_HEAD_BYTES {
                return Err(HttpError::TooLarge {
                    what: "head",
                    limit: MAX_HEAD_BYTES,
                });
            }
            if !self.fill(stream)? {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(HttpError::Malformed(
                    "the connection closed mid-request".into(),
                ));
            }
        };
        if head_len > MAX_HEAD_BYTES {
            return Err(HttpError::TooLarge {
                what: "head",
                limit: MAX_HEAD_BYTES,
            });
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(&self.buf[..head_len]) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => {
                return Err(HttpError::Malformed("an incomplete head".into()))
            }
            Err(e) => return Err(HttpError::Malformed(e.to_string())),
        }
        let method = match parsed.method.unwrap_or_default() {
            "GET" => Method::Get,
            "PUT" => Method::Put,
            "PATCH" => Method::Patch,
            other => return Err(HttpError::Method(other.into())),
        };
        if parsed.version != Some(1) && parsed.version != Some(0) {
            return Err(HttpError::Malformed("not HTTP/1.x".into()));
        }
        let path = parsed.path.unwrap_or_default();
        let path = path.split('?').next().unwrap_or_default().to_string();
        let mut length: Option<usize> = None;
        let mut close = parsed.version == Some(0);
        let mut expect_continue = false;
        for h in parsed.headers.iter() {
            let value = std::str::from_utf8(h.value)
                .map_err(|_| HttpError::Malformed(format!("header {} is not text", h.name)))?
                .trim();
            match h.name.to_ascii_lowercase().as_str() {
                "content-length" => {
                    let n = value
                        .parse::<usize>()
                        .map_err(|_| HttpError::Malformed(format!("Content-Length {value:?}")))?;
                    if length.is_some_and(|l| l != n) {
                        return Err(HttpError::Malformed("two Content-Lengths".into()));
                    }
                    length = Some(n);
                }
                "transfer-encoding" => {
                    return Err(HttpError::Malformed(format!(
                        "Transfer-Encoding {value:?} (bodies have a Content-Length)"
                    )))
                }
                "connection" => close = value.eq_ignore_ascii_case("close"),
                "expect" => expect_continue = value.eq_ignore_ascii_case("100-continue"),
                _ => {}
            }
        }
        let length = length.unwrap_or(0);
        if length > MAX_BODY_BYTES {
            return Err(HttpError::TooLarge {
                what: "body",
                limit: MAX_BODY_BYTES,
            });
        }
        // The buffer keeps the head until the body is whole: a stream that has no
        // more for now (a non-blocking socket) is read again from the start.
        let needed = head_len + length;
        if expect_continue && !self.continued && self.buf.len() < needed {
            out.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
            self.continued = true;
        }
        while self.buf.len() < needed {
            if !self.fill(stream)? {
                return Err(HttpError::Malformed(
                    "the connection closed mid-body".into(),
                ));
            }
        }
        self.continued = false;
        let body = self.buf[head_len..needed].to_vec();
        self.buf.drain(..needed);
        Ok(Some(HttpRequest {
            method,
            path,
            body,
            close,
        }))
    }

    /// Read more; false at the end of the stream.
    fn fill(&mut self, stream: &mut impl Read) -> Result<bool, HttpError> {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(true);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(HttpError::Io(e)),
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A response: a status and, but for 204, a JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The JSON body.
    pub body: Option<String>,
}

impl Response {
    /// 204 No Content: the request was carried out.
    pub fn no_content() -> Self {
        Response {
            status: 204,
            body: None,
        }
    }

    /// 200 with `value` as JSON.
    pub fn ok(value: &impl serde::Serialize) -> Self {
        match serde_json::to_string(value) {
            Ok(body) => Response {
                status: 200,
                body: Some(body),
            },
            Err(e) => Response::error(500, &format!("cannot encode the response: {e}")),
        }
    }

    /// `status` with `{"fault_message": message}`.
    pub fn error(status: u16, message: &str) -> Self {
        let body = crate::types::ApiErrorBody {
            fault_message: message.to_string(),
        };
        Response {
            status,
            body: Some(serde_json::to_string(&body).unwrap_or_else(|_| "{}".into())),
        }
    }

    fn reason(&self) -> &'static str {
        match self.status {
            200 => "OK",
            204 => "No Content",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            413 => "Payload Too Large",
            _ => "Internal Server Error",
        }
    }

    /// Write it to `out`, with `Connection: close` if `close`.
    pub fn write_to(&self, out: &mut impl Write, close: bool) -> std::io::Result<()> {
        let body = self.body.as_deref().unwrap_or("");
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nServer: vmcraft API\r\n",
            self.status,
            self.reason()
        );
        if self.body.is_some() {
            head.push_str("Content-Type: application/json\r\n");
        }
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        if close {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        out.write_all(head.as_bytes())?;
        out.write_all(body.as_bytes())?;
        out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(wire: &[u8]) -> (Vec<Result<Option<HttpRequest>, String>>, Vec<u8>) {
        let mut conn = Connection::default();
        let mut stream = wire;
        let mut out = Vec::new();
        let mut got = Vec::new();
        for _ in 0..4 {
            let r = conn
                .read_request(&mut stream, &mut out)
                .map_err(|e| e.to_string());
            let end = matches!(r, Ok(None) | Err(_));
            got.push(r);
            if end {
                break;
            }
        }
        (got, out)
    }

    #[test]
    fn pipelined_requests_come_one_by_one_and_a_clean_close_ends() {
        let wire = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\nPATCH /vm HTTP/1.1\r\ncontent-length: 18\r\nConnection: close\r\n\r\n{\"state\":\"Paused\"}";
        let (got, _) = read_all(wire);
        let first = got[0].as_ref().unwrap().as_ref().unwrap();
        assert_eq!(
            (first.method, first.path.as_str(), first.close),
            (Method::Get, "/", false)
        );
        let second = got[1].as_ref().unwrap().as_ref().unwrap();
        assert_eq!(
            (second.method, second.body.as_slice(), second.close),
            (Method::Patch, &b"{\"state\":\"Paused\"}"[..], true)
        );
        assert!(matches!(got[2], Ok(None)));
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let cases: [(&[u8], &str); 7] = [
            (
                b"DELETE /drives/x HTTP/1.1\r\n\r\n",
                "invalid HTTP method DELETE",
            ),
            (
                b"PUT /actions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                "Transfer-Encoding",
            ),
            (
                b"PUT /actions HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
                "body is larger than 51200",
            ),
            (
                b"PUT /actions HTTP/1.1\r\nContent-Length: x\r\n\r\n",
                "Content-Length \"x\"",
            ),
            (
                b"PUT /actions HTTP/1.1\r\nContent-Length: 10\r\n\r\n{}",
                "closed mid-body",
            ),
            (b"GET / HTTP/1.1\r\nHost", "closed mid-request"),
            (
                b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                "two Content-Lengths",
            ),
        ];
        for (wire, want) in cases {
            let (got, _) = read_all(wire);
            let err = got[0].as_ref().unwrap_err();
            assert!(err.contains(want), "{err} (wanted {want})");
        }
        let huge = [
            b"GET / HTTP/1.1\r\nX: ".as_slice(),
            &[b'a'; MAX_HEAD_BYTES + 10],
        ]
        .concat();
        let (got, _) = read_all(&huge);
        assert!(got[0].as_ref().unwrap_err().contains("head is larger"));
    }

    #[test]
    fn expect_continue_is_answered_before_the_body_is_read() {
        struct Slow<'a>(&'a [u8], usize);
        impl Read for Slow<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let n = buf.len().min(self.1).min(self.0.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let head = b"PUT /logger HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 21\r\n\r\n";
        let wire = [head.as_slice(), b"{\"log_path\":\"/l.log\"}"].concat();
        let mut stream = Slow(&wire, head.len());
        let mut out = Vec::new();
        let req = Connection::default()
            .read_request(&mut stream, &mut out)
            .unwrap()
            .unwrap();
        assert_eq!(out, b"HTTP/1.1 100 Continue\r\n\r\n");
        assert_eq!(req.body.len(), 21);
    }

    #[test]
    fn responses_carry_their_length_and_json_errors() {
        let mut out = Vec::new();
        Response::no_content().write_to(&mut out, false).unwrap();
        assert_eq!(
            out,
            b"HTTP/1.1 204 No Content\r\nServer: vmcraft API\r\nContent-Length: 0\r\n\r\n"
        );
        let mut out = Vec::new();
        Response::error(400, "no \"kernel\"")
            .write_to(&mut out, true)
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        assert!(text.contains("Connection: close\r\n"));
        assert!(text.ends_with("{\"fault_message\":\"no \\\"kernel\\\"\"}"));
    }
}
