//! From a policy to a ruleset: which hosts each phase reaches ([`endpoints`]), resolving the
//! names among them once ([`Resolution`]), and the rules ([`plan`], pure).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::Serialize;

use super::model::{Chain, Direction, Hook, Match, Net, Rule, Ruleset, CT_MARK, MAX_COMMENT};
use super::resolve::Resolver;
use super::{FirewallError, Phase};
use crate::policy::{Addressing, Attestation, BrokerUrl, Policy, Proto, SyslogTarget};

/// A destination a phase allows: where it comes from in the policy, and where it goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    /// The policy key that names it, e.g. `network.outbound[0]`, `attestation.kbs`.
    pub key: String,
    /// What it is, for rule comments: `outbound`, `key broker`, `syslog`.
    pub role: &'static str,
    /// Host name or address as the policy writes it (IPv6 without brackets).
    pub host: String,
    /// Destination port.
    pub port: u16,
    /// Protocol.
    pub proto: Proto,
}

impl Endpoint {
    /// The host's address when it is an address literal; `None` for a name.
    pub fn literal(&self) -> Option<IpAddr> {
        self.host.parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
    }
}

/// Names resolved and the addresses pinned for them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pin {
    /// The host name.
    pub host: String,
    /// Every policy key that names it.
    pub keys: Vec<String>,
    /// The addresses the rules allow (sorted; IPv4-mapped IPv6 addresses written as IPv4).
    pub addresses: Vec<IpAddr>,
}

/// The DHCP server whose lease the network bring-up applied on an interface (from
/// `net::NetReport::dhcp_servers`): the allowlist admits that server's renewals only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DhcpPin {
    /// The interface.
    pub interface: String,
    /// The lease's server identifier.
    pub server: Ipv4Addr,
}

/// The outcome of resolving every name that one or more phases need, once. Plan each phase
/// from the same `Resolution` (the stage runner resolves for both phases before the perimeter
/// is applied, so the allowlist needs no DNS through the perimeter and both phases pin the
/// same addresses).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct Resolution {
    /// Every name resolved.
    pub pins: Vec<Pin>,
    /// The name servers (only looked up when there is a name to resolve).
    pub nameservers: Vec<IpAddr>,
    /// The DHCP servers whose leases were applied, per interface (added after the network
    /// bring-up with [`Resolution::pin_dhcp`]; the allowlist needs one per DHCP interface).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dhcp: Vec<DhcpPin>,
}

impl Resolution {
    /// Resolves every host name the given phases allow. A name that does not resolve, or
    /// resolves to nothing, fails closed naming the host and the policy key; so does a name
    /// with no name server to allow DNS to.
    pub fn resolve(
        policy: &Policy,
        phases: &[Phase],
        resolver: &dyn Resolver,
    ) -> Result<Resolution, FirewallError> {
        let mut pins: Vec<Pin> = Vec::new();
        for phase in phases {
            for endpoint in endpoints(policy, *phase)? {
                if endpoint.literal().is_some() {
                    continue;
                }
                if let Some(pin) = pins.iter_mut().find(|p| p.host == endpoint.host) {
                    if !pin.keys.contains(&endpoint.key) {
                        pin.keys.push(endpoint.key.clone());
                    }
                    continue;
                }
                let resolved =
                    resolver
                        .resolve(&endpoint.host)
                        .map_err(|source| FirewallError::Resolve {
                            key: endpoint.key.clone(),
                            host: endpoint.host.clone(),
                            source,
                        })?;
                let mut addresses: Vec<IpAddr> =
                    resolved.into_iter().map(|ip| ip.to_canonical()).collect();
                addresses.sort();
                addresses.dedup();
                if addresses.is_empty() {
                    return Err(FirewallError::NoAddress {
                        key: endpoint.key,
                        host: endpoint.host,
                    });
                }
                pins.push(Pin {
                    host: endpoint.host.clone(),
                    keys: vec![endpoint.key.clone()],
                    addresses,
                });
            }
        }
        let mut nameservers = Vec::new();
        if !pins.is_empty() {
            let names = || pins.iter().map(|p| p.host.clone()).collect::<Vec<_>>();
            let found = resolver
                .nameservers()
                .map_err(|source| FirewallError::Nameservers {
                    hosts: names(),
                    source: Some(source),
                })?;
            for ip in found {
                let ip = ip.to_canonical();
                if !nameservers.contains(&ip) {
                    nameservers.push(ip);
                }
            }
            if nameservers.is_empty() {
                return Err(FirewallError::Nameservers {
                    hosts: names(),
                    source: None,
                });
            }
        }
        Ok(Resolution {
            pins,
            nameservers,
            dhcp: Vec::new(),
        })
    }

    /// Pins the DHCP server of `interface`'s lease (replacing an earlier pin for it).
    pub fn pin_dhcp(&mut self, interface: &str, server: Ipv4Addr) {
        self.dhcp.retain(|p| p.interface != interface);
        self.dhcp.push(DhcpPin {
            interface: interface.to_string(),
            server,
        });
    }

    /// The pin for `host`, if it was resolved.
    pub fn pin(&self, host: &str) -> Option<&Pin> {
        self.pins.iter().find(|p| p.host == host)
    }
}

/// `host:port` or `[v6]:port` (a validated syslog address).
fn split_host_port(key: &str, text: &str) -> Result<(String, u16), FirewallError> {
    let bad = |why: &str| FirewallError::Endpoint {
        key: key.to_string(),
        value: text.to_string(),
        why: why.to_string(),
    };
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (v6, after) = rest
            .split_once(']')
            .ok_or_else(|| bad("the IPv6 address has no closing \"]\""))?;
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| bad("the port is missing"))?;
        v6.parse::<Ipv6Addr>()
            .map_err(|_| bad("the bracketed host is not an IPv6 address"))?;
        (v6.to_string(), port)
    } else {
        text.rsplit_once(':')
            .map(|(h, p)| (h.to_string(), p))
            .ok_or_else(|| bad("the port is missing"))?
    };
    if host.is_empty() {
        return Err(bad("the host is empty"));
    }
    let port = match port.parse::<u16>() {
        Ok(p) if p > 0 => p,
        _ => return Err(bad("the port is not a number from 1 to 65535")),
    };
    Ok((host, port))
}

/// Host and port of a broker URL (`https://host[:port][/path]`; 443 or 80 by default), as
/// the policy's [`BrokerUrl`] reads it (the `url` crate; an IPv6 host without brackets).
fn url_host_port(key: &str, url: &str) -> Result<(String, u16), FirewallError> {
    BrokerUrl::parse(url)
        .map(|u| (u.host, u.port))
        .map_err(|why| FirewallError::Endpoint {
            key: key.to_string(),
            value: BrokerUrl::redacted(url),
            why: why.to_string(),
        })
}

/// The remote destinations `phase` allows, in rule order.
///
/// - perimeter: the key broker (`attestation.kbs`, tcp) unless `attestation = "none"`, and
///   a remote syslog target (`audit.syslog`).
/// - allowlist: each `network.outbound[i]`, the key broker while re-attestation is on
///   (`attestation.reattest_interval` above 0; unless an outbound entry already admits the
///   same host, port and protocol), and a remote syslog target. With re-attestation off the
///   broker is left out: nothing talks to it after the unlock stage, so the workload cannot
///   reach it.
pub fn endpoints(policy: &Policy, phase: Phase) -> Result<Vec<Endpoint>, FirewallError> {
    let mut out = Vec::new();
    match phase {
        Phase::Perimeter => {
            if let Attestation::Broker { kbs, .. } = &policy.attestation {
                let (host, port) = url_host_port("attestation.kbs", kbs)?;
                out.push(Endpoint {
                    key: "attestation.kbs".to_string(),
                    role: "key broker",
                    host,
                    port,
                    proto: Proto::Tcp,
                });
            }
        }
        Phase::Allowlist => {
            for (i, rule) in policy
                .network
                .iter()
                .flat_map(|n| n.outbound.iter())
                .enumerate()
            {
                out.push(Endpoint {
                    key: format!("network.outbound[{i}]"),
                    role: "outbound",
                    host: rule.host.clone(),
                    port: rule.port,
                    proto: rule.proto,
                });
            }
            // Re-attestation while the workload runs needs the broker after the unlock stage.
            if let Attestation::Broker { kbs, reattest, .. } = &policy.attestation {
                if reattest.interval_secs > 0 {
                    let (host, port) = url_host_port("attestation.kbs", kbs)?;
                    let listed = out
                        .iter()
                        .any(|e| e.host == host && e.port == port && e.proto == Proto::Tcp);
                    if !listed {
                        out.push(Endpoint {
                            key: "attestation.kbs".to_string(),
                            role: "key broker (re-attestation)",
                            host,
                            port,
                            proto: Proto::Tcp,
                        });
                    }
                }
            }
        }
    }
    let syslog = match &policy.audit.syslog {
        Some(SyslogTarget::Udp(address)) => Some((Proto::Udp, address)),
        Some(SyslogTarget::Tcp(address)) => Some((Proto::Tcp, address)),
        Some(SyslogTarget::Local) | None => None,
    };
    if let Some((proto, address)) = syslog {
        let (host, port) = split_host_port("audit.syslog", address)?;
        out.push(Endpoint {
            key: "audit.syslog".to_string(),
            role: "syslog",
            host,
            port,
            proto,
        });
    }
    Ok(out)
}

fn proto_name(proto: Proto) -> &'static str {
    match proto {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
    }
}

/// `what (key)`, with `what` shortened to keep the whole within nft's 128 bytes.
fn comment(what: &str, key: &str) -> String {
    let suffix = format!(" ({key})");
    let what = super::model::sanitize(what);
    if what.len() + suffix.len() <= MAX_COMMENT {
        return format!("{what}{suffix}");
    }
    let room = MAX_COMMENT.saturating_sub(suffix.len() + 3);
    let cut: String = what.chars().take(room).collect();
    format!("{cut}...{suffix}")
}

fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A rule that accepts packets without admitting a connection (loopback, the base rule,
/// ICMP): it sets no mark.
fn rule(matches: Vec<Match>, comment: String) -> Rule {
    Rule {
        matches,
        set_mark: None,
        comment,
    }
}

/// A rule that admits connections: `matches`, then `ct direction original` (only the way the
/// policy allows; a reply of a connection tracked before the table went up is not adopted),
/// then `ct mark set` [`CT_MARK`], so the base rule lets the rest of the connection through.
fn admit(mut matches: Vec<Match>, comment: String) -> Rule {
    matches.push(Match::CtOriginal);
    Rule {
        matches,
        set_mark: Some(CT_MARK),
        comment,
    }
}

fn base_rules(hook: Hook) -> Vec<Rule> {
    let lo = "lo".to_string();
    let (iface, label) = match hook {
        Hook::Input => (
            Match::Iif { name: lo },
            "loopback: local processes talk to each other",
        ),
        _ => (
            Match::Oif { name: lo },
            "loopback: local processes talk to each other",
        ),
    };
    vec![
        rule(vec![iface], label.to_string()),
        rule(
            vec![Match::EstablishedRelated, Match::CtMark { mark: CT_MARK }],
            "packets of connections these rules admitted (ct mark cvmw), and ICMP errors about them"
                .to_string(),
        ),
    ]
}

/// The ICMP each direction needs, and why (RFC 4890 for ICMPv6):
///
/// input
/// - ICMPv6 neighbour solicitation/advertisement: IPv6's ARP; without them no address on the
///   link (the gateway included) can be reached. Router advertisements carry the default
///   route and prefixes (SLAAC). `ip6 hoplimit 255` accepts them only from the link itself
///   (RFC 4861 §6.1, §7.1: routers decrement it, so 255 proves on-link origin).
/// - ICMPv6 packet-too-big: IPv6 routers never fragment; path MTU discovery depends on this
///   message (RFC 8201) and dropping it stalls large transfers.
/// - ICMPv4 destination-unreachable / frag-needed: the same for IPv4 (RFC 1191), since TCP
///   sets DF.
///
/// Conntrack already classes errors about tracked connections as `related` and looks them up
/// as that connection, so the base rule (`ct state established,related ct mark 0x63766d77`)
/// accepts errors about connections these rules admitted; the explicit PMTU rules keep path
/// MTU discovery working when the quoted header does not match a tracked flow (e.g. an entry
/// that expired or was rewritten on the path). They set no mark: an error admits nothing.
///
/// output
/// - ICMPv6 neighbour solicitation/advertisement and router solicitation: our side of
///   neighbour and router discovery.
/// - MLDv2 listener reports: joining the solicited-node multicast groups is announced with
///   them, and switches that snoop MLD stop delivering neighbour solicitations to a host that
///   never reported.
///
/// Echo (ping) is not allowed in either direction; outbound PMTU errors are not needed (this
/// host does not route).
fn icmp_rules(hook: Hook) -> Vec<Rule> {
    match hook {
        Hook::Input => vec![
            rule(
                vec![
                    Match::Icmpv6 {
                        kinds: vec![
                            "nd-router-advert",
                            "nd-neighbor-solicit",
                            "nd-neighbor-advert",
                        ],
                    },
                    Match::Ip6HopLimit { value: 255 },
                ],
                "icmpv6 neighbour and router discovery from the link (RFC 4861)".to_string(),
            ),
            rule(
                vec![Match::Icmpv6 {
                    kinds: vec!["packet-too-big"],
                }],
                "icmpv6 packet-too-big: path MTU discovery (RFC 8201)".to_string(),
            ),
            rule(
                vec![Match::Icmp {
                    kind: "destination-unreachable",
                    code: Some("frag-needed"),
                }],
                "icmp frag-needed: path MTU discovery (RFC 1191)".to_string(),
            ),
        ],
        Hook::Output => vec![rule(
            vec![Match::Icmpv6 {
                kinds: vec![
                    "nd-router-solicit",
                    "nd-neighbor-solicit",
                    "nd-neighbor-advert",
                    "mld2-listener-report",
                ],
            }],
            "icmpv6 neighbour and router discovery, MLDv2 reports (RFC 4861, 3810)".to_string(),
        )],
        Hook::Forward => Vec::new(),
    }
}

/// The interfaces the policy configures with `dhcp = true`, in name order.
pub fn dhcp_interfaces(policy: &Policy) -> Vec<&str> {
    policy
        .network
        .iter()
        .flat_map(|n| n.interfaces.iter())
        .filter(|i| i.addressing == Addressing::Dhcp)
        .map(|i| i.name.as_str())
        .collect()
}

/// The DHCP client's rules for each `dhcp = true` interface, as (input, output) rules.
///
/// - perimeter (before the lease, whose server is not known yet): in — `iifname NAME udp
///   sport 67 udp dport 68` (OFFER and ACK, broadcast by any server on that link); out —
///   `oifname NAME udp sport 68 udp dport 67` (DISCOVER, REQUEST).
/// - allowlist: the same, pinned to the lease's server (`ip saddr` / `ip daddr`): its
///   unicast renewals and their answers, nothing from another DHCP server. Rebinding
///   (broadcast, after the server is gone) is not admitted.
fn dhcp_rules(
    policy: &Policy,
    phase: Phase,
    resolution: &Resolution,
) -> Result<(Vec<Rule>, Vec<Rule>), FirewallError> {
    let mut input = Vec::new();
    let mut output = Vec::new();
    for name in dhcp_interfaces(policy) {
        let key = format!("network.interface.{name}.dhcp");
        let server = match phase {
            Phase::Perimeter => None,
            Phase::Allowlist => Some(
                resolution
                    .dhcp
                    .iter()
                    .find(|p| p.interface == name)
                    .map(|p| p.server)
                    .ok_or_else(|| FirewallError::NoDhcpLease {
                        interface: name.to_string(),
                    })?,
            ),
        };
        let ports = |sport: u16, dport: u16| {
            [
                Match::Sport {
                    proto: Proto::Udp,
                    port: sport,
                },
                Match::Dport {
                    proto: Proto::Udp,
                    port: dport,
                },
            ]
        };
        // By name: the interface may appear only after the perimeter is loaded.
        let mut inbound = vec![Match::Iifname {
            name: name.to_string(),
        }];
        let mut outbound = vec![Match::Oifname {
            name: name.to_string(),
        }];
        let (what_in, what_out) = match server {
            None => (
                format!("dhcp offers and acks from any server on {name}"),
                format!("dhcp discover and request on {name}"),
            ),
            Some(server) => {
                let host = Net::host(IpAddr::V4(server));
                inbound.push(Match::Addr {
                    direction: Direction::Source,
                    net: host,
                });
                outbound.push(Match::Addr {
                    direction: Direction::Destination,
                    net: host,
                });
                (
                    format!("dhcp answers from the lease's server {server} on {name}"),
                    format!("dhcp renewals to the lease's server {server} on {name}"),
                )
            }
        };
        inbound.extend(ports(67, 68));
        outbound.extend(ports(68, 67));
        input.push(admit(inbound, comment(&what_in, &key)));
        output.push(admit(outbound, comment(&what_out, &key)));
    }
    Ok((input, output))
}

/// Plans the ruleset of `phase` from the policy and a [`Resolution`] covering it. Pure.
///
/// Both phases: chains input, output, forward (type filter, priority filter, policy drop);
/// input and output accept loopback, `ct state established,related ct mark 0x63766d77`
/// (connections these rules admitted, see [`CT_MARK`]) and the ICMP that the network needs
/// (see `icmp_rules`); forward has no rules. Every rule below admits connections: it also
/// matches `ct direction original` and sets `ct mark set 0x63766d77`. Then:
///
/// - perimeter, output: the key broker's addresses on its port (tcp) unless
///   `attestation = "none"`; the remote syslog target; DNS (udp and tcp 53) to the name
///   servers when one of these is a name (the broker client and the syslog sink resolve it
///   again).
/// - both phases, for each `network.interface.NAME` with `dhcp = true`: the DHCP client's
///   traffic on that interface (see `dhcp_rules`; the allowlist pins the lease's server from
///   [`Resolution::dhcp`], and fails closed without one).
/// - allowlist, input: each `network.inbound[i]` port (tcp/udp), from anywhere or, one rule
///   per source, from each `from` CIDR. Output: each `network.outbound[i]` host's pinned
///   addresses on its port; the remote syslog target; DNS to the name servers when one of
///   these is a name (the workload resolves it again). No key broker.
///
/// One rule per address: addresses are not merged into sets, so `nft list` shows exactly
/// what the policy asked for and nft cannot rewrite the rules on read-back.
pub fn plan(
    policy: &Policy,
    phase: Phase,
    resolution: &Resolution,
) -> Result<Ruleset, FirewallError> {
    let mut input = base_rules(Hook::Input);
    input.extend(icmp_rules(Hook::Input));
    let mut output = base_rules(Hook::Output);
    let (dhcp_in, dhcp_out) = dhcp_rules(policy, phase, resolution)?;
    input.extend(dhcp_in);
    output.extend(dhcp_out);

    if phase == Phase::Allowlist {
        for (i, inbound) in policy
            .network
            .iter()
            .flat_map(|n| n.inbound.iter())
            .enumerate()
        {
            let key = format!("network.inbound[{i}]");
            let port = Match::Dport {
                proto: inbound.proto,
                port: inbound.port,
            };
            let what = format!("inbound {} {}", proto_name(inbound.proto), inbound.port);
            if inbound.from.is_empty() {
                input.push(admit(vec![port.clone()], comment(&what, &key)));
            }
            for (j, cidr) in inbound.from.iter().enumerate() {
                let net = parse_cidr(&format!("{key}.from[{j}]"), cidr)?;
                input.push(admit(
                    vec![
                        Match::Addr {
                            direction: Direction::Source,
                            net,
                        },
                        port.clone(),
                    ],
                    comment(&format!("{what} from {cidr}"), &format!("{key}.from[{j}]")),
                ));
            }
        }
    }

    let mut pins: Vec<Pin> = Vec::new();
    let mut named_keys: Vec<String> = Vec::new();
    for endpoint in endpoints(policy, phase)? {
        let addresses = match endpoint.literal() {
            Some(ip) => vec![ip],
            None => {
                let pin =
                    resolution
                        .pin(&endpoint.host)
                        .ok_or_else(|| FirewallError::NotResolved {
                            key: endpoint.key.clone(),
                            host: endpoint.host.clone(),
                        })?;
                named_keys.push(endpoint.key.clone());
                match pins.iter_mut().find(|p| p.host == pin.host) {
                    Some(existing) => existing.keys.push(endpoint.key.clone()),
                    None => pins.push(Pin {
                        host: pin.host.clone(),
                        keys: vec![endpoint.key.clone()],
                        addresses: pin.addresses.clone(),
                    }),
                }
                pin.addresses.clone()
            }
        };
        let what = format!(
            "{} {} {}",
            endpoint.role,
            proto_name(endpoint.proto),
            host_port(&endpoint.host, endpoint.port)
        );
        for ip in addresses {
            output.push(admit(
                vec![
                    Match::Addr {
                        direction: Direction::Destination,
                        net: Net::host(ip),
                    },
                    Match::Dport {
                        proto: endpoint.proto,
                        port: endpoint.port,
                    },
                ],
                comment(&what, &endpoint.key),
            ));
        }
    }

    let mut nameservers = Vec::new();
    if !named_keys.is_empty() {
        if resolution.nameservers.is_empty() {
            return Err(FirewallError::Nameservers {
                hosts: pins.iter().map(|p| p.host.clone()).collect(),
                source: None,
            });
        }
        let joined = named_keys.join(", ");
        let keys = if joined.len() > 60 {
            format!("names in {} policy keys", named_keys.len())
        } else {
            joined
        };
        for ns in &resolution.nameservers {
            for proto in [Proto::Udp, Proto::Tcp] {
                output.push(admit(
                    vec![
                        Match::Addr {
                            direction: Direction::Destination,
                            net: Net::host(*ns),
                        },
                        Match::Dport { proto, port: 53 },
                    ],
                    comment(
                        &format!("dns {} to name server {ns}", proto_name(proto)),
                        &keys,
                    ),
                ));
            }
        }
        nameservers = resolution.nameservers.clone();
    }
    output.extend(icmp_rules(Hook::Output));

    Ruleset::new(
        phase,
        vec![
            Chain {
                hook: Hook::Input,
                rules: input,
            },
            Chain {
                hook: Hook::Output,
                rules: output,
            },
            Chain {
                hook: Hook::Forward,
                rules: Vec::new(),
            },
        ],
        pins,
        nameservers,
    )
}

/// A validated CIDR (`10.0.0.0/8`, `fd00::/8`).
fn parse_cidr(key: &str, text: &str) -> Result<Net, FirewallError> {
    let bad = |why: &str| FirewallError::Endpoint {
        key: key.to_string(),
        value: text.to_string(),
        why: why.to_string(),
    };
    let (addr, len) = text
        .split_once('/')
        .ok_or_else(|| bad("no prefix length"))?;
    let addr: IpAddr = addr.parse().map_err(|_| bad("not an IP address"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len: u8 = match len.parse::<u8>() {
        Ok(l) if l <= max => l,
        _ => return Err(bad("prefix length out of range")),
    };
    Ok(Net { addr, len })
}
