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
    if let Some(file) = &cache {
        if let Some(mut cached) = read_cache(file).remove(&key) {
            let engine: Option<Arc<dyn Engine>> = if cached.runs_on == backend::tract::RUNS_ON {
                match cached.variant.as_deref() {
                    None => TractEngine::load(m.proto, m.manifest, graph).ok(),
                    Some(qdq::VARIANT) => {
                        load_folded(m, graph)
                            .and_then(Result::ok)
                            .map(|(e, facts)| {
                                *graph = facts;
                                e
                            })
                    }
                    Some(_) => None,
                }
                .map(|e| Arc::new(e) as Arc<dyn Engine>)
            } else {
                load_ort(m, options)
                    .ok()
                    .map(|(e, _, _)| e)
                    .filter(|e| e.runs_on() == cached.runs_on)
            };
            if let Some(engine) = engine {
                cached.from_cache = true;
                return Ok(Placement {
                    engine,
                    report: cached,
                });
            }
        }
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

/// The winner, why, and everyone's figures.
type Contested = (Arc<dyn Engine>, String, Vec<Measurement>);

/// An engine in the contest: `serves` when it may be chosen, else it is
/// there only as the reference.
struct Entrant {
    engine: Arc<dyn Engine>,
    serves: bool,
}

/// `auto` with several engines or variants loaded. With ONNX Runtime the
/// reference is its CPU provider (an accelerator's int8 arithmetic may
/// differ from it, and so may tract's); without it, tract on the graph as
/// given (the first of `tracts`). Every engine allowed to serve must agree
/// with the reference, and the fastest that does serves. Returns the
/// engine, the reason and the figures.
fn contest(
    tracts: Vec<Arc<dyn Engine>>,
    ort: Option<Arc<dyn Engine>>,
    m: &ModelFacts,
    graph: &GraphFacts,
    options: &EngineOptions,
) -> Result<Contested, String> {
    const CPU: &str = "onnxruntime-cpu";
    let mut entrants: Vec<Entrant> = tracts
        .into_iter()
        .map(|engine| Entrant {
            engine,
            serves: true,
        })
        .collect();
    let mut reference = 0;
    if let Some(ort) = &ort {
        entrants.push(Entrant {
            engine: Arc::clone(ort),
            serves: true,
        });
        reference = entrants.len() - 1;
        if ort.runs_on() != CPU {
            let cpu_only = EngineOptions {
                providers: vec!["cpu".into()],
                strict: false,
                ..options.clone()
            };
            match load_ort(m, &cpu_only) {
                Ok((cpu, _, _)) => {
                    entrants.push(Entrant {
                        engine: cpu,
                        serves: options.providers.iter().any(|p| p == "cpu"),
                    });
                    reference = entrants.len() - 1;
                }
                Err(e) => tracing::warn!(
                    "No ONNX Runtime CPU session to compare {} against ({}): it is the reference",
                    ort.runs_on(),
                    e.join("; ")
                ),
            }
        }
    }
    let measured = measure(
        &entrants,
        reference,
        m.manifest,
        graph,
        options.probe_budget_ms,
    )?;
    let eligible =
        |i: usize| entrants[i].serves && (i == reference || measured[i].agrees == Some(true));
    let best = (0..entrants.len())
        .filter(|i| eligible(*i))
        .min_by(|a, b| measured[*a].p50_ms.total_cmp(&measured[*b].p50_ms));
    let reference_name = measured[reference].label();
    for (i, row) in measured.iter().enumerate() {
        if let (false, Some(why)) = (i == reference, &row.detail) {
            tracing::warn!(runs_on = %row.label(), "Answers differently from {reference_name}: {why}");
        }
    }
    let figures = |i: usize| {
        measured
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, r)| format!("{} {:.3} ms", r.label(), r.p50_ms))
            .collect::<Vec<_>>()
            .join(", ")
    };
    Ok(match (best, ort) {
        (Some(i), _) => {
            let differs: Vec<String> = measured
                .iter()
                .filter(|r| r.agrees == Some(false))
                .map(|r| format!("{} answers differently: {}", r.label(), r.detail.as_deref().unwrap_or("")))
                .collect();
            let mut reason = if i == reference {
                format!("the fastest agreeing engine ({:.3} ms; {})", measured[i].p50_ms, figures(i))
            } else {
                format!(
                    "agrees with {reference_name} and is the fastest ({:.3} ms; {})",
                    measured[i].p50_ms,
                    figures(i)
                )
            };
            if !differs.is_empty() {
                reason = format!("{reason}; {}", differs.join("; "));
            }
            (Arc::clone(&entrants[i].engine), reason, measured)
        }
        (None, Some(ort)) => (
            ort,
            format!(
                "no engine allowed to serve agrees with {reference_name}; serving with the first provider configured"
            ),
            measured,
        ),
        (None, None) => unreachable!("the reference (tract as given) always serves"),
    })
}

/// Runs the same probe through every entrant, compares each with the
/// reference, and times them all, interleaved.
fn measure(
    entrants: &[Entrant],
    reference: usize,
    manifest: &Manifest,
    graph: &GraphFacts,
    budget_ms: u64,
) -> Result<Vec<Measurement>, String> {
    let label = |e: &Entrant| e.engine.label();
    let mut runs = Vec::new();
    for e in entrants {
        let names: Vec<String> = e
            .engine
            .inputs()
            .iter()
            .map(|f| f.info.name.clone())
            .collect();
        let input = probe(e.engine.inputs(), manifest.data_input_index(&names))?;
        let mut runner = e
            .engine
            .runner()
            .map_err(|err| format!("{}: {err}", label(e)))?;
        let output = runner
            .run(input.clone())
            .map_err(|err| format!("{}: {err}", label(e)))?;
        runs.push((runner, input, output));
    }
    let r = &entrants[reference].engine;
    let verdicts: Vec<(f32, Option<String>)> = entrants
        .iter()
        .zip(&runs)
        .map(|(e, (_, _, out))| {
            compare(
                e.engine.outputs(),
                out,
                r.outputs(),
                &runs[reference].2,
                manifest,
                graph,
            )
        })
        .collect();

    // Only the engines that could serve race for the budget: one that
    // answers differently, or is there only as the reference, gets the 3
    // runs every entrant gets (its figure is reported, never compared), and
    // with a single candidate left there is no race at all. A first start
    // then spends its budget only where there is a choice to make.
    let candidates: Vec<bool> = entrants
        .iter()
        .zip(&verdicts)
        .enumerate()
        .map(|(k, (e, (_, verdict)))| e.serves && (k == reference || verdict.is_none()))
        .collect();
    let racing = candidates.iter().filter(|c| **c).count() > 1;
    let budget = if racing {
        candidates.iter().filter(|c| **c).count() as u128 * budget_ms as u128
    } else {
        0
    };
    let lead = candidates.iter().position(|c| *c).unwrap_or(0);

    // Interleaved, so all see the same machine; at least 3 runs each.
    let mut times = vec![Vec::new(); entrants.len()];
    let started = Instant::now();
    while times[lead].len() < 3
        || (started.elapsed().as_millis() < budget && times[lead].len() < 200)
    {
        for (k, (runner, input, _)) in runs.iter_mut().enumerate() {
            if times[k].len() >= 3 && !candidates[k] {
                continue;
            }
            let t0 = Instant::now();
            runner
                .run(input.clone())
                .map_err(|err| format!("{}: {err}", label(&entrants[k])))?;
            times[k].push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(entrants
        .iter()
        .zip(times.iter_mut())
        .zip(verdicts)
        .enumerate()
        .map(|(k, ((e, t), (diff, verdict)))| {
            let is_ref = k == reference;
            Measurement {
                runs_on: e.engine.runs_on().to_owned(),
                variant: e.engine.variant().map(str::to_owned),
                p50_ms: median(t),
                runs: t.len(),
                max_abs_diff: (!is_ref).then_some(diff),
                agrees: (!is_ref).then_some(verdict.is_none()),
                detail: match (is_ref, e.serves) {
                    (true, true) => Some("reference".into()),
                    (true, false) => Some("reference only (cpu is not in providers)".into()),
                    (false, _) => verdict,
                },
            }
        })
        .collect())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Deterministic inputs: the data input over its whole range (int8/uint8)
/// or [-1, 1] (floats), every other input (recurrent state) zeros.
pub fn probe(inputs: &[Fact], data: Option<usize>) -> Result<TVec<TValue>, String> {
    let mut rng = fastrand::Rng::with_seed(0x0ED6E);
    inputs
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let shape = &f.info.shape;
            let n: usize = shape.iter().product();
            let tensor = if Some(i) != data {
                Tensor::zero_dt(f.datum.unquantized(), shape)
            } else {
                match f.datum.unquantized() {
                    DatumType::F32 => Tensor::from_shape(
                        shape,
                        &(0..n).map(|_| rng.f32() * 2.0 - 1.0).collect::<Vec<_>>(),
                    ),
                    DatumType::I8 => {
                        Tensor::from_shape(shape, &(0..n).map(|_| rng.i8(..)).collect::<Vec<_>>())
                    }
                    DatumType::U8 => {
                        Tensor::from_shape(shape, &(0..n).map(|_| rng.u8(..)).collect::<Vec<_>>())
                    }
                    other => Tensor::zero_dt(other, shape),
                }
            };
            tensor.map(|t| t.into_tvalue()).map_err(|e| e.to_string())
        })
        .collect()
}

/// The largest |difference| of one engine's outputs (`facts_t`, `out_t`)
/// from the reference's (dequantized) and, when an output is out of
/// tolerance or a classifier's top-1 differs, why.
fn compare(
    facts_t: &[Fact],
    out_t: &[TValue],
    facts_o: &[Fact],
    out_o: &[TValue],
    manifest: &Manifest,
    graph: &GraphFacts,
) -> (f32, Option<String>) {
    let mut max_diff = 0f32;
    let mut verdict = None;
    // The output a classifier's top-1 is read from.
    let read = manifest
        .output
        .name
        .as_deref()
        .or(facts_o.first().map(|f| f.info.name.as_str()));
    for (fo, vo) in facts_o.iter().zip(out_o) {
        let Some(ix) = facts_t.iter().position(|f| f.info.name == fo.info.name) else {
            verdict.get_or_insert(format!("no output {}", fo.info.name));
            continue;
        };
        let vt = &out_t[ix];
        let quant = graph.output_quant.get(&fo.info.name).copied();
        let (Ok(a), Ok(b)) = (dequantized(vt, quant), dequantized(vo, quant)) else {
            continue;
        };
        if a.len() != b.len() {
            verdict.get_or_insert(format!(
                "output {} has {} values, {} on the reference",
                fo.info.name,
                a.len(),
                b.len()
            ));
            continue;
        }
        let diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            // f32::max would drop a NaN: keep it, it is a disagreement.
            .fold(0f32, |m, d| {
                if d.is_nan() || m.is_nan() {
                    f32::NAN
                } else {
                    m.max(d)
                }
            });
        max_diff = if diff.is_nan() {
            diff
        } else {
            max_diff.max(diff)
        };
        let allowed = match step(vt, quant) {
            // One quantization step (and a hair for float rounding).
            Some(step) => step * 1.001,
            None => FLOAT_ATOL + FLOAT_RTOL * b.iter().fold(0f32, |m, x| m.max(x.abs())),
        };
        // NaN on either side is a disagreement too.
        if diff.is_nan() || diff > allowed {
            verdict.get_or_insert(format!(
                "output {}: max |difference| {diff} over the {allowed} allowed",
                fo.info.name
            ));
        }

        if manifest.output.kind == OutputKind::Classification && Some(fo.info.name.as_str()) == read
        {
            let top = |v: &[f32]| {
                v.iter()
                    .enumerate()
                    .max_by(|x, y| x.1.total_cmp(y.1))
                    .map(|(i, _)| i)
            };
            if top(&a) != top(&b) {
                verdict.get_or_insert(format!(
                    "top-1 class {:?}, {:?} on the reference",
                    top(&a),
                    top(&b)
                ));
            }
        }
    }
    (max_diff, verdict)
}

/// The value of one quantization step of an int8/uint8 output.
fn step(value: &TValue, quant: Option<QuantParams>) -> Option<f32> {
    let dt = value.datum_type();
    if !matches!(dt.unquantized(), DatumType::I8 | DatumType::U8) {
        return None;
    }
    match (quant, dt.zp_scale()) {
        (Some(q), _) => Some(q.scale),
        (None, (_, s)) if dt.is_quantized() => Some(s),
        _ => Some(1.0),
    }
}

/// The values of an output as f32, dequantized where it is int8/uint8.
pub fn dequantized(value: &TValue, quant: Option<QuantParams>) -> Result<Vec<f32>, ModelErrorKind> {
    let bad = |e: TractError| ModelErrorKind::Inference(super::chain(&e));
    let dt = value.datum_type();
    let (scale, zp) = match (quant, dt.zp_scale()) {
        (Some(q), _) => (q.scale, q.zero_point as f32),
        (None, (z, s)) if dt.is_quantized() => (s, z as f32),
        _ => (1.0, 0.0),
    };
    let plain = value.cast_to_dt(dt.unquantized()).map_err(bad)?;
    Ok(match dt.unquantized() {
        DatumType::F32 => backend::plain_slice::<f32>(&plain).map_err(bad)?.to_vec(),
        DatumType::I8 => backend::plain_slice::<i8>(&plain)
            .map_err(bad)?
            .iter()
            .map(|q| (*q as f32 - zp) * scale)
            .collect(),
        DatumType::U8 => backend::plain_slice::<u8>(&plain)
            .map_err(bad)?
            .iter()
            .map(|q| (*q as f32 - zp) * scale)
            .collect(),
        _ => {
            let cast = plain.cast_to::<f32>().map_err(bad)?;
            backend::plain_slice::<f32>(&cast).map_err(bad)?.to_vec()
        }
    })
}

/// Decisions are valid for one model file, one pair of engine versions,
/// one CPU and one set of engine options.
fn cache_key(sha256: &str, ort_version: &str, options: &EngineOptions) -> String {
    format!(
        "{sha256} edgeinfer-{} onnxruntime-{ort_version} cpu={} providers={} strict={} threads={}",
        env!("CARGO_PKG_VERSION"),
        cpu_identity(),
        options.providers.join(","),
        options.strict,
        options.threads
    )
}

/// The CPU model (x86: `model name`; ARM: implementer and part) and the
/// number of CPUs this process may use.
pub fn cpu_identity() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |k: &str| {
        info.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.trim().to_owned())
    };
    let model = field("model name")
        .or_else(|| {
            Some(format!(
                "{}/{}",
                field("CPU implementer")?,
                field("CPU part")?
            ))
        })
        .unwrap_or_else(|| std::env::consts::ARCH.into());
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{model} x{n}")
}

fn cache_file(options: &EngineOptions) -> Option<PathBuf> {
    options
        .cache_dir
        .as_ref()
        .map(|d| d.join("engine-choices.json"))
}

fn read_cache(file: &Path) -> BTreeMap<String, EngineReport> {
    std::fs::read(file)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn write_cache(file: &Path, all: &BTreeMap<String, EngineReport>) -> std::io::Result<()> {
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = file.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(all)?)?;
    std::fs::rename(tmp, file)
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
