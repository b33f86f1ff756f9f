#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::Duration;

use super::*;
use crate::policy::{Interface, Network};

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn iface(name: &str, addressing: Addressing, dns: &[&str]) -> IfacePlan {
    IfacePlan {
        name: name.to_string(),
        addressing,
        dns: dns.iter().map(|s| s.parse().unwrap()).collect(),
        link_timeout: Duration::from_secs(10),
    }
}

fn static_eth0() -> Addressing {
    Addressing::Static {
        address: ip("10.0.2.15"),
        prefix: 24,
        gateway: Some(ip("10.0.2.2")),
    }
}

fn dhcp_server() -> FakeDhcpServer {
    FakeDhcpServer {
        server: ip("10.0.2.2"),
        address: ip("10.0.2.15"),
        mask: ip("255.255.255.0"),
        router: Some(ip("10.0.2.2")),
        dns: vec![ip("10.0.2.3")],
        ignore_first: 0,
        nak: false,
        noise: Vec::new(),
    }
}

const RESOLV: &str = "/run/test/resolv.conf";

#[test]
fn plan_configures_in_pid1_and_leaves_interfaces_to_systemd() {
    let mut policy = crate::policy::parse(
        "attestation = \"none\"\n[workload]\nbundle = \"/opt/w\"\nsource = \"initramfs\"\nexec = [\"/opt/w/run\"]\nuser = 1000\ngroup = 1000\n\n[network.interface.eth0]\ndhcp = true\nlink_timeout = \"3s\"\n",
        None,
        &crate::policy::MemoryUsers::new(),
    )
    .unwrap()
    .policy;
    let pid1 = plan(&policy, Shape::Pid1);
    assert_eq!(
        pid1,
        NetPlan::Configure {
            interfaces: vec![IfacePlan {
                name: "eth0".to_string(),
                addressing: Addressing::Dhcp,
                dns: vec![],
                link_timeout: Duration::from_secs(3),
            }]
        }
    );
    assert_eq!(pid1.dhcp_interfaces(), ["eth0"]);
    let unit = plan(&policy, Shape::Systemd);
    assert_eq!(
        unit,
        NetPlan::LeftToTheOs {
            interfaces: vec!["eth0".to_string()]
        }
    );
    assert!(unit.dhcp_interfaces().is_empty());
    let json = serde_json::to_value(&unit).unwrap();
    assert_eq!(json["action"], "left-to-the-os");
    // Without [network]: loopback only in PID 1.
    policy.network = None;
    assert_eq!(
        plan(&policy, Shape::Pid1),
        NetPlan::Configure { interfaces: vec![] }
    );
    let _ = Network {
        inbound: vec![],
        outbound: vec![],
        interfaces: Vec::<Interface>::new(),
    };
}

#[test]
fn loopback_comes_up_even_with_no_interface() {
    let sys = FakeNetSys::new();
    let report = apply(
        &NetPlan::Configure { interfaces: vec![] },
        &sys,
        Path::new(RESOLV),
    )
    .unwrap();
    assert!(report.loopback && report.configured);
    assert_eq!(
        sys.calls(),
        [
            NetCall::SetUp(1),
            NetCall::AddAddress(1, Ipv4Addr::LOCALHOST, 8)
        ]
    );
    assert_eq!(report.resolv_conf, None);
}

#[test]
fn systemd_touches_nothing() {
    let sys = FakeNetSys::new().failing("must not be called");
    let report = apply(
        &NetPlan::LeftToTheOs {
            interfaces: vec!["eth0".into()],
        },
        &sys,
        Path::new(RESOLV),
    )
    .unwrap();
    assert!(!report.configured && !report.loopback);
    assert!(sys.calls().is_empty());
}

#[test]
fn a_static_interface_gets_its_address_route_and_name_servers() {
    let sys = FakeNetSys::new().with_link(
        "eth0",
        FakeLink {
            carrier_after: Some(Duration::from_millis(350)),
            ..FakeLink::ethernet(2)
        },
    );
    let plan = NetPlan::Configure {
        interfaces: vec![iface("eth0", static_eth0(), &["10.0.2.3", "fd00::53"])],
    };
    let report = apply(&plan, &sys, Path::new(RESOLV)).unwrap();
    assert_eq!(
        sys.calls(),
        [
            NetCall::SetUp(1),
            NetCall::AddAddress(1, Ipv4Addr::LOCALHOST, 8),
            NetCall::SetUp(2),
            NetCall::AddAddress(2, ip("10.0.2.15"), 24),
            NetCall::AddDefaultRoute(2, ip("10.0.2.2")),
            NetCall::WriteFile(
                RESOLV.into(),
                "# written by cvm-warden from the policy and DHCP leases\nnameserver 10.0.2.3\nnameserver fd00::53\n".to_string()
            ),
        ]
    );
    let eth0 = &report.interfaces[0];
    assert_eq!((eth0.index, eth0.source, eth0.prefix), (2, "static", 24));
    // Carrier after 350 ms, polled every 100 ms.
    assert_eq!(eth0.link_wait_ms, 400);
    assert!(report.dhcp_servers().is_empty());
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["interfaces"][0]["address"], "10.0.2.15");
    assert_eq!(json["resolv_conf"]["nameservers"][1], "fd00::53");
}

#[test]
fn an_interface_that_never_appears_fails_closed_within_its_bound() {
    let sys = FakeNetSys::new();
    let plan = NetPlan::Configure {
        interfaces: vec![IfacePlan {
            link_timeout: Duration::from_secs(2),
            ..iface("eth0", static_eth0(), &[])
        }],
    };
    let error = apply(&plan, &sys, Path::new(RESOLV)).unwrap_err();
    assert_eq!(
        error.to_string(),
        "interface eth0: no link within 2s (network.interface.eth0.link_timeout); last seen: not present; check the VM's network device and its driver module, or raise link_timeout"
    );
    assert_eq!(sys.elapsed(), Duration::from_secs(2));
    assert!(!sys
        .calls()
        .iter()
        .any(|c| matches!(c, NetCall::AddAddress(2, ..))));
}

#[test]
fn an_interface_without_carrier_names_what_was_seen() {
    let sys = FakeNetSys::new().with_link(
        "eth0",
        FakeLink {
            carrier_after: None,
            ..FakeLink::ethernet(3)
        },
    );
    let plan = NetPlan::Configure {
        interfaces: vec![iface("eth0", static_eth0(), &[])],
    };
    let error = apply(&plan, &sys, Path::new(RESOLV)).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("no link within 10s (network.interface.eth0.link_timeout); last seen: present (index 3), up, no carrier, operstate down"),
        "{error}"
    );
}

#[test]
fn a_late_interface_is_waited_for() {
    let sys = FakeNetSys::new().with_link(
        "eth0",
        FakeLink {
            appears_after: Duration::from_secs(3),
            ..FakeLink::ethernet(2)
        },
    );
    let plan = NetPlan::Configure {
        interfaces: vec![iface("eth0", static_eth0(), &[])],
    };
    let report = apply(&plan, &sys, Path::new(RESOLV)).unwrap();
    assert_eq!(report.interfaces[0].link_wait_ms, 3000);
}

#[test]
fn netlink_failures_name_the_interface_and_the_step() {
    let sys = FakeNetSys::new().failing("Operation not permitted");
    let error = apply(
        &NetPlan::Configure { interfaces: vec![] },
        &sys,
        Path::new(RESOLV),
    )
    .unwrap_err();
    assert_eq!(
        crate::report::error_chain(&error),
        "setting the link up on lo: Operation not permitted"
    );
}

#[test]
fn dhcp_takes_and_pins_a_lease() {
    let sys = FakeNetSys::new()
        .with_link("eth0", FakeLink::ethernet(2))
        .with_dhcp(FakeDhcpServer {
            // Another client's answer and garbage come first; both are skipped.
            noise: vec![b"not dhcp".to_vec()],
            ignore_first: 1,
            ..dhcp_server()
        });
    let plan = NetPlan::Configure {
        interfaces: vec![iface("eth0", Addressing::Dhcp, &[])],
    };
    let report = apply(&plan, &sys, Path::new(RESOLV)).unwrap();
    let eth0 = &report.interfaces[0];
    assert_eq!(eth0.source, "dhcp");
    assert_eq!(
        eth0.lease,
        Some(Lease {
            server: ip("10.0.2.2"),
            address: ip("10.0.2.15"),
            prefix: 24,
            router: Some(ip("10.0.2.2")),
            dns: vec![ip("10.0.2.3")],
            lease_secs: 3600,
            xid: 0x1234_5678,
        })
    );
    assert_eq!(
        report.dhcp_servers(),
        [DhcpServer {
            interface: "eth0",
            server: ip("10.0.2.2")
        }]
    );
    let calls = sys.calls();
    // The first DISCOVER is lost; it is sent again after a second, then REQUEST; all
    // broadcast.
    let sent: Vec<_> = calls
        .iter()
        .filter(|c| matches!(c, NetCall::DhcpSent(..)))
        .cloned()
        .collect();
    assert_eq!(
        sent,
        [
            NetCall::DhcpSent("Discover".into(), true),
            NetCall::DhcpSent("Discover".into(), true),
            NetCall::DhcpSent("Request".into(), true),
        ]
    );
    assert!(calls.contains(&NetCall::AddAddress(2, ip("10.0.2.15"), 24)));
    assert!(calls.contains(&NetCall::AddDefaultRoute(2, ip("10.0.2.2"))));
    assert!(calls.contains(&NetCall::WriteFile(
        RESOLV.into(),
        "# written by cvm-warden from the policy and DHCP leases\nnameserver 10.0.2.3\n".into()
    )));
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["interfaces"][0]["lease"]["server"], "10.0.2.2");
    assert_eq!(json["interfaces"][0]["lease"]["lease_secs"], 3600);
}

#[test]
fn the_policys_name_servers_replace_the_leases() {
    let sys = FakeNetSys::new()
        .with_link("eth0", FakeLink::ethernet(2))
        .with_dhcp(dhcp_server());
    let plan = NetPlan::Configure {
        interfaces: vec![iface("eth0", Addressing::Dhcp, &["9.9.9.9"])],
    };
    let report = apply(&plan, &sys, Path::new(RESOLV)).unwrap();
    assert_eq!(
        report.resolv_conf.unwrap().nameservers,
        [IpAddr::V4(ip("9.9.9.9"))]
    );
}

#[test]
fn dhcp_without_a_server_fails_after_its_bound() {
    let sys = FakeNetSys::new().with_link("eth0", FakeLink::ethernet(2));
    let plan = NetPlan::Configure {
        interfaces: vec![iface("eth0", Addressing::Dhcp, &[])],
    };
    let error = apply(&plan, &sys, Path::new(RESOLV)).unwrap_err();
    assert_eq!(
        error.to_string(),
        "interface eth0: DHCP: no offer within 30s after 6 tries (no answer); check that a DHCP server serves this network"
    );
    assert_eq!(sys.elapsed(), DHCP_TIMEOUT);
    assert!(!sys
        .calls()
        .iter()
        .any(|c| matches!(c, NetCall::AddAddress(2, ..))));
}

#[test]
fn a_nak_is_reported_with_the_server() {
    let sys = FakeNetSys::new()
        .with_link("eth0", FakeLink::ethernet(2))
        .with_dhcp(FakeDhcpServer {
            nak: true,
            ..dhcp_server()
        });
    let plan = NetPlan::Configure {
        interfaces: vec![iface("eth0", Addressing::Dhcp, &[])],
    };
    let error = apply(&plan, &sys, Path::new(RESOLV)).unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with("interface eth0: DHCP: no acknowledgement within 30s after ")
            && error.to_string().contains(
                "last answer refused: server 10.0.2.2 refused the offered 10.0.2.15 (NAK)"
            ),
        "{error}"
    );
}

#[test]
fn a_lease_without_a_subnet_mask_is_refused() {
    let sys = FakeNetSys::new()
        .with_link("eth0", FakeLink::ethernet(2))
        .with_dhcp(FakeDhcpServer {
            mask: ip("255.0.255.0"),
            ..dhcp_server()
        });
    let plan = NetPlan::Configure {
        interfaces: vec![iface("eth0", Addressing::Dhcp, &[])],
    };
    let error = apply(&plan, &sys, Path::new(RESOLV)).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("server 10.0.2.2 sent the subnet mask 255.0.255.0, which is not a prefix"),
        "{error}"
    );
}
