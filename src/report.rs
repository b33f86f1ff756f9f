//! Error reporting shared by every layer: the one-line error chain, the one escaping function
//! for text that came from outside (a key broker's answer, a policy string) before it reaches
//! a message, a log line or an audit record, and the names of a TPM attestation key.

pub use cvm_warden_verify::error_chain;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use sha2::{Digest, Sha256};

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

/// The two names of a TPM attestation key, from its SubjectPublicKeyInfo DER: its
/// fingerprint `sha256:<hex of SHA-256(DER)>` (short, for messages and comparisons) and the
/// standard base64 (with padding) of the DER — the exact string a Trustee broker's
/// `trusted_aks` reference value holds and the `tpm` evidence's `ak_public` carries.
pub fn ak_names(spki_der: &[u8]) -> (String, String) {
    (
        format!("sha256:{}", hex::encode(Sha256::digest(spki_der))),
        STANDARD.encode(spki_der),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_escapes_ansi_and_bidi_visibly() {
        assert_eq!(sanitize("plain text", 100), "plain text");
        assert_eq!(
            sanitize("\u{1b}[31mred\u{1b}[0m", 100),
            "\\u{1b}[31mred\\u{1b}[0m"
        );
        assert_eq!(
            sanitize("a\nb\rc\td\u{7f}", 100),
            "a\\u{a}b\\u{d}c\\u{9}d\\u{7f}"
        );
        assert_eq!(sanitize("\u{9b}31m", 100), "\\u{9b}31m");
        for (c, escaped) in [
            ('\u{202a}', "\\u{202a}"),
            ('\u{202b}', "\\u{202b}"),
            ('\u{202c}', "\\u{202c}"),
            ('\u{202d}', "\\u{202d}"),
            ('\u{202e}', "\\u{202e}"),
            ('\u{2066}', "\\u{2066}"),
            ('\u{2067}', "\\u{2067}"),
            ('\u{2068}', "\\u{2068}"),
            ('\u{2069}', "\\u{2069}"),
            ('\u{200e}', "\\u{200e}"),
            ('\u{200f}', "\\u{200f}"),
            ('\u{feff}', "\\u{feff}"),
        ] {
            assert_eq!(sanitize(&format!("x{c}y"), 100), format!("x{escaped}y"));
            assert!(has_unsafe_chars(&format!("x{c}y")));
        }
        // Ordinary non-ASCII text stays as it is.
        assert_eq!(sanitize("Grüße, 東京", 100), "Grüße, 東京");
        assert!(!has_unsafe_chars("Grüße, 東京"));
        // A literal backslash cannot pose as an escape.
        assert_eq!(sanitize("\\u{202e}", 100), "\\\\u{202e}");
    }

    #[test]
    fn sanitize_bounds_the_length() {
        assert_eq!(sanitize("abcdef", 3), "abc…");
        assert_eq!(sanitize("abc", 3), "abc");
        let long = "é".repeat(10_000);
        assert_eq!(sanitize(&long, 300).chars().count(), 301);
    }

    #[test]
    fn ak_names_are_the_fingerprint_and_the_trusted_aks_string() {
        let der = [0x30u8, 0x82, 0x01, 0x22, 0xff];
        let (fingerprint, b64) = ak_names(&der);
        assert_eq!(
            fingerprint,
            format!("sha256:{}", hex::encode(Sha256::digest(der)))
        );
        assert_eq!(b64, "MIIBIv8=");
    }
}
