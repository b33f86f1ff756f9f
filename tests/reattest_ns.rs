//! Continuous trust through the real binary, as root: `cvm-warden init` as PID 1 of fresh
//! PID, mount and UTS namespaces inside a network namespace of its own, where the test broker
//! (`tests/broker`, in this process, its socket in that namespace) answers. The workload runs;
//! the daemon re-attests every 5 s (sample evidence, the resource asked for again); the owner
//! then revokes the workload through the broker's admin API (a resource policy that allows
//! nothing), and the next re-attestation stops the workload: SIGTERM, the secrets removed, the
//! closing record with the reason, exit non-zero. The log says why.
//!
//! Without root this test fails (it does not skip).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use cvm_warden::kbs::admin::{self, AdminKey, AdminRequest};
use kbs_test_broker::{Broker, BrokerConfig, RequiredStatus, ResourcePolicy, RunningBroker};
use serde_json::{json, Value};

#[allow(dead_code)] // the parts only other namespace tests use
mod common;

use common::Run;

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_cvm-warden");
/// Upper bound of the namespace run.
const RUN_LIMIT: Duration = Duration::from_secs(90);
/// Printed by the workload first: proves it ran.
const MARKER: &str = "WORKLOAD-RAN";
const LIVENESS: &str = "default/keys/liveness";
const SECRET: &str = "default/secrets/client-key";

/// A network namespace (`ip netns`), removed on drop.
struct Netns(String);

impl Netns {
    fn create() -> Netns {
        let name = format!("cvmw-reattest-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        let ok = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().unwrap();
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ok(&["netns", "add", &name]);
        let netns = Netns(name);
        ok(&["-n", &netns.0, "link", "set", "lo", "up"]);
        netns
    }

    /// Runs `f` on a thread inside the namespace (sockets it makes stay there).
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = File::open(format!("/run/netns/{}", self.0)).unwrap();
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                    f()
                })
                .join()
                .unwrap()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn admin_key() -> AdminKey {
    let out = Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519"])
        .output()
        .expect("openssl makes the test's admin key");
    AdminKey::from_pem(&out.stdout, "admin.pem").unwrap()
}

/// The owner revokes the workload: a resource policy that allows nothing.
fn revoke(broker: &RunningBroker, key: &AdminKey) {
    let claims = admin::AdminClaims {
        issuer: "owner".to_string(),
        audience: "kbs".to_string(),
        role: "admin".to_string(),
        ttl_secs: 300,
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let token = key.token(&claims, now).to_string();
    let mut transport = cvm_warden::kbs::HttpTransport::new(
        broker.url(),
        None,
        "",
        true,
        Duration::from_secs(5),
        Duration::from_secs(5),
    )
    .unwrap();
    let rego = "package policy\n\nimport rego.v1\n\ndefault allow := false\n";
    admin::register(
        &mut transport,
        &token,
        &[AdminRequest {
            what: "resource policy".to_string(),
            path: admin::RESOURCE_POLICY_PATH.to_string(),
            body: json!({ "policy": URL_SAFE_NO_PAD.encode(rego) }),
        }],
        &[],
    )
    .unwrap();
}

fn records(log: &Path) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn event(record: &Value) -> (&str, &str) {
    (
        record["stage"].as_str().unwrap_or_default(),
        record["event"].as_str().unwrap_or_default(),
    )
}

#[test]
fn a_revocation_mid_run_stops_the_workload_at_the_next_reattestation_and_the_log_says_why() {
    common::require_root(
        "reattest_ns",
        "it makes a network namespace and runs cvm-warden as PID 1 of new PID, mount and UTS namespaces",
    );
    let dir = tempfile::Builder::new()
        .prefix("cvm-warden-reattest-ns.")
        .tempdir_in("/var/tmp")
        .unwrap();
    chmod(dir.path(), 0o755);
    let bundle = dir.path().join("bundle");
    std::fs::create_dir(&bundle).unwrap();
    chmod(&bundle, 0o755);
    let run_sh = bundle.join("run.sh");
    std::fs::write(
        &run_sh,
        format!("#!/bin/sh\necho {MARKER}\nexec sleep 120\n"),
    )
    .unwrap();
    chmod(&run_sh, 0o755);
    let audit_log = dir.path().join("audit.jsonl");

    let netns = Netns::create();
    let key = admin_key();
    let public = dir.path().join("admin.pub.pem");
    std::fs::write(&public, key.public_pem()).unwrap();
    let sample = || ResourcePolicy::new(&["sample"], RequiredStatus::Warning);
    let config = BrokerConfig {
        allow_sample: true,
        admin: Some(kbs_test_broker::AdminConfig {
            public_key: public,
            issuer: Some("owner".to_string()),
            audience: Some("kbs".to_string()),
            role: Some("admin".to_string()),
        }),
        ..BrokerConfig::default()
    }
    .with_resource(LIVENESS, &[7u8; 32], sample())
    .with_resource(SECRET, b"client key bytes", sample());
    let broker = netns.run(|| Broker::start(config, "127.0.0.1:0").unwrap());

    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            r#"[attestation]
tee = "sample"
insecure_sample = true
kbs = "{url}"
insecure_http = true
timeout = "5s"
tries = 2
reattest_interval = "5s"
reattest_grace = "2s"
reattest_resource = "kbs:///{LIVENESS}"

[workload]
bundle = {bundle:?}
source = "copy"
copy_to = "/run/cvm-warden/bundle"
exec = ["/run/cvm-warden/bundle/run.sh"]
user = "nobody"

[workload.env]
PATH = "/usr/bin:/bin"

[network]

[[secret]]
name = "client.key"
resource = "kbs:///{SECRET}"

[audit]
file = {audit:?}
file_required = true
checkpoint_interval = "0"
"#,
            url = broker.url(),
            bundle = bundle.display().to_string(),
            audit = audit_log.display().to_string(),
        ),
    )
    .unwrap();

    let mut command = Command::new("ip");
    command.args(["netns", "exec", &netns.0]).args([
        "unshare",
        "--pid",
        "--fork",
        "--mount",
        "--mount-proc",
        "--uts",
        "--kill-child",
        "--",
        BIN,
        "init",
        "--sandbox",
        "--policy",
    ]);
    command.arg(&policy);
    let mut run = Run::spawn(command, RUN_LIMIT);
    run.wait_until("the workload ran", |r| {
        r.has_line(&format!("workload: {MARKER}"))
    });
    // At least one re-attestation is affirmed while the workload runs.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !records(&audit_log)
        .iter()
        .any(|r| event(r) == ("attest", "reattested"))
    {
        assert!(
            Instant::now() < deadline,
            "no re-attestation within 30 s: {:#?}",
            run.finish_unchecked()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let revoked_at = Instant::now();
    netns.run(|| revoke(&broker, &key));

    let outcome = run.finish_unchecked();
    // SIGTERM ended the workload (`sleep`): 143 becomes the namespace's exit status.
    assert_eq!(outcome.code, Some(143), "{outcome:#?}");
    // The next re-attestation was at most an interval later (and the stop a grace period).
    assert!(
        revoked_at.elapsed() < Duration::from_secs(20),
        "{:?}",
        revoked_at.elapsed()
    );
    let recs = records(&audit_log);
    let failed = recs
        .iter()
        .find(|r| event(r) == ("attest", "reattest_failed"))
        .unwrap_or_else(|| panic!("no attest/reattest_failed: {recs:#?}"));
    assert_eq!(failed["details"]["kind"], "refused");
    let error = failed["details"]["error"].as_str().unwrap();
    assert!(error.contains("PolicyDeny"), "{error}");
    assert!(error.contains(LIVENESS), "{error}");
    let tail: Vec<(&str, &str)> = recs
        .iter()
        .map(event)
        .skip_while(|e| *e != ("attest", "reattest_failed"))
        .collect();
    assert_eq!(
        tail,
        [
            ("attest", "reattest_failed"),
            ("launch", "stopping"),
            ("launch", "exited"),
            ("launch", "workload_done"),
            ("launch", "cleanup"),
            ("attest", "trust_lost"),
            ("shutdown", "exit"),
            ("audit", "checkpoint"),
        ],
        "{recs:#?}"
    );
    let cleanup = &recs
        .iter()
        .find(|r| event(r) == ("launch", "cleanup"))
        .unwrap()["details"]["removed"];
    assert_eq!(cleanup[0]["what"], "secrets");
    assert_eq!(cleanup[0]["removed"], true);
    let closing = &recs[recs.len() - 2]["details"];
    assert_eq!(closing["code"], 143);
    assert!(closing["reason"]
        .as_str()
        .unwrap()
        .starts_with("trust lost (refused)"));
    // The console says why too.
    assert!(
        outcome.stderr.contains("re-attestation") && outcome.stderr.contains("PolicyDeny"),
        "{}",
        outcome.stderr
    );
    // The log is an intact chain; sample evidence attests nothing (exit 3, never 0).
    let verify = Command::new(BIN)
        .args(["audit", "verify"])
        .arg(&audit_log)
        .output()
        .unwrap();
    assert_eq!(
        verify.status.code(),
        Some(3),
        "audit verify: {}\n{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
}
