//! Compatibility suite: every public model in `$EDGEINFER_MODEL_ZOO` (default:
//! ../shared/models beside the checkout) against the onnxruntime outputs stored in
//! tests/zoo/onnxruntime.json (made by tests/zoo/make_reference.py).
//! Without the variable the suite says it was skipped.

mod common;

use edgeinfer::model::Model;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use tract_onnx::prelude::Tensor;

#[derive(Deserialize)]
struct Reference {
    models: BTreeMap<String, Entry>,
}

#[derive(Deserialize)]
struct Entry {
    sha256: String,
    inputs: Vec<InputSpec>,
    outputs: Vec<OutputRef>,
}

#[derive(Deserialize)]
struct InputSpec {
    dtype: String,
    shape: Vec<usize>,
}

#[derive(Deserialize)]
struct OutputRef {
    name: String,
    dtype: String,
    values: Vec<f32>,
}

/// The input generator of make_reference.py, bit for bit.
fn lcg_input(spec: &InputSpec) -> Tensor {
    let n: usize = spec.shape.iter().product();
    let mut state: u32 = 12345;
    let bytes: Vec<i32> = (0..n)
        .map(|_| {
            state = state.wrapping_mul(1664525).wrapping_add(1013904223);
            (state >> 24) as i32
        })
        .collect();
    match spec.dtype.as_str() {
        "i8" => Tensor::from_shape(
            &spec.shape,
            &bytes.iter().map(|v| (v - 128) as i8).collect::<Vec<_>>(),
        ),
        "u8" => Tensor::from_shape(
            &spec.shape,
            &bytes.iter().map(|v| *v as u8).collect::<Vec<_>>(),
        ),
        _ => Tensor::from_shape(
            &spec.shape,
            &bytes
                .iter()
                .map(|v| (v - 128) as f32 / 64.0)
                .collect::<Vec<_>>(),
        ),
    }
    .unwrap()
}

fn argmax(v: &[f32]) -> usize {
    (0..v.len())
        .max_by(|a, b| v[*a].total_cmp(&v[*b]))
        .unwrap_or(0)
}

#[test]
fn public_models_load_and_match_onnxruntime() {
    let Some(zoo) = common::model_zoo() else {
        return;
    };
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/zoo/onnxruntime.json"
    ))
    .unwrap();
    let reference: Reference = serde_json::from_str(&text).unwrap();
    let mut failures = Vec::new();
    println!(
        "zoo: {} ({} reference models)",
        zoo.display(),
        reference.models.len()
    );
    println!("| model | loads | top-1 = onnxruntime | max abs diff | allowed | graph rewrites |");
    println!("|---|---|---|---|---|---|");
    for (rel, entry) in &reference.models {
        let path = zoo.join(rel);
        let Ok(bytes) = std::fs::read(&path) else {
            println!("| {rel} | absent | | | | |");
            continue;
        };
        let sha = edgeinfer::model::hex(&<sha2::Sha256 as sha2::Digest>::digest(&bytes));
        if sha != entry.sha256 {
            println!("| {rel} | another file (sha256 {sha}) | | | | |");
            continue;
        }
        let model = match Model::load(&path) {
            Ok(m) => Arc::new(m),
            Err(e) => {
                println!("| {rel} | no: {e} | | | | |");
                failures.push(format!("{rel}: {e}"));
                continue;
            }
        };
        let outputs = match model
            .session()
            .and_then(|mut s| s.run_all(lcg_input(&entry.inputs[0])))
        {
            Ok(o) => o,
            Err(e) => {
                println!("| {rel} | yes, but fails to run: {e} | | | | |");
                failures.push(format!("{rel}: {e}"));
                continue;
            }
        };
        let mut worst = 0.0f32;
        let mut allowed_worst = 0.0f32;
        let mut same_top = true;
        for (i, (got, want)) in outputs.iter().zip(&entry.outputs).enumerate() {
            // Integer references are raw; dequantize them like edgeinfer does.
            let (scale, zp) = match (want.dtype.as_str(), model.output_quant[i]) {
                ("int8" | "uint8", Some(q)) => (q.scale, q.zero_point as f32),
                _ => (1.0, 0.0),
            };
            let want: Vec<f32> = want.values.iter().map(|v| (v - zp) * scale).collect();
            assert_eq!(
                got.len(),
                want.len(),
                "{rel}: output {} length",
                entry.outputs[i].name
            );
            let diff = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            let peak = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            // One quantization step for int8 outputs; f32 kernels may sum in
            // another order, so 1e-4 of the output's range (at least 1e-4).
            let allowed = if scale != 1.0 {
                scale * 1.0001
            } else {
                1e-4 * peak.max(1.0)
            };
            if diff > allowed {
                failures.push(format!(
                    "{rel}: output {} differs by {diff} (allowed {allowed})",
                    entry.outputs[i].name
                ));
            }
            worst = worst.max(diff);
            allowed_worst = allowed_worst.max(allowed);
            if i == 0 && argmax(got) != argmax(&want) {
                same_top = false;
                failures.push(format!("{rel}: top-1 differs"));
            }
        }
        println!(
            "| {rel} | yes | {} | {worst:.3e} | {allowed_worst:.1e} | {} |",
            if same_top { "yes" } else { "NO" },
            if model.graph.rewrites.is_empty() {
                "none".to_string()
            } else {
                model.graph.rewrites.join("; ")
            }
        );
    }
    assert!(
        failures.is_empty(),
        "compatibility failures:\n{}",
        failures.join("\n")
    );
}

/// Documents the upstream bug the Softmax rewrite works around: loaded
/// straight through tract 0.23.9, a quantized Softmax tail saturates to 127
/// on every output. When this test fails, tract is fixed and the rewrite in
/// src/model/onnx.rs can go.
#[test]
fn tract_alone_saturates_a_quantized_softmax_tail() {
    let Some(zoo) = common::model_zoo() else {
        return;
    };
    use tract_onnx::prelude::*;
    let path = zoo.join("mlperf-tiny/kws_ref_model.onnx");
    if !path.exists() {
        println!("zoo: {} is absent; skipped", path.display());
        return;
    }
    let mut model = tract_onnx::onnx().model_for_path(&path).unwrap();
    model
        .set_input_fact(0, i8::fact([1, 49, 10, 1]).into())
        .unwrap();
    let plan = model.into_optimized().unwrap().into_runnable().unwrap();
    let spec = InputSpec {
        dtype: "i8".into(),
        shape: vec![1, 49, 10, 1],
    };
    let out = plan.run(tvec!(lcg_input(&spec).into_tvalue())).unwrap();
    let raw = out[0].cast_to_dt(i8::datum_type()).unwrap().into_owned();
    let values = raw
        .try_as_plain_ram()
        .unwrap()
        .as_slice::<i8>()
        .unwrap()
        .to_vec();
    println!("tract alone on kws_ref_model: {values:?}");
    assert!(
        values.iter().all(|v| *v == 127),
        "tract no longer saturates: {values:?}"
    );
}

#[derive(Deserialize)]
struct PypiIndex {
    models: Vec<PypiModel>,
}

#[derive(Deserialize)]
struct PypiModel {
    package: String,
    model: std::path::PathBuf,
    manifest: std::path::PathBuf,
    /// How an answer is read: `threshold` (probability > 0.5), `mask`
    /// (each element > 0.3, a text map) or `argmax`.
    decision: String,
    input: std::path::PathBuf,
    shape: Vec<usize>,
    steps: usize,
    outputs: Vec<Vec<f32>>,
    #[serde(default)]
    speaking: Vec<bool>,
    #[serde(default)]
    characters: Vec<String>,
    #[serde(default)]
    text: Option<String>,
    /// Detectors (`decision = "top"`): the output's shape, whether the
    /// channels come first or last, where the class scores start and the
    /// objectness channel, if any.
    #[serde(default)]
    output_shape: Vec<usize>,
    #[serde(default)]
    layout: String,
    #[serde(default)]
    score_from: usize,
    #[serde(default)]
    objectness: Option<usize>,
    /// Quantized here from a float export: compared within quantization
    /// steps, not float rounding.
    #[serde(default)]
    quantized: bool,
}

impl PypiModel {
    /// A detector's best anchor: the highest class score (times the
    /// objectness, where there is one) over all anchors.
    fn best_anchor(&self, v: &[f32]) -> usize {
        let first = self.layout == "channels_first";
        let (c, n) = match self.output_shape[..] {
            [_, a, b] if first => (a, b),
            [_, a, b] => (b, a),
            _ => (v.len(), 1),
        };
        let at = |ch: usize, a: usize| if first { v[ch * n + a] } else { v[a * c + ch] };
        let score = |a: usize| {
            let best = (self.score_from..c)
                .map(|ch| at(ch, a))
                .fold(f32::MIN, f32::max);
            best * self.objectness.map_or(1.0, |o| at(o, a))
        };
        (0..n)
            .max_by(|a, b| score(*a).total_cmp(&score(*b)))
            .unwrap_or(0)
    }
}

/// tests/zoo/pypi.py's cache (${EDGEINFER_PYPI_ZOO:-~/.cache/edgeinfer/zoo-pypi}),
/// made by tests/install-deps.sh; its absence fails under CI.
fn pypi_zoo() -> Option<PypiIndex> {
    let root = std::env::var_os("EDGEINFER_PYPI_ZOO")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/edgeinfer/zoo-pypi")
        });
    match std::fs::read_to_string(root.join("index.json")) {
        Ok(text) => Some(serde_json::from_str(&text).unwrap()),
        Err(e) if std::env::var_os("CI").is_some() => panic!(
            "{}: {e}, and CI is set: tests/install-deps.sh runs tests/zoo/pypi.py",
            root.display()
        ),
        Err(_) => {
            println!(
                "pypi zoo: {} has no index.json (run tests/zoo/pypi.py); skipped",
                root.display()
            );
            None
        }
    }
}

/// Greedy CTC over [columns, classes]: the best class per column, repeats
/// merged, blank (0) dropped.
fn ctc_text(probs: &[f32], characters: &[String]) -> String {
    let mut out = String::new();
    let mut last = 0;
    for column in probs.chunks_exact(characters.len().max(1)) {
        let k = argmax(column);
        if k != last && k != 0 {
            out.push_str(characters.get(k).map_or("?", String::as_str));
        }
        last = k;
    }
    out
}

/// Issue #14: real public models shipped inside PyPI wheels (silero-vad,
/// faster-whisper's VAD, rapidocr's PaddleOCR models) on tract alone, on
/// real inputs (espeak-ng speech window by window with the state carried;
/// rendered text), against onnxruntime's outputs on the same inputs.
#[test]
fn pypi_models_load_on_tract_and_match_onnxruntime_on_real_inputs() {
    let Some(index) = pypi_zoo() else {
        return;
    };
    let options = edgeinfer::model::backend::EngineOptions {
        backend: edgeinfer::model::backend::BackendChoice::Tract,
        ..Default::default()
    };
    let mut failures = Vec::new();
    println!(
        "| package | model | loads on tract | steps | max abs diff | agrees on | graph rewrites |"
    );
    println!("|---|---|---|---|---|---|---|");
    for entry in &index.models {
        let file = entry
            .model
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let model = match Model::load_with(&entry.manifest, &options) {
            Ok(m) => Arc::new(m),
            Err(e) => {
                println!("| {} | {file} | no: {e} | | | | |", entry.package);
                failures.push(format!("{file}: {e}"));
                continue;
            }
        };
        let bytes = std::fs::read(&entry.input).unwrap();
        let values: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let per_step: usize = entry.shape.iter().product();
        assert_eq!(values.len(), per_step * entry.steps, "{file}: input size");
        let mut session = model.session().unwrap();
        let mut state = model.initial_state.clone();
        let (mut worst, mut same) = (0.0f32, 0usize);
        let mut text = None;
        for (step, want) in entry.outputs.iter().enumerate() {
            let chunk = &values[step * per_step..(step + 1) * per_step];
            let input = Tensor::from_shape(&entry.shape, chunk).unwrap();
            let got = match session.run_with_state(input, &mut state) {
                Ok(v) => v,
                Err(e) => {
                    failures.push(format!("{file}: step {step}: {e}"));
                    break;
                }
            };
            assert_eq!(got.len(), want.len(), "{file}: output length");
            worst = worst.max(
                got.iter()
                    .zip(want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max),
            );
            same += usize::from(match entry.decision.as_str() {
                // Voice activity: the same decision (> 0.5) as onnxruntime.
                "threshold" => (got[0] > 0.5) == (want[0] > 0.5),
                // A text map: the same pixels above DBNet's 0.3.
                "mask" => got.iter().zip(want).all(|(a, b)| (*a > 0.3) == (*b > 0.3)),
                // A detector: the same best anchor.
                "top" => entry.best_anchor(&got) == entry.best_anchor(want),
                _ => argmax(&got) == argmax(want),
            });
            if !entry.characters.is_empty() {
                text = Some(ctc_text(&got, &entry.characters));
            }
        }
        // Probabilities and maps in 0..1: float summation order only. A
        // detector's boxes are in pixels or grid units: relative to its
        // largest value. A model quantized here: within 10 % of it, as
        // onnxruntime fuses QDQ pairs into integer kernels that round
        // differently from the definitions tract follows (measured: 6 % on
        // the QDQ YOLOv8n's boxes, 16 output steps); its best anchor must
        // still be onnxruntime's.
        let scale = if entry.decision == "top" {
            entry.outputs[0].iter().fold(1.0f32, |m, v| m.max(v.abs()))
        } else {
            1.0
        };
        let allowed = if entry.quantized { 0.1 } else { 1e-3 } * scale;
        if worst > allowed {
            failures.push(format!("{file}: differs from onnxruntime by {worst}"));
        }
        if same != entry.steps {
            failures.push(format!(
                "{file}: {same}/{} decisions as onnxruntime's",
                entry.steps
            ));
        }
        if let (Some(ours), Some(theirs)) = (&text, &entry.text) {
            if ours != theirs {
                failures.push(format!("{file}: reads {ours:?}, onnxruntime {theirs:?}"));
            }
        }
        if !entry.speaking.is_empty() {
            // The input is real speech between silences: the reference
            // itself must tell them apart, or the check above means little.
            let speech: Vec<f32> = entry
                .outputs
                .iter()
                .zip(&entry.speaking)
                .filter(|(_, s)| **s)
                .map(|(o, _)| o[0])
                .collect();
            let mean = speech.iter().sum::<f32>() / speech.len().max(1) as f32;
            assert!(
                mean > 0.5,
                "{file}: onnxruntime's mean speech probability {mean}"
            );
        }
        println!(
            "| {} | {file} | yes | {} | {worst:.2e} | {same}/{}{} | {} |",
            entry.package,
            entry.steps,
            entry.steps,
            text.map(|t| format!(" (reads {t:?})")).unwrap_or_default(),
            model.graph.rewrites.len()
        );
    }
    assert!(
        failures.is_empty(),
        "PyPI zoo failures:\n{}",
        failures.join("\n")
    );
}
