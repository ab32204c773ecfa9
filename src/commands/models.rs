//! `edgeinfer models`: what each model is (name, file, sha256, facts,
//! backend, rewrites), or why it does not load.

use crate::model::{EngineOptions, EngineReport, Model, TensorInfo};
use serde::Serialize;
use std::path::Path;

#[derive(Debug, Serialize)]
pub struct ModelRow {
    pub name: String,
    pub file: String,
    pub sha256: Option<String>,
    /// What it runs on (`tract-cpu`, `onnxruntime-cpu`, …); empty when it does not load.
    pub backend: String,
    /// How that engine was chosen: passed-over engines, `auto`'s figures.
    pub engine: Option<EngineReport>,
    pub inputs: Vec<TensorInfo>,
    pub outputs: Vec<TensorInfo>,
    pub kind: String,
    /// Graph rewrites and relaxed loading applied to make it run correctly.
    pub notes: Vec<String>,
    pub error: Option<String>,
}

impl Serialize for TensorInfo {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("TensorInfo", 3)?;
        st.serialize_field("name", &self.name)?;
        st.serialize_field("dtype", &self.dtype)?;
        st.serialize_field("shape", &self.shape)?;
        st.end()
    }
}

/// Loads each model and describes it (or the reason it does not load).
pub fn describe(paths: &[(std::path::PathBuf, EngineOptions)]) -> Vec<ModelRow> {
    paths
        .iter()
        .map(|(path, options)| match Model::load_with(path, options) {
            Ok(m) => ModelRow {
                name: m.name.clone(),
                file: m.path.display().to_string(),
                sha256: Some(m.sha256.clone()),
                backend: m.runs_on().to_owned(),
                engine: Some(m.placement.clone()),
                inputs: m.inputs.clone(),
                outputs: m.outputs.clone(),
                kind: format!("{:?}", m.manifest.output.kind).to_lowercase(),
                notes: m
                    .warnings
                    .iter()
                    .map(|w| format!("warning: {w}"))
                    .chain(m.graph.rewrites.iter().cloned())
                    .collect(),
                error: None,
            },
            Err(e) => ModelRow {
                name: e.model.clone(),
                file: path.display().to_string(),
                sha256: None,
                backend: String::new(),
                engine: None,
                inputs: vec![],
                outputs: vec![],
                kind: String::new(),
                notes: vec![],
                error: Some(e.kind.to_string()),
            },
        })
        .collect()
}

/// Every `.onnx` file under `dir`, recursively, sorted.
pub fn onnx_files(dir: &Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "onnx") {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The `models --check` table: one line per model.
pub fn check_table(rows: &[ModelRow], base: &Path) -> String {
    let facts = |v: &[TensorInfo]| {
        v.iter()
            .map(|t| t.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = String::from("| model | loads | backend | inputs | outputs | notes / error |\n|---|---|---|---|---|---|\n");
    for r in rows {
        let file = Path::new(&r.file);
        let shown = file.strip_prefix(base).unwrap_or(file).display();
        match &r.error {
            None => out.push_str(&format!(
                "| {shown} | yes | {} | {} | {} | {} |\n",
                r.backend,
                facts(&r.inputs),
                facts(&r.outputs),
                r.notes.join("; ")
            )),
            Some(e) => out.push_str(&format!(
                "| {shown} | no | {} | | | {} |\n",
                r.backend,
                e.replace('|', "/")
            )),
        }
    }
    out
}
