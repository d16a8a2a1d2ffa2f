//! The API's server: one thread that accepts clients on a Unix socket and answers
//! their requests in arrival order, through the embedding program's handler. Several
//! clients may be connected (an orchestrator's pooled connection and a one-off `curl`),
//! at most [`MAX_CLIENTS`]; each request is read whole (bounded by [`crate::http`])
//! before it is handled, a client that stalls mid-request for [`STALL`] is dropped,
//! and a request that cannot be read gets 400 and the connection closed. Nothing a
//! client sends makes the server open a file or grow without bound.
//!
//! ```no_run
//! use vmcraft_api::http::Response;
//! use vmcraft_api::routes::ApiRequest;
//! use vmcraft_api::server::ApiServer;
//! let mut server = ApiServer::bind("/tmp/vmm.sock".as_ref())?;
//! server.serve(|request| match request {
//!     ApiRequest::GetVersion => Response::ok(&serde_json::json!({"firecracker_version": "1.4.1"})),
//!     _ => Response::error(400, "not yet"),
//! }, || false)?;
//! # Ok::<(), std::io::Error>(())
//! ```

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::http::{Connection, HttpError, Response};
use crate::routes::{route, ApiRequest};

/// The most clients connected at once; more wait in the listen queue.
pub const MAX_CLIENTS: usize = 16;
/// How long a client may leave a request half-sent.
pub const STALL: Duration = Duration::from_secs(10);
/// How often the server looks at its stop condition while idle.
const TICK: Duration = Duration::from_millis(100);

#[derive(Debug)]
struct Client {
    stream: UnixStream,
    conn: Connection,
    /// When the client last sent bytes of an unfinished request.
    since: Option<Instant>,
}

/// A listening API socket. Dropping it removes the socket file it created.
#[derive(Debug)]
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    /// The connected clients, kept from one [`ApiServer::serve`] to the next: an
    /// orchestrator's pooled connection outlives the hand-over at `InstanceStart`.
    clients: Vec<Client>,
}

impl ApiServer {
    /// Listen on a new Unix socket at `path` (an existing file there is an error, as
    /// in Firecracker: remove a stale socket first).
    pub fn bind(path: &Path) -> std::io::Result<Self> {
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        Ok(ApiServer {
            listener,
            path: path.to_path_buf(),
            clients: Vec::new(),
        })
    }

    /// Where it listens.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Answer requests with `handle` until `stop` says so (looked at between
    /// requests, at least every 100 ms). I/O errors of one client end that client;
    /// only the listener's own errors end the server.
    pub fn serve(
        &mut self,
        mut handle: impl FnMut(ApiRequest) -> Response,
        stop: impl Fn() -> bool,
    ) -> std::io::Result<()> {
        let mut clients = std::mem::take(&mut self.clients);
        // Requests a client sent before the last `serve` stopped, already read.
        clients = clients
            .into_iter()
            .filter_map(|c| {
                if c.conn.has_pending() && !stop() {
                    serve_client(c, &mut handle, &stop)
                } else {
                    Some(c)
                }
            })
            .collect();
        while !stop() {
            let mut fds: Vec<libc::pollfd> = Vec::with_capacity(clients.len() + 1);
            fds.push(libc::pollfd {
                fd: self.listener.as_raw_fd(),
                events: if clients.len() < MAX_CLIENTS {
                    libc::POLLIN
                } else {
                    0
                },
                revents: 0,
            });
            fds.extend(clients.iter().map(|c| libc::pollfd {
                fd: c.stream.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }));
            // SAFETY: `fds` is a valid array of `fds.len()` pollfd structures that
            // lives across the call; poll writes only their `revents`.
            let ready = unsafe {
                libc::poll(
                    fds.as_mut_ptr(),
                    fds.len() as libc::nfds_t,
                    TICK.as_millis() as i32,
                )
            };
            if ready < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                self.clients = clients;
                return Err(e);
            }
            let mut keep = Vec::with_capacity(clients.len() + 1);
            for (client, fd) in clients.drain(..).zip(&fds[1..]) {
                if fd.revents == 0 {
                    let stalled = client.since.is_some_and(|t| t.elapsed() > STALL);
                    if stalled {
                        log::warn!("API: a client left a request half-sent for {STALL:?}: dropped");
                    } else {
                        keep.push(client);
                    }
                    continue;
                }
                if let Some(client) = serve_client(client, &mut handle, &stop) {
                    keep.push(client);
                }
            }
            // New clients after the others: `fds` has no entry for them yet.
            let accepted = if fds[0].revents & libc::POLLIN != 0 {
                self.accept(&mut keep)
            } else {
                Ok(())
            };
            clients = keep;
            if let Err(e) = accepted {
                self.clients = clients;
                return Err(e);
            }
        }
        self.clients = clients;
        Ok(())
    }

    fn accept(&self, clients: &mut Vec<Client>) -> std::io::Result<()> {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    // Reads never block the server: a client is read when poll says
                    // it sent something, and only what has arrived (MSG_DONTWAIT);
                    // a response's write blocks at most for STALL (a client that
                    // never reads is dropped then).
                    stream.set_write_timeout(Some(STALL))?;
                    if clients.len() >= MAX_CLIENTS {
                        // Over the limit: answered and closed at once.
                        let mut s = stream;
                        let _ = Response::error(503, "too many API clients").write_to(&mut s, true);
                        continue;
                    }
                    clients.push(Client {
                        stream,
                        conn: Connection::default(),
                        since: None,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        // The socket file this server made goes with it.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A stream that reads what has arrived and says `WouldBlock` when nothing more has
/// (without switching the socket to non-blocking mode: that is an ioctl, which the
/// API thread's filter does not allow).
struct Available<'a>(&'a UnixStream);

impl Read for Available<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the duration of
        // the call, and the fd is the stream's own, open while it is borrowed.
        let n = unsafe {
            libc::recv(
                self.0.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

/// Serve every whole request `client` has sent, until `stop` says so (what follows
/// is for the next `serve`); the client back if it stays.
fn serve_client(
    mut client: Client,
    handle: &mut impl FnMut(ApiRequest) -> Response,
    stop: &impl Fn() -> bool,
) -> Option<Client> {
    loop {
        let mut out = Vec::new();
        let result = client
            .conn
            .read_request(&mut Available(&client.stream), &mut out);
        if !out.is_empty() {
            let _ = (&client.stream).write_all(&out);
        }
        match result {
            Ok(None) => return None,
            Ok(Some(request)) => {
                client.since = None;
                let response = match route(&request) {
                    Ok(r) => handle(r),
                    Err(e) => Response::error(e.status(), &e.to_string()),
                };
                let mut writer = &client.stream;
                let written = response.write_to(&mut writer, request.close);
                if written.is_err() || request.close {
                    return None;
                }
                if stop() {
                    return Some(client);
                }
            }
            Err(HttpError::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // The rest of a request is still on its way.
                client.since.get_or_insert_with(Instant::now);
                return Some(client);
            }
            Err(HttpError::Io(_)) => return None,
            Err(e) => {
                let status = match e {
                    HttpError::TooLarge { .. } => 413,
                    _ => 400,
                };
                let mut writer = &client.stream;
                let _ = Response::error(status, &e.to_string()).write_to(&mut writer, true);
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    fn socket(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("vmcraft-api-{name}-{}", std::process::id()))
    }

    fn exchange(stream: &mut UnixStream, request: &[u8]) -> String {
        stream.write_all(request).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        // A response ends with its body: read until the head and Content-Length bytes.
        loop {
            let n = stream.read(&mut buf).unwrap();
            assert_ne!(n, 0, "closed after {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got).into_owned();
            if let Some(at) = text.find("\r\n\r\n") {
                let len: usize = text
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if got.len() >= at + 4 + len {
                    return text;
                }
            }
        }
    }

    #[test]
    fn clients_are_served_in_turn_and_bad_requests_do_not_stop_the_server() {
        let path = socket("serve");
        let _ = std::fs::remove_file(&path);
        let mut server = ApiServer::bind(&path).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_server = stop.clone();
        let thread = std::thread::spawn(move || {
            server
                .serve(
                    |r| match r {
                        ApiRequest::GetVersion => Response::ok(&crate::types::FirecrackerVersion {
                            firecracker_version: "1.4.1".into(),
                        }),
                        ApiRequest::PutAction(_) => Response::no_content(),
                        _ => Response::error(400, "unsupported here"),
                    },
                    || stop_server.load(Ordering::SeqCst),
                )
                .unwrap();
            server
        });
        // Two clients at once; one idles with a half-sent request meanwhile.
        let mut a = UnixStream::connect(&path).unwrap();
        let mut b = UnixStream::connect(&path).unwrap();
        let mut idle = UnixStream::connect(&path).unwrap();
        idle.write_all(b"PUT /actions HTTP/1.1\r\nContent-Le")
            .unwrap();
        let r = exchange(&mut a, b"GET /version HTTP/1.1\r\n\r\n");
        assert!(
            r.starts_with("HTTP/1.1 200 OK") && r.ends_with("{\"firecracker_version\":\"1.4.1\"}"),
            "{r}"
        );
        let r = exchange(&mut b, b"PUT /actions HTTP/1.1\r\nContent-Length: 31\r\n\r\n{\"action_type\":\"InstanceStart\"}");
        assert!(r.starts_with("HTTP/1.1 204 No Content"), "{r}");
        // The same connection goes on.
        let r = exchange(&mut a, b"GET /nowhere HTTP/1.1\r\n\r\n");
        assert!(
            r.starts_with("HTTP/1.1 404") && r.contains("fault_message"),
            "{r}"
        );
        let r = exchange(
            &mut a,
            b"PUT /actions HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
        );
        assert!(
            r.starts_with("HTTP/1.1 400") && r.contains("missing field"),
            "{r}"
        );
        // A malformed request: 400 and that connection closed, the server serving on.
        let r = exchange(&mut b, b"BREW /coffee HTTP/1.1\r\n\r\n");
        assert!(
            r.starts_with("HTTP/1.1 400") && r.contains("invalid HTTP method BREW"),
            "{r}"
        );
        let mut rest = Vec::new();
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(b.read_to_end(&mut rest).unwrap(), 0, "closed");
        let r = exchange(
            &mut a,
            b"GET /version HTTP/1.1\r\nConnection: close\r\n\r\n",
        );
        assert!(r.contains("Connection: close"), "{r}");
        stop.store(true, Ordering::SeqCst);
        let server = thread.join().unwrap();
        assert!(path.exists());
        drop(server);
        assert!(!path.exists(), "the socket file goes with the server");
        drop(idle);
    }

    /// An orchestrator keeps one connection from before `InstanceStart` to after it,
    /// when the VMM hands its socket from one `serve` to the next.
    #[test]
    fn a_connection_outlives_the_hand_over_from_one_serve_to_the_next() {
        let path = socket("handover");
        let _ = std::fs::remove_file(&path);
        let mut server = ApiServer::bind(&path).unwrap();
        let mut client = UnixStream::connect(&path).unwrap();
        let thread = std::thread::spawn(move || {
            // Before the start: served until InstanceStart.
            let started = std::cell::Cell::new(false);
            server
                .serve(
                    |r| match r {
                        ApiRequest::PutAction(_) => {
                            started.set(true);
                            Response::no_content()
                        }
                        _ => Response::error(400, "before"),
                    },
                    || started.get(),
                )
                .unwrap();
            // After it: the same clients, another handler.
            let asked = std::cell::Cell::new(false);
            server
                .serve(
                    |_| {
                        asked.set(true);
                        Response::error(400, "after")
                    },
                    || asked.get(),
                )
                .unwrap();
            server
        });
        // The next request pipelined behind InstanceStart, in the same write: the
        // second serve answers it, not the first.
        client
            .write_all(b"PUT /actions HTTP/1.1\r\nContent-Length: 31\r\n\r\n{\"action_type\":\"InstanceStart\"}GET /version HTTP/1.1\r\n\r\n")
            .unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut got = String::new();
        let mut buf = [0u8; 1024];
        while !got.contains("after") {
            let n = client.read(&mut buf).unwrap();
            assert_ne!(n, 0, "closed after {got:?}");
            got.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        assert!(got.starts_with("HTTP/1.1 204"), "{got}");
        assert!(!got.contains("before"), "{got}");
        drop(thread.join().unwrap());
    }

    /// One client's bytes in a storm: a valid request, a pipelined pair, junk, a
    /// chunked body, a head or body past the limits, an `Expect: 100-continue`, or
    /// half a request; sent in random fragments.
    fn storm_request(rng: &mut fastrand::Rng) -> Vec<u8> {
        let body = r#"{"vcpu_count": 1, "mem_size_mib": 64}"#;
        match rng.u8(0..9) {
            0 => b"GET /version HTTP/1.1\r\n\r\n".to_vec(),
            1 => format!(
                "PUT /machine-config HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}GET / HTTP/1.1\r\n\r\n",
                body.len()
            )
            .into_bytes(),
            2 => {
                // Junk, then a blank line: a head the server must refuse (junk
                // without one would wait for the rest until STALL).
                let mut junk: Vec<u8> = (0..rng.usize(1..512)).map(|_| rng.u8(..)).collect();
                junk.extend_from_slice(b"\r\n\r\n");
                junk
            }
            3 => b"PUT /actions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                .to_vec(),
            4 => {
                let mut r = b"GET /version HTTP/1.1\r\nX-Pad: ".to_vec();
                r.resize(r.len() + crate::http::MAX_HEAD_BYTES + 10, b'a');
                r
            }
            5 => format!(
                "PUT /actions HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
                crate::http::MAX_BODY_BYTES + 1
            )
            .into_bytes(),
            6 => format!(
                "PUT /machine-config HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
            7 => b"PUT /drives/x HTTP/1.1\r\nContent-Length: 5\r\n\r\n{\"dri".to_vec(),
            _ => b"PATCH /vm HTTP/1.1\r\nContent-Length: 19\r\n\r\n{\"state\": \"Paused\"}".to_vec(),
        }
    }

    /// Many clients at once (more than the server takes), each sending a random
    /// request in random fragments and then reading until it gets an answer or the
    /// connection closes: no panic, no client left hanging, and the server answers a
    /// plain request afterwards. (A half-sent request, kind 7, is answered by the
    /// server dropping the client after [`STALL`]; the client closes first here.)
    #[test]
    fn a_storm_of_clients_is_answered_or_closed_and_the_server_goes_on() {
        let path = socket("storm");
        let _ = std::fs::remove_file(&path);
        let mut server = ApiServer::bind(&path).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_server = stop.clone();
        let thread = std::thread::spawn(move || {
            server
                .serve(
                    |r| match r {
                        ApiRequest::GetVersion => Response::ok(&crate::types::FirecrackerVersion {
                            firecracker_version: "1.4.1".into(),
                        }),
                        _ => Response::no_content(),
                    },
                    || stop_server.load(Ordering::SeqCst),
                )
                .unwrap();
            server
        });
        let seed = fastrand::u64(..);
        let clients: Vec<_> = (0..24u64)
            .map(|i| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let mut rng = fastrand::Rng::with_seed(seed ^ i);
                    let request = storm_request(&mut rng);
                    let half_sent = request.ends_with(b"{\"dri");
                    let mut s = UnixStream::connect(&path).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                    let mut at = 0;
                    while at < request.len() {
                        let n = rng.usize(1..=64).min(request.len() - at);
                        if s.write_all(&request[at..at + n]).is_err() {
                            break; // the server answered and closed already
                        }
                        at += n;
                        if rng.bool() {
                            std::thread::yield_now();
                        }
                    }
                    if half_sent {
                        return;
                    }
                    let mut got = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        match s.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => {
                                got.extend_from_slice(&buf[..n]);
                                if got.windows(4).any(|w| w == b"\r\n\r\n") {
                                    break;
                                }
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                            Err(e) => {
                                panic!("seed {seed:#x}, client {i}: no answer and not closed: {e}")
                            }
                        }
                    }
                    if !got.is_empty() {
                        assert!(
                            got.starts_with(b"HTTP/1.1 "),
                            "seed {seed:#x}, client {i}: {:?}",
                            String::from_utf8_lossy(&got)
                        );
                    }
                })
            })
            .collect();
        for c in clients {
            c.join().unwrap();
        }
        let mut fresh = UnixStream::connect(&path).unwrap();
        let r = exchange(&mut fresh, b"GET /version HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200"), "seed {seed:#x}: {r}");
        stop.store(true, Ordering::SeqCst);
        drop(thread.join().unwrap());
    }

    #[test]
    fn an_existing_socket_file_is_an_error() {
        let path = socket("exists");
        std::fs::write(&path, b"").unwrap();
        assert!(ApiServer::bind(&path).is_err());
        std::fs::remove_file(&path).unwrap();
    }
}
