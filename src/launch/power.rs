//! The power button (PID 1 shape): the host's ACPI power button (QEMU's
//! `system_powerdown`, a cloud's "stop" that asks first) is an orderly stop, as a SIGTERM to
//! PID 1 is: the workload gets SIGTERM and its grace period, volumes close, the closing
//! record is written, the machine powers off.
//!
//! The initramfs has no acpid, no systemd-logind and no udev: cvm-warden finds the button
//! itself, as the kernel's input devices whose name is `Power Button` (the `button` driver,
//! read through `evdev`, both modules the policy's `[kernel] modules` can load), watches them
//! on a thread, and on a key press of `KEY_POWER` writes `launch/power_button` and sends
//! SIGTERM to its own process, where the supervisor's stop request takes over.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::audit::Audit;

/// Where input devices are listed.
pub const INPUT_SYSFS: &str = "/sys/class/input";
/// `EV_KEY` (linux/input-event-codes.h).
const EV_KEY: u16 = 0x01;
/// `KEY_POWER`.
const KEY_POWER: u16 = 116;
/// `struct input_event` on 64-bit Linux: a 16-byte timeval, type, code, value.
const EVENT_SIZE: usize = 24;

/// The event devices (`/dev/input/eventN`) whose input device is named `Power Button`,
/// looked up under `sysfs` (`eventN/device/name`) and opened under `dev`.
pub fn power_buttons(sysfs: &Path, dev: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(sysfs) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("event"))
        .filter(|e| {
            std::fs::read_to_string(e.path().join("device/name"))
                .is_ok_and(|name| name.trim_end() == "Power Button")
        })
        .map(|e| dev.join(e.file_name()))
        .collect();
    found.sort();
    found
}

/// Whether `bytes` (whole `struct input_event`s) hold a press of `KEY_POWER`.
pub fn power_pressed(bytes: &[u8]) -> bool {
    bytes.chunks_exact(EVENT_SIZE).any(|event| {
        let kind = u16::from_ne_bytes([event[16], event[17]]);
        let code = u16::from_ne_bytes([event[18], event[19]]);
        let value = i32::from_ne_bytes([event[20], event[21], event[22], event[23]]);
        kind == EV_KEY && code == KEY_POWER && value == 1
    })
}

/// Watches each of `devices` on its own thread; on the first press, records
/// `launch/power_button` (naming the device) and calls `stop` once. Returns the devices
/// watched (recorded by the caller so the log says whether a button exists at all).
pub fn watch(
    devices: &[PathBuf],
    audit: &Audit,
    stop: std::sync::Arc<dyn Fn() + Send + Sync>,
) -> Vec<PathBuf> {
    let pressed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut watched = Vec::new();
    for device in devices {
        let Ok(mut file) = File::open(device) else {
            continue;
        };
        watched.push(device.clone());
        let (audit, stop, pressed, device) =
            (audit.clone(), stop.clone(), pressed.clone(), device.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; EVENT_SIZE * 16];
            loop {
                match file.read(&mut buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Ok(0) | Err(_) => return,
                    Ok(n) if power_pressed(&buf[..n - n % EVENT_SIZE]) => {
                        if !pressed.swap(true, std::sync::atomic::Ordering::SeqCst) {
                            let _ = audit.record(
                                "launch",
                                "power_button",
                                json!({
                                    "device": device,
                                    "action": "stop the workload (SIGTERM, grace period), then the closing record and power-off",
                                }),
                            );
                            stop();
                        }
                        return;
                    }
                    Ok(_) => {}
                }
            }
        });
    }
    watched
}

/// The real stop: SIGTERM to this process (PID 1), the supervisor's stop request.
pub fn sigterm_self() {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGTERM);
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn event(kind: u16, code: u16, value: i32) -> Vec<u8> {
        let mut e = vec![0u8; 16];
        e.extend_from_slice(&kind.to_ne_bytes());
        e.extend_from_slice(&code.to_ne_bytes());
        e.extend_from_slice(&value.to_ne_bytes());
        e
    }

    #[test]
    fn only_a_press_of_key_power_counts() {
        assert!(power_pressed(&event(EV_KEY, KEY_POWER, 1)));
        assert!(!power_pressed(&event(EV_KEY, KEY_POWER, 0)), "release");
        assert!(!power_pressed(&event(EV_KEY, 115, 1)), "another key");
        assert!(!power_pressed(&event(0, KEY_POWER, 1)), "EV_SYN");
        let mut two = event(0, 0, 0);
        two.extend(event(EV_KEY, KEY_POWER, 1));
        assert!(power_pressed(&two));
        assert!(
            !power_pressed(&event(EV_KEY, KEY_POWER, 1)[..23]),
            "a torn event"
        );
    }

    #[test]
    fn buttons_are_found_by_name_in_sysfs() {
        let dir = tempfile::tempdir().unwrap();
        let sysfs = dir.path().join("input");
        for (event, name) in [
            ("event0", "AT Translated Set 2 keyboard"),
            ("event1", "Power Button"),
            ("event2", "Power Button"),
        ] {
            std::fs::create_dir_all(sysfs.join(event).join("device")).unwrap();
            std::fs::write(sysfs.join(event).join("device/name"), format!("{name}\n")).unwrap();
        }
        std::fs::create_dir_all(sysfs.join("input3")).unwrap();
        assert_eq!(
            power_buttons(&sysfs, Path::new("/dev/input")),
            [
                PathBuf::from("/dev/input/event1"),
                PathBuf::from("/dev/input/event2")
            ]
        );
        assert!(power_buttons(&dir.path().join("absent"), Path::new("/dev/input")).is_empty());
    }

    #[test]
    fn a_press_is_recorded_and_stops_once() {
        // Two buttons, each pressed (twice on the first): one record, one stop. Each
        // device's events go in one write (atomic on a pipe), since a watcher stops reading
        // after its press and a later write would meet a closed pipe.
        let dir = tempfile::tempdir().unwrap();
        let fifos = [dir.path().join("event1"), dir.path().join("event2")];
        for fifo in &fifos {
            nix::unistd::mkfifo(fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        }
        let (sink, lines) = crate::audit::MemorySink::new();
        let audit = Audit::new(vec![Box::new(sink)], false);
        let stops = Arc::new(AtomicUsize::new(0));
        let counter = stops.clone();
        let writers: Vec<_> = fifos
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, fifo)| {
                std::thread::spawn(move || {
                    let mut events = event(EV_KEY, 115, 1);
                    events.extend(event(EV_KEY, KEY_POWER, 1));
                    if i == 0 {
                        events.extend(event(EV_KEY, KEY_POWER, 1));
                    }
                    let mut w = std::fs::OpenOptions::new().write(true).open(fifo).unwrap();
                    w.write_all(&events).unwrap();
                })
            })
            .collect();
        let watched = watch(
            &fifos,
            &audit,
            Arc::new(move || {
                counter.fetch_add(1, Ordering::SeqCst);
            }),
        );
        assert_eq!(watched, fifos);
        for writer in writers {
            writer.join().unwrap();
        }
        let start = std::time::Instant::now();
        while stops.load(Ordering::SeqCst) == 0 && start.elapsed().as_secs() < 5 {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(stops.load(Ordering::SeqCst), 1);
        let lines = lines.lock().unwrap().clone();
        assert_eq!(
            lines
                .iter()
                .filter(|l| l.contains("\"event\":\"power_button\""))
                .count(),
            1,
            "{lines:?}"
        );
    }
}
