//! Error reporting shared by every layer: the one-line error chain, the one escaping function
//! for text that came from outside (a key broker's answer, a policy string) before it reaches
//! a message, a log line or an audit record, and the names of a TPM attestation key.

pub use cvm_warden_verify::error_chain;

pub use cvm_warden_verify::evidence::tpm::ak_names;
pub use cvm_warden_verify::text::{has_unsafe_chars, is_unsafe_char, sanitize};

/// The one error printer of the command line and of PID 1: `error: <error>`, then one
/// `  because: <cause>` line per source, on `out`.
pub fn write_error(out: &mut dyn std::io::Write, error: &dyn std::error::Error) {
    let _ = writeln!(out, "error: {error}");
    let mut source = error.source();
    while let Some(cause) = source {
        let _ = writeln!(out, "  because: {cause}");
        source = cause.source();
    }
}

/// [`write_error`] on standard error (the console in PID 1).
pub fn print_error(error: &dyn std::error::Error) {
    write_error(&mut std::io::stderr().lock(), error);
}

/// An error that is only a message (a usage problem found outside a typed error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message(pub String);

impl std::fmt::Display for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Message {}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    #[test]
    fn the_error_printer_writes_every_cause() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("read /etc/x")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let error = Outer(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no such file",
        ));
        let mut out = Vec::new();
        write_error(&mut out, &error);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "error: read /etc/x\n  because: no such file\n"
        );
    }

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
