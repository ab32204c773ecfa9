//! `edgeinfer bench`: load time, inference latency and peak RSS of a model,
//! and the time of the input stage that feeds it (sensor windowing, or
//! decoding and fitting an image given with `--image`).

use super::OneShotError;
use crate::health::{peak_rss_bytes, percentile};
use crate::model::manifest::Layout;
use crate::model::{EngineOptions, EngineReport, Model, NodeTime};
use crate::pipeline::frame::{decode, Fitter, FrameFormat, FrameLimits, ImageInput};
use crate::pipeline::pre::{Preprocessor, SensorLayout};
use crate::pipeline::sensor::{decode_json, SensorWindow};
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
    /// The input stage before inference, timed apart from it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pre: Option<StageReport>,
    /// Where inference spends its time (`--profile`, tract only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<Profile>,
    pub peak_rss_bytes: u64,
}

/// One input stage, timed over the same number of runs as inference.
#[derive(Debug, Clone, Serialize)]
pub struct StageReport {
    /// What one run does.
    pub what: String,
    pub runs: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Inference time by operator, from runs that time every node (their total
/// is a little above the untimed p50: the clock is read twice per node).
#[derive(Debug, Clone, Serialize)]
pub struct Profile {
    pub runs: usize,
    /// Sum over nodes, per run.
    pub ms_per_run: f64,
    /// By operator name, largest first.
    pub ops: Vec<OpShare>,
    /// The ten slowest nodes.
    pub nodes: Vec<OpShare>,
}

#[derive(Debug, Clone, Serialize)]
pub struct OpShare {
    /// The operator (tract's name for it, or ours).
    pub op: String,
    /// The node's name; for an operator, how many nodes run it.
    pub of: String,
    pub ms_per_run: f64,
    /// Of the profiled total.
    pub share: f64,
}

/// One run of a stage: makes the input tensor (through the preprocessor,
/// into the buffer of normalised values).
type StageRun = dyn FnMut(&mut Preprocessor, &mut Vec<f32>) -> Result<(), String>;

/// The input the timed runs infer on, and how one run of the stage that
/// makes it goes.
struct Stage {
    what: String,
    pre: Preprocessor,
    raw: Vec<f32>,
    run: Box<StageRun>,
}

/// Loads a model and times `runs` inferences (after 10 warm-up runs). A
/// sensor model (one whose input cannot be an image's, or whose manifest
/// gives a sensor layout) infers on a fixed pseudo-random window, and its
/// stage is one window's worth of JSON messages (one sample each) decoded,
/// windowed and normalised. With `image`, an image model infers on that
/// file fitted to its input, and its stage is the decode, the resize and
/// the normalising.
/// Other models infer on pseudo-random values and report no stage.
pub fn bench(
    model_path: &Path,
    runs: usize,
    options: &EngineOptions,
    image: Option<&Path>,
    profile: bool,
) -> Result<BenchReport, OneShotError> {
    let model = Arc::new(Model::load_with(model_path, options)?);
    let mut stage = match image {
        Some(file) => Some(image_stage(&model, file)?),
        None => sensor_stage(&model),
    };
    let mut pre = match &stage {
        Some(s) => s.pre.clone(),
        // The random values as they are: their layout does not matter to
        // the timing.
        None => Preprocessor::new(&model, *model.input().shape.last().unwrap_or(&1))
            .map_err(OneShotError::Other)?,
    };
    let raw = match &stage {
        Some(s) => s.raw.clone(),
        None => random(model.input().len()),
    };
    let runs = runs.max(1);
    let mut session = model.session()?;
    let mut normalised = Vec::new();
    for _ in 0..10 {
        session.run(pre.tensor(&raw, &mut normalised))?;
    }
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let tensor = pre.tensor(&raw, &mut normalised);
        let t = Instant::now();
        session.run(tensor)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let profile = if profile {
        let mut nodes = Vec::new();
        for _ in 0..runs {
            if !session.profile(pre.tensor(&raw, &mut normalised), &mut nodes)? {
                return Err(OneShotError::Other(format!(
                    "--profile: {} does not time its operators (tract does)",
                    model.runs_on()
                )));
            }
        }
        Some(profile_of(&nodes, runs))
    } else {
        None
    };
    let pre_report = match stage.as_mut() {
        Some(s) => Some(time_stage(s, runs).map_err(OneShotError::Other)?),
        None => None,
    };
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    times.sort_by(f64::total_cmp);
    Ok(BenchReport {
        model: model.name.clone(),
        backend: model.runs_on().to_owned(),
        engine: model.placement.clone(),
        input: model.input().to_string(),
        load_ms: round4(model.load_ms),
        runs: times.len(),
        p50_ms: round4(percentile(&times, 0.5)),
        p90_ms: round4(percentile(&times, 0.9)),
        p99_ms: round4(percentile(&times, 0.99)),
        mean_ms: round4(mean),
        pre: pre_report,
        profile,
        peak_rss_bytes: peak_rss_bytes().unwrap_or(0),
    })
}

fn profile_of(nodes: &[NodeTime], runs: usize) -> Profile {
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3 / runs as f64;
    let total: f64 = nodes.iter().map(|n| ms(n.total)).sum();
    let share = |x: f64| if total > 0.0 { round4(x / total) } else { 0.0 };
    let mut by_op: Vec<(String, usize, f64)> = Vec::new();
    for n in nodes.iter().filter(|n| !n.op.is_empty()) {
        match by_op.iter_mut().find(|(op, ..)| *op == n.op) {
            Some(entry) => {
                entry.1 += 1;
                entry.2 += ms(n.total);
            }
            None => by_op.push((n.op.clone(), 1, ms(n.total))),
        }
    }
    by_op.sort_by(|a, b| b.2.total_cmp(&a.2));
    let mut slowest: Vec<&NodeTime> = nodes.iter().filter(|n| !n.op.is_empty()).collect();
    slowest.sort_by_key(|n| std::cmp::Reverse(n.total));
    Profile {
        runs,
        ms_per_run: round4(total),
        ops: by_op
            .into_iter()
            .map(|(op, count, t)| OpShare {
                op,
                of: format!("{count} node{}", if count == 1 { "" } else { "s" }),
                ms_per_run: round4(t),
                share: share(t),
            })
            .collect(),
        nodes: slowest
            .into_iter()
            .take(10)
            .map(|n| OpShare {
                op: n.op.clone(),
                of: n.node.clone(),
                ms_per_run: round4(ms(n.total)),
                share: share(ms(n.total)),
            })
            .collect(),
    }
}

fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

fn random(n: usize) -> Vec<f32> {
    let mut rng = fastrand::Rng::with_seed(42);
    (0..n).map(|_| rng.f32() * 2.0 - 1.0).collect()
}

fn time_stage(stage: &mut Stage, runs: usize) -> Result<StageReport, String> {
    let mut normalised = Vec::new();
    for _ in 0..3 {
        (stage.run)(&mut stage.pre, &mut normalised)?;
    }
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        (stage.run)(&mut stage.pre, &mut normalised)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(StageReport {
        what: stage.what.clone(),
        runs,
        p50_ms: round4(percentile(&times, 0.5)),
        p99_ms: round4(percentile(&times, 0.99)),
    })
}

/// The JSON messages of one window, one sample each, as a device sends
/// them: `{"ts": …, "values": [...]}` (values pseudo-random, 4 decimals).
fn sensor_messages(samples: usize, channels: usize) -> Vec<Vec<u8>> {
    let mut rng = fastrand::Rng::with_seed(7);
    (0..samples)
        .map(|k| {
            let values: Vec<String> = (0..channels)
                .map(|_| format!("{:.4}", rng.f32() * 20.0 - 10.0))
                .collect();
            format!(
                r#"{{"ts": {}, "values": [{}]}}"#,
                1_764_331_200_000u64 + k as u64,
                values.join(", ")
            )
            .into_bytes()
        })
        .collect()
}

fn sensor_stage(model: &Arc<Model>) -> Option<Stage> {
    // A [1, H, W, C] or [1, C, H, W] input with 1 or 3 channels is taken for
    // an image unless the manifest says it is a sensor window.
    let said_sensor = model.manifest.input.layout.is_some_and(|l| {
        matches!(
            l,
            Layout::SamplesChannels | Layout::ChannelsSamples | Layout::Flat
        )
    });
    if !said_sensor && ImageInput::new(model).is_ok() {
        return None;
    }
    let layout = SensorLayout::of(model).ok()?;
    let pre = Preprocessor::sensor(model).ok()?;
    let (size, channels) = (layout.samples, layout.channels);
    let messages = sensor_messages(size, channels);
    let mut window = SensorWindow::new(size, size, channels);
    let mut raw = Vec::new();
    Some(Stage {
        what: format!("{size} JSON messages of {channels} values decoded, windowed, normalised"),
        pre,
        raw: random(model.input().len()),
        run: Box::new(move |pre, normalised| {
            let mut due = 0;
            for m in &messages {
                let s = decode_json(m, channels).map_err(|e| e.to_string())?;
                for sample in s.values.chunks_exact(channels) {
                    if window.push(sample) {
                        window.copy_into(&mut raw);
                        std::hint::black_box(pre.tensor(&raw, normalised));
                        due += 1;
                    }
                }
            }
            match due {
                1 => Ok(()),
                n => Err(format!("{n} windows from one window of messages")),
            }
        }),
    })
}

fn image_stage(model: &Arc<Model>, file: &Path) -> Result<Stage, OneShotError> {
    let bytes =
        std::fs::read(file).map_err(|e| OneShotError::Other(format!("{}: {e}", file.display())))?;
    let input = ImageInput::new(model)
        .map_err(|e| OneShotError::Other(format!("--image needs an image model: {e}")))?;
    let pre = Preprocessor::new(model, input.channels).map_err(OneShotError::Other)?;
    let pre = if input.layout == Layout::Nchw {
        pre.channel_first()
    } else {
        pre
    };
    // The daemon's default frame limit (`[limits] max_image_pixels`).
    let limits = FrameLimits::pixels(crate::config::Limits::default().max_image_pixels);
    let frame = decode(&bytes, FrameFormat::Encoded, &limits)
        .map_err(|e| OneShotError::Other(format!("{}: {e}", file.display())))?;
    let mut fitter = Fitter::default();
    let mut raw = Vec::new();
    fitter.fit(&frame, &input, &mut raw);
    let kind = if bytes.starts_with(&[0xFF, 0xD8]) {
        "JPEG"
    } else {
        "PNG"
    };
    Ok(Stage {
        what: format!(
            "{}x{} {kind} decoded, resized ({}) to {}x{}, normalised",
            frame.width,
            frame.height,
            format!("{:?}", input.resize).to_lowercase(),
            input.width,
            input.height
        ),
        pre,
        raw: raw.clone(),
        run: Box::new(move |pre, normalised| {
            let frame = decode(&bytes, FrameFormat::Encoded, &limits).map_err(|e| e.to_string())?;
            fitter.fit(&frame, &input, &mut raw);
            std::hint::black_box(pre.tensor(&raw, normalised));
            Ok(())
        }),
    })
}
