//! The store: a tree of nodes, each with a value and permissions, changed by domains
//! under those permissions, inside transactions or not, with watches that fire on
//! changes. Pure code: no guest memory, no threads.

use std::collections::{BTreeMap, BTreeSet, HashMap};

/// A domain's id. Domain 0 (the VMM) may do anything.
pub type DomId = u16;

/// The most bytes of a node's path (`XENSTORE_ABS_PATH_MAX`).
pub const ABS_PATH_MAX: usize = 3072;
/// The most bytes of a relative path (`XENSTORE_REL_PATH_MAX`).
pub const REL_PATH_MAX: usize = 2048;

/// What a domain may do to a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Access {
    /// Nothing (`n`).
    None,
    /// Read (`r`).
    Read,
    /// Write (`w`).
    Write,
    /// Both (`b`).
    Both,
}

impl Access {
    fn letter(self) -> u8 {
        match self {
            Access::None => b'n',
            Access::Read => b'r',
            Access::Write => b'w',
            Access::Both => b'b',
        }
    }
    fn from_letter(c: u8) -> Option<Access> {
        Some(match c {
            b'n' => Access::None,
            b'r' => Access::Read,
            b'w' => Access::Write,
            b'b' => Access::Both,
            _ => return None,
        })
    }
    fn reads(self) -> bool {
        matches!(self, Access::Read | Access::Both)
    }
    fn writes(self) -> bool {
        matches!(self, Access::Write | Access::Both)
    }
}

/// One permission entry. A node's first entry names its owner (who may do anything)
/// and what every domain not listed after it may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Perm {
    /// The domain.
    pub dom: DomId,
    /// Its access.
    pub access: Access,
}

/// Encode permissions as the wire has them: `<letter><domid>\0` each.
pub fn encode_perms(perms: &[Perm]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in perms {
        out.push(p.access.letter());
        out.extend_from_slice(p.dom.to_string().as_bytes());
        out.push(0);
    }
    out
}

/// Decode permission strings (at least one).
pub fn decode_perms(strings: &[&[u8]]) -> Result<Vec<Perm>, XsError> {
    if strings.is_empty() || strings.len() > MAX_PERMS {
        return Err(XsError::Inval);
    }
    strings
        .iter()
        .map(|s| {
            let (&c, digits) = s.split_first().ok_or(XsError::Inval)?;
            let access = Access::from_letter(c).ok_or(XsError::Inval)?;
            let dom = std::str::from_utf8(digits)
                .ok()
                .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|d| d.parse::<DomId>().ok())
                .ok_or(XsError::Inval)?;
            Ok(Perm { dom, access })
        })
        .collect()
}

/// The most permission entries of a node.
pub const MAX_PERMS: usize = 16;

/// The errors a request gets, as xenstored names them on the wire (`XS_ERROR`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum XsError {
    /// Invalid argument (a bad path, perms, transaction, type).
    #[error("EINVAL")]
    Inval,
    /// Permission denied.
    #[error("EACCES")]
    Acces,
    /// Exists already.
    #[error("EEXIST")]
    Exist,
    /// No such node (or watch).
    #[error("ENOENT")]
    Noent,
    /// A quota is used up.
    #[error("ENOSPC")]
    Nospc,
    /// The transaction conflicted: try again.
    #[error("EAGAIN")]
    Again,
    /// A reply would be too big.
    #[error("E2BIG")]
    TooBig,
    /// Not supported.
    #[error("ENOSYS")]
    Nosys,
    /// Not allowed for this domain.
    #[error("EPERM")]
    Perm,
}

impl XsError {
    /// The name sent in an `XS_ERROR` reply.
    pub fn name(self) -> &'static str {
        match self {
            XsError::Inval => "EINVAL",
            XsError::Acces => "EACCES",
            XsError::Exist => "EEXIST",
            XsError::Noent => "ENOENT",
            XsError::Nospc => "ENOSPC",
            XsError::Again => "EAGAIN",
            XsError::TooBig => "E2BIG",
            XsError::Nosys => "ENOSYS",
            XsError::Perm => "EPERM",
        }
    }
}

/// Bounds on what one domain may hold (a guest is hostile).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Quota {
    /// Nodes a domain may own.
    pub nodes: usize,
    /// Watches a domain may have.
    pub watches: usize,
    /// Transactions a domain may have open.
    pub transactions: usize,
    /// Watch events waiting to be delivered to a domain; past it the oldest are
    /// dropped (and counted).
    pub pending_events: usize,
}

impl Default for Quota {
    fn default() -> Self {
        // xenstored's defaults.
        Quota {
            nodes: 1000,
            watches: 128,
            transactions: 10,
            pending_events: 1024,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Node {
    value: Vec<u8>,
    perms: Vec<Perm>,
    /// The store generation of its last change.
    changed: u64,
}

/// A watch event: the path that changed (as the watch named it: relative if it was
/// registered relative) and the watch's token.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WatchEvent {
    /// The path.
    pub path: Vec<u8>,
    /// The token.
    pub token: Vec<u8>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Watch {
    dom: DomId,
    /// Absolute path (or a special `@` path).
    path: String,
    /// As registered.
    given: Vec<u8>,
    token: Vec<u8>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Transaction {
    dom: DomId,
    /// The tree as this transaction sees it.
    nodes: BTreeMap<String, Node>,
    /// The store generation when it started.
    started: u64,
    /// Paths it read or wrote (conflicts are checked on them).
    touched: BTreeSet<String>,
    /// Paths it changed (their watches fire on commit).
    changed: BTreeSet<String>,
}

/// The store (serde: its whole state, nodes, transactions, watches and pending
/// events, for snapshots; see [`Store::check`]).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Store {
    nodes: BTreeMap<String, Node>,
    generation: u64,
    transactions: HashMap<u32, Transaction>,
    next_tx: u32,
    watches: Vec<Watch>,
    events: HashMap<DomId, std::collections::VecDeque<WatchEvent>>,
    dropped_events: u64,
    quota: Quota,
}

impl Default for Store {
    fn default() -> Self {
        Store::new(Quota::default())
    }
}

impl Store {
    /// Check a store that came from outside (a snapshot): every path canonical and
    /// under an existing parent, every node's permissions present and bounded, its
    /// value no longer than a message, transactions, watches and pending events within
    /// the quota (as a whole, 64 domains' worth at most). The reason is given.
    pub fn check(&self) -> Result<(), String> {
        use super::wire::PAYLOAD_MAX;
        let check_tree = |nodes: &BTreeMap<String, Node>, what: &str| -> Result<(), String> {
            if !nodes.contains_key("/") {
                return Err(format!("{what}: no root node"));
            }
            if nodes.len() > 64 * self.quota.nodes {
                return Err(format!("{what}: {} nodes", nodes.len()));
            }
            for (path, node) in nodes {
                if path != "/" && canonical(0, path.as_bytes()).as_deref() != Ok(path.as_str()) {
                    return Err(format!("{what}: the path {path:?} is not canonical"));
                }
                if let Some(p) = parent(path) {
                    if !nodes.contains_key(p) {
                        return Err(format!("{what}: {path:?} has no parent"));
                    }
                }
                if node.perms.is_empty() || node.perms.len() > MAX_PERMS {
                    return Err(format!(
                        "{what}: {path:?} has {} permissions",
                        node.perms.len()
                    ));
                }
                if node.value.len() > PAYLOAD_MAX {
                    return Err(format!("{what}: {path:?} holds {} bytes", node.value.len()));
                }
            }
            Ok(())
        };
        check_tree(&self.nodes, "the store")?;
        if self.transactions.len() > 64 * self.quota.transactions {
            return Err(format!("{} transactions", self.transactions.len()));
        }
        for (id, tx) in &self.transactions {
            if *id == 0 || *id >= self.next_tx && self.next_tx != 0 {
                return Err(format!("transaction {id} was never started"));
            }
            check_tree(&tx.nodes, &format!("transaction {id}"))?;
        }
        if self.watches.len() > 64 * self.quota.watches {
            return Err(format!("{} watches", self.watches.len()));
        }
        for (dom, queue) in &self.events {
            if queue.len() > self.quota.pending_events {
                return Err(format!("{} events wait for domain {dom}", queue.len()));
            }
        }
        Ok(())
    }
}

/// The path prefix of a domain's relative paths.
pub fn domain_path(dom: DomId) -> String {
    format!("/local/domain/{dom}")
}

/// `path` made absolute for `dom` and checked: `/`-separated names of `[A-Za-z0-9_-@.]`,
/// no empty name, no trailing `/` (but the root), within the length limits. Special
/// watch paths (`@...`) are refused here.
pub fn canonical(dom: DomId, path: &[u8]) -> Result<String, XsError> {
    let s = std::str::from_utf8(path).map_err(|_| XsError::Inval)?;
    let abs = if let Some(rest) = s.strip_prefix('/') {
        if s.len() > ABS_PATH_MAX {
            return Err(XsError::Inval);
        }
        if rest.is_empty() {
            return Ok("/".into());
        }
        s.to_string()
    } else {
        if s.is_empty() || s.len() > REL_PATH_MAX {
            return Err(XsError::Inval);
        }
        format!("{}/{s}", domain_path(dom))
    };
    let valid = abs[1..].split('/').all(|name| {
        !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_@.".contains(&b))
    });
    if !valid || abs.len() > ABS_PATH_MAX {
        return Err(XsError::Inval);
    }
    Ok(abs)
}

fn parent(path: &str) -> Option<&str> {
    if path == "/" {
        return None;
    }
    match path.rfind('/') {
        Some(0) => Some("/"),
        Some(i) => Some(&path[..i]),
        None => None,
    }
}

/// Whether `path` is `base` or below it.
fn within(path: &str, base: &str) -> bool {
    base == "/"
        || path == base
        || (path.starts_with(base) && path.as_bytes().get(base.len()) == Some(&b'/'))
}

fn children<'a>(nodes: &'a BTreeMap<String, Node>, path: &'a str) -> impl Iterator<Item = &'a str> {
    let prefix = if path == "/" {
        "/".to_string()
    } else {
        format!("{path}/")
    };
    nodes
        .range(prefix.clone()..)
        .take_while(move |(k, _)| k.starts_with(&prefix))
        .map(|(k, _)| k.as_str())
        .filter(move |k| !k[if path == "/" { 1 } else { path.len() + 1 }..].contains('/'))
        .map(move |k| &k[if path == "/" { 1 } else { path.len() + 1 }..])
}

fn access(node: &Node, dom: DomId) -> Access {
    if dom == 0 {
        return Access::Both;
    }
    let Some(owner) = node.perms.first() else {
        return Access::None;
    };
    if owner.dom == dom {
        return Access::Both;
    }
    node.perms[1..]
        .iter()
        .find(|p| p.dom == dom)
        .map_or(owner.access, |p| p.access)
}

impl Store {
    /// An empty store (the root, owned by domain 0, readable by no one else; the
    /// embedder builds the tree a guest expects) under `quota`.
    pub fn new(quota: Quota) -> Store {
        let mut nodes = BTreeMap::new();
        nodes.insert(
            "/".to_string(),
            Node {
                value: Vec::new(),
                perms: vec![Perm {
                    dom: 0,
                    access: Access::None,
                }],
                changed: 0,
            },
        );
        Store {
            nodes,
            generation: 0,
            transactions: HashMap::new(),
            next_tx: 1,
            watches: Vec::new(),
            events: HashMap::new(),
            dropped_events: 0,
            quota,
        }
    }

    fn tree(&mut self, dom: DomId, tx: u32) -> Result<&mut BTreeMap<String, Node>, XsError> {
        if tx == 0 {
            return Ok(&mut self.nodes);
        }
        match self.transactions.get_mut(&tx) {
            Some(t) if t.dom == dom => Ok(&mut t.nodes),
            _ => Err(XsError::Inval),
        }
    }

    fn touch(&mut self, tx: u32, path: &str, changed: bool) {
        if let Some(t) = self.transactions.get_mut(&tx) {
            t.touched.insert(path.to_string());
            if changed {
                t.changed.insert(path.to_string());
            }
        }
    }

    /// The value at `path`.
    pub fn read(&mut self, dom: DomId, tx: u32, path: &[u8]) -> Result<Vec<u8>, XsError> {
        let path = canonical(dom, path)?;
        self.touch(tx, &path, false);
        let node = self.tree(dom, tx)?.get(&path).ok_or(XsError::Noent)?;
        if !access(node, dom).reads() {
            return Err(XsError::Acces);
        }
        Ok(node.value.clone())
    }

    /// The names of the children of `path`.
    pub fn directory(&mut self, dom: DomId, tx: u32, path: &[u8]) -> Result<Vec<String>, XsError> {
        let path = canonical(dom, path)?;
        self.touch(tx, &path, false);
        let tree = self.tree(dom, tx)?;
        let node = tree.get(&path).ok_or(XsError::Noent)?;
        if !access(node, dom).reads() {
            return Err(XsError::Acces);
        }
        Ok(children(tree, &path).map(str::to_string).collect())
    }

    /// The permissions of `path`.
    pub fn get_perms(&mut self, dom: DomId, tx: u32, path: &[u8]) -> Result<Vec<Perm>, XsError> {
        let path = canonical(dom, path)?;
        self.touch(tx, &path, false);
        let node = self.tree(dom, tx)?.get(&path).ok_or(XsError::Noent)?;
        if !access(node, dom).reads() {
            return Err(XsError::Acces);
        }
        Ok(node.perms.clone())
    }

    /// Nodes owned by `dom` in `tree`.
    fn owned(tree: &BTreeMap<String, Node>, dom: DomId) -> usize {
        tree.values()
            .filter(|n| n.perms.first().is_some_and(|p| p.dom == dom))
            .count()
    }

    /// Create `path` and any missing ancestor (each inheriting its parent's
    /// permissions, owned by `dom` if it is not domain 0), if `dom` may write the
    /// nearest existing ancestor. Returns the paths created.
    fn create(
        &mut self,
        dom: DomId,
        tx: u32,
        path: &str,
        value: Vec<u8>,
    ) -> Result<Vec<String>, XsError> {
        let generation = self.generation + 1;
        let quota = self.quota.nodes;
        let tree = self.tree(dom, tx)?;
        let mut missing = vec![path.to_string()];
        let mut at = parent(path);
        while let Some(p) = at {
            if tree.contains_key(p) {
                break;
            }
            missing.push(p.to_string());
            at = parent(p);
        }
        let ancestor = tree.get(at.ok_or(XsError::Inval)?).ok_or(XsError::Noent)?;
        if !access(ancestor, dom).writes() {
            return Err(XsError::Acces);
        }
        if dom != 0 && Self::owned(tree, dom) + missing.len() > quota {
            return Err(XsError::Nospc);
        }
        let mut perms = ancestor.perms.clone();
        if dom != 0 {
            perms[0].dom = dom;
        }
        for (i, p) in missing.iter().enumerate().rev() {
            tree.insert(
                p.clone(),
                Node {
                    value: if i == 0 { value.clone() } else { Vec::new() },
                    perms: perms.clone(),
                    changed: generation,
                },
            );
        }
        Ok(missing)
    }

    /// Set `path`'s value, creating it (and missing ancestors) if needed.
    pub fn write(&mut self, dom: DomId, tx: u32, path: &[u8], value: &[u8]) -> Result<(), XsError> {
        let path = canonical(dom, path)?;
        let generation = self.generation + 1;
        let tree = self.tree(dom, tx)?;
        let created = if let Some(node) = tree.get_mut(&path) {
            if !access(node, dom).writes() {
                return Err(XsError::Acces);
            }
            node.value = value.to_vec();
            node.changed = generation;
            vec![path]
        } else {
            self.create(dom, tx, &path, value.to_vec())?
        };
        self.changed(tx, &created, false);
        Ok(())
    }

    /// Create `path` (and missing ancestors) empty; nothing if it exists.
    pub fn mkdir(&mut self, dom: DomId, tx: u32, path: &[u8]) -> Result<(), XsError> {
        let path = canonical(dom, path)?;
        let tree = self.tree(dom, tx)?;
        if let Some(node) = tree.get(&path) {
            if !access(node, dom).writes() {
                return Err(XsError::Acces);
            }
            self.touch(tx, &path, false);
            return Ok(());
        }
        let created = self.create(dom, tx, &path, Vec::new())?;
        self.changed(tx, &created, false);
        Ok(())
    }

    /// Remove `path` and everything below it (the root cannot be removed).
    pub fn rm(&mut self, dom: DomId, tx: u32, path: &[u8]) -> Result<(), XsError> {
        let path = canonical(dom, path)?;
        if path == "/" {
            return Err(XsError::Inval);
        }
        let tree = self.tree(dom, tx)?;
        let node = tree.get(&path).ok_or(XsError::Noent)?;
        if !access(node, dom).writes() {
            return Err(XsError::Acces);
        }
        let gone: Vec<String> = tree
            .range(path.clone()..)
            .take_while(|(k, _)| within(k, &path))
            .map(|(k, _)| k.clone())
            .collect();
        for k in &gone {
            tree.remove(k);
        }
        // The parent's children changed.
        if let Some(p) = parent(&path).map(str::to_string) {
            self.touch(tx, &p, false);
        }
        self.changed(tx, &gone, true);
        Ok(())
    }

    /// Set `path`'s permissions. Only its owner (or domain 0) may, and a domain
    /// other than 0 may not give the node away.
    pub fn set_perms(
        &mut self,
        dom: DomId,
        tx: u32,
        path: &[u8],
        perms: &[Perm],
    ) -> Result<(), XsError> {
        let path = canonical(dom, path)?;
        if perms.is_empty() || perms.len() > MAX_PERMS {
            return Err(XsError::Inval);
        }
        let generation = self.generation + 1;
        let tree = self.tree(dom, tx)?;
        let node = tree.get_mut(&path).ok_or(XsError::Noent)?;
        let owner = node.perms.first().map(|p| p.dom);
        if dom != 0 && (owner != Some(dom) || perms[0].dom != dom) {
            return Err(XsError::Acces);
        }
        node.perms = perms.to_vec();
        node.changed = generation;
        self.changed(tx, &[path], false);
        Ok(())
    }

    /// Record that `paths` changed: in a transaction, for its commit; outside one, a
    /// new generation and the watches fire.
    fn changed(&mut self, tx: u32, paths: &[String], removed: bool) {
        if tx != 0 {
            for p in paths {
                self.touch(tx, p, true);
            }
            return;
        }
        self.generation += 1;
        for p in paths {
            self.fire(p, removed);
        }
    }

    fn fire(&mut self, changed: &str, removed: bool) {
        let mut due = Vec::new();
        for w in &self.watches {
            // A watch fires for a change at or below its path, and for the removal of
            // an ancestor (which takes its path with it).
            if within(changed, &w.path) || (removed && within(&w.path, changed)) {
                let path = if w.given.first() == Some(&b'/') {
                    changed.as_bytes().to_vec()
                } else {
                    // Relative to the watcher's domain path, as registered.
                    let base = domain_path(w.dom);
                    changed
                        .strip_prefix(&format!("{base}/"))
                        .map_or_else(|| changed.as_bytes().to_vec(), |r| r.as_bytes().to_vec())
                };
                due.push((
                    w.dom,
                    WatchEvent {
                        path,
                        token: w.token.clone(),
                    },
                ));
            }
        }
        for (dom, e) in due {
            self.queue_event(dom, e);
        }
    }

    fn queue_event(&mut self, dom: DomId, e: WatchEvent) {
        let q = self.events.entry(dom).or_default();
        if q.len() >= self.quota.pending_events {
            q.pop_front();
            self.dropped_events += 1;
        }
        q.push_back(e);
    }

    /// Watch `path` (relative or absolute, or a special `@` path) with `token`. As in
    /// xenstored, an event fires at once.
    pub fn watch(&mut self, dom: DomId, path: &[u8], token: &[u8]) -> Result<(), XsError> {
        let abs = if path.first() == Some(&b'@') {
            match path {
                b"@introduceDomain" | b"@releaseDomain" => {
                    String::from_utf8(path.to_vec()).map_err(|_| XsError::Inval)?
                }
                _ => return Err(XsError::Inval),
            }
        } else {
            canonical(dom, path)?
        };
        if token.len() > REL_PATH_MAX {
            return Err(XsError::Inval);
        }
        let mine = self.watches.iter().filter(|w| w.dom == dom);
        if mine.clone().any(|w| w.given == path && w.token == token) {
            return Err(XsError::Exist);
        }
        if dom != 0 && mine.count() >= self.quota.watches {
            return Err(XsError::Nospc);
        }
        self.watches.push(Watch {
            dom,
            path: abs,
            given: path.to_vec(),
            token: token.to_vec(),
        });
        self.queue_event(
            dom,
            WatchEvent {
                path: path.to_vec(),
                token: token.to_vec(),
            },
        );
        Ok(())
    }

    /// Remove a watch.
    pub fn unwatch(&mut self, dom: DomId, path: &[u8], token: &[u8]) -> Result<(), XsError> {
        let i = self
            .watches
            .iter()
            .position(|w| w.dom == dom && w.given == path && w.token == token)
            .ok_or(XsError::Noent)?;
        self.watches.remove(i);
        Ok(())
    }

    /// Remove every watch of `dom` (`XS_RESET_WATCHES`).
    pub fn reset_watches(&mut self, dom: DomId) {
        self.watches.retain(|w| w.dom != dom);
        self.events.remove(&dom);
    }

    /// The watch events waiting for `dom`, oldest first.
    pub fn take_events(&mut self, dom: DomId) -> Vec<WatchEvent> {
        self.events
            .get_mut(&dom)
            .map(|q| q.drain(..).collect())
            .unwrap_or_default()
    }

    /// Watch events dropped because a domain let too many wait.
    pub fn dropped_events(&self) -> u64 {
        self.dropped_events
    }

    /// Start a transaction for `dom`; returns its id.
    pub fn transaction_start(&mut self, dom: DomId) -> Result<u32, XsError> {
        let open = self.transactions.values().filter(|t| t.dom == dom).count();
        if dom != 0 && open >= self.quota.transactions {
            return Err(XsError::Nospc);
        }
        let id = self.next_tx;
        self.next_tx = self.next_tx.checked_add(1).unwrap_or(1).max(1);
        self.transactions.insert(
            id,
            Transaction {
                dom,
                nodes: self.nodes.clone(),
                started: self.generation,
                touched: BTreeSet::new(),
                changed: BTreeSet::new(),
            },
        );
        Ok(id)
    }

    /// End transaction `tx` of `dom`: commit its changes (`commit`), unless a path it
    /// read or wrote changed since it started (then [`XsError::Again`]: the caller
    /// starts again), or abort them.
    pub fn transaction_end(&mut self, dom: DomId, tx: u32, commit: bool) -> Result<(), XsError> {
        match self.transactions.get(&tx) {
            Some(t) if t.dom == dom => {}
            _ => return Err(XsError::Inval),
        }
        let t = self.transactions.remove(&tx).ok_or(XsError::Inval)?;
        if !commit {
            return Ok(());
        }
        let conflict = t.touched.iter().any(|p| {
            let now = self.nodes.get(p);
            let then = t.nodes.get(p).map(|n| n.changed);
            let changed_since = now.is_some_and(|n| n.changed > t.started);
            // Created or removed since the start, or changed since.
            changed_since || (now.is_none() && then.is_some_and(|_| !t.changed.contains(p)))
        });
        if conflict {
            return Err(XsError::Again);
        }
        if dom != 0 && Self::owned(&t.nodes, dom) > self.quota.nodes {
            return Err(XsError::Nospc);
        }
        self.generation += 1;
        for p in &t.changed {
            match t.nodes.get(p) {
                Some(n) => {
                    let mut n = n.clone();
                    n.changed = self.generation;
                    self.nodes.insert(p.clone(), n);
                }
                None => {
                    self.nodes.remove(p);
                }
            }
        }
        for p in &t.changed {
            self.fire(p, !t.nodes.contains_key(p));
        }
        Ok(())
    }

    /// End every transaction and watch of `dom` (its connection went away).
    pub fn release(&mut self, dom: DomId) {
        self.transactions.retain(|_, t| t.dom != dom);
        self.reset_watches(dom);
    }

    /// Every node as `(path, value)`, in path order (for tests and snapshots).
    pub fn dump(&self) -> Vec<(String, Vec<u8>)> {
        self.nodes
            .iter()
            .map(|(k, n)| (k.clone(), n.value.clone()))
            .collect()
    }
}
