//! Kernel-wide switches that `nix` does not wrap: `swapoff(2)`. The lockdown capability
//! (`crate::lockdown`) calls these through its `LockdownSys` seam.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;

/// `swapoff(2)` on the swap device or file `path` (as `/proc/swaps` names it). `EINVAL` when
/// `path` holds a NUL byte (it cannot name a swap area then).
pub fn swapoff(path: &Path) -> Result<(), Errno> {
    let path = CString::new(path.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)?;
    // SAFETY: `path` is a valid NUL-terminated C string that outlives the call; swapoff(2)
    // only reads it and has no other memory effects on this process.
    let rc = unsafe { libc::swapoff(path.as_ptr()) };
    Errno::result(rc).map(drop)
}

/// `malloc_trim(0)` (glibc): hands the free pages of every heap arena back to the kernel.
/// PID 1 calls it once the boot stages are done, whose buffers (the bundle walk's threads,
/// TLS, the TSS, the JSON of the exchange) are free by then; true when memory was released.
pub fn trim_heap() -> bool {
    // SAFETY: malloc_trim takes no pointer and only walks glibc's own allocator state, under
    // its own locks; it is safe to call from any thread at any time.
    unsafe { libc::malloc_trim(0) == 1 }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn a_path_with_a_nul_byte_is_refused_before_the_call() {
        use std::os::unix::ffi::OsStrExt;
        let path = Path::new(std::ffi::OsStr::from_bytes(b"/dev/sda\0x"));
        assert_eq!(swapoff(path), Err(Errno::EINVAL));
    }

    #[test]
    fn swapoff_of_a_file_that_is_no_swap_area_fails_without_effect() {
        // Not a swap area: the kernel answers EINVAL (or EPERM without CAP_SYS_ADMIN); either
        // way nothing on the host changes.
        let file = tempfile::NamedTempFile::new().unwrap();
        let errno = swapoff(file.path()).unwrap_err();
        assert!(matches!(errno, Errno::EINVAL | Errno::EPERM), "{errno}");
    }
}
