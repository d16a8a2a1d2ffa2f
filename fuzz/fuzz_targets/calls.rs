//! Shared by the hypercall fuzz targets: the input as calls of 64-bit words, and the
//! check that a call's result is one a Xen guest can meet.

use vmcraft_pv_hypercall::hypercall::errno;

/// `data` as calls of `n` little-endian 64-bit words each (a short tail is dropped).
pub fn calls(data: &[u8], n: usize) -> impl Iterator<Item = Vec<u64>> + '_ {
    data.chunks_exact(8 * n).map(|call| {
        call.chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().unwrap()))
            .collect()
    })
}

/// Panics unless `r` is a success (not negative), or the negated errno of a refusal
/// every hypercall may give (EPERM, EFAULT, EINVAL, ENOSYS) or one of `also`.
pub fn assert_xen_result(r: i64, also: &[i64], call: impl std::fmt::Debug) {
    let common = [errno::EPERM, errno::EFAULT, errno::EINVAL, errno::ENOSYS];
    assert!(
        r >= 0 || common.iter().chain(also).any(|e| r == -e),
        "{call:?} -> {r}"
    );
}
