//! What a pipeline is, fixed at start: built from its configuration and
//! checked against its loaded model.

use super::frame::{self, DetectionSpec, FrameFormat, ImageInput};
use super::pre::{Preprocessor, SensorLayout};
use crate::config::{Config, PayloadFormat, Pipeline as PipelineConfig, PipelineKind};
use crate::model::Model;
use std::sync::Arc;

/// Everything a worker needs to know about its pipeline.
#[derive(Debug)]
pub struct PipelineSpec {
    pub name: String,
    pub model: Arc<Model>,
    /// Largest payload accepted, bytes.
    pub max_payload: usize,
    /// Most sources (windows, camera slots) kept at once.
    pub max_sources: usize,
    pub kind: Kind,
}

#[derive(Debug)]
pub enum Kind {
    Sensor(SensorSpec),
    Camera(CameraSpec),
}

/// Sensor pipelines: samples into sliding windows.
#[derive(Debug, Clone, Copy)]
pub struct SensorSpec {
    pub payload: SensorPayload,
    pub channels: usize,
    /// Samples per window, and samples between window starts.
    pub size: usize,
    pub stride: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SensorPayload {
    Json,
    F32le,
}

/// Camera pipelines: one frame, one inference.
#[derive(Debug)]
pub struct CameraSpec {
    pub frame: FrameFormat,
    pub input: ImageInput,
    pub detection: Option<DetectionSpec>,
    pub max_pixels: u64,
    /// Draw each frame's detections as a snapshot.
    pub snapshot: bool,
}

impl PipelineSpec {
    /// Checks a pipeline against its loaded model and fixes the window.
    pub fn new(
        config: &Config,
        p: &PipelineConfig,
        model: Arc<Model>,
    ) -> Result<PipelineSpec, String> {
        let (kind, max_payload) = match p.kind {
            PipelineKind::Sensor => (
                Kind::Sensor(SensorSpec::new(p, &model)?),
                config.limits.max_payload_bytes,
            ),
            PipelineKind::Camera => (
                Kind::Camera(CameraSpec::new(config, p, &model)?),
                config.limits.max_image_bytes,
            ),
        };
        Ok(PipelineSpec {
            name: p.name.clone(),
            model,
            max_payload,
            max_sources: config.limits.max_sources,
            kind,
        })
    }

    /// Values per sample (sensor) or image channels (camera) the
    /// preprocessor takes.
    pub fn channels(&self) -> usize {
        match &self.kind {
            Kind::Sensor(s) => s.channels,
            Kind::Camera(c) => c.input.channels,
        }
    }
}

impl SensorSpec {
    fn new(p: &PipelineConfig, model: &Model) -> Result<SensorSpec, String> {
        let input = model.input();
        let SensorLayout {
            channels, samples, ..
        } = SensorLayout::of(model)?;
        let size = p.window.and_then(|w| w.size).unwrap_or(samples);
        if size != samples {
            return Err(format!(
                "window.size = {size}, but model {} takes {samples} samples of {channels} channels ({input})",
                model.name
            ));
        }
        let stride = p.window.and_then(|w| w.stride).unwrap_or(size);
        Preprocessor::sensor(model)?;
        let payload = match p.payload() {
            PayloadFormat::Json => SensorPayload::Json,
            PayloadFormat::F32le => SensorPayload::F32le,
            other => return Err(format!("payload {other:?} is for camera pipelines")),
        };
        Ok(SensorSpec {
            payload,
            channels,
            size,
            stride,
        })
    }
}

impl CameraSpec {
    fn new(config: &Config, p: &PipelineConfig, model: &Model) -> Result<CameraSpec, String> {
        let input = ImageInput::new(model)?;
        let mut detection = DetectionSpec::new(model)?;
        if let Some(d) = &mut detection {
            d.score_threshold = p.score_threshold.unwrap_or(d.score_threshold);
            d.iou_threshold = p.iou_threshold.unwrap_or(d.iou_threshold);
            d.max_detections = p.max_detections.unwrap_or(d.max_detections);
            d.classes = p.classes.clone().unwrap_or_default();
        } else if p.snapshot.is_some() || p.classes.is_some() {
            return Err(format!(
                "snapshot and classes need a detection model; {} is not one (output.kind)",
                model.name
            ));
        }
        // Checks the manifest's preprocessing against the image channels.
        Preprocessor::new(model, input.channels)?;
        let frame = match p.payload() {
            PayloadFormat::Rgb8 => FrameFormat::Rgb8 {
                width: p.width.unwrap_or(0),
                height: p.height.unwrap_or(0),
            },
            PayloadFormat::Gray8 => FrameFormat::Gray8 {
                width: p.width.unwrap_or(0),
                height: p.height.unwrap_or(0),
            },
            _ => frame::FrameFormat::Encoded,
        };
        Ok(CameraSpec {
            frame,
            input,
            detection,
            max_pixels: config.limits.max_image_pixels,
            snapshot: p.snapshot.is_some(),
        })
    }
}

/// How a pipeline's model is put on an engine: `[engine]` with the
/// pipeline's overrides.
pub fn engine_options(
    config: &crate::config::Config,
    pipeline: &crate::config::Pipeline,
) -> crate::model::EngineOptions {
    use crate::config::Backend;
    use crate::model::BackendChoice;
    let e = &config.engine;
    crate::model::EngineOptions {
        backend: match pipeline.backend.unwrap_or(e.backend) {
            Backend::Auto => BackendChoice::Auto,
            Backend::Tract => BackendChoice::Tract,
            Backend::OnnxRuntime => BackendChoice::OnnxRuntime,
        },
        providers: pipeline
            .providers
            .clone()
            .unwrap_or_else(|| e.providers.clone()),
        fallback: pipeline.fallback.unwrap_or(e.fallback),
        strict: pipeline.strict.unwrap_or(e.strict),
        threads: pipeline.threads.unwrap_or(e.threads),
        library: e
            .onnxruntime_library
            .as_ref()
            .map(|l| config.base_dir.join(l)),
        cache_dir: config.effective().engine_cache_dir.clone(),
        probe_budget_ms: e.probe_budget_ms,
    }
}
