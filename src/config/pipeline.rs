//! `[[pipeline]]`: what a pipeline takes, runs and publishes, and its
//! checks (names, payload for the kind, filters and template, sizes, the
//! model file, Home Assistant ids).

use super::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PipelineKind {
    Sensor,
    Camera,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PayloadFormat {
    /// `{"ts":…, "values":[…]}` or `{"ts":…, "samples":[[…],…]}`
    Json,
    /// Raw little-endian f32, whole samples.
    F32le,
    /// Camera: the payload is a JPEG or PNG file.
    Image,
    /// Camera: raw 8-bit RGB, `width` x `height` (from the pipeline config).
    Rgb8,
    /// Camera: raw 8-bit grey, `width` x `height`.
    Gray8,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// Samples per inference. Default: taken from the model's input shape.
    pub size: Option<usize>,
    /// Samples between inferences. Default: `size` (no overlap).
    pub stride: Option<usize>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    pub name: String,
    pub kind: PipelineKind,
    pub topics: Vec<String>,
    /// Manifest (`*.toml`) or bare `.onnx`, relative to the config file.
    pub model: PathBuf,
    /// Default: `json` for sensors, `image` for cameras (see [`Pipeline::payload`]).
    pub payload: Option<PayloadFormat>,
    pub window: Option<Window>,
    /// Result topic template: `{device}`, `{pipeline}`, and `{1}`, `{2}`… for
    /// the topic levels matched by the filter's wildcards.
    pub results: Option<String>,
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// Messages waiting for this pipeline's workers; more are dropped and counted.
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// Inference threads; sources are spread over them by topic.
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// Camera, raw frames: size of every frame.
    pub width: Option<u32>,
    pub height: Option<u32>,
    /// Camera: publish each frame with its detections drawn on it (JPEG,
    /// QoS 0, not spooled) to this topic template.
    pub snapshot: Option<String>,
    /// Camera detection overrides of the manifest's settings.
    pub score_threshold: Option<f32>,
    pub iou_threshold: Option<f32>,
    pub max_detections: Option<usize>,
    /// Only report these labels.
    pub classes: Option<Vec<String>>,
    /// Overrides of `[engine]` for this pipeline's model.
    pub backend: Option<Backend>,
    pub providers: Option<Vec<String>>,
    pub fallback: Option<bool>,
    pub strict: Option<bool>,
    pub threads: Option<usize>,
}

impl Pipeline {
    pub fn payload(&self) -> PayloadFormat {
        self.payload.unwrap_or(match self.kind {
            PipelineKind::Sensor => PayloadFormat::Json,
            PipelineKind::Camera => PayloadFormat::Image,
        })
    }

    pub fn results_template(&self) -> String {
        self.results
            .clone()
            .unwrap_or_else(|| format!("{{prefix}}/results/{}", self.name))
    }
}

const fn default_qos() -> u8 {
    1
}

const fn default_queue() -> usize {
    4096
}

const fn default_workers() -> usize {
    1
}

impl Config {
    /// One `[[pipeline]]`: names unique, payload fits the kind, filters and
    /// template, sizes, the model file.
    pub(super) fn check_pipeline<'a>(
        &self,
        i: usize,
        p: &'a Pipeline,
        names: &mut std::collections::HashSet<&'a str>,
        out: &mut Problems,
    ) {
        let key = |k: &str| format!("pipeline[{i}].{k}");
        if let Err(e) = check_name(&p.name) {
            out.bad(&key("name"), e);
        } else if !names.insert(p.name.as_str()) {
            out.bad(
                &key("name"),
                format!("{:?} is used by another pipeline", p.name),
            );
        }
        let payload = p.payload();
        let image_payload = matches!(
            payload,
            PayloadFormat::Image | PayloadFormat::Rgb8 | PayloadFormat::Gray8
        );
        match p.kind {
            PipelineKind::Camera if !image_payload => out.bad(
                &key("payload"),
                "a camera pipeline takes \"image\" (JPEG/PNG), \"rgb8\" or \"gray8\"".into(),
            ),
            PipelineKind::Sensor if image_payload => out.bad(
                &key("payload"),
                "a sensor pipeline takes \"json\" or \"f32le\"; frames need kind = \"camera\""
                    .into(),
            ),
            _ => {}
        }
        if matches!(payload, PayloadFormat::Rgb8 | PayloadFormat::Gray8)
            && (p.width.unwrap_or(0) == 0 || p.height.unwrap_or(0) == 0)
        {
            out.bad(&key("width"), "raw frames need width and height".into());
        }
        if p.kind == PipelineKind::Camera
            && self.broker.max_packet_bytes < self.limits.max_image_bytes.min(1 << 28)
            && payload == PayloadFormat::Image
        {
            out.bad(
                "broker.max_packet_bytes",
                format!(
                    "{} is below limits.max_image_bytes ({}): frames that size would be refused by the MQTT client",
                    self.broker.max_packet_bytes, self.limits.max_image_bytes
                ),
            );
        }
        if p.kind == PipelineKind::Sensor {
            let camera_only = [
                ("snapshot", p.snapshot.is_some()),
                ("classes", p.classes.is_some()),
                ("width", p.width.is_some()),
                ("height", p.height.is_some()),
            ];
            for (k, _) in camera_only.iter().filter(|(_, set)| *set) {
                out.bad(
                    &key(k),
                    "a camera setting, not for kind = \"sensor\"".into(),
                );
            }
        }
        if p.topics.is_empty() {
            out.bad(
                &key("topics"),
                "needs at least one MQTT topic filter".into(),
            );
        }
        let mut wildcards = usize::MAX;
        for (j, t) in p.topics.iter().enumerate() {
            match crate::topic::TopicFilter::parse(t) {
                Ok(f) => wildcards = wildcards.min(f.wildcards()),
                Err(e) => out.bad(&format!("pipeline[{i}].topics[{j}]"), e),
            }
        }
        if wildcards == usize::MAX {
            wildcards = 0;
        }
        if let Err(e) = crate::topic::check_template(&p.results_template(), wildcards) {
            out.bad(&key("results"), e);
        }
        if p.qos > 2 {
            out.bad(
                &key("qos"),
                format!("{} is not an MQTT QoS (0, 1 or 2)", p.qos),
            );
        }
        if p.queue == 0 {
            out.bad(&key("queue"), "must be at least 1".into());
        }
        if p.workers == 0 || p.workers > 64 {
            out.bad(&key("workers"), "must be between 1 and 64".into());
        }
        if let Some(w) = p.window {
            if w.size == Some(0) {
                out.bad(&key("window.size"), "must be at least 1".into());
            }
            if w.stride == Some(0) {
                out.bad(&key("window.stride"), "must be at least 1".into());
            }
        }
        let path = self.model_path(p);
        if !path.is_file() {
            out.bad(&key("model"), format!("{}: no such file", path.display()));
        }
    }

    /// Home Assistant's ids allow `[a-zA-Z0-9_-]`: two pipelines whose
    /// names differ only elsewhere (`a b`, `a_b`) would share entities.
    pub(super) fn check_discovery_ids(&self, out: &mut Problems) {
        if !self.home_assistant.enabled {
            return;
        }
        let mut ids: std::collections::HashMap<String, &str> = Default::default();
        for (i, p) in self.pipelines.iter().enumerate() {
            let id = crate::topic::discovery_id(&p.name);
            match ids.get(&id) {
                Some(other) if *other != p.name => out.bad(
                    &format!("pipeline[{i}].name"),
                    format!(
                        "{:?} and {other:?} have the same Home Assistant id {id:?} (only A-Z a-z 0-9 _ - are kept); rename one",
                        p.name
                    ),
                ),
                _ => {
                    ids.insert(id, &p.name);
                }
            }
        }
    }
}
