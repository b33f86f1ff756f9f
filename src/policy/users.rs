//! Resolving the workload's user and group: a small trait, the `/etc/passwd`-format files of
//! the image, and an in-memory database for tests.

use std::path::{Path, PathBuf};

/// Default passwd file.
pub const DEFAULT_PASSWD: &str = "/etc/passwd";
/// Default group file.
pub const DEFAULT_GROUP: &str = "/etc/group";

/// Where user and group names are looked up.
pub trait UserDb {
    /// `(uid, primary gid)` of the user called `name`.
    fn user_by_name(&self, name: &str) -> Option<(u32, u32)>;
    /// gid of the group called `name`.
    fn group_by_name(&self, name: &str) -> Option<u32>;
    /// `(name, primary gid)` of the user with this uid.
    fn user_by_uid(&self, uid: u32) -> Option<(String, u32)>;
}

/// The image's `/etc/passwd` and `/etc/group` (paths injectable, e.g. to check a policy on a
/// build machine against the image's files). The files are read at each lookup; a file that
/// cannot be read resolves nothing (and logs a warning).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdFiles {
    /// passwd(5) file.
    pub passwd: PathBuf,
    /// group(5) file.
    pub group: PathBuf,
}

impl Default for PasswdFiles {
    fn default() -> Self {
        PasswdFiles {
            passwd: PathBuf::from(DEFAULT_PASSWD),
            group: PathBuf::from(DEFAULT_GROUP),
        }
    }
}

/// One passwd entry: name, uid, gid.
type PasswdEntry = (String, u32, u32);

fn read_lines(path: &Path) -> Vec<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => text.lines().map(str::to_string).collect(),
        Err(error) => {
            log::warn!(
                "cannot read {}: {error}; no user or group resolves from it",
                path.display()
            );
            Vec::new()
        }
    }
}

/// Parses a passwd(5) line (`name:password:uid:gid:gecos:home:shell`); comments, blank and
/// malformed lines give `None`.
fn parse_passwd_line(line: &str) -> Option<PasswdEntry> {
    if line.starts_with('#') {
        return None;
    }
    let mut fields = line.split(':');
    let name = fields.next()?;
    let _password = fields.next()?;
    let uid = fields.next()?.parse().ok()?;
    let gid = fields.next()?.parse().ok()?;
    if name.is_empty() || name.starts_with(['+', '-']) {
        return None;
    }
    Some((name.to_string(), uid, gid))
}

/// Parses a group(5) line (`name:password:gid:members`).
fn parse_group_line(line: &str) -> Option<(String, u32)> {
    if line.starts_with('#') {
        return None;
    }
    let mut fields = line.split(':');
    let name = fields.next()?;
    let _password = fields.next()?;
    let gid = fields.next()?.parse().ok()?;
    if name.is_empty() || name.starts_with(['+', '-']) {
        return None;
    }
    Some((name.to_string(), gid))
}

impl PasswdFiles {
    fn users(&self) -> impl Iterator<Item = PasswdEntry> {
        read_lines(&self.passwd)
            .into_iter()
            .filter_map(|line| parse_passwd_line(&line))
    }
}

impl UserDb for PasswdFiles {
    fn user_by_name(&self, name: &str) -> Option<(u32, u32)> {
        self.users()
            .find(|(n, _, _)| n == name)
            .map(|(_, uid, gid)| (uid, gid))
    }

    fn group_by_name(&self, name: &str) -> Option<u32> {
        read_lines(&self.group)
            .iter()
            .filter_map(|line| parse_group_line(line))
            .find(|(n, _)| n == name)
            .map(|(_, gid)| gid)
    }

    fn user_by_uid(&self, uid: u32) -> Option<(String, u32)> {
        self.users()
            .find(|(_, u, _)| *u == uid)
            .map(|(name, _, gid)| (name, gid))
    }
}

/// An in-memory user database (for tests, and for checking policies without an image).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryUsers {
    /// `(name, uid, primary gid)`.
    pub users: Vec<(String, u32, u32)>,
    /// `(name, gid)`.
    pub groups: Vec<(String, u32)>,
}

impl MemoryUsers {
    /// An empty database.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a user.
    pub fn user(mut self, name: &str, uid: u32, gid: u32) -> Self {
        self.users.push((name.to_string(), uid, gid));
        self
    }

    /// Adds a group.
    pub fn group(mut self, name: &str, gid: u32) -> Self {
        self.groups.push((name.to_string(), gid));
        self
    }
}

impl UserDb for MemoryUsers {
    fn user_by_name(&self, name: &str) -> Option<(u32, u32)> {
        self.users
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, uid, gid)| (*uid, *gid))
    }

    fn group_by_name(&self, name: &str) -> Option<u32> {
        self.groups
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, gid)| *gid)
    }

    fn user_by_uid(&self, uid: u32) -> Option<(String, u32)> {
        self.users
            .iter()
            .find(|(_, u, _)| *u == uid)
            .map(|(name, _, gid)| (name.clone(), *gid))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn passwd_files_resolve_users_and_groups() {
        let dir = tempfile::tempdir().unwrap();
        let passwd = dir.path().join("passwd");
        let group = dir.path().join("group");
        std::fs::write(
            &passwd,
            "# comment\nroot:x:0:0:root:/root:/bin/sh\n\nbroken line\n+nis:::\nflare:x:1000:1001:FLARE:/home/flare:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(&group, "root:x:0:\nflare:x:1001:\nworkers:x:2000:flare\n").unwrap();
        let db = PasswdFiles { passwd, group };
        assert_eq!(db.user_by_name("flare"), Some((1000, 1001)));
        assert_eq!(db.user_by_name("nobody"), None);
        assert_eq!(db.user_by_name("+nis"), None);
        assert_eq!(db.user_by_uid(1000), Some(("flare".to_string(), 1001)));
        assert_eq!(db.user_by_uid(5), None);
        assert_eq!(db.group_by_name("workers"), Some(2000));
        assert_eq!(db.group_by_name("missing"), None);
    }

    #[test]
    fn unreadable_files_resolve_nothing() {
        let db = PasswdFiles {
            passwd: PathBuf::from("/nonexistent/passwd"),
            group: PathBuf::from("/nonexistent/group"),
        };
        assert_eq!(db.user_by_name("root"), None);
        assert_eq!(db.group_by_name("root"), None);
        assert_eq!(db.user_by_uid(0), None);
    }

    #[test]
    fn default_paths_are_the_system_files() {
        let db = PasswdFiles::default();
        assert_eq!(db.passwd, PathBuf::from("/etc/passwd"));
        assert_eq!(db.group, PathBuf::from("/etc/group"));
    }
}
