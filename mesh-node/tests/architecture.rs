//! The crate's floors, checked from its source: which top-level module may import which
//! (read off the `crate::`/`super::` paths of the production code), that the import graph
//! has no cycle, and that the proxy's functions stay short enough to read.
//!
//! The floors, bottom up: `inventory` (workloads, services, keys) → `routing`, `policy` →
//! `state` → `plan` (the decisions) → `proxy` → telemetry sinks (`access_log`, `metrics`,
//! `distributed_tracing`); config sources (`config`) feed `state` from the side, and
//! `explain`, `admin`, `endpoints`, `gateway` (the ingress gateway's listeners), `app` sit
//! on top.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

/// The longest function the proxy may have, signature to closing brace.
const MAX_PROXY_FN_LINES: usize = 80;

/// Top-level modules and what each must never import.
const FORBIDDEN: &[(&str, &[&str])] = &[
    ("inventory", ALL_OF_THE_MESH),
    (
        "routing",
        &[
            "config", "state", "plan", "proxy", "gateway", "explain", "admin", "app", "cli",
        ],
    ),
    (
        "policy",
        &[
            "config", "state", "plan", "proxy", "gateway", "explain", "admin", "app", "cli",
        ],
    ),
    (
        "state",
        &[
            "config", "plan", "proxy", "gateway", "explain", "admin", "app", "cli",
        ],
    ),
    (
        "plan",
        &[
            "config",
            "proxy",
            "gateway",
            "explain",
            "admin",
            "app",
            "cli",
            "access_log",
            "metrics",
            "distributed_tracing",
        ],
    ),
    (
        "proxy",
        &[
            "config",
            "gateway",
            "explain",
            "admin",
            "endpoints",
            "app",
            "cli",
        ],
    ),
    ("explain", &["proxy", "config", "app"]),
    (
        "access_log",
        &["proxy", "config", "explain", "admin", "app"],
    ),
    (
        "metrics",
        &[
            "proxy",
            "config",
            "explain",
            "admin",
            "app",
            "access_log",
            "distributed_tracing",
        ],
    ),
    (
        "distributed_tracing",
        &["proxy", "config", "explain", "admin", "app"],
    ),
];

/// Stands for "every other module of the crate".
const ALL_OF_THE_MESH: &[&str] = &["*"];

fn source_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every production source file: test modules (`tests.rs`, and a trailing inline
/// `#[cfg(test)] mod tests { .. }`) are left out, as is the crate root, which wires
/// everything.
fn production_files() -> Vec<(PathBuf, String)> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        for entry in fs::read_dir(dir).expect("readable source dir") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                walk(&path, found);
            } else if path.extension().is_some_and(|e| e == "rs") {
                found.push(path);
            }
        }
    }
    let root = source_root();
    let mut paths = Vec::new();
    walk(&root, &mut paths);
    paths.sort();
    paths
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n != "tests.rs"))
        .filter(|p| {
            p.parent() != Some(&root)
                || !matches!(p.file_stem().and_then(|s| s.to_str()), Some("lib" | "main"))
        })
        .map(|path| {
            let text = fs::read_to_string(&path).expect("readable source");
            let text = match text.find("#[cfg(test)]\nmod tests {") {
                Some(start) => text[..start].to_string(),
                None => text,
            };
            let code: String = text
                .lines()
                .map(|line| line.find("//").map_or(line, |at| &line[..at]))
                .collect::<Vec<_>>()
                .join("\n");
            let relative = path.strip_prefix(&root).expect("under src").to_path_buf();
            (relative, code)
        })
        .collect()
}

/// The module path of a file relative to `src`: `proxy/http.rs` is `[proxy, http]`.
fn module_path(relative: &Path) -> Vec<String> {
    let mut parts: Vec<String> = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if let Some(last) = parts.last_mut() {
        *last = last.trim_end_matches(".rs").to_string();
    }
    if parts.last().is_some_and(|l| l == "mod") {
        parts.pop();
    }
    parts
}

/// The names at the top of a `use` tree that starts right after `crate::` (or after the
/// `super::`s that climb to the root): `a::b` gives `a`, `{a, b::{c, d}}` gives `a` and `b`.
fn leading_names(rest: &str) -> Vec<String> {
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let Some(group) = rest.strip_prefix('{') else {
        return vec![ident(rest)];
    };
    let mut names = Vec::new();
    let mut depth = 0;
    let mut start = 0;
    for (at, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                names.push(ident(&group[start..at]));
                break;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                names.push(ident(&group[start..at]));
                start = at + 1;
            }
            _ => {}
        }
    }
    names.into_iter().filter(|n| !n.is_empty()).collect()
}

/// Top-level module → the top-level modules its production code names.
fn import_graph() -> BTreeMap<String, BTreeSet<String>> {
    let files = production_files();
    let modules: BTreeSet<String> = files
        .iter()
        .map(|(relative, _)| module_path(relative)[0].clone())
        .collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = modules
        .iter()
        .map(|m| (m.clone(), BTreeSet::new()))
        .collect();
    for (relative, code) in &files {
        let path = module_path(relative);
        let own = &path[0];
        let mut referenced = Vec::new();
        for (at, _) in code.match_indices("crate::") {
            let before = code[..at].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
                continue;
            }
            referenced.extend(leading_names(&code[at + "crate::".len()..]));
        }
        // `super::` chains that climb out of the top-level module name another one.
        for (at, _) in code.match_indices("super::") {
            if code[..at].ends_with("super::") {
                continue;
            }
            let mut rest = &code[at..];
            let mut climbs = 0;
            while let Some(after) = rest.strip_prefix("super::") {
                climbs += 1;
                rest = after;
            }
            if climbs >= path.len() {
                referenced.extend(leading_names(rest));
            }
        }
        for name in referenced {
            if modules.contains(&name) && name != *own {
                graph.get_mut(own).expect("known module").insert(name);
            }
        }
    }
    graph
}

/// A cycle in `graph`, if there is one, as the modules along it.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        marks: &mut BTreeMap<String, Mark>,
        trail: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(node) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let start = trail.iter().position(|n| n == node).expect("on the trail");
                let mut cycle = trail[start..].to_vec();
                cycle.push(node.to_string());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(node.to_string(), Mark::Open);
        trail.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, marks, trail) {
                return Some(cycle);
            }
        }
        trail.pop();
        marks.insert(node.to_string(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut marks, &mut Vec::new()))
}

#[test]
fn the_reader_sees_the_imports_it_must_judge() {
    // Without these, an empty graph would pass every other check here.
    let graph = import_graph();
    for (from, to) in [
        ("proxy", "plan"),
        ("plan", "state"),
        ("state", "inventory"),
        ("explain", "plan"),
    ] {
        assert!(
            graph[from].contains(to),
            "{from} should import {to}; the reader found only {:?}",
            graph[from]
        );
    }
    assert_eq!(
        leading_names("{a::b, c::{d, e}, f}"),
        vec!["a".to_string(), "c".into(), "f".into()]
    );
    assert_eq!(
        leading_names("proxy::ProxyError"),
        vec!["proxy".to_string()]
    );
}

#[test]
fn top_level_modules_import_each_other_without_a_cycle() {
    let graph = import_graph();
    if let Some(cycle) = find_cycle(&graph) {
        panic!("import cycle: {}", cycle.join(" → "));
    }
    let mut with_cycle = graph.clone();
    with_cycle
        .get_mut("inventory")
        .unwrap()
        .insert("proxy".into());
    assert!(
        find_cycle(&with_cycle).is_some(),
        "the cycle finder finds cycles"
    );
}

#[test]
fn each_floor_imports_only_from_below() {
    let graph = import_graph();
    let mut violations = Vec::new();
    for (module, forbidden) in FORBIDDEN {
        let imports = graph
            .get(*module)
            .unwrap_or_else(|| panic!("no module {module}: update FORBIDDEN"));
        for imported in imports {
            if *forbidden == ALL_OF_THE_MESH || forbidden.contains(&imported.as_str()) {
                violations.push(format!("{module} imports {imported}"));
            }
        }
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

/// Functions of `code` longer than `limit` lines, with their lengths.
fn long_functions(code: &str, limit: usize) -> Vec<(String, usize)> {
    let lines: Vec<&str> = code.lines().collect();
    let mut found = Vec::new();
    for (start, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let signature = trimmed
            .trim_start_matches("pub ")
            .trim_start_matches("pub(crate) ")
            .trim_start_matches("pub(super) ")
            .trim_start_matches("const ")
            .trim_start_matches("async ");
        let Some(rest) = signature.strip_prefix("fn ") else {
            continue;
        };
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let indent = line.len() - trimmed.len();
        let Some(open) = (start..lines.len()).find(|&i| {
            let l = lines[i].trim_end();
            l.ends_with('{') || l.ends_with(';')
        }) else {
            continue;
        };
        if lines[open].trim_end().ends_with(';') {
            continue;
        }
        let closing = format!("{}}}", " ".repeat(indent));
        if let Some(end) = (open..lines.len()).find(|&i| lines[i].trim_end() == closing) {
            let length = end - start + 1;
            if length > limit {
                found.push((name, length));
            }
        }
    }
    found
}

#[test]
fn no_proxy_function_is_longer_than_80_lines() {
    let too_long: Vec<String> = production_files()
        .into_iter()
        .filter(|(relative, _)| module_path(relative)[0] == "proxy")
        .flat_map(|(relative, code)| {
            long_functions(&code, MAX_PROXY_FN_LINES)
                .into_iter()
                .map(move |(name, length)| {
                    format!("{}: {name} ({length} lines)", relative.display())
                })
        })
        .collect();
    assert!(too_long.is_empty(), "split these:\n{}", too_long.join("\n"));

    let long: String = std::iter::once("fn long() {".to_string())
        .chain((0..MAX_PROXY_FN_LINES).map(|i| format!("    let _ = {i};")))
        .chain(std::iter::once("}".to_string()))
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(
        long_functions(&long, MAX_PROXY_FN_LINES),
        vec![("long".to_string(), MAX_PROXY_FN_LINES + 2)],
        "the length check sees a long function"
    );
}
