//! The PID 1 shape's relay of the workload's output.
//!
//! The workload's stdout and stderr are pipes read by PID 1, which writes every line to its
//! own stdout (the console) behind a prefix: `workload: ` for stdout, `workload!: ` for
//! stderr. So no workload line can pass for an audit record (`{"seq":…`) or a cvm-warden
//! message (`cvm-warden: …`) on the console, whatever it prints.
//!
//! - Lines longer than [`MAX_LINE`] bytes are cut, with a marker saying how much was cut.
//! - Bytes that are not UTF-8, control characters other than tab and `\` are escaped
//!   (`\xNN`, `\\`), so a line cannot move the cursor, clear the screen or start a new line.
//! - At most [`LINES_PER_SECOND`] lines a second per stream; the rest are counted and
//!   reported (`cvm-warden: relay: N workload stdout lines suppressed`) when the next second
//!   starts or the stream ends.
//!
//! Pure apart from the writer and the injected times, so it is tested with a `Vec<u8>`.

use std::io::Write;
use std::time::{Duration, Instant};

/// The longest line relayed whole, in bytes (before escaping).
pub const MAX_LINE: usize = 4096;
/// Lines relayed per second and stream.
pub const LINES_PER_SECOND: u32 = 200;

/// Which of the workload's streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// fd 1.
    Stdout,
    /// fd 2.
    Stderr,
}

impl Stream {
    fn prefix(self) -> &'static str {
        match self {
            Stream::Stdout => "workload: ",
            Stream::Stderr => "workload!: ",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// One stream's state: the partial line and the rate window.
#[derive(Debug)]
struct Lane {
    stream: Stream,
    partial: Vec<u8>,
    /// Bytes of the current line dropped past [`MAX_LINE`].
    cut: usize,
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl Lane {
    fn new(stream: Stream) -> Lane {
        Lane {
            stream,
            partial: Vec::new(),
            cut: 0,
            window_start: None,
            in_window: 0,
            suppressed: 0,
        }
    }
}

/// Relays the workload's streams to `out`, line by line.
#[derive(Debug)]
pub struct Relay<W: Write> {
    out: W,
    lanes: [Lane; 2],
}

impl<W: Write> Relay<W> {
    /// A relay writing to `out`.
    pub fn new(out: W) -> Relay<W> {
        Relay {
            out,
            lanes: [Lane::new(Stream::Stdout), Lane::new(Stream::Stderr)],
        }
    }

    /// The writer (tests).
    pub fn get_ref(&self) -> &W {
        &self.out
    }

    fn lane(&mut self, stream: Stream) -> usize {
        match stream {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
        }
    }

    /// Takes bytes read from `stream` at `now`; writes every line they complete.
    pub fn feed(&mut self, stream: Stream, bytes: &[u8], now: Instant) {
        let i = self.lane(stream);
        for &byte in bytes {
            if byte == b'\n' {
                self.end_line(i, now);
            } else if self.lanes[i].partial.len() < MAX_LINE {
                self.lanes[i].partial.push(byte);
            } else {
                self.lanes[i].cut += 1;
            }
        }
        let _ = self.out.flush();
    }

    /// The stream ended: its last, unterminated line is written, then what was suppressed.
    pub fn close(&mut self, stream: Stream, now: Instant) {
        let i = self.lane(stream);
        if !self.lanes[i].partial.is_empty() || self.lanes[i].cut > 0 {
            self.end_line(i, now);
        }
        self.report_suppressed(i);
        let _ = self.out.flush();
    }

    fn end_line(&mut self, i: usize, now: Instant) {
        let lane = &mut self.lanes[i];
        let line = std::mem::take(&mut lane.partial);
        let cut = std::mem::take(&mut lane.cut);
        let new_window = lane
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= Duration::from_secs(1));
        if new_window {
            self.report_suppressed(i);
            let lane = &mut self.lanes[i];
            lane.window_start = Some(now);
            lane.in_window = 0;
        }
        let lane = &mut self.lanes[i];
        if lane.in_window >= LINES_PER_SECOND {
            lane.suppressed += 1;
            return;
        }
        lane.in_window += 1;
        let mut text = String::with_capacity(line.len() + 16);
        text.push_str(lane.stream.prefix());
        escape_into(&line, &mut text);
        if cut > 0 {
            text.push_str(&format!(" [cvm-warden: line cut, {cut} more bytes]"));
        }
        text.push('\n');
        let _ = self.out.write_all(text.as_bytes());
    }

    fn report_suppressed(&mut self, i: usize) {
        let lane = &mut self.lanes[i];
        let n = std::mem::take(&mut lane.suppressed);
        if n > 0 {
            let text = format!(
                "cvm-warden: relay: {n} workload {} lines suppressed (more than {LINES_PER_SECOND} a second)\n",
                lane.stream.name()
            );
            let _ = self.out.write_all(text.as_bytes());
        }
    }
}

/// Appends `bytes` to `text`: valid UTF-8 as is, except control characters and `\`; every
/// other byte as `\xNN`.
fn escape_into(bytes: &[u8], text: &mut String) {
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => text.push_str("\\\\"),
                c if (c.is_control() && c != '\t') || is_format_control(c) => {
                    for b in c.to_string().bytes() {
                        text.push_str(&format!("\\x{b:02x}"));
                    }
                }
                c => text.push(c),
            }
        }
        for b in chunk.invalid() {
            text.push_str(&format!("\\x{b:02x}"));
        }
    }
}

/// Characters that reorder or hide text on a terminal (bidirectional overrides, line and
/// paragraph separators).
fn is_format_control(c: char) -> bool {
    matches!(c, '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn text(relay: &Relay<Vec<u8>>) -> String {
        String::from_utf8(relay.get_ref().clone()).unwrap()
    }

    #[test]
    fn lines_are_prefixed_by_stream_and_split_across_reads() {
        let now = Instant::now();
        let mut relay = Relay::new(Vec::new());
        relay.feed(Stream::Stdout, b"hello\nwor", now);
        relay.feed(Stream::Stderr, b"oops\n", now);
        relay.feed(Stream::Stdout, b"ld\n", now);
        relay.close(Stream::Stdout, now);
        assert_eq!(
            text(&relay),
            "workload: hello\nworkload!: oops\nworkload: world\n"
        );
    }

    #[test]
    fn no_workload_line_can_pass_for_an_audit_record_or_a_message() {
        let now = Instant::now();
        let mut relay = Relay::new(Vec::new());
        let forged = b"{\"seq\":7,\"stage\":\"launch\",\"event\":\"exited\"}\n";
        relay.feed(Stream::Stdout, forged, now);
        relay.feed(Stream::Stdout, b"\rcvm-warden: info fake\x1b[2K\n", now);
        relay.feed(Stream::Stderr, b"a\xffb\\c\td\xe2\x80\xaee\n", now);
        relay.close(Stream::Stdout, now);
        let out = text(&relay);
        for line in out.lines() {
            assert!(
                line.starts_with("workload: ") || line.starts_with("workload!: "),
                "{line}"
            );
        }
        assert!(out.contains(r#"workload: {"seq":7,"stage":"launch","event":"exited"}"#));
        assert!(out.contains("workload: \\x0dcvm-warden: info fake\\x1b[2K\n"));
        assert!(out.contains("workload!: a\\xffb\\\\c\td\\xe2\\x80\\xaee\n"));
    }

    #[test]
    fn long_lines_are_cut_with_a_marker() {
        let now = Instant::now();
        let mut relay = Relay::new(Vec::new());
        let mut long = vec![b'x'; MAX_LINE + 100];
        long.push(b'\n');
        relay.feed(Stream::Stdout, &long, now);
        relay.feed(Stream::Stdout, b"next\n", now);
        let out = text(&relay);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(
            lines[0],
            format!(
                "workload: {} [cvm-warden: line cut, 100 more bytes]",
                "x".repeat(MAX_LINE)
            )
        );
        assert_eq!(lines[1], "workload: next");
    }

    #[test]
    fn a_flood_is_rate_limited_and_the_suppressed_lines_are_counted() {
        let start = Instant::now();
        let mut relay = Relay::new(Vec::new());
        let flood = "spam\n".repeat(1000);
        relay.feed(Stream::Stdout, flood.as_bytes(), start);
        relay.feed(Stream::Stderr, b"err\n", start);
        relay.feed(Stream::Stdout, b"later\n", start + Duration::from_secs(2));
        relay.close(Stream::Stdout, start + Duration::from_secs(2));
        let out = text(&relay);
        let spam = out.lines().filter(|l| *l == "workload: spam").count();
        assert_eq!(spam, LINES_PER_SECOND as usize);
        assert!(out.contains(&format!(
            "cvm-warden: relay: {} workload stdout lines suppressed",
            1000 - LINES_PER_SECOND
        )));
        // The other stream has its own budget.
        assert!(out.contains("workload!: err\n"));
        assert!(out.ends_with("workload: later\n"));
    }
}
