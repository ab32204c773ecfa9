//! Model manifests: `NAME.toml` beside `NAME.onnx`, saying how to feed the
//! model and how to read its output.

use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Default: the file stem.
    pub name: Option<String>,
    /// The ONNX file, relative to the manifest. Default: `NAME.onnx`.
    pub file: Option<PathBuf>,
    /// When given, loading fails unless the file's SHA-256 matches.
    pub sha256: Option<String>,
    pub description: Option<String>,
    #[serde(default)]
    pub input: InputSpec,
    #[serde(default)]
    pub preprocess: Preprocess,
    #[serde(default)]
    pub output: OutputSpec,
    /// Recurrent state of streaming models: each output named here is fed
    /// back, on the next call for the same source, into the named input.
    #[serde(default)]
    pub state: Vec<StateSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateSpec {
    pub input: String,
    pub output: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// The input fed with data. Default: the graph's only input that is not
    /// a `[[state]]` input.
    pub name: Option<String>,
    /// Concrete shape; fixes symbolic dimensions (default: each symbol becomes 1).
    pub shape: Option<Vec<usize>>,
    /// Names of the channels of one sample, for documentation and `models`.
    pub channels: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preprocess {
    /// Multiplies every raw value first (e.g. mg → g).
    pub scale: Option<f32>,
    /// Per channel (or one value for all): `(x * scale - mean) / std`.
    pub mean: Option<Vec<f32>>,
    pub std: Option<Vec<f32>>,
    /// For int8/uint8 inputs: `q = round(x / quant_scale) + zero_point`, saturated.
    pub quant_scale: Option<f32>,
    pub zero_point: Option<i32>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputKind {
    /// Scores per class: top-k with labels.
    Classification,
    /// One score compared with a threshold.
    Anomaly,
    /// The output tensor as it is (flattened).
    #[default]
    Raw,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnomalyScore {
    /// The model's first output value is the score.
    #[default]
    Output,
    /// The model reconstructs its (preprocessed) input; the score is the mean squared error.
    ReconstructionMse,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    #[serde(default)]
    pub kind: OutputKind,
    /// Default: the graph's first output that is not a `[[state]]` output.
    pub name: Option<String>,
    #[serde(default)]
    pub labels: Vec<String>,
    /// Apply softmax to the scores (the model outputs logits).
    #[serde(default)]
    pub softmax: bool,
    pub top_k: Option<usize>,
    #[serde(default)]
    pub score: AnomalyScore,
    pub threshold: Option<f32>,
    /// For int8/uint8 outputs: `x = (q - zero_point) * quant_scale`.
    pub quant_scale: Option<f32>,
    pub zero_point: Option<i32>,
}

impl Manifest {
    pub fn load(path: &Path) -> Result<Manifest, String> {
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        toml::from_str(&text).map_err(|e| e.to_string().trim_end().to_owned())
    }

    /// Checks the manifest on its own; shape-dependent checks happen at load.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if let (Some(m), Some(s)) = (&self.preprocess.mean, &self.preprocess.std) {
            if m.len() != s.len() {
                p.push(format!(
                    "preprocess.mean has {} values but preprocess.std has {}",
                    m.len(),
                    s.len()
                ));
            }
        }
        if let Some(std) = &self.preprocess.std {
            if std.iter().any(|s| !s.is_finite() || *s == 0.0) {
                p.push("preprocess.std values must be finite and non-zero".into());
            }
        }
        if self
            .preprocess
            .quant_scale
            .is_some_and(|s| !(s.is_finite() && s > 0.0))
        {
            p.push("preprocess.quant_scale must be a positive number".into());
        }
        if self.output.kind == OutputKind::Anomaly && self.output.threshold.is_none() {
            p.push("output.threshold is required for kind = \"anomaly\"".into());
        }
        if self.output.top_k == Some(0) {
            p.push("output.top_k must be at least 1".into());
        }
        if let Some(h) = &self.sha256 {
            if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                p.push(format!("sha256 {h:?} is not 64 hex digits"));
            }
        }
        p
    }
}
