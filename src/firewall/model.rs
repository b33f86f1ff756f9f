//! The ruleset model and its two renderings: the nft JSON transaction (built with the
//! `nftables` crate's schema types, applied by `nft -j -f -`) and the `nft -f` text form.
//!
//! Every rule accepts (the chains' policy is drop), so a rule is its matches, whether it
//! sets cvm-warden's conntrack mark ([`CT_MARK`]) on the connection it admits, and its comment.
//! The expressions are written in the form `nft -j list` prints them back (a full-length
//! prefix becomes a plain address, ICMP type sets are sorted by type number), so the read-back
//! comparison needs little normalising.

use std::borrow::Cow;
use std::net::IpAddr;

use nftables::expr::{
    Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix, SetItem, CT,
};
use nftables::schema::{
    Chain as NfChain, NfCmd, NfListObject, NfObject, Nftables, Rule as NfRule, Table,
};
use nftables::stmt::{Accept, Mangle, Match as NfMatch, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use serde::Serialize;
use serde_json::Value;

use super::plan::Pin;
use super::{FirewallError, Phase};
use crate::digest::Digest;
use crate::policy::Proto;

/// The one table cvm-warden owns (family `inet`: IPv4 and IPv6 in one table).
pub const TABLE: &str = "cvm_warden";

/// nft keeps at most 128 bytes of a rule comment.
pub const MAX_COMMENT: usize = 128;

/// The conntrack mark cvm-warden owns: `0x63766d77`, "cvmw" in ASCII.
///
/// Every rule that admits a connection (inbound ports, outbound host:port pairs, the key
/// broker, syslog, DNS) sets it on the connection (`ct mark set 0x63766d77`), and the base
/// rule accepts `ct state established,related` only with it (`ct mark 0x63766d77`). A
/// connection tracked before cvm-warden's table went up carries mark 0, so its packets are
/// judged by the rules like a new connection's instead of passing as `established`. ICMP
/// errors that conntrack relates to a connection are looked up as that connection, so they
/// see its mark. Nothing else in the VM may set conntrack marks (it would take connections
/// away from, or give them to, this rule).
pub const CT_MARK: u32 = 0x6376_6d77;

/// A base chain of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Hook {
    /// Packets addressed to this host.
    Input,
    /// Packets this host sends.
    Output,
    /// Packets routed through this host (always dropped).
    Forward,
}

impl Hook {
    /// The chain's name, the same as its hook's.
    pub fn name(self) -> &'static str {
        match self {
            Hook::Input => "input",
            Hook::Output => "output",
            Hook::Forward => "forward",
        }
    }

    fn nf(self) -> NfHook {
        match self {
            Hook::Input => NfHook::Input,
            Hook::Output => NfHook::Output,
            Hook::Forward => NfHook::Forward,
        }
    }
}

/// Source or destination address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// `saddr`
    Source,
    /// `daddr`
    Destination,
}

/// An address or a network (`len` below the full length).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Net {
    /// The (network) address.
    pub addr: IpAddr,
    /// Prefix length: 32 (IPv4) or 128 (IPv6) is a single address.
    pub len: u8,
}

impl Net {
    /// A single address.
    pub fn host(addr: IpAddr) -> Net {
        let addr = addr.to_canonical();
        Net {
            addr,
            len: if addr.is_ipv4() { 32 } else { 128 },
        }
    }

    /// Whether this is a single address.
    pub fn is_host(&self) -> bool {
        self.len == if self.addr.is_ipv4() { 32 } else { 128 }
    }

    fn text(&self) -> String {
        if self.is_host() {
            self.addr.to_string()
        } else {
            format!("{}/{}", self.addr, self.len)
        }
    }
}

/// One match of a rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "match")]
pub enum Match {
    /// `iif "<name>"`
    Iif {
        /// Interface name.
        name: String,
    },
    /// `oif "<name>"`
    Oif {
        /// Interface name.
        name: String,
    },
    /// `iifname "<name>"`: by name, so the rule loads before the interface exists (`iif`
    /// needs it to exist when the ruleset is loaded).
    Iifname {
        /// Interface name.
        name: String,
    },
    /// `oifname "<name>"`, see [`Match::Iifname`].
    Oifname {
        /// Interface name.
        name: String,
    },
    /// `ct state established,related`
    EstablishedRelated,
    /// `ct mark <mark>` (printed as nft prints it, `0x` and 8 hex digits)
    CtMark {
        /// The mark, [`CT_MARK`].
        mark: u32,
    },
    /// `ct direction original`: the packet travels the way the connection's first packet
    /// did, so a rule admits connections only in the direction the policy allows (not the
    /// replies of a connection that was tracked before the rules went up and happens to use
    /// an allowed port on the other side).
    CtOriginal,
    /// `icmp type <type> [icmp code <code>]`
    Icmp {
        /// ICMPv4 type name as nft spells it.
        kind: &'static str,
        /// ICMPv4 code name as nft spells it.
        code: Option<&'static str>,
    },
    /// `icmpv6 type <type>` or `icmpv6 type { … }` (listed in type-number order).
    Icmpv6 {
        /// ICMPv6 type names as nft spells them.
        kinds: Vec<&'static str>,
    },
    /// `ip6 hoplimit <n>`
    Ip6HopLimit {
        /// The hop limit.
        value: u8,
    },
    /// `ip[6] saddr|daddr <net>`
    Addr {
        /// saddr or daddr.
        direction: Direction,
        /// The address or network; its family picks `ip` or `ip6`.
        net: Net,
    },
    /// `tcp|udp sport <port>`
    Sport {
        /// Protocol.
        proto: Proto,
        /// Source port.
        port: u16,
    },
    /// `tcp|udp dport <port>`
    Dport {
        /// Protocol.
        proto: Proto,
        /// Destination port.
        port: u16,
    },
}

fn proto_name(proto: Proto) -> &'static str {
    match proto {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
    }
}

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: Cow::Borrowed(protocol),
            field: Cow::Borrowed(field),
        },
    )))
}

fn eq(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(NfMatch {
        left,
        right,
        op: Operator::EQ,
    })
}

fn string(s: impl Into<String>) -> Expression<'static> {
    Expression::String(Cow::Owned(s.into()))
}

/// `ct <key>` (no family, no direction).
fn ct(key: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::CT(CT {
        key: Cow::Borrowed(key),
        family: None,
        dir: None,
    }))
}

/// A mark as nft lists it: `0x` and 8 hex digits.
fn mark_text(mark: u32) -> String {
    format!("{mark:#010x}")
}

impl Match {
    /// The nft text form, e.g. `tcp dport 8002`.
    pub fn text(&self) -> String {
        match self {
            Match::Iif { name } => format!("iif {}", quote(name)),
            Match::Oif { name } => format!("oif {}", quote(name)),
            Match::Iifname { name } => format!("iifname {}", quote(name)),
            Match::Oifname { name } => format!("oifname {}", quote(name)),
            Match::EstablishedRelated => "ct state established,related".to_string(),
            Match::CtMark { mark } => format!("ct mark {}", mark_text(*mark)),
            Match::CtOriginal => "ct direction original".to_string(),
            Match::Icmp { kind, code: None } => format!("icmp type {kind}"),
            Match::Icmp {
                kind,
                code: Some(code),
            } => format!("icmp type {kind} icmp code {code}"),
            Match::Icmpv6 { kinds } => match kinds.as_slice() {
                [one] => format!("icmpv6 type {one}"),
                many => format!("icmpv6 type {{ {} }}", many.join(", ")),
            },
            Match::Ip6HopLimit { value } => format!("ip6 hoplimit {value}"),
            Match::Addr { direction, net } => format!(
                "{} {} {}",
                if net.addr.is_ipv4() { "ip" } else { "ip6" },
                match direction {
                    Direction::Source => "saddr",
                    Direction::Destination => "daddr",
                },
                net.text()
            ),
            Match::Sport { proto, port } => format!("{} sport {port}", proto_name(*proto)),
            Match::Dport { proto, port } => format!("{} dport {port}", proto_name(*proto)),
        }
    }

    /// The nft JSON statements of this match.
    fn statements(&self) -> Vec<Statement<'static>> {
        match self {
            Match::Iif { name }
            | Match::Oif { name }
            | Match::Iifname { name }
            | Match::Oifname { name } => {
                let key = match self {
                    Match::Iif { .. } => MetaKey::Iif,
                    Match::Oif { .. } => MetaKey::Oif,
                    Match::Iifname { .. } => MetaKey::Iifname,
                    _ => MetaKey::Oifname,
                };
                vec![eq(
                    Expression::Named(NamedExpression::Meta(Meta { key })),
                    string(name.clone()),
                )]
            }
            Match::EstablishedRelated => vec![Statement::Match(NfMatch {
                left: ct("state"),
                right: Expression::List(vec![string("established"), string("related")]),
                op: Operator::IN,
            })],
            Match::CtMark { mark } => vec![eq(ct("mark"), Expression::Number(*mark))],
            Match::CtOriginal => vec![eq(ct("direction"), string("original"))],
            Match::Icmp { kind, code } => {
                let mut out = vec![eq(payload("icmp", "type"), string(*kind))];
                if let Some(code) = code {
                    out.push(eq(payload("icmp", "code"), string(*code)));
                }
                out
            }
            Match::Icmpv6 { kinds } => {
                let right = match kinds.as_slice() {
                    [one] => string(*one),
                    many => Expression::Named(NamedExpression::Set(
                        many.iter().map(|k| SetItem::Element(string(*k))).collect(),
                    )),
                };
                vec![eq(payload("icmpv6", "type"), right)]
            }
            Match::Ip6HopLimit { value } => {
                vec![eq(
                    payload("ip6", "hoplimit"),
                    Expression::Number(u32::from(*value)),
                )]
            }
            Match::Addr { direction, net } => {
                let protocol = if net.addr.is_ipv4() { "ip" } else { "ip6" };
                let field = match direction {
                    Direction::Source => "saddr",
                    Direction::Destination => "daddr",
                };
                let right = if net.is_host() {
                    string(net.addr.to_string())
                } else {
                    Expression::Named(NamedExpression::Prefix(Prefix {
                        addr: Box::new(string(net.addr.to_string())),
                        len: u32::from(net.len),
                    }))
                };
                vec![eq(payload(protocol, field), right)]
            }
            Match::Sport { proto, port } => vec![eq(
                payload(proto_name(*proto), "sport"),
                Expression::Number(u32::from(*port)),
            )],
            Match::Dport { proto, port } => vec![eq(
                payload(proto_name(*proto), "dport"),
                Expression::Number(u32::from(*port)),
            )],
        }
    }
}

/// `"text"` for nft; the inputs are ASCII we built, but anything that could end the string is
/// replaced anyway.
fn quote(s: &str) -> String {
    format!("\"{}\"", sanitize(s))
}

/// Text for an nft comment: control and bidi/format characters escaped visibly by
/// [`crate::report::sanitize`] (the one escaping function), then printable ASCII without `"`
/// and `\`; anything else becomes `?`.
pub(crate) fn sanitize(s: &str) -> String {
    crate::report::sanitize(s, usize::MAX)
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect()
}

/// An accepting rule: all of `matches`, then `ct mark set <mark>` when `set_mark` is given,
/// then `accept`, with a comment saying what it is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rule {
    /// The matches, in order.
    pub matches: Vec<Match>,
    /// The conntrack mark the rule sets on the connection it admits ([`CT_MARK`] for every
    /// rule that admits a connection; `None` for loopback, the base rule and ICMP).
    pub set_mark: Option<u32>,
    /// What the rule is for, e.g. `inbound tcp 8002 (network.inbound[0])` (≤ 128 bytes).
    pub comment: String,
}

impl Rule {
    /// The nft text form, e.g. `tcp dport 8002 ct direction original ct mark set 0x63766d77
    /// accept comment "inbound tcp 8002 (…)"`.
    pub fn text(&self) -> String {
        let mut parts: Vec<String> = self.matches.iter().map(Match::text).collect();
        if let Some(mark) = self.set_mark {
            parts.push(format!("ct mark set {}", mark_text(mark)));
        }
        parts.push("accept".to_string());
        parts.push(format!("comment {}", quote(&self.comment)));
        parts.join(" ")
    }

    fn nf(&self, chain: Hook) -> NfRule<'static> {
        let mut expr: Vec<Statement<'static>> =
            self.matches.iter().flat_map(Match::statements).collect();
        if let Some(mark) = self.set_mark {
            expr.push(Statement::Mangle(Mangle {
                key: ct("mark"),
                value: Expression::Number(mark),
            }));
        }
        expr.push(Statement::Accept(None::<Accept>));
        NfRule {
            family: NfFamily::INet,
            table: Cow::Borrowed(TABLE),
            chain: Cow::Borrowed(chain.name()),
            expr: Cow::Owned(expr),
            handle: None,
            index: None,
            comment: Some(Cow::Owned(sanitize(&self.comment))),
        }
    }
}

/// A base chain (`type filter`, priority `filter` = 0, policy drop) and its rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Chain {
    /// The hook (also the chain's name).
    pub hook: Hook,
    /// The rules, in order.
    pub rules: Vec<Rule>,
}

impl Chain {
    fn nf(&self) -> NfChain<'static> {
        NfChain {
            family: NfFamily::INet,
            table: Cow::Borrowed(TABLE),
            name: Cow::Borrowed(self.hook.name()),
            newname: None,
            handle: None,
            _type: Some(NfChainType::Filter),
            hook: Some(self.hook.nf()),
            prio: Some(0),
            dev: None,
            policy: Some(NfChainPolicy::Drop),
        }
    }
}

/// A complete ruleset for table `inet cvm_warden`: what one phase allows, with the addresses
/// pinned for it. Build one with [`super::plan`]; it is immutable, so its JSON and digest,
/// computed once, always describe its rules. `Serialize` gives the audit view: phase, digest,
/// chains, pins and name servers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ruleset {
    phase: Phase,
    digest: Digest,
    chains: Vec<Chain>,
    pins: Vec<Pin>,
    nameservers: Vec<IpAddr>,
    #[serde(skip)]
    json: String,
    #[serde(skip)]
    pretty: String,
}

fn table() -> Table<'static> {
    Table {
        family: NfFamily::INet,
        name: Cow::Borrowed(TABLE),
        handle: None,
    }
}

impl Ruleset {
    /// Assembles a ruleset and computes its JSON and digest. `chains` should be input, output,
    /// forward; every rule needs a non-empty comment of at most [`MAX_COMMENT`] bytes.
    pub fn new(
        phase: Phase,
        chains: Vec<Chain>,
        pins: Vec<Pin>,
        nameservers: Vec<IpAddr>,
    ) -> Result<Ruleset, FirewallError> {
        for chain in &chains {
            for rule in &chain.rules {
                if rule.comment.is_empty() || rule.comment.len() > MAX_COMMENT {
                    return Err(FirewallError::Internal(format!(
                        "rule `{}` in chain {} needs a comment of 1 to {MAX_COMMENT} bytes",
                        rule.text(),
                        chain.hook.name()
                    )));
                }
            }
        }
        let mut ruleset = Ruleset {
            phase,
            digest: Digest::ZERO,
            chains,
            pins,
            nameservers,
            json: String::new(),
            pretty: String::new(),
        };
        let transaction = ruleset.transaction();
        let encode = |e: serde_json::Error| {
            FirewallError::Internal(format!("cannot encode the {phase} ruleset as JSON: {e}"))
        };
        ruleset.json = serde_json::to_string(&transaction).map_err(encode)?;
        ruleset.pretty = serde_json::to_string_pretty(&transaction).map_err(encode)?;
        let canonical = serde_json_canonicalizer::to_vec(&transaction).map_err(encode)?;
        ruleset.digest = Digest::of(&canonical);
        Ok(ruleset)
    }

    /// Which phase this ruleset is for.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// input, output, forward (in that order).
    pub fn chains(&self) -> &[Chain] {
        &self.chains
    }

    /// Names resolved for this phase's rules and the addresses pinned for them (policy keys
    /// included), for the audit log.
    pub fn pins(&self) -> &[Pin] {
        &self.pins
    }

    /// Name servers DNS is allowed to (empty: the ruleset has no DNS rule).
    pub fn nameservers(&self) -> &[IpAddr] {
        &self.nameservers
    }

    /// The one `nft -j -f -` transaction that replaces whatever table `inet cvm_warden` holds
    /// with this ruleset: `add table` (so a first apply finds one to delete), `delete table`
    /// (chains, rules and anything else someone added go with it), `add table`, then the
    /// chains and rules. nft commits the batch atomically: the kernel sees the old ruleset or
    /// the new one, never a mix and never no table.
    pub fn transaction(&self) -> Nftables<'static> {
        let mut objects = vec![
            NfObject::CmdObject(NfCmd::Add(NfListObject::Table(table()))),
            NfObject::CmdObject(NfCmd::Delete(NfListObject::Table(table()))),
        ];
        objects.extend(
            self.objects()
                .into_iter()
                .map(|o| NfObject::CmdObject(NfCmd::Add(o))),
        );
        Nftables {
            objects: Cow::Owned(objects),
        }
    }

    /// The table, chains and rules, as `nft -j list table inet cvm_warden` lists them (less
    /// handles).
    pub fn objects(&self) -> Vec<NfListObject<'static>> {
        let mut out = vec![NfListObject::Table(table())];
        out.extend(self.chains.iter().map(|c| NfListObject::Chain(c.nf())));
        for chain in &self.chains {
            out.extend(
                chain
                    .rules
                    .iter()
                    .map(|r| NfListObject::Rule(r.nf(chain.hook))),
            );
        }
        out
    }

    /// The transaction as JSON (compact), exactly what is piped to `nft -j -f -`.
    pub fn json(&self) -> &str {
        &self.json
    }

    /// The transaction as pretty JSON (what `cvm-warden firewall render --format json`
    /// prints; it can be piped to `nft -j -f -`).
    pub fn json_pretty(&self) -> &str {
        &self.pretty
    }

    /// The digest of the ruleset: SHA-256 of the RFC 8785 (JCS) canonical form of the JSON
    /// transaction ([`Ruleset::json`]). Whoever has the JSON can recompute it with any JCS
    /// implementation and `sha256sum`; the measure stage and the audit log record it.
    pub fn digest(&self) -> Digest {
        self.digest
    }

    /// Number of rules in all chains.
    pub fn rule_count(&self) -> usize {
        self.chains.iter().map(|c| c.rules.len()).sum()
    }

    /// The chain for `hook`.
    pub fn chain(&self, hook: Hook) -> Option<&Chain> {
        self.chains.iter().find(|c| c.hook == hook)
    }

    /// The `nft -f` text form: the rules only (no comment lines), replacing the table in one
    /// transaction like [`Ruleset::transaction`]. `rules/*.nft` are this text with `#`
    /// comments added.
    pub fn nft_text(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!("table inet {TABLE}\n"));
        out.push_str(&format!("delete table inet {TABLE}\n"));
        out.push_str(&format!("table inet {TABLE} {{\n"));
        for (i, chain) in self.chains.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            let name = chain.hook.name();
            out.push_str(&format!("\tchain {name} {{\n"));
            out.push_str(&format!(
                "\t\ttype filter hook {name} priority filter; policy drop;\n"
            ));
            for rule in &chain.rules {
                out.push_str(&format!("\t\t{}\n", rule.text()));
            }
            out.push_str("\t}\n");
        }
        out.push_str("}\n");
        out
    }

    /// Every rule as `chain: text`, in order (for audit records and messages).
    pub fn rule_lines(&self) -> Vec<String> {
        self.chains
            .iter()
            .flat_map(|c| {
                c.rules
                    .iter()
                    .map(move |r| format!("{}: {}", c.hook.name(), r.text()))
            })
            .collect()
    }

    /// The expected objects as JSON values (for the read-back comparison).
    pub(crate) fn expected_values(&self) -> Vec<Value> {
        self.objects()
            .iter()
            .filter_map(|o| serde_json::to_value(o).ok())
            .collect()
    }
}
