//! The probe workload: started by cvm-warden inside the guest, it reports what a workload
//! sees, one `PROBE <ok|FAIL> <check> <detail>` line each on standard output (relayed to the
//! serial console as `workload: …`), then serves the allowed port until the host says `done`.
//!
//! `vm-probe [--uid N] [--gid N] [--lockdown] [--volume DIR [--fill]] [--secret FILE] [--exit CODE] [--listen PORT]…`
//! `--lockdown`: check the hardening sysctls and the lockdown LSM.
//! `--exit CODE` ends at once with that code (the crashing-workload scenario).
//!
//! `vm-probe --observe-systemd`: the systemd-shape observer, run as root by a unit ordered
//! after `cvm-warden.service` (`tests/vm/src/systemd.rs`): it asks the live systemd and
//! nftables what such a unit sees, one `OBSERVE <ok|FAIL> <check> <detail>` line each, then
//! `OBSERVE-DONE`.
//!
//! The probe's ports answer `kbd` with the keyboard interrupt count (`KBD <n>`: the host's
//! Ctrl-Alt-Del presses reached the guest) and `done` with `bye` (the workload ends).

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;
use std::time::{Duration, Instant};

/// The hardening sysctls `[lockdown]` sets, with their values.
const SYSCTLS: &[(&str, &str)] = &[
    ("kernel/kexec_load_disabled", "1"),
    ("kernel/dmesg_restrict", "1"),
    ("kernel/kptr_restrict", "2"),
    ("kernel/yama/ptrace_scope", "3"),
    ("kernel/unprivileged_bpf_disabled", "1"),
    ("kernel/sysrq", "0"),
    ("kernel/perf_event_paranoid", "3"),
    ("kernel/modules_disabled", "1"),
];

/// Outbound destinations the allowlist must block (the sink; the broker after launch unless
/// the guest re-attests).
const BLOCKED_OUT: &[&str] = &["10.0.2.101:7777", BROKER];
/// The key broker as the guest reaches it.
const BROKER: &str = "10.0.2.100:5555";

fn report(ok: bool, check: &str, detail: &str) {
    let verdict = if ok { "ok" } else { "FAIL" };
    println!("PROBE {verdict} {check} {detail}");
    let _ = std::io::stdout().flush();
}

fn status_field(name: &str) -> String {
    fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{name}:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--observe-systemd") {
        observe_systemd();
        return;
    }
    let value = |flag: &str| -> Option<String> {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1).cloned())
    };
    if let Some(code) = value("--exit") {
        println!("PROBE exiting with {code} as asked");
        std::process::exit(code.parse().unwrap_or(1));
    }

    let uptime = fs::read_to_string("/proc/uptime").unwrap_or_default();
    println!(
        "PROBE start uptime {}",
        uptime.split_whitespace().next().unwrap_or("?")
    );
    let pid1 = fs::read_to_string("/proc/1/status").unwrap_or_default();
    for field in ["VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"] {
        if let Some(line) = pid1.lines().find(|l| l.starts_with(field)) {
            println!(
                "PROBE pid1 {}",
                line.split_whitespace().collect::<Vec<_>>().join(" ")
            );
        }
    }
    let uid = status_field("Uid");
    let gid = status_field("Gid");
    if let Some(want) = value("--uid") {
        report(
            uid.split_whitespace().all(|u| u == want),
            "uid",
            &format!("Uid: {uid}"),
        );
    }
    if let Some(want) = value("--gid") {
        report(
            gid.split_whitespace().all(|g| g == want),
            "gid",
            &format!("Gid: {gid}"),
        );
    }
    let cap_eff = status_field("CapEff");
    report(
        cap_eff.chars().all(|c| c == '0'),
        "capeff",
        &format!("CapEff: {cap_eff}"),
    );
    let nnp = status_field("NoNewPrivs");
    report(nnp == "1", "nonewprivs", &format!("NoNewPrivs: {nnp}"));

    let lockdown_expected = args.iter().any(|a| a == "--lockdown");
    for (key, want) in SYSCTLS.iter().filter(|_| lockdown_expected) {
        let got = fs::read_to_string(format!("/proc/sys/{key}")).unwrap_or_default();
        report(
            got.trim() == *want,
            "sysctl",
            &format!("{}={}", key.replace('/', "."), got.trim()),
        );
    }
    if lockdown_expected {
        let lockdown = fs::read_to_string("/sys/kernel/security/lockdown")
            .map(|t| t.trim().to_string())
            .unwrap_or_else(|e| format!("unreadable ({e})"));
        report(
            lockdown.contains("[confidentiality]"),
            "lockdown",
            &lockdown,
        );
    }

    let mut others = Vec::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let comm = fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            let comm = comm.trim();
            if ["getty", "agetty", "sshd", "login", "sh", "bash", "busybox"].contains(&comm) {
                others.push(comm.to_string());
            }
        }
    }
    report(
        others.is_empty(),
        "no-login",
        &format!("login/shell processes: {others:?}"),
    );
    for dev in ["/dev/fd", "/dev/stdin", "/dev/stdout", "/dev/stderr"] {
        report(fs::symlink_metadata(dev).is_ok(), "dev-link", dev);
    }

    let pcr15 = fs::read_to_string("/sys/class/tpm/tpm0/pcr-sha256/15")
        .map(|t| t.trim().to_lowercase())
        .unwrap_or_else(|e| format!("unreadable ({e})"));
    println!("PROBE pcr15 {pcr15}");

    if let Some(secret) = value("--secret") {
        match fs::metadata(&secret) {
            Ok(meta) => {
                let mode = meta.permissions().mode() & 0o7777;
                report(
                    mode == 0o400
                        && meta.uid().to_string()
                            == uid.split_whitespace().next().unwrap_or_default(),
                    "secret",
                    &format!(
                        "{secret} mode {mode:o} owner {} size {}",
                        meta.uid(),
                        meta.len()
                    ),
                );
            }
            Err(e) => report(false, "secret", &format!("{secret}: {e}")),
        }
    }

    if let Some(dir) = value("--volume") {
        let marker = format!("{dir}/probe-marker");
        let previous = fs::read_to_string(&marker).unwrap_or_else(|_| "none".to_string());
        println!("PROBE volume-previous {}", previous.trim());
        let boot = value("--boot").unwrap_or_else(|| "1".to_string());
        match fs::write(&marker, format!("written-in-boot-{boot}\n")) {
            Ok(()) => report(true, "volume-write", &marker),
            Err(e) => report(false, "volume-write", &format!("{marker}: {e}")),
        }
    }

    if let (Some(dir), true) = (value("--volume"), args.iter().any(|a| a == "--fill")) {
        // The audit-disk-full scenario: fill the volume, then wait to be stopped.
        let path = format!("{dir}/fill");
        let mut written = 0u64;
        if let Ok(mut file) = fs::File::create(&path) {
            let block = vec![0x5au8; 1 << 20];
            while file.write_all(&block).is_ok() {
                written += 1;
            }
            let _ = file.sync_all();
        }
        println!("PROBE filled {dir} with {written} MiB; waiting");
        let _ = std::io::stdout().flush();
        std::thread::sleep(Duration::from_secs(300));
        return;
    }

    for dest in args
        .iter()
        .enumerate()
        .filter(|(_, a)| *a == "--allowed-out")
        .filter_map(|(i, _)| args.get(i + 1))
    {
        let answer = dest
            .parse::<SocketAddr>()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
            .and_then(|addr| TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
            .and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                let mut line = String::new();
                BufReader::new(&mut s).read_line(&mut line)?;
                Ok(line)
            });
        match answer {
            Ok(line) if !line.is_empty() => report(
                true,
                "outbound-allowed",
                &format!("{dest} answered {:?}", line.trim()),
            ),
            Ok(_) => report(
                false,
                "outbound-allowed",
                &format!("{dest}: closed without an answer"),
            ),
            Err(e) => report(false, "outbound-allowed", &format!("{dest}: {e}")),
        }
    }

    // `--broker-reachable`: the policy re-attests while the workload runs, so the allowlist
    // keeps the broker open (for every process: the ruleset does not tell PID 1 apart).
    let broker_reachable = args.iter().any(|a| a == "--broker-reachable");
    if broker_reachable {
        match BROKER
            .parse::<SocketAddr>()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
            .and_then(|addr| TcpStream::connect_timeout(&addr, Duration::from_secs(3)))
        {
            Ok(_) => report(true, "broker-reachable", BROKER),
            Err(e) => report(false, "broker-reachable", &format!("{BROKER}: {e}")),
        }
    }
    for dest in BLOCKED_OUT {
        if broker_reachable && *dest == BROKER {
            continue;
        }
        let addr: SocketAddr = match dest.parse() {
            Ok(a) => a,
            Err(_) => continue,
        };
        // Any established connection is a failure, whatever the peer sends (a broker speaks
        // only when spoken to); only no connection at all counts as blocked.
        match TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
            Ok(_) => report(false, "outbound-blocked", &format!("{dest}: connected")),
            Err(e) => report(true, "outbound-blocked", &format!("{dest}: {e}")),
        }
    }

    let ports: Vec<u16> = args
        .iter()
        .enumerate()
        .filter(|(_, a)| *a == "--listen")
        .filter_map(|(i, _)| args.get(i + 1).and_then(|p| p.parse().ok()))
        .collect();
    let mut listeners = Vec::new();
    for port in &ports {
        match TcpListener::bind(("0.0.0.0", *port)) {
            Ok(l) => listeners.push((*port, l)),
            Err(e) => report(false, "listen", &format!("{port}: {e}")),
        }
    }
    println!("PROBE-READY");
    let _ = std::io::stdout().flush();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    for (port, listener) in listeners {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut stream = stream;
                let _ = writeln!(stream, "VM-PROBE-BANNER port {port}");
                let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
                let mut reader = match stream.try_clone() {
                    Ok(s) => BufReader::new(s),
                    Err(_) => continue,
                };
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        break;
                    }
                    match line.trim() {
                        "kbd" => {
                            let _ = writeln!(stream, "KBD {}", keyboard_interrupts());
                        }
                        "done" => {
                            let _ = writeln!(stream, "bye");
                            let _ = tx.send(());
                            return;
                        }
                        _ => break,
                    }
                }
            }
        });
    }
    drop(tx);
    if !ports.is_empty() {
        let _ = rx.recv_timeout(Duration::from_secs(120));
    }
    println!("PROBE-DONE");
}

/// The i8042 keyboard's interrupt count (IRQ 1 in `/proc/interrupts`), 0 when absent.
fn keyboard_interrupts() -> u64 {
    fs::read_to_string("/proc/interrupts")
        .unwrap_or_default()
        .lines()
        .find(|l| l.trim_start().starts_with("1:") && l.contains("i8042"))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

/// What a command printed (stdout and stderr, one line) and whether it succeeded.
fn run(program: &str, args: &[&str]) -> (bool, String) {
    match Command::new(program).args(args).output() {
        Ok(out) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            (
                out.status.success(),
                text.split_whitespace().collect::<Vec<_>>().join(" "),
            )
        }
        Err(e) => (false, format!("cannot run {program}: {e}")),
    }
}

/// `systemctl show -p NAME --value UNIT`.
fn show(unit: &str, property: &str) -> String {
    let (_, text) = run("systemctl", &["show", "-p", property, "--value", unit]);
    text
}

fn observed(ok: bool, check: &str, detail: &str) {
    let verdict = if ok { "ok" } else { "FAIL" };
    println!("OBSERVE {verdict} {check} {detail}");
    let _ = std::io::stdout().flush();
}

/// Units cvm-warden masks, as the instances systemd can be asked about.
const MASKED: &[&str] = &[
    "serial-getty@ttyS0.service",
    "getty@tty1.service",
    "autovt@tty1.service",
    "console-getty.service",
    "debug-shell.service",
    "ssh.service",
    "sshd.service",
    "ssh.socket",
    "rescue.service",
    "emergency.service",
    "ctrl-alt-del.target",
];

/// systemctl requests a locked-down VM must refuse: a login on the consoles, SSH, a debug
/// shell, the rescue and emergency shells, a reboot through Ctrl-Alt-Del.
const REFUSED: &[&[&str]] = &[
    &["start", "serial-getty@ttyS0.service"],
    &["start", "getty@tty1.service"],
    &["start", "ssh.service"],
    &["start", "ssh.socket"],
    &["start", "debug-shell.service"],
    &["rescue"],
    &["emergency"],
    &["isolate", "rescue.target"],
    &["isolate", "emergency.target"],
    &["start", "ctrl-alt-del.target"],
];

fn observe_systemd() {
    let uptime = fs::read_to_string("/proc/uptime").unwrap_or_default();
    println!(
        "OBSERVE start uptime {}",
        uptime.split_whitespace().next().unwrap_or("?")
    );
    // A unit ordered after cvm-warden.service (Type=notify) starts behind the perimeter.
    let (ok, table) = run("nft", &["list", "table", "inet", "cvm_warden"]);
    observed(
        ok && table.contains("hook input") && table.contains("policy drop"),
        "perimeter-at-start",
        &format!(
            "nft list table inet cvm_warden: {}",
            table.chars().take(160).collect::<String>()
        ),
    );
    let ready = show("cvm-warden.service", "ActiveEnterTimestampMonotonic");
    let started = show("warden-observer.service", "ExecMainStartTimestampMonotonic");
    let (r, s) = (
        ready.parse::<u64>().unwrap_or(0),
        started.parse::<u64>().unwrap_or(0),
    );
    observed(
        r > 0 && s >= r,
        "started-after-ready",
        &format!("cvm-warden.service active (READY=1) at {r} us, this unit started at {s} us"),
    );
    let state = show("cvm-warden.service", "ActiveState");
    observed(
        state == "active",
        "warden-active",
        &format!("cvm-warden.service {state}"),
    );
    for unit in MASKED {
        let load = show(unit, "LoadState");
        let active = show(unit, "ActiveState");
        observed(
            load == "masked" && active == "inactive",
            "masked",
            &format!("{unit} LoadState={load} ActiveState={active}"),
        );
    }
    for args in REFUSED {
        let (ok, text) = run("systemctl", args);
        observed(
            !ok,
            "refused",
            &format!("systemctl {}: {text}", args.join(" ")),
        );
    }
    // The manager's own property (no unit): 7 presses in 2 s must do nothing.
    let (_, burst) = run(
        "systemctl",
        &["show", "-p", "CtrlAltDelBurstAction", "--value"],
    );
    observed(
        burst == "none",
        "ctrl-alt-del-burst",
        &format!("CtrlAltDelBurstAction={burst}"),
    );
    let (_, running) = run(
        "systemctl",
        &[
            "list-units",
            "--plain",
            "--no-legend",
            "--state=active,activating",
            "--full",
        ],
    );
    let logins: Vec<&str> = running
        .split_whitespace()
        .filter(|w| w.ends_with(".service") || w.ends_with(".socket"))
        .filter(|w| w.contains("getty") || w.starts_with("ssh"))
        .collect();
    observed(
        logins.is_empty(),
        "no-login-units",
        &format!("active: {logins:?}"),
    );
    let mut processes = Vec::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let comm = fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            if ["agetty", "getty", "login", "sshd", "sulogin"].contains(&comm.trim()) {
                processes.push(comm.trim().to_string());
            }
        }
    }
    observed(
        processes.is_empty(),
        "no-login-processes",
        &format!("{processes:?}"),
    );
    // The workload is exec'd in cvm-warden.service once attestation succeeded: the unit's
    // main process becomes the probe.
    let start = Instant::now();
    let (found, last) = loop {
        let pid = show("cvm-warden.service", "MainPID");
        let last = fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|c| format!("MainPID {pid} is {}", c.trim()))
            .unwrap_or_else(|e| format!("MainPID {pid}: {e}"));
        if last.ends_with(" is vm-probe") {
            break (true, last);
        }
        if start.elapsed() > Duration::from_secs(120) {
            break (false, last);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    observed(found, "workload-in-unit", &last);
    println!("OBSERVE-DONE");
    let _ = std::io::stdout().flush();
}
