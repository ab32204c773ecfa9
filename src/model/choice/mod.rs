//! Which engine serves a model: the configured one, or with `backend =
//! "auto"` every available one, probed for agreement and timed, the
//! fastest that agrees. Decisions are cached in the state directory.

use super::backend::{self, tract::TractEngine, BackendChoice, Engine, EngineOptions, Fact};
use super::graph::{GraphFacts, QuantParams};
use super::manifest::{Manifest, OutputKind};
use super::qdq;
use super::ModelErrorKind;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tract_onnx::prelude::*;

mod agreement;
mod cache;
mod contest;

pub(crate) use agreement::dequantized;
use agreement::*;
use cache::*;
use contest::*;

/// Relative tolerance for float outputs (of the output's largest |value|).
pub const FLOAT_RTOL: f32 = 1e-3;

/// Absolute floor under it, for outputs near zero.
pub const FLOAT_ATOL: f32 = 1e-4;

/// How a model came to run where it runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EngineReport {
    /// `auto`, `tract` or `onnxruntime`, as configured.
    pub requested: String,
    /// `tract-cpu`, `onnxruntime-cpu`, `onnxruntime-openvino`, …
    pub runs_on: String,
    /// The form of the graph it runs, where the engine has several (tract's
    /// `qdq-folded`); absent for the graph as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    pub reason: String,
    /// Engines and providers tried before, each with why it was passed over.
    pub passed_over: Vec<String>,
    /// `auto`'s figures, one per engine measured.
    pub measured: Vec<Measurement>,
    /// The decision came from the cache (nothing was measured this start).
    pub from_cache: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Measurement {
    pub runs_on: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    pub p50_ms: f64,
    pub runs: usize,
    /// Largest |difference| from ONNX Runtime's outputs (dequantized), when
    /// both ran.
    pub max_abs_diff: Option<f32>,
    pub agrees: Option<bool>,
    pub detail: Option<String>,
}

impl Measurement {
    /// `runs_on`, with the variant where there is one.
    pub fn label(&self) -> String {
        backend::label(&self.runs_on, self.variant.as_deref())
    }
}

pub struct Placement {
    pub engine: Arc<dyn Engine>,
    pub report: EngineReport,
}

/// What `place` needs to know about the model besides its bytes.
pub struct ModelFacts<'a> {
    pub bytes: &'a [u8],
    pub proto: &'a tract_onnx::pb::ModelProto,
    pub manifest: &'a Manifest,
    pub sha256: &'a str,
}

pub fn place(
    m: &ModelFacts,
    graph: &mut GraphFacts,
    options: &EngineOptions,
) -> Result<Placement, ModelErrorKind> {
    let report = |runs_on: &str, reason: String, passed_over: Vec<String>| EngineReport {
        requested: options.backend.as_str().into(),
        runs_on: runs_on.into(),
        variant: None,
        reason,
        passed_over,
        measured: vec![],
        from_cache: false,
    };
    match options.backend {
        BackendChoice::Tract => {
            let engine = TractEngine::load(m.proto, m.manifest, graph)?;
            Ok(Placement {
                engine: Arc::new(engine),
                report: report(backend::tract::RUNS_ON, "configured".into(), vec![]),
            })
        }
        BackendChoice::OnnxRuntime => match load_ort(m, options) {
            Ok((engine, passed, note)) => {
                let reason = note.map_or("configured".into(), |n| format!("configured; {n}"));
                let runs_on = engine.runs_on().to_owned();
                Ok(Placement {
                    engine,
                    report: report(&runs_on, reason, passed),
                })
            }
            Err(reasons) if options.fallback => {
                let engine = TractEngine::load(m.proto, m.manifest, graph).map_err(|e| {
                    ModelErrorKind::Engine(format!("{}; tract: {e}", reasons.join("; ")))
                })?;
                Ok(Placement {
                    engine: Arc::new(engine),
                    report: report(
                        backend::tract::RUNS_ON,
                        "every ONNX Runtime provider was passed over (fallback = true)".into(),
                        reasons,
                    ),
                })
            }
            Err(reasons) => Err(ModelErrorKind::Engine(format!(
                "backend = \"onnxruntime\" with fallback = false: {}",
                reasons.join("; ")
            ))),
        },
        BackendChoice::Auto => auto(m, graph, options),
    }
}

type OrtLoaded = (Arc<dyn Engine>, Vec<String>, Option<String>);

#[cfg(feature = "onnxruntime")]
fn load_ort(m: &ModelFacts, options: &EngineOptions) -> Result<OrtLoaded, Vec<String>> {
    let manifest = m.manifest;
    let data_input = |names: &[String]| manifest.data_input_index(names);
    let placed = backend::onnxruntime::load(
        m.bytes,
        manifest.input.shape.as_deref(),
        &data_input,
        options,
    )?;
    Ok((Arc::new(placed.engine), placed.passed_over, placed.note))
}

#[cfg(not(feature = "onnxruntime"))]
fn load_ort(_: &ModelFacts, _: &EngineOptions) -> Result<OrtLoaded, Vec<String>> {
    Err(vec![backend::runtime_status(None)
        .reason
        .map(|r| format!("onnxruntime: {r}"))
        .unwrap_or_default()])
}

fn auto(
    m: &ModelFacts,
    graph: &mut GraphFacts,
    options: &EngineOptions,
) -> Result<Placement, ModelErrorKind> {
    let status = backend::runtime_status(options.library.as_deref());
    // Without ONNX Runtime there is still a decision to keep when tract has
    // several variants of the model.
    let key = cache_key(
        m.sha256,
        status.version.as_deref().unwrap_or("none"),
        options,
    );
    let cache = cache_file(options);
    if let Some(placement) = cache
        .as_deref()
        .and_then(|f| cached(m, graph, options, f, &key))
    {
        return Ok(placement);
    }

    let mut passed_over = Vec::new();
    let mut tracts: Vec<Arc<dyn Engine>> = Vec::new();
    let mut tract_error = None;
    // The variant's facts (its notes), which become the model's if it serves.
    let mut variant_facts = None;
    let before = graph.clone();
    match TractEngine::load(m.proto, m.manifest, graph) {
        Ok(t) => {
            tracts.push(Arc::new(t));
            match load_folded(m, &before) {
                Some(Ok((f, facts))) => {
                    tracts.push(Arc::new(f));
                    variant_facts = Some(facts);
                }
                Some(Err(e)) => passed_over.push(format!("tract ({}): {e}", qdq::VARIANT)),
                None => {}
            }
        }
        Err(e) => tract_error = Some(e),
    }
    let ort = match &status.reason {
        Some(reason) => Err(vec![format!("onnxruntime: {reason}")]),
        None => load_ort(m, options),
    };
    let report =
        |engine: &dyn Engine, reason: String, passed_over: Vec<String>, measured| EngineReport {
            requested: "auto".into(),
            runs_on: engine.runs_on().into(),
            variant: engine.variant().map(str::to_owned),
            reason,
            passed_over,
            measured,
            from_cache: false,
        };
    let placement = match (tract_error, ort) {
        (None, Err(reasons)) => {
            passed_over.extend(reasons);
            let without = if status.available {
                "ONNX Runtime cannot load it"
            } else {
                "ONNX Runtime is not available"
            };
            if tracts.len() == 1 {
                let t = tracts.remove(0);
                return Ok(Placement {
                    report: report(t.as_ref(), without.into(), passed_over, vec![]),
                    engine: t,
                });
            }
            let (engine, reason, measured) =
                contest(tracts, None, m, graph, options).map_err(ModelErrorKind::Engine)?;
            Placement {
                report: report(
                    engine.as_ref(),
                    format!("{without}; {reason}"),
                    passed_over,
                    measured,
                ),
                engine,
            }
        }
        (Some(e), Ok((o, passed, _))) => {
            passed_over.push(format!("tract: {e}"));
            passed_over.extend(passed);
            tracing::warn!(reason = %e, runs_on = o.runs_on(), "tract cannot load the model; ONNX Runtime serves it");
            Placement {
                report: report(
                    o.as_ref(),
                    "tract cannot load it".into(),
                    passed_over,
                    vec![],
                ),
                engine: o,
            }
        }
        (Some(e), Err(reasons)) => {
            if !status.available {
                return Err(e);
            }
            return Err(ModelErrorKind::Engine(format!(
                "no engine can load it: tract: {e}; {}",
                reasons.join("; ")
            )));
        }
        (None, Ok((o, passed, _))) => {
            passed_over.extend(passed);
            let (engine, reason, measured) =
                contest(tracts, Some(o), m, graph, options).map_err(ModelErrorKind::Engine)?;
            Placement {
                report: report(engine.as_ref(), reason, passed_over, measured),
                engine,
            }
        }
    };
    if let (Some(qdq::VARIANT), Some(facts)) = (placement.engine.variant(), variant_facts) {
        *graph = facts;
    }
    if let (true, Some(file)) = (
        status.available || !placement.report.measured.is_empty(),
        cache,
    ) {
        let mut all = read_cache(&file);
        all.insert(key, placement.report.clone());
        if let Err(e) = write_cache(&file, &all) {
            tracing::warn!(file = %file.display(), error = %e, "Cannot save the engine choice");
        }
    }
    Ok(placement)
}

/// The decision cached for `key`, its engine loaded again; none when there
/// is none or it no longer loads.
fn cached(
    m: &ModelFacts,
    graph: &mut GraphFacts,
    options: &EngineOptions,
    file: &Path,
    key: &str,
) -> Option<Placement> {
    let mut cached = read_cache(file).remove(key)?;
    let engine: Arc<dyn Engine> = if cached.runs_on == backend::tract::RUNS_ON {
        let e = match cached.variant.as_deref() {
            None => TractEngine::load(m.proto, m.manifest, graph).ok(),
            Some(qdq::VARIANT) => load_folded(m, graph)
                .and_then(Result::ok)
                .map(|(e, facts)| {
                    *graph = facts;
                    e
                }),
            Some(_) => None,
        }?;
        Arc::new(e)
    } else {
        load_ort(m, options)
            .ok()
            .map(|(e, _, _)| e)
            .filter(|e| e.runs_on() == cached.runs_on)?
    };
    cached.from_cache = true;
    Some(Placement {
        engine,
        report: cached,
    })
}

/// tract on the graph with its activation quantize/dequantize pairs folded
/// into `Clip`, and the model's facts if it serves (`before`'s, with its
/// own load notes and the note that says so); `None` when the graph has no
/// such pairs.
fn load_folded(
    m: &ModelFacts,
    before: &GraphFacts,
) -> Option<Result<(TractEngine, GraphFacts), ModelErrorKind>> {
    let folded = qdq::fold_activations(m.proto)?;
    let mut facts = before.clone();
    Some(
        TractEngine::load(&folded.model, m.manifest, &mut facts).map(|e| {
            facts.rewrites.push(format!(
                "tract runs the {} variant: {} activation QuantizeLinear → DequantizeLinear pairs folded into Clip (float between layers, no rounding); chosen by measurement",
                qdq::VARIANT,
                folded.pairs
            ));
            (e.with_variant(qdq::VARIANT), facts)
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::TensorInfo;

    fn fact(name: &str, n: usize, datum: DatumType) -> Fact {
        Fact {
            info: TensorInfo {
                name: name.into(),
                shape: vec![1, n],
                dtype: String::new(),
            },
            datum,
        }
    }

    fn classifier() -> Manifest {
        let mut m = Manifest::default();
        m.output.kind = OutputKind::Classification;
        m
    }

    fn value<T: Datum + Copy>(v: &[T]) -> TValue {
        Tensor::from_shape(&[1, v.len()], v).unwrap().into_tvalue()
    }

    #[test]
    fn int8_outputs_agree_within_one_quantization_step_and_not_two() {
        let mut graph = GraphFacts::default();
        graph.output_quant.insert(
            "y".into(),
            QuantParams {
                scale: 0.5,
                zero_point: 3,
            },
        );
        let f = [fact("y", 3, DatumType::I8)];
        let reference = [value::<i8>(&[10, 20, 30])];
        let m = Manifest::default();
        let (d, verdict) = compare(
            &f,
            &[value::<i8>(&[11, 20, 29])],
            &f,
            &reference,
            &m,
            &graph,
        );
        assert_eq!((d, verdict), (0.5, None));
        let (d, verdict) = compare(
            &f,
            &[value::<i8>(&[12, 20, 30])],
            &f,
            &reference,
            &m,
            &graph,
        );
        assert_eq!(d, 1.0);
        assert!(verdict.unwrap().contains("output y"));
    }

    #[test]
    fn float_outputs_are_held_to_a_tolerance_relative_to_their_size() {
        let f = [fact("y", 2, DatumType::F32)];
        let m = Manifest::default();
        let g = GraphFacts::default();
        let reference = [value::<f32>(&[100.0, -50.0])];
        // 1e-4 + 1e-3 * 100 = 0.1001 allowed.
        assert!(compare(
            &f,
            &[value::<f32>(&[100.09, -50.0])],
            &f,
            &reference,
            &m,
            &g
        )
        .1
        .is_none());
        assert!(
            compare(&f, &[value::<f32>(&[100.2, -50.0])], &f, &reference, &m, &g)
                .1
                .is_some()
        );
        let nan = compare(
            &f,
            &[value::<f32>(&[f32::NAN, -50.0])],
            &f,
            &reference,
            &m,
            &g,
        );
        assert!(nan.0.is_nan() && nan.1.is_some());
    }

    #[test]
    fn a_classifier_must_keep_its_top_class() {
        let f = [fact("logits", 2, DatumType::F32)];
        let g = GraphFacts::default();
        // Within the float tolerance, but the top class flips.
        let tract = [value::<f32>(&[1.0, 1.00005])];
        let ort = [value::<f32>(&[1.00005, 1.0])];
        let verdict = compare(&f, &tract, &f, &ort, &classifier(), &g).1.unwrap();
        assert!(verdict.contains("top-1"), "{verdict}");
        assert!(compare(&f, &tract, &f, &ort, &Manifest::default(), &g)
            .1
            .is_none());
    }

    #[test]
    fn the_probe_is_deterministic_covers_int8_and_zeroes_state() {
        let inputs = [fact("x", 256, DatumType::I8), fact("h", 4, DatumType::F32)];
        let a = probe(&inputs, Some(0)).unwrap();
        assert_eq!(a, probe(&inputs, Some(0)).unwrap());
        let x = backend::plain_slice::<i8>(&a[0]).unwrap();
        assert!(x.iter().any(|v| *v < -100) && x.iter().any(|v| *v > 100));
        assert!(backend::plain_slice::<f32>(&a[1])
            .unwrap()
            .iter()
            .all(|v| *v == 0.0));
    }
}
