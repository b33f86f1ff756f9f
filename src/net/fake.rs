//! [`FakeNetSys`]: scripted links, a scripted DHCP server, a fake clock; every effect recorded.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::dhcp::server;
use super::{DhcpSocket, LinkInfo, NetSys};

/// One effect [`FakeNetSys`] performed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetCall {
    /// `set_up(index)`.
    SetUp(u32),
    /// `add_address(index, address, prefix)`.
    AddAddress(u32, Ipv4Addr, u8),
    /// `add_default_route(index, gateway)`.
    AddDefaultRoute(u32, Ipv4Addr),
    /// `dhcp_socket(name)`.
    DhcpSocket(String),
    /// A DHCP message sent: its type (`Discover`, `Request`, …) and whether the broadcast flag
    /// was set.
    DhcpSent(String, bool),
    /// `write_file(path, contents)`.
    WriteFile(PathBuf, String),
}

/// A scripted interface.
#[derive(Debug, Clone)]
pub struct FakeLink {
    /// Interface index.
    pub index: u32,
    /// Hardware address.
    pub mac: Vec<u8>,
    /// When (on the fake clock, from creation) the interface appears.
    pub appears_after: Duration,
    /// When carrier comes once the link is up; `None`: never.
    pub carrier_after: Option<Duration>,
    /// Administratively up.
    pub up: bool,
}

impl FakeLink {
    /// An Ethernet interface present from the start, carrier as soon as it is up.
    pub fn ethernet(index: u32) -> FakeLink {
        FakeLink {
            index,
            mac: vec![
                0x52,
                0x54,
                0,
                0x12,
                0x34,
                u8::try_from(index % 256).unwrap_or(0),
            ],
            appears_after: Duration::ZERO,
            carrier_after: Some(Duration::ZERO),
            up: false,
        }
    }
}

/// A scripted DHCP server on every fake interface.
#[derive(Debug, Clone)]
pub struct FakeDhcpServer {
    /// Its address (server identifier).
    pub server: Ipv4Addr,
    /// The address it leases.
    pub address: Ipv4Addr,
    /// The subnet mask it sends.
    pub mask: Ipv4Addr,
    /// The router it sends.
    pub router: Option<Ipv4Addr>,
    /// The name servers it sends.
    pub dns: Vec<Ipv4Addr>,
    /// How many client messages it ignores first (lost packets).
    pub ignore_first: u32,
    /// Answers every REQUEST with a NAK.
    pub nak: bool,
    /// Extra datagrams delivered before each answer (other clients' traffic, garbage).
    pub noise: Vec<Vec<u8>>,
}

#[derive(Debug, Default)]
struct DhcpState {
    queue: VecDeque<Vec<u8>>,
    seen: u32,
}

/// The recording fake.
#[derive(Debug)]
pub struct FakeNetSys {
    start: Instant,
    elapsed: Cell<Duration>,
    links: RefCell<BTreeMap<String, FakeLink>>,
    /// When each link was set up (on the fake clock).
    up_at: RefCell<BTreeMap<u32, Duration>>,
    calls: Rc<RefCell<Vec<NetCall>>>,
    dhcp: Option<FakeDhcpServer>,
    dhcp_state: Rc<RefCell<DhcpState>>,
    failing: RefCell<Option<String>>,
}

impl Default for FakeNetSys {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeNetSys {
    /// Only `lo` (index 1, down), no DHCP server.
    pub fn new() -> FakeNetSys {
        let mut links = BTreeMap::new();
        links.insert(
            "lo".to_string(),
            FakeLink {
                index: 1,
                mac: vec![0; 6],
                appears_after: Duration::ZERO,
                carrier_after: Some(Duration::ZERO),
                up: false,
            },
        );
        FakeNetSys {
            start: Instant::now(),
            elapsed: Cell::new(Duration::ZERO),
            links: RefCell::new(links),
            up_at: RefCell::new(BTreeMap::new()),
            calls: Rc::new(RefCell::new(Vec::new())),
            dhcp: None,
            dhcp_state: Rc::new(RefCell::new(DhcpState::default())),
            failing: RefCell::new(None),
        }
    }

    /// Adds an interface.
    pub fn with_link(self, name: &str, link: FakeLink) -> FakeNetSys {
        self.links.borrow_mut().insert(name.to_string(), link);
        self
    }

    /// Adds a DHCP server.
    pub fn with_dhcp(mut self, server: FakeDhcpServer) -> FakeNetSys {
        self.dhcp = Some(server);
        self
    }

    /// Makes every netlink change fail with `message` (EPERM-like).
    pub fn failing(self, message: &str) -> FakeNetSys {
        *self.failing.borrow_mut() = Some(message.to_string());
        self
    }

    /// The effects so far.
    pub fn calls(&self) -> Vec<NetCall> {
        self.calls.borrow().clone()
    }

    /// Time passed on the fake clock.
    pub fn elapsed(&self) -> Duration {
        self.elapsed.get()
    }

    fn record(&self, call: NetCall) {
        self.calls.borrow_mut().push(call);
    }

    fn check(&self) -> std::io::Result<()> {
        match self.failing.borrow().as_ref() {
            Some(message) => Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                message.clone(),
            )),
            None => Ok(()),
        }
    }
}

impl NetSys for FakeNetSys {
    fn link(&self, name: &str) -> std::io::Result<Option<LinkInfo>> {
        let now = self.elapsed.get();
        let links = self.links.borrow();
        let Some(link) = links.get(name).filter(|l| l.appears_after <= now) else {
            return Ok(None);
        };
        let lower_up = link.up
            && match (link.carrier_after, self.up_at.borrow().get(&link.index)) {
                (Some(after), Some(at)) => now >= *at + after,
                _ => false,
            };
        Ok(Some(LinkInfo {
            index: link.index,
            up: link.up,
            lower_up,
            operstate: if lower_up { "up" } else { "down" }.to_string(),
            mac: link.mac.clone(),
        }))
    }

    fn set_up(&self, index: u32) -> std::io::Result<()> {
        self.check()?;
        self.record(NetCall::SetUp(index));
        for link in self.links.borrow_mut().values_mut() {
            if link.index == index {
                link.up = true;
                self.up_at.borrow_mut().insert(index, self.elapsed.get());
            }
        }
        Ok(())
    }

    fn add_address(&self, index: u32, address: Ipv4Addr, prefix: u8) -> std::io::Result<()> {
        self.check()?;
        self.record(NetCall::AddAddress(index, address, prefix));
        Ok(())
    }

    fn add_default_route(&self, index: u32, gateway: Ipv4Addr) -> std::io::Result<()> {
        self.check()?;
        self.record(NetCall::AddDefaultRoute(index, gateway));
        Ok(())
    }

    fn dhcp_socket<'a>(&'a self, name: &str) -> std::io::Result<Box<dyn DhcpSocket + 'a>> {
        self.record(NetCall::DhcpSocket(name.to_string()));
        Ok(Box::new(FakeDhcpSocket {
            server: self.dhcp.clone(),
            state: Rc::clone(&self.dhcp_state),
            calls: Rc::clone(&self.calls),
            clock: self,
        }))
    }

    fn xid(&self) -> u32 {
        0x1234_5678
    }

    fn write_file(&self, path: &Path, contents: &[u8]) -> std::io::Result<()> {
        self.record(NetCall::WriteFile(
            path.to_path_buf(),
            String::from_utf8_lossy(contents).into_owned(),
        ));
        Ok(())
    }

    fn now(&self) -> Instant {
        self.start + self.elapsed.get()
    }

    fn sleep(&self, d: Duration) {
        self.elapsed.set(self.elapsed.get() + d);
    }
}

struct FakeDhcpSocket<'a> {
    server: Option<FakeDhcpServer>,
    state: Rc<RefCell<DhcpState>>,
    calls: Rc<RefCell<Vec<NetCall>>>,
    clock: &'a FakeNetSys,
}

impl DhcpSocket for FakeDhcpSocket<'_> {
    fn send(&mut self, packet: &[u8]) -> std::io::Result<()> {
        if let Some((kind, broadcast)) = server::request_kind(packet) {
            self.calls
                .borrow_mut()
                .push(NetCall::DhcpSent(format!("{kind:?}"), broadcast));
        }
        let Some(server) = &self.server else {
            return Ok(());
        };
        let mut state = self.state.borrow_mut();
        state.seen += 1;
        if state.seen <= server.ignore_first {
            return Ok(());
        }
        state.queue.extend(server.noise.iter().cloned());
        let is_request = matches!(
            server::request_kind(packet),
            Some((dhcproto::v4::MessageType::Request, _))
        );
        let reply = if server.nak && is_request {
            server::nak(packet, server.server)
        } else {
            server::answer(
                packet,
                server.server,
                server.address,
                server.mask,
                server.router,
                &server.dns,
            )
        };
        state.queue.extend(reply);
        Ok(())
    }

    fn recv(&mut self, timeout: Duration) -> std::io::Result<Option<Vec<u8>>> {
        // Each answer takes a millisecond to arrive; silence uses up the whole timeout.
        match self.state.borrow_mut().queue.pop_front() {
            Some(packet) => {
                self.clock.sleep(Duration::from_millis(1).min(timeout));
                Ok(Some(packet))
            }
            None => {
                self.clock.sleep(timeout);
                Ok(None)
            }
        }
    }
}

impl std::fmt::Debug for FakeDhcpSocket<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeDhcpSocket").finish_non_exhaustive()
    }
}
