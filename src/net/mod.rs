//! Network configuration in the PID 1 shape: loopback up, then each
//! `[network.interface.<NAME>]` waited for (present, carrier) within its bound and given its
//! static IPv4 address, default route and name servers, or a DHCPv4 lease that is pinned (the
//! report names the server, so the allowlist admits exactly that server's renewals).
//!
//! [`plan`] is pure; [`apply`] performs a [`NetPlan`] through [`NetSys`] (netlink, the DHCP
//! socket, `/etc/resolv.conf`, the clock): [`RealNetSys`] for the machine, [`FakeNetSys`] for
//! tests. Under systemd the OS (networkd, NetworkManager, ifupdown) owns the interfaces: the
//! plan says so and nothing is touched.
//!
//! Not done here yet: IPv6 addresses, DHCP renewal while the workload runs (the address is
//! set without a lifetime, so it stays when the lease would expire; the allowlist already
//! admits the server's renewal traffic), DHCP rebinding (broadcast) after the server is gone.

mod dhcp;
mod fake;
mod real;

#[cfg(test)]
mod tests;

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::lockdown::Shape;
use crate::policy::{Addressing, Policy};

pub use dhcp::{Lease, DHCP_TIMEOUT};
pub use fake::{FakeDhcpServer, FakeLink, FakeNetSys, NetCall};
pub use real::RealNetSys;

/// Where name servers are written in the PID 1 shape.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// How often the link state is read while waiting for an interface.
pub const LINK_POLL: Duration = Duration::from_millis(100);

/// What the network bring-up will do. Printed by `cvm-warden plan`, recorded in the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum NetPlan {
    /// A systemd unit: the OS's network configuration owns every interface, loopback
    /// included; `[network.interface.*]` is not applied (said here, so it is never skipped
    /// silently).
    LeftToTheOs {
        /// Interfaces the policy names that the OS is expected to configure.
        interfaces: Vec<String>,
    },
    /// PID 1: loopback up, then the interfaces in name order.
    Configure {
        /// The interfaces (may be empty: loopback only).
        interfaces: Vec<IfacePlan>,
    },
}

/// One interface's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IfacePlan {
    /// Kernel name.
    pub name: String,
    /// Static or DHCP.
    pub addressing: Addressing,
    /// Name servers from the policy (with DHCP: used instead of the lease's when not empty).
    pub dns: Vec<IpAddr>,
    /// Bound on waiting for the interface to appear and report carrier.
    pub link_timeout: Duration,
}

/// A DHCP server to admit in the firewall: its address and the interface its lease is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DhcpServer<'a> {
    /// The interface.
    pub interface: &'a str,
    /// The lease's server identifier.
    pub server: Ipv4Addr,
}

impl NetPlan {
    /// Names of the interfaces that take a DHCP lease (the perimeter admits DHCP on them).
    pub fn dhcp_interfaces(&self) -> Vec<&str> {
        match self {
            NetPlan::LeftToTheOs { .. } => Vec::new(),
            NetPlan::Configure { interfaces } => interfaces
                .iter()
                .filter(|i| i.addressing == Addressing::Dhcp)
                .map(|i| i.name.as_str())
                .collect(),
        }
    }
}

/// Plans the network bring-up for `shape`. Pure.
pub fn plan(policy: &Policy, shape: Shape) -> NetPlan {
    let configured = policy.network.iter().flat_map(|n| n.interfaces.iter());
    match shape {
        Shape::Systemd => NetPlan::LeftToTheOs {
            interfaces: configured.map(|i| i.name.clone()).collect(),
        },
        Shape::Pid1 => NetPlan::Configure {
            interfaces: configured
                .map(|i| IfacePlan {
                    name: i.name.clone(),
                    addressing: i.addressing.clone(),
                    dns: i.dns.clone(),
                    link_timeout: Duration::from_secs(i.link_timeout_secs),
                })
                .collect(),
        },
    }
}

/// What one interface looks like to the kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LinkInfo {
    /// Interface index.
    pub index: u32,
    /// `IFF_UP`: administratively up.
    pub up: bool,
    /// `IFF_LOWER_UP`: carrier.
    pub lower_up: bool,
    /// `IFLA_OPERSTATE` as the kernel words it (`up`, `down`, `lowerlayerdown`, …).
    pub operstate: String,
    /// Hardware address (6 bytes on Ethernet).
    pub mac: Vec<u8>,
}

impl LinkInfo {
    /// Up, with carrier, and the kernel's link watch has caught up (`operstate` up, or
    /// `unknown` for drivers that do not report it): until then the device's queue may still
    /// drop what is sent.
    fn ready(&self) -> bool {
        self.up && self.lower_up && matches!(self.operstate.as_str(), "up" | "unknown")
    }

    fn seen(&self) -> String {
        format!(
            "present (index {}), {}, {}, operstate {}",
            self.index,
            if self.up { "up" } else { "down" },
            if self.lower_up {
                "carrier"
            } else {
                "no carrier"
            },
            self.operstate
        )
    }
}

/// One datagram socket bound to port 68 of one interface (`SO_BINDTODEVICE`,
/// `SO_BROADCAST`), for the DHCP exchange.
pub trait DhcpSocket {
    /// Sends `packet` to 255.255.255.255:67.
    fn send(&mut self, packet: &[u8]) -> std::io::Result<()>;
    /// The next datagram to port 68 within `timeout`; `None` when none came.
    fn recv(&mut self, timeout: Duration) -> std::io::Result<Option<Vec<u8>>>;
}

/// Every effect of the network bring-up.
pub trait NetSys {
    /// The interface `name`; `None` when the kernel has no such interface.
    fn link(&self, name: &str) -> std::io::Result<Option<LinkInfo>>;
    /// Sets the interface administratively up.
    fn set_up(&self, index: u32) -> std::io::Result<()>;
    /// Adds (or replaces) an IPv4 address with its prefix length, scope global, no lifetime.
    fn add_address(&self, index: u32, address: Ipv4Addr, prefix: u8) -> std::io::Result<()>;
    /// Adds (or replaces) the IPv4 default route via `gateway` on the interface.
    fn add_default_route(&self, index: u32, gateway: Ipv4Addr) -> std::io::Result<()>;
    /// A DHCP socket bound to the interface `name`.
    fn dhcp_socket<'a>(&'a self, name: &str) -> std::io::Result<Box<dyn DhcpSocket + 'a>>;
    /// A random DHCP transaction id.
    fn xid(&self) -> u32;
    /// Replaces the file `path` with `contents` (mode 0644).
    fn write_file(&self, path: &Path, contents: &[u8]) -> std::io::Result<()>;
    /// Now.
    fn now(&self) -> Instant;
    /// Waits `d`.
    fn sleep(&self, d: Duration);
}

/// What the bring-up did, for the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetReport {
    /// Whether interfaces were configured (`false` under systemd).
    pub configured: bool,
    /// Loopback brought up (PID 1 only).
    pub loopback: bool,
    /// Each interface, in plan order.
    pub interfaces: Vec<IfaceReport>,
    /// The name servers written, with the file, or `None` when there were none.
    pub resolv_conf: Option<ResolvConf>,
}

/// `/etc/resolv.conf` as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResolvConf {
    /// The file.
    pub path: PathBuf,
    /// The name servers, in order.
    pub nameservers: Vec<IpAddr>,
}

/// One interface as configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IfaceReport {
    /// Kernel name.
    pub name: String,
    /// Interface index.
    pub index: u32,
    /// How long it took to appear with carrier, in milliseconds.
    pub link_wait_ms: u64,
    /// The address set.
    pub address: Ipv4Addr,
    /// Its prefix length.
    pub prefix: u8,
    /// The default route's gateway, if one was set.
    pub gateway: Option<Ipv4Addr>,
    /// `static` or `dhcp`.
    pub source: &'static str,
    /// The pinned DHCP lease.
    pub lease: Option<Lease>,
}

impl NetReport {
    /// The DHCP servers whose leases were applied, with their interfaces: what the allowlist
    /// admits renewals from (`udp 67 → 68` from that address on that interface, and `68 → 67`
    /// to it).
    pub fn dhcp_servers(&self) -> Vec<DhcpServer<'_>> {
        self.interfaces
            .iter()
            .filter_map(|i| {
                i.lease.as_ref().map(|lease| DhcpServer {
                    interface: i.name.as_str(),
                    server: lease.server,
                })
            })
            .collect()
    }
}

/// Why the network could not be brought up. Names the interface and what was seen.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A netlink request or the resolver file failed.
    #[error("{what} on {interface}")]
    Sys {
        /// The interface (or the file).
        interface: String,
        /// What was being done, e.g. `adding 10.0.2.15/24`.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The interface did not appear, or had no carrier, within its bound.
    #[error("interface {interface}: no link within {} (network.interface.{interface}.link_timeout); last seen: {seen}; check the VM's network device and its driver module, or raise link_timeout", humantime::format_duration(*timeout))]
    LinkTimeout {
        /// The interface.
        interface: String,
        /// The bound.
        timeout: Duration,
        /// What was seen last, e.g. `not present` or `present (index 2), up, no carrier, …`.
        seen: String,
    },
    /// The DHCP exchange failed.
    #[error("interface {interface}: DHCP: {why}")]
    Dhcp {
        /// The interface.
        interface: String,
        /// What went wrong, phrased for the operator.
        why: String,
    },
}

fn sys_error(interface: &str, what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetError {
    let interface = interface.to_string();
    let what = what.into();
    move |source| NetError::Sys {
        interface,
        what,
        source,
    }
}

/// Brings the network up as planned. Fails closed on the first problem.
pub fn apply(plan: &NetPlan, sys: &dyn NetSys, resolv_conf: &Path) -> Result<NetReport, NetError> {
    let NetPlan::Configure { interfaces } = plan else {
        return Ok(NetReport {
            configured: false,
            loopback: false,
            interfaces: Vec::new(),
            resolv_conf: None,
        });
    };
    loopback_up(sys)?;
    let mut reports = Vec::new();
    let mut nameservers: Vec<IpAddr> = Vec::new();
    for iface in interfaces {
        let (report, dns) = configure(iface, sys)?;
        for ns in dns {
            if !nameservers.contains(&ns) {
                nameservers.push(ns);
            }
        }
        reports.push(report);
    }
    // glibc reads at most three (validation keeps the policy's within that; a lease's extra
    // servers are left out).
    nameservers.truncate(crate::policy::MAX_NAMESERVERS);
    let resolv = if nameservers.is_empty() {
        None
    } else {
        let mut text = String::from("# written by cvm-warden from the policy and DHCP leases\n");
        for ns in &nameservers {
            text.push_str(&format!("nameserver {ns}\n"));
        }
        let label = resolv_conf.display().to_string();
        sys.write_file(resolv_conf, text.as_bytes())
            .map_err(sys_error(&label, "writing the name servers"))?;
        Some(ResolvConf {
            path: resolv_conf.to_path_buf(),
            nameservers,
        })
    };
    Ok(NetReport {
        configured: true,
        loopback: true,
        interfaces: reports,
        resolv_conf: resolv,
    })
}

fn loopback_up(sys: &dyn NetSys) -> Result<(), NetError> {
    let lo = sys
        .link("lo")
        .map_err(sys_error("lo", "reading the link"))?
        .ok_or_else(|| NetError::Sys {
            interface: "lo".to_string(),
            what: "reading the link".to_string(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the kernel has no loopback interface",
            ),
        })?;
    if !lo.up {
        sys.set_up(lo.index)
            .map_err(sys_error("lo", "setting the link up"))?;
    }
    // The kernel adds 127.0.0.1/8 when lo goes up; added again (replace) in case it did not.
    sys.add_address(lo.index, Ipv4Addr::LOCALHOST, 8)
        .map_err(sys_error("lo", "adding 127.0.0.1/8"))
}

/// Waits until `name` exists (setting it up once it does) and has carrier.
fn wait_for_link(iface: &IfacePlan, sys: &dyn NetSys) -> Result<(LinkInfo, Duration), NetError> {
    let started = sys.now();
    let mut set_up = false;
    loop {
        let seen = sys
            .link(&iface.name)
            .map_err(sys_error(&iface.name, "reading the link"))?;
        if let Some(link) = &seen {
            if !link.up && !set_up {
                sys.set_up(link.index)
                    .map_err(sys_error(&iface.name, "setting the link up"))?;
                set_up = true;
                continue;
            }
            if link.ready() {
                return Ok((link.clone(), sys.now().saturating_duration_since(started)));
            }
        }
        let waited = sys.now().saturating_duration_since(started);
        if waited >= iface.link_timeout {
            return Err(NetError::LinkTimeout {
                interface: iface.name.clone(),
                timeout: iface.link_timeout,
                seen: seen.map_or_else(|| "not present".to_string(), |l| l.seen()),
            });
        }
        sys.sleep(LINK_POLL.min(iface.link_timeout.saturating_sub(waited)));
    }
}

fn configure(iface: &IfacePlan, sys: &dyn NetSys) -> Result<(IfaceReport, Vec<IpAddr>), NetError> {
    let (link, waited) = wait_for_link(iface, sys)?;
    let (address, prefix, gateway, lease) = match &iface.addressing {
        Addressing::Static {
            address,
            prefix,
            gateway,
        } => (*address, *prefix, *gateway, None),
        Addressing::Dhcp => {
            let lease = dhcp::obtain(&iface.name, &link.mac, sys)?;
            (lease.address, lease.prefix, lease.router, Some(lease))
        }
    };
    sys.add_address(link.index, address, prefix)
        .map_err(sys_error(&iface.name, format!("adding {address}/{prefix}")))?;
    if let Some(gateway) = gateway {
        sys.add_default_route(link.index, gateway)
            .map_err(sys_error(
                &iface.name,
                format!("adding the default route via {gateway}"),
            ))?;
    }
    let dns: Vec<IpAddr> = match &lease {
        Some(lease) if iface.dns.is_empty() => lease.dns.iter().map(|ip| IpAddr::V4(*ip)).collect(),
        _ => iface.dns.clone(),
    };
    Ok((
        IfaceReport {
            name: iface.name.clone(),
            index: link.index,
            link_wait_ms: u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
            address,
            prefix,
            gateway,
            source: if lease.is_some() { "dhcp" } else { "static" },
            lease,
        },
        dns,
    ))
}
