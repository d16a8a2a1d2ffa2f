//! One request to a Firecracker-style API on a Unix socket, for scripts and shells
//! without a curl that speaks Unix sockets (the real-Linux tier's outer VM has only
//! busybox): `api-call SOCKET METHOD PATH [JSON]` prints the status line's code and
//! the body, and exits 0 on a 2xx answer, 1 on another, 2 if the request could not be
//! made.
//!
//! ```text
//! cargo run --example api-call -- /tmp/vmcraft.sock PUT /actions '{"action_type": "SendCtrlAltDel"}'
//! ```

use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::Duration;

fn call(socket: &str, method: &str, path: &str, body: &str) -> Result<(u16, String), String> {
    let mut stream =
        UnixStream::connect(socket).map_err(|e| format!("cannot connect to {socket}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    vmcraft::api::client::call(&mut stream, method, path, body).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (socket, method, path, body) = match args.as_slice() {
        [s, m, p] => (s, m, p, ""),
        [s, m, p, b] => (s, m, p, b.as_str()),
        _ => {
            eprintln!("usage: api-call SOCKET METHOD PATH [JSON]");
            return ExitCode::from(2);
        }
    };
    match call(socket, method, path, body) {
        Ok((code, body)) => {
            println!("{code} {body}");
            if (200..300).contains(&code) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("api-call: {e}");
            ExitCode::from(2)
        }
    }
}
