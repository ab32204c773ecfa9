//! `edgeinfer bench`: load time, inference latency and peak RSS of a model.

use super::OneShotError;
use crate::health::{peak_rss_bytes, percentile};
use crate::model::{EngineOptions, EngineReport, Model};
use crate::pipeline::pre::Preprocessor;
use serde::Serialize;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub backend: String,
    /// How the engine was chosen (and `auto`'s figures).
    pub engine: EngineReport,
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
pub fn bench(
    model_path: &Path,
    runs: usize,
    options: &EngineOptions,
) -> Result<BenchReport, OneShotError> {
    let model = Arc::new(Model::load_with(model_path, options)?);
    // Sensor models as their layout says; image models take the random
    // values as they are (their layout does not matter to the timing).
    let mut pre = Preprocessor::sensor(&model)
        .or_else(|_| Preprocessor::new(&model, *model.input().shape.last().unwrap_or(&1)))
        .map_err(OneShotError::Other)?;
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
        backend: model.runs_on().to_owned(),
        engine: model.placement.clone(),
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
