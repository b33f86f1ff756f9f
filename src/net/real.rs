//! [`RealNetSys`]: rtnetlink requests through `netlink-sys` (a blocking socket per request,
//! bounded by a receive timeout) with messages from `netlink-packet-route`; the DHCP socket is
//! a UDP socket on port 68 bound to the interface (`SO_BINDTODEVICE`) with `SO_BROADCAST`.

use std::io::{Error, ErrorKind, Write};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage, State};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::protocols::NETLINK_ROUTE;
use netlink_sys::{Socket, SocketAddr};
use nix::sys::socket::{self as nixsock, sockopt};

use super::{DhcpSocket, LinkInfo, NetSys};

/// Bound on one netlink answer (the kernel answers at once; this only keeps PID 1 from ever
/// blocking on it).
const NETLINK_TIMEOUT: Duration = Duration::from_secs(5);

/// The machine's network stack (the calling thread's network namespace).
#[derive(Debug, Default)]
pub struct RealNetSys;

impl RealNetSys {
    /// The real effects.
    pub fn new() -> RealNetSys {
        RealNetSys
    }
}

fn nix_io(e: nix::Error) -> Error {
    Error::from_raw_os_error(e as i32)
}

/// Sends one request and collects the answers until the ACK (or the end of a dump).
fn request(message: RouteNetlinkMessage, flags: u16) -> std::io::Result<Vec<RouteNetlinkMessage>> {
    let socket = Socket::new(NETLINK_ROUTE)?;
    let timeout =
        nix::sys::time::TimeVal::new(i64::try_from(NETLINK_TIMEOUT.as_secs()).unwrap_or(5), 0);
    nixsock::setsockopt(&socket, sockopt::ReceiveTimeout, &timeout).map_err(nix_io)?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
    header.sequence_number = 1;
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
    packet.finalize();
    let mut buf = vec![0u8; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send_to(&buf, &SocketAddr::new(0, 0), 0)?;
    let mut answers = Vec::new();
    loop {
        let (bytes, _) = socket.recv_from_full()?;
        let mut offset = 0;
        while offset < bytes.len() {
            let rest = bytes.get(offset..).unwrap_or_default();
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(rest)
                .map_err(|e| Error::new(ErrorKind::InvalidData, format!("netlink: {e}")))?;
            let len = usize::try_from(msg.header.length).unwrap_or(0);
            if len == 0 {
                return Err(Error::new(ErrorKind::InvalidData, "netlink: empty message"));
            }
            offset += len;
            match msg.payload {
                NetlinkPayload::Error(e) => {
                    return match e.code {
                        None => Ok(answers),
                        Some(_) => Err(e.to_io()),
                    };
                }
                NetlinkPayload::Done(_) => return Ok(answers),
                NetlinkPayload::InnerMessage(inner) => answers.push(inner),
                _ => {}
            }
        }
    }
}

fn operstate(state: &State) -> String {
    format!("{state:?}").to_lowercase()
}

impl NetSys for RealNetSys {
    fn link(&self, name: &str) -> std::io::Result<Option<LinkInfo>> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        let answers = match request(RouteNetlinkMessage::GetLink(msg), 0) {
            Ok(answers) => answers,
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return Ok(None),
            Err(e) => return Err(e),
        };
        for answer in answers {
            let RouteNetlinkMessage::NewLink(link) = answer else {
                continue;
            };
            let mut info = LinkInfo {
                index: link.header.index,
                up: link.header.flags.contains(LinkFlags::Up),
                lower_up: link.header.flags.contains(LinkFlags::LowerUp),
                operstate: "unknown".to_string(),
                mac: Vec::new(),
            };
            for attribute in &link.attributes {
                match attribute {
                    LinkAttribute::OperState(state) => info.operstate = operstate(state),
                    LinkAttribute::Address(mac) => info.mac.clone_from(mac),
                    _ => {}
                }
            }
            return Ok(Some(info));
        }
        Ok(None)
    }

    fn set_up(&self, index: u32) -> std::io::Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        request(RouteNetlinkMessage::SetLink(msg), 0).map(drop)
    }

    fn add_address(&self, index: u32, address: Ipv4Addr, prefix: u8) -> std::io::Result<()> {
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.prefix_len = prefix;
        msg.header.index = index;
        msg.header.scope = if address.is_loopback() {
            AddressScope::Host
        } else {
            AddressScope::Universe
        };
        msg.attributes.push(AddressAttribute::Local(address.into()));
        msg.attributes
            .push(AddressAttribute::Address(address.into()));
        if prefix < 31 {
            let host = u32::MAX >> prefix;
            let broadcast = Ipv4Addr::from(u32::from(address) | host);
            msg.attributes.push(AddressAttribute::Broadcast(broadcast));
        }
        request(
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(drop)
    }

    fn add_default_route(&self, index: u32, gateway: Ipv4Addr) -> std::io::Result<()> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = AddressFamily::Inet;
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.header.protocol = RouteProtocol::Boot;
        msg.header.scope = RouteScope::Universe;
        msg.header.kind = RouteType::Unicast;
        msg.attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet(gateway)));
        msg.attributes.push(RouteAttribute::Oif(index));
        request(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(drop)
    }

    fn dhcp_socket<'a>(&'a self, name: &str) -> std::io::Result<Box<dyn DhcpSocket + 'a>> {
        let fd = nixsock::socket(
            nixsock::AddressFamily::Inet,
            nixsock::SockType::Datagram,
            nixsock::SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(nix_io)?;
        nixsock::setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(nix_io)?;
        nixsock::setsockopt(&fd, sockopt::Broadcast, &true).map_err(nix_io)?;
        nixsock::setsockopt(&fd, sockopt::BindToDevice, &std::ffi::OsString::from(name))
            .map_err(nix_io)?;
        nixsock::bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &nixsock::SockaddrIn::new(0, 0, 0, 0, 68),
        )
        .map_err(nix_io)?;
        Ok(Box::new(RealDhcpSocket {
            socket: UdpSocket::from(fd),
        }))
    }

    fn xid(&self) -> u32 {
        let mut bytes = [0u8; 4];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
        u32::from_ne_bytes(bytes)
    }

    fn write_file(&self, path: &Path, contents: &[u8]) -> std::io::Result<()> {
        // Replaced through a temporary file and a rename, so a reader never sees half a file
        // (and a symlink at `path` is replaced, not followed).
        let tmp = path.with_extension("cvm-warden.tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    }

    fn now(&self) -> Instant {
        Instant::now()
    }

    fn sleep(&self, d: Duration) {
        std::thread::sleep(d);
    }
}

#[derive(Debug)]
struct RealDhcpSocket {
    socket: UdpSocket,
}

impl DhcpSocket for RealDhcpSocket {
    fn send(&mut self, packet: &[u8]) -> std::io::Result<()> {
        self.socket
            .send_to(packet, SocketAddrV4::new(Ipv4Addr::BROADCAST, 67))
            .map(drop)
    }

    fn recv(&mut self, timeout: Duration) -> std::io::Result<Option<Vec<u8>>> {
        self.socket
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
        let mut buf = vec![0u8; 1500];
        match self.socket.recv_from(&mut buf) {
            Ok((n, _)) => {
                buf.truncate(n);
                Ok(Some(buf))
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(None),
            Err(e) => Err(e),
        }
    }
}
