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
    /// Configuration inputs (a sample rate, say) fed one fixed value: they
    /// become constants of the graph, so branches on them fold at load.
    #[serde(default)]
    pub constant: Vec<ConstantSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConstantSpec {
    pub input: String,
    /// A number, or the input's elements in row-major order.
    pub value: ConstantValue,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ConstantValue {
    One(f64),
    Many(Vec<f64>),
}

impl ConstantValue {
    pub fn values(&self) -> Vec<f64> {
        match self {
            ConstantValue::One(v) => vec![*v],
            ConstantValue::Many(v) => v.clone(),
        }
    }
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
    /// Image models: where the colour channel is (default: `nchw` when the
    /// second dimension is 1 or 3, else `nhwc`). Sensor models: where the
    /// channels are (default `samples_channels`); see [`Layout`].
    pub layout: Option<Layout>,
    /// Image models: channel order the model expects (default `rgb`; `gray`
    /// for one channel).
    pub color: Option<ColorOrder>,
    /// Image models: how a frame is fitted to the input (default `stretch`).
    #[serde(default)]
    pub resize: ResizeMode,
}

/// Where the input's channels are. Image models: `nchw` / `nhwc`. Sensor
/// models: `samples_channels` (`[…, samples, channels]`, the default),
/// `channels_samples` (`[…, channels, samples]`, PyTorch 1-D CNNs) or
/// `flat` (`[1, n]`: the window's values in arrival order, `input.channels`
/// names giving the channel count, default 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    Nchw,
    Nhwc,
    SamplesChannels,
    ChannelsSamples,
    Flat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ColorOrder {
    Rgb,
    Bgr,
    Gray,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResizeMode {
    /// Scale each axis to the input size (aspect ratio not kept).
    #[default]
    Stretch,
    /// Keep the aspect ratio, pad with grey (114) to the input size.
    Letterbox,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DetectionFormat {
    /// One output `[1, 4 + classes, anchors]`: cx, cy, w, h in input pixels,
    /// then one score per class (Ultralytics YOLOv8/v11 export).
    Yolov8,
    /// Two outputs: boxes `[1, N, 4]` (x0, y0, x1, y1, normalised 0..1)
    /// and scores `[1, N, classes]` (class 0 = background).
    Ssd,
    /// UltraFace: scores `[1, N, 2]` then boxes `[1, N, 4]` (normalised
    /// corners; class 1 = face).
    Ultraface,
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
    /// Boxes with labels and scores (image models; see `format`).
    Detection,
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
    /// Detection: the output layout.
    pub format: Option<DetectionFormat>,
    /// Detection: candidates below this score are dropped (default 0.5).
    pub score_threshold: Option<f32>,
    /// Detection: overlap (IoU) above which a weaker box of the same class
    /// is suppressed (default 0.45).
    pub iou_threshold: Option<f32>,
    /// Detection: most boxes reported per frame (default 100).
    pub max_detections: Option<usize>,
}

impl Manifest {
    /// The data input among a graph's input `names`: `input.name`, else
    /// the first that is not a `[[state]]` input.
    pub fn data_input_index(&self, names: &[String]) -> Option<usize> {
        match &self.input.name {
            Some(n) => names.iter().position(|x| x == n),
            None => names
                .iter()
                .position(|x| !self.state.iter().any(|s| &s.input == x)),
        }
    }

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
        if self.output.kind == OutputKind::Detection && self.output.format.is_none() {
            p.push(
                "output.format is required for kind = \"detection\" (yolov8, ssd or ultraface)"
                    .into(),
            );
        }
        for (k, v) in [
            ("score_threshold", self.output.score_threshold),
            ("iou_threshold", self.output.iou_threshold),
        ] {
            if v.is_some_and(|v| !(0.0..=1.0).contains(&v)) {
                p.push(format!("output.{k} must be between 0 and 1"));
            }
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
