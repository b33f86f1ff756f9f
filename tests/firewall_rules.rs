//! `rules/` and the nftables capability against the real `nft`:
//!
//! - every `rules/*.nft` passes `nft -c -f` (root; CI is root);
//! - the files equal what cvm-warden renders for the example policies next to them, so they
//!   cannot drift;
//! - in a fresh network namespace (a thread that `unshare(CLONE_NEWNET)`s; the namespace goes
//!   away with the thread, also when the test fails): a first apply with no table, the
//!   perimeter replaced by the allowlist atomically, the read-back comparison, a rule added by
//!   hand between apply and read-back detected, a failing transaction changing nothing, and
//!   each file loaded with `nft -f` reading back as the rendered JSON ruleset.
//!
//! A missing `nft` or a non-root run fails with a message; nothing is skipped. A fake `nft`
//! that hangs fails the apply within its (test-injected) timeout and leaves no process.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cvm_warden::firewall::{
    apply, build, plan, verify, FakeResolver, Firewall, FirewallError, NftFirewall, Phase,
    Resolution, Ruleset,
};
use cvm_warden::policy::{load, MemoryUsers, Policy};
use cvm_warden::report::error_chain;
use cvm_warden::tool::{Tool, ToolError, Tools};

fn rules_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("rules")
}

/// Each `.nft` file and the policy and phase it is rendered from.
const FILES: [(&str, &str, Phase); 3] = [
    (
        "perimeter.nft",
        "flare-client.policy.toml",
        Phase::Perimeter,
    ),
    (
        "flare-client.nft",
        "flare-client.policy.toml",
        Phase::Allowlist,
    ),
    (
        "flare-server.nft",
        "flare-server.policy.toml",
        Phase::Allowlist,
    ),
];

fn example_policy(name: &str) -> Policy {
    let users = MemoryUsers::new().user("nobody", 65534, 65534);
    match load(&rules_dir().join(name), None, &users) {
        Ok(loaded) => loaded.policy,
        Err(e) => panic!("rules/{name} is not a valid policy: {e}"),
    }
}

/// The example policies name addresses only: nothing may be resolved.
fn rendered(policy: &str, phase: Phase) -> Ruleset {
    build(&example_policy(policy), phase, &FakeResolver::new())
        .unwrap_or_else(|e| panic!("rendering rules/{policy} ({phase}): {e}"))
}

/// The lines that are not `#` comments or blank, trimmed.
fn rule_lines(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

fn nft(args: &[&str]) -> std::process::Output {
    Command::new("nft").args(args).output().unwrap_or_else(|e| {
        panic!("cannot run nft ({e}); install nftables (Debian: apt-get install nftables) — these tests need it")
    })
}

fn require_root(why: &str) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "tests/firewall_rules.rs needs root: {why}; run it as root (CI does), e.g. `sudo -E cargo test --test firewall_rules`"
    );
}

/// Runs `f` on a thread in a new, empty network namespace (removed when the thread ends).
fn in_fresh_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    require_root("it creates network namespaces and loads nftables rulesets");
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("unshare(CLONE_NEWNET) (needs CAP_SYS_ADMIN)");
        f()
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

fn list_table() -> String {
    let out = nft(&["-j", "list", "table", "inet", "cvm_warden"]);
    assert!(
        out.status.success(),
        "nft list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn every_rules_file_passes_nft_check() {
    require_root("`nft -c` needs CAP_NET_ADMIN to check a ruleset against the kernel");
    let mut checked = 0;
    for entry in std::fs::read_dir(rules_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "nft") {
            let out = nft(&["-c", "-f", path.to_str().unwrap()]);
            assert!(
                out.status.success(),
                "nft -c -f {} failed: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    assert_eq!(
        checked,
        FILES.len(),
        "every rules/*.nft must be listed in FILES"
    );
}

#[test]
fn rules_files_equal_the_rulesets_rendered_from_the_example_policies() {
    for (file, policy, phase) in FILES {
        let text = std::fs::read_to_string(rules_dir().join(file)).unwrap();
        let ruleset = rendered(policy, phase);
        assert_eq!(
            rule_lines(&text),
            rule_lines(&ruleset.nft_text()),
            "rules/{file} differs from the {phase} ruleset of rules/{policy}; the rendered rules are:\n{}",
            ruleset.nft_text()
        );
        // One comment per rule.
        for line in rule_lines(&text).iter().filter(|l| l.contains("accept")) {
            assert!(
                line.contains(" accept comment \"") && line.ends_with('"'),
                "{file}: {line}"
            );
        }
    }
}

#[test]
fn the_broker_is_in_the_client_allowlist_only_because_the_workload_lists_it() {
    let perimeter = rendered("flare-client.policy.toml", Phase::Perimeter).nft_text();
    let allowlist = rendered("flare-client.policy.toml", Phase::Allowlist).nft_text();
    // cvm-warden's own broker rule (attestation.kbs) exists only in the perimeter.
    assert!(perimeter.contains(
        "ip daddr 198.51.100.7 tcp dport 8999 ct direction original ct mark set 0x63766d77 accept comment \"key broker tcp 198.51.100.7:8999 (attestation.kbs)\""
    ));
    assert!(!allowlist.contains("(attestation.kbs)"));
    // The workload's own outbound rule to the broker (network.outbound[1]).
    assert!(allowlist.contains(
        "ip daddr 198.51.100.7 tcp dport 8999 ct direction original ct mark set 0x63766d77 accept comment \"outbound tcp 198.51.100.7:8999 (network.outbound[1])\""
    ));
    assert!(allowlist.contains(
        "ip daddr 192.0.2.10 tcp dport 8002 ct direction original ct mark set 0x63766d77 accept"
    ));
}

#[test]
fn perimeter_then_allowlist_replace_each_other_atomically_in_a_fresh_namespace() {
    in_fresh_netns(|| {
        let perimeter = rendered("flare-client.policy.toml", Phase::Perimeter);
        let allowlist = rendered("flare-client.policy.toml", Phase::Allowlist);
        let mut fw = NftFirewall::new();

        // First apply: the namespace has no table at all.
        let applied = apply(&perimeter, &mut fw).unwrap();
        assert_eq!(applied.digest, perimeter.digest());
        verify(&perimeter, &list_table()).unwrap();

        // Someone adds a chain and a rule; the next apply replaces all of it.
        let out = nft(&[
            "add",
            "rule",
            "inet",
            "cvm_warden",
            "input",
            "tcp",
            "dport",
            "22",
            "accept",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = nft(&["add", "chain", "inet", "cvm_warden", "extra"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );

        apply(&allowlist, &mut fw).unwrap();
        let listing = list_table();
        verify(&allowlist, &listing).unwrap();
        assert!(verify(&perimeter, &listing).is_err());
        let text = String::from_utf8(nft(&["list", "ruleset"]).stdout).unwrap();
        assert!(
            !text.contains("(attestation.kbs)"),
            "the perimeter's broker rule survived:\n{text}"
        );
        assert!(
            !text.contains("dport 22"),
            "the hand-added rule survived:\n{text}"
        );
        assert!(
            !text.contains("chain extra"),
            "the hand-added chain survived:\n{text}"
        );
        assert!(
            text.contains("comment \"outbound tcp 192.0.2.10:8002 (network.outbound[0])\""),
            "{text}"
        );

        // A transaction that fails part-way changes nothing.
        let broken = r#"{"nftables":[{"add":{"table":{"family":"inet","name":"cvm_warden"}}},{"delete":{"table":{"family":"inet","name":"cvm_warden"}}},{"add":{"table":{"family":"inet","name":"cvm_warden"}}},{"add":{"rule":{"family":"inet","table":"cvm_warden","chain":"nosuchchain","expr":[{"accept":null}]}}}]}"#;
        let err = fw.transaction(broken).unwrap_err();
        assert!(matches!(err, FirewallError::Nft { .. }), "{err}");
        assert!(
            err.to_string()
                .starts_with("`nft -j -f -` failed (exit status: 1): "),
            "{err}"
        );
        verify(&allowlist, &list_table()).unwrap();
    });
}

#[test]
fn a_ruleset_with_every_kind_of_rule_round_trips_through_nft() {
    let text = r#"[attestation]
tee = "tpm"
kbs = "https://kbs.example:8999"
kbs_ca = "/etc/cvm-warden/kbs-ca.pem"

[workload]
bundle = "/opt/flare"
source = "initramfs"
exec = ["/opt/flare/start.sh"]
user = "nobody"

[network]
inbound = [{ port = 8002, from = ["10.0.0.0/8", "192.0.2.1/32", "fd00::/8", "2001:db8::1/128", "0.0.0.0/0"] }, { port = 5353, proto = "udp" }]
outbound = [{ host = "fl-server.example", port = 8002 }, { host = "2001:db8::10", port = 8003, proto = "udp" }]

[network.interface.eth7]
dhcp = true

[audit]
syslog = "tcp://[2001:db8::50]:6514"
"#;
    let users = MemoryUsers::new().user("nobody", 65534, 65534);
    let policy = cvm_warden::policy::parse(text, None, &users)
        .unwrap()
        .policy;
    let resolver = FakeResolver::new()
        .host(
            "kbs.example",
            &[
                "198.51.100.7".parse().unwrap(),
                "2001:db8::7".parse().unwrap(),
            ],
        )
        .host(
            "fl-server.example",
            &[
                "192.0.2.10".parse().unwrap(),
                "2001:db8::a".parse().unwrap(),
            ],
        )
        .nameservers(&[
            "192.0.2.53".parse().unwrap(),
            "2001:db8::53".parse().unwrap(),
        ]);
    in_fresh_netns(move || {
        for phase in [Phase::Perimeter, Phase::Allowlist] {
            // The DHCP interface (absent from the namespace: matched by name) has its lease's
            // server pinned for the allowlist.
            let mut resolution = Resolution::resolve(&policy, &[phase], &resolver).unwrap();
            resolution.pin_dhcp("eth7", "192.0.2.67".parse().unwrap());
            let ruleset = plan(&policy, phase, &resolution).unwrap();
            assert!(
                ruleset
                    .nft_text()
                    .contains("dport 53 ct direction original ct mark set 0x63766d77 accept"),
                "{phase}: no DNS rule"
            );
            let dhcp = match phase {
                Phase::Perimeter => "oifname \"eth7\" udp sport 68 udp dport 67 ct direction",
                Phase::Allowlist => {
                    "oifname \"eth7\" ip daddr 192.0.2.67 udp sport 68 udp dport 67 ct direction"
                }
            };
            assert!(ruleset.nft_text().contains(dhcp), "{phase}: no DHCP rule");
            apply(&ruleset, &mut NftFirewall::new())
                .unwrap_or_else(|e| panic!("{phase}: {e}\n{}", ruleset.nft_text()));
            // The text form loads to the same ruleset.
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("ruleset.nft");
            std::fs::write(&path, ruleset.nft_text()).unwrap();
            let out = nft(&["-f", path.to_str().unwrap()]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            verify(&ruleset, &list_table()).unwrap_or_else(|e| panic!("{phase} text: {e}"));
        }
    });
}

/// The real firewall, with a rule added by hand between the transaction and the read-back.
struct Meddler(NftFirewall);

impl Firewall for Meddler {
    fn transaction(&mut self, document: &str) -> Result<(), FirewallError> {
        self.0.transaction(document)
    }

    fn list_table(&mut self) -> Result<String, FirewallError> {
        let out = nft(&[
            "add",
            "rule",
            "inet",
            "cvm_warden",
            "output",
            "ip",
            "daddr",
            "203.0.113.9",
            "accept",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.0.list_table()
    }
}

#[test]
fn a_rule_added_between_apply_and_read_back_fails_closed() {
    in_fresh_netns(|| {
        let allowlist = rendered("flare-server.policy.toml", Phase::Allowlist);
        let err = apply(&allowlist, &mut Meddler(NftFirewall::new())).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(
                err,
                FirewallError::Mismatch {
                    phase: Phase::Allowlist,
                    ..
                }
            ),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "chain output has an unexpected rule {}: ",
                allowlist.chains()[1].rules.len() + 1
            )),
            "{text}"
        );
        assert!(text.contains("203.0.113.9"), "{text}");
    });
}

#[test]
fn each_rules_file_loaded_with_nft_reads_back_as_the_rendered_json_ruleset() {
    in_fresh_netns(|| {
        for (file, policy, phase) in FILES {
            let path = rules_dir().join(file);
            let out = nft(&["-f", path.to_str().unwrap()]);
            assert!(
                out.status.success(),
                "nft -f {file}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            verify(&rendered(policy, phase), &list_table())
                .unwrap_or_else(|e| panic!("rules/{file} loaded with nft -f: {e}"));
        }
    });
}

#[test]
fn a_missing_nft_is_named_with_the_paths_tried() {
    let mut fw = NftFirewall::with_tools(
        Tools::system().with_candidates(Tool::Nft, ["/nonexistent/nft", "/nonexistent/sbin/nft"]),
    );
    let err = fw.list_table().unwrap_err();
    assert!(matches!(err, FirewallError::NftSpawn { .. }), "{err:?}");
    assert_eq!(
        error_chain(&err),
        "cannot run `nft -j list table inet cvm_warden` (nftables, nft 1.0 or later): nft is not \
         installed: tried /nonexistent/nft (not found), /nonexistent/sbin/nft (not found) \
         (cvm-warden never searches PATH); install the Debian package nftables in the image"
    );
}

/// An executable script `name` in `dir`, written by install(1) rather than by this
/// multi-threaded process (a concurrent fork could inherit the open file: ETXTBSY).
fn fake_tool(dir: &Path, name: &str, body: &str) -> PathBuf {
    let draft = dir.join(format!("{name}.draft"));
    std::fs::write(&draft, format!("#!/bin/sh\n{body}\n")).unwrap();
    let path = dir.join(name);
    let status = Command::new("/usr/bin/install")
        .args(["-m", "0755"])
        .arg(&draft)
        .arg(&path)
        .status()
        .unwrap();
    assert!(status.success());
    path
}

/// Whether `pid` is a live process (a zombie is not).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !matches!(
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next()),
            Some("Z" | "X")
        )
    })
}

#[test]
fn an_nft_that_hangs_fails_the_apply_within_its_timeout_and_leaves_nothing_running() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    let fake = fake_tool(
        dir.path(),
        "nft",
        &format!(
            "echo $$ > '{p}'\nsleep 100000 &\necho $! >> '{p}'\nwait",
            p = pids.display()
        ),
    );
    let mut fw = NftFirewall::with_tools(
        Tools::system()
            .with_candidates(Tool::Nft, [&fake])
            .with_timeout(Tool::Nft, Duration::from_millis(400)),
    );
    let started = Instant::now();
    let err = apply(
        &rendered("flare-client.policy.toml", Phase::Perimeter),
        &mut fw,
    )
    .unwrap_err();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(5),
        "{took:?}"
    );
    match &err {
        FirewallError::NftSpawn { command, source } => {
            assert_eq!(command, "nft -j -f -");
            assert!(matches!(source, ToolError::Timeout { .. }), "{source:?}");
        }
        other => panic!("{other:?}"),
    }
    let text = error_chain(&err);
    assert!(
        text.contains(&format!(
            "`nft -j -f -` ({}) did not finish within 400 ms: it was killed with its process group",
            fake.display()
        )),
        "{text}"
    );
    // The script and the sleep it started are gone.
    let pids: Vec<i32> = std::fs::read_to_string(&pids)
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 2);
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!pids.iter().any(|p| alive(*p)), "{pids:?} still running");
}
