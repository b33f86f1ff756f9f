//! `cargo xtask tidy`: structural rules that the compiler does not check.
//!
//! 1. **Layers.** ARCHITECTURE.md's "Code map" table is the one source of truth: its rows,
//!    top to bottom, give each top-level module of the daemon crate (`src/X.rs`, `src/X/`, or
//!    `crate::X` for a re-export) a layer (an empty layer cell continues the layer above).
//!    Every module that `src/lib.rs` declares (`mod X;` or `pub use other_crate::X;`) must be
//!    in exactly one row, and every `src/` row must be a module of `src/lib.rs` (or
//!    `src/main.rs`, the entry). Then every `crate::X` path in `src/**/*.rs` (also inside
//!    expressions, grouped `use crate::{a, b}`, and `super::` chains that leave the top-level
//!    module; comments, doc comments and string literals are not code and are skipped) must
//!    name a module of the same layer or a layer below. Same-layer imports are allowed only
//!    when the module graph has no cycle.
//!
//!    Test code (`#[cfg(test)]` modules, `tests.rs` files) is checked like the rest: it is
//!    compiled into the same module graph, and a test of a low module that needs a higher
//!    layer belongs to that layer or to `tests/`. Each `src/` path in the table must exist.
//!    (A `super::` chain is resolved from the file's place in `src/`; a `#[path]` module is
//!    read as if it lived there, which matters only for chains that reach the crate root.)
//! 2. **The verifier stays portable.** `cargo tree -p cvm-warden-verify -e normal` (every
//!    target) must contain no crate that needs libtss2, libcryptsetup, nix or other
//!    Linux-only system APIs; the error names the crate and `cargo tree -i`'s path to it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Runs both checks and fails listing every problem found.
pub(crate) fn run(root: &Path) -> Result<()> {
    let mut problems = layer_problems(root)?;
    problems.extend(verifier_problems(root)?);
    if problems.is_empty() {
        eprintln!("tidy: ok (layers of src/ as in ARCHITECTURE.md; verifier portable)");
        return Ok(());
    }
    for problem in &problems {
        eprintln!("{problem}");
    }
    bail!("tidy: {} problem(s), listed above", problems.len())
}

// ---------------------------------------------------------------------------------------
// The layer table.

/// The layers of the code map and the layer of each top-level module.
#[derive(Debug, Default, PartialEq)]
struct Layers {
    /// Layer names that hold a module, top first.
    names: Vec<String>,
    /// Module → index into `names`.
    modules: BTreeMap<String, usize>,
    /// The `src/` paths of the rows, with their line in ARCHITECTURE.md.
    paths: Vec<(usize, String)>,
}

impl Layers {
    fn describe(&self, module: &str) -> String {
        match self.modules.get(module) {
            Some(&layer) => format!("{module} (layer {})", self.names[layer]),
            None => module.to_string(),
        }
    }
}

/// Reads the first table after the `## Code map` heading: `| layer | path | what |`.
fn parse_code_map(markdown: &str) -> Result<Layers> {
    let mut lines = markdown.lines().enumerate();
    if !lines.any(|(_, line)| line.trim() == "## Code map") {
        bail!("ARCHITECTURE.md has no `## Code map` section; tidy reads the layers from it");
    }
    let rows: Vec<(usize, &str)> = lines
        .skip_while(|(_, line)| !line.trim_start().starts_with('|'))
        .take_while(|(_, line)| line.trim_start().starts_with('|'))
        .collect();
    if rows.len() < 3 {
        bail!("ARCHITECTURE.md's code map has no table rows (`| layer | path | what |`)");
    }
    let mut layers = Layers::default();
    let mut current: Option<String> = None;
    // Layers left behind: a layer's rows stay together.
    let mut closed: BTreeSet<String> = BTreeSet::new();
    for &(index, row) in &rows[2..] {
        let cells: Vec<&str> = row.trim().trim_matches('|').split('|').collect();
        let (Some(layer), Some(path)) = (cells.first(), cells.get(1)) else {
            bail!(
                "ARCHITECTURE.md:{}: code map row without a path cell",
                index + 1
            );
        };
        let layer = layer.trim();
        if !layer.is_empty() && current.as_deref() != Some(layer) {
            if let Some(previous) = current.take() {
                closed.insert(previous);
            }
            current = Some(layer.to_string());
        }
        let Some(layer) = current.clone() else {
            bail!(
                "ARCHITECTURE.md:{}: the first code map row has no layer",
                index + 1
            );
        };
        let Some(module) = module_of_cell(path) else {
            continue;
        };
        if let Some(src) = path.split('`').nth(1).filter(|p| p.starts_with("src/")) {
            layers.paths.push((index + 1, src.to_string()));
        }
        if closed.contains(&layer) {
            bail!(
                "ARCHITECTURE.md:{}: layer {layer} appears again below another layer; keep \
                 each layer's rows together",
                index + 1
            );
        }
        let position = match layers.names.iter().position(|name| *name == layer) {
            Some(position) => position,
            None => {
                layers.names.push(layer.clone());
                layers.names.len() - 1
            }
        };
        if let Some(&other) = layers.modules.get(&module) {
            bail!(
                "ARCHITECTURE.md:{}: module {module} is in layer {layer} and already in layer \
                 {}; give it one row",
                index + 1,
                layers.names[other]
            );
        }
        layers.modules.insert(module, position);
    }
    Ok(layers)
}

/// The module a path cell names: the first backticked `src/X.rs`, `src/X/…` or `crate::X`;
/// `None` for rows outside the daemon's `src/` (tasks, tests, data, other crates).
fn module_of_cell(cell: &str) -> Option<String> {
    let path = cell.split('`').nth(1)?;
    let name = if let Some(rest) = path.strip_prefix("src/") {
        rest.split('/').next()?.trim_end_matches(".rs")
    } else {
        path.strip_prefix("crate::")?.split("::").next()?
    };
    let ident = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    ident.then(|| name.to_string())
}

/// The top-level modules that `src/lib.rs` declares: `mod X;` and `pub use some_crate::X;`.
fn lib_modules(lib: &str) -> BTreeSet<String> {
    let tokens = tokenize(&strip(lib));
    let mut modules = BTreeSet::new();
    let mut depth = 0usize;
    for (i, token) in tokens.iter().enumerate() {
        match token.text.as_str() {
            "{" => depth += 1,
            "}" => depth = depth.saturating_sub(1),
            "mod" if depth == 0 => {
                if let (Some(name), Some(end)) = (tokens.get(i + 1), tokens.get(i + 2)) {
                    if end.text == ";" {
                        modules.insert(name.text.clone());
                    }
                }
            }
            "use" if depth == 0 => {
                // `pub use other_crate::x;`: a module of another crate, re-exported.
                let path: Vec<&str> = tokens[i + 1..]
                    .iter()
                    .take_while(|t| t.text != ";")
                    .map(|t| t.text.as_str())
                    .collect();
                if let [krate, ":", ":", name] = path.as_slice() {
                    let lowercase = name.starts_with(|c: char| c.is_ascii_lowercase());
                    if lowercase && !["crate", "self", "super"].contains(krate) {
                        modules.insert((*name).to_string());
                    }
                }
            }
            _ => {}
        }
    }
    modules
}

/// The layer list of `src/lib.rs`'s doc comment: `//! - LAYER: `a`, `b` (remarks)` items
/// (continued on indented `//!` lines); the modules are the backticked names before the first
/// `(`.
fn lib_doc_layers(lib: &str) -> Vec<(String, Vec<String>)> {
    let mut items: Vec<String> = Vec::new();
    for line in lib.lines() {
        let Some(text) = line.strip_prefix("//!") else {
            continue;
        };
        let text = text.strip_prefix(' ').unwrap_or(text);
        if let Some(item) = text.strip_prefix("- ") {
            items.push(item.to_string());
        } else if let (Some(last), true) = (items.last_mut(), text.starts_with("  ")) {
            last.push(' ');
            last.push_str(text.trim());
        } else if !text.trim().is_empty() && !items.is_empty() {
            break;
        }
    }
    items
        .iter()
        .filter_map(|item| {
            let (layer, rest) = item.split_once(':')?;
            let head = rest.split('(').next().unwrap_or_default();
            let modules = head
                .split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_string)
                .collect();
            Some((layer.trim().to_string(), modules))
        })
        .collect()
}

/// Whether `src/lib.rs`'s doc comment lists the table's layers and modules (all but the
/// entry, `src/main.rs`), in the same order of layers.
fn lib_doc_problems(layers: &Layers, lib: &str) -> Vec<String> {
    let render = |list: &[(String, Vec<String>)]| {
        list.iter()
            .map(|(layer, modules)| format!("{layer}: {}", modules.join(", ")))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let mut table: Vec<(String, Vec<String>)> = Vec::new();
    for (index, name) in layers.names.iter().enumerate() {
        let modules: Vec<String> = layers
            .modules
            .iter()
            .filter(|(module, &layer)| layer == index && *module != "main")
            .map(|(module, _)| module.clone())
            .collect();
        if !modules.is_empty() {
            table.push((name.clone(), modules));
        }
    }
    let mut doc = lib_doc_layers(lib);
    for (_, modules) in &mut doc {
        modules.sort();
    }
    if doc == table {
        return Vec::new();
    }
    vec![format!(
        "src/lib.rs: the doc comment's layer list (`//! - LAYER: `module`, …`) says\n  {}\n\
         but ARCHITECTURE.md's code map says\n  {}\nmake them agree",
        render(&doc),
        render(&table)
    )]
}

// ---------------------------------------------------------------------------------------
// Scanning source files.

/// One reference from a file to a top-level module.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reference {
    line: usize,
    module: String,
}

/// Replaces comments (doc comments included), string literals and char literals with spaces,
/// keeping every newline so that line numbers stay right.
fn strip(source: &str) -> String {
    let chars: Vec<char> = source.chars().collect();
    let mut out = String::with_capacity(source.len());
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    let is_ident = |c: char| c.is_alphanumeric() || c == '_';
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0usize;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
        } else if let Some((hashes, quote)) = raw_string_start(&chars, i) {
            for &c in &chars[i..=quote] {
                out.push(blank(c));
            }
            i = quote + 1;
            while i < chars.len() {
                if chars[i] == '"' && (1..=hashes).all(|k| chars.get(i + k) == Some(&'#')) {
                    for _ in 0..=hashes {
                        out.push(' ');
                    }
                    i += hashes + 1;
                    break;
                }
                out.push(blank(chars[i]));
                i += 1;
            }
        } else if c == '"' {
            out.push(' ');
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if let Some(&c) = chars.get(i) {
                    out.push(blank(c));
                }
                i += 1;
            }
            out.push(' ');
            i += 1;
        } else if c == '\'' && (i == 0 || !is_ident(chars[i - 1])) {
            // A char literal ('x', '\n', '\u{..}') or a lifetime ('a, which stays).
            let end = if next == Some('\\') {
                chars[i + 2..]
                    .iter()
                    .position(|&c| c == '\'')
                    .map(|p| i + 2 + p)
            } else if chars.get(i + 2) == Some(&'\'') {
                Some(i + 2)
            } else {
                None
            };
            match end {
                Some(end) => {
                    for _ in i..=end {
                        out.push(' ');
                    }
                    i = end + 1;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// At a raw string (`r"`, `r#"`, `br##"` …) not inside an identifier: its `#` count and the
/// index of its opening quote.
fn raw_string_start(chars: &[char], i: usize) -> Option<(usize, usize)> {
    let is_ident = |c: char| c.is_alphanumeric() || c == '_';
    if i > 0 && is_ident(chars[i - 1]) {
        return None;
    }
    let mut j = i;
    if chars.get(j) == Some(&'b') {
        j += 1;
    }
    if chars.get(j) != Some(&'r') {
        return None;
    }
    j += 1;
    let hashes = chars[j..].iter().take_while(|&&c| c == '#').count();
    (chars.get(j + hashes) == Some(&'"')).then_some((hashes, j + hashes))
}

#[derive(Debug, Clone)]
struct Token {
    text: String,
    line: usize,
}

/// Identifiers (with `$crate` as `crate`) and single punctuation characters.
fn tokenize(code: &str) -> Vec<Token> {
    let mut tokens = Vec::new();
    let mut line = 1;
    let mut chars = code.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\n' {
            line += 1;
        } else if c.is_alphanumeric() || c == '_' {
            let mut text = c.to_string();
            while let Some(&c) = chars.peek() {
                if !(c.is_alphanumeric() || c == '_') {
                    break;
                }
                text.push(c);
                chars.next();
            }
            tokens.push(Token { text, line });
        } else if c == '$' {
            continue;
        } else if !c.is_whitespace() {
            tokens.push(Token {
                text: c.to_string(),
                line,
            });
        }
    }
    tokens
}

fn is_ident(token: &Token) -> bool {
    token
        .text
        .chars()
        .next()
        .is_some_and(|c| c.is_alphabetic() || c == '_')
}

/// Scans one file. `module_path` is the file's module (`src/stage/attest.rs` → `stage`,
/// `attest`); `roots` are the names that start a path at the crate root (`crate`, or
/// `cvm_warden` in `src/main.rs`).
fn scan(source: &str, module_path: &[String], roots: &[&str]) -> Vec<Reference> {
    let tokens = tokenize(&strip(source));
    let mut references = Vec::new();
    // Inline `mod x { … }` blocks open here: (name, brace depth inside it).
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    while i < tokens.len() {
        let text = tokens[i].text.as_str();
        let after_path_sep = i >= 2 && tokens[i - 1].text == ":" && tokens[i - 2].text == ":";
        match text {
            "{" => depth += 1,
            "}" => {
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
                depth = depth.saturating_sub(1);
            }
            "mod" => {
                if let (Some(name), Some(open)) = (tokens.get(i + 1), tokens.get(i + 2)) {
                    if open.text == "{" {
                        inline.push((name.text.clone(), depth + 1));
                    }
                }
            }
            _ if roots.contains(&text) && !after_path_sep && path_sep(&tokens, i + 1) => {
                references.extend(first_segments(&tokens, i + 3, tokens[i].line));
            }
            "super" if !after_path_sep => {
                let mut levels = 0;
                let mut j = i;
                while tokens.get(j).is_some_and(|t| t.text == "super") && path_sep(&tokens, j + 1) {
                    levels += 1;
                    j += 3;
                }
                let here = module_path.len() + inline.len();
                if levels > 0 && levels == here {
                    references.extend(first_segments(&tokens, j, tokens[i].line));
                }
                i = j.max(i + 1);
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    references
}

/// Whether tokens `at` and `at + 1` are `::`.
fn path_sep(tokens: &[Token], at: usize) -> bool {
    tokens.get(at).is_some_and(|t| t.text == ":")
        && tokens.get(at + 1).is_some_and(|t| t.text == ":")
}

/// The first path segments at `at`: one identifier, or each entry of a `{ … }` group.
fn first_segments(tokens: &[Token], at: usize, line: usize) -> Vec<Reference> {
    let Some(token) = tokens.get(at) else {
        return Vec::new();
    };
    if is_ident(token) {
        return vec![Reference {
            line,
            module: token.text.clone(),
        }];
    }
    if token.text != "{" {
        return Vec::new();
    }
    let end = matching(tokens, at);
    let mut references = Vec::new();
    let mut nesting = 0usize;
    let mut entry_start = true;
    for token in &tokens[at + 1..end] {
        match token.text.as_str() {
            "{" | "(" | "[" => nesting += 1,
            "}" | ")" | "]" => nesting = nesting.saturating_sub(1),
            "," if nesting == 0 => {
                entry_start = true;
                continue;
            }
            _ if entry_start && nesting == 0 && is_ident(token) && token.text != "self" => {
                references.push(Reference {
                    line: token.line,
                    module: token.text.clone(),
                });
            }
            _ => {}
        }
        entry_start = false;
    }
    references
}

/// The index of the bracket that closes the one at `open` (the last token if none does).
fn matching(tokens: &[Token], open: usize) -> usize {
    let mut depth = 0usize;
    for (i, token) in tokens.iter().enumerate().skip(open) {
        match token.text.as_str() {
            "{" | "(" | "[" => depth += 1,
            "}" | ")" | "]" => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return i;
                }
            }
            _ => {}
        }
    }
    tokens.len().saturating_sub(1)
}

// ---------------------------------------------------------------------------------------
// Checking the tree.

/// A file of the daemon crate and what it references.
#[derive(Debug)]
struct SourceFile {
    /// Relative to the repository root, e.g. `src/stage/attest.rs`.
    path: String,
    /// `stage`, `attest`; `main` for `src/main.rs`.
    module_path: Vec<String>,
    references: Vec<Reference>,
}

fn layer_problems(root: &Path) -> Result<Vec<String>> {
    let map_path = root.join("ARCHITECTURE.md");
    let markdown = fs::read_to_string(&map_path)
        .with_context(|| format!("cannot read {}", map_path.display()))?;
    let layers = parse_code_map(&markdown)?;
    let lib_path = root.join("src/lib.rs");
    let lib = fs::read_to_string(&lib_path)
        .with_context(|| format!("cannot read {}", lib_path.display()))?;
    let declared = lib_modules(&lib);

    let mut files = Vec::new();
    for path in rust_files(&root.join("src"))? {
        let relative = path
            .strip_prefix(root)
            .unwrap_or(&path)
            .to_string_lossy()
            .into_owned();
        let source =
            fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let module_path = module_path_of(&relative);
        if module_path.is_empty() {
            continue; // src/lib.rs: it declares the modules and imports none.
        }
        let roots: &[&str] = if relative == "src/main.rs" {
            &["cvm_warden"]
        } else {
            &["crate"]
        };
        let references = scan(&source, &module_path, roots);
        files.push(SourceFile {
            path: relative,
            module_path,
            references,
        });
    }
    let mut problems = check_layers(&layers, &declared, &files);
    problems.extend(lib_doc_problems(&layers, &lib));
    for (line, path) in &layers.paths {
        if !root.join(path.trim_end_matches("*.rs")).exists() {
            problems.push(format!(
                "ARCHITECTURE.md:{line}: the code map names {path}, which does not exist; a \
                 re-exported module's row names it as `crate::NAME`"
            ));
        }
    }
    Ok(problems)
}

/// The problems of a scanned tree against the layer table and `src/lib.rs`'s modules.
fn check_layers(layers: &Layers, declared: &BTreeSet<String>, files: &[SourceFile]) -> Vec<String> {
    let mut problems = Vec::new();
    for module in declared {
        if !layers.modules.contains_key(module) {
            problems.push(format!(
                "src/lib.rs: module {module} is in no layer of ARCHITECTURE.md's code map; add \
                 a row for src/{module}"
            ));
        }
    }
    for module in layers.modules.keys() {
        if !declared.contains(module) && module != "main" {
            problems.push(format!(
                "ARCHITECTURE.md: the code map has a row for {module}, which src/lib.rs does \
                 not declare; remove the row or declare the module"
            ));
        }
    }
    // Module → module of the same layer it imports → the first place it does.
    let mut edges: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for file in files {
        let own = &file.module_path[0];
        for reference in &file.references {
            let target = &reference.module;
            if target == own || !layers.modules.contains_key(target) {
                continue;
            }
            let place = format!("{}:{}", file.path, reference.line);
            let (Some(&from), Some(&to)) = (layers.modules.get(own), layers.modules.get(target))
            else {
                continue;
            };
            if to < from {
                problems.push(format!(
                    "{place}: {} imports {target} (layer {} above it)",
                    layers.describe(own),
                    layers.names[to]
                ));
            }
            // Only same-layer edges can close a cycle that no upward import already shows.
            if to != from {
                continue;
            }
            edges
                .entry(own.clone())
                .or_default()
                .entry(target.clone())
                .or_insert(place);
        }
    }
    for cycle in cycles(&edges) {
        let mut text = format!("cycle between modules: {}", cycle.join(" → "));
        for pair in cycle.windows(2) {
            if let Some(place) = edges.get(&pair[0]).and_then(|to| to.get(&pair[1])) {
                let _ = write!(text, "\n  {place}: {} imports {}", pair[0], pair[1]);
            }
        }
        problems.push(text);
    }
    problems
}

/// One cycle through each module that is on one (a module already reported is not the start
/// of another), as a closed path `a → b → a`.
fn cycles(edges: &BTreeMap<String, BTreeMap<String, String>>) -> Vec<Vec<String>> {
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut found = Vec::new();
    for start in edges.keys() {
        if seen.contains(start) {
            continue;
        }
        if let Some(cycle) = cycle_through(edges, start) {
            seen.extend(cycle.iter().cloned());
            found.push(cycle);
        }
    }
    found
}

/// The shortest path from `start` back to itself, if any.
fn cycle_through(
    edges: &BTreeMap<String, BTreeMap<String, String>>,
    start: &str,
) -> Option<Vec<String>> {
    let mut previous: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(node) = queue.pop_front() {
        for next in edges.get(node).into_iter().flat_map(|to| to.keys()) {
            if next == start {
                let mut path = vec![start.to_string()];
                let mut at = node;
                path.push(at.to_string());
                while at != start {
                    at = previous.get(at)?;
                    path.push(at.to_string());
                }
                path.reverse();
                return Some(path);
            }
            if !previous.contains_key(next.as_str()) {
                previous.insert(next, node);
                queue.push_back(next);
            }
        }
    }
    None
}

/// `src/stage/attest.rs` → `stage`, `attest`; `src/stage/mod.rs` → `stage`; `src/lib.rs` →
/// nothing; `src/main.rs` → `main`.
fn module_path_of(relative: &str) -> Vec<String> {
    let inner = relative.strip_prefix("src/").unwrap_or(relative);
    if inner == "lib.rs" {
        return Vec::new();
    }
    let mut parts: Vec<String> = inner
        .trim_end_matches(".rs")
        .split('/')
        .map(str::to_string)
        .collect();
    if parts.len() > 1 && parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

fn rust_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

// ---------------------------------------------------------------------------------------
// The verifier's dependencies.

/// Crates the verifier must not depend on: they need libtss2, libcryptsetup, libxml2,
/// libxmlsec1, OpenSSL or Linux-only system APIs, and an auditor builds the verifier
/// anywhere (the RIM XML signatures are checked in pure Rust).
fn forbidden(name: &str) -> bool {
    name == "nix"
        || name.contains("tss-esapi")
        || name.contains("libtss2")
        || name.contains("cryptsetup")
        || name.contains("libxml")
        || name.contains("xmlsec")
        || name == "openssl-sys"
        || name == "openssl"
}

/// The forbidden crates in `cargo tree --prefix none` output (first word of each line).
fn forbidden_crates(tree: &str) -> BTreeSet<String> {
    tree.lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| forbidden(name))
        .map(str::to_string)
        .collect()
}

fn verifier_problems(root: &Path) -> Result<Vec<String>> {
    let tree = cargo_tree(root, &["--prefix", "none"])?;
    let mut problems = Vec::new();
    for name in forbidden_crates(&tree) {
        let path = cargo_tree(root, &["--invert", &name])?;
        problems.push(format!(
            "verify/: cvm-warden-verify depends on {name}, which the offline verifier must not \
             (no libtss2, libcryptsetup, nix or Linux-only APIs); the path to it \
             (`cargo tree -p cvm-warden-verify -e normal --target all -i {name}`):\n{path}"
        ));
    }
    Ok(problems)
}

fn cargo_tree(root: &Path, extra: &[&str]) -> Result<String> {
    let mut cmd = super::cargo();
    cmd.current_dir(root).args([
        "tree",
        "-p",
        "cvm-warden-verify",
        "-e",
        "normal",
        "--target",
        "all",
    ]);
    cmd.args(extra);
    let output = cmd
        .output()
        .with_context(|| format!("cannot start {}", super::show(&cmd)))?;
    if !output.status.success() {
        bail!(
            "{} failed with {}: {}",
            super::show(&cmd),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    const MAP: &str = "\
# title

## Code map

Layers, top to bottom.

| layer | path | what |
|---|---|---|
| entry | `src/main.rs` | main |
| top | `src/cli.rs` | commands |
| | `src/boot.rs` | runner |
| low | `src/policy/` | policy |
| | `crate::digest` | re-export |
| verifier | `verify/` | its own crate |

## Next
";

    fn layers() -> Layers {
        parse_code_map(MAP).unwrap()
    }

    fn file(path: &str, source: &str) -> SourceFile {
        let module_path = module_path_of(path);
        let roots: &[&str] = if path == "src/main.rs" {
            &["cvm_warden"]
        } else {
            &["crate"]
        };
        SourceFile {
            path: path.to_string(),
            references: scan(source, &module_path, roots),
            module_path,
        }
    }

    fn declared() -> BTreeSet<String> {
        ["cli", "boot", "policy", "digest"].map(String::from).into()
    }

    fn modules(source: &str, path: &str) -> Vec<(usize, String)> {
        file(path, source)
            .references
            .into_iter()
            .map(|r| (r.line, r.module))
            .collect()
    }

    #[test]
    fn code_map_gives_layers_top_first_and_continues_empty_cells() {
        let layers = layers();
        assert_eq!(layers.names, ["entry", "top", "low"]);
        assert_eq!(layers.modules["main"], 0);
        assert_eq!(layers.modules["cli"], 1);
        assert_eq!(layers.modules["boot"], 1);
        assert_eq!(layers.modules["policy"], 2);
        assert_eq!(layers.modules["digest"], 2);
        assert!(!layers.modules.contains_key("verify"));
        assert_eq!(
            layers.paths,
            [
                (9, "src/main.rs".to_string()),
                (10, "src/cli.rs".to_string()),
                (11, "src/boot.rs".to_string()),
                (12, "src/policy/".to_string())
            ]
        );
    }

    #[test]
    fn code_map_refuses_a_module_twice_and_a_split_layer() {
        let twice = MAP.replace("`src/boot.rs`", "`src/cli.rs`");
        let err = parse_code_map(&twice).unwrap_err().to_string();
        assert!(
            err.contains("module cli is in layer top and already in layer top"),
            "{err}"
        );
        let split = MAP.replace("| verifier | `verify/`", "| top | `src/report.rs`");
        let err = parse_code_map(&split).unwrap_err().to_string();
        assert!(err.contains("layer top appears again"), "{err}");
        assert!(parse_code_map("# no map\n").is_err());
    }

    #[test]
    fn lib_modules_are_mods_and_crate_reexports() {
        let lib = "//! doc mentioning mod fake;\n#![deny(unsafe_code)]\npub mod audit;\n\
                   /// The digest.\npub use cvm_warden_verify::digest;\n#[allow(unsafe_code)]\n\
                   pub mod sys;\nmod inner { mod nested; }\npub use crate::audit::Audit;\npub use other::Type;\n";
        assert_eq!(
            lib_modules(lib),
            ["audit", "digest", "sys"].map(String::from).into()
        );
    }

    #[test]
    fn lib_doc_comment_must_list_the_table_layers() {
        let lib =
            "//! The crate.\n//!\n//! Layers:\n//!\n//! - top: `cli`, `boot` (runs `Stage`s)\n\
                   //! - low: `policy`,\n//!   `digest` (from `verify/`)\n//!\n//! More.\n\
                   //! - not: `a layer`\npub mod cli;\n";
        assert_eq!(
            lib_doc_layers(lib),
            [
                (
                    "top".to_string(),
                    vec!["cli".to_string(), "boot".to_string()]
                ),
                (
                    "low".to_string(),
                    vec!["policy".to_string(), "digest".to_string()]
                )
            ]
        );
        assert!(lib_doc_problems(&layers(), lib).is_empty());
        let moved = lib
            .replace("`policy`,", "`policy`, `boot`,")
            .replace("`cli`, `boot`", "`cli`");
        let problems = lib_doc_problems(&layers(), &moved);
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].contains("top: cli; low: boot, digest, policy\nbut"),
            "{}",
            problems[0]
        );
        assert_eq!(lib_doc_problems(&layers(), "//! No list.\n").len(), 1);
    }

    #[test]
    fn an_upward_import_fails_with_file_line_and_layers() {
        let files = [file(
            "src/policy/types.rs",
            "//! x\n\nuse crate::boot::Ready;\n",
        )];
        let problems = check_layers(&layers(), &declared(), &files);
        assert_eq!(
            problems,
            ["src/policy/types.rs:3: policy (layer low) imports boot (layer top above it)"]
        );
    }

    #[test]
    fn downward_and_own_module_imports_pass() {
        let files = [
            file("src/main.rs", "fn main() { cvm_warden::cli::main(); }"),
            file(
                "src/cli.rs",
                "use crate::{boot, policy::Policy};\nuse crate::cli::X;",
            ),
            file("src/boot.rs", "use crate::digest::Digest;"),
            file("src/policy/mod.rs", "use crate::digest::Digest;"),
        ];
        assert_eq!(
            check_layers(&layers(), &declared(), &files),
            Vec::<String>::new()
        );
    }

    #[test]
    fn comments_doc_comments_and_strings_are_not_imports() {
        let source = "//! See [`crate::boot`].\n/// Uses crate::cli::run.\n\
                      // use crate::boot;\n/* crate::boot /* nested */ crate::cli */\n\
                      const S: &str = \"crate::boot::x\";\n\
                      const R: &str = r#\"crate::cli \"quoted\" \"#;\n\
                      const C: char = '\"'; fn f<'a>(x: &'a str) -> &'a str { x }\n\
                      use crate::digest::Digest;\n";
        assert_eq!(
            modules(source, "src/policy/mod.rs"),
            [(8, "digest".to_string())]
        );
    }

    #[test]
    fn paths_inside_expressions_and_groups_are_found() {
        let source = "use crate::{\n    boot::{self, Ready},\n    cli,\n};\n\
                      fn f() { let d = crate::digest::Digest::of(b\"\"); \
                      crate :: policy :: load(); }\n\
                      macro_rules! m { () => { $crate::cli::run() }; }\n\
                      pub(crate) fn g() {}\n";
        assert_eq!(
            modules(source, "src/policy/mod.rs"),
            [
                (2, "boot".to_string()),
                (3, "cli".to_string()),
                (5, "digest".to_string()),
                (5, "policy".to_string()),
                (6, "cli".to_string())
            ]
        );
    }

    #[test]
    fn super_chains_that_leave_the_top_level_module_are_imports() {
        // src/policy/types.rs: `super::` is policy, `super::super::` the crate root.
        let source = "use super::raw::Raw;\nuse super::super::boot;\n\
                      mod inner { use super::super::super::cli; use super::super::x; }\n";
        assert_eq!(
            modules(source, "src/policy/types.rs"),
            [(2, "boot".to_string()), (3, "cli".to_string())]
        );
    }

    #[test]
    fn test_modules_are_checked_too() {
        let files = [file(
            "src/policy/tests.rs",
            "#[cfg(test)]\nmod t {\n    use crate::cli;\n}\n",
        )];
        let problems = check_layers(&layers(), &declared(), &files);
        assert_eq!(
            problems,
            ["src/policy/tests.rs:3: policy (layer low) imports cli (layer top above it)"]
        );
    }

    #[test]
    fn a_same_layer_cycle_fails_naming_each_edge() {
        let files = [
            file("src/cli.rs", "use crate::boot;"),
            file("src/boot.rs", "\nfn f() { crate::cli::x() }"),
        ];
        let problems = check_layers(&layers(), &declared(), &files);
        assert_eq!(
            problems,
            ["cycle between modules: boot → cli → boot\n  \
              src/boot.rs:2: boot imports cli\n  src/cli.rs:1: cli imports boot"]
        );
        // Without the back edge there is no cycle.
        assert!(check_layers(&layers(), &declared(), &files[..1]).is_empty());
    }

    #[test]
    fn lib_and_table_must_agree() {
        let mut declared = declared();
        declared.insert("report".to_string());
        declared.remove("boot");
        let problems = check_layers(&layers(), &declared, &[]);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].starts_with("src/lib.rs: module report is in no layer"));
        assert!(problems[1].starts_with("ARCHITECTURE.md: the code map has a row for boot"));
    }

    #[test]
    fn forbidden_verifier_dependencies_are_found_by_crate_name() {
        let tree = "cvm-warden-verify v0.1.0 (/w/verify)\nbase64 v0.22.1\n\
                    nix v0.30.1\ntss-esapi v7.7.0\ntss-esapi-sys v0.5.0\n\
                    libcryptsetup-rs v0.16.0\nnix v0.30.1 (*)\nphf v0.11.0\n";
        assert_eq!(
            forbidden_crates(tree),
            ["libcryptsetup-rs", "nix", "tss-esapi", "tss-esapi-sys"]
                .map(String::from)
                .into()
        );
        assert!(forbidden_crates("cvm-warden-verify v0.1.0\nsev v8.0.0\nunix v1\n").is_empty());
        assert_eq!(
            forbidden_crates(
                "libxml v0.3.3\nxmlsec v0.2.2\nopenssl-sys v0.9.1\nroxmltree v0.21.1\n"
            ),
            ["libxml", "openssl-sys", "xmlsec"].map(String::from).into()
        );
    }
}
