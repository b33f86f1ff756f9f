//! A software TPM for tests: `swtpm` on free loopback ports with a fresh state directory,
//! killed on drop. Shared by `tests/tpm_swtpm.rs` and `tests/kbs_protocol.rs` (included with
//! `#[path]`, so the namespace harness in `common/mod.rs` is not pulled in).
//!
//! A missing `swtpm` fails the test with a message naming the package: these tests are never
//! skipped.

use std::io::ErrorKind;
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `swtpm`, killed on drop.
pub struct Swtpm {
    child: Child,
    /// The TPM command port (the control channel is `port + 1`).
    pub port: u16,
    _state: tempfile::TempDir,
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free TCP port on loopback (nothing listens on it once this returns).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Two free consecutive ports.
fn free_port_pair() -> (u16, u16) {
    for _ in 0..50 {
        let port = free_port();
        if port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return (port, port + 1);
        }
    }
    panic!("no two free consecutive tcp ports on 127.0.0.1 for swtpm");
}

impl Swtpm {
    /// Starts a fresh swtpm (5 tries on fresh ports).
    pub fn start() -> Swtpm {
        let mut last = String::new();
        for _ in 0..5 {
            let state = tempfile::tempdir().unwrap();
            // The TSS swtpm TCTI talks to the control channel at port + 1.
            let (port, ctrl) = free_port_pair();
            let spawned = Command::new("swtpm")
                .args(["socket", "--tpm2", "--tpmstate"])
                .arg(format!("dir={}", state.path().display()))
                .args([
                    "--server",
                    &format!("type=tcp,port={port},bindaddr=127.0.0.1"),
                ])
                .args([
                    "--ctrl",
                    &format!("type=tcp,port={ctrl},bindaddr=127.0.0.1"),
                ])
                .args(["--flags", "not-need-init,startup-clear"])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn();
            let child = match spawned {
                Ok(child) => child,
                Err(e) if e.kind() == ErrorKind::NotFound => panic!(
                    "swtpm is not installed (`apt install swtpm swtpm-tools`): the TPM tests \
                     need a real software TPM and are not skipped"
                ),
                Err(e) => panic!("cannot start swtpm: {e}"),
            };
            let mut tpm = Swtpm {
                child,
                port,
                _state: state,
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(status)) = tpm.child.try_wait() {
                    let mut err = String::new();
                    if let Some(mut stderr) = tpm.child.stderr.take() {
                        let _ = std::io::Read::read_to_string(&mut stderr, &mut err);
                    }
                    last = format!("swtpm exited with {status}: {err}");
                    break;
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok()
                    && TcpStream::connect(("127.0.0.1", ctrl)).is_ok()
                {
                    return tpm;
                }
                if Instant::now() > deadline {
                    panic!("swtpm did not listen on 127.0.0.1:{port} within 10 s");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("swtpm did not start (5 tries on fresh ports): {last}");
    }

    /// The TSS TCTI string for this swtpm.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }
}
