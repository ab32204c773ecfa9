//! The one-shot commands: `infer`, `bench` and `models`.

use crate::flow::unix_ms;
use crate::health::{peak_rss_bytes, percentile};
use crate::model::{Model, ModelError, TensorInfo, BACKEND};
use crate::pipeline::post::{self, Preprocessor};
use crate::pipeline::result::{ms, LatencyMs, ResultFields};
use crate::pipeline::sensor::{self, InputError};
use serde::Serialize;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum OneShotError {
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The input was unusable (exit status 65).
    #[error("bad input: {0}")]
    Input(String),
    #[error("{0}")]
    Other(String),
}

impl From<InputError> for OneShotError {
    fn from(e: InputError) -> Self {
        OneShotError::Input(e.to_string())
    }
}

/// Where `infer` reads its input from.
pub enum InferInput<'a> {
    /// A JSON sensor payload, or raw f32le when the file ends in .f32/.bin/.raw.
    File(&'a Path),
    Json(&'a str),
}

/// Runs one input through a model and returns the result in the MQTT result schema.
pub fn infer(model_path: &Path, input: InferInput) -> Result<serde_json::Value, OneShotError> {
    let model = Arc::new(Model::load(model_path)?);
    let channels = *model.input().shape.last().unwrap_or(&1);
    let samples_needed = model.input().len() / channels.max(1);
    let started = Instant::now();
    let (source, samples) = match input {
        InferInput::Json(text) => (
            "--json".to_owned(),
            sensor::decode_json(text.as_bytes(), channels)?,
        ),
        InferInput::File(path) => {
            let bytes = std::fs::read(path)
                .map_err(|e| OneShotError::Input(format!("{}: {e}", path.display())))?;
            let raw = matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("f32" | "bin" | "raw")
            );
            let decoded = if raw {
                sensor::decode_f32le(&bytes, channels)?
            } else {
                sensor::decode_json(&bytes, channels)?
            };
            (path.display().to_string(), decoded)
        }
    };
    let got = samples.values.len() / channels;
    if got != samples_needed {
        return Err(OneShotError::Input(format!(
            "model {} takes {samples_needed} samples of {channels} channels ({}), the input has {got}",
            model.name,
            model.input()
        )));
    }
    let mut pre = Preprocessor::new(&model, channels).map_err(OneShotError::Other)?;
    let mut session = model.session()?;
    let mut normalised = Vec::new();
    let t0 = Instant::now();
    let tensor = pre.tensor(&samples.values, &mut normalised);
    let t1 = Instant::now();
    let out = session.run(tensor)?;
    let t2 = Instant::now();
    let output = post::postprocess(&model, out, &normalised).map_err(OneShotError::Other)?;
    let t3 = Instant::now();
    let _ = t0;
    Ok(ResultFields {
        pipeline: "infer",
        source: &source,
        model: &model,
        ts: samples.ts.unwrap_or_else(unix_ms),
        seq: 0,
        latency: LatencyMs {
            queue: 0.0,
            pre: ms(t1 - started),
            infer: ms(t2 - t1),
            post: ms(t3 - t2),
        },
        output: &output,
    }
    .value())
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub backend: &'static str,
    pub input: String,
    pub load_ms: f64,
    pub runs: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
    pub peak_rss_bytes: u64,
}

/// Loads a model and times `runs` inferences (after 10 warm-up runs) on a
/// fixed pseudo-random input.
pub fn bench(model_path: &Path, runs: usize) -> Result<BenchReport, OneShotError> {
    let model = Arc::new(Model::load(model_path)?);
    let channels = *model.input().shape.last().unwrap_or(&1);
    let mut pre = Preprocessor::new(&model, channels).map_err(OneShotError::Other)?;
    let mut rng = fastrand::Rng::with_seed(42);
    let raw: Vec<f32> = (0..model.input().len())
        .map(|_| rng.f32() * 2.0 - 1.0)
        .collect();
    let mut session = model.session()?;
    let mut normalised = Vec::new();
    for _ in 0..10 {
        session.run(pre.tensor(&raw, &mut normalised))?;
    }
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let tensor = pre.tensor(&raw, &mut normalised);
        let t = Instant::now();
        session.run(tensor)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    times.sort_by(f64::total_cmp);
    let r = |x: f64| (x * 1e4).round() / 1e4;
    Ok(BenchReport {
        model: model.name.clone(),
        backend: BACKEND,
        input: model.input().to_string(),
        load_ms: r(model.load_ms),
        runs: times.len(),
        p50_ms: r(percentile(&times, 0.5)),
        p90_ms: r(percentile(&times, 0.9)),
        p99_ms: r(percentile(&times, 0.99)),
        mean_ms: r(mean),
        peak_rss_bytes: peak_rss_bytes().unwrap_or(0),
    })
}

#[derive(Debug, Serialize)]
pub struct ModelRow {
    pub name: String,
    pub file: String,
    pub sha256: Option<String>,
    pub backend: &'static str,
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
pub fn describe(paths: &[std::path::PathBuf]) -> Vec<ModelRow> {
    paths
        .iter()
        .map(|path| match Model::load(path) {
            Ok(m) => ModelRow {
                name: m.name.clone(),
                file: m.path.display().to_string(),
                sha256: Some(m.sha256.clone()),
                backend: BACKEND,
                inputs: m.inputs.clone(),
                outputs: m.outputs.clone(),
                kind: format!("{:?}", m.manifest.output.kind).to_lowercase(),
                notes: m.graph.rewrites.clone(),
                error: None,
            },
            Err(e) => ModelRow {
                name: e.model.clone(),
                file: path.display().to_string(),
                sha256: None,
                backend: BACKEND,
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
