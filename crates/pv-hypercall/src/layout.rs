//! Where a PV guest's shared pages are and which port rings the event-channel doorbell:
//! the part of a PV machine that the guest and the host must agree on.
//!
//! ```
//! use vmcraft_pv_hypercall::layout::PvLayout;
//! let layout = PvLayout {
//!     shared_info: 0x30_0000,
//!     console_page: 0x30_1000,
//!     blk_ring: 0x30_2000,
//!     grant_table: 0x30_3000,
//!     grant_entries: 64,
//!     doorbell_port: 0x9c,
//! };
//! assert!(layout.pages_overlap().is_none());
//! ```

/// The guest-physical pages of a PV machine and its doorbell port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PvLayout {
    /// The event-channel shared-info page.
    pub shared_info: u64,
    /// The PV console's page (Xen's `xencons_interface`).
    pub console_page: u64,
    /// The blkif ring page.
    pub blk_ring: u64,
    /// The grant table (v1 entries, 8 bytes each).
    pub grant_table: u64,
    /// Entries in the grant table.
    pub grant_entries: u32,
    /// The port whose 4-byte write of an event-channel port number sends on it.
    pub doorbell_port: u16,
}

impl PvLayout {
    /// vmcraft's own PV guests' layout: four pages from 3 MiB (shared info, console,
    /// blkif ring, a 64-entry grant table), the doorbell on port 0x9c.
    pub const STANDARD: PvLayout = PvLayout {
        shared_info: 0x30_0000,
        console_page: 0x30_1000,
        blk_ring: 0x30_2000,
        grant_table: 0x30_3000,
        grant_entries: 64,
        doorbell_port: 0x9c,
    };

    /// The first two regions that overlap, by name, if any (pages are 4 KiB; the grant
    /// table is as long as its entries).
    pub fn pages_overlap(&self) -> Option<(&'static str, &'static str)> {
        let grant_len = u64::from(self.grant_entries) * 8;
        let regions = [
            ("shared info", self.shared_info, 4096),
            ("console page", self.console_page, 4096),
            ("blkif ring", self.blk_ring, 4096),
            ("grant table", self.grant_table, grant_len),
        ];
        for (i, a) in regions.iter().enumerate() {
            for b in &regions[i + 1..] {
                if a.1 < b.1.saturating_add(b.2) && b.1 < a.1.saturating_add(a.2) {
                    return Some((a.0, b.0));
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_pages_are_named() {
        let mut l = PvLayout {
            shared_info: 0x1000,
            console_page: 0x2000,
            blk_ring: 0x3000,
            grant_table: 0x4000,
            grant_entries: 512,
            doorbell_port: 0x9c,
        };
        assert_eq!(l.pages_overlap(), None);
        l.grant_entries = 513; // one entry past the page: still its own region
        assert_eq!(l.pages_overlap(), None);
        l.blk_ring = 0x2800;
        assert_eq!(l.pages_overlap(), Some(("console page", "blkif ring")));
    }
}
