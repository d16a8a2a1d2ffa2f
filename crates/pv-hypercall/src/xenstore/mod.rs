//! A xenstore for PV guests (Xen's `io/xs_wire.h` protocol): the tree of keys Xen's
//! split drivers meet on (a front end and its back end find each other, their ring
//! references and event channels, and each other's state here).
//!
//! * [`wire`]: message headers, a framer that cuts a guest's byte stream into
//!   messages (a payload over 4,096 bytes breaks the stream), reply encoding.
//! * [`store`]: the tree, permissions as xenstored applies them, watches (an event at
//!   once, then one per change at or below the path, or of an ancestor's removal),
//!   transactions (a private copy, committed unless a path it touched changed since:
//!   then `EAGAIN`), and quotas per domain on nodes, watches, transactions and waiting
//!   events.
//! * [`ring`]: the page a guest shares with the store (`xenstore_domain_interface`):
//!   requests read, replies and watch events written, hostile indices refused.
//! * [`xenbus`]: the back end's half of a xenbus device (a vbd, a console): the
//!   directories a toolstack makes, and the handshake from InitWait to Connected and
//!   back.
//! * [`Xenstore::handle`]: one request from a domain, answered as xenstored answers
//!   it (`OK`, a value, a list, or `XS_ERROR` with the errno's name), followed by the
//!   watch events waiting for that domain.
//!
//! ```
//! use vmcraft_pv_hypercall::xenstore::wire::{Message, MsgType};
//! use vmcraft_pv_hypercall::xenstore::Xenstore;
//!
//! let mut xs = Xenstore::default();
//! // The VMM (domain 0) gives guest 1 its directory.
//! xs.store.mkdir(0, 0, b"/local/domain/1").unwrap();
//! let perms = [vmcraft_pv_hypercall::xenstore::store::Perm {
//!     dom: 1,
//!     access: vmcraft_pv_hypercall::xenstore::store::Access::None,
//! }];
//! xs.store.set_perms(0, 0, b"/local/domain/1", &perms).unwrap();
//! // The guest writes a relative path, then reads it back.
//! let w = Message::new(MsgType::Write, 7, 0, b"name\0guest".to_vec());
//! assert_eq!(xs.handle(1, &w)[0].payload, b"OK\0");
//! let r = Message::new(MsgType::Read, 8, 0, b"name\0".to_vec());
//! assert_eq!(xs.handle(1, &r)[0].payload, b"guest");
//! ```

pub mod ring;
pub mod store;
pub mod wire;
pub mod xenbus;

use store::{decode_perms, encode_perms, DomId, Store, XsError};
use wire::{strings, Message, MsgType, PAYLOAD_MAX};

/// A store and the protocol in front of it.
#[derive(Debug, Clone, Default)]
pub struct Xenstore {
    /// The store (the VMM reads and writes it directly, as domain 0).
    pub store: Store,
}

const OK: &[u8] = b"OK\0";

impl Xenstore {
    /// Answer `msg` from domain `dom`: the reply, then the watch events waiting for
    /// `dom`. Never fails: a bad request gets an `XS_ERROR` reply.
    pub fn handle(&mut self, dom: DomId, msg: &Message) -> Vec<Message> {
        let (req_id, tx_id) = (msg.header.req_id, msg.header.tx_id);
        let reply = match self.answer(dom, msg) {
            Ok((ty, payload)) if payload.len() <= PAYLOAD_MAX => {
                Message::new(ty, req_id, tx_id, payload)
            }
            Ok(_) => error(req_id, tx_id, XsError::TooBig),
            Err(e) => error(req_id, tx_id, e),
        };
        let mut out = vec![reply];
        out.extend(self.events(dom));
        out
    }

    /// The watch events waiting for `dom`, as `XS_WATCH_EVENT` messages.
    pub fn events(&mut self, dom: DomId) -> Vec<Message> {
        self.store
            .take_events(dom)
            .into_iter()
            .filter_map(|e| {
                let mut payload = e.path;
                payload.push(0);
                payload.extend_from_slice(&e.token);
                payload.push(0);
                (payload.len() <= PAYLOAD_MAX)
                    .then(|| Message::new(MsgType::WatchEvent, 0, 0, payload))
            })
            .collect()
    }

    fn answer(&mut self, dom: DomId, msg: &Message) -> Result<(MsgType, Vec<u8>), XsError> {
        let ty = MsgType::from_u32(msg.header.ty).ok_or(XsError::Inval)?;
        let tx = msg.header.tx_id;
        let args = strings(&msg.payload);
        let one = || -> Result<&[u8], XsError> {
            match args.as_slice() {
                [a] => Ok(a),
                _ => Err(XsError::Inval),
            }
        };
        let s = &mut self.store;
        Ok(match ty {
            MsgType::Read => (ty, s.read(dom, tx, one()?)?),
            MsgType::Directory => {
                let mut out = Vec::new();
                for name in s.directory(dom, tx, one()?)? {
                    out.extend_from_slice(name.as_bytes());
                    out.push(0);
                }
                (ty, out)
            }
            MsgType::GetPerms => (ty, encode_perms(&s.get_perms(dom, tx, one()?)?)),
            MsgType::Write => {
                // `path\0value`: the value is every byte after the first NUL.
                let nul = msg
                    .payload
                    .iter()
                    .position(|&b| b == 0)
                    .ok_or(XsError::Inval)?;
                s.write(dom, tx, &msg.payload[..nul], &msg.payload[nul + 1..])?;
                (ty, OK.to_vec())
            }
            MsgType::Mkdir => {
                s.mkdir(dom, tx, one()?)?;
                (ty, OK.to_vec())
            }
            MsgType::Rm => {
                s.rm(dom, tx, one()?)?;
                (ty, OK.to_vec())
            }
            MsgType::SetPerms => {
                let (path, perms) = args.split_first().ok_or(XsError::Inval)?;
                s.set_perms(dom, tx, path, &decode_perms(perms)?)?;
                (ty, OK.to_vec())
            }
            MsgType::Watch | MsgType::Unwatch => {
                let [path, token] = args.as_slice() else {
                    return Err(XsError::Inval);
                };
                if ty == MsgType::Watch {
                    s.watch(dom, path, token)?;
                } else {
                    s.unwatch(dom, path, token)?;
                }
                (ty, OK.to_vec())
            }
            MsgType::TransactionStart => {
                if tx != 0 || !matches!(args.as_slice(), [] | [b""]) {
                    return Err(XsError::Inval);
                }
                let id = s.transaction_start(dom)?;
                (ty, format!("{id}\0").into_bytes())
            }
            MsgType::TransactionEnd => {
                let commit = match one()? {
                    b"T" => true,
                    b"F" => false,
                    _ => return Err(XsError::Inval),
                };
                s.transaction_end(dom, tx, commit)?;
                (ty, OK.to_vec())
            }
            MsgType::GetDomainPath => {
                let id = std::str::from_utf8(one()?)
                    .ok()
                    .and_then(|d| d.parse::<DomId>().ok())
                    .ok_or(XsError::Inval)?;
                (ty, format!("{}\0", store::domain_path(id)).into_bytes())
            }
            MsgType::ResetWatches => {
                s.reset_watches(dom);
                (ty, OK.to_vec())
            }
            // Replies only, never requests.
            MsgType::WatchEvent | MsgType::Error => return Err(XsError::Inval),
            // The toolstack's: not a guest's to ask.
            MsgType::Introduce
            | MsgType::Release
            | MsgType::IsDomainIntroduced
            | MsgType::Resume
            | MsgType::SetTarget
            | MsgType::Control
            | MsgType::DirectoryPart => return Err(XsError::Nosys),
        })
    }
}

fn error(req_id: u32, tx_id: u32, e: XsError) -> Message {
    let mut payload = e.name().as_bytes().to_vec();
    payload.push(0);
    Message::new(MsgType::Error, req_id, tx_id, payload)
}

#[cfg(test)]
mod tests;
