//! The whole boot through the real binary, as root, as PID 1 of fresh namespaces.
//!
//! Each test writes a bundle, a policy and an audit log path under `/var/tmp` (PID 1 mounts a
//! fresh tmpfs on `/run` and `/tmp` inside the namespace, so nothing there would be seen from
//! outside), then runs `unshare --pid --fork --mount --mount-proc --net --uts --kill-child --
//! cvm-warden init --policy P` and checks the exit status, the workload's output and the audit
//! log from outside. The policy copies the bundle into `/run/cvm-warden/bundle` (a tmpfs of
//! the namespace) and runs a shell script from it as `nobody`.
//!
//! Every run is bounded (`RUN_LIMIT`); on a timeout `unshare` is killed and `--kill-child`
//! takes the namespace down with it. Without root these tests fail (they do not skip).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

#[allow(dead_code)] // the parts only tests/launch_ns.rs uses
mod common;

use common::{Outcome, Run};

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_cvm-warden");
/// Upper bound of one namespace run.
const RUN_LIMIT: Duration = Duration::from_secs(60);
/// Where the policy copies the bundle inside the namespace.
const COPY_TO: &str = "/run/cvm-warden/bundle";
/// Printed by every workload script first: proves the workload ran.
const MARKER: &str = "WORKLOAD-RAN";

fn require_root() {
    common::require_root(
        "boot_ns",
        "it runs cvm-warden as PID 1 in new PID, mount, network and UTS namespaces with unshare",
    );
}

/// A bundle, its policy and the audit log, in a world-readable temporary directory.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    /// A bundle whose `run.sh` prints the marker and then runs `script`.
    fn new(script: &str) -> Setup {
        require_root();
        let dir = tempfile::Builder::new()
            .prefix("cvm-warden-boot-ns.")
            .tempdir_in("/var/tmp")
            .unwrap();
        chmod(dir.path(), 0o755);
        let setup = Setup { dir };
        std::fs::create_dir(setup.bundle()).unwrap();
        chmod(&setup.bundle(), 0o755);
        std::fs::write(
            setup.bundle().join("run.sh"),
            format!("#!/bin/sh\necho {MARKER}\n{script}\n"),
        )
        .unwrap();
        chmod(&setup.bundle().join("run.sh"), 0o755);
        std::fs::write(setup.bundle().join("data.txt"), "model weights v1\n").unwrap();
        chmod(&setup.bundle().join("data.txt"), 0o644);
        setup
    }

    fn bundle(&self) -> PathBuf {
        self.dir.path().join("bundle")
    }

    fn audit_log(&self) -> PathBuf {
        self.dir.path().join("audit.jsonl")
    }

    fn policy_path(&self) -> PathBuf {
        self.dir.path().join("policy.toml")
    }

    /// The policy with `exec`, and `workload_extra` appended to `[workload]`.
    fn write_policy(&self, exec: &str, workload_extra: &str) {
        let policy = format!(
            r#"attestation = "none"

[workload]
bundle = {bundle:?}
source = "copy"
copy_to = {COPY_TO:?}
exec = [{exec:?}]
user = "nobody"
{workload_extra}

[workload.env]
PATH = "/usr/bin:/bin"

[audit]
file = {audit:?}
file_required = true
"#,
            bundle = self.bundle().display().to_string(),
            audit = self.audit_log().display().to_string(),
        );
        std::fs::write(self.policy_path(), policy).unwrap();
    }

    /// The usual policy: run the bundle's `run.sh`.
    fn write_default_policy(&self, workload_extra: &str) {
        let exec = self.bundle().join("run.sh").display().to_string();
        self.write_policy(&exec, workload_extra);
    }

    /// Every record of the audit log (empty when there is none).
    fn records(&self) -> Vec<Value> {
        std::fs::read_to_string(self.audit_log())
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    fn start(&self) -> Run {
        start_init(&self.policy_path())
    }
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn event_of(record: &Value) -> (&str, &str) {
    (
        record["stage"].as_str().unwrap(),
        record["event"].as_str().unwrap(),
    )
}

fn has_event(records: &[Value], stage: &str, event: &str) -> bool {
    records.iter().any(|r| event_of(r) == (stage, event))
}

impl Outcome {
    fn ran(&self) -> bool {
        // PID 1 relays the workload's stdout behind a prefix.
        self.lines
            .iter()
            .any(|l| *l == format!("workload: {MARKER}"))
    }
}

fn start_init(policy: &Path) -> Run {
    let mut command = common::unshare(&["--net", "--uts"]);
    command.arg(BIN).args(["init", "--policy"]).arg(policy);
    Run::spawn(command, RUN_LIMIT)
}

#[test]
fn workload_status_becomes_the_exit_status_and_the_audit_log_verifies() {
    let setup = Setup::new("exit 7");
    setup.write_default_policy("");
    let outcome = setup.start().finish();
    assert_eq!(outcome.code, Some(7), "{outcome:#?}");
    assert!(outcome.ran(), "{outcome:#?}");

    let verify = Command::new(BIN)
        .args(["audit", "verify"])
        .arg(setup.audit_log())
        .output()
        .unwrap();
    // Intact, but `attestation = "none"` attests nothing: exit 3, never 0.
    assert_eq!(
        verify.status.code(),
        Some(3),
        "audit verify: {}\n{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(
        String::from_utf8_lossy(&verify.stdout)
            .starts_with("run 1: unattested (attestation = \"none\""),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );

    let records = setup.records();
    let last = records.last().unwrap();
    assert_eq!(event_of(last), ("shutdown", "exit"), "{records:#?}");
    assert_eq!(last["details"]["code"], 7);
    assert!(
        records.iter().all(|r| r["insecure"] == true),
        "{records:#?}"
    );
    for stage in [
        "perimeter",
        "measure",
        "attest",
        "unlock",
        "allowlist",
        "launch",
    ] {
        assert!(has_event(&records, stage, "ok"), "{stage}: {records:#?}");
    }
    assert!(has_event(&records, "launch", "started"));
    let done = records
        .iter()
        .find(|r| event_of(r) == ("launch", "workload_done"))
        .unwrap();
    assert_eq!(done["details"]["code"], 7);
}

/// The kernel passes every bare word of its command line (`single`, words after `--`) to init
/// as arguments: PID 1 ignores them, records them, and boots; the workload finds the
/// `/dev/stdin` and `/dev/fd` links that the early mounts make when missing.
#[test]
fn kernel_arguments_are_ignored_and_recorded_and_the_dev_links_exist() {
    let setup = Setup::new("test -L /dev/stdin && test -e /dev/fd/1 && echo DEV-LINKS-OK\nexit 0");
    setup.write_default_policy("");
    // A /dev as bare as a fresh devtmpfs without udev: only the null device. The shell
    // `exec`s cvm-warden, which so stays PID 1 of the namespace.
    let mut command = common::unshare(&["--net", "--uts"]);
    command.args([
        "sh",
        "-c",
        "mount -t tmpfs -o mode=0755 none /dev && mknod -m 0666 /dev/null c 1 3 && exec \"$@\"",
        "sh",
        BIN,
        "init",
        "--policy",
    ]);
    command
        .arg(setup.policy_path())
        .args(["single", "--", "--bogus", "--policy", "/evil.toml"]);
    let outcome = Run::spawn(command, RUN_LIMIT).finish();
    assert_eq!(outcome.code, Some(0), "{outcome:#?}");
    assert!(outcome.ran(), "{outcome:#?}");
    assert!(
        outcome.lines.iter().any(|l| l == "workload: DEV-LINKS-OK"),
        "{outcome:#?}"
    );
    let records = setup.records();
    let ignored = records
        .iter()
        .find(|r| event_of(r) == ("boot", "kernel_args_ignored"))
        .unwrap_or_else(|| panic!("{records:#?}"));
    assert_eq!(
        ignored["details"]["args"],
        serde_json::json!(["single", "--", "--bogus", "--policy", "/evil.toml"])
    );
    let early = records
        .iter()
        .find(|r| event_of(r) == ("boot", "early_mounts"))
        .unwrap_or_else(|| panic!("{records:#?}"));
    assert_eq!(
        early["details"]["linked"],
        serde_json::json!(["/dev/fd", "/dev/stdin", "/dev/stdout", "/dev/stderr"]),
        "{early:#?}"
    );
    // The namespace got its own /run and /tmp.
    assert!(
        early["details"]["mounted"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("/run")),
        "{early:#?}"
    );
    assert_eq!(event_of(records.last().unwrap()), ("shutdown", "exit"));
}

#[test]
fn workload_runs_as_nobody_without_capabilities_and_with_no_new_privs() {
    // Builtins only: the shell reads its own status (see tests/launch_ns.rs).
    let setup = Setup::new(
        r#"while IFS= read -r line; do printf '%s\n' "$line"; done < /proc/$$/status
exit 0"#,
    );
    setup.write_default_policy("");
    let mut outcome = setup.start().finish();
    assert_eq!(outcome.code, Some(0), "{outcome:#?}");
    // What the workload printed, relayed by PID 1 behind its prefix.
    outcome.lines = outcome
        .lines
        .iter()
        .filter_map(|l| l.strip_prefix("workload: "))
        .map(str::to_owned)
        .collect();
    assert_eq!(outcome.status_field("Uid"), "65534\t65534\t65534\t65534");
    assert_eq!(outcome.status_field("Gid"), "65534\t65534\t65534\t65534");
    assert_eq!(outcome.status_field("Groups"), "");
    assert_eq!(outcome.status_field("CapEff"), "0000000000000000");
    assert_eq!(outcome.status_field("CapPrm"), "0000000000000000");
    assert_eq!(outcome.status_field("NoNewPrivs"), "1");
}

#[test]
fn a_tampered_bundle_stops_the_boot_before_launch() {
    let setup = Setup::new("exit 0");
    let manifest = setup.dir.path().join("manifest.json");
    let measured = Command::new(BIN)
        .arg("measure")
        .arg(setup.bundle())
        .arg("--json")
        .arg("--manifest")
        .arg(&manifest)
        .output()
        .unwrap();
    assert!(measured.status.success(), "{measured:?}");
    let json: Value = serde_json::from_slice(&measured.stdout).unwrap();
    let digest = json["bundle_digest"].as_str().unwrap().to_string();
    assert!(digest.starts_with("sha256:"), "{json}");
    chmod(&manifest, 0o644);
    setup.write_default_policy(&format!(
        "digest = {digest:?}\nmanifest = {:?}",
        manifest.display().to_string()
    ));
    std::fs::write(setup.bundle().join("data.txt"), "model weights v2\n").unwrap();

    let outcome = setup.start().finish();
    assert_ne!(outcome.code, Some(0), "{outcome:#?}");
    assert!(!outcome.ran(), "the workload ran: {outcome:#?}");

    let records = setup.records();
    let failed = records
        .iter()
        .find(|r| event_of(r) == ("measure", "failed"))
        .unwrap_or_else(|| panic!("no measure/failed: {records:#?}"));
    let error = failed["details"]["error"].as_str().unwrap();
    assert!(error.contains("changed data.txt"), "{error}");
    assert!(!error.contains("run.sh"), "{error}");
    assert!(!has_event(&records, "launch", "started"), "{records:#?}");
    assert!(
        !records.iter().any(|r| r["stage"] == "launch"),
        "{records:#?}"
    );
    assert!(has_event(&records, "boot", "failed"));
    assert_eq!(
        event_of(records.last().unwrap()),
        ("shutdown", "exit"),
        "{records:#?}"
    );
}

#[test]
fn an_invalid_policy_exits_2_and_nothing_runs() {
    let setup = Setup::new("exit 0");
    setup.write_policy("run.sh", "");
    let outcome = setup.start().finish();
    assert_eq!(outcome.code, Some(2), "{outcome:#?}");
    assert!(!outcome.ran(), "{outcome:#?}");
    assert!(outcome.stderr.contains("workload.exec"), "{outcome:#?}");
    // The policy could not be read, so its audit file was never opened.
    assert!(setup.records().is_empty());
}

#[test]
fn pid1_reaps_an_orphan_and_forwards_sigterm_to_the_workload() {
    // The subshell exits at once, so its `sh` child is re-parented to PID 1, which must reap
    // it; then the workload waits for SIGTERM and turns it into status 42.
    let setup = Setup::new(
        r#"( sh -c 'sleep 0.2; exit 3' & )
trap 'exit 42' TERM
echo READY
while :; do sleep 0.1; done"#,
    );
    setup.write_default_policy("");
    let mut run = setup.start();
    run.wait_until("READY", |run| run.has_line("workload: READY"));
    // The orphan ends after 0.2 s; it is counted, and reported before `exited`.
    std::thread::sleep(Duration::from_millis(600));
    nix::sys::signal::kill(run.pid1(), nix::sys::signal::Signal::SIGTERM).unwrap();
    let outcome = run.finish();
    assert_eq!(outcome.code, Some(42), "{outcome:#?}");

    let records = setup.records();
    let reaped = records
        .iter()
        .position(|r| event_of(r) == ("launch", "orphans_reaped"))
        .unwrap();
    assert_eq!(records[reaped]["details"]["count"], 1, "{records:#?}");
    assert_eq!(
        records[reaped]["details"]["exited_nonzero"], 1,
        "{records:#?}"
    );
    assert_eq!(event_of(&records[reaped + 1]), ("launch", "exited"));
    assert!(
        records
            .iter()
            .any(|r| event_of(r) == ("launch", "exited") && r["details"]["code"] == 42),
        "{records:#?}"
    );
    assert!(
        records
            .iter()
            .any(|r| event_of(r) == ("launch", "signal_forwarded")
                && r["details"]["signal"] == "SIGTERM"),
        "{records:#?}"
    );
    let last = records.last().unwrap();
    assert_eq!(event_of(last), ("shutdown", "exit"));
    assert_eq!(last["details"]["code"], 42);
}

/// `init` with a `[lockdown]` policy: refused in a sandbox unless `--sandbox` says so (the
/// kernel settings are host-wide); with `--sandbox` the host-wide settings are skipped and
/// recorded, and the perimeter and allowlist rulesets are applied for real in the
/// namespace's own network stack.
#[test]
fn lockdown_in_a_sandbox_needs_the_flag_and_skips_host_settings() {
    let setup = Setup::new("exit 0");
    setup.write_default_policy("");
    let mut policy = std::fs::read_to_string(setup.policy_path()).unwrap();
    policy.push_str(
        "\n[lockdown]\nconsoles = \"off\"\nkernel_lockdown = \"confidentiality\"\n\n[network]\ninbound = [{ port = 8002 }]\n",
    );
    std::fs::write(setup.policy_path(), &policy).unwrap();

    let outcome = setup.start().finish();
    assert_eq!(outcome.code, Some(2), "{outcome:#?}");
    assert!(!outcome.ran());
    assert!(
        outcome.stderr.contains("pass --sandbox to skip them"),
        "{}",
        outcome.stderr
    );

    let mut command = common::unshare(&["--net", "--uts"]);
    command
        .arg(BIN)
        .args(["init", "--sandbox", "--policy"])
        .arg(setup.policy_path());
    let outcome = Run::spawn(command, RUN_LIMIT).finish();
    assert_eq!(outcome.code, Some(0), "{outcome:#?}");
    assert!(outcome.ran());
    let records = setup.records();
    let perimeter = records
        .iter()
        .find(|r| event_of(r) == ("perimeter", "ok"))
        .unwrap();
    assert_eq!(perimeter["details"]["firewall"]["phase"], "perimeter");
    assert!(perimeter["details"]["sandbox_skipped"]["settings"]
        .to_string()
        .contains("sysctls"));
    let allowlist = records
        .iter()
        .find(|r| event_of(r) == ("allowlist", "ok"))
        .unwrap();
    assert_eq!(allowlist["details"]["firewall"]["phase"], "allowlist");
    assert!(allowlist["details"].get("modules_disabled").is_none());
    let start = records
        .iter()
        .find(|r| event_of(r) == ("boot", "start"))
        .unwrap();
    assert_eq!(start["details"]["sandbox"], true);
    // nft ran from its fixed path, recorded once, inside the perimeter stage, before its
    // first run (the boot's runner is audited).
    let events: Vec<(&str, &str)> = records.iter().map(event_of).collect();
    let resolved: Vec<usize> = (0..events.len())
        .filter(|i| events[*i] == ("tool", "resolved"))
        .collect();
    assert_eq!(resolved.len(), 1, "{events:?}");
    let begin = events.iter().position(|e| *e == ("perimeter", "begin"));
    let ok = events.iter().position(|e| *e == ("perimeter", "ok"));
    assert!(
        begin < Some(resolved[0]) && Some(resolved[0]) < ok,
        "{events:?}"
    );
    let tool = &records[resolved[0]]["details"]["tool"];
    assert_eq!(tool["name"], "nft");
    assert!(
        cvm_warden::tool::Tool::Nft
            .candidates()
            .contains(&tool["path"].as_str().unwrap()),
        "{tool}"
    );
}

/// VmRSS of a process in KiB.
fn rss_kib(pid: nix::unistd::Pid) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {status}"))
}

#[test]
fn ten_thousand_orphans_make_a_bounded_log_and_pid1_memory_stays_flat() {
    // Each `( true & )` leaves an orphan that PID 1 reaps: 1,000 first, then 9,000 more.
    let setup = Setup::new(
        r#"orphans() { i=0; while [ $i -lt $1 ]; do ( true & ); i=$((i+1)); done; }
orphans 1000
sleep 0.5
echo PHASE1
sleep 1
orphans 9000
sleep 0.5
echo PHASE2
sleep 1
exit 0"#,
    );
    setup.write_default_policy("");
    let mut run = setup.start();
    run.wait_until("PHASE1", |run| run.has_line("workload: PHASE1"));
    let pid1 = run.pid1();
    let before = rss_kib(pid1);
    run.wait_until("PHASE2", |run| run.has_line("workload: PHASE2"));
    let after = rss_kib(pid1);
    let outcome = run.finish();
    assert_eq!(outcome.code, Some(0), "{outcome:#?}");
    let records = setup.records();
    let reports: Vec<&Value> = records
        .iter()
        .filter(|r| event_of(r) == ("launch", "orphans_reaped"))
        .collect();
    let counted: u64 = reports
        .iter()
        .map(|r| r["details"]["count"].as_u64().unwrap())
        .sum();
    assert!(counted >= 10_000, "{counted} orphans counted");
    eprintln!("PID 1 RSS {before} KiB after 1,000 orphans, {after} KiB after 10,000");
    // One record per minute at most, and the one before `exited`: no record per orphan.
    assert!(
        reports.len() <= 3,
        "{} orphans_reaped records",
        reports.len()
    );
    assert!(records.len() < 40, "{} records", records.len());
    // PID 1 keeps no line per orphan: its memory does not grow with them.
    assert!(
        after <= before + 1536,
        "PID 1's RSS grew from {before} KiB to {after} KiB over 9,000 orphans"
    );
    let verify = Command::new(BIN)
        .args(["audit", "verify"])
        .arg(setup.audit_log())
        .output()
        .unwrap();
    // Intact and complete; exit 3 because attestation = "none" attests nothing.
    assert_eq!(verify.status.code(), Some(3), "{verify:?}");
    assert!(
        String::from_utf8_lossy(&verify.stdout).contains("complete"),
        "{verify:?}"
    );
}

#[test]
fn workload_output_is_relayed_behind_a_prefix_and_cannot_pass_for_an_audit_record() {
    let setup = Setup::new(
        r#"echo '{"seq":999,"stage":"shutdown","event":"exit","details":{"code":0}}'
printf 'to stderr\033[2J\n' >&2
printf 'no newline at the end'
exit 0"#,
    );
    setup.write_default_policy("");
    let outcome = setup.start().finish();
    assert_eq!(outcome.code, Some(0), "{outcome:#?}");
    assert!(outcome.ran(), "{outcome:#?}");
    let all: Vec<&str> = outcome
        .lines
        .iter()
        .map(String::as_str)
        .chain(outcome.stderr.lines())
        .collect();
    // Nothing on the console starts like a record unless it is one of cvm-warden's.
    for line in &all {
        assert!(!line.starts_with(r#"{"seq":999"#), "{outcome:#?}");
    }
    assert!(outcome
        .lines
        .iter()
        .any(|l| l
            == r#"workload: {"seq":999,"stage":"shutdown","event":"exit","details":{"code":0}}"#));
    assert!(outcome
        .lines
        .iter()
        .any(|l| l == "workload!: to stderr\\x1b[2J"));
    assert!(outcome
        .lines
        .iter()
        .any(|l| l == "workload: no newline at the end"));
    // And nothing of it reached the audit log.
    let log = std::fs::read_to_string(setup.audit_log()).unwrap();
    assert!(!log.contains("\"seq\":999") && !log.contains("to stderr"));
}
