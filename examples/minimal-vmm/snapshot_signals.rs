//! SIGUSR1 and SIGUSR2 ask the minimal VMM for a snapshot (then to go on, or to stop):
//! the handler only records the request; the main thread, which waits on the VM in
//! steps of [`POLL`], takes it.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// How often the main thread looks for a request.
pub const POLL: Duration = Duration::from_millis(20);

/// What a signal asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// SIGUSR1: snapshot, then go on.
    Continue,
    /// SIGUSR2: snapshot, then stop.
    Stop,
}

/// A bit per request not taken yet: a SIGUSR2 that comes before the main thread took
/// a SIGUSR1 does not replace it (both are served, in that order). The same signal
/// twice before a look is one request, as the kernel also merges it.
static PENDING: AtomicU32 = AtomicU32::new(0);
const CONTINUE: u32 = 1;
const STOP: u32 = 2;

extern "C" fn record(signal: libc::c_int) {
    let bit = match signal {
        libc::SIGUSR1 => CONTINUE,
        libc::SIGUSR2 => STOP,
        _ => 0,
    };
    PENDING.fetch_or(bit, Ordering::SeqCst);
}

/// Install the handlers for SIGUSR1 and SIGUSR2.
pub fn install() -> std::io::Result<()> {
    for signal in [libc::SIGUSR1, libc::SIGUSR2] {
        // SAFETY: `record` only stores into an atomic, which is async-signal-safe; the
        // sigaction struct is zero-initialised and then filled with a valid handler
        // and an empty mask.
        let result = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = record as extern "C" fn(libc::c_int) as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        if result != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The oldest request not taken yet (a snapshot that goes on before one that stops).
pub fn take() -> Option<Request> {
    [(CONTINUE, Request::Continue), (STOP, Request::Stop)]
        .into_iter()
        .find(|&(bit, _)| PENDING.fetch_and(!bit, Ordering::SeqCst) & bit != 0)
        .map(|(_, request)| request)
}
