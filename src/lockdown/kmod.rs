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
    /// Module name → the modules its `softdep … pre:` names resolve to (through
    /// `modules.alias`), loaded before it as modprobe does: `libcrc32c` needs a `crc32c`
    /// implementation loaded first, or its init fails with ENOENT.
    pre: BTreeMap<String, Vec<String>>,
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
        ModuleIndex {
            modules,
            builtin,
            pre: BTreeMap::new(),
        }
    }

    /// Adds the `pre:` soft dependencies of `modules.softdep` (`softdep NAME pre: A B post:
    /// C`), each resolved to the modules of this index named so or aliased so in
    /// `modules.alias` (`alias crc32c crc32c_generic`); names that resolve to nothing are
    /// dropped (a soft dependency is optional).
    pub fn with_softdeps(mut self, modules_softdep: &str, modules_alias: &str) -> ModuleIndex {
        let mut aliases: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for line in modules_alias.lines() {
            let mut words = line.split_whitespace();
            if let (Some("alias"), Some(alias), Some(module)) =
                (words.next(), words.next(), words.next())
            {
                aliases.entry(alias).or_default().push(module_name(module));
            }
        }
        for line in modules_softdep.lines() {
            let mut words = line.split_whitespace();
            let (Some("softdep"), Some(module)) = (words.next(), words.next()) else {
                continue;
            };
            let mut pre = Vec::new();
            let mut in_pre = false;
            for word in words {
                match word {
                    "pre:" => in_pre = true,
                    "post:" => in_pre = false,
                    name if in_pre => {
                        let targets = if self.modules.contains_key(&module_name(name)) {
                            vec![module_name(name)]
                        } else {
                            aliases.get(name).cloned().unwrap_or_default()
                        };
                        for target in targets {
                            if self.modules.contains_key(&target) && !pre.contains(&target) {
                                pre.push(target);
                            }
                        }
                    }
                    _ => {}
                }
            }
            if !pre.is_empty() {
                self.pre.insert(module_name(module), pre);
            }
        }
        self
    }

    /// `name` and its `modules.dep` dependencies (no soft ones): what must load.
    pub fn hard_names(&self, name: &str) -> std::collections::BTreeSet<String> {
        let name = module_name(name);
        let mut names = std::collections::BTreeSet::new();
        if let Some((_, deps)) = self.modules.get(&name) {
            for dep in deps {
                if let Some(file) = dep.file_name() {
                    names.insert(module_name(&file.to_string_lossy()));
                }
            }
        }
        names.insert(name);
        names
    }

    /// Every module that some module names as a soft dependency (optional: one that does
    /// not load, e.g. `crc32c_intel` on a CPU without SSE 4.2, is skipped).
    pub fn soft_dependencies(&self) -> std::collections::BTreeSet<String> {
        self.pre.values().flatten().cloned().collect()
    }

    /// Whether `name` is built into the kernel.
    pub fn is_builtin(&self, name: &str) -> bool {
        let name = module_name(name);
        self.builtin.contains(&name)
    }

    /// The files to load for `name`, dependencies first (the reverse of their `modules.dep`
    /// order, as modprobe does), `name`'s own file last; `None` when the index has no such
    /// module.
    ///
    /// Each module's `pre:` soft dependencies (with their own dependencies) come right before
    /// it.
    pub fn load_order(&self, name: &str) -> Option<Vec<(String, PathBuf)>> {
        let mut order = Vec::new();
        self.push_order(&module_name(name), &mut order, 0)?;
        Some(order)
    }

    fn push_order(&self, name: &str, order: &mut Vec<(String, PathBuf)>, depth: u8) -> Option<()> {
        let (file, deps) = self.modules.get(name)?;
        let hard = deps.iter().rev().map(|dep| {
            let dep_name = dep
                .file_name()
                .map(|n| module_name(&n.to_string_lossy()))
                .unwrap_or_default();
            (dep_name, dep.clone())
        });
        for (dep_name, dep) in hard.chain(std::iter::once((name.to_owned(), file.clone()))) {
            // Soft dependencies of soft dependencies: two levels are plenty (and no cycle).
            if depth < 2 {
                for pre in self.pre.get(&dep_name).into_iter().flatten() {
                    if !order.iter().any(|(n, _)| n == pre) {
                        let _ = self.push_order(pre, order, depth + 1);
                    }
                }
            }
            if !order.iter().any(|(n, _)| *n == dep_name) {
                order.push((dep_name, dep));
            }
        }
        Some(())
    }
}
