//! Where audit lines go: a file, syslog (RFC 5424), the console, or memory (tests).
//!
//! A sink only writes lines; the [`Audit`](super::Audit) handle decides what to retry and
//! records failures. Every sink writes the exact line, so every copy can be verified.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, ErrorKind, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use syslog::{Facility, Formatter5424, LogFormat, Logger, LoggerBackend, Severity};

use crate::policy::{AuditConfig, SyslogTarget};
use cvm_warden_verify::record::leading_seq;

/// A destination for audit lines.
///
/// The log calls `write_line` once per line, in seq order, and `flush` after each batch; a
/// line that failed is offered again (with everything after it) on the next record.
pub trait Sink: Send {
    /// A short name for audit records and errors, e.g. `file:/var/log/a.jsonl`.
    fn name(&self) -> String;
    /// A required sink that fails stops the boot (`audit.file_required`).
    fn required(&self) -> bool;
    /// Writes one line; `line` has no trailing newline.
    fn write_line(&mut self, line: &str) -> io::Result<()>;
    /// Makes the lines written so far durable (fsync for a file).
    fn flush(&mut self) -> io::Result<()>;
}

/// Builds the sinks the policy asks for, in the order file, syslog, console.
///
/// `console` is the serial console in PID 1 mode and stderr otherwise; it is dropped when
/// the policy turns the console sink off.
pub fn sinks_from_config(cfg: &AuditConfig, console: Box<dyn Write + Send>) -> Vec<Box<dyn Sink>> {
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
    if let Some(path) = &cfg.file {
        sinks.push(Box::new(FileSink::new(path, cfg.file_required)));
    }
    if let Some(target) = &cfg.syslog {
        sinks.push(Box::new(SyslogSink::new(target)));
    }
    if let Some(name) = &cfg.export_port {
        sinks.push(Box::new(VirtioPortSink::new(name)));
    }
    if cfg.console {
        sinks.push(Box::new(ConsoleSink::new(console)));
    }
    sinks
}

/// Where [`VirtioPortSink`] looks for its port: sysfs's `virtio-ports` class and `/dev`.
pub const VIRTIO_PORTS_SYSFS: &str = "/sys/class/virtio-ports";

/// Writes each line to a named virtio-serial port (`audit.export = "virtio-port:NAME"`):
/// the host end (QEMU's `virtserialport,name=NAME`) receives the log of a VM that has no
/// network for syslog. There is no udev in the initramfs, so the port is found by its name
/// in sysfs (`/sys/class/virtio-ports/vportNpM/name`) and opened as `/dev/vportNpM`, which
/// devtmpfs creates. Opened on the first write and again after any error; until the port
/// exists (its driver, `virtio_console`, may load later) writes fail and the log offers the
/// lines again with the next record, so nothing before that is lost.
///
/// The port is opened non-blocking and each write waits at most [`PORT_WRITE_WAIT`] for the
/// host to take bytes: a virtio port whose host end is not connected (or stopped reading)
/// blocks writers for ever, and PID 1 must never hang on its audit log. A line the host did
/// not take in time fails the sink (the log offers it again with the next record); when part
/// of a line went out, the next write starts with a newline, so the cut line stands alone.
#[derive(Debug)]
pub struct VirtioPortSink {
    name: String,
    sysfs: PathBuf,
    dev: PathBuf,
    port: Option<File>,
    torn: bool,
    /// The last write timed out: later writes do not wait until the port takes bytes again
    /// (each record would otherwise cost the full wait while the host is away).
    stalled: bool,
}

/// How long one write to a virtio port may wait for the host.
pub const PORT_WRITE_WAIT: Duration = Duration::from_secs(2);

impl VirtioPortSink {
    /// The port called `name`, looked up in the real sysfs and `/dev`.
    pub fn new(name: &str) -> VirtioPortSink {
        VirtioPortSink::at(name, VIRTIO_PORTS_SYSFS, "/dev")
    }

    /// The port called `name`, looked up under `sysfs` and opened under `dev` (tests).
    pub fn at(name: &str, sysfs: impl Into<PathBuf>, dev: impl Into<PathBuf>) -> VirtioPortSink {
        VirtioPortSink {
            name: name.to_string(),
            sysfs: sysfs.into(),
            dev: dev.into(),
            port: None,
            torn: false,
            stalled: false,
        }
    }

    fn open(&self) -> io::Result<File> {
        for entry in std::fs::read_dir(&self.sysfs)? {
            let entry = entry?;
            let name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
            if name.trim_end_matches('\n') == self.name {
                return OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC | libc::O_NONBLOCK)
                    .open(self.dev.join(entry.file_name()));
            }
        }
        Err(io::Error::new(
            ErrorKind::NotFound,
            format!(
                "no virtio-serial port named {:?} under {} (is the host's virtserialport,name= the same, and virtio_console loaded?)",
                self.name,
                self.sysfs.display()
            ),
        ))
    }
}

impl Sink for VirtioPortSink {
    fn name(&self) -> String {
        format!("virtio-port:{}", self.name)
    }

    fn required(&self) -> bool {
        false
    }

    fn write_line(&mut self, line: &str) -> io::Result<()> {
        let mut port = match self.port.take() {
            Some(p) => p,
            None => self.open()?,
        };
        let mut buf = Vec::with_capacity(line.len() + 2);
        if self.torn {
            buf.push(b'\n');
        }
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        let mut written = 0;
        let wait = if self.stalled {
            Duration::ZERO
        } else {
            PORT_WRITE_WAIT
        };
        let deadline = Instant::now() + wait;
        while written < buf.len() {
            match port.write(&buf[written..]) {
                Ok(0) => return Err(io::Error::from(ErrorKind::WriteZero)),
                Ok(n) => {
                    written += n;
                    // A newline written on its own already ends a cut line.
                    self.torn = written < buf.len() && written > usize::from(self.torn);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() || !wait_writable(&port, left)? {
                        self.stalled = true;
                        return Err(io::Error::new(
                            ErrorKind::TimedOut,
                            format!(
                                "the host took no audit line on virtio port {:?} within {} s",
                                self.name,
                                PORT_WRITE_WAIT.as_secs()
                            ),
                        ));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        self.torn = false;
        self.stalled = false;
        self.port = Some(port);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.port {
            Some(port) => port.flush().inspect_err(|_| self.port = None),
            None => Ok(()),
        }
    }
}

/// Waits until `file` is writable, at most `limit`; false when it did not become so. A
/// port whose host end is gone reports a hang-up at once: that is an error, not a wait (a
/// write would only fail again, in a busy loop).
fn wait_writable(file: &File, limit: Duration) -> io::Result<bool> {
    use nix::poll::{PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLOUT)];
    let timeout = PollTimeout::try_from(limit).unwrap_or(PollTimeout::MAX);
    match nix::poll::poll(&mut fds, timeout) {
        Ok(0) => Ok(false),
        Ok(_) => {
            let revents = fds[0].revents().unwrap_or(PollFlags::empty());
            if revents.intersects(PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLNVAL) {
                Err(io::Error::new(
                    ErrorKind::NotConnected,
                    "the host end of the virtio port is not connected",
                ))
            } else {
                Ok(revents.contains(PollFlags::POLLOUT))
            }
        }
        Err(nix::errno::Errno::EINTR) => Ok(true),
        Err(e) => Err(io::Error::from(e)),
    }
}

/// Appends lines to a file (`O_APPEND | O_CREAT | O_NOFOLLOW`, mode 0600) and fsyncs on
/// flush.
///
/// The file is opened lazily and again after any error. Missing parent directories are not
/// created: a file on a volume that is unlocked later fails with `NotFound` until the volume
/// is mounted, and then receives the whole backlog. A file that already holds lines (an
/// earlier run) is appended to; if its last line was cut by a crash, a newline is written
/// first so the new run starts on a line of its own.
#[derive(Debug)]
pub struct FileSink {
    path: PathBuf,
    required: bool,
    file: Option<File>,
}

impl FileSink {
    /// A file sink; `required` makes its failure stop the boot.
    pub fn new(path: impl Into<PathBuf>, required: bool) -> FileSink {
        FileSink {
            path: path.into(),
            required,
            file: None,
        }
    }

    fn open(&self) -> io::Result<File> {
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&self.path)?;
        let len = file.metadata()?.len();
        if len == 0 {
            // Possibly just created: make the directory entry durable too.
            if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                File::open(dir)?.sync_all()?;
            }
        } else {
            let mut last = [0u8; 1];
            file.read_exact_at(&mut last, len - 1)?;
            if last[0] != b'\n' {
                (&file).write_all(b"\n")?;
            }
        }
        Ok(file)
    }
}

impl Sink for FileSink {
    fn name(&self) -> String {
        format!("file:{}", self.path.display())
    }

    fn required(&self) -> bool {
        self.required
    }

    fn write_line(&mut self, line: &str) -> io::Result<()> {
        let file = match self.file.take() {
            Some(f) => f,
            None => self.open()?,
        };
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        let before = file.metadata()?.len();
        if let Err(e) = (&file).write_all(&buf) {
            // Take a partly written line back, so the retry does not leave a torn line.
            let _ = file.set_len(before);
            return Err(e);
        }
        self.file = Some(file);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        match &self.file {
            Some(file) => file.sync_data().inspect_err(|_| self.file = None),
            None => Ok(()),
        }
    }
}

/// Writes each line, followed by a newline, to a stream (the serial console or stderr).
pub struct ConsoleSink {
    out: Box<dyn Write + Send>,
}

impl fmt::Debug for ConsoleSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsoleSink").finish_non_exhaustive()
    }
}

impl ConsoleSink {
    /// A console sink writing to `out`.
    pub fn new(out: Box<dyn Write + Send>) -> ConsoleSink {
        ConsoleSink { out }
    }
}

impl Sink for ConsoleSink {
    fn name(&self) -> String {
        "console".to_string()
    }

    fn required(&self) -> bool {
        false
    }

    fn write_line(&mut self, line: &str) -> io::Result<()> {
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        self.out.write_all(&buf)?;
        self.out.flush()
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Where a [`SyslogSink`] sends.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SyslogDest {
    /// `/dev/log` (or the other usual paths the `syslog` crate tries).
    Local,
    /// A local datagram socket at a given path.
    Unix(PathBuf),
    /// Remote `host:port` over UDP.
    Udp(String),
    /// Remote `host:port` over TCP (octet-counted framing, RFC 6587).
    Tcp(String),
}

/// RFC 5424 syslog through the `syslog` crate: facility `auth`, severity `info`, app name
/// `cvm-warden`, MSGID the record's seq, no structured data, the record line as MSG.
///
/// The connection is made on the first write and again after any error; after a failed
/// connection attempt, writes fail at once for `retry_after` (default 5 s) so that an
/// unreachable server does not slow every record down. TCP connections and writes time out
/// after 2 s.
pub struct SyslogSink {
    dest: SyslogDest,
    conn: Option<Logger<LoggerBackend, Formatter5424>>,
    retry_after: Duration,
    timeout: Duration,
    blocked: Option<(Instant, ErrorKind, String)>,
}

impl fmt::Debug for SyslogSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SyslogSink")
            .field("dest", &self.dest)
            .field("connected", &self.conn.is_some())
            .finish_non_exhaustive()
    }
}

/// The RFC 5424 APP-NAME.
pub const SYSLOG_APP_NAME: &str = "cvm-warden";

impl SyslogSink {
    /// A sink for the policy's syslog target.
    pub fn new(target: &SyslogTarget) -> SyslogSink {
        SyslogSink::with_dest(match target {
            SyslogTarget::Local => SyslogDest::Local,
            SyslogTarget::Udp(addr) => SyslogDest::Udp(addr.clone()),
            SyslogTarget::Tcp(addr) => SyslogDest::Tcp(addr.clone()),
        })
    }

    /// A sink for a local datagram socket at `path` (instead of `/dev/log`).
    pub fn unix_at(path: impl Into<PathBuf>) -> SyslogSink {
        SyslogSink::with_dest(SyslogDest::Unix(path.into()))
    }

    fn with_dest(dest: SyslogDest) -> SyslogSink {
        SyslogSink {
            dest,
            conn: None,
            retry_after: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            blocked: None,
        }
    }

    /// How long writes fail at once after a failed connection attempt.
    pub fn with_retry_after(mut self, retry_after: Duration) -> SyslogSink {
        self.retry_after = retry_after;
        self
    }

    fn formatter() -> Formatter5424 {
        let hostname = Formatter5424::default().hostname;
        Formatter5424 {
            facility: Facility::LOG_AUTH,
            hostname,
            process: SYSLOG_APP_NAME.to_string(),
            pid: std::process::id(),
        }
    }

    fn connect(&self) -> io::Result<Logger<LoggerBackend, Formatter5424>> {
        let formatter = SyslogSink::formatter();
        match &self.dest {
            SyslogDest::Local => connect_local(formatter),
            SyslogDest::Unix(path) => syslog::unix_custom(formatter, path).map_err(syslog_io),
            SyslogDest::Udp(server) => {
                let addr = resolve(server)?;
                let local = if addr.is_ipv4() {
                    "0.0.0.0:0"
                } else {
                    "[::]:0"
                };
                syslog::udp(formatter, local, addr).map_err(syslog_io)
            }
            SyslogDest::Tcp(server) => {
                let addr = resolve(server)?;
                let stream = TcpStream::connect_timeout(&addr, self.timeout)?;
                stream.set_write_timeout(Some(self.timeout))?;
                Ok(Logger::new(
                    LoggerBackend::Tcp(BufWriter::new(stream)),
                    formatter,
                ))
            }
        }
    }

    fn connection(&mut self) -> io::Result<&mut Logger<LoggerBackend, Formatter5424>> {
        let conn = match self.conn.take() {
            Some(conn) => conn,
            None => {
                if let Some((until, kind, msg)) = &self.blocked {
                    if Instant::now() < *until {
                        return Err(io::Error::new(*kind, msg.clone()));
                    }
                }
                match self.connect() {
                    Ok(conn) => {
                        self.blocked = None;
                        conn
                    }
                    Err(e) => {
                        let until = Instant::now() + self.retry_after;
                        self.blocked = Some((until, e.kind(), e.to_string()));
                        return Err(e);
                    }
                }
            }
        };
        Ok(self.conn.insert(conn))
    }
}

/// The local sockets tried for `syslog = "local"`, in order (as the `syslog` crate does).
const LOCAL_SOCKETS: [&str; 3] = ["/dev/log", "/var/run/syslog", "/var/run/log"];

/// Connects to the first local syslog socket that exists; `NotFound` when none does, so the
/// sink counts as waiting rather than failed while syslog is not up yet.
fn connect_local(formatter: Formatter5424) -> io::Result<Logger<LoggerBackend, Formatter5424>> {
    for path in LOCAL_SOCKETS {
        match syslog::unix_custom(formatter.clone(), path).map_err(syslog_io) {
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            other => return other,
        }
    }
    Err(io::Error::new(
        ErrorKind::NotFound,
        format!("no local syslog socket ({})", LOCAL_SOCKETS.join(", ")),
    ))
}

fn resolve(server: &str) -> io::Result<SocketAddr> {
    server.to_socket_addrs()?.next().ok_or_else(|| {
        io::Error::new(
            ErrorKind::NotFound,
            format!("syslog server {server} resolves to no address"),
        )
    })
}

/// The `syslog` crate's error as an `io::Error`, keeping the kind where there is one.
fn syslog_io(err: syslog::Error) -> io::Error {
    match err {
        syslog::Error::Io(e) | syslog::Error::Write(e) => e,
        syslog::Error::Initialization(inner) => match inner.downcast::<io::Error>() {
            Ok(e) => *e,
            Err(inner) => match inner.downcast::<syslog::Error>() {
                Ok(e) => syslog_io(*e),
                Err(other) => io::Error::other(other),
            },
        },
    }
}

impl Sink for SyslogSink {
    fn name(&self) -> String {
        match &self.dest {
            SyslogDest::Local => "syslog:local".to_string(),
            SyslogDest::Unix(path) => format!("syslog:unix:{}", path.display()),
            SyslogDest::Udp(server) => format!("syslog:udp://{server}"),
            SyslogDest::Tcp(server) => format!("syslog:tcp://{server}"),
        }
    }

    fn required(&self) -> bool {
        false
    }

    fn write_line(&mut self, line: &str) -> io::Result<()> {
        // The crate's message id is a number: the seq lets a receiver spot gaps.
        let msgid = leading_seq(line.as_bytes())
            .and_then(|s| u32::try_from(s).ok())
            .unwrap_or(0);
        let conn = self.connection()?;
        let mut msg = Vec::with_capacity(line.len() + 128);
        conn.formatter
            .format(
                &mut msg,
                Severity::LOG_INFO,
                (msgid, std::collections::BTreeMap::new(), line),
            )
            .map_err(syslog_io)?;
        let sent = match conn.backend {
            LoggerBackend::Tcp(_) => {
                let mut framed = format!("{} ", msg.len()).into_bytes();
                framed.extend_from_slice(&msg);
                conn.backend.write_all(&framed)
            }
            // Datagrams: one message per send, never split.
            _ => conn.backend.write(&msg).and_then(|n| {
                if n == msg.len() {
                    Ok(())
                } else {
                    Err(io::Error::new(
                        ErrorKind::WriteZero,
                        format!("syslog took {n} of {} bytes", msg.len()),
                    ))
                }
            }),
        };
        if sent.is_err() {
            self.conn = None;
        }
        sent
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.conn {
            Some(conn) => conn.backend.flush().inspect_err(|_| self.conn = None),
            None => Ok(()),
        }
    }
}

/// How a [`MemorySink`] fails, shared with its [`MemorySinkControl`].
#[derive(Debug, Default)]
struct FailPlan {
    /// Fail this many more writes.
    next: u32,
    /// Fail every write until cleared.
    always: bool,
    kind: Option<ErrorKind>,
}

/// A recording fake sink: keeps the lines it accepted and fails on request.
#[derive(Debug)]
pub struct MemorySink {
    name: String,
    required: bool,
    lines: Arc<Mutex<Vec<String>>>,
    plan: Arc<Mutex<FailPlan>>,
}

/// Changes how a [`MemorySink`] behaves after it was handed to the log.
#[derive(Debug, Clone)]
pub struct MemorySinkControl {
    plan: Arc<Mutex<FailPlan>>,
}

impl MemorySinkControl {
    /// Fails the next `n` writes with `kind`.
    pub fn fail_next(&self, n: u32, kind: ErrorKind) {
        let mut plan = self.plan.lock().unwrap_or_else(PoisonError::into_inner);
        plan.next = n;
        plan.kind = Some(kind);
    }

    /// Fails every write with `kind` until [`clear`](Self::clear).
    pub fn fail_always(&self, kind: ErrorKind) {
        let mut plan = self.plan.lock().unwrap_or_else(PoisonError::into_inner);
        plan.always = true;
        plan.kind = Some(kind);
    }

    /// Accepts writes again.
    pub fn clear(&self) {
        *self.plan.lock().unwrap_or_else(PoisonError::into_inner) = FailPlan::default();
    }
}

impl MemorySink {
    /// A sink named `memory`, not required, and the lines it has accepted.
    pub fn new() -> (MemorySink, Arc<Mutex<Vec<String>>>) {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = MemorySink {
            name: "memory".to_string(),
            required: false,
            lines: Arc::clone(&lines),
            plan: Arc::new(Mutex::new(FailPlan::default())),
        };
        (sink, lines)
    }

    /// Renames the sink.
    pub fn named(mut self, name: &str) -> MemorySink {
        self.name = name.to_string();
        self
    }

    /// Marks the sink required.
    pub fn required(mut self, required: bool) -> MemorySink {
        self.required = required;
        self
    }

    /// Fails the first `n` writes with `kind`.
    pub fn failing(self, n: u32, kind: ErrorKind) -> MemorySink {
        self.control().fail_next(n, kind);
        self
    }

    /// A handle to change the failure plan later.
    pub fn control(&self) -> MemorySinkControl {
        MemorySinkControl {
            plan: Arc::clone(&self.plan),
        }
    }
}

impl Sink for MemorySink {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn required(&self) -> bool {
        self.required
    }

    fn write_line(&mut self, line: &str) -> io::Result<()> {
        {
            let mut plan = self.plan.lock().unwrap_or_else(PoisonError::into_inner);
            let kind = plan.kind.unwrap_or(ErrorKind::Other);
            if plan.always {
                return Err(io::Error::new(kind, "memory sink told to fail"));
            }
            if plan.next > 0 {
                plan.next -= 1;
                return Err(io::Error::new(kind, "memory sink told to fail"));
            }
        }
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(line.to_string());
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
