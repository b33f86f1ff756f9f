//! The one escaping function for text that came from outside (a log record, evidence, a key
//! broker's answer) before it reaches a terminal, a message or an audit record.

/// Whether `c` must not reach a terminal or a log as itself: a control character (C0, DEL,
/// C1: ANSI escape sequences start with one) or a Unicode bidirectional / format character
/// that reorders or hides the text around it (U+200E/F marks, U+202A–U+202E embeddings and
/// overrides, U+2066–U+2069 isolates, and the other invisible format characters: U+061C,
/// U+200B–U+200D, U+2060–U+2064, U+FEFF).
pub fn is_unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}'
                | '\u{200b}'..='\u{200f}'
                | '\u{202a}'..='\u{202e}'
                | '\u{2060}'..='\u{2064}'
                | '\u{2066}'..='\u{2069}'
                | '\u{feff}'
        )
}

/// Makes text from outside safe to put in one line of a message, log or audit record:
/// every [`is_unsafe_char`] becomes a visible escape (`\u{1b}`, `\u{202e}`; a backslash is
/// doubled, so an escape cannot be faked), and it is cut to `max_chars` characters of input,
/// with `…` marking the cut.
pub fn sanitize(text: &str, max_chars: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max_chars.saturating_mul(2)));
    let mut chars = text.chars();
    for c in chars.by_ref().take(max_chars) {
        if is_unsafe_char(c) {
            out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
        } else if c == '\\' {
            out.push_str("\\\\");
        } else {
            out.push(c);
        }
    }
    if chars.next().is_some() {
        out.push('…');
    }
    out
}

/// Whether `text` holds an [`is_unsafe_char`].
pub fn has_unsafe_chars(text: &str) -> bool {
    text.chars().any(is_unsafe_char)
}
