//! `edgeinfer infer`: one input through a model, printed in the MQTT result schema.

use super::OneShotError;
use crate::flow::unix_ms;
use crate::model::{EngineOptions, Model};
use crate::pipeline::post;
use crate::pipeline::pre::{Preprocessor, SensorLayout};
use crate::pipeline::result::{ms, LatencyMs, ResultFields};
use crate::pipeline::sensor;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// Where `infer` reads its input from.
pub enum InferInput<'a> {
    /// A JSON sensor payload, or raw f32le when the file ends in .f32/.bin/.raw.
    File(&'a Path),
    Json(&'a str),
}

/// Runs one input through a model and returns the result in the MQTT result schema.
pub fn infer(
    model_path: &Path,
    input: InferInput,
    options: &EngineOptions,
) -> Result<serde_json::Value, OneShotError> {
    let model = Arc::new(Model::load_with(model_path, options)?);
    let layout = SensorLayout::of(&model).map_err(OneShotError::Other)?;
    let channels = layout.channels;
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
    let mut pre = Preprocessor::sensor(&model).map_err(OneShotError::Other)?;
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
