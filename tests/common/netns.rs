//! Real-packet harness: three network namespaces joined by veth pairs, created and removed by
//! the test.
//!
//! ```text
//!   other ─────────────────────────── vm ─────────────────────────── peer
//!   10.232.K.3      10.232.K.1 (other0)  10.231.K.1 (peer0)      10.231.K.2, 10.231.K.20
//!   fd00:232:K::3   fd00:232:K::1        fd00:231:K::1           fd00:231:K::2
//! ```
//!
//! `vm` is where cvm-warden's ruleset goes; `peer` plays the key broker and the FL server (or
//! the FL client connecting in); `other` is an unrelated host that the VM can route to, so only
//! the ruleset keeps packets from reaching it. Every [`Net`] gets its own namespace names
//! (`cvmw-<pid>-<n>-vm`, `-peer`, `-other`) and its own `K`, so tests run in parallel.
//!
//! Sockets are made inside a namespace by a short-lived thread that `setns`es itself into it:
//! a socket belongs to the namespace it was created in, whichever thread uses it later, so
//! listeners and clients need no child process. Raw ICMP (echo, crafted path-MTU errors) is
//! done by `python3` under `ip netns exec`, because tests may not use `unsafe`.
//!
//! Everything is bounded: a TCP probe gives up after [`PROBE_TIMEOUT`], a command after
//! [`COMMAND_TIMEOUT`]. [`Net`]'s `Drop` stops the listeners, kills the children and deletes
//! the namespaces (which removes the veth pairs), also when the test panics.

#![allow(dead_code)]

use std::fs::File;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a TCP probe waits for the handshake, and then for the answer line. An accepted
/// connection on a veth pair takes well under a millisecond; a dropped SYN is retransmitted
/// after one second, so one second tells "dropped" from "refused" with no doubt.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(1000);

/// How long a command (`ip`, `nft`, `cvm-warden`, `python3`) may run.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

/// Which of the three namespaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The confidential VM: the ruleset under test goes here.
    Vm,
    /// The broker / FL server / FL client, directly linked to `vm`.
    Peer,
    /// An unrelated host, directly linked to `vm` on another subnet.
    Other,
}

impl Side {
    fn suffix(self) -> &'static str {
        match self {
            Side::Vm => "vm",
            Side::Peer => "peer",
            Side::Other => "other",
        }
    }
}

/// What a TCP probe saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// The handshake completed and the listener answered this line (without the newline).
    Answered(String),
    /// The handshake completed but no line came (the connection was accepted and then closed,
    /// or the answer was dropped).
    Silent,
    /// A TCP reset: nothing listens there (or a `reject with tcp reset`).
    Refused,
    /// No answer to the SYN within [`PROBE_TIMEOUT`]: the packet (or its answer) was dropped.
    TimedOut,
    /// Any other error (an ICMP unreachable, no route, …), with its text.
    Failed(String),
}

/// Fails the test (it never skips) unless it runs as root.
pub fn require_root(test: &str) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "tests/{test}.rs needs root: it creates network namespaces and veth pairs and loads \
         nftables rulesets into them; run it as root (CI does), e.g. \
         `sudo -E cargo test --test {test}`"
    );
}

/// Runs `command` (whose stdin the caller has set) with its output captured, killing it after
/// `limit`. Returns `None` for the status when it was killed.
pub fn run_bounded(mut command: Command, limit: Duration) -> (Option<i32>, Output) {
    let shown = format!("{command:?}");
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {shown}: {e}"));
    let out = read_all_in_background(child.stdout.take().unwrap());
    let err = read_all_in_background(child.stderr.take().unwrap());
    let started = Instant::now();
    let mut killed = false;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            killed = true;
            break child
                .wait()
                .unwrap_or_else(|e| panic!("cannot wait for {shown}: {e}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let output = Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    };
    (if killed { None } else { status.code() }, output)
}

fn read_all_in_background(mut pipe: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut all = Vec::new();
        let _ = pipe.read_to_end(&mut all);
        all
    })
}

/// Runs `f` on a fresh thread that has entered the network namespace `name` (only that thread
/// moves; sockets it creates stay in the namespace).
pub fn in_netns<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{name}");
    let file = File::open(&path).unwrap_or_else(|e| panic!("cannot open {path}: {e}"));
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("setns into {path}: {e}"));
                f()
            })
            .join()
            .unwrap_or_else(|_| panic!("the thread in network namespace {name} panicked"))
    })
}

/// The three namespaces, their links and addresses, and what runs in them.
#[derive(Debug)]
pub struct Net {
    prefix: String,
    k: u8,
    listeners: Mutex<Vec<Listener>>,
    children: Mutex<Vec<Child>>,
    created: Vec<String>,
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

impl Net {
    /// Creates `cvmw-<pid>-<n>-{vm,peer,other}`, the veth pairs `vm:peer0 <-> peer:vm0` and
    /// `vm:other0 <-> other:vm0`, their addresses (IPv4 and IPv6, without duplicate address
    /// detection; `peer` has a second IPv4 address) and brings everything up, loopback
    /// included. No routes beyond the connected ones: every host is one hop from `vm`. Panics with the failing command
    /// (after removing what was created) if any step fails.
    pub fn new() -> Net {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let mut net = Net {
            prefix: format!("cvmw-{}-{n}", std::process::id()),
            k: u8::try_from(n % 250 + 1).unwrap(),
            listeners: Mutex::new(Vec::new()),
            children: Mutex::new(Vec::new()),
            created: Vec::new(),
        };
        for side in [Side::Vm, Side::Peer, Side::Other] {
            let name = net.name(side);
            host_ok(&["ip", "netns", "add", &name]);
            net.created.push(name);
            net.ip_ok(side, &["link", "set", "lo", "up"]);
        }
        let (vm, peer, other) = (
            net.name(Side::Vm),
            net.name(Side::Peer),
            net.name(Side::Other),
        );
        host_ok(&[
            "ip", "-n", &vm, "link", "add", "peer0", "type", "veth", "peer", "name", "vm0",
            "netns", &peer,
        ]);
        host_ok(&[
            "ip", "-n", &vm, "link", "add", "other0", "type", "veth", "peer", "name", "vm0",
            "netns", &other,
        ]);
        let plan: Vec<(Side, &str, IpAddr, IpAddr)> = vec![
            (Side::Vm, "peer0", net.vm4().into(), net.vm6().into()),
            (
                Side::Vm,
                "other0",
                net.vm_other4().into(),
                net.vm_other6().into(),
            ),
            (Side::Peer, "vm0", net.peer4().into(), net.peer6().into()),
            (Side::Other, "vm0", net.other4().into(), net.other6().into()),
        ];
        // `nodad`: the IPv6 addresses are usable at once.
        for (side, dev, v4, v6) in &plan {
            net.ip_ok(*side, &["addr", "add", &format!("{v4}/24"), "dev", dev]);
            net.ip_ok(
                *side,
                &[
                    "-6",
                    "addr",
                    "add",
                    &format!("{v6}/64"),
                    "dev",
                    dev,
                    "nodad",
                ],
            );
            net.ip_ok(*side, &["link", "set", dev, "up"]);
        }
        let alt = format!("{}/24", net.peer4_alt());
        net.ip_ok(Side::Peer, &["addr", "add", &alt, "dev", "vm0"]);
        net
    }

    /// The namespace's name, for `ip netns exec`.
    pub fn name(&self, side: Side) -> String {
        format!("{}-{}", self.prefix, side.suffix())
    }

    /// `vm`'s IPv4 address on the link to `peer` (10.231.K.1).
    pub fn vm4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 231, self.k, 1)
    }
    /// `peer`'s IPv4 address (10.231.K.2).
    pub fn peer4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 231, self.k, 2)
    }
    /// `peer`'s second IPv4 address (10.231.K.20), so two services on `peer` (the key broker
    /// and the FL server) can have different addresses.
    pub fn peer4_alt(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 231, self.k, 20)
    }
    /// `vm`'s IPv4 address on the link to `other` (10.232.K.1).
    pub fn vm_other4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 232, self.k, 1)
    }
    /// `other`'s IPv4 address (10.232.K.3).
    pub fn other4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 232, self.k, 3)
    }
    /// `vm`'s IPv6 address on the link to `peer` (fd00:231:K::1).
    pub fn vm6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x231, self.k.into(), 0, 0, 0, 0, 1)
    }
    /// `peer`'s IPv6 address (fd00:231:K::2).
    pub fn peer6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x231, self.k.into(), 0, 0, 0, 0, 2)
    }
    /// `vm`'s IPv6 address on the link to `other` (fd00:232:K::1).
    pub fn vm_other6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x232, self.k.into(), 0, 0, 0, 0, 1)
    }
    /// `other`'s IPv6 address (fd00:232:K::3).
    pub fn other6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x232, self.k.into(), 0, 0, 0, 0, 3)
    }

    /// `ip netns exec <ns> <argv…>`, bounded by [`COMMAND_TIMEOUT`]; `None` status when killed.
    pub fn exec(&self, side: Side, argv: &[&str]) -> (Option<i32>, Output) {
        self.exec_stdin(side, argv, None)
    }

    /// Like [`Net::exec`], with `stdin` fed to the command.
    pub fn exec_stdin(
        &self,
        side: Side,
        argv: &[&str],
        stdin: Option<&str>,
    ) -> (Option<i32>, Output) {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name(side)]).args(argv);
        match stdin {
            None => command.stdin(Stdio::null()),
            Some(text) => {
                let mut file = tempfile::tempfile().unwrap();
                file.write_all(text.as_bytes()).unwrap();
                std::io::Seek::rewind(&mut file).unwrap();
                command.stdin(file)
            }
        };
        run_bounded(command, COMMAND_TIMEOUT)
    }

    /// Runs `argv` in the namespace and returns its stdout; fails the test with the command, its
    /// status and both outputs unless it exits 0.
    pub fn ok(&self, side: Side, argv: &[&str]) -> String {
        let (code, output) = self.exec(side, argv);
        check_ok(&format!("in {}: {argv:?}", self.name(side)), code, &output)
    }

    /// `ip <args…>` inside the namespace.
    pub fn ip_ok(&self, side: Side, args: &[&str]) -> String {
        let mut argv = vec!["ip"];
        argv.extend_from_slice(args);
        self.ok(side, &argv)
    }

    /// Loads nftables text with `nft -f -` inside the namespace (the test fails if nft refuses).
    pub fn nft_load(&self, side: Side, ruleset: &str) {
        let (code, output) = self.exec_stdin(side, &["nft", "-f", "-"], Some(ruleset));
        check_ok(
            &format!("nft -f - in {} of\n{ruleset}", self.name(side)),
            code,
            &output,
        );
    }

    /// `nft -j list ruleset` inside the namespace, parsed, with every `handle` removed (handles
    /// are allocation order, not content).
    pub fn nft_ruleset_json(&self, side: Side) -> serde_json::Value {
        let text = self.ok(side, &["nft", "-j", "list", "ruleset"]);
        let mut value: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("nft -j list ruleset printed no JSON ({e}): {text}"));
        strip_handles(&mut value);
        value
    }

    /// `nft -j list table inet cvm_warden` inside the namespace, parsed, handles removed.
    pub fn nft_table_json(&self, side: Side) -> serde_json::Value {
        let text = self.ok(side, &["nft", "-j", "list", "table", "inet", "cvm_warden"]);
        let mut value: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!("nft -j list table inet cvm_warden printed no JSON ({e}): {text}")
        });
        strip_handles(&mut value);
        value
    }

    /// Starts a TCP listener in the namespace on `addr` that answers every connection with
    /// [`Net::answer_of`]`(side, addr)` and a newline, then echoes each line the client sends
    /// ([`echo`]) and keeps the connection open until the client closes it (or 10 s pass with
    /// nothing received). The listener lives until the `Net` is dropped.
    pub fn listen(&self, side: Side, addr: SocketAddr) {
        let name = self.name(side);
        let listener = in_netns(&name, || TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("cannot listen on {addr} in {name}: {e}"));
        listener.set_nonblocking(true).unwrap();
        let answer = Net::answer_of(side, addr);
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (stop2, accepted2) = (Arc::clone(&stop), Arc::clone(&accepted));
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        accepted2.fetch_add(1, Ordering::SeqCst);
                        let answer = answer.clone();
                        std::thread::spawn(move || serve(stream, &answer));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        self.listeners.lock().unwrap().push(Listener {
            addr,
            side,
            stop,
            accepted,
            thread: Some(thread),
        });
    }

    /// The line a listener started by [`Net::listen`] answers.
    pub fn answer_of(side: Side, addr: SocketAddr) -> String {
        format!("cvmw {} {addr}", side.suffix())
    }

    /// How many connections the listener on `side`/`addr` has accepted.
    pub fn accepted(&self, side: Side, addr: SocketAddr) -> usize {
        self.listeners
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.side == side && l.addr == addr)
            .unwrap_or_else(|| panic!("no listener on {addr} in {side:?}"))
            .accepted
            .load(Ordering::SeqCst)
    }

    /// Connects from `side` to `to` (bounded by [`PROBE_TIMEOUT`]) and reads one line.
    pub fn connect(&self, side: Side, to: SocketAddr) -> Probe {
        in_netns(&self.name(side), || probe(to))
    }

    /// Runs every probe `(from, to)` at once (so N dropped probes cost one timeout, not N) and
    /// returns the results in order.
    pub fn probe_all(&self, probes: &[(Side, SocketAddr)]) -> Vec<Probe> {
        std::thread::scope(|scope| {
            let handles: Vec<_> = probes
                .iter()
                .map(|&(side, to)| scope.spawn(move || self.connect(side, to)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// Connects from `side` to `to` and returns the open stream after the answer line was read
    /// (fails the test otherwise): an established connection in the conntrack table, e.g. to
    /// quote in a crafted ICMP error.
    pub fn connect_held(&self, side: Side, to: SocketAddr) -> TcpStream {
        in_netns(&self.name(side), || {
            let stream = TcpStream::connect_timeout(&to, PROBE_TIMEOUT)
                .unwrap_or_else(|e| panic!("connect from {side:?} to {to}: {e}"));
            stream.set_read_timeout(Some(PROBE_TIMEOUT)).unwrap();
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line).unwrap();
            assert!(!line.is_empty(), "no answer from {to} to {side:?}");
            stream
        })
    }

    /// Sends one ICMP (v4) or ICMPv6 echo request from `side` to `to` with a raw socket and
    /// tells whether the echo reply came back within [`PROBE_TIMEOUT`].
    pub fn ping(&self, side: Side, to: IpAddr) -> bool {
        let timeout = PROBE_TIMEOUT.as_secs_f64().to_string();
        let out = self.ok(
            side,
            &["python3", "-c", ICMP_PY, "ping", &to.to_string(), &timeout],
        );
        match out.trim() {
            "reply" => true,
            "timeout" => false,
            other => panic!("ping helper printed {other:?}"),
        }
    }

    /// Sends from `from` to `to` a crafted ICMP error `error` about the TCP segment
    /// `inner_src` -> `inner_dst` (a segment `to` sent, quoted the way routers quote it: the IP
    /// header and the first 8 bytes of TCP), while a raw ICMP socket in `to` waits for it.
    /// Tells whether it reached `to`'s sockets, i.e. got through `to`'s input hook. The
    /// addresses' family picks ICMP or ICMPv6.
    pub fn icmp_error_arrives(
        &self,
        from: Side,
        to: Side,
        error: IcmpError,
        inner_src: SocketAddr,
        inner_dst: SocketAddr,
    ) -> bool {
        let (kind, code, mtu) = error.type_code_mtu(inner_src.is_ipv4());
        let (kind, code, mtu) = (kind.to_string(), code.to_string(), mtu.to_string());
        let family = if inner_src.is_ipv4() { "4" } else { "6" };
        let timeout = (PROBE_TIMEOUT.as_secs_f64() * 1.5).to_string();
        let mut receiver = Command::new("ip");
        receiver
            .args([
                "netns",
                "exec",
                &self.name(to),
                "python3",
                "-c",
                ICMP_PY,
                "expect-error",
            ])
            .args([
                family,
                &kind,
                &code,
                &inner_dst.port().to_string(),
                &timeout,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = receiver
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start python3: {e}"));
        let stdout = child.stdout.take().unwrap();
        let stderr = read_all_in_background(child.stderr.take().unwrap());
        self.children.lock().unwrap().push(child);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let first = rx.recv_timeout(COMMAND_TIMEOUT);
        assert_eq!(
            first.as_deref(),
            Ok("ready"),
            "the ICMP receiver in {to:?} did not start: {}",
            String::from_utf8_lossy(&stderr.join().unwrap())
        );
        self.ok(
            from,
            &[
                "python3",
                "-c",
                ICMP_PY,
                "send-error",
                &inner_src.ip().to_string(),
                &inner_src.port().to_string(),
                &inner_dst.ip().to_string(),
                &inner_dst.port().to_string(),
                &kind,
                &code,
                &mtu,
            ],
        );
        let verdict = rx.recv_timeout(COMMAND_TIMEOUT);
        match verdict.as_deref() {
            Ok("seen") => true,
            Ok("not seen") => false,
            other => panic!(
                "the ICMP receiver in {to:?} printed {other:?}: {}",
                String::from_utf8_lossy(&stderr.join().unwrap())
            ),
        }
    }
}

/// An ICMP error that [`Net::icmp_error_arrives`] crafts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IcmpError {
    /// Path MTU: ICMP destination-unreachable / fragmentation-needed (type 3 code 4), or
    /// ICMPv6 packet-too-big (type 2), with this next-hop MTU.
    PathMtu(u16),
    /// ICMP destination-unreachable / port-unreachable (type 3 code 3), or ICMPv6
    /// destination-unreachable / port-unreachable (type 1 code 4).
    PortUnreachable,
}

impl IcmpError {
    fn type_code_mtu(self, v4: bool) -> (u8, u8, u16) {
        match (self, v4) {
            (IcmpError::PathMtu(mtu), true) => (3, 4, mtu),
            (IcmpError::PathMtu(mtu), false) => (2, 0, mtu),
            (IcmpError::PortUnreachable, true) => (3, 3, 0),
            (IcmpError::PortUnreachable, false) => (1, 4, 0),
        }
    }
}

impl Default for Net {
    fn default() -> Net {
        Net::new()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let listeners =
            std::mem::take(&mut *self.listeners.lock().unwrap_or_else(|p| p.into_inner()));
        for mut listener in listeners {
            listener.stop.store(true, Ordering::SeqCst);
            if let Some(thread) = listener.thread.take() {
                let _ = thread.join();
            }
        }
        let children =
            std::mem::take(&mut *self.children.lock().unwrap_or_else(|p| p.into_inner()));
        for mut child in children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for name in self.created.iter().rev() {
            let mut command = Command::new("ip");
            command.args(["netns", "del", name]).stdin(Stdio::null());
            let (code, output) = run_bounded(command, COMMAND_TIMEOUT);
            if code != Some(0) {
                eprintln!(
                    "warning: `ip netns del {name}` failed ({code:?}): {}; remove it by hand",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
        }
    }
}

#[derive(Debug)]
struct Listener {
    addr: SocketAddr,
    side: Side,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

fn serve(mut stream: TcpStream, answer: &str) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    if stream.write_all(format!("{answer}\n").as_bytes()).is_err() {
        return;
    }
    // Keep the connection established until the client closes it, echoing every line the
    // client sends (so a test can tell whether data still flows on an old connection).
    let Ok(reader) = stream.try_clone() else {
        return;
    };
    for line in BufReader::new(reader).lines() {
        let Ok(line) = line else { return };
        if stream.write_all(format!("{line}\n").as_bytes()).is_err() {
            return;
        }
    }
}

/// Sends `line` on a held connection and waits up to [`PROBE_TIMEOUT`] for the listener's
/// echo: `Some(echoed line)` when it came back, `None` when nothing came (dropped).
pub fn echo(stream: &TcpStream, line: &str) -> Option<String> {
    let mut writer = stream;
    writer
        .write_all(format!("{line}\n").as_bytes())
        .unwrap_or_else(|e| panic!("cannot send on the held connection: {e}"));
    stream.set_read_timeout(Some(PROBE_TIMEOUT)).unwrap();
    let mut answer = String::new();
    match BufReader::new(stream).read_line(&mut answer) {
        Ok(n) if n > 0 => Some(answer.trim_end().to_owned()),
        _ => None,
    }
}

fn probe(to: SocketAddr) -> Probe {
    let stream = match TcpStream::connect_timeout(&to, PROBE_TIMEOUT) {
        Ok(stream) => stream,
        Err(e) => {
            return match e.kind() {
                ErrorKind::ConnectionRefused => Probe::Refused,
                ErrorKind::TimedOut | ErrorKind::WouldBlock => Probe::TimedOut,
                _ => Probe::Failed(e.to_string()),
            }
        }
    };
    stream.set_read_timeout(Some(PROBE_TIMEOUT)).unwrap();
    let mut line = String::new();
    match BufReader::new(&stream).read_line(&mut line) {
        Ok(n) if n > 0 => Probe::Answered(line.trim_end().to_owned()),
        _ => Probe::Silent,
    }
}

fn host_ok(argv: &[&str]) -> String {
    let mut command = Command::new(argv[0]);
    command.args(&argv[1..]).stdin(Stdio::null());
    let (code, output) = run_bounded(command, COMMAND_TIMEOUT);
    check_ok(&format!("{argv:?}"), code, &output)
}

fn check_ok(what: &str, code: Option<i32>, output: &Output) -> String {
    assert_eq!(
        code,
        Some(0),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        if code.is_none() {
            "timed out".to_owned()
        } else {
            format!("exit {code:?}")
        },
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn strip_handles(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            map.remove("handle");
            map.values_mut().for_each(strip_handles);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(strip_handles),
        _ => {}
    }
}

/// Raw ICMP helper (python3, standard library only).
///
/// - `ping DST TIMEOUT`: one echo request; prints `reply` or `timeout`.
/// - `expect-error 4|6 TYPE CODE PORT TIMEOUT`: prints `ready`, then `seen` when an ICMP(v6)
///   error of that type and code quoting a TCP segment to PORT arrives, else `not seen`.
/// - `send-error SRC SPORT DST DPORT TYPE CODE MTU`: sends that error, quoting the segment
///   SRC:SPORT -> DST:DPORT, to SRC (MTU: the next-hop MTU field; 0 for other errors).
const ICMP_PY: &str = r#"
import os, select, socket, struct, sys, time

def csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return (~s) & 0xffff

def wait(sock, deadline, match):
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        r, _, _ = select.select([sock], [], [], left)
        if not r:
            return False
        data, addr = sock.recvfrom(65535)
        if match(data, addr):
            return True

mode = sys.argv[1]
if mode == "ping":
    dst, timeout = sys.argv[2], float(sys.argv[3])
    ident = os.getpid() & 0xffff
    payload = b"cvm-warden-ping"
    if ":" in dst:
        s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        s.sendto(struct.pack("!BBHHH", 128, 0, 0, ident, 1) + payload, (dst, 0))
        def match(data, addr):
            return addr[0] == dst and len(data) >= 8 and data[0] == 129 and struct.unpack("!H", data[4:6])[0] == ident
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        head = struct.pack("!BBHHH", 8, 0, 0, ident, 1)
        s.sendto(struct.pack("!BBHHH", 8, 0, csum(head + payload), ident, 1) + payload, (dst, 0))
        def match(data, addr):
            ihl = (data[0] & 0x0f) * 4
            icmp = data[ihl:]
            return addr[0] == dst and len(icmp) >= 8 and icmp[0] == 0 and struct.unpack("!H", icmp[4:6])[0] == ident
    print("reply" if wait(s, time.monotonic() + timeout, match) else "timeout", flush=True)
elif mode == "expect-error":
    family, kind, code, port, timeout = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
    if family == "6":
        s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        def match(data, addr):
            # type, code, checksum, 4 bytes; the quoted IPv6 header (40); the TCP ports
            return len(data) >= 52 and data[0] == kind and data[1] == code and data[8 + 6] == 6 and struct.unpack("!H", data[48 + 2:48 + 4])[0] == port
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        def match(data, addr):
            icmp = data[(data[0] & 0x0f) * 4:]
            if len(icmp) < 8 + 20 + 8 or icmp[0] != kind or icmp[1] != code:
                return False
            inner = icmp[8:]
            ihl = (inner[0] & 0x0f) * 4
            return inner[9] == 6 and struct.unpack("!H", inner[ihl + 2:ihl + 4])[0] == port
    print("ready", flush=True)
    print("seen" if wait(s, time.monotonic() + timeout, match) else "not seen", flush=True)
elif mode == "send-error":
    src, sport, dst, dport = sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    kind, code, mtu = int(sys.argv[6]), int(sys.argv[7]), int(sys.argv[8])
    tcp = struct.pack("!HHI", sport, dport, 0x01020304)
    if ":" in src:
        inner = struct.pack("!IHBB", 6 << 28, 1400, 6, 64) + socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst) + tcp
        s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        # the kernel fills in the ICMPv6 checksum
        s.sendto(struct.pack("!BBHI", kind, code, 0, mtu) + inner, (src, 0))
    else:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 1500, 0x1234, 0x4000, 64, 6, 0, socket.inet_aton(src), socket.inet_aton(dst))
        ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
        body = struct.pack("!HH", 0, mtu) + ip + tcp
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        s.sendto(struct.pack("!BBH", kind, code, csum(struct.pack("!BBH", kind, code, 0) + body)) + body, (src, 0))
    print("sent", flush=True)
"#;
