//! The module map of ARCHITECTURE.md, checked: dependencies between the top-level modules of `src/` point one
//! way. A module that names `crate::other` depends on `other`; a circle of such names fails this test with the
//! whole chain printed, so a change that makes two modules need each other is caught when it is made.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Every `.rs` file under `path` (the file itself when `path` is a file).
fn rust_files(path: &Path) -> Vec<PathBuf> {
    if path.is_file() {
        return vec![path.to_path_buf()];
    }
    let mut files = Vec::new();
    for entry in fs::read_dir(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display())) {
        let entry = entry.unwrap();
        files.extend(rust_files(&entry.path()));
    }
    files.retain(|f| f.extension().is_some_and(|e| e == "rs"));
    files
}

/// The top-level modules named by `crate::…` paths in one source text, comments left out.
fn named_modules(text: &str) -> BTreeSet<String> {
    let code: String = text.lines().map(|line| line.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n");
    let ident = |s: &str| -> String { s.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect() };
    let mut names = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        let Some(group) = rest.strip_prefix('{') else {
            names.insert(ident(rest));
            continue;
        };
        // `use crate::{a::X, b::{Y, Z}, c};`: the first segment of every item at the group's own depth.
        let (mut depth, mut item_start) = (0usize, true);
        for (i, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => break,
                '}' => depth -= 1,
                ',' if depth == 0 => item_start = true,
                c if item_start && !c.is_whitespace() => {
                    names.insert(ident(&group[i..]));
                    item_start = false;
                }
                _ => {}
            }
        }
    }
    names.remove("");
    names
}

/// module -> modules it names.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph = BTreeMap::new();
    for entry in fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        if stem == "lib" || stem == "main" || !(path.is_dir() || path.extension().is_some_and(|e| e == "rs")) {
            continue;
        }
        let mut deps = BTreeSet::new();
        for file in rust_files(&path) {
            deps.extend(named_modules(&fs::read_to_string(&file).unwrap()));
        }
        deps.remove(&stem);
        graph.insert(stem, deps);
    }
    graph
}

/// A circle through `start`, as the chain of module names, if there is one.
fn circle_from(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    fn walk(
        graph: &BTreeMap<String, BTreeSet<String>>,
        start: &str,
        at: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in graph.get(at).into_iter().flatten() {
            if next == start {
                path.push(next.clone());
                return true;
            }
            if graph.contains_key(next) && seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(graph, start, next, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_string()];
    walk(graph, start, start, &mut path, &mut BTreeSet::new()).then_some(path)
}

#[test]
fn module_dependencies_form_no_circle() {
    let graph = module_graph();
    assert!(graph.len() > 10, "found only {} modules under src/: {graph:?}", graph.len());
    let circles: Vec<String> =
        graph.keys().filter_map(|module| circle_from(&graph, module)).map(|chain| chain.join(" -> ")).collect();
    assert!(circles.is_empty(), "modules depend on each other in a circle:\n{}", circles.join("\n"));
}

#[test]
fn the_circle_check_finds_a_circle_when_there_is_one() {
    let mut graph = BTreeMap::new();
    graph.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    graph.insert("b".to_string(), BTreeSet::from(["c".to_string()]));
    graph.insert("c".to_string(), BTreeSet::from(["a".to_string()]));
    graph.insert("d".to_string(), BTreeSet::from(["a".to_string()]));
    assert_eq!(circle_from(&graph, "a").unwrap(), ["a", "b", "c", "a"]);
    assert_eq!(circle_from(&graph, "d"), None);
    assert_eq!(
        named_modules(
            "use crate::{\n    config::Secret,\n    units::{A, b::C},\n};\nlet x = crate::ai::f(); // crate::store"
        ),
        BTreeSet::from(["ai".to_string(), "config".to_string(), "units".to_string()])
    );
}

#[test]
fn every_module_doc_points_inside_the_repository() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for file in rust_files(&src) {
        let text = fs::read_to_string(&file).unwrap();
        assert!(text.starts_with("//!"), "{} has no `//!` line saying why it exists", file.display());
        assert!(!text.contains("../shared"), "{} points outside the repository", file.display());
    }
}
