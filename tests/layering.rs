//! The module graph has no cycles, and stays that way: pipelines never
//! import the MQTT transport, the transport never imports the pipelines,
//! the model layer imports neither, and config, topic and flow are leaves
//! (config may use topic). A grep over `crate::` paths, as the README's
//! code-layout section draws it; and, over `crate::`, `super::` and
//! `self::` paths of every file, no two sibling modules anywhere may name
//! each other through any chain (`the_module_graph_has_no_cycles`: it
//! found daemon <-> ops, the kernels <-> model/backend/tract.rs, fold <->
//! graph <-> lower, and the camera worker <-> spec/pre/post before they
//! were untangled).

use std::path::{Path, PathBuf};

fn sources(under: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src")
        .join(under);
    if root.is_file() {
        return vec![root];
    }
    let mut out = Vec::new();
    let mut dirs = vec![root];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    assert!(!out.is_empty(), "no sources under src/{under}");
    out
}

/// The `crate::NAME` modules a file refers to.
fn uses(file: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(file).unwrap();
    let mut found: Vec<String> = text
        .match_indices("crate::")
        .map(|(i, _)| {
            text[i + 7..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .filter(|m: &String| !m.is_empty())
        .collect();
    found.sort();
    found.dedup();
    found
}

fn forbid(under: &str, modules: &[&str], also: &[&str]) {
    for file in sources(under) {
        let text = std::fs::read_to_string(&file).unwrap();
        for m in uses(&file) {
            assert!(
                !modules.contains(&m.as_str()),
                "{} uses crate::{m}: the module graph forbids it (see the README's code layout)",
                file.display()
            );
        }
        for word in also {
            assert!(
                !text.contains(word),
                "{} mentions {word}: the module graph forbids it",
                file.display()
            );
        }
    }
}

#[test]
fn pipelines_know_nothing_of_the_transport() {
    forbid("pipeline", &["mqtt", "demo", "commands"], &["rumqttc"]);
}

#[test]
fn the_transport_knows_nothing_of_the_pipelines() {
    forbid("mqtt", &["pipeline", "model", "demo", "commands"], &[]);
}

#[test]
fn the_model_layer_imports_neither() {
    forbid(
        "model",
        &["mqtt", "pipeline", "health", "config", "flow"],
        &["rumqttc"],
    );
}

#[test]
fn config_topic_and_flow_are_leaves() {
    let all = [
        "mqtt", "pipeline", "model", "health", "flow", "demo", "commands", "bundled",
    ];
    forbid("config", &all, &[]);
    forbid("topic.rs", &[&all[..], &["config"]].concat(), &[]);
    forbid(
        "flow.rs",
        &[&all[..], &["config", "topic"]].concat(),
        &["rumqttc"],
    );
    forbid("health.rs", &["mqtt", "pipeline", "demo", "commands"], &[]);
}

#[test]
fn the_check_can_fail() {
    // The grep finds what it looks for: this very file names crate::mqtt.
    let me = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/layering.rs"));
    assert!(uses(me).contains(&"mqtt".to_string()));
}

/// A module's path (`["model", "backend", "tract"]`) for a file under src/
/// (`lib.rs` is the root; `main.rs`, the binary, is not part of the graph).
fn module_of(file: &Path) -> Option<Vec<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let rel = file.strip_prefix(&src).ok()?;
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_owned())
        .collect();
    match parts.last().map(String::as_str) {
        Some("main") if parts.len() == 1 => return None,
        Some("lib") if parts.len() == 1 => parts.clear(),
        Some("mod") => {
            parts.pop();
        }
        _ => {}
    }
    Some(parts)
}

/// Every path a file names through `crate::`, `super::` or `self::`, `use`
/// groups expanded, as absolute module paths (comment lines skipped: a doc
/// link is not a dependency).
fn references(text: &str, module: &[String]) -> Vec<Vec<String>> {
    /// Parses `a::b::{c, d::e}` at the start of `s` onto `base`; returns
    /// the bytes read.
    fn group(s: &str, base: Vec<String>, out: &mut Vec<Vec<String>>) -> usize {
        let b = s.as_bytes();
        let mut path = base;
        let mut i = 0;
        loop {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            if i > start {
                path.push(s[start..i].to_owned());
            }
            let opens = if i == 0 && s.starts_with('{') {
                Some(1)
            } else if s[i..].starts_with("::{") {
                Some(3)
            } else {
                None
            };
            if let Some(skip) = opens {
                i += skip;
                loop {
                    while i < b.len() && (b[i].is_ascii_whitespace() || b[i] == b',') {
                        i += 1;
                    }
                    if i >= b.len() || b[i] == b'}' {
                        return i + 1;
                    }
                    let n = group(&s[i..], path.clone(), out);
                    i += n.max(1);
                }
            } else if s[i..].starts_with("::") {
                i += 2;
            } else {
                out.push(path);
                return i;
            }
        }
    }
    let code: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .map(|l| format!("{l}\n"))
        .collect();
    let boundary =
        |i: usize| !code[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == ':');
    let mut out = Vec::new();
    for (i, _) in code.match_indices("crate::") {
        if boundary(i) {
            group(&code[i + 7..], vec![], &mut out);
        }
    }
    for (i, _) in code.match_indices("self::") {
        if boundary(i) {
            group(&code[i + 6..], module.to_vec(), &mut out);
        }
    }
    for (i, _) in code.match_indices("super::") {
        if !boundary(i) {
            continue;
        }
        // `super` is the module's parent, whether it is a file or a folder.
        let mut base = module[..module.len().saturating_sub(1)].to_vec();
        let mut rest = &code[i + 7..];
        while let Some(r) = rest.strip_prefix("super::") {
            base.pop();
            rest = r;
        }
        group(rest, base, &mut out);
    }
    out
}

/// The module graph between siblings: a file's reference to another
/// module is an edge between the two children of their closest common
/// ancestor that hold them — a module using its own parent's items, or a
/// parent its children, is no edge (that is how a folder module is built).
fn sibling_edges() -> std::collections::BTreeSet<(Vec<String>, Vec<String>)> {
    let files = sources(".");
    let modules: std::collections::BTreeSet<Vec<String>> =
        files.iter().filter_map(|f| module_of(f)).collect();
    let mut edges = std::collections::BTreeSet::new();
    for file in &files {
        let Some(from) = module_of(file) else {
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        // Tests are not part of the graph.
        let text = text.split("#[cfg(test)]").next().unwrap_or("");
        for path in references(text, &from) {
            // The deepest module the path names.
            let Some(to) = (0..=path.len())
                .rev()
                .map(|n| path[..n].to_vec())
                .find(|p| modules.contains(p))
            else {
                continue;
            };
            let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
            if from.len() > common && to.len() > common {
                edges.insert((from[..=common].to_vec(), to[..=common].to_vec()));
            }
        }
    }
    edges
}

/// The cycles of a directed graph (its strongly connected components of
/// more than one node).
fn cycles(edges: &std::collections::BTreeSet<(Vec<String>, Vec<String>)>) -> Vec<Vec<String>> {
    use std::collections::{BTreeMap, BTreeSet};
    let mut next: BTreeMap<&Vec<String>, Vec<&Vec<String>>> = BTreeMap::new();
    for (a, b) in edges {
        next.entry(a).or_default().push(b);
        next.entry(b).or_default();
    }
    let reach = |start: &Vec<String>| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![start];
        while let Some(n) = stack.pop() {
            for m in &next[n] {
                if seen.insert(*m) {
                    stack.push(m);
                }
            }
        }
        seen
    };
    let reached: BTreeMap<&Vec<String>, BTreeSet<&Vec<String>>> =
        next.keys().map(|n| (*n, reach(n))).collect();
    let mut out: BTreeSet<Vec<String>> = BTreeSet::new();
    for (n, r) in &reached {
        let mut scc: Vec<String> = r
            .iter()
            .filter(|m| reached[**m].contains(n))
            .map(|m| m.join("::"))
            .collect();
        if scc.len() > 1 {
            scc.sort();
            out.insert(scc);
        }
    }
    out.into_iter().collect()
}

#[test]
fn the_module_graph_has_no_cycles() {
    let edges = sibling_edges();
    let found = cycles(&edges);
    let inside = |c: &Vec<String>| {
        edges
            .iter()
            .filter(|(a, b)| c.contains(&a.join("::")) && c.contains(&b.join("::")))
            .map(|(a, b)| format!("{} -> {}", a.join("::"), b.join("::")))
            .collect::<Vec<_>>()
            .join(", ")
    };
    assert!(
        found.is_empty(),
        "import circles between modules (each line one circle, then its edges):\n{}",
        found
            .iter()
            .map(|c| format!("  {}\n    {}", c.join(" <-> "), inside(c)))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn the_cycle_check_can_fail() {
    // Two modules naming each other are a circle; one naming the other is not.
    let v = |s: &str| s.split("::").map(String::from).collect::<Vec<_>>();
    let mut edges = std::collections::BTreeSet::new();
    edges.insert((v("daemon"), v("ops")));
    assert!(cycles(&edges).is_empty());
    edges.insert((v("ops"), v("daemon")));
    assert_eq!(
        cycles(&edges),
        vec![vec!["daemon".to_string(), "ops".to_string()]]
    );
    // And the grep sees through `use` groups and `super::`.
    let refs = references(
        "use super::{tract::substitute_each, ConvFacts};\nuse crate::model::{fold, graph::names};\n",
        &v("model::backend::depthwise"),
    );
    assert!(
        refs.contains(&v("model::backend::tract::substitute_each")),
        "{refs:?}"
    );
    assert!(refs.contains(&v("model::graph::names")), "{refs:?}");
}
