//! Parsing `/proc/self/mountinfo` and `/proc/swaps` (pure).

use std::path::{Path, PathBuf};

/// One mount of a mountinfo table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mount {
    /// Mount point (field 5, escapes decoded).
    pub point: PathBuf,
    /// Per-mount options (field 6), e.g. `rw,nosuid,nodev`.
    pub options: Vec<String>,
    /// File-system type (first field after ` - `).
    pub fstype: String,
}

impl Mount {
    /// Whether the per-mount options contain `option`.
    pub fn has(&self, option: &str) -> bool {
        self.options.iter().any(|o| o == option)
    }
}

/// The mounts of a mountinfo text, in order; malformed lines are skipped.
pub(crate) fn parse(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let dash = fields.iter().position(|f| *f == "-")?;
            if dash < 6 {
                return None;
            }
            Some(Mount {
                point: PathBuf::from(unescape(fields.get(4)?)),
                options: fields.get(5)?.split(',').map(str::to_owned).collect(),
                fstype: (*fields.get(dash + 1)?).to_owned(),
            })
        })
        .collect()
}

/// The mount visible at `point` (the last one mounted there), if any.
pub(crate) fn top_mount_at(mounts: &[Mount], point: &Path) -> Option<Mount> {
    mounts.iter().rev().find(|m| m.point == point).cloned()
}

/// Swap areas named in a `/proc/swaps` text (the header line skipped, escapes decoded).
pub(crate) fn parse_swaps(text: &str) -> Vec<String> {
    text.lines()
        .skip(1)
        .filter_map(|line| line.split_whitespace().next())
        .map(unescape)
        .collect()
}

/// Decodes the kernel's octal escapes (`\040` for a space).
pub(crate) fn unescape(field: &str) -> String {
    crate::sys::unescape_mountinfo(field)
}

/// Encodes space, tab, newline and backslash the way the kernel does.
pub(crate) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for ch in text.chars() {
        match ch {
            ' ' | '\t' | '\n' | '\\' => out.push_str(&format!("\\{:03o}", u32::from(ch))),
            other => out.push(other),
        }
    }
    out
}
