//! The files of `src/` are layered: no two of them name each other. A module that names
//! another (`crate::a::f`, `super::g`, `use crate::{a, b::c}`, or a parent's `child::h`)
//! depends on it; a pair that depends both ways is a cycle, and one of its halves can no
//! longer be read, tested or replaced without the other (the exact direction reference and
//! its vectorised fill were such a pair).
//!
//! The scan is lexical (comments and string literals removed, paths read token by token),
//! which is enough for this crate's style: paths are written out, not built by macros.
//! Facades are not dependencies: the crate root declares the modules and re-exports their
//! items, so a path that resolves to it (`crate::Error`) is not counted as naming `lib.rs`;
//! likewise a parent module's re-exports of its children (`pub use child::...`, `use
//! child::*` for its other children's `use super::*`) are not counted as the parent using
//! them. Inline modules (`mod tests { ... }`) are left out: they are the tests of their
//! file, not its layering.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Module = Vec<String>;

/// Every `.rs` file of `src/` outside `src/bin`, by its module path (`src/backend/cpu.rs` is
/// `["backend", "cpu"]`, `src/backend/mod.rs` is `["backend"]`, `src/lib.rs` is `[]`).
fn modules(src: &Path) -> BTreeMap<Module, PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(src, &mut files);
    let mut out = BTreeMap::new();
    for p in files {
        let rel = p.strip_prefix(src).unwrap().with_extension("");
        let mut parts: Module = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        if parts.first().is_some_and(|s| s == "bin") {
            continue;
        }
        if parts.last().is_some_and(|s| s == "mod" || s == "lib") {
            parts.pop();
        }
        out.insert(parts, p);
    }
    out
}

/// The source without comments and string literals (replaced by spaces).
fn code_of(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let mut depth = 0;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push(' ');
        } else if b[i] == b'r' && (b[i + 1..].starts_with(b"\"") || b[i + 1..].starts_with(b"#")) {
            // A raw string r"..." / r#"..."#.
            let mut j = i + 1;
            while j < b.len() && b[j] == b'#' {
                j += 1;
            }
            if j < b.len() && b[j] == b'"' {
                let close = format!("\"{}", "#".repeat(j - i - 1));
                let end = text[j + 1..]
                    .find(&close)
                    .map_or(b.len(), |k| j + 1 + k + close.len());
                out.push(' ');
                i = end;
            } else {
                out.push('r');
                i += 1;
            }
        } else if b[i] == b'\'' && (b.get(i + 2) == Some(&b'\'') || b.get(i + 1) == Some(&b'\\')) {
            // A character literal ('"', '\''), not a lifetime.
            let mut j = i + 2;
            while j < b.len() && b[j] != b'\'' {
                j += 1;
            }
            out.push(' ');
            i = j + 1;
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push(' ');
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// The paths written after `at` (just past a `prefix::`): `a::b::c`, or a `{...}` group of
/// such paths (nested), each as its segments.
fn paths_at(code: &[u8], mut at: usize, prefix: &Module, out: &mut Vec<Module>) {
    let mut path = prefix.clone();
    loop {
        while at < code.len() && code[at].is_ascii_whitespace() {
            at += 1;
        }
        if at < code.len() && code[at] == b'{' {
            // A group: each comma-separated item at depth 1 is a path after `path`.
            at += 1;
            let mut item_start = at;
            let mut depth = 1;
            while at < code.len() && depth > 0 {
                match code[at] {
                    b'{' => depth += 1,
                    b'}' => depth -= 1,
                    b',' if depth == 1 => {
                        paths_at(code, item_start, &path, out);
                        item_start = at + 1;
                    }
                    _ => {}
                }
                if depth == 0 {
                    paths_at(code, item_start, &path, out);
                }
                at += 1;
            }
            return;
        }
        let start = at;
        while at < code.len() && is_ident(code[at]) {
            at += 1;
        }
        if at == start {
            break;
        }
        path.push(String::from_utf8_lossy(&code[start..at]).into_owned());
        if code[at..].starts_with(b"::") {
            at += 2;
        } else {
            break;
        }
    }
    out.push(path);
}

/// `code` without the bodies of inline modules (`mod tests { ... }`).
fn without_inline_modules(code: &str) -> String {
    let b = code.as_bytes();
    let mut out = String::with_capacity(code.len());
    let mut i = 0;
    while i < b.len() {
        let at_mod = code[i..].starts_with("mod ") && (i == 0 || !is_ident(b[i - 1]));
        if at_mod {
            let rest = &code[i + 4..];
            let name_len = rest.bytes().take_while(|c| is_ident(*c)).count();
            if name_len > 0 && rest[name_len..].trim_start().starts_with('{') {
                let mut j = i + 4 + name_len + rest[name_len..].find('{').unwrap();
                let mut depth = 0;
                while j < b.len() {
                    match b[j] {
                        b'{' => depth += 1,
                        b'}' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                    j += 1;
                }
                out.push(' ');
                i = j + 1;
                continue;
            }
        }
        out.push(b[i] as char);
        i += 1;
    }
    out
}

/// `code` without the statements that re-export child module `child` (`pub use child::...;`,
/// `use child::*;`).
fn without_reexports(code: &str, child: &str) -> String {
    let mut out = code.to_string();
    for pat in [format!("pub use {child}::"), format!("use {child}::*")] {
        while let Some(pos) = out.find(&pat) {
            let end = out[pos..].find(';').map_or(out.len(), |k| pos + k + 1);
            out.replace_range(pos..end, " ");
        }
    }
    out
}

/// Every path file `m` names: `crate::...`, `super::...`, and its own child modules
/// (`mod x;` then `x::...`, re-exports aside).
fn named_paths(m: &Module, code: &str) -> Vec<Module> {
    let code = &without_inline_modules(code);
    let b = code.as_bytes();
    let parent = m[..m.len().saturating_sub(1)].to_vec();
    let mut anchors: Vec<(String, Module)> = vec![
        ("crate".to_string(), Vec::new()),
        ("super".to_string(), parent),
    ];
    for (pos, _) in code.match_indices("mod ") {
        if pos > 0 && is_ident(b[pos - 1]) {
            continue;
        }
        let rest = &code[pos + 4..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() && rest[name.len()..].trim_start().starts_with(';') {
            let mut child = m.clone();
            child.push(name.clone());
            anchors.push((name, child));
        }
    }
    let mut out = Vec::new();
    for (i, (word, base)) in anchors.into_iter().enumerate() {
        let code = if i < 2 {
            code.clone()
        } else {
            without_reexports(code, &word)
        };
        let b = code.as_bytes();
        let pat = format!("{word}::");
        for (pos, _) in code.match_indices(&pat) {
            if pos > 0 && (is_ident(b[pos - 1]) || b[pos - 1] == b':') {
                continue; // inside a longer name or path
            }
            paths_at(b, pos + pat.len(), &base, &mut out);
        }
    }
    out
}

#[test]
fn no_two_files_of_src_name_each_other() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let files = modules(&src);
    let mut deps: BTreeMap<&Module, BTreeSet<&Module>> = BTreeMap::new();
    for (m, p) in &files {
        let code = code_of(&std::fs::read_to_string(p).unwrap());
        let entry = deps.entry(m).or_default();
        for path in named_paths(m, &code) {
            // The longest prefix of the path that is a file of src/.
            let target = (1..=path.len())
                .rev()
                .map(|k| &path[..k])
                .find_map(|k| files.get_key_value(k).map(|(key, _)| key));
            if let Some(t) = target {
                if t != m {
                    entry.insert(t);
                }
            }
        }
    }
    // The scan sees the known layering: the vectorised fill names the reference.
    assert!(
        deps[&vec!["fill".to_string()]].contains(&vec!["direction".to_string()]),
        "the scan misses fill.rs's use of direction.rs: {deps:?}"
    );
    let mut cycles = Vec::new();
    for (a, ds) in &deps {
        for b in ds {
            if a < b && deps.get(b).is_some_and(|back| back.contains(a)) {
                cycles.push(format!(
                    "{} <-> {}",
                    files[*a].display(),
                    files[*b].display()
                ));
            }
        }
    }
    assert!(cycles.is_empty(), "files that name each other: {cycles:#?}");
}
