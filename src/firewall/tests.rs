#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::IpAddr;

use serde_json::{json, Value};

use super::*;
use crate::digest::Digest;
use crate::policy::{parse, MemoryUsers};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A valid policy: `attestation` is the attestation part (a string or a table), `rest` the
/// `[network]` / `[audit]` tables (an empty `[network]` table is added when `rest` has none:
/// a policy with a key broker must have one).
fn policy(attestation: &str, rest: &str) -> Policy {
    let rest = if rest.contains("[network]") {
        rest.to_string()
    } else {
        format!("[network]\n\n{rest}")
    };
    let text = format!(
        "{attestation}\n\n[workload]\nbundle = \"/opt/flare\"\nsource = \"initramfs\"\nexec = [\"/opt/flare/start.sh\"]\nuser = \"flare\"\n\n{rest}"
    );
    let users = MemoryUsers::new().user("flare", 1000, 1000);
    match parse(&text, None, &users) {
        Ok(loaded) => loaded.policy,
        Err(e) => panic!("test policy is invalid: {e}\n{text}"),
    }
}

const NONE: &str = "attestation = \"none\"";

fn broker(kbs: &str) -> String {
    format!(
        "[attestation]\ntee = \"tpm\"\nkbs = \"{kbs}\"\nkbs_ca = \"/etc/cvm-warden/kbs-ca.pem\""
    )
}

fn lines(ruleset: &Ruleset) -> Vec<String> {
    ruleset.rule_lines()
}

const BASE_INPUT: [&str; 5] = [
    "input: iif \"lo\" accept comment \"loopback: local processes talk to each other\"",
    "input: ct state established,related ct mark 0x63766d77 accept comment \"packets of connections these rules admitted (ct mark cvmw), and ICMP errors about them\"",
    "input: icmpv6 type { nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert } ip6 hoplimit 255 accept comment \"icmpv6 neighbour and router discovery from the link (RFC 4861)\"",
    "input: icmpv6 type packet-too-big accept comment \"icmpv6 packet-too-big: path MTU discovery (RFC 8201)\"",
    "input: icmp type destination-unreachable icmp code frag-needed accept comment \"icmp frag-needed: path MTU discovery (RFC 1191)\"",
];
const BASE_OUTPUT: [&str; 2] = [
    "output: oif \"lo\" accept comment \"loopback: local processes talk to each other\"",
    "output: ct state established,related ct mark 0x63766d77 accept comment \"packets of connections these rules admitted (ct mark cvmw), and ICMP errors about them\"",
];
const ICMP_OUTPUT: &str = "output: icmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert, mld2-listener-report } accept comment \"icmpv6 neighbour and router discovery, MLDv2 reports (RFC 4861, 3810)\"";

fn expect(extra_input: &[&str], extra_output: &[&str]) -> Vec<String> {
    BASE_INPUT
        .iter()
        .chain(extra_input)
        .chain(BASE_OUTPUT.iter())
        .chain(extra_output)
        .chain([ICMP_OUTPUT].iter())
        .map(|s| s.to_string())
        .collect()
}

/// A resolver that fails the test if anything is asked of it.
struct NoLookups;

impl Resolver for NoLookups {
    fn resolve(&self, host: &str) -> std::io::Result<Vec<IpAddr>> {
        panic!("nothing should be resolved, {host:?} was")
    }
    fn nameservers(&self) -> std::io::Result<Vec<IpAddr>> {
        panic!("name servers should not be needed")
    }
}

#[test]
fn perimeter_with_a_broker_address_allows_exactly_the_broker_and_no_dns() {
    let p = policy(&broker("https://198.51.100.7:8999"), "");
    let ruleset = build(&p, Phase::Perimeter, &NoLookups).unwrap();
    assert_eq!(
        lines(&ruleset),
        expect(
            &[],
            &["output: ip daddr 198.51.100.7 tcp dport 8999 ct direction original ct mark set 0x63766d77 accept comment \"key broker tcp 198.51.100.7:8999 (attestation.kbs)\""]
        )
    );
    assert!(ruleset.pins().is_empty());
    assert!(ruleset.nameservers().is_empty());
    assert_eq!(ruleset.chain(Hook::Forward).unwrap().rules, vec![]);
}

#[test]
fn perimeter_without_attestation_has_no_broker_rule() {
    let p = policy(NONE, "");
    let ruleset = build(&p, Phase::Perimeter, &NoLookups).unwrap();
    assert_eq!(lines(&ruleset), expect(&[], &[]));
}

#[test]
fn perimeter_ignores_the_allowlist_and_default_ports_come_from_the_scheme() {
    let p = policy(
        &broker("https://[2001:db8::7]/kbs"),
        "[network]\ninbound = [{ port = 8002 }]\noutbound = [{ host = \"192.0.2.10\", port = 8002 }]\n",
    );
    let ruleset = build(&p, Phase::Perimeter, &NoLookups).unwrap();
    assert_eq!(
        lines(&ruleset),
        expect(
            &[],
            &["output: ip6 daddr 2001:db8::7 tcp dport 443 ct direction original ct mark set 0x63766d77 accept comment \"key broker tcp [2001:db8::7]:443 (attestation.kbs)\""]
        )
    );
}

/// An IPv6 literal with a port (read by the `url` crate through `policy::BrokerUrl`).
#[test]
fn a_broker_ipv6_literal_with_a_port() {
    let p = policy(&broker("https://[2001:db8::7]:8080"), "");
    let ruleset = build(&p, Phase::Perimeter, &NoLookups).unwrap();
    assert_eq!(
        lines(&ruleset),
        expect(
            &[],
            &["output: ip6 daddr 2001:db8::7 tcp dport 8080 ct direction original ct mark set 0x63766d77 accept comment \"key broker tcp [2001:db8::7]:8080 (attestation.kbs)\""]
        )
    );
}

#[test]
fn a_broker_name_is_pinned_v4_and_v6_and_opens_dns_to_the_name_servers_only() {
    let p = policy(&broker("https://kbs.example:8999"), "");
    let resolver = FakeResolver::new()
        .host(
            "kbs.example",
            &[
                ip("2001:db8::7"),
                ip("198.51.100.7"),
                ip("::ffff:198.51.100.8"),
            ],
        )
        .nameservers(&[ip("10.255.255.53"), ip("fd00::53")]);
    let ruleset = build(&p, Phase::Perimeter, &resolver).unwrap();
    let c = "(attestation.kbs)";
    assert_eq!(
        lines(&ruleset),
        expect(
            &[],
            &[
                &format!("output: ip daddr 198.51.100.7 tcp dport 8999 ct direction original ct mark set 0x63766d77 accept comment \"key broker tcp kbs.example:8999 {c}\""),
                &format!("output: ip daddr 198.51.100.8 tcp dport 8999 ct direction original ct mark set 0x63766d77 accept comment \"key broker tcp kbs.example:8999 {c}\""),
                &format!("output: ip6 daddr 2001:db8::7 tcp dport 8999 ct direction original ct mark set 0x63766d77 accept comment \"key broker tcp kbs.example:8999 {c}\""),
                &format!("output: ip daddr 10.255.255.53 udp dport 53 ct direction original ct mark set 0x63766d77 accept comment \"dns udp to name server 10.255.255.53 {c}\""),
                &format!("output: ip daddr 10.255.255.53 tcp dport 53 ct direction original ct mark set 0x63766d77 accept comment \"dns tcp to name server 10.255.255.53 {c}\""),
                &format!("output: ip6 daddr fd00::53 udp dport 53 ct direction original ct mark set 0x63766d77 accept comment \"dns udp to name server fd00::53 {c}\""),
                &format!("output: ip6 daddr fd00::53 tcp dport 53 ct direction original ct mark set 0x63766d77 accept comment \"dns tcp to name server fd00::53 {c}\""),
            ]
        )
    );
    assert_eq!(
        ruleset.pins(),
        &[Pin {
            host: "kbs.example".to_string(),
            keys: vec!["attestation.kbs".to_string()],
            addresses: vec![ip("198.51.100.7"), ip("198.51.100.8"), ip("2001:db8::7")],
        }]
    );
    assert_eq!(
        ruleset.nameservers(),
        &[ip("10.255.255.53"), ip("fd00::53")]
    );
}

#[test]
fn allowlist_has_ports_sources_outbound_and_syslog_but_not_the_broker() {
    // Without re-attestation nothing talks to the broker after the unlock stage.
    let p = policy(
        &format!(
            "{}\nreattest_interval = \"0\"",
            broker("https://kbs.example:8999")
        ),
        r#"[network]
inbound = [{ port = 8002 }, { port = 8003, from = ["10.0.0.0/8", "fd00::/8", "192.0.2.1/32"] }, { port = 5353, proto = "udp" }]
outbound = [{ host = "192.0.2.10", port = 8002 }, { host = "2001:db8::10", port = 8003 }, { host = "192.0.2.11", port = 53, proto = "udp" }]

[audit]
syslog = "udp://192.0.2.50:514"
"#,
    );
    let ruleset = build(&p, Phase::Allowlist, &NoLookups).unwrap();
    assert_eq!(
        lines(&ruleset),
        expect(
            &[
                "input: tcp dport 8002 ct direction original ct mark set 0x63766d77 accept comment \"inbound tcp 8002 (network.inbound[0])\"",
                "input: ip saddr 10.0.0.0/8 tcp dport 8003 ct direction original ct mark set 0x63766d77 accept comment \"inbound tcp 8003 from 10.0.0.0/8 (network.inbound[1].from[0])\"",
                "input: ip6 saddr fd00::/8 tcp dport 8003 ct direction original ct mark set 0x63766d77 accept comment \"inbound tcp 8003 from fd00::/8 (network.inbound[1].from[1])\"",
                "input: ip saddr 192.0.2.1 tcp dport 8003 ct direction original ct mark set 0x63766d77 accept comment \"inbound tcp 8003 from 192.0.2.1/32 (network.inbound[1].from[2])\"",
                "input: udp dport 5353 ct direction original ct mark set 0x63766d77 accept comment \"inbound udp 5353 (network.inbound[2])\"",
            ],
            &[
                "output: ip daddr 192.0.2.10 tcp dport 8002 ct direction original ct mark set 0x63766d77 accept comment \"outbound tcp 192.0.2.10:8002 (network.outbound[0])\"",
                "output: ip6 daddr 2001:db8::10 tcp dport 8003 ct direction original ct mark set 0x63766d77 accept comment \"outbound tcp [2001:db8::10]:8003 (network.outbound[1])\"",
                "output: ip daddr 192.0.2.11 udp dport 53 ct direction original ct mark set 0x63766d77 accept comment \"outbound udp 192.0.2.11:53 (network.outbound[2])\"",
                "output: ip daddr 192.0.2.50 udp dport 514 ct direction original ct mark set 0x63766d77 accept comment \"syslog udp 192.0.2.50:514 (audit.syslog)\"",
            ]
        )
    );
    // No DNS rule: every host is an address (the udp 53 rule is the policy's own).
    assert!(ruleset.nameservers().is_empty());
}

#[test]
fn allowlist_names_are_pinned_and_dns_is_allowed_only_then() {
    let p = policy(
        NONE,
        r#"[network]
outbound = [{ host = "fl-server.example", port = 8002 }, { host = "fl-server.example", port = 8003 }]

[audit]
syslog = "tcp://logs.example:6514"
"#,
    );
    let resolver = FakeResolver::new()
        .host("fl-server.example", &[ip("192.0.2.10")])
        .host("logs.example", &[ip("2001:db8::50")])
        .nameservers(&[ip("192.0.2.53")]);
    let ruleset = build(&p, Phase::Allowlist, &resolver).unwrap();
    let keys = "network.outbound[0], network.outbound[1], audit.syslog";
    assert_eq!(
        lines(&ruleset),
        expect(
            &[],
            &[
                "output: ip daddr 192.0.2.10 tcp dport 8002 ct direction original ct mark set 0x63766d77 accept comment \"outbound tcp fl-server.example:8002 (network.outbound[0])\"",
                "output: ip daddr 192.0.2.10 tcp dport 8003 ct direction original ct mark set 0x63766d77 accept comment \"outbound tcp fl-server.example:8003 (network.outbound[1])\"",
                "output: ip6 daddr 2001:db8::50 tcp dport 6514 ct direction original ct mark set 0x63766d77 accept comment \"syslog tcp logs.example:6514 (audit.syslog)\"",
                &format!("output: ip daddr 192.0.2.53 udp dport 53 ct direction original ct mark set 0x63766d77 accept comment \"dns udp to name server 192.0.2.53 ({keys})\""),
                &format!("output: ip daddr 192.0.2.53 tcp dport 53 ct direction original ct mark set 0x63766d77 accept comment \"dns tcp to name server 192.0.2.53 ({keys})\""),
            ]
        )
    );
    assert_eq!(
        ruleset.pins(),
        &[
            Pin {
                host: "fl-server.example".to_string(),
                keys: vec![
                    "network.outbound[0]".to_string(),
                    "network.outbound[1]".to_string()
                ],
                addresses: vec![ip("192.0.2.10")],
            },
            Pin {
                host: "logs.example".to_string(),
                keys: vec!["audit.syslog".to_string()],
                addresses: vec![ip("2001:db8::50")],
            },
        ]
    );
    // The perimeter of the same policy needs the syslog name only.
    let perimeter = build(&p, Phase::Perimeter, &resolver).unwrap();
    assert_eq!(perimeter.pins().len(), 1);
    assert_eq!(perimeter.pins()[0].host, "logs.example");
}

#[test]
fn one_resolution_serves_both_phases() {
    let p = policy(
        &broker("https://kbs.example:8999"),
        "[network]\noutbound = [{ host = \"fl-server.example\", port = 8002 }]\n",
    );
    let resolver = FakeResolver::new()
        .host("kbs.example", &[ip("198.51.100.7")])
        .host("fl-server.example", &[ip("192.0.2.10")])
        .nameservers(&[ip("192.0.2.53")]);
    let resolution =
        Resolution::resolve(&p, &[Phase::Perimeter, Phase::Allowlist], &resolver).unwrap();
    assert_eq!(resolution.pins.len(), 2);
    let perimeter = plan(&p, Phase::Perimeter, &resolution).unwrap();
    let allowlist = plan(&p, Phase::Allowlist, &resolution).unwrap();
    assert_eq!(perimeter.pins()[0].host, "kbs.example");
    assert_eq!(allowlist.pins()[0].host, "fl-server.example");
    // A resolution for the perimeter only does not cover the allowlist: refused, not guessed.
    let partial = Resolution::resolve(&p, &[Phase::Perimeter], &resolver).unwrap();
    let err = plan(&p, Phase::Allowlist, &partial).unwrap_err();
    assert_eq!(
        err.to_string(),
        "network.outbound[0]: host \"fl-server.example\" was not resolved before planning; resolve every phase's names first (Resolution::resolve with this phase)"
    );
}

#[test]
fn a_name_that_does_not_resolve_fails_closed_naming_host_and_key() {
    let p = policy(
        NONE,
        "[network]\noutbound = [{ host = \"192.0.2.10\", port = 1 }, { host = \"nowhere.example\", port = 8002 }]\n",
    );
    let err = build(&p, Phase::Allowlist, &FakeResolver::new()).unwrap_err();
    assert_eq!(
        crate::report::error_chain(&err),
        "network.outbound[1]: cannot resolve host \"nowhere.example\"; check the name and the DNS configuration, or write an address instead: no address associated with the name"
    );
    let empty = FakeResolver::new().host("nowhere.example", &[]);
    let err = build(&p, Phase::Allowlist, &empty).unwrap_err();
    assert_eq!(
        err.to_string(),
        "network.outbound[1]: host \"nowhere.example\" resolved to no address; check its DNS records, or write an address instead"
    );
    let no_ns = FakeResolver::new().host("nowhere.example", &[ip("192.0.2.9")]);
    let err = build(&p, Phase::Allowlist, &no_ns).unwrap_err();
    assert_eq!(
        err.to_string(),
        "no name server to allow DNS to, but nowhere.example must be resolved; configure a nameserver in /etc/resolv.conf or write addresses instead of names"
    );
}

#[test]
fn every_rule_has_a_comment_within_nfts_limit_even_for_long_names() {
    let long = format!(
        "{}.example",
        ["a".repeat(60), "b".repeat(60), "c".repeat(60)].join(".")
    );
    let p = policy(
        &broker(&format!("https://{long}:8999")),
        &format!("[network]\ninbound = [{{ port = 1, from = [\"10.0.0.0/8\"] }}]\noutbound = [{{ host = \"{long}\", port = 2 }}]\n"),
    );
    let resolver = FakeResolver::new()
        .host(&long, &[ip("192.0.2.1")])
        .nameservers(&[ip("192.0.2.53")]);
    for phase in [Phase::Perimeter, Phase::Allowlist] {
        let ruleset = build(&p, phase, &resolver).unwrap();
        let doc: Value = serde_json::from_str(ruleset.json()).unwrap();
        let rules: Vec<&Value> = doc["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c.get("add").and_then(|a| a.get("rule")))
            .collect();
        assert_eq!(rules.len(), ruleset.rule_count());
        for rule in rules {
            let comment = rule["comment"].as_str().unwrap();
            assert!(
                !comment.is_empty() && comment.len() <= MAX_COMMENT,
                "{comment}"
            );
        }
    }
    let allowlist = build(&p, Phase::Allowlist, &resolver).unwrap();
    let outbound = &allowlist.chain(Hook::Output).unwrap().rules[2].comment;
    assert!(outbound.starts_with("outbound tcp aaaa"), "{outbound}");
    assert!(
        outbound.ends_with("... (network.outbound[0])"),
        "{outbound}"
    );
}

#[test]
fn the_transaction_replaces_the_table_and_the_digest_is_sha256_of_its_jcs_form() {
    let p = policy(&broker("https://198.51.100.7:8999"), "");
    let ruleset = build(&p, Phase::Perimeter, &NoLookups).unwrap();
    let doc: Value = serde_json::from_str(ruleset.json()).unwrap();
    let commands = doc["nftables"].as_array().unwrap();
    let table = json!({"family": "inet", "name": "cvm_warden"});
    assert_eq!(commands[0], json!({"add": {"table": table}}));
    assert_eq!(commands[1], json!({"delete": {"table": table}}));
    assert_eq!(commands[2], json!({"add": {"table": table}}));
    for (i, name) in ["input", "output", "forward"].iter().enumerate() {
        assert_eq!(
            commands[3 + i],
            json!({"add": {"chain": {"family": "inet", "table": "cvm_warden", "name": name,
                "type": "filter", "hook": name, "prio": 0, "policy": "drop"}}})
        );
    }
    assert_eq!(
        commands[3 + 3],
        json!({"add": {"rule": {"family": "inet", "table": "cvm_warden", "chain": "input",
            "comment": "loopback: local processes talk to each other",
            "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iif"}}, "right": "lo"}}, {"accept": null}]}}})
    );
    // The base rule accepts established/related packets only of connections carrying
    // cvm-warden's mark ("cvmw"); the broker rule admits a connection and sets the mark. The
    // JSON is what `nft -j list` prints for the same rules loaded as text.
    assert_eq!(CT_MARK, 0x6376_6d77);
    assert_eq!(CT_MARK.to_be_bytes(), *b"cvmw");
    assert_eq!(
        commands[3 + 3 + 1],
        json!({"add": {"rule": {"family": "inet", "table": "cvm_warden", "chain": "input",
            "comment": "packets of connections these rules admitted (ct mark cvmw), and ICMP errors about them",
            "expr": [
                {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}},
                {"match": {"op": "==", "left": {"ct": {"key": "mark"}}, "right": 1_668_705_655}},
                {"accept": null}]}}})
    );
    let broker_rule = commands
        .iter()
        .find(|c| {
            c["add"]["rule"]["comment"] == "key broker tcp 198.51.100.7:8999 (attestation.kbs)"
        })
        .unwrap();
    assert_eq!(
        broker_rule["add"]["rule"]["expr"],
        json!([
            {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "198.51.100.7"}},
            {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 8999}},
            {"match": {"op": "==", "left": {"ct": {"key": "direction"}}, "right": "original"}},
            {"mangle": {"key": {"ct": {"key": "mark"}}, "value": 1_668_705_655}},
            {"accept": null}])
    );
    assert_eq!(commands.len(), 6 + ruleset.rule_count());
    // The pretty form is the same document.
    assert_eq!(
        serde_json::from_str::<Value>(ruleset.json_pretty()).unwrap(),
        doc
    );
    // Digest: SHA-256 of the JCS form of the JSON, recomputed independently.
    let jcs = serde_json_canonicalizer::to_vec(&doc).unwrap();
    assert_eq!(ruleset.digest(), Digest::of(&jcs));
    // Another broker port, another digest.
    let other = build(
        &policy(&broker("https://198.51.100.7:8998"), ""),
        Phase::Perimeter,
        &NoLookups,
    )
    .unwrap();
    assert_ne!(other.digest(), ruleset.digest());
}

#[test]
fn the_text_form_replaces_the_table_and_lists_every_rule() {
    let p = policy(NONE, "[network]\ninbound = [{ port = 8002 }]\n");
    let ruleset = build(&p, Phase::Allowlist, &NoLookups).unwrap();
    let text = ruleset.nft_text();
    let mut expected = String::from(
        "table inet cvm_warden\ndelete table inet cvm_warden\ntable inet cvm_warden {\n\tchain input {\n\t\ttype filter hook input priority filter; policy drop;\n",
    );
    for line in BASE_INPUT {
        expected.push_str(&format!("\t\t{}\n", line.strip_prefix("input: ").unwrap()));
    }
    expected.push_str("\t\ttcp dport 8002 ct direction original ct mark set 0x63766d77 accept comment \"inbound tcp 8002 (network.inbound[0])\"\n\t}\n\n\tchain output {\n\t\ttype filter hook output priority filter; policy drop;\n");
    for line in BASE_OUTPUT.iter().chain([ICMP_OUTPUT].iter()) {
        expected.push_str(&format!("\t\t{}\n", line.strip_prefix("output: ").unwrap()));
    }
    expected.push_str("\t}\n\n\tchain forward {\n\t\ttype filter hook forward priority filter; policy drop;\n\t}\n}\n");
    assert_eq!(text, expected);
    let rendered = render_nft(&ruleset);
    assert!(rendered.starts_with(&format!(
        "# cvm-warden allowlist ruleset (table inet cvm_warden)\n# digest: {}\n",
        ruleset.digest()
    )));
    assert!(rendered.ends_with(&text));
}

#[test]
fn apply_replaces_atomically_and_reads_back() {
    let p = policy(
        &broker("https://198.51.100.7:8999"),
        "[network]\ninbound = [{ port = 8002 }, { port = 8003 }]\n",
    );
    let perimeter = build(&p, Phase::Perimeter, &NoLookups).unwrap();
    let allowlist = build(&p, Phase::Allowlist, &NoLookups).unwrap();
    let mut fw = RecordingFirewall::new();
    // First apply: no table yet.
    let applied = apply(&perimeter, &mut fw).unwrap();
    assert_eq!(applied.phase, Phase::Perimeter);
    assert_eq!(applied.digest, perimeter.digest());
    assert_eq!(applied.rules, perimeter.rule_count());
    assert_eq!(applied.table, "inet cvm_warden");
    // Someone adds a rule of their own; the next apply removes it with the old ruleset.
    fw.inject(
        json!({"rule": {"family": "inet", "table": "cvm_warden", "chain": "input",
        "expr": [{"accept": null}]}}),
    );
    let applied = apply(&allowlist, &mut fw).unwrap();
    assert_eq!(applied.digest, allowlist.digest());
    assert_eq!(
        fw.transactions,
        vec![perimeter.json().to_string(), allowlist.json().to_string()]
    );
    assert_eq!(fw.listings, 2);
    // The table now holds exactly the allowlist.
    let listing = fw.list_table().unwrap();
    verify(&allowlist, &listing).unwrap();
    let err = verify(&perimeter, &listing).unwrap_err().to_string();
    assert!(err.starts_with("the perimeter ruleset read back from the kernel differs from the one applied: chain input has an unexpected rule 6: {\"rule\":{\"chain\":\"input\",\"comment\":\"inbound tcp 8002 (network.inbound[0])\""), "{err}");
}

#[test]
fn a_rule_added_between_apply_and_read_back_fails_closed() {
    let p = policy(NONE, "[network]\ninbound = [{ port = 8002 }]\n");
    let ruleset = build(&p, Phase::Allowlist, &NoLookups).unwrap();
    let mut fw = RecordingFirewall::new();
    fw.inject_before_listing = Some(json!({"rule": {"family": "inet", "table": "cvm_warden",
        "chain": "input", "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 22}}, {"accept": null}]}}));
    let err = apply(&ruleset, &mut fw).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the allowlist ruleset read back from the kernel differs from the one applied: chain input has an unexpected rule 7: {\"rule\":{\"chain\":\"input\",\"expr\":[{\"match\":{\"left\":{\"payload\":{\"field\":\"dport\",\"protocol\":\"tcp\"}},\"op\":\"==\",\"right\":22}},{\"accept\":null}],\"family\":\"inet\",\"table\":\"cvm_warden\"}}; something else changed table inet cvm_warden, do not start the workload"
    );
}

fn listing_of(ruleset: &Ruleset) -> Value {
    let mut fw = RecordingFirewall::new();
    fw.transaction(ruleset.json()).unwrap();
    serde_json::from_str(&fw.list_table().unwrap()).unwrap()
}

fn objects(listing: &mut Value) -> &mut Vec<Value> {
    listing["nftables"].as_array_mut().unwrap()
}

#[test]
fn verify_names_the_first_differing_rule() {
    let p = policy(&broker("https://198.51.100.7:8999"), "");
    let ruleset = build(&p, Phase::Perimeter, &NoLookups).unwrap();

    // A changed port in output rule 3.
    let mut listing = listing_of(&ruleset);
    let broker_rule = objects(&mut listing)
        .iter_mut()
        .find(|o| {
            o["rule"]["comment"]
                .as_str()
                .is_some_and(|c| c.starts_with("key broker"))
        })
        .unwrap();
    broker_rule["rule"]["expr"][1]["match"]["right"] = json!(9000);
    let err = verify(&ruleset, &listing.to_string())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("chain output, rule 3: expected `ip daddr 198.51.100.7 tcp dport 8999 ct direction original ct mark set 0x63766d77 accept comment \"key broker tcp 198.51.100.7:8999 (attestation.kbs)\"`, found {"),
        "{err}"
    );

    // The base rule without its mark match: established connections cvm-warden never
    // admitted would pass again.
    let mut listing = listing_of(&ruleset);
    let base = objects(&mut listing)
        .iter_mut()
        .find(|o| {
            o["rule"]["chain"] == "input"
                && o["rule"]["expr"][0]["match"]["left"]["ct"]["key"] == "state"
        })
        .unwrap();
    base["rule"]["expr"].as_array_mut().unwrap().remove(1);
    let err = verify(&ruleset, &listing.to_string())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("chain input, rule 2: expected `ct state established,related ct mark 0x63766d77 accept comment"),
        "{err}"
    );

    // The broker rule without its `ct mark set`, or setting another mark.
    for changed in [
        None,
        Some(json!({"mangle": {"key": {"ct": {"key": "mark"}}, "value": 1}})),
    ] {
        let mut listing = listing_of(&ruleset);
        let broker_rule = objects(&mut listing)
            .iter_mut()
            .find(|o| {
                o["rule"]["comment"]
                    .as_str()
                    .is_some_and(|c| c.starts_with("key broker"))
            })
            .unwrap();
        let expr = broker_rule["rule"]["expr"].as_array_mut().unwrap();
        let at = expr.iter().position(|e| e.get("mangle").is_some()).unwrap();
        match changed.clone() {
            None => {
                expr.remove(at);
            }
            Some(other) => expr[at] = other,
        }
        let err = verify(&ruleset, &listing.to_string())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("chain output, rule 3: expected `ip daddr 198.51.100.7 tcp dport 8999 ct direction original ct mark set 0x63766d77 accept"),
            "{err}"
        );
    }

    // A missing rule.
    let mut listing = listing_of(&ruleset);
    let list = objects(&mut listing);
    let last = list
        .iter()
        .rposition(|o| o["rule"]["chain"] == "output")
        .unwrap();
    list.remove(last);
    let err = verify(&ruleset, &listing.to_string())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("chain output, rule 4 is missing: `icmpv6 type {"),
        "{err}"
    );

    // A chain whose policy became accept.
    let mut listing = listing_of(&ruleset);
    let chain = objects(&mut listing)
        .iter_mut()
        .find(|o| o["chain"]["name"] == "forward")
        .unwrap();
    chain["chain"]["policy"] = json!("accept");
    let err = verify(&ruleset, &listing.to_string())
        .unwrap_err()
        .to_string();
    assert!(err.contains("chain 3: expected {\"chain\":{"), "{err}");
    assert!(err.contains("\"policy\":\"accept\""), "{err}");

    // Anything else in the table (a set someone added).
    let mut listing = listing_of(&ruleset);
    objects(&mut listing).push(
        json!({"set": {"family": "inet", "table": "cvm_warden", "name": "x", "type": "ipv4_addr"}}),
    );
    let err = verify(&ruleset, &listing.to_string())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("the table holds an unexpected set object"),
        "{err}"
    );

    // A listing that is not nft JSON.
    let err = verify(&ruleset, "Error: oops").unwrap_err();
    assert!(matches!(err, FirewallError::ReadBack { .. }), "{err}");
}

#[test]
fn verify_accepts_what_nft_changes_without_changing_meaning() {
    let p = policy(
        NONE,
        "[network]\noutbound = [{ host = \"2001:db8:0:0::10\", port = 8002 }]\n",
    );
    let ruleset = build(&p, Phase::Allowlist, &NoLookups).unwrap();
    let mut listing = listing_of(&ruleset);
    for object in objects(&mut listing).iter_mut() {
        if let Some(rule) = object.get_mut("rule") {
            for stmt in rule["expr"].as_array_mut().unwrap() {
                // nft sorts anonymous sets by value and spells addresses its own way.
                if let Some(set) = stmt
                    .pointer_mut("/match/right/set")
                    .and_then(Value::as_array_mut)
                {
                    set.reverse();
                }
                if stmt.pointer("/match/right") == Some(&json!("2001:db8::10")) {
                    stmt["match"]["right"] = json!("2001:0db8:0000::0010");
                }
            }
        }
        object.as_object_mut().unwrap().values_mut().next().unwrap()["handle"] = json!(77);
    }
    verify(&ruleset, &listing.to_string()).unwrap();
}

#[test]
fn a_failed_transaction_changes_nothing_and_names_nfts_error() {
    let p = policy(NONE, "");
    let perimeter = build(&p, Phase::Perimeter, &NoLookups).unwrap();
    let allowlist = build(
        &policy(NONE, "[network]\ninbound = [{ port = 1 }]\n"),
        Phase::Allowlist,
        &NoLookups,
    )
    .unwrap();
    let mut fw = RecordingFirewall::new();
    apply(&perimeter, &mut fw).unwrap();
    fw.fail_next = Some("Error: Could not process rule: Operation not permitted".to_string());
    let err = apply(&allowlist, &mut fw).unwrap_err();
    assert_eq!(
        err.to_string(),
        "`nft -j -f - (recording fake)` failed (exit status: 1): Error: Could not process rule: Operation not permitted; the table was left as it was (nft transactions are atomic); run as root with CAP_NET_ADMIN and a kernel with nf_tables"
    );
    verify(&perimeter, &fw.list_table().unwrap()).unwrap();
}

#[test]
fn the_commands_print_the_ruleset_and_the_summary() {
    let p = policy(&broker("https://kbs.example:8999"), "");
    let resolver = FakeResolver::new()
        .host("kbs.example", &[ip("198.51.100.7")])
        .nameservers(&[ip("192.0.2.53")]);
    let mut out = Vec::new();
    let ruleset =
        run_render_command(&p, Phase::Perimeter, RenderFormat::Nft, &resolver, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.contains("# pinned: kbs.example (attestation.kbs) -> 198.51.100.7\n"),
        "{text}"
    );
    assert!(text.ends_with(&ruleset.nft_text()));

    let mut out = Vec::new();
    run_render_command(
        &p,
        Phase::Perimeter,
        RenderFormat::Json,
        &resolver,
        &mut out,
    )
    .unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        format!("{}\n", ruleset.json_pretty())
    );
    assert_eq!(
        render(&p, Phase::Perimeter, &resolver).unwrap(),
        ruleset.json_pretty()
    );

    let mut fw = RecordingFirewall::new();
    let mut out = Vec::new();
    let applied = run_apply_command(&p, Phase::Perimeter, &resolver, &mut fw, &mut out).unwrap();
    let summary: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(
        summary,
        json!({"phase": "perimeter", "table": "inet cvm_warden", "digest": ruleset.digest().to_string(),
            "rules": ruleset.rule_count(),
            "pins": [{"host": "kbs.example", "keys": ["attestation.kbs"], "addresses": ["198.51.100.7"]}],
            "nameservers": ["192.0.2.53"]})
    );
    assert_eq!(applied.digest, ruleset.digest());
}

#[test]
fn phases_and_formats_parse() {
    assert_eq!("perimeter".parse::<Phase>(), Ok(Phase::Perimeter));
    assert_eq!("allowlist".parse::<Phase>(), Ok(Phase::Allowlist));
    assert_eq!(
        "open".parse::<Phase>(),
        Err("\"open\" is not a firewall phase; write perimeter or allowlist".to_string())
    );
    assert_eq!("json".parse::<RenderFormat>(), Ok(RenderFormat::Json));
    assert_eq!("nft".parse::<RenderFormat>(), Ok(RenderFormat::Nft));
    assert!("yaml".parse::<RenderFormat>().is_err());
}

#[test]
fn name_servers_come_from_resolv_conf_or_resolveds_upstream_list() {
    assert_eq!(
        parse_nameservers("# x\nsearch example\nnameserver 192.0.2.53\nnameserver fe80::1%eth0\nnameserver bogus\nnameserver 192.0.2.53\n"),
        vec![ip("192.0.2.53"), ip("fe80::1")]
    );
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("resolv.conf");
    let upstream = dir.path().join("upstream.conf");
    std::fs::write(&conf, "nameserver 10.255.255.53\n").unwrap();
    let resolver = SystemResolver::new(&conf, &upstream);
    assert_eq!(resolver.nameservers().unwrap(), vec![ip("10.255.255.53")]);
    // A local stub: its upstream servers are where DNS goes.
    std::fs::write(&conf, "nameserver 127.0.0.53\noptions edns0\n").unwrap();
    let err = resolver.nameservers().unwrap_err().to_string();
    assert!(
        err.contains("lists only local stub resolvers (127.0.0.53)"),
        "{err}"
    );
    std::fs::write(&upstream, "nameserver 192.0.2.1\nnameserver 2001:db8::1\n").unwrap();
    assert_eq!(
        resolver.nameservers().unwrap(),
        vec![ip("192.0.2.1"), ip("2001:db8::1")]
    );
    // Unreadable: the error names the file.
    let missing = SystemResolver::new(dir.path().join("nope"), &upstream);
    assert!(missing
        .nameservers()
        .unwrap_err()
        .to_string()
        .contains("nope"));
}

#[test]
fn the_system_resolver_resolves_literals_and_localhost() {
    let resolver = SystemResolver::default();
    assert_eq!(
        resolver.resolve("192.0.2.7").unwrap(),
        vec![ip("192.0.2.7")]
    );
    let local = resolver.resolve("localhost").unwrap();
    assert!(
        local.iter().all(IpAddr::is_loopback) && !local.is_empty(),
        "{local:?}"
    );
    assert!(resolver.resolve("name.invalid").is_err());
}

#[test]
fn dhcp_interfaces_admit_any_server_in_the_perimeter_and_only_the_lease_server_afterwards() {
    let p = policy(
        &broker("https://198.51.100.7:8999"),
        "[network]\n\n[network.interface.eth0]\ndhcp = true\n\n[network.interface.eth1]\naddress = \"10.1.0.5/24\"\n",
    );
    assert_eq!(dhcp_interfaces(&p), ["eth0"]);
    let perimeter = build(&p, Phase::Perimeter, &NoLookups).unwrap();
    assert_eq!(
        lines(&perimeter),
        expect(
            &["input: iifname \"eth0\" udp sport 67 udp dport 68 ct direction original ct mark set 0x63766d77 accept comment \"dhcp offers and acks from any server on eth0 (network.interface.eth0.dhcp)\""],
            &[
                "output: oifname \"eth0\" udp sport 68 udp dport 67 ct direction original ct mark set 0x63766d77 accept comment \"dhcp discover and request on eth0 (network.interface.eth0.dhcp)\"",
                "output: ip daddr 198.51.100.7 tcp dport 8999 ct direction original ct mark set 0x63766d77 accept comment \"key broker tcp 198.51.100.7:8999 (attestation.kbs)\"",
            ]
        )
    );

    // Without the lease's server the allowlist cannot be planned.
    let mut resolution = Resolution::resolve(&p, &[Phase::Allowlist], &NoLookups).unwrap();
    let error = plan(&p, Phase::Allowlist, &resolution).unwrap_err();
    assert!(matches!(&error, FirewallError::NoDhcpLease { interface } if interface == "eth0"));
    assert!(error
        .to_string()
        .starts_with("network.interface.eth0.dhcp: no DHCP lease was pinned for eth0"));

    // Pinned (a second pin for the same interface replaces the first).
    resolution.pin_dhcp("eth0", "10.0.2.9".parse().unwrap());
    resolution.pin_dhcp("eth0", "10.0.2.2".parse().unwrap());
    assert_eq!(resolution.dhcp.len(), 1);
    let allowlist = plan(&p, Phase::Allowlist, &resolution).unwrap();
    assert_eq!(
        lines(&allowlist),
        expect(
            &["input: iifname \"eth0\" ip saddr 10.0.2.2 udp sport 67 udp dport 68 ct direction original ct mark set 0x63766d77 accept comment \"dhcp answers from the lease's server 10.0.2.2 on eth0 (network.interface.eth0.dhcp)\""],
            &[
                "output: oifname \"eth0\" ip daddr 10.0.2.2 udp sport 68 udp dport 67 ct direction original ct mark set 0x63766d77 accept comment \"dhcp renewals to the lease's server 10.0.2.2 on eth0 (network.interface.eth0.dhcp)\"",
                // Re-attestation is on by default: the broker stays reachable.
                "output: ip daddr 198.51.100.7 tcp dport 8999 ct direction original ct mark set 0x63766d77 accept comment \"key broker (re-attestation) tcp 198.51.100.7:8999 (attestation.kbs)\"",
            ]
        )
    );
    // The JSON form carries the source port match.
    assert!(allowlist.json().contains(r#"{"match":{"left":{"payload":{"protocol":"udp","field":"sport"}},"right":67,"op":"=="}}"#), "{}", allowlist.json());
    // A resolution without DHCP pins serialises as before.
    let json = serde_json::to_value(Resolution::default()).unwrap();
    assert_eq!(json, json!({"pins": [], "nameservers": []}));
}

#[test]
fn allowlist_admits_the_broker_while_reattestation_is_on_unless_the_workload_lists_it() {
    let rule = "output: ip daddr 198.51.100.7 tcp dport 8999 ct direction original ct mark set 0x63766d77 accept comment \"key broker (re-attestation) tcp 198.51.100.7:8999 (attestation.kbs)\"";
    // The default interval (10 minutes): the broker stays reachable.
    let on = policy(&broker("https://198.51.100.7:8999"), "");
    let ruleset = build(&on, Phase::Allowlist, &NoLookups).unwrap();
    assert_eq!(lines(&ruleset), expect(&[], &[rule]));
    // Off: not in the allowlist.
    let off = policy(
        &format!(
            "{}\nreattest_interval = \"0\"",
            broker("https://198.51.100.7:8999")
        ),
        "",
    );
    let ruleset = build(&off, Phase::Allowlist, &NoLookups).unwrap();
    assert_eq!(lines(&ruleset), expect(&[], &[]));
    // The workload's own entry for the broker already admits it: no second rule.
    let listed = policy(
        &broker("https://198.51.100.7:8999"),
        "[network]\noutbound = [{ host = \"198.51.100.7\", port = 8999 }]\n",
    );
    let text = lines(&build(&listed, Phase::Allowlist, &NoLookups).unwrap()).join("\n");
    assert!(!text.contains("(attestation.kbs)"), "{text}");
    assert!(text.contains("(network.outbound[0])"), "{text}");
}
