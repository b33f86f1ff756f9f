//! nftables perimeter and allowlist: one table, `inet cvm_warden`, owned by cvm-warden.
//!
//! The table has three base chains, `input`, `output` and `forward` (type filter, priority
//! filter, policy drop). Two phases fill them:
//!
//! - **perimeter** (before the measure stage): loopback, packets of connections its rules admitted,
//!   the ICMP the network needs, the key broker's addresses on its port, a remote syslog
//!   target, and DNS to the name servers only when one of those is a host name;
//! - **allowlist** (just before launch): the same base, the policy's inbound ports (optional
//!   source CIDRs) and outbound host:port pairs, the syslog target, DNS only when a name is
//!   allowed. The key broker is in it only while re-attestation is on
//!   (`attestation.reattest_interval` above 0) or when the workload lists it.
//!
//! Every rule carries a comment saying what it is for and which policy key asked for it.
//!
//! **Connections.** Only connections cvm-warden's rules admitted get through as
//! `established`: every rule that admits one (inbound ports, outbound host:port pairs, the key
//! broker, syslog, DNS) matches `ct direction original` and sets the conntrack mark
//! [`CT_MARK`] (`ct mark set 0x63766d77`, "cvmw"), and the base rule accepts only
//! `ct state established,related ct mark 0x63766d77`. Conntrack is never flushed, so a
//! connection tracked before the perimeter went up (an SSH session, a socket opened in the
//! window after network-online.target) carries mark 0: its packets are judged like a new
//! connection's, and those no rule admits are dropped. One that an admitting rule matches in
//! its own direction (e.g. the syslog sink's UDP flow opened at boot start) is admitted and
//! marked then. ICMP errors about a connection are looked up as that connection and see its
//! mark. The mark stays with a connection when the allowlist replaces the perimeter:
//! connections the perimeter admitted (to the key broker, to syslog) stay allowed under the
//! allowlist until they close. Loopback is accepted by interface (`iif`/`oif "lo"`).
//!
//! Flow: [`Resolution::resolve`] resolves every host name once (through the [`Resolver`]
//! seam; a name that does not resolve fails closed naming the host and the key), [`plan`]
//! builds the [`Ruleset`] (pure; its [`Ruleset::pins`] are the pinned addresses to audit),
//! [`apply`] replaces the table in one `nft -j -f -` transaction through the [`Firewall`]
//! seam, reads it back with `nft -j list table inet cvm_warden` and compares ([`verify`]);
//! any difference fails closed naming the first differing rule.
//!
//! **Digest.** [`Ruleset::digest`] is SHA-256 over the RFC 8785 (JCS) canonical JSON of the
//! transaction that [`Ruleset::json`] holds and `cvm-warden firewall render --format json`
//! prints.
//!
//! Known limits: DHCP is not allowed (addresses must be static, or leases outlive the VM);
//! software that sets conntrack marks of its own would take connections away from (or give
//! them to) the base rule, so nothing else in the VM may set them; other tables can only add
//! drops (a drop in any base chain is final) but a NAT table could rewrite addresses before
//! these chains see them.

mod model;
mod nft;
mod plan;
mod resolve;

#[cfg(test)]
mod tests;

use std::fmt;
use std::io::Write;
use std::str::FromStr;

use serde::Serialize;

pub use model::{Chain, Direction, Hook, Match, Net, Rule, Ruleset, CT_MARK, MAX_COMMENT, TABLE};
pub use nft::{apply, verify, Applied, Firewall, NftFirewall, RecordingFirewall};
pub use plan::{dhcp_interfaces, endpoints, plan, DhcpPin, Endpoint, Pin, Resolution};
pub use resolve::{
    parse_nameservers, FakeResolver, Resolver, SystemResolver, DEFAULT_RESOLVED_UPSTREAM,
    DEFAULT_RESOLV_CONF,
};

use crate::policy::Policy;

/// Which ruleset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Boot: only what attestation and unlocking need.
    Perimeter,
    /// Workload: what the policy's `[network]` allows.
    Allowlist,
}

impl Phase {
    /// `perimeter` or `allowlist`.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Perimeter => "perimeter",
            Phase::Allowlist => "allowlist",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Phase {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "perimeter" => Ok(Phase::Perimeter),
            "allowlist" => Ok(Phase::Allowlist),
            other => Err(format!(
                "{other:?} is not a firewall phase; write perimeter or allowlist"
            )),
        }
    }
}

/// How `render` prints a ruleset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenderFormat {
    /// `nft -f` text with a header of `#` comments (phase, digest, pinned names).
    Nft,
    /// The JSON transaction, pretty (pipe it to `nft -j -f -`).
    Json,
}

impl FromStr for RenderFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "nft" => Ok(RenderFormat::Nft),
            "json" => Ok(RenderFormat::Json),
            other => Err(format!("{other:?} is not a format; write nft or json")),
        }
    }
}

/// Why a ruleset could not be planned or applied. Every variant means: stop, the firewall is
/// not what the policy asks for.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    /// A host name did not resolve.
    #[error("{key}: cannot resolve host {host:?}; check the name and the DNS configuration, or write an address instead")]
    Resolve {
        /// The policy key, e.g. `network.outbound[0]`.
        key: String,
        /// The name.
        host: String,
        /// The resolver's error.
        #[source]
        source: std::io::Error,
    },
    /// A host name resolved to no address.
    #[error("{key}: host {host:?} resolved to no address; check its DNS records, or write an address instead")]
    NoAddress {
        /// The policy key.
        key: String,
        /// The name.
        host: String,
    },
    /// Names must be resolved but no name server is known to allow DNS to.
    #[error("no name server to allow DNS to, but {} must be resolved; configure a nameserver in /etc/resolv.conf or write addresses instead of names", .hosts.join(", "))]
    Nameservers {
        /// The names.
        hosts: Vec<String>,
        /// Why the name servers could not be read, if that was the problem.
        #[source]
        source: Option<std::io::Error>,
    },
    /// The plan needs a name the [`Resolution`] does not cover.
    #[error("{key}: host {host:?} was not resolved before planning; resolve every phase's names first (Resolution::resolve with this phase)")]
    NotResolved {
        /// The policy key.
        key: String,
        /// The name.
        host: String,
    },
    /// The allowlist admits the renewals of the DHCP server whose lease the network bring-up
    /// applied, but the [`Resolution`] pins no lease for the interface.
    #[error("network.interface.{interface}.dhcp: no DHCP lease was pinned for {interface}, so the allowlist cannot name the one DHCP server to admit; the lease is taken by cvm-warden's network bring-up in the PID 1 shape (Resolution::pin_dhcp with its report) — under systemd let the OS configure the interface and remove `dhcp`")]
    NoDhcpLease {
        /// The interface.
        interface: String,
    },
    /// A policy value the firewall cannot use (validation should have refused it).
    #[error("{key}: {value:?} cannot be used for a firewall rule ({why}); fix the policy")]
    Endpoint {
        /// The policy key.
        key: String,
        /// The value.
        value: String,
        /// Why.
        why: String,
    },
    /// `nft` could not be run to completion (not installed, hung, …); the cause says what
    /// to do.
    #[error("cannot run `{command}` (nftables, nft 1.0 or later)")]
    NftSpawn {
        /// The command line.
        command: String,
        /// Why.
        #[source]
        source: crate::tool::ToolError,
    },
    /// `nft` failed; nothing of the transaction took effect.
    #[error("`{command}` failed ({status}): {stderr}; the table was left as it was (nft transactions are atomic); run as root with CAP_NET_ADMIN and a kernel with nf_tables")]
    Nft {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// What nft printed on stderr.
        stderr: String,
    },
    /// The listing could not be read.
    #[error("cannot read back table inet cvm_warden: {detail}; the firewall state is unknown, do not start the workload")]
    ReadBack {
        /// What was wrong.
        detail: String,
    },
    /// The table read back differs from the ruleset applied.
    #[error("the {phase} ruleset read back from the kernel differs from the one applied: {detail}; something else changed table inet cvm_warden, do not start the workload")]
    Mismatch {
        /// The phase applied.
        phase: Phase,
        /// The first difference.
        detail: String,
    },
    /// A bug in cvm-warden (a rule without a comment, JSON encoding).
    #[error("internal error: {0}; please report it")]
    Internal(String),
    /// Writing the output failed.
    #[error("cannot write the output")]
    Output(#[source] std::io::Error),
}

/// Resolves the names of `phase` (once, through `resolver`) and plans its ruleset.
pub fn build(
    policy: &Policy,
    phase: Phase,
    resolver: &dyn Resolver,
) -> Result<Ruleset, FirewallError> {
    let resolution = Resolution::resolve(policy, &[phase], resolver)?;
    plan(policy, phase, &resolution)
}

/// The `nft -f` text of a ruleset with a header: phase, digest and pinned names as `#`
/// comments, then [`Ruleset::nft_text`].
pub fn render_nft(ruleset: &Ruleset) -> String {
    let mut out = format!(
        "# cvm-warden {} ruleset (table inet {TABLE})\n# digest: {}\n",
        ruleset.phase(),
        ruleset.digest()
    );
    for pin in ruleset.pins() {
        let addresses: Vec<String> = pin.addresses.iter().map(ToString::to_string).collect();
        out.push_str(&format!(
            "# pinned: {} ({}) -> {}\n",
            pin.host,
            pin.keys.join(", "),
            addresses.join(", ")
        ));
    }
    out.push_str(&ruleset.nft_text());
    out
}

/// The nft JSON transaction of `phase` for `policy`, pretty-printed.
pub fn render(
    policy: &Policy,
    phase: Phase,
    resolver: &dyn Resolver,
) -> Result<String, FirewallError> {
    Ok(build(policy, phase, resolver)?.json_pretty().to_string())
}

/// `cvm-warden firewall render --policy FILE --phase P [--format nft|json]`: resolves, plans
/// and prints the ruleset to `out` (no root needed). Returns the ruleset.
pub fn run_render_command(
    policy: &Policy,
    phase: Phase,
    format: RenderFormat,
    resolver: &dyn Resolver,
    out: &mut dyn Write,
) -> Result<Ruleset, FirewallError> {
    let ruleset = build(policy, phase, resolver)?;
    let text = match format {
        RenderFormat::Nft => render_nft(&ruleset),
        RenderFormat::Json => format!("{}\n", ruleset.json_pretty()),
    };
    out.write_all(text.as_bytes())
        .map_err(FirewallError::Output)?;
    Ok(ruleset)
}

/// `cvm-warden firewall apply --policy FILE --phase P`: resolves, plans, applies in the
/// current network namespace (through `firewall`), reads back and compares, then prints the
/// [`Applied`] summary as one line of JSON to `out`. Any error: nothing more is printed and
/// the caller exits non-zero.
pub fn run_apply_command(
    policy: &Policy,
    phase: Phase,
    resolver: &dyn Resolver,
    firewall: &mut dyn Firewall,
    out: &mut dyn Write,
) -> Result<Applied, FirewallError> {
    let ruleset = build(policy, phase, resolver)?;
    let applied = apply(&ruleset, firewall)?;
    let line = serde_json::to_string(&applied)
        .map_err(|e| FirewallError::Internal(format!("cannot encode the summary: {e}")))?;
    writeln!(out, "{line}").map_err(FirewallError::Output)?;
    Ok(applied)
}
