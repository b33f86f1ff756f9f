//! The DHCPv4 client: DISCOVER → OFFER → REQUEST → ACK (RFC 2131) with the broadcast flag
//! set, over a [`DhcpSocket`] bound to the interface, messages encoded and decoded by
//! `dhcproto`. Retransmits with doubling waits (RFC 2131 §4.1, without the random jitter)
//! within [`DHCP_TIMEOUT`]. Only answers carrying our transaction id and hardware address are
//! read; the first acceptable offer is taken and only its server's ACK or NAK counts.

use std::net::Ipv4Addr;
use std::time::Duration;

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Encodable};
use serde::Serialize;

use super::{DhcpSocket, NetError, NetSys};

/// Bound on the whole exchange, retransmissions included.
pub const DHCP_TIMEOUT: Duration = Duration::from_secs(30);

/// The first retransmission wait; it doubles up to [`MAX_RETRANSMIT`].
const FIRST_RETRANSMIT: Duration = Duration::from_secs(1);
const MAX_RETRANSMIT: Duration = Duration::from_secs(8);

/// A DHCPv4 lease as applied (pinned: not renewed by this release).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Lease {
    /// The server identifier (option 54): the only DHCP server admitted afterwards.
    pub server: Ipv4Addr,
    /// The leased address.
    pub address: Ipv4Addr,
    /// Prefix length from the subnet mask (option 1).
    pub prefix: u8,
    /// The first router (option 3), if any.
    pub router: Option<Ipv4Addr>,
    /// Name servers (option 6).
    pub dns: Vec<Ipv4Addr>,
    /// Lease time in seconds (option 51).
    pub lease_secs: u32,
    /// The transaction id used.
    pub xid: u32,
}

fn dhcp_error(interface: &str, why: impl Into<String>) -> NetError {
    NetError::Dhcp {
        interface: interface.to_string(),
        why: why.into(),
    }
}

fn request(
    xid: u32,
    mac: &[u8],
    kind: MessageType,
    offer: Option<(Ipv4Addr, Ipv4Addr)>,
) -> Message {
    let mut msg = Message::new_with_id(
        xid,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        mac,
    );
    msg.set_opcode(Opcode::BootRequest)
        .set_flags(Flags::default().set_broadcast());
    let opts = msg.opts_mut();
    opts.insert(DhcpOption::MessageType(kind));
    let mut client_id = vec![1u8];
    client_id.extend_from_slice(mac);
    opts.insert(DhcpOption::ClientIdentifier(client_id));
    opts.insert(DhcpOption::ParameterRequestList(vec![
        OptionCode::SubnetMask,
        OptionCode::Router,
        OptionCode::DomainNameServer,
        OptionCode::AddressLeaseTime,
        OptionCode::ServerIdentifier,
    ]));
    if let Some((address, server)) = offer {
        opts.insert(DhcpOption::RequestedIpAddress(address));
        opts.insert(DhcpOption::ServerIdentifier(server));
    }
    msg
}

/// What a server answered, once checked against our transaction.
enum Answer {
    Offer(Lease),
    Ack(Lease),
    Nak {
        server: Option<Ipv4Addr>,
        message: String,
    },
}

fn server_id(msg: &Message) -> Option<Ipv4Addr> {
    match msg.opts().get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
        _ => None,
    }
}

/// Reads a reply: `Ok(None)` for one that is not for us (another xid or client, not a
/// reply), `Err` for one that is for us but unusable.
fn read_answer(bytes: &[u8], xid: u32, mac: &[u8]) -> Result<Option<Answer>, String> {
    let Ok(msg) = Message::from_bytes(bytes) else {
        return Ok(None);
    };
    if msg.opcode() != Opcode::BootReply || msg.xid() != xid || msg.chaddr() != mac {
        return Ok(None);
    }
    let opts = msg.opts();
    let kind = opts.msg_type();
    if kind == Some(MessageType::Nak) {
        let message = match opts.get(OptionCode::Message) {
            Some(DhcpOption::Message(text)) => crate::report::sanitize(text, 200),
            _ => String::new(),
        };
        return Ok(Some(Answer::Nak {
            server: server_id(&msg),
            message,
        }));
    }
    if kind != Some(MessageType::Offer) && kind != Some(MessageType::Ack) {
        return Ok(None);
    }
    let address = msg.yiaddr();
    let server = server_id(&msg).ok_or("the answer has no server identifier (option 54)")?;
    if address.is_unspecified()
        || address.is_broadcast()
        || address.is_multicast()
        || address.is_loopback()
    {
        return Err(format!(
            "server {server} offered the address {address}, which no interface can have"
        ));
    }
    let prefix = match opts.get(OptionCode::SubnetMask) {
        Some(DhcpOption::SubnetMask(mask)) => {
            let bits = u32::from(*mask);
            let prefix = bits.leading_ones();
            if bits.count_ones() != prefix || !(1..=32).contains(&prefix) {
                return Err(format!("server {server} sent the subnet mask {mask}, which is not a prefix"));
            }
            u8::try_from(prefix).unwrap_or(32)
        }
        _ => return Err(format!("server {server} sent no subnet mask (option 1); configure it to send one, or use a static address")),
    };
    let router = match opts.get(OptionCode::Router) {
        Some(DhcpOption::Router(routers)) => routers.first().copied(),
        _ => None,
    };
    let dns = match opts.get(OptionCode::DomainNameServer) {
        Some(DhcpOption::DomainNameServer(servers)) => servers.clone(),
        _ => Vec::new(),
    };
    let lease_secs = match opts.get(OptionCode::AddressLeaseTime) {
        Some(DhcpOption::AddressLeaseTime(secs)) => *secs,
        _ => return Err(format!("server {server} sent no lease time (option 51)")),
    };
    let lease = Lease {
        server,
        address,
        prefix,
        router,
        dns,
        lease_secs,
        xid,
    };
    Ok(Some(if kind == Some(MessageType::Offer) {
        Answer::Offer(lease)
    } else {
        Answer::Ack(lease)
    }))
}

/// One client's transaction: the interface, our transaction id and hardware address, and
/// the end of the whole exchange.
struct Transaction<'a> {
    interface: &'a str,
    xid: u32,
    mac: &'a [u8],
    deadline: std::time::Instant,
}

/// Sends `msg` and waits for an answer that `accept` takes, retransmitting with doubling
/// waits until the transaction's deadline. Answers `accept` refuses are skipped; the last
/// problem is kept for the error.
fn exchange<T>(
    tx: &Transaction<'_>,
    socket: &mut dyn DhcpSocket,
    sys: &dyn NetSys,
    (msg, what): (&[u8], &str),
    mut accept: impl FnMut(Answer) -> Result<Option<T>, String>,
) -> Result<T, NetError> {
    let interface = tx.interface;
    let mut wait = FIRST_RETRANSMIT;
    let mut sent = 0u32;
    let mut last_problem: Option<String> = None;
    loop {
        let now = sys.now();
        if now >= tx.deadline {
            let tail = last_problem.map_or_else(
                || "no answer".to_string(),
                |p| format!("last answer refused: {p}"),
            );
            return Err(dhcp_error(
                interface,
                format!(
                    "no {what} within {} after {sent} tries ({tail}); check that a DHCP server serves this network",
                    humantime::format_duration(DHCP_TIMEOUT)
                ),
            ));
        }
        socket
            .send(msg)
            .map_err(|e| dhcp_error(interface, format!("cannot send: {e}")))?;
        sent += 1;
        let round_end = (now + wait).min(tx.deadline);
        loop {
            let now = sys.now();
            if now >= round_end {
                break;
            }
            let packet = socket
                .recv(round_end.saturating_duration_since(now))
                .map_err(|e| dhcp_error(interface, format!("cannot receive: {e}")))?;
            let Some(packet) = packet else { break };
            match read_answer(&packet, tx.xid, tx.mac) {
                Ok(None) => {}
                Ok(Some(answer)) => match accept(answer) {
                    Ok(Some(done)) => return Ok(done),
                    Ok(None) => {}
                    Err(problem) => last_problem = Some(problem),
                },
                Err(problem) => last_problem = Some(problem),
            }
        }
        wait = (wait * 2).min(MAX_RETRANSMIT);
    }
}

/// Obtains a lease on `interface` whose hardware address is `mac`.
pub(super) fn obtain(interface: &str, mac: &[u8], sys: &dyn NetSys) -> Result<Lease, NetError> {
    if mac.len() != 6 {
        return Err(dhcp_error(
            interface,
            format!(
                "the interface has a {}-byte hardware address; DHCP is supported on Ethernet only, so configure a static address",
                mac.len()
            ),
        ));
    }
    let mut socket = sys
        .dhcp_socket(interface)
        .map_err(|e| dhcp_error(interface, format!("cannot open a socket on port 68: {e}")))?;
    let xid = sys.xid();
    let tx = Transaction {
        interface,
        xid,
        mac,
        deadline: sys.now() + DHCP_TIMEOUT,
    };
    let encode = |msg: Message| {
        msg.to_vec()
            .map_err(|e| dhcp_error(interface, format!("cannot encode a message: {e}")))
    };
    let discover = encode(request(xid, mac, MessageType::Discover, None))?;
    let offer = exchange(
        &tx,
        socket.as_mut(),
        sys,
        (&discover, "offer"),
        |answer| match answer {
            Answer::Offer(lease) => Ok(Some(lease)),
            // A NAK or ACK to a DISCOVER is not ours to act on.
            _ => Ok(None),
        },
    )?;
    let req = encode(request(
        xid,
        mac,
        MessageType::Request,
        Some((offer.address, offer.server)),
    ))?;
    exchange(
        &tx,
        socket.as_mut(),
        sys,
        (&req, "acknowledgement"),
        |answer| match answer {
            Answer::Ack(lease) if lease.server == offer.server => {
                if lease.address == offer.address {
                    Ok(Some(lease))
                } else {
                    Err(format!(
                        "server {} acknowledged {} instead of the offered {}",
                        lease.server, lease.address, offer.address
                    ))
                }
            }
            Answer::Nak { server, message } if server.is_none_or(|s| s == offer.server) => {
                Err(format!(
                    "server {} refused the offered {} (NAK{})",
                    offer.server,
                    offer.address,
                    if message.is_empty() {
                        String::new()
                    } else {
                        format!(": {message}")
                    }
                ))
            }
            _ => Ok(None),
        },
    )
}

pub(crate) mod server {
    //! A minimal DHCP server's answers, for [`super::super::FakeNetSys`].
    use super::*;

    /// The reply of a server at `server` leasing `address` to the request `bytes`: an OFFER
    /// to a DISCOVER, an ACK to a REQUEST naming this server; `None` otherwise.
    pub(crate) fn answer(
        bytes: &[u8],
        server: Ipv4Addr,
        address: Ipv4Addr,
        mask: Ipv4Addr,
        router: Option<Ipv4Addr>,
        dns: &[Ipv4Addr],
    ) -> Option<Vec<u8>> {
        let msg = Message::from_bytes(bytes).ok()?;
        let kind = match msg.opts().msg_type()? {
            MessageType::Discover => MessageType::Offer,
            MessageType::Request if server_id(&msg) == Some(server) => MessageType::Ack,
            _ => return None,
        };
        let mut reply = Message::new_with_id(
            msg.xid(),
            Ipv4Addr::UNSPECIFIED,
            address,
            server,
            Ipv4Addr::UNSPECIFIED,
            msg.chaddr(),
        );
        reply.set_opcode(Opcode::BootReply).set_flags(msg.flags());
        let opts = reply.opts_mut();
        opts.insert(DhcpOption::MessageType(kind));
        opts.insert(DhcpOption::ServerIdentifier(server));
        opts.insert(DhcpOption::SubnetMask(mask));
        opts.insert(DhcpOption::AddressLeaseTime(3600));
        if let Some(router) = router {
            opts.insert(DhcpOption::Router(vec![router]));
        }
        if !dns.is_empty() {
            opts.insert(DhcpOption::DomainNameServer(dns.to_vec()));
        }
        reply.to_vec().ok()
    }

    /// Whether `bytes` is a client message with the broadcast flag set, and its type.
    pub(crate) fn request_kind(bytes: &[u8]) -> Option<(MessageType, bool)> {
        let msg = Message::from_bytes(bytes).ok()?;
        Some((msg.opts().msg_type()?, msg.flags().broadcast()))
    }

    /// A NAK from `server` to the request `bytes`.
    pub(crate) fn nak(bytes: &[u8], server: Ipv4Addr) -> Option<Vec<u8>> {
        let msg = Message::from_bytes(bytes).ok()?;
        let mut reply = Message::new_with_id(
            msg.xid(),
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            msg.chaddr(),
        );
        reply.set_opcode(Opcode::BootReply);
        reply
            .opts_mut()
            .insert(DhcpOption::MessageType(MessageType::Nak));
        reply
            .opts_mut()
            .insert(DhcpOption::ServerIdentifier(server));
        reply.to_vec().ok()
    }
}
