//! The shape of the code: the crate's top-level modules import each other one way only,
//! leaf types at the bottom and the proxy at the top, as `src/lib.rs` and README's
//! architecture section describe. A `use crate::x` that goes up a layer fails here, with
//! the file that does it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, bottom first. A module may import modules of lower layers, and of its own
/// layer as long as no cycle forms.
const LAYERS: &[&[&str]] = &[
    &[
        "values",
        "error",
        "http_util",
        "net",
        "pattern",
        "pem",
        "yaml",
    ],
    &["sse"],
    &["metrics", "access_log", "logging"],
    &["upstream"],
    &["middleware"],
    &["routing", "listen"],
    &["state"],
    &["config"],
    &["relay"],
    &["proxy"],
    &["server", "admin", "reload", "diagnose", "demo"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Each top-level module's imports of other top-level modules, with a file that makes each.
fn imports() -> BTreeMap<String, BTreeMap<String, PathBuf>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeMap<String, PathBuf>> = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(&src).expect("under src");
        let first = relative
            .components()
            .next()
            .expect("a component")
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if first == "lib" || first == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("read file");
        // Unit tests may reach anywhere; what ships may not.
        let shipped = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
        let edges = graph.entry(first.clone()).or_default();
        for (at, _) in shipped.match_indices("crate::") {
            let rest = &shipped[at + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            // `crate::build_server` in a doc link is the crate root's re-export.
            if !name.is_empty() && name != first && name != "build_server" {
                edges.entry(name).or_insert_with(|| file.clone());
            }
        }
    }
    graph
}

#[test]
fn every_module_has_a_layer() {
    for module in imports().keys() {
        assert!(
            layer_of(module).is_some(),
            "module `{module}` is not in LAYERS: place it in tests/architecture.rs, src/lib.rs \
             and README's architecture section"
        );
    }
}

#[test]
fn imports_go_down_the_layers() {
    let graph = imports();
    let mut upward = Vec::new();
    for (module, deps) in &graph {
        let Some(own) = layer_of(module) else {
            continue;
        };
        for (dep, file) in deps {
            let theirs = layer_of(dep).unwrap_or(usize::MAX);
            if theirs > own {
                upward.push(format!(
                    "{} imports `{dep}` (a higher layer)",
                    file.display()
                ));
            }
        }
    }
    assert!(upward.is_empty(), "{}", upward.join("\n"));
}

#[test]
fn no_import_cycles() {
    let graph = imports();
    // Depth-first search for a back edge.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeMap<String, PathBuf>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for dep in graph.get(node).into_iter().flat_map(|d| d.keys()) {
            if let Some(cycle) = visit(dep, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for module in graph.keys() {
        if let Some(cycle) = visit(module, &graph, &mut Vec::new(), &mut done) {
            panic!("import cycle: {}", cycle.join(" -> "));
        }
    }
}
