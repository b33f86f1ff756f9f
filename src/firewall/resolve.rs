//! Name resolution behind the [`Resolver`] seam: the real one asks the system resolver
//! (`getaddrinfo` through `std::net::ToSocketAddrs`) and reads the name servers from
//! `resolv.conf`; [`FakeResolver`] answers from a table.
//!
//! Names are resolved once, when a ruleset is planned ([`super::Resolution::resolve`]); the
//! addresses are pinned into the rules and recorded, so later DNS answers cannot widen the
//! firewall.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

/// `/etc/resolv.conf`.
pub const DEFAULT_RESOLV_CONF: &str = "/etc/resolv.conf";

/// systemd-resolved's list of upstream servers, used when `resolv.conf` names only a local
/// stub (e.g. `127.0.0.53`): the stub itself is reached over loopback, its upstream servers
/// are what the firewall must let DNS through to.
pub const DEFAULT_RESOLVED_UPSTREAM: &str = "/run/systemd/resolve/resolv.conf";

/// Resolves host names and says which name servers answer them.
pub trait Resolver {
    /// Every address of `host` (a name, never an address literal). An empty list or an error
    /// makes planning fail closed.
    fn resolve(&self, host: &str) -> io::Result<Vec<IpAddr>>;

    /// The name servers that the system (and the workload) sends DNS queries to; the firewall
    /// allows DNS to exactly these, and only when a phase allows a host given by name.
    fn nameservers(&self) -> io::Result<Vec<IpAddr>>;
}

/// The system resolver: `getaddrinfo` and `resolv.conf` (paths injectable).
#[derive(Debug, Clone)]
pub struct SystemResolver {
    resolv_conf: PathBuf,
    resolved_upstream: PathBuf,
}

impl Default for SystemResolver {
    fn default() -> Self {
        Self::new(DEFAULT_RESOLV_CONF, DEFAULT_RESOLVED_UPSTREAM)
    }
}

impl SystemResolver {
    /// A resolver reading name servers from `resolv_conf`, falling back to
    /// `resolved_upstream` when `resolv_conf` lists only loopback (stub) servers.
    pub fn new(resolv_conf: impl Into<PathBuf>, resolved_upstream: impl Into<PathBuf>) -> Self {
        Self {
            resolv_conf: resolv_conf.into(),
            resolved_upstream: resolved_upstream.into(),
        }
    }
}

/// The `nameserver` addresses of a `resolv.conf` text (scope ids such as `%eth0` dropped).
pub fn parse_nameservers(text: &str) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(word) = words.next() else { continue };
        let bare = word.split('%').next().unwrap_or(word);
        if let Ok(ip) = bare.parse::<IpAddr>() {
            let ip = ip.to_canonical();
            if !out.contains(&ip) {
                out.push(ip);
            }
        }
    }
    out
}

fn read_nameservers(path: &Path) -> io::Result<Vec<IpAddr>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot read {}: {e}", path.display())))?;
    Ok(parse_nameservers(&text))
}

impl Resolver for SystemResolver {
    fn resolve(&self, host: &str) -> io::Result<Vec<IpAddr>> {
        let mut out: Vec<IpAddr> = Vec::new();
        for addr in (host, 0u16).to_socket_addrs()? {
            let ip = addr.ip().to_canonical();
            if !out.contains(&ip) {
                out.push(ip);
            }
        }
        Ok(out)
    }

    fn nameservers(&self) -> io::Result<Vec<IpAddr>> {
        let servers = read_nameservers(&self.resolv_conf)?;
        if !servers.is_empty() && servers.iter().all(IpAddr::is_loopback) {
            let upstream = match read_nameservers(&self.resolved_upstream) {
                Ok(list) => list,
                Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(e),
            };
            let upstream: Vec<IpAddr> = upstream
                .into_iter()
                .filter(|ip| !ip.is_loopback())
                .collect();
            if upstream.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "{} lists only local stub resolvers ({}) and {} names no upstream server, so the firewall cannot know where DNS goes",
                        self.resolv_conf.display(),
                        join(&servers),
                        self.resolved_upstream.display()
                    ),
                ));
            }
            return Ok(upstream);
        }
        Ok(servers)
    }
}

fn join(ips: &[IpAddr]) -> String {
    ips.iter()
        .map(IpAddr::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A resolver answering from a table (tests, `render` on a build machine with known
/// addresses). A name not in the table fails like an unknown name.
#[derive(Debug, Clone, Default)]
pub struct FakeResolver {
    hosts: BTreeMap<String, Vec<IpAddr>>,
    nameservers: Vec<IpAddr>,
}

impl FakeResolver {
    /// An empty table (every name fails; no name servers).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `host` with its addresses.
    pub fn host(mut self, host: &str, addresses: &[IpAddr]) -> Self {
        self.hosts.insert(host.to_string(), addresses.to_vec());
        self
    }

    /// Sets the name servers.
    pub fn nameservers(mut self, servers: &[IpAddr]) -> Self {
        self.nameservers = servers.to_vec();
        self
    }
}

impl Resolver for FakeResolver {
    fn resolve(&self, host: &str) -> io::Result<Vec<IpAddr>> {
        self.hosts.get(host).cloned().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "no address associated with the name",
            )
        })
    }

    fn nameservers(&self) -> io::Result<Vec<IpAddr>> {
        Ok(self.nameservers.clone())
    }
}
