//! Resolving module names to files through `modules.dep` and `modules.builtin` (pure once
//! the files are read).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The module name of a file name or a policy name: the part before `.ko`, with `-` written
/// as `_` (the kernel treats them alike: `dm-crypt.ko.zst` is `dm_crypt`).
pub fn module_name(file_or_name: &str) -> String {
    let base = file_or_name.rsplit('/').next().unwrap_or(file_or_name);
    let stem = match base.find(".ko") {
        Some(at) if base[at..] == *".ko" || base[at..].starts_with(".ko.") => &base[..at],
        _ => base,
    };
    stem.replace('-', "_")
}

/// Compression of a module file by its name: `Some("xz" | "zstd" | "gzip")`, or `None` for
/// a plain `.ko`.
pub(crate) fn compression(path: &Path) -> Option<&'static str> {
    let name = path.file_name()?.to_string_lossy();
    if name.ends_with(".ko.xz") {
        Some("xz")
    } else if name.ends_with(".ko.zst") {
        Some("zstd")
    } else if name.ends_with(".ko.gz") {
        Some("gzip")
    } else {
        None
    }
}

/// The module index of one kernel release: files and dependencies from `modules.dep`, and
/// the names built into the kernel from `modules.builtin`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModuleIndex {
    /// Module name → (file, dependency files in `modules.dep` order).
    modules: BTreeMap<String, (PathBuf, Vec<PathBuf>)>,
    /// Names of built-in modules.
    builtin: Vec<String>,
}

impl ModuleIndex {
    /// Parses `modules.dep` (`kernel/…/a.ko.zst: kernel/…/b.ko.zst …`) and `modules.builtin`
    /// (one path a line); relative paths are taken relative to `dir`
    /// (`/lib/modules/<release>`). Malformed lines are skipped.
    pub fn parse(dir: &Path, modules_dep: &str, modules_builtin: &str) -> ModuleIndex {
        let resolve = |p: &str| {
            let p = Path::new(p);
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                dir.join(p)
            }
        };
        let mut modules = BTreeMap::new();
        for line in modules_dep.lines() {
            let Some((file, deps)) = line.split_once(':') else {
                continue;
            };
            let file = file.trim();
            if file.is_empty() {
                continue;
            }
            let deps = deps.split_whitespace().map(resolve).collect();
            modules
                .entry(module_name(file))
                .or_insert((resolve(file), deps));
        }
        let builtin = modules_builtin
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(module_name)
            .collect();
        ModuleIndex { modules, builtin }
    }

    /// Whether `name` is built into the kernel.
    pub fn is_builtin(&self, name: &str) -> bool {
        let name = module_name(name);
        self.builtin.contains(&name)
    }

    /// The files to load for `name`, dependencies first (the reverse of their `modules.dep`
    /// order, as modprobe does), `name`'s own file last; `None` when the index has no such
    /// module.
    pub fn load_order(&self, name: &str) -> Option<Vec<(String, PathBuf)>> {
        let (file, deps) = self.modules.get(&module_name(name))?;
        let mut order: Vec<(String, PathBuf)> = deps
            .iter()
            .rev()
            .map(|dep| {
                let dep_name = dep
                    .file_name()
                    .map(|n| module_name(&n.to_string_lossy()))
                    .unwrap_or_default();
                (dep_name, dep.clone())
            })
            .collect();
        order.push((module_name(name), file.clone()));
        Some(order)
    }
}
