//! `net::apply` with the real netlink effects ([`RealNetSys`]) in network namespaces, as root.
//!
//! Each test makes two namespaces joined by a veth pair: `client` (where cvm-warden
//! configures `eth0`, which starts down and unaddressed) and `server` (`srv0`, addressed
//! `10.99.K.1/24`, where the test's TCP listener and its DHCP server run). The namespaces are
//! removed when the test ends, also when it panics.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "common/netns.rs"]
mod netns;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cvm_warden::firewall::{self, NftFirewall, Phase, Resolution};
use cvm_warden::net::{self, IfacePlan, NetError, NetPlan, RealNetSys};
use cvm_warden::policy::Addressing;
use dhcproto::v4::{DhcpOption, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Encodable};
use nix::sys::socket::{self as nixsock, sockopt};

const TEST: &str = "net_netns";

static NEXT: AtomicUsize = AtomicUsize::new(0);

struct Pair {
    client: String,
    server: String,
    k: u8,
}

fn ip_ok(args: &[&str]) -> String {
    let mut command = Command::new("ip");
    command.args(args).stdin(Stdio::null());
    let (code, output) = netns::run_bounded(command, netns::COMMAND_TIMEOUT);
    assert_eq!(
        code,
        Some(0),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

impl Pair {
    /// The two namespaces and the veth pair; `srv0` is up (with its address) only when
    /// `server_up`.
    fn new(server_up: bool) -> Pair {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("cvmn-{}-{n}", std::process::id());
        let pair = Pair {
            client: format!("{prefix}-c"),
            server: format!("{prefix}-s"),
            k: u8::try_from(n % 250 + 1).unwrap(),
        };
        ip_ok(&["netns", "add", &pair.client]);
        ip_ok(&["netns", "add", &pair.server]);
        ip_ok(&[
            "-n",
            &pair.client,
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "srv0",
            "netns",
            &pair.server,
        ]);
        ip_ok(&[
            "-n",
            &pair.server,
            "addr",
            "add",
            &format!("{}/24", pair.server4()),
            "dev",
            "srv0",
        ]);
        if server_up {
            ip_ok(&["-n", &pair.server, "link", "set", "srv0", "up"]);
        }
        pair
    }

    fn server4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 99, self.k, 1)
    }

    fn client4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 99, self.k, 2)
    }

    fn client_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["-n", &self.client, "-j"];
        all.extend_from_slice(args);
        serde_json::from_str(&ip_ok(&all)).unwrap()
    }

    /// `ADDRESS/PREFIX` of every IPv4 address of `dev` in the client.
    fn client_addresses(&self, dev: &str) -> Vec<String> {
        let json = self.client_json(&["-4", "addr", "show", "dev", dev]);
        // `[{}]` when the device has no IPv4 address.
        json[0]["addr_info"]
            .as_array()
            .map(|infos| {
                infos
                    .iter()
                    .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn client_default_gateway(&self) -> Option<String> {
        let json = self.client_json(&["-4", "route", "show", "default"]);
        json.as_array().unwrap().first().map(|r| {
            format!(
                "{} dev {}",
                r["gateway"].as_str().unwrap(),
                r["dev"].as_str().unwrap()
            )
        })
    }

    fn apply(&self, plan: &NetPlan, resolv: &std::path::Path) -> Result<net::NetReport, NetError> {
        netns::in_netns(&self.client, || {
            net::apply(plan, &RealNetSys::new(), resolv)
        })
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for name in [&self.client, &self.server] {
            let _ = Command::new("ip")
                .args(["netns", "del", name])
                .stdin(Stdio::null())
                .status();
        }
    }
}

fn one(name: &str, addressing: Addressing, timeout: Duration) -> NetPlan {
    NetPlan::Configure {
        interfaces: vec![IfacePlan {
            name: name.to_string(),
            addressing,
            dns: vec![],
            link_timeout: timeout,
        }],
    }
}

#[test]
fn a_static_address_and_default_route_carry_a_tcp_connection() {
    netns::require_root(TEST);
    let pair = Pair::new(true);
    let dir = tempfile::tempdir().unwrap();
    let resolv = dir.path().join("resolv.conf");
    // A listener on the server side, answering one line.
    let listener = netns::in_netns(&pair.server, || {
        TcpListener::bind(SocketAddrV4::new(pair.server4(), 0)).unwrap()
    });
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut conn, from) = listener.accept().unwrap();
        conn.write_all(format!("hello {}\n", from.ip()).as_bytes())
            .unwrap();
    });
    let mut plan = one(
        "eth0",
        Addressing::Static {
            address: pair.client4(),
            prefix: 24,
            gateway: Some(pair.server4()),
        },
        Duration::from_secs(10),
    );
    if let NetPlan::Configure { interfaces } = &mut plan {
        interfaces[0].dns = vec![pair.server4().into()];
    }
    let report = pair.apply(&plan, &resolv).unwrap();
    assert!(report.loopback);
    assert_eq!(report.interfaces[0].source, "static");
    assert_eq!(pair.client_addresses("lo"), ["127.0.0.1/8"]);
    assert_eq!(
        pair.client_addresses("eth0"),
        [format!("{}/24", pair.client4())]
    );
    assert_eq!(
        pair.client_default_gateway(),
        Some(format!("{} dev eth0", pair.server4()))
    );
    assert_eq!(
        std::fs::read_to_string(&resolv).unwrap(),
        format!(
            "# written by cvm-warden from the policy and DHCP leases\nnameserver {}\n",
            pair.server4()
        )
    );
    // A TCP connection from the client to the server across the veth pair.
    let line = netns::in_netns(&pair.client, || {
        let mut conn = TcpStream::connect_timeout(
            &SocketAddrV4::new(pair.server4(), port).into(),
            Duration::from_secs(5),
        )
        .unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut text = String::new();
        conn.read_to_string(&mut text).unwrap();
        text
    });
    server.join().unwrap();
    assert_eq!(line, format!("hello {}\n", pair.client4()));
    // Applying again changes nothing and does not fail (addresses and routes are replaced).
    pair.apply(&plan, &resolv).unwrap();
    assert_eq!(
        pair.client_addresses("eth0"),
        [format!("{}/24", pair.client4())]
    );
}

#[test]
fn the_link_wait_ends_with_a_clear_error_when_the_peer_is_down() {
    netns::require_root(TEST);
    let pair = Pair::new(false);
    let dir = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let error = pair
        .apply(
            &one(
                "eth0",
                Addressing::Static {
                    address: pair.client4(),
                    prefix: 24,
                    gateway: None,
                },
                Duration::from_secs(1),
            ),
            &dir.path().join("resolv.conf"),
        )
        .unwrap_err();
    let waited = started.elapsed();
    let text = error.to_string();
    assert!(
        text.starts_with("interface eth0: no link within 1s (network.interface.eth0.link_timeout); last seen: present (index ")
            && text.contains("), up, no carrier, operstate "),
        "{text}"
    );
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    // Nothing was configured on eth0; lo is up.
    assert!(pair.client_addresses("eth0").is_empty());
    assert_eq!(pair.client_addresses("lo"), ["127.0.0.1/8"]);
}

#[test]
fn a_missing_interface_is_named() {
    netns::require_root(TEST);
    let pair = Pair::new(true);
    let dir = tempfile::tempdir().unwrap();
    let error = pair
        .apply(
            &one("nope0", Addressing::Dhcp, Duration::from_millis(300)),
            &dir.path().join("resolv.conf"),
        )
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "interface nope0: no link within 300ms (network.interface.nope0.link_timeout); last seen: not present; check the VM's network device and its driver module, or raise link_timeout"
    );
}

/// The test's DHCP server on `srv0`: offers `address` (/24, router and name server = the
/// server) to every DISCOVER, acknowledges REQUESTs that name it; broadcasts its answers.
/// Returns what it saw: (message type, broadcast flag) per client message.
fn dhcp_server(
    pair: &Pair,
    address: Ipv4Addr,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<(String, bool)>> {
    let server_ip = pair.server4();
    let socket = netns::in_netns(&pair.server, || {
        let fd = nixsock::socket(
            nixsock::AddressFamily::Inet,
            nixsock::SockType::Datagram,
            nixsock::SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        nixsock::setsockopt(&fd, sockopt::ReuseAddr, &true).unwrap();
        nixsock::setsockopt(&fd, sockopt::Broadcast, &true).unwrap();
        nixsock::setsockopt(
            &fd,
            sockopt::BindToDevice,
            &std::ffi::OsString::from("srv0"),
        )
        .unwrap();
        let socket = UdpSocket::from(fd);
        // Bound through std after SO_BINDTODEVICE: 0.0.0.0:67.
        let socket2 = socket;
        nixsock::bind(
            std::os::fd::AsRawFd::as_raw_fd(&socket2),
            &nixsock::SockaddrIn::new(0, 0, 0, 0, 67),
        )
        .unwrap();
        socket2
    });
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 1500];
        while !stop.load(Ordering::SeqCst) {
            let Ok((n, _)) = socket.recv_from(&mut buf) else {
                continue;
            };
            let Ok(msg) = Message::from_bytes(&buf[..n]) else {
                continue;
            };
            let Some(kind) = msg.opts().msg_type() else {
                continue;
            };
            seen.push((format!("{kind:?}"), msg.flags().broadcast()));
            let answer = match kind {
                MessageType::Discover => MessageType::Offer,
                MessageType::Request
                    if matches!(
                        msg.opts().get(OptionCode::ServerIdentifier),
                        Some(DhcpOption::ServerIdentifier(s)) if *s == server_ip
                    ) =>
                {
                    MessageType::Ack
                }
                _ => continue,
            };
            let mut reply = Message::new_with_id(
                msg.xid(),
                Ipv4Addr::UNSPECIFIED,
                address,
                server_ip,
                Ipv4Addr::UNSPECIFIED,
                msg.chaddr(),
            );
            reply.set_opcode(Opcode::BootReply).set_flags(msg.flags());
            let opts = reply.opts_mut();
            opts.insert(DhcpOption::MessageType(answer));
            opts.insert(DhcpOption::ServerIdentifier(server_ip));
            opts.insert(DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)));
            opts.insert(DhcpOption::Router(vec![server_ip]));
            opts.insert(DhcpOption::DomainNameServer(vec![server_ip]));
            opts.insert(DhcpOption::AddressLeaseTime(600));
            socket
                .send_to(
                    &reply.to_vec().unwrap(),
                    SocketAddrV4::new(Ipv4Addr::BROADCAST, 68),
                )
                .unwrap();
        }
        seen
    })
}

#[test]
fn dhcp_leases_an_address_from_a_server_on_the_link() {
    netns::require_root(TEST);
    let pair = Pair::new(true);
    let dir = tempfile::tempdir().unwrap();
    let resolv = dir.path().join("resolv.conf");
    let leased = Ipv4Addr::new(10, 99, pair.k, 50);
    let stop = Arc::new(AtomicBool::new(false));
    let server = dhcp_server(&pair, leased, Arc::clone(&stop));
    // The exchange runs behind the default-deny perimeter, which admits it on eth0.
    let policy = cvm_warden::policy::parse(
        "attestation = \"none\"\n[workload]\nbundle = \"/opt/w\"\nsource = \"initramfs\"\nexec = [\"/opt/w/run\"]\nuser = 1000\ngroup = 1000\n\n[network]\n[network.interface.eth0]\ndhcp = true\n",
        None,
        &cvm_warden::policy::MemoryUsers::new(),
    )
    .unwrap()
    .policy;
    netns::in_netns(&pair.client, || {
        let resolution = Resolution::default();
        let perimeter = firewall::plan(&policy, Phase::Perimeter, &resolution).unwrap();
        firewall::apply(&perimeter, &mut NftFirewall::new()).unwrap();
    });
    let result = pair.apply(
        &one("eth0", Addressing::Dhcp, Duration::from_secs(10)),
        &resolv,
    );
    stop.store(true, Ordering::SeqCst);
    let seen = server.join().unwrap();
    let report = result.unwrap();
    let lease = report.interfaces[0].lease.clone().unwrap();
    assert_eq!(
        (
            lease.server,
            lease.address,
            lease.prefix,
            lease.router,
            lease.lease_secs
        ),
        (pair.server4(), leased, 24, Some(pair.server4()), 600)
    );
    // DISCOVER (again if the first answer was lost while the veth pair's queues came up),
    // then REQUEST; every one with the broadcast flag.
    let kinds: Vec<&str> = seen.iter().map(|(kind, _)| kind.as_str()).collect();
    assert!(
        kinds.ends_with(&["Discover", "Request"])
            && kinds.iter().filter(|k| **k == "Request").count() == 1,
        "{seen:?}"
    );
    assert!(seen.iter().all(|(_, broadcast)| *broadcast), "{seen:?}");
    assert_eq!(report.dhcp_servers()[0].server, pair.server4());
    // The allowlist pins that server.
    netns::in_netns(&pair.client, || {
        let mut resolution = Resolution::default();
        for pin in report.dhcp_servers() {
            resolution.pin_dhcp(pin.interface, pin.server);
        }
        let allowlist = firewall::plan(&policy, Phase::Allowlist, &resolution).unwrap();
        assert!(allowlist.nft_text().contains(&format!(
            "iifname \"eth0\" ip saddr {} udp sport 67 udp dport 68",
            pair.server4()
        )));
        firewall::apply(&allowlist, &mut NftFirewall::new()).unwrap();
    });
    assert_eq!(pair.client_addresses("eth0"), [format!("{leased}/24")]);
    assert_eq!(
        pair.client_default_gateway(),
        Some(format!("{} dev eth0", pair.server4()))
    );
    assert_eq!(
        std::fs::read_to_string(&resolv).unwrap(),
        format!(
            "# written by cvm-warden from the policy and DHCP leases\nnameserver {}\n",
            pair.server4()
        )
    );
}
