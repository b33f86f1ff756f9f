//! Root's password and login shells: pure edits of `/etc/shadow` and `/etc/passwd`, and the
//! atomic write that keeps the file's mode and owner.

use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// The shell every account gets.
pub const NOLOGIN: &str = "/usr/sbin/nologin";

/// Shells that allow no login; every other shell (including an empty field, which means
/// `/bin/sh`) is a login shell.
const NO_LOGIN_SHELLS: [&str; 6] = [
    "/usr/sbin/nologin",
    "/sbin/nologin",
    "/usr/bin/nologin",
    "/bin/nologin",
    "/bin/false",
    "/usr/bin/false",
];

/// Whether a password field (shadow field 2, or passwd field 2 without shadow) is locked or
/// can never match: it starts with `!` or `*`.
pub(crate) fn password_locked(field: &str) -> bool {
    field.starts_with('!') || field.starts_with('*')
}

/// `shadow` with root's password prefixed by `!` (as `passwd -l` does, so the hash is kept
/// and no password matches). `Ok(None)`: root's password is already locked (starts with `!`).
/// An empty password becomes `!`. `Ok(None)` too when the file has no root entry (no
/// password can match then); fails when root is listed twice.
pub fn lock_root_password(shadow: &str) -> Result<Option<String>, String> {
    let mut found = false;
    let mut changed = false;
    let mut lines: Vec<String> = Vec::new();
    for line in shadow.lines() {
        let mut fields: Vec<&str> = line.split(':').collect();
        if fields.first() == Some(&"root") && fields.len() >= 2 {
            if found {
                return Err("root is listed twice".to_owned());
            }
            found = true;
            if !fields[1].starts_with('!') {
                let locked = format!("!{}", fields[1]);
                fields[1] = &locked;
                lines.push(fields.join(":"));
                changed = true;
                continue;
            }
        }
        lines.push(line.to_owned());
    }
    if !found || !changed {
        return Ok(None);
    }
    let mut text = lines.join("\n");
    if shadow.ends_with('\n') {
        text.push('\n');
    }
    Ok(Some(text))
}

/// `passwd` with root's password field locked (`!` prefixed) where it holds a hash: pam_unix
/// reads `/etc/shadow` only when that field is `x`, and uses the field itself otherwise (an
/// empty field is an empty password). `Ok(None)`: nothing to lock (`x`, already starting
/// with `!`, or no root line); fails when root is listed twice.
pub fn lock_root_in_passwd(passwd: &str) -> Result<Option<String>, String> {
    let mut found = false;
    let mut changed = false;
    let mut lines: Vec<String> = Vec::new();
    for line in passwd.lines() {
        let mut fields: Vec<String> = line.split(':').map(str::to_owned).collect();
        if fields.first().map(String::as_str) == Some("root") && fields.len() >= 2 {
            if found {
                return Err("root is listed twice".to_owned());
            }
            found = true;
            if fields[1] != "x" && !fields[1].starts_with('!') {
                fields[1] = format!("!{}", fields[1]);
                lines.push(fields.join(":"));
                changed = true;
                continue;
            }
        }
        lines.push(line.to_owned());
    }
    if !changed {
        return Ok(None);
    }
    let mut text = lines.join("\n");
    if passwd.ends_with('\n') {
        text.push('\n');
    }
    Ok(Some(text))
}

/// `passwd` with every login shell replaced by [`NOLOGIN`], and root's password field locked
/// when it holds a hash there (no shadow entry, i.e. not `x`). Returns the new text and the
/// accounts changed (empty: nothing to do). Lines that are not 7 colon-separated fields
/// (comments, blank lines) are kept as they are.
pub fn nologin_shells(passwd: &str) -> (String, Vec<String>) {
    let mut changed = Vec::new();
    let mut lines: Vec<String> = Vec::new();
    for line in passwd.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() != 7 || line.starts_with('#') {
            lines.push(line.to_owned());
            continue;
        }
        let mut out: Vec<String> = fields.iter().map(|f| (*f).to_owned()).collect();
        let mut touched = false;
        if !NO_LOGIN_SHELLS.contains(&fields[6]) {
            out[6] = NOLOGIN.to_owned();
            touched = true;
        }
        if fields[0] == "root" && fields[1] != "x" && !fields[1].starts_with('!') {
            out[1] = format!("!{}", fields[1]);
            touched = true;
        }
        if touched {
            changed.push(fields[0].to_owned());
        }
        lines.push(out.join(":"));
    }
    let mut text = lines.join("\n");
    if passwd.ends_with('\n') {
        text.push('\n');
    }
    (text, changed)
}

/// Accounts of a passwd text that still have a login shell.
pub(crate) fn login_accounts(passwd: &str) -> Vec<String> {
    passwd
        .lines()
        .filter(|line| !line.starts_with('#'))
        .map(|line| line.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() == 7 && !NO_LOGIN_SHELLS.contains(&f[6]))
        .map(|f| f[0].to_owned())
        .collect()
}

/// Root's password field (field 2 of the first `root` line) of a shadow or passwd text.
pub(crate) fn root_password_field(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next() == Some("root")).then(|| fields.next().unwrap_or("").to_owned())
    })
}

/// Replaces `path` with `contents` atomically: a temporary file in the same directory with
/// the same mode and owner, synced, renamed over `path`, then the directory synced. Refuses
/// a symlink. On failure the temporary file is removed.
pub(crate) fn write_atomic(path: &Path, contents: &str) -> io::Result<()> {
    replace_file(path, contents, None)
}

/// [`write_atomic`], except that a missing `path` is created with mode `absent_mode`
/// (owned by the caller) instead of being an error.
pub(crate) fn write_atomic_or_create(
    path: &Path,
    contents: &str,
    absent_mode: u32,
) -> io::Result<()> {
    replace_file(path, contents, Some(absent_mode))
}

fn replace_file(path: &Path, contents: &str, absent_mode: Option<u32>) -> io::Result<()> {
    // (owner, mode) the new file gets: the old file's, or the caller's for a new one.
    let (owner, mode) = match (std::fs::symlink_metadata(path), absent_mode) {
        (Ok(meta), _) if meta.file_type().is_file() => {
            (Some((meta.uid(), meta.gid())), meta.mode() & 0o7777)
        }
        (Ok(_), _) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file (a symlink is not followed)",
            ))
        }
        (Err(e), Some(mode)) if e.kind() == io::ErrorKind::NotFound => (None, mode),
        (Err(e), _) => return Err(e),
    };
    let dir = path.parent().unwrap_or(Path::new("/"));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.cvm-warden"));
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
        }
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.write_all(contents.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
