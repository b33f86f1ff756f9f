use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use serde_json::json;

use super::*;
use crate::policy::{AuditConfig, SyslogTarget};

/// A clock that starts at 2023-11-14T22:13:20Z and ticks 1 ms per call.
fn ticking_clock() -> Clock {
    let ms = Arc::new(AtomicU64::new(1_700_000_000_000));
    Box::new(move || UNIX_EPOCH + Duration::from_millis(ms.fetch_add(1, Ordering::SeqCst)))
}

fn memory_audit(insecure: bool) -> (Audit, Arc<Mutex<Vec<String>>>) {
    let (sink, lines) = MemorySink::new();
    (
        Audit::with_clock(vec![Box::new(sink)], insecure, ticking_clock()),
        lines,
    )
}

fn parse(line: &str) -> Record {
    Record::parse_line(line.as_bytes()).unwrap()
}

fn events(lines: &[String]) -> Vec<(String, String)> {
    lines
        .iter()
        .map(|l| {
            let r = parse(l);
            (r.stage, r.event)
        })
        .collect()
}

fn joined(lines: &[String]) -> Vec<u8> {
    lines
        .iter()
        .flat_map(|l| format!("{l}\n").into_bytes())
        .collect()
}

/// A writer the test can read back.
#[derive(Clone, Default)]
struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// ---- the log ----

#[test]
fn records_are_chained_and_every_sink_gets_the_exact_lines() {
    let (audit, seen) = memory_audit(false);
    assert_eq!(audit.head(), Digest::ZERO);
    let h0 = audit
        .record("boot", "start", json!({"version": "0.1.0"}))
        .unwrap();
    let h1 = audit.record("measure", "begin", Value::Null).unwrap();
    assert_eq!(audit.seq(), 2);
    assert_eq!(audit.head(), h1);
    let lines = audit.lines();
    assert_eq!(*seen.lock().unwrap(), lines);
    let (r0, r1) = (parse(&lines[0]), parse(&lines[1]));
    assert_eq!((r0.seq, r0.prev, r0.hash), (0, Digest::ZERO, h0));
    assert_eq!((r1.seq, r1.prev, r1.hash), (1, h0, h1));
    assert_eq!(r0.time, "2023-11-14T22:13:20.000Z");
    assert_eq!(r1.details, serde_json::Map::new());
    assert!(!lines[0].contains("insecure"));
    let report = verify(&joined(&lines)).unwrap();
    assert_eq!((report.records, report.last_seq, report.head), (2, 1, h1));
    assert!(!report.complete && !report.insecure);
}

#[test]
fn attestation_none_marks_every_record_insecure() {
    let (audit, _) = memory_audit(true);
    audit.record("boot", "start", json!({})).unwrap();
    audit.record("shutdown", "poweroff", json!({})).unwrap();
    for line in audit.lines() {
        assert!(parse(&line).insecure, "{line}");
        assert!(line.contains(",\"insecure\":true,\"prev\":"));
    }
    let report = verify(&joined(&audit.lines())).unwrap();
    assert!(report.insecure && report.complete);
}

#[test]
fn a_failing_sink_is_recorded_once_and_catches_up_when_it_recovers() {
    let (good, good_lines) = MemorySink::new();
    let (flaky, flaky_lines) = MemorySink::new();
    let flaky = flaky
        .named("flaky")
        .failing(3, ErrorKind::ConnectionRefused);
    let audit = Audit::with_clock(
        vec![Box::new(good), Box::new(flaky)],
        false,
        ticking_clock(),
    );
    audit.record("boot", "start", json!({})).unwrap(); // fails twice: seq 0 + sink_failed
    audit.record("perimeter", "begin", json!({})).unwrap(); // fails the third time
    audit.record("perimeter", "ok", json!({})).unwrap(); // recovers
    let lines = audit.lines();
    assert_eq!(
        events(&lines),
        [
            ("boot", "start"),
            ("audit", "sink_failed"),
            ("perimeter", "begin"),
            ("perimeter", "ok"),
            ("audit", "sink_recovered"),
        ]
        .map(|(s, e)| (s.to_string(), e.to_string()))
    );
    let failed = parse(&lines[1]).details;
    assert_eq!(failed["sink"], "flaky");
    assert_eq!(failed["required"], false);
    assert_eq!(failed["error"], "memory sink told to fail");
    assert_eq!(parse(&lines[4]).details["caught_up"], 4);
    assert_eq!(*good_lines.lock().unwrap(), lines);
    assert_eq!(*flaky_lines.lock().unwrap(), lines);
    verify(&joined(&lines)).unwrap();
}

/// Fails every other write: the log must still return.
struct Flapping(u32);

impl Sink for Flapping {
    fn name(&self) -> String {
        "flapping".into()
    }
    fn required(&self) -> bool {
        false
    }
    fn write_line(&mut self, _: &str) -> std::io::Result<()> {
        self.0 += 1;
        if self.0 % 2 == 0 {
            Err(std::io::Error::other("flap"))
        } else {
            Ok(())
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_flapping_sink_cannot_make_a_record_loop() {
    let audit = Audit::with_clock(vec![Box::new(Flapping(0))], false, ticking_clock());
    for _ in 0..10 {
        audit.record("s", "e", json!({})).unwrap();
    }
    let lines = audit.lines();
    assert!(lines.len() <= 30, "{}", lines.len());
    verify(&joined(&lines)).unwrap();
}

#[test]
fn a_required_sink_that_fails_stops_the_boot_but_the_other_sinks_get_everything() {
    let (req, _) = MemorySink::new();
    let req = req.named("req").required(true);
    let control = req.control();
    let (console, console_lines) = MemorySink::new();
    let audit = Audit::with_clock(
        vec![Box::new(req), Box::new(console)],
        false,
        ticking_clock(),
    );
    audit.record("boot", "start", json!({})).unwrap();
    control.fail_next(1, ErrorKind::StorageFull);
    let err = audit.record("perimeter", "begin", json!({})).unwrap_err();
    assert!(
        matches!(&err, AuditError::RequiredSinkFailed { sink, source }
            if sink == "req" && source.kind() == ErrorKind::StorageFull),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "required audit sink req failed, so the boot stops (audit.file_required = true); \
         fix the sink or make it optional in the policy"
    );
    // Sticky, even though the sink accepts writes again.
    assert!(audit.record("boot", "failed", json!({})).is_err());
    assert!(audit.require_sinks().is_err());
    assert!(audit.flush().is_err());
    let lines = audit.lines();
    assert_eq!(*console_lines.lock().unwrap(), lines);
    assert_eq!(parse(&lines[2]).event, "sink_failed");
    assert_eq!(parse(&lines[2]).details["required"], true);
}

#[test]
fn a_required_sink_that_goes_missing_after_it_worked_is_a_failure() {
    let (req, _) = MemorySink::new();
    let req = req.required(true);
    let control = req.control();
    let audit = Audit::with_clock(vec![Box::new(req)], false, ticking_clock());
    audit.record("boot", "start", json!({})).unwrap();
    control.fail_always(ErrorKind::NotFound);
    assert!(matches!(
        audit.record("x", "y", json!({})),
        Err(AuditError::RequiredSinkFailed { .. })
    ));
}

#[test]
fn a_required_file_on_a_later_volume_waits_then_gets_the_whole_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let volume = dir.path().join("volume");
    let path = volume.join("audit.jsonl");
    let audit = Audit::with_clock(
        vec![Box::new(FileSink::new(&path, true))],
        false,
        ticking_clock(),
    );
    audit.record("boot", "start", json!({})).unwrap();
    audit.record("unlock", "begin", json!({})).unwrap();
    let err = audit.require_sinks().unwrap_err();
    assert!(
        matches!(&err, AuditError::RequiredSinkBehind { pending: 3, source: Some(e), .. }
            if e.kind() == ErrorKind::NotFound),
        "{err:?}"
    );
    assert!(err.to_string().starts_with(&format!(
        "required audit sink file:{} has not received 3 record(s) before launch",
        path.display()
    )));
    std::fs::create_dir(&volume).unwrap();
    audit.record("unlock", "ok", json!({})).unwrap();
    audit.require_sinks().unwrap();
    let lines = audit.lines();
    assert_eq!(
        events(&lines)[1..].to_vec(),
        [
            ("audit", "sink_waiting"),
            ("unlock", "begin"),
            ("unlock", "ok"),
            ("audit", "sink_recovered"),
        ]
        .map(|(s, e)| (s.to_string(), e.to_string()))
    );
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(on_disk, joined(&lines));
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(verify_file(&path).unwrap().records, 5);
}

#[test]
fn two_threads_share_one_ordered_chain() {
    let (audit, seen) = memory_audit(false);
    let handles: Vec<_> = (0..2)
        .map(|t| {
            let audit = audit.clone();
            std::thread::spawn(move || {
                for i in 0..200 {
                    audit
                        .record("t", "e", json!({"thread": t, "i": i}))
                        .unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let lines = audit.lines();
    assert_eq!(lines.len(), 400);
    assert_eq!(*seen.lock().unwrap(), lines);
    assert_eq!(verify(&joined(&lines)).unwrap().last_seq, 399);
}

#[test]
fn a_poisoned_lock_is_recovered_and_a_held_lock_does_not_hang_the_panic_hook() {
    let (audit, _) = memory_audit(false);
    audit.record("boot", "start", json!({})).unwrap();
    let held = audit.clone();
    let joined_thread = std::thread::spawn(move || {
        let _guard = held.inner.lock().unwrap();
        panic!("poison the audit lock");
    })
    .join();
    assert!(joined_thread.is_err());
    audit.record("boot", "after_poison", json!({})).unwrap();
    audit
        .record_within(Duration::from_millis(50), "panic", "hook", json!({}))
        .unwrap();

    let guard = audit.inner.lock();
    let err = audit
        .record_within(Duration::from_millis(20), "panic", "hook", json!({}))
        .unwrap_err();
    drop(guard);
    assert!(matches!(err, AuditError::Busy(..)));
    assert_eq!(audit.seq(), 3);
}

#[test]
fn closing_events_are_the_documented_ones() {
    assert!(is_closing("launch", "exec"));
    assert!(is_closing("shutdown", "poweroff"));
    assert!(is_closing("shutdown", "halt"));
    assert!(is_closing("shutdown", "exit"));
    assert!(!is_closing("launch", "begin"));
}

// ---- sinks ----

#[test]
fn sinks_from_config_builds_file_syslog_console_in_order() {
    let cfg = AuditConfig {
        file: Some(PathBuf::from("/workspace/audit/a.jsonl")),
        file_dir: None,
        file_required: true,
        syslog: Some(SyslogTarget::Udp("127.0.0.1:514".into())),
        console: true,
        checkpoint_interval_secs: 600,
        export_port: None,
    };
    let sinks = sinks_from_config(&cfg, Box::new(std::io::sink()));
    let names: Vec<_> = sinks.iter().map(|s| (s.name(), s.required())).collect();
    assert_eq!(
        names,
        [
            ("file:/workspace/audit/a.jsonl".to_string(), true),
            ("syslog:udp://127.0.0.1:514".to_string(), false),
            ("console".to_string(), false),
        ]
    );
    let none = AuditConfig {
        file: None,
        file_dir: None,
        file_required: false,
        syslog: Some(SyslogTarget::Local),
        console: false,
        checkpoint_interval_secs: 600,
        export_port: None,
    };
    let sinks = sinks_from_config(&none, Box::new(std::io::sink()));
    assert_eq!(sinks.len(), 1);
    assert_eq!(sinks[0].name(), "syslog:local");
}

#[test]
fn virtio_port_sink_finds_its_port_by_name_in_sysfs_and_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let sysfs = dir.path().join("virtio-ports");
    let dev = dir.path().join("dev");
    std::fs::create_dir_all(sysfs.join("vport0p1")).unwrap();
    std::fs::create_dir_all(sysfs.join("vport1p1")).unwrap();
    std::fs::create_dir_all(&dev).unwrap();
    std::fs::write(sysfs.join("vport0p1/name"), "org.qemu.guest_agent.0\n").unwrap();
    // The port's driver has not named it yet: lines wait in the log's backlog.
    let sink = VirtioPortSink::at("cvm-warden.audit", &sysfs, &dev);
    let audit = Audit::with_clock(vec![Box::new(sink)], false, ticking_clock());
    audit.record("boot", "start", json!({})).unwrap();
    std::fs::write(sysfs.join("vport1p1/name"), "cvm-warden.audit\n").unwrap();
    std::fs::write(dev.join("vport1p1"), "").unwrap();
    audit.record("boot", "modules_loaded", json!({})).unwrap();
    audit.record("shutdown", "poweroff", json!({})).unwrap();
    audit.flush().unwrap();
    let written = std::fs::read_to_string(dev.join("vport1p1")).unwrap();
    assert!(std::fs::read_to_string(dev.join("vport0p1")).is_err());
    let lines: Vec<&str> = written.lines().collect();
    assert!(lines[0].starts_with("{\"seq\":0,"), "{written}");
    assert!(verify(written.as_bytes()).unwrap().complete, "{written}");
    assert_eq!(
        VirtioPortSink::new("cvm-warden.audit").name(),
        "virtio-port:cvm-warden.audit"
    );
}

#[test]
fn virtio_port_sink_never_blocks_on_a_host_that_stopped_reading() {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = tempfile::tempdir().unwrap();
    let sysfs = dir.path().join("virtio-ports");
    let dev = dir.path().join("dev");
    std::fs::create_dir_all(sysfs.join("vport0p1")).unwrap();
    std::fs::create_dir_all(&dev).unwrap();
    std::fs::write(sysfs.join("vport0p1/name"), "cvm-warden.audit\n").unwrap();
    let fifo = dev.join("vport0p1");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    // The host end: connected, but it reads nothing until told.
    let mut host = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let mut sink = VirtioPortSink::at("cvm-warden.audit", &sysfs, &dev);
    let line = "x".repeat(10_000);
    let start = std::time::Instant::now();
    let mut failed = None;
    for i in 0..20 {
        if let Err(e) = sink.write_line(&line) {
            failed = Some((i, e));
            break;
        }
    }
    let (i, error) = failed.expect("a full port must fail the write, not block");
    assert_eq!(error.kind(), ErrorKind::TimedOut, "{error}");
    assert!(i >= 1, "the first lines fit the pipe");
    assert!(
        start.elapsed() < PORT_WRITE_WAIT * 2,
        "{:?}",
        start.elapsed()
    );
    // While the host stays away, later lines fail at once instead of waiting again.
    let quick = std::time::Instant::now();
    assert!(sink.write_line(&line).is_err());
    assert!(
        quick.elapsed() < PORT_WRITE_WAIT / 2,
        "{:?}",
        quick.elapsed()
    );
    // The host reads again: the next line starts on a line of its own.
    let mut taken = Vec::new();
    let _ = host.read_to_end(&mut taken);
    sink.write_line("{\"seq\":9}").unwrap();
    let mut rest = Vec::new();
    let _ = host.read_to_end(&mut rest);
    let rest = String::from_utf8(rest).unwrap();
    assert!(rest.ends_with("\n{\"seq\":9}\n"), "{rest:?}");
    let all = String::from_utf8(taken).unwrap() + &rest;
    assert!(all.lines().any(|l| l == "{\"seq\":9}"));
}

#[test]
fn console_sink_writes_the_exact_verifiable_lines() {
    let buf = SharedBuf::default();
    let audit = Audit::with_clock(
        vec![Box::new(ConsoleSink::new(Box::new(buf.clone())))],
        false,
        ticking_clock(),
    );
    audit.record("boot", "start", json!({})).unwrap();
    audit.record("shutdown", "exit", json!({})).unwrap();
    let written = buf.0.lock().unwrap().clone();
    assert_eq!(written, joined(&audit.lines()));
    assert!(verify(&written).unwrap().complete);
}

#[test]
fn file_sink_appends_runs_and_starts_after_a_torn_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let first = Audit::with_clock(
        vec![Box::new(FileSink::new(&path, false))],
        false,
        ticking_clock(),
    );
    first.record("boot", "start", json!({})).unwrap();
    first.record("shutdown", "poweroff", json!({})).unwrap();
    let second = Audit::with_clock(
        vec![Box::new(FileSink::new(&path, false))],
        false,
        ticking_clock(),
    );
    second.record("boot", "start", json!({})).unwrap();
    // A crash in the middle of a write.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(b"{\"seq\":1,\"time\":\"2023-")
        .unwrap();
    let third = Audit::with_clock(
        vec![Box::new(FileSink::new(&path, false))],
        false,
        ticking_clock(),
    );
    third.record("boot", "start", json!({})).unwrap();
    third.record("launch", "exec", json!({})).unwrap();
    let report = verify_file(&path).unwrap();
    assert_eq!((report.records, report.complete), (2, true));
    assert_eq!(report.earlier_runs.len(), 2);
    assert_eq!(
        (
            report.earlier_runs[0].records,
            report.earlier_runs[0].complete
        ),
        (2, true)
    );
    assert!(report.earlier_runs[1].torn && !report.earlier_runs[1].complete);
    assert_eq!(report.earlier_runs[1].first_line, 3);
    assert_eq!(report.head, third.head());
}

#[test]
fn file_sink_refuses_a_symlink() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("elsewhere");
    let link = dir.path().join("audit.jsonl");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let mut sink = FileSink::new(&link, false);
    assert!(sink.write_line("{}").is_err());
    assert!(!target.exists());
}

#[test]
fn syslog_sink_sends_rfc5424_to_a_local_datagram_socket_and_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("log");
    let sink = SyslogSink::unix_at(&socket).with_retry_after(Duration::ZERO);
    assert_eq!(sink.name(), format!("syslog:unix:{}", socket.display()));
    let (mem, _) = MemorySink::new();
    let audit = Audit::with_clock(vec![Box::new(sink), Box::new(mem)], false, ticking_clock());
    // No socket yet: the sink waits.
    audit.record("boot", "start", json!({})).unwrap();
    let receiver = UnixDatagram::bind(&socket).unwrap();
    receiver
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    audit.record("boot", "next", json!({})).unwrap();
    let lines = audit.lines();
    assert_eq!(parse(&lines[1]).event, "sink_waiting");
    let mut got = Vec::new();
    for _ in 0..lines.len() {
        let mut buf = vec![0u8; 65536];
        let n = receiver.recv(&mut buf).unwrap();
        got.push(String::from_utf8(buf[..n].to_vec()).unwrap());
    }
    let pid = std::process::id();
    for (i, (msg, line)) in got.iter().zip(&lines).enumerate() {
        // <auth.info> = 4*8+6; version 1; timestamp; host; app; pid; msgid = seq; no SD.
        assert!(msg.starts_with("<38>1 "), "{msg}");
        let fields: Vec<&str> = msg.splitn(8, ' ').collect();
        assert_eq!(fields[3], SYSLOG_APP_NAME);
        assert_eq!(fields[4], pid.to_string());
        assert_eq!(fields[5], i.to_string());
        assert_eq!(fields[6], "-");
        assert_eq!(fields[7], line);
    }
}

#[test]
fn syslog_sink_sends_to_udp_on_loopback() {
    let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
    receiver
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let addr = receiver.local_addr().unwrap().to_string();
    let audit = Audit::with_clock(
        vec![Box::new(SyslogSink::new(&SyslogTarget::Udp(addr)))],
        false,
        ticking_clock(),
    );
    audit.record("boot", "start", json!({})).unwrap();
    let mut buf = vec![0u8; 65536];
    let n = receiver.recv(&mut buf).unwrap();
    let msg = String::from_utf8(buf[..n].to_vec()).unwrap();
    assert!(msg.starts_with("<38>1 "), "{msg}");
    assert!(
        msg.ends_with(&format!(" 0 - {}", audit.lines()[0])),
        "{msg}"
    );
}

#[test]
fn syslog_sink_frames_tcp_with_octet_counting() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let reader = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut all = Vec::new();
        let _ = conn.read_to_end(&mut all);
        all
    });
    let audit = Audit::with_clock(
        vec![Box::new(SyslogSink::new(&SyslogTarget::Tcp(addr)))],
        false,
        ticking_clock(),
    );
    audit.record("boot", "start", json!({})).unwrap();
    audit.record("shutdown", "exit", json!({})).unwrap();
    let lines = audit.lines();
    drop(audit); // closes the connection
    let stream = String::from_utf8(reader.join().unwrap()).unwrap();
    let mut rest = stream.as_str();
    for line in &lines {
        let (len, after) = rest.split_once(' ').unwrap();
        let len: usize = len.parse().unwrap();
        let (msg, tail) = after.split_at(len);
        assert!(
            msg.starts_with("<38>1 ") && msg.ends_with(line.as_str()),
            "{msg}"
        );
        rest = tail;
    }
    assert_eq!(rest, "");
}

#[test]
fn syslog_sink_to_an_unreachable_server_fails_without_stopping_the_boot() {
    // Bind then drop: nothing listens on this loopback port.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let audit = Audit::with_clock(
        vec![Box::new(SyslogSink::new(&SyslogTarget::Tcp(format!(
            "127.0.0.1:{port}"
        ))))],
        false,
        ticking_clock(),
    );
    audit.record("boot", "start", json!({})).unwrap();
    audit.record("boot", "next", json!({})).unwrap();
    audit.require_sinks().unwrap();
    let lines = audit.lines();
    assert_eq!(
        events(&lines),
        [
            ("boot", "start"),
            ("audit", "sink_failed"),
            ("boot", "next")
        ]
        .map(|(s, e)| (s.to_string(), e.to_string()))
    );
    assert_eq!(
        parse(&lines[1]).details["sink"],
        format!("syslog:tcp://127.0.0.1:{port}")
    );
}

// ---- verification ----

/// A six-record run: seq 0..5, the last one closing.
fn sample() -> Vec<String> {
    let (audit, _) = memory_audit(false);
    for (stage, event) in [
        ("boot", "start"),
        ("perimeter", "begin"),
        ("perimeter", "ok"),
        ("measure", "begin"),
        ("measure", "ok"),
        ("shutdown", "poweroff"),
    ] {
        audit.record(stage, event, json!({"n": stage})).unwrap();
    }
    audit.lines()
}

/// A record with a correctly computed hash, as a forger would write it.
fn forged(seq: u64, prev: Digest) -> String {
    encode(&Fields {
        seq,
        time: UNIX_EPOCH,
        stage: "perimeter",
        event: "ok",
        details: &json!({"forged": true}),
        insecure: false,
        prev,
    })
    .unwrap()
    .line
}

fn broken(bytes: &[u8]) -> (usize, Option<u64>, Option<u64>, Problem, String) {
    match verify(bytes) {
        Err(e @ VerifyError::Broken { .. }) => {
            let text = e.to_string();
            let VerifyError::Broken {
                line,
                seq,
                last_good,
                problem,
            } = e
            else {
                unreachable!()
            };
            (line, seq, last_good, problem, text)
        }
        other => panic!("expected a broken log, got {other:?}"),
    }
}

#[test]
fn an_untouched_log_verifies_complete() {
    let lines = sample();
    let report = verify(&joined(&lines)).unwrap();
    assert_eq!(report.records, 6);
    assert_eq!(report.last_seq, 5);
    assert_eq!(report.head, parse(&lines[5]).hash);
    assert!(report.complete && !report.insecure && report.earlier_runs.is_empty());
}

#[test]
fn a_changed_record_is_found_by_its_hash() {
    let mut lines = sample();
    lines[2] = lines[2].replace("\"n\":\"perimeter\"", "\"n\":\"perimetre\"");
    let (line, seq, last_good, problem, text) = broken(&joined(&lines));
    assert_eq!(
        (line, seq, last_good, problem),
        (3, Some(2), Some(1), Problem::Changed)
    );
    assert_eq!(
        text,
        "audit log broken at line 3 (seq 2): hash mismatch, the record was changed; last good \
         seq is 1"
    );
}

#[test]
fn a_changed_record_with_a_recomputed_hash_breaks_the_next_link() {
    let mut lines = sample();
    lines[2] = forged(2, parse(&lines[1]).hash);
    let (line, seq, last_good, problem, text) = broken(&joined(&lines));
    assert_eq!(
        (line, seq, last_good, problem),
        (4, Some(3), Some(1), Problem::PrevMismatch { after: 2 })
    );
    assert!(text.ends_with("last good seq is 1"), "{text}");
}

#[test]
fn a_removed_record_is_a_seq_gap() {
    let mut lines = sample();
    lines.remove(2);
    let (line, seq, last_good, problem, text) = broken(&joined(&lines));
    assert_eq!(
        (line, seq, last_good, problem),
        (3, Some(3), Some(1), Problem::Removed { after: 1, next: 3 })
    );
    assert_eq!(
        text,
        "audit log broken at line 3 (seq 3): seq jumps from 1 to 3, 1 record(s) were removed; \
         last good seq is 1"
    );
}

#[test]
fn removed_first_records_are_found() {
    let lines = sample()[2..].to_vec();
    let (line, seq, last_good, problem, _) = broken(&joined(&lines));
    assert_eq!(
        (line, seq, last_good, problem),
        (1, Some(2), None, Problem::StartsLate { seq: 2 })
    );
}

#[test]
fn reordered_records_are_found() {
    let mut lines = sample();
    lines.swap(2, 3);
    let (line, seq, last_good, problem, _) = broken(&joined(&lines));
    assert_eq!(
        (line, seq, last_good, problem),
        (
            3,
            Some(3),
            Some(1),
            Problem::Reordered { after: 1, next: 3 }
        )
    );
}

#[test]
fn an_inserted_copy_or_forgery_is_a_repeated_seq() {
    let mut copied = sample();
    copied.insert(3, copied[2].clone());
    let (line, seq, last_good, problem, _) = broken(&joined(&copied));
    assert_eq!(
        (line, seq, last_good, problem),
        (4, Some(2), Some(1), Problem::Inserted { seq: 2 })
    );

    let mut with_forgery = sample();
    let forgery = forged(2, parse(&with_forgery[1]).hash);
    with_forgery.insert(2, forgery);
    let (line, seq, _, problem, _) = broken(&joined(&with_forgery));
    assert_eq!(
        (line, seq, problem),
        (4, Some(2), Problem::Inserted { seq: 2 })
    );
}

#[test]
fn a_truncated_tail_is_found() {
    let bytes = joined(&sample());
    let cut = &bytes[..bytes.len() - 20];
    let (line, seq, last_good, problem, _) = broken(cut);
    assert_eq!(
        (line, seq, last_good, problem),
        (6, None, Some(4), Problem::Truncated)
    );

    // Only the final newline missing: the record is intact but the write was not finished.
    let (line, seq, last_good, problem, _) = broken(&bytes[..bytes.len() - 1]);
    assert_eq!(
        (line, seq, last_good, problem),
        (6, Some(5), Some(4), Problem::Truncated)
    );
}

#[test]
fn a_log_cut_at_a_line_boundary_verifies_but_is_incomplete() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.jsonl");
    std::fs::write(&path, joined(&sample()[..4])).unwrap();
    let mut out = Vec::new();
    let code = run_verify_command(&path, Default::default(), false, &mut out).unwrap();
    assert_eq!(code, 3, "intact but not attested");
    let head = parse(&sample()[3]).hash;
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.starts_with(&format!(
            "run 1: unattested (no broker exchange: no TEE evidence ties this run to hardware) \
             (4 records from line 1, seq 0..3, head {head}, incomplete: no closing record, it \
             may have been cut)\n"
        )),
        "{text}"
    );
    assert!(
        text.ends_with("verdict: 0 of 1 run(s) attested; exit 3\n"),
        "{text}"
    );
}

#[test]
fn verify_command_reports_insecure_and_complete_logs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.jsonl");
    let (audit, _) = memory_audit(true);
    audit.record("boot", "start", json!({})).unwrap();
    audit.record("launch", "exec", json!({})).unwrap();
    std::fs::write(&path, joined(&audit.lines())).unwrap();
    let mut out = Vec::new();
    let code = run_verify_command(&path, Default::default(), false, &mut out).unwrap();
    assert_eq!(code, 3);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        format!(
            "run 1: unattested (attestation = \"none\": the boot asked no TEE for evidence) (2 \
             records from line 1, seq 0..1, head {}, complete)\nverdict: 0 of 1 run(s) attested; \
             exit 3\n",
            audit.head()
        )
    );
    let missing = dir.path().join("missing.jsonl");
    let err = run_verify_command(&missing, Default::default(), false, &mut Vec::new()).unwrap_err();
    assert!(matches!(err, VerifyError::Read { .. }));
}

#[test]
fn empty_and_malformed_logs_are_rejected() {
    assert!(matches!(verify(b""), Err(VerifyError::Empty)));
    let mut lines = sample();
    lines.insert(2, "{\"seq\":2,\"hello\"}".into());
    let (line, seq, last_good, problem, _) = broken(&joined(&lines));
    assert_eq!((line, seq, last_good), (3, None, Some(1)));
    assert!(matches!(problem, Problem::Malformed(_)));
}

/// A serial console capture: CRLF line ends, the workload's prefixed output and kernel
/// messages between the records. The records verify; the other lines are counted, and
/// none of them can stand in for a record.
#[test]
fn a_console_capture_verifies_and_its_other_lines_are_skipped() {
    let lines = sample();
    let mut capture = String::new();
    for (i, line) in lines.iter().enumerate() {
        capture.push_str(line);
        capture.push_str("\r\n");
        if i == 2 {
            capture.push_str("workload: {\"seq\":3,\"stage\":\"forged\"}\r\n");
            capture.push_str("[   12.345678] random: crng init done\r\n\r\n");
        }
    }
    let report = verify(capture.as_bytes()).unwrap();
    assert_eq!(report.skipped_lines, 2);
    assert_eq!(report.records, lines.len() as u64);
    assert!(report.complete);
    // Removing a record from the capture is still found.
    let cut: String = capture
        .split_inclusive('\n')
        .enumerate()
        .filter(|(i, _)| *i != 1)
        .map(|(_, l)| l)
        .collect();
    let (_, _, _, problem, _) = broken(cut.as_bytes());
    assert!(matches!(problem, Problem::Removed { .. }), "{problem:?}");
}

#[test]
fn stripping_the_insecure_flag_is_found() {
    let (audit, _) = memory_audit(true);
    audit.record("boot", "start", json!({})).unwrap();
    audit.record("boot", "next", json!({})).unwrap();
    let mut lines = audit.lines();
    let r1 = parse(&lines[1]);
    lines[1] = encode(&Fields {
        seq: 1,
        time: UNIX_EPOCH,
        stage: "boot",
        event: "next",
        details: &json!({}),
        insecure: false,
        prev: r1.prev,
    })
    .unwrap()
    .line;
    let (_, _, _, problem, _) = broken(&joined(&lines));
    assert_eq!(problem, Problem::InsecureFlagChanged);
}

struct RejectEvent(&'static str);

impl RecordCheck for RejectEvent {
    fn name(&self) -> String {
        "checkpoint".into()
    }
    fn check(&mut self, record: &Record) -> Result<(), String> {
        if record.event == self.0 {
            Err("evidence does not bind the head".into())
        } else {
            Ok(())
        }
    }
}

#[test]
fn record_checks_plug_into_verification() {
    let bytes = joined(&sample());
    let mut check = RejectEvent("ok");
    let err = verify_with(&bytes, &mut [&mut check]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "audit log broken at line 3 (seq 2): checkpoint check failed: evidence does not bind \
         the head; last good seq is 1"
    );
    let mut never = RejectEvent("nothing");
    verify_with(&bytes, &mut [&mut never]).unwrap();
}

/// The worked example in docs/audit-log.md must be a valid log with the stated hashes.
#[test]
fn the_documented_example_verifies() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/audit-log.md")).unwrap();
    let start = doc.find("<!-- example-log -->").expect("example marker");
    let block = &doc[start..];
    let open = block.find("```text\n").unwrap() + "```text\n".len();
    let close = block[open..].find("```").unwrap();
    let log = &block[open..open + close];
    let report = verify(log.as_bytes()).unwrap();
    assert_eq!(report.records, 2);
    assert!(report.complete);
    // The body and hash shown for seq 0.
    let first = log.lines().next().unwrap();
    let start = doc.find("<!-- example-body -->").expect("body marker");
    let block = &doc[start..];
    let open = block.find("```text\n").unwrap() + "```text\n".len();
    let close = block[open..].find("```").unwrap();
    let body = block[open..open + close].trim_end();
    assert_eq!(
        format!(
            "{},\"hash\":\"{}\"}}",
            &body[..body.len() - 1],
            Digest::of(body.as_bytes())
        ),
        first
    );
    assert!(doc.contains(&Digest::of(body.as_bytes()).to_string()));
}

/// The example lines in docs/audit-log.md are exactly what this build writes.
#[test]
fn doc_example_lines_are_reproducible() {
    let audit = Audit::with_clock(
        Vec::new(),
        false,
        Box::new(|| UNIX_EPOCH + Duration::from_millis(1_735_787_045_678)),
    );
    audit
        .record(
            "boot",
            "start",
            json!({"version": "0.1.0", "policy": Digest::of(b"policy").to_string()}),
        )
        .unwrap();
    audit.record("shutdown", "poweroff", json!({})).unwrap();
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/audit-log.md")).unwrap();
    for line in audit.lines() {
        assert!(
            doc.contains(&line),
            "docs/audit-log.md lacks the line\n{line}"
        );
    }
}

#[test]
fn a_gap_is_a_removal_even_when_a_later_run_has_that_seq() {
    let mut lines = sample();
    lines.remove(2);
    lines.extend(sample());
    let (_, _, _, problem, _) = broken(&joined(&lines));
    assert_eq!(problem, Problem::Removed { after: 1, next: 3 });

    let mut two_runs = sample();
    two_runs.extend(sample());
    let report = verify(&joined(&two_runs)).unwrap();
    assert_eq!(report.earlier_runs.len(), 1);
    assert_eq!(report.earlier_runs[0].first_line, 1);
    assert_eq!(report.records, 6);
}

// ---- memory: the log keeps only what a sink still lacks, bounded ----

#[test]
fn lines_every_sink_has_are_not_kept() {
    let (audit, seen) = memory_audit(false);
    for i in 0..1000 {
        audit.record("launch", "tick", json!({ "i": i })).unwrap();
    }
    assert_eq!(seen.lock().unwrap().len(), 1000);
    assert_eq!(audit.backlog(), (0, 0));
}

#[test]
fn a_lagging_sinks_backlog_is_bounded_and_the_drop_is_recorded() {
    let (good, good_lines) = MemorySink::new();
    let (waiting, waiting_lines) = MemorySink::new();
    let waiting = waiting.named("late");
    let control = waiting.control();
    control.fail_always(ErrorKind::NotFound);
    let audit = Audit::with_clock(
        vec![Box::new(good), Box::new(waiting)],
        false,
        ticking_clock(),
    );
    let total = BACKLOG_MAX_LINES * 2 + 10;
    for i in 0..total {
        audit.record("launch", "tick", json!({ "i": i })).unwrap();
        let (lines, bytes) = audit.backlog();
        assert!(lines <= BACKLOG_MAX_LINES + 2, "{lines} lines held");
        assert!(bytes <= BACKLOG_MAX_BYTES, "{bytes} bytes held");
    }
    // The good sink has every line, in one unbroken chain.
    let all = good_lines.lock().unwrap().clone();
    let report = verify(&joined(&all)).unwrap();
    assert_eq!(report.records as usize, all.len());
    let dropped: Vec<Record> = all
        .iter()
        .map(|l| parse(l))
        .filter(|r| r.stage == AUDIT_STAGE && r.event == EVENT_SINK_DROPPED)
        .collect();
    // Never silent, and bounded: one record per half a bound of lines.
    assert!(!dropped.is_empty());
    assert!(dropped.len() <= 5, "{}", dropped.len());
    assert_eq!(dropped[0].details["sink"], "late");
    assert_eq!(dropped[0].details["first_seq"], 0);
    let lost: u64 = dropped
        .iter()
        .map(|r| r.details["dropped"].as_u64().unwrap())
        .sum();
    // Once it works, the late sink gets what was kept: everything but the dropped lines.
    control.clear();
    audit
        .record("launch", "tick", json!({ "i": "last" }))
        .unwrap();
    let late = waiting_lines.lock().unwrap().len() as u64;
    let everything = good_lines.lock().unwrap().len() as u64;
    assert_eq!(late + lost, everything);
    assert_eq!(audit.backlog(), (0, 0));
}
