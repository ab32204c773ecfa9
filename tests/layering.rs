//! The module graph has no cycles, and stays that way: pipelines never
//! import the MQTT transport, the transport never imports the pipelines,
//! the model layer imports neither, and config, topic and flow are leaves
//! (config may use topic). A grep over `crate::` paths, as the README's
//! code-layout section draws it.

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
    forbid("config.rs", &all, &[]);
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
