//! Error reporting shared by every layer.

use std::error::Error;

/// Renders an error and its causes on one line: `outer: cause: root cause` (audit records,
/// log lines). The CLI prints the same chain with one `because:` line per cause.
pub fn error_chain(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
