//! cvm-warden's nftables perimeter and allowlists, with real packets between network namespaces.
//!
//! Each test builds its own three namespaces ([`netns::Net`]): `vm` gets the ruleset through
//! `cvm-warden firewall apply` run inside it; `peer` plays the key broker and the NVIDIA FLARE
//! server or client; `other` is an unrelated host the VM can route to. Every probe is first
//! shown to succeed with no ruleset, so a probe that later times out proves a drop, not a
//! broken harness. Needs root; fails with a message when not root.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "common/netns.rs"]
mod netns;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use netns::{echo, IcmpError, Net, Probe, Side};

const TEST: &str = "firewall_netns";
const BROKER_PORT: u16 = 8999;

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

fn answered(side: Side, to: SocketAddr) -> Probe {
    Probe::Answered(Net::answer_of(side, to))
}

/// Runs every probe and compares all results at once, so a failure shows the whole picture.
fn expect(net: &Net, when: &str, probes: &[(Side, SocketAddr, Probe)]) {
    let results = net.probe_all(&probes.iter().map(|p| (p.0, p.1)).collect::<Vec<_>>());
    let wrong: Vec<String> = probes
        .iter()
        .zip(&results)
        .filter(|((_, _, want), got)| want != *got)
        .map(|((from, to, want), got)| format!("{from:?} -> {to}: expected {want:?}, got {got:?}"))
        .collect();
    assert!(wrong.is_empty(), "{when}:\n{}", wrong.join("\n"));
}

// ---- the rulesets under test ----

/// The examples' documentation addresses (rules/flare-client.policy.toml) that the tests
/// replace with the peer's addresses: the key broker (`peer4_alt`) and the FL server (`peer4`).
const DOC_BROKER: &str = "198.51.100.7";
const DOC_SERVER: &str = "192.0.2.10";

/// Which example of rules/.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Example {
    /// rules/flare-client.policy.toml: a key broker (perimeter and allowlist) and an FL
    /// server (allowlist).
    Client,
    /// rules/flare-server.policy.toml: inbound 8002 and 8003, no broker.
    Server,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Perimeter,
    Allowlist,
}

fn rules_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("rules")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// `text` with the documentation addresses of the broker and the FL server replaced by the
/// peer's two addresses; fails if the client example stops naming either (the test would
/// silently test something else).
fn at_peer(net: &Net, text: &str, example: Example) -> String {
    if example == Example::Server {
        return text.to_owned();
    }
    for doc in [DOC_BROKER, DOC_SERVER] {
        assert!(
            text.contains(doc),
            "the flare-client example no longer mentions {doc}; update DOC_BROKER/DOC_SERVER \
             in tests/{TEST}.rs:\n{text}"
        );
    }
    text.replace(DOC_BROKER, &net.peer4_alt().to_string())
        .replace(DOC_SERVER, &net.peer4().to_string())
}

/// The example's policy text, addressed to the peer.
fn example_policy(net: &Net, example: Example) -> String {
    let name = match example {
        Example::Client => "flare-client.policy.toml",
        Example::Server => "flare-server.policy.toml",
    };
    at_peer(net, &read(&rules_dir().join(name)), example)
}

/// `cvm-warden firewall apply --policy <example> --phase <phase>` in `side`'s namespace.
fn apply(net: &Net, side: Side, example: Example, phase: Phase) {
    apply_policy(net, side, &example_policy(net, example), phase);
}

/// `cvm-warden firewall apply --policy <file with policy> --phase <phase>` in `side`'s
/// namespace; checks its summary against what the namespace then holds.
fn apply_policy(net: &Net, side: Side, policy: &str, phase: Phase) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    std::fs::write(&path, policy).unwrap();
    let phase = match phase {
        Phase::Perimeter => "perimeter",
        Phase::Allowlist => "allowlist",
    };
    let summary = net.ok(
        side,
        &[
            env!("CARGO_BIN_EXE_cvm-warden"),
            "firewall",
            "apply",
            "--policy",
            path.to_str().unwrap(),
            "--phase",
            phase,
        ],
    );
    let summary: serde_json::Value = serde_json::from_str(summary.trim()).unwrap_or_else(|e| {
        panic!("cvm-warden firewall apply printed no JSON summary ({e}): {summary}")
    });
    assert_eq!(summary["phase"], phase, "{summary}");
    assert_eq!(summary["table"], "inet cvm_warden", "{summary}");
    let listed_rules = net.nft_table_json(side)["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o.get("rule").is_some())
        .count();
    assert_eq!(
        summary["rules"].as_u64(),
        Some(listed_rules as u64),
        "cvm-warden's summary and `nft list table` disagree on the number of rules: {summary}"
    );
}

#[test]
fn perimeter_drops_inbound_keeps_loopback_and_lets_out_only_the_broker() {
    netns::require_root(TEST);
    let net = Net::new();
    let (vm4, vm6, vm_o4) = (net.vm4(), net.vm6(), net.vm_other4());
    for port in [22, 8002, BROKER_PORT] {
        net.listen(Side::Vm, sa(Ipv6Addr::UNSPECIFIED, port)); // dual-stack: v4 and v6
    }
    let (lo4, lo6) = (sa(Ipv4Addr::LOCALHOST, 5000), sa(Ipv6Addr::LOCALHOST, 5000));
    net.listen(Side::Vm, lo4);
    net.listen(Side::Vm, lo6);
    let broker = sa(net.peer4_alt(), BROKER_PORT);
    // Denied: another port of the broker's address, the broker's port on the peer's other
    // addresses (v4 and v6), the FL server (allowlist only), the unrelated host.
    let peer_denied = [
        sa(net.peer4_alt(), 8998),
        sa(net.peer4(), BROKER_PORT),
        sa(net.peer6(), BROKER_PORT),
        sa(net.peer4(), 8002),
    ];
    let other = sa(net.other4(), BROKER_PORT);
    net.listen(Side::Peer, broker);
    for addr in peer_denied {
        net.listen(Side::Peer, addr);
    }
    net.listen(Side::Other, other);
    let any = |port| sa(Ipv6Addr::UNSPECIFIED, port);

    let inbound: Vec<(Side, SocketAddr, SocketAddr)> = vec![
        (Side::Peer, sa(vm4, 22), any(22)),
        (Side::Peer, sa(vm4, 8002), any(8002)),
        (Side::Peer, sa(vm4, BROKER_PORT), any(BROKER_PORT)),
        (Side::Peer, sa(vm6, 22), any(22)),
        (Side::Peer, sa(vm6, 8002), any(8002)),
        (Side::Other, sa(vm_o4, 22), any(22)),
    ];
    let outbound_denied: Vec<SocketAddr> = peer_denied.into_iter().chain([other]).collect();
    let mut baseline: Vec<(Side, SocketAddr, Side)> = Vec::new();
    for (from, to, _) in &inbound {
        baseline.push((*from, *to, Side::Vm));
    }
    baseline.push((Side::Vm, lo4, Side::Vm));
    baseline.push((Side::Vm, lo6, Side::Vm));
    baseline.push((Side::Vm, broker, Side::Peer));
    for to in peer_denied {
        baseline.push((Side::Vm, to, Side::Peer));
    }
    baseline.push((Side::Vm, other, Side::Other));
    // The listener answers with the address it bound, not the one dialled.
    let baseline_want: Vec<_> = baseline
        .iter()
        .map(|&(from, to, side)| {
            let bound = inbound.iter().find(|i| i.1 == to).map_or(to, |i| i.2);
            (from, to, answered(side, bound))
        })
        .collect();
    expect(
        &net,
        "with no ruleset every probe must answer (harness check)",
        &baseline_want,
    );
    let accepted_before: Vec<usize> = [22, 8002, BROKER_PORT]
        .iter()
        .map(|&p| net.accepted(Side::Vm, any(p)))
        .collect();

    apply(&net, Side::Vm, Example::Client, Phase::Perimeter);

    let mut want: Vec<(Side, SocketAddr, Probe)> = inbound
        .iter()
        .map(|&(from, to, _)| (from, to, Probe::TimedOut))
        .collect();
    want.push((Side::Vm, lo4, answered(Side::Vm, lo4)));
    want.push((Side::Vm, lo6, answered(Side::Vm, lo6)));
    want.push((Side::Vm, broker, answered(Side::Peer, broker)));
    for to in outbound_denied {
        want.push((Side::Vm, to, Probe::TimedOut));
    }
    expect(&net, "under the perimeter", &want);
    let accepted_after: Vec<usize> = [22, 8002, BROKER_PORT]
        .iter()
        .map(|&p| net.accepted(Side::Vm, any(p)))
        .collect();
    assert_eq!(
        accepted_before, accepted_after,
        "a listener on vm accepted a connection under the perimeter"
    );
}

/// What rules/perimeter.nft says about ICMP: no echo rule, so echo requests are dropped; path
/// MTU errors (ICMP frag-needed, ICMPv6 packet-too-big) are accepted by explicit rules even
/// when conntrack does not relate them to a connection; other ICMP errors only when related.
#[test]
fn perimeter_drops_echo_requests_and_accepts_path_mtu_errors() {
    netns::require_root(TEST);
    let net = Net::new();
    let broker = sa(net.peer4_alt(), BROKER_PORT);
    net.listen(Side::Peer, broker);
    let pmtu = IcmpError::PathMtu(1280);
    // Harness check: with no ruleset, echo is answered and every crafted error arrives.
    assert!(
        net.ping(Side::Peer, net.vm4().into()),
        "harness check: no IPv4 echo reply from vm with no ruleset"
    );
    assert!(
        net.ping(Side::Peer, net.vm6().into()),
        "harness check: no IPv6 echo reply from vm with no ruleset"
    );
    let (stray4, stray6) = (sa(net.vm4(), 40000), sa(net.vm6(), 40000));
    let (peer4_port, peer6_port) = (sa(net.peer4(), 9), sa(net.peer6(), 9));
    for error in [pmtu, IcmpError::PortUnreachable] {
        for (src, dst) in [(stray4, peer4_port), (stray6, peer6_port)] {
            assert!(
                net.icmp_error_arrives(Side::Peer, Side::Vm, error, src, dst),
                "harness check: a crafted {error:?} about {src} -> {dst} did not reach vm with no ruleset"
            );
        }
    }

    apply(&net, Side::Vm, Example::Client, Phase::Perimeter);

    assert!(
        !net.ping(Side::Peer, net.vm4().into()),
        "vm answered an IPv4 echo request under the perimeter"
    );
    assert!(
        !net.ping(Side::Peer, net.vm6().into()),
        "vm answered an IPv6 echo request under the perimeter"
    );
    let held = net.connect_held(Side::Vm, broker);
    let quoted = held.local_addr().unwrap();
    assert!(
        net.icmp_error_arrives(Side::Peer, Side::Vm, pmtu, quoted, broker),
        "an ICMP frag-needed about vm's connection to the broker was dropped under the perimeter: \
         path-MTU discovery to the broker would break"
    );
    assert!(
        net.icmp_error_arrives(
            Side::Peer,
            Side::Vm,
            IcmpError::PortUnreachable,
            quoted,
            broker
        ),
        "an ICMP port-unreachable about vm's connection to the broker was dropped under the \
         perimeter (ct state related)"
    );
    for (src, dst) in [(stray4, peer4_port), (stray6, peer6_port)] {
        assert!(
            net.icmp_error_arrives(Side::Peer, Side::Vm, pmtu, src, dst),
            "a path-MTU error quoting no tracked connection ({src} -> {dst}) was dropped; the \
             perimeter's explicit PMTU rules should accept it"
        );
        assert!(
            !net.icmp_error_arrives(Side::Peer, Side::Vm, IcmpError::PortUnreachable, src, dst),
            "an ICMP port-unreachable quoting no tracked connection ({src} -> {dst}) got in under \
             the perimeter"
        );
    }
}

#[test]
fn flare_server_allowlist_accepts_8002_and_8003_only() {
    netns::require_root(TEST);
    let net = Net::new();
    let any = |port| sa(Ipv6Addr::UNSPECIFIED, port);
    for port in [22, 8002, 8003, 8004] {
        net.listen(Side::Vm, any(port)); // dual-stack
    }
    let other = sa(net.other4(), 8002);
    let (broker, peer_8002) = (sa(net.peer4_alt(), BROKER_PORT), sa(net.peer4(), 8002));
    net.listen(Side::Other, other);
    net.listen(Side::Peer, broker);
    net.listen(Side::Peer, peer_8002);
    let inbound = |port: u16| {
        [
            (Side::Peer, sa(net.vm4(), port)),
            (Side::Peer, sa(net.vm6(), port)),
            (Side::Other, sa(net.vm_other4(), port)),
        ]
    };
    let baseline: Vec<(Side, SocketAddr, Probe)> = [22, 8002, 8003, 8004]
        .into_iter()
        .flat_map(|port| inbound(port).map(|(from, to)| (from, to, answered(Side::Vm, any(port)))))
        .chain([
            (Side::Vm, other, answered(Side::Other, other)),
            (Side::Vm, broker, answered(Side::Peer, broker)),
            (Side::Vm, peer_8002, answered(Side::Peer, peer_8002)),
        ])
        .collect();
    expect(
        &net,
        "with no ruleset every probe must answer (harness check)",
        &baseline,
    );

    apply(&net, Side::Vm, Example::Server, Phase::Allowlist);

    let mut want: Vec<(Side, SocketAddr, Probe)> = Vec::new();
    for port in [8002, 8003] {
        want.extend(inbound(port).map(|(from, to)| (from, to, answered(Side::Vm, any(port)))));
    }
    for port in [22, 8004] {
        want.extend(inbound(port).map(|(from, to)| (from, to, Probe::TimedOut)));
    }
    for to in [other, broker, peer_8002] {
        want.push((Side::Vm, to, Probe::TimedOut));
    }
    expect(&net, "under the flare-server allowlist", &want);

    // Path MTU over IPv6: a packet-too-big about vm's answers on an accepted connection gets in.
    let held = net.connect_held(Side::Peer, sa(net.vm6(), 8002));
    let (client, server) = (held.local_addr().unwrap(), held.peer_addr().unwrap());
    assert!(
        net.icmp_error_arrives(
            Side::Peer,
            Side::Vm,
            IcmpError::PathMtu(1280),
            server,
            client
        ),
        "an ICMPv6 packet-too-big about a connection to port 8002 was dropped by the flare-server \
         allowlist: path-MTU discovery over IPv6 would break"
    );
}

/// rules/flare-client.policy.toml's allowlist: out to the FL server's port and the key
/// broker's port, each only at its own address; nothing in.
#[test]
fn flare_client_allowlist_reaches_only_the_fl_server_and_the_broker() {
    netns::require_root(TEST);
    let net = Net::new();
    let any = |port| sa(Ipv6Addr::UNSPECIFIED, port);
    let (server, broker) = (sa(net.peer4(), 8002), sa(net.peer4_alt(), BROKER_PORT));
    let peer_denied = [
        sa(net.peer4(), 8003),
        sa(net.peer4(), BROKER_PORT), // the broker's port at the server's address
        sa(net.peer4_alt(), 8002),    // the server's port at the broker's address
        sa(net.peer6(), 8002),
    ];
    let other = sa(net.other4(), 8002);
    for addr in peer_denied.into_iter().chain([server, broker]) {
        net.listen(Side::Peer, addr);
    }
    net.listen(Side::Other, other);
    for port in [22, 8002] {
        net.listen(Side::Vm, any(port));
    }
    let inbound: Vec<(Side, SocketAddr, u16)> = vec![
        (Side::Peer, sa(net.vm4(), 22), 22),
        (Side::Peer, sa(net.vm4(), 8002), 8002),
        (Side::Peer, sa(net.vm6(), 8002), 8002),
        (Side::Other, sa(net.vm_other4(), 8002), 8002),
    ];
    let mut baseline: Vec<(Side, SocketAddr, Probe)> = inbound
        .iter()
        .map(|&(from, to, port)| (from, to, answered(Side::Vm, any(port))))
        .collect();
    for to in peer_denied.into_iter().chain([server, broker]) {
        baseline.push((Side::Vm, to, answered(Side::Peer, to)));
    }
    baseline.push((Side::Vm, other, answered(Side::Other, other)));
    expect(
        &net,
        "with no ruleset every probe must answer (harness check)",
        &baseline,
    );

    apply(&net, Side::Vm, Example::Client, Phase::Allowlist);

    let mut want: Vec<(Side, SocketAddr, Probe)> = inbound
        .iter()
        .map(|&(from, to, _)| (from, to, Probe::TimedOut))
        .collect();
    want.push((Side::Vm, server, answered(Side::Peer, server)));
    want.push((Side::Vm, broker, answered(Side::Peer, broker)));
    for to in peer_denied.into_iter().chain([other]) {
        want.push((Side::Vm, to, Probe::TimedOut));
    }
    expect(&net, "under the flare-client allowlist", &want);
}

/// Perimeter, then a rule and a chain slipped into the table by someone else, then the
/// allowlist: afterwards the table is exactly the allowlist (as in a namespace that only ever
/// had the allowlist), and packets agree: the slipped-in rule is gone and the allowlist's
/// FL server rule is in force.
#[test]
fn allowlist_replaces_the_perimeter_and_anything_added_to_its_table() {
    netns::require_root(TEST);
    let net = Net::new();
    let (broker, server) = (sa(net.peer4_alt(), BROKER_PORT), sa(net.peer4(), 8002));
    let ssh = sa(Ipv6Addr::UNSPECIFIED, 22);
    net.listen(Side::Peer, broker);
    net.listen(Side::Peer, server);
    net.listen(Side::Vm, ssh);
    let vm_ssh = sa(net.vm4(), 22);

    apply(&net, Side::Vm, Example::Client, Phase::Perimeter);
    let perimeter = net.nft_table_json(Side::Vm);
    // A rule that admits connections the way cvm-warden's own do (marking them, so the base
    // rule lets the answers out).
    net.ok(
        Side::Vm,
        &[
            "nft",
            "add",
            "rule",
            "inet",
            "cvm_warden",
            "input",
            "tcp",
            "dport",
            "22",
            "ct",
            "mark",
            "set",
            "0x63766d77",
            "accept",
        ],
    );
    net.ok(
        Side::Vm,
        &["nft", "add", "chain", "inet", "cvm_warden", "stray"],
    );
    expect(
        &net,
        "under the perimeter with a slipped-in rule for port 22",
        &[
            (Side::Peer, vm_ssh, answered(Side::Vm, ssh)),
            (Side::Vm, broker, answered(Side::Peer, broker)),
            (Side::Vm, server, Probe::TimedOut),
        ],
    );

    apply(&net, Side::Vm, Example::Client, Phase::Allowlist);
    let replaced = net.nft_table_json(Side::Vm);
    apply(&net, Side::Other, Example::Client, Phase::Allowlist);
    let alone = net.nft_table_json(Side::Other);
    assert_ne!(
        perimeter, alone,
        "the perimeter and the allowlist must differ for this test to mean anything"
    );
    assert_eq!(
        replaced, alone,
        "after perimeter then allowlist, vm's table inet cvm_warden is not the allowlist alone"
    );
    let tables: Vec<_> = net.nft_ruleset_json(Side::Vm)["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o.get("table"))
        .cloned()
        .collect();
    assert_eq!(
        tables,
        vec![serde_json::json!({"family": "inet", "name": "cvm_warden"})],
        "vm should hold one table, inet cvm_warden"
    );
    expect(
        &net,
        "under the allowlist that replaced the perimeter",
        &[
            (Side::Peer, vm_ssh, Probe::TimedOut),
            (Side::Vm, broker, answered(Side::Peer, broker)),
            (Side::Vm, server, answered(Side::Peer, server)),
        ],
    );
}

/// The flare-server example with port 8002 restricted to the peer's networks (`from`, one
/// IPv4 and one IPv6 CIDR): the peer gets in on 8002 over both families, the other host only
/// on the unrestricted 8003.
#[test]
fn inbound_from_cidrs_admit_only_those_sources() {
    netns::require_root(TEST);
    let net = Net::new();
    let any = |port| sa(Ipv6Addr::UNSPECIFIED, port);
    for port in [8002, 8003] {
        net.listen(Side::Vm, any(port));
    }
    let example = example_policy(&net, Example::Server);
    let line = "inbound = [{ port = 8002 }, { port = 8003 }]";
    assert!(
        example.contains(line),
        "rules/flare-server.policy.toml no longer has `{line}`; update tests/{TEST}.rs"
    );
    let peer_net4 = format!("{}/24", Ipv4Addr::from(u32::from(net.peer4()) & !0xff));
    let peer_net6 = format!(
        "{}/64",
        Ipv6Addr::from(u128::from(net.peer6()) & !0xffff_ffff_ffff_ffff)
    );
    let policy = example.replace(
        line,
        &format!("inbound = [{{ port = 8002, from = [\"{peer_net4}\", \"{peer_net6}\"] }}, {{ port = 8003 }}]"),
    );
    let probes = [
        (Side::Peer, sa(net.vm4(), 8002), 8002, true),
        (Side::Peer, sa(net.vm6(), 8002), 8002, true),
        (Side::Other, sa(net.vm_other4(), 8002), 8002, false),
        (Side::Other, sa(net.vm_other6(), 8002), 8002, false),
        (Side::Other, sa(net.vm_other4(), 8003), 8003, true),
        (Side::Other, sa(net.vm_other6(), 8003), 8003, true),
    ];
    let baseline: Vec<_> = probes
        .iter()
        .map(|&(from, to, port, _)| (from, to, answered(Side::Vm, any(port))))
        .collect();
    expect(
        &net,
        "with no ruleset every probe must answer (harness check)",
        &baseline,
    );

    apply_policy(&net, Side::Vm, &policy, Phase::Allowlist);

    let want: Vec<_> = probes
        .iter()
        .map(|&(from, to, port, allowed)| {
            (
                from,
                to,
                if allowed {
                    answered(Side::Vm, any(port))
                } else {
                    Probe::TimedOut
                },
            )
        })
        .collect();
    expect(
        &net,
        &format!("under an allowlist with 8002 from {peer_net4}, {peer_net6}"),
        &want,
    );
}

/// Conntrack is never flushed, so connections made before the perimeter (the service starts
/// after network-online.target) are still tracked as established when it goes up. Only
/// connections carrying cvm-warden's conntrack mark pass as established: a session from the
/// peer into vm (think SSH), opened before the perimeter, is cut off, while a connection the
/// perimeter's rules admit (vm to the key broker) works, and so does one made before the
/// perimeter that the broker rule admits in its own direction (it is marked then, as a new
/// one would be).
#[test]
fn connections_made_before_the_perimeter_pass_only_if_its_rules_admit_them() {
    netns::require_root(TEST);
    let net = Net::new();
    let ssh = sa(Ipv6Addr::UNSPECIFIED, 22); // dual-stack
    let broker = sa(net.peer4_alt(), BROKER_PORT);
    net.listen(Side::Vm, ssh);
    net.listen(Side::Peer, broker);

    // Conntrack tracks a namespace's connections only once some ruleset there uses it; in a
    // VM something usually does (a distribution firewall, Docker). Emulate that, so the
    // connections below are tracked as established before the perimeter goes up.
    net.nft_load(
        Side::Vm,
        "table inet distro {\n\tchain input {\n\t\ttype filter hook input priority -10; policy accept;\n\t\tct state established counter\n\t}\n}\n",
    );

    // Before the perimeter: sessions into vm over IPv4 and IPv6, and one from vm to the broker.
    let into_vm: Vec<_> = [sa(net.vm4(), 22), sa(net.vm6(), 22)]
        .into_iter()
        .map(|to| (to, net.connect_held(Side::Peer, to)))
        .collect();
    let to_broker = net.connect_held(Side::Vm, broker);
    for (to, held) in &into_vm {
        assert_eq!(
            echo(held, "before"),
            Some("before".to_owned()),
            "harness check: the session from peer to {to} does not echo with no ruleset"
        );
    }
    assert_eq!(
        echo(&to_broker, "before"),
        Some("before".to_owned()),
        "harness check: the connection from vm to the broker does not echo with no ruleset"
    );

    apply(&net, Side::Vm, Example::Client, Phase::Perimeter);

    for (to, held) in &into_vm {
        assert_eq!(
            echo(held, "after"),
            None,
            "data on a session from peer to {to} opened before the perimeter still gets through \
             under it (ct state established accepted without cvm-warden's mark)"
        );
    }
    assert_eq!(
        echo(&to_broker, "after"),
        Some("after".to_owned()),
        "vm's connection to the broker, opened before the perimeter, is admitted by the broker \
         rule in its own direction and must keep working"
    );
    // A new connection the rules admit carries data; a new one into vm is dropped.
    let fresh = net.connect_held(Side::Vm, broker);
    assert_eq!(
        echo(&fresh, "fresh"),
        Some("fresh".to_owned()),
        "a connection to the broker opened under the perimeter does not carry data"
    );
    expect(
        &net,
        "under the perimeter, after the old sessions were cut off",
        &[
            (Side::Peer, sa(net.vm4(), 22), Probe::TimedOut),
            (Side::Vm, broker, answered(Side::Peer, broker)),
        ],
    );
    // In vm's conntrack table the broker connections carry the mark, the old sessions do not.
    let mark = format!("mark={}", cvm_warden::firewall::CT_MARK);
    let table = net.ok(Side::Vm, &["cat", "/proc/net/nf_conntrack"]);
    let entries = |port: u16| -> Vec<&str> {
        table
            .lines()
            .filter(|l| l.contains(" tcp ") && l.contains(&format!(" dport={port} ")))
            .collect()
    };
    let (to_broker_entries, into_vm_entries) = (entries(BROKER_PORT), entries(22));
    assert!(
        to_broker_entries.len() >= 2 && to_broker_entries.iter().all(|l| l.contains(&mark)),
        "vm's connections to the broker should carry {mark}:\n{table}"
    );
    assert!(
        into_vm_entries.len() >= 2 && into_vm_entries.iter().all(|l| l.contains(" mark=0 ")),
        "the sessions into vm opened before the perimeter should carry mark=0:\n{table}"
    );
}
