//! `RealSys::mkdir_all` under a restrictive umask (a test binary of its own: the umask is
//! process-wide). The systemd unit runs cvm-warden with `UMask=0077`; the directories it
//! makes (`/run/cvm-warden`, mount points) must stay traversable by the workload.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;

use cvm_warden::sys::{RealSys, Sys};
use nix::sys::stat::{umask, Mode};

#[test]
fn mkdir_all_makes_traversable_directories_whatever_the_umask() {
    let tmp = tempfile::tempdir().unwrap();
    let old = umask(Mode::from_bits_truncate(0o077));
    let made = RealSys::default().mkdir_all(&tmp.path().join("run/cvm-warden/bundle"));
    umask(old);
    made.unwrap();
    for dir in ["run", "run/cvm-warden", "run/cvm-warden/bundle"] {
        let mode = std::fs::metadata(tmp.path().join(dir))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777;
        assert_eq!(mode, 0o755, "{dir} is {mode:o}");
    }
    // An existing directory keeps its mode.
    let private = tmp.path().join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    RealSys::default().mkdir_all(&private.join("x")).unwrap();
    let mode = std::fs::metadata(&private).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o700);
}
