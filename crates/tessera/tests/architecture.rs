//! The house's structure, checked: crates depend only on crates of a lower
//! floor, and no crate has an import circle between its modules.
//!
//! The floors are written down here and in README ("Architecture"); the
//! dependencies are read from each crate's Cargo.toml, the imports from
//! the `crate::…`, `super::…` and `use` paths of its source files (comments
//! left out). Each check is first shown to reject a fixture that breaks it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every crate and its floor: a crate may depend only on crates of a lower
/// floor.
const FLOORS: &[(&str, u8)] = &[
    ("tessera-core", 0),
    ("tessera-protocol", 1),
    ("tessera-models", 1),
    ("tessera-metrics", 1),
    ("tessera-engine", 1),
    ("tessera-llama", 2),
    ("tessera-ledger", 2),
    ("tessera-backend", 2),
    ("tessera-train", 2),
    ("tessera-api", 3),
    ("tessera-net", 3),
    ("tessera", 4),
];

fn floor(name: &str) -> Option<u8> {
    FLOORS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// The `tessera-*` crates a Cargo.toml's `[dependencies]` names (not dev-
/// or build-dependencies: tests may reach anywhere).
fn dependencies(cargo_toml: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_deps = false;
    for line in cargo_toml.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_deps = line == "[dependencies]";
            continue;
        }
        if !in_deps {
            continue;
        }
        let name = line.split(['=', '.', ' ']).next().unwrap_or("");
        if name.starts_with("tessera") {
            out.push(name.to_string());
        }
    }
    out
}

/// Crate → dependencies that break the floors (a dependency on the same or
/// a higher floor, or on a crate with no floor).
fn floor_violations(crates: &BTreeMap<String, Vec<String>>) -> Vec<String> {
    let mut bad = Vec::new();
    for (name, deps) in crates {
        let Some(f) = floor(name) else {
            bad.push(format!("{name} has no floor in FLOORS"));
            continue;
        };
        for d in deps {
            match floor(d) {
                Some(g) if g < f => {}
                Some(g) => bad.push(format!("{name} (floor {f}) depends on {d} (floor {g})")),
                None => bad.push(format!("{name} depends on {d}, which has no floor")),
            }
        }
    }
    bad
}

/// Source text without comments (doc links are not imports).
fn code(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let code = match line.find("//") {
            Some(i) if !line[..i].contains('"') => &line[..i],
            _ => line,
        };
        out.push_str(code);
        out.push('\n');
    }
    out
}

/// The module a source file is, as a path from the crate root
/// (`src/a/b.rs` and `src/a/b/mod.rs` are `a::b`; `lib.rs`/`main.rs` is
/// the root, ``).
fn module_of(rel: &Path) -> String {
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if let Some(last) = parts.last_mut() {
        *last = last.trim_end_matches(".rs").to_string();
    }
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts.join("::")
}

/// The identifier at the start of `s`.
fn ident(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The paths written from byte `at` of `code` on: `a::b::C`, or each path
/// of a group `a::{b, c::D}` (one level of braces).
fn paths_at(code: &str, at: usize) -> Vec<Vec<String>> {
    let mut segs = Vec::new();
    let mut rest = &code[at..];
    loop {
        let id = ident(rest);
        if id.is_empty() {
            break;
        }
        segs.push(id.to_string());
        rest = &rest[id.len()..];
        if let Some(r) = rest.strip_prefix("::") {
            rest = r;
            if let Some(group) = rest.strip_prefix('{') {
                let inner = &group[..group.find('}').unwrap_or(group.len())];
                return inner
                    .split(',')
                    .map(|item| {
                        let mut p = segs.clone();
                        p.extend(item.trim().split("::").map(|x| ident(x.trim()).to_string()));
                        p.retain(|x| !x.is_empty());
                        p
                    })
                    .collect();
            }
        } else {
            break;
        }
    }
    vec![segs]
}

/// Edges between a crate's modules (one per source file): module → every
/// other module it names through `crate::…`, `super::…`, `self::…` or a
/// child module's name.
fn module_edges(files: &BTreeMap<PathBuf, String>) -> BTreeMap<String, BTreeSet<String>> {
    let modules: BTreeSet<String> = files.keys().map(|p| module_of(p)).collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (path, text) in files {
        let me = module_of(path);
        let here: Vec<String> = if me.is_empty() {
            vec![]
        } else {
            me.split("::").map(str::to_string).collect()
        };
        let code = code(text);
        let mut absolute: Vec<Vec<String>> = Vec::new();
        // Where paths can start: `crate::`, `self::`, `super::` and the
        // names of this module's children.
        let children: Vec<String> = modules
            .iter()
            .filter_map(|m| {
                let rest = if me.is_empty() {
                    m.as_str()
                } else {
                    m.strip_prefix(&format!("{me}::"))?
                };
                (!rest.is_empty() && !rest.contains("::")).then(|| rest.to_string())
            })
            .collect();
        let starts = ["crate", "self", "super"]
            .iter()
            .map(|s| s.to_string())
            .chain(children);
        for start in starts {
            for (i, _) in code.match_indices(&format!("{start}::")) {
                let prev = code[..i].chars().last().unwrap_or(' ');
                if prev.is_alphanumeric() || prev == '_' || prev == ':' {
                    continue;
                }
                for p in paths_at(&code, i) {
                    let Some(first) = p.first() else { continue };
                    let resolved: Vec<String> = match first.as_str() {
                        "crate" => p[1..].to_vec(),
                        "self" => here.iter().cloned().chain(p[1..].iter().cloned()).collect(),
                        "super" => {
                            let ups = p.iter().take_while(|x| *x == "super").count();
                            if ups > here.len() {
                                continue;
                            }
                            here[..here.len() - ups]
                                .iter()
                                .cloned()
                                .chain(p[ups..].iter().cloned())
                                .collect()
                        }
                        _ => here.iter().cloned().chain(p.iter().cloned()).collect(),
                    };
                    absolute.push(resolved);
                }
            }
        }
        for p in absolute {
            // The longest prefix that is a module.
            let target = (1..=p.len())
                .rev()
                .map(|n| p[..n].join("::"))
                .find(|m| modules.contains(m));
            if let Some(t) = target.filter(|t| *t != me) {
                edges.entry(me.clone()).or_default().insert(t);
            }
        }
    }
    edges
}

/// Every import circle (strongly connected set of two or more modules, or
/// one importing itself), by Tarjan's algorithm.
fn circles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct Tarjan<'a> {
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<String, usize>,
        low: BTreeMap<String, usize>,
        stack: Vec<String>,
        on_stack: BTreeSet<String>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    impl Tarjan<'_> {
        fn visit(&mut self, v: &str) {
            self.index.insert(v.to_string(), self.next);
            self.low.insert(v.to_string(), self.next);
            self.next += 1;
            self.stack.push(v.to_string());
            self.on_stack.insert(v.to_string());
            let next: Vec<String> = self
                .edges
                .get(v)
                .map(|s| s.iter().cloned().collect())
                .unwrap_or_default();
            for w in next {
                if !self.index.contains_key(&w) {
                    self.visit(&w);
                    let lw = self.low[&w];
                    let lv = self.low[v];
                    self.low.insert(v.to_string(), lv.min(lw));
                } else if self.on_stack.contains(&w) {
                    let iw = self.index[&w];
                    let lv = self.low[v];
                    self.low.insert(v.to_string(), lv.min(iw));
                }
            }
            if self.low[v] == self.index[v] {
                let mut set = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(&w);
                    let done = w == v;
                    set.push(w);
                    if done {
                        break;
                    }
                }
                let self_loop = self.edges.get(v).is_some_and(|s| s.contains(v));
                if set.len() > 1 || self_loop {
                    set.sort();
                    self.out.push(set);
                }
            }
        }
    }
    let mut t = Tarjan {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    let nodes: BTreeSet<String> = edges
        .iter()
        .flat_map(|(k, v)| std::iter::once(k.clone()).chain(v.iter().cloned()))
        .collect();
    for v in nodes {
        if !t.index.contains_key(&v) {
            t.visit(&v);
        }
    }
    t.out
}

fn sources(src: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let rel = p.strip_prefix(src).unwrap().to_path_buf();
                out.insert(rel, std::fs::read_to_string(&p).unwrap());
            }
        }
    }
    out
}

#[test]
fn the_checks_reject_fixtures_that_break_them() {
    // A part that depends on a service, and a crate nobody placed.
    let mut crates = BTreeMap::new();
    crates.insert(
        "tessera-engine".to_string(),
        vec!["tessera-net".to_string()],
    );
    crates.insert("tessera-new".to_string(), vec![]);
    let bad = floor_violations(&crates);
    assert!(
        bad.iter()
            .any(|b| b.contains("tessera-engine (floor 1) depends on tessera-net")),
        "{bad:?}"
    );
    assert!(
        bad.iter().any(|b| b.contains("tessera-new has no floor")),
        "{bad:?}"
    );
    assert_eq!(
        dependencies("[dependencies]\ntessera-core.workspace = true\nserde = \"1\"\n[dev-dependencies]\ntessera-net = { path = \"x\" }\n"),
        vec!["tessera-core"]
    );

    // a → b::inner → c → a, through a group import, `super::super::` and
    // `crate::`; and b → b::inner → b through a child's name and `super::`.
    let mut files = BTreeMap::new();
    files.insert(
        PathBuf::from("lib.rs"),
        "mod a; mod b; mod c; mod d;".to_string(),
    );
    files.insert(
        PathBuf::from("a.rs"),
        "use crate::{b::inner::Thing, d};".to_string(),
    );
    files.insert(
        PathBuf::from("b/mod.rs"),
        "mod inner;\npub fn run() { inner::go() }".to_string(),
    );
    files.insert(
        PathBuf::from("b/inner.rs"),
        "use super::super::c::X;\nfn f() { super::run() }".to_string(),
    );
    files.insert(
        PathBuf::from("c.rs"),
        "// crate::d is only a comment\nuse crate::a::Y;".to_string(),
    );
    files.insert(PathBuf::from("d.rs"), "pub fn d() {}".to_string());
    let found = circles(&module_edges(&files));
    // Both circles pass through b::inner: one strongly connected set.
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(found, vec![names(&["a", "b", "b::inner", "c"])]);
    files.insert(PathBuf::from("c.rs"), "use crate::d;".to_string());
    files.insert(
        PathBuf::from("b/inner.rs"),
        "use super::super::c::X;".to_string(),
    );
    assert!(circles(&module_edges(&files)).is_empty());
}

#[test]
fn crates_depend_only_downward() {
    let root = workspace().join("crates");
    let mut crates = BTreeMap::new();
    for e in std::fs::read_dir(&root).unwrap().flatten() {
        let toml = e.path().join("Cargo.toml");
        if let Ok(text) = std::fs::read_to_string(&toml) {
            crates.insert(
                e.file_name().to_string_lossy().into_owned(),
                dependencies(&text),
            );
        }
    }
    assert!(crates.len() >= 10, "found {crates:?}");
    let bad = floor_violations(&crates);
    assert!(bad.is_empty(), "layering broken:\n{}", bad.join("\n"));
}

#[test]
fn no_crate_has_an_import_circle() {
    let root = workspace().join("crates");
    let mut found = Vec::new();
    for e in std::fs::read_dir(&root).unwrap().flatten() {
        let src = e.path().join("src");
        if !src.is_dir() {
            continue;
        }
        for circle in circles(&module_edges(&sources(&src))) {
            found.push(format!(
                "{}: {}",
                e.file_name().to_string_lossy(),
                circle.join(" ↔ ")
            ));
        }
    }
    assert!(found.is_empty(), "import circles:\n{}", found.join("\n"));
}
