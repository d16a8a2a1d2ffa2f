//! The back end's half of a xenbus device (Xen's `io/xenbus.h` states): the
//! directories the toolstack makes for a front end and a back end in the store, and
//! the handshake that connects them.
//!
//! For a virtual block device (`vbd`), as Linux's xen-blkfront expects it:
//! 1. [`XenbusDevice::create`]: the front end's directory
//!    (`/local/domain/<dom>/device/vbd/<id>`: `backend`, `backend-id`, `state` 1)
//!    owned by the guest, and the back end's (`/local/domain/0/backend/vbd/<dom>/<id>`:
//!    `frontend`, `frontend-id`, the disk's `sectors`, `sector-size`, `info`,
//!    `feature-flush-cache`) readable by it; the back end goes to InitWait (2).
//! 2. The front end writes `ring-ref`, `event-channel` and `protocol`, then
//!    Initialised (3). [`XenbusDevice::frontend_changed`] reads and checks them and
//!    returns [`Action::Connect`]: the VMM maps the ring and binds the channel, then
//!    calls [`XenbusDevice::connected`] (state 4), or [`XenbusDevice::failed`].
//! 3. The front end closes (5, then 6): the back end answers Closing and Closed,
//!    returns [`Action::Disconnect`], and waits again (InitWait) for a front end that
//!    reconnects, as after a guest's reboot or module reload.
//!
//! Everything the front end wrote is hostile: numbers are parsed strictly, and a
//! protocol other than x86-64's is refused.

use super::store::{domain_path, Access, DomId, Perm, Store, XsError};

/// xenbus states (`enum xenbus_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum XenbusState {
    /// 0.
    Unknown = 0,
    /// 1.
    Initialising = 1,
    /// 2: the back end waits for the front end's details.
    InitWait = 2,
    /// 3: the front end has written its details.
    Initialised = 3,
    /// 4.
    Connected = 4,
    /// 5.
    Closing = 5,
    /// 6.
    Closed = 6,
    /// 7.
    Reconfiguring = 7,
    /// 8.
    Reconfigured = 8,
}

impl XenbusState {
    /// The state a store value names (a decimal number).
    pub fn parse(value: &[u8]) -> Option<XenbusState> {
        use XenbusState::*;
        Some(match parse_u32(value)? {
            0 => Unknown,
            1 => Initialising,
            2 => InitWait,
            3 => Initialised,
            4 => Connected,
            5 => Closing,
            6 => Closed,
            7 => Reconfiguring,
            8 => Reconfigured,
            _ => return None,
        })
    }
}

/// A decimal number as the store holds it: digits only (a trailing NUL tolerated, as
/// some front ends write one), no sign, no overflow.
pub fn parse_u32(value: &[u8]) -> Option<u32> {
    let v = value.strip_suffix(&[0]).unwrap_or(value);
    if v.is_empty() || v.len() > 10 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// What the back end tells the front end about its device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The kind: `vbd`, `console`, ...
    pub kind: &'static str,
    /// `(key, value)` written into the back end's directory before InitWait (for a
    /// vbd: `sectors`, `sector-size`, `info`, `feature-flush-cache`).
    pub details: Vec<(String, String)>,
}

impl DeviceInfo {
    /// A virtual block device of `sectors` 512-byte sectors.
    pub fn vbd(sectors: u64, read_only: bool) -> DeviceInfo {
        DeviceInfo {
            kind: "vbd",
            details: vec![
                ("sectors".into(), sectors.to_string()),
                ("sector-size".into(), "512".into()),
                // VDISK_READONLY is bit 2.
                ("info".into(), if read_only { "4" } else { "0" }.into()),
                ("feature-flush-cache".into(), "1".into()),
            ],
        }
    }

    /// A console (`device/console/<id>`).
    pub fn console() -> DeviceInfo {
        DeviceInfo {
            kind: "console",
            details: vec![("type".into(), "ioemu".into())],
        }
    }
}

/// What the front end asked for, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FrontendDetails {
    /// The grant reference of its one-page ring.
    pub ring_ref: u32,
    /// Its event-channel port (unbound, for the back end to bind).
    pub event_channel: u32,
}

/// What the VMM must do after a front-end change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Map the ring and bind the channel, then call [`XenbusDevice::connected`].
    Connect(FrontendDetails),
    /// Unmap and unbind what [`Action::Connect`] set up.
    Disconnect,
}

/// Why a front end's details were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrontendError {
    /// A key is missing or not a number.
    #[error("the front end's {key} is missing or not a number")]
    BadNumber {
        /// Which.
        key: &'static str,
    },
    /// Its ring protocol is not x86-64's.
    #[error("the front end's ring protocol {0:?} is not x86_64-abi")]
    Protocol(String),
    /// It asked for a multi-page ring, which this back end does not offer.
    #[error("the front end asked for a ring of 2^{0} pages; one page is offered")]
    RingOrder(u32),
    /// The store refused an operation.
    #[error("the store refused: {0}")]
    Store(#[from] XsError),
}

/// The back end's half of one xenbus device.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct XenbusDevice {
    dom: DomId,
    /// The front end's directory.
    pub frontend: String,
    /// The back end's directory.
    pub backend: String,
    state: XenbusState,
}

impl XenbusDevice {
    /// Make both directories for guest `dom`'s device `id` of `info` and go to
    /// InitWait. The caller watches [`XenbusDevice::frontend`]`/state` (or the whole
    /// front-end directory) and calls [`XenbusDevice::frontend_changed`] on events.
    pub fn create(
        store: &mut Store,
        dom: DomId,
        id: u32,
        info: &DeviceInfo,
    ) -> Result<Self, XsError> {
        let frontend = format!("{}/device/{}/{id}", domain_path(dom), info.kind);
        let backend = format!("{}/backend/{}/{dom}/{id}", domain_path(0), info.kind);
        let w = |s: &mut Store, path: &str, v: &str| s.write(0, 0, path.as_bytes(), v.as_bytes());
        // The guest's own directory and its front end's, owned by it.
        let guest_owned = [Perm {
            dom,
            access: Access::None,
        }];
        mkdir_owned(store, &domain_path(dom), &guest_owned)?;
        store.mkdir(0, 0, frontend.as_bytes())?;
        w(store, &format!("{frontend}/backend"), &backend)?;
        w(store, &format!("{frontend}/backend-id"), "0")?;
        w(store, &format!("{frontend}/state"), "1")?;
        // A vbd's front end finds its number and kind in its own directory, as a
        // toolstack writes them (xen-blkfront reads `virtual-device` first).
        let mut front = vec![
            frontend.clone(),
            format!("{frontend}/backend"),
            format!("{frontend}/backend-id"),
            format!("{frontend}/state"),
        ];
        if info.kind == "vbd" {
            w(
                store,
                &format!("{frontend}/virtual-device"),
                &id.to_string(),
            )?;
            w(store, &format!("{frontend}/device-type"), "disk")?;
            front.push(format!("{frontend}/virtual-device"));
            front.push(format!("{frontend}/device-type"));
        }
        // Every node under the front end's directory: the guest's; domain 0 reads
        // anything anyway.
        for path in front {
            store.set_perms(0, 0, path.as_bytes(), &guest_owned)?;
        }
        // The back end's directory: domain 0's, readable by the guest.
        let readable = [
            Perm {
                dom: 0,
                access: Access::None,
            },
            Perm {
                dom,
                access: Access::Read,
            },
        ];
        store.mkdir(0, 0, backend.as_bytes())?;
        w(store, &format!("{backend}/frontend"), &frontend)?;
        w(store, &format!("{backend}/frontend-id"), &dom.to_string())?;
        for (k, v) in &info.details {
            w(store, &format!("{backend}/{k}"), v)?;
        }
        w(store, &format!("{backend}/state"), "2")?;
        let mut paths = vec![
            backend.clone(),
            format!("{backend}/frontend"),
            format!("{backend}/frontend-id"),
            format!("{backend}/state"),
        ];
        paths.extend(info.details.iter().map(|(k, _)| format!("{backend}/{k}")));
        for path in paths {
            store.set_perms(0, 0, path.as_bytes(), &readable)?;
        }
        Ok(XenbusDevice {
            dom,
            frontend,
            backend,
            state: XenbusState::InitWait,
        })
    }

    /// The back end's state.
    pub fn state(&self) -> XenbusState {
        self.state
    }

    fn set_state(&mut self, store: &mut Store, state: XenbusState) -> Result<(), XsError> {
        store.write(
            0,
            0,
            format!("{}/state", self.backend).as_bytes(),
            (state as u32).to_string().as_bytes(),
        )?;
        self.state = state;
        Ok(())
    }

    fn read(&self, store: &mut Store, key: &str) -> Option<Vec<u8>> {
        store
            .read(0, 0, format!("{}/{key}", self.frontend).as_bytes())
            .ok()
    }

    fn number(&self, store: &mut Store, key: &'static str) -> Result<u32, FrontendError> {
        self.read(store, key)
            .as_deref()
            .and_then(parse_u32)
            .ok_or(FrontendError::BadNumber { key })
    }

    /// Look at the front end's state after a watch event; returns what the VMM must
    /// do, if anything. A front end whose details are bad gets the back end Closing
    /// and the error.
    pub fn frontend_changed(&mut self, store: &mut Store) -> Result<Option<Action>, FrontendError> {
        let theirs = self
            .read(store, "state")
            .as_deref()
            .and_then(XenbusState::parse)
            .unwrap_or(XenbusState::Unknown);
        use XenbusState::*;
        match (theirs, self.state) {
            (Initialised | Connected, InitWait) => match self.details(store) {
                Ok(d) => Ok(Some(Action::Connect(d))),
                Err(e) => {
                    self.set_state(store, Closing)?;
                    Err(e)
                }
            },
            (Closing, Connected | InitWait) => {
                let was = self.state;
                self.set_state(store, Closing)?;
                self.set_state(store, Closed)?;
                Ok((was == Connected).then_some(Action::Disconnect))
            }
            (Closed | Unknown, Connected | Closing | Closed) => {
                let was = self.state;
                // Ready for a front end that comes back.
                self.set_state(store, InitWait)?;
                Ok((was == Connected).then_some(Action::Disconnect))
            }
            _ => Ok(None),
        }
    }

    fn details(&self, store: &mut Store) -> Result<FrontendDetails, FrontendError> {
        if let Some(order) = self.read(store, "ring-page-order") {
            let order = parse_u32(&order).ok_or(FrontendError::BadNumber {
                key: "ring-page-order",
            })?;
            if order != 0 {
                return Err(FrontendError::RingOrder(order));
            }
        }
        let ring_ref = self.number(store, "ring-ref")?;
        let event_channel = self.number(store, "event-channel")?;
        if let Some(p) = self.read(store, "protocol") {
            let p = p.strip_suffix(&[0]).unwrap_or(&p);
            if p != b"x86_64-abi" {
                return Err(FrontendError::Protocol(
                    String::from_utf8_lossy(p).into_owned(),
                ));
            }
        }
        Ok(FrontendDetails {
            ring_ref,
            event_channel,
        })
    }

    /// The VMM has mapped the ring and bound the channel: Connected.
    pub fn connected(&mut self, store: &mut Store) -> Result<(), XsError> {
        self.set_state(store, XenbusState::Connected)
    }

    /// The VMM could not connect: Closing, then Closed, with the reason in the back
    /// end's `error` node, as Linux's back ends leave it.
    pub fn failed(&mut self, store: &mut Store, reason: &str) -> Result<(), XsError> {
        store.write(
            0,
            0,
            format!("{}/error", self.backend).as_bytes(),
            reason.as_bytes(),
        )?;
        self.set_state(store, XenbusState::Closing)?;
        self.set_state(store, XenbusState::Closed)
    }

    /// The guest this device belongs to.
    pub fn dom(&self) -> DomId {
        self.dom
    }
}

/// Make `path` (and its ancestors) as domain 0, owned as `perms` says.
fn mkdir_owned(store: &mut Store, path: &str, perms: &[Perm]) -> Result<(), XsError> {
    store.mkdir(0, 0, path.as_bytes())?;
    store.set_perms(0, 0, path.as_bytes(), perms)
}
