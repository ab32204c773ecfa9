//! tract: from ONNX bytes to an optimised plan (graph preparation in
//! `graph.rs`, a strict load and a relaxed retry), and its runner.

use super::{Engine, Fact, NodeTime, Runner};
use crate::model::graph::{self, GraphFacts};
use crate::model::kernels::OwnOps;
use crate::model::manifest::Manifest;
use crate::model::{chain, panic_message, ModelErrorKind, TensorInfo};
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::SimpleState;
use tract_onnx::tract_hir::infer::Factoid;

pub const RUNS_ON: &str = "tract-cpu";

/// Reads the ONNX protobuf.
pub fn decode(bytes: &[u8]) -> Result<tract_onnx::pb::ModelProto, ModelErrorKind> {
    if bytes.is_empty() {
        return Err(ModelErrorKind::Corrupt("the file is empty".into()));
    }
    tract_onnx::onnx()
        .proto_model_for_read(&mut std::io::Cursor::new(bytes))
        .map_err(|e| ModelErrorKind::Corrupt(chain(&e)))
}

/// A model on tract: the optimised plan, shared by every worker.
pub struct TractEngine {
    plan: Arc<TypedRunnableModel>,
    inputs: Vec<Fact>,
    outputs: Vec<Fact>,
    variant: Option<&'static str>,
}

impl TractEngine {
    /// Loads the prepared graph; notes of relaxed loading go to `facts`.
    pub fn load(
        proto: &tract_onnx::pb::ModelProto,
        manifest: &Manifest,
        facts: &mut GraphFacts,
    ) -> Result<TractEngine, ModelErrorKind> {
        let loaded = catch_unwind(AssertUnwindSafe(|| build_plan(proto, manifest, facts)))
            .map_err(|p| ModelErrorKind::Panic {
                stage: "loading",
                message: panic_message(p),
            })??;
        let model = loaded.model();
        let engine = |e: TractError| ModelErrorKind::Engine(chain(&e));
        // Names are the ONNX graph's, by position: tract keeps inputs and
        // outputs in the graph's order, while its outlet labels may be a
        // folded-away node's (a no-op Cast into an input, an LSTM output).
        let graph = proto.graph.as_ref();
        let initializers: std::collections::HashSet<&str> = graph
            .map(|g| g.initializer.iter().map(|t| t.name.as_str()).collect())
            .unwrap_or_default();
        let onnx_inputs: Vec<&str> = graph
            .map(|g| {
                g.input
                    .iter()
                    .map(|i| i.name.as_str())
                    .filter(|n| !initializers.contains(n))
                    .collect()
            })
            .unwrap_or_default();
        let onnx_outputs: Vec<&str> = graph
            .map(|g| g.output.iter().map(|o| o.name.as_str()).collect())
            .unwrap_or_default();
        let describe = |outlets: &[OutletId],
                        names: &[&str]|
         -> Result<Vec<Fact>, ModelErrorKind> {
            outlets
                .iter()
                .enumerate()
                .map(|(ix, o)| {
                    let fact = model.outlet_fact(*o).map_err(engine)?;
                    let shape = fact.shape.as_concrete().map(|s| s.to_vec()).ok_or_else(|| {
                        ModelErrorKind::Unsupported(format!(
                            "{} has shape {:?} with unresolved dimensions; give input.shape in the manifest",
                            model.node(o.node).name,
                            fact.shape
                        ))
                    })?;
                    let name = match names.get(ix) {
                        Some(n) if names.len() == outlets.len() => n.to_string(),
                        _ => model
                            .outlet_label(*o)
                            .unwrap_or(&model.node(o.node).name)
                            .to_owned(),
                    };
                    Ok(Fact {
                        info: TensorInfo {
                            name,
                            shape,
                            dtype: format!("{:?}", fact.datum_type).to_lowercase(),
                        },
                        datum: fact.datum_type,
                    })
                })
                .collect()
        };
        let inputs = describe(model.input_outlets().map_err(engine)?, &onnx_inputs)?;
        let outputs = describe(model.output_outlets().map_err(engine)?, &onnx_outputs)?;
        Ok(TractEngine {
            plan: loaded,
            inputs,
            outputs,
            variant: None,
        })
    }

    /// Names the form of the graph this engine was loaded from.
    pub fn with_variant(mut self, variant: &'static str) -> TractEngine {
        self.variant = Some(variant);
        self
    }
}

impl Engine for TractEngine {
    fn runs_on(&self) -> &str {
        RUNS_ON
    }

    fn variant(&self) -> Option<&str> {
        self.variant
    }

    fn inputs(&self) -> &[Fact] {
        &self.inputs
    }

    fn outputs(&self) -> &[Fact] {
        &self.outputs
    }

    fn runner(&self) -> Result<Box<dyn Runner>, ModelErrorKind> {
        let state = SimpleState::new(&self.plan).map_err(|e| ModelErrorKind::Engine(chain(&e)))?;
        Ok(Box::new(TractRunner {
            plan: Arc::clone(&self.plan),
            state,
        }))
    }
}

/// tract state of one worker: its buffers are reused across calls.
struct TractRunner {
    plan: Arc<TypedRunnableModel>,
    state: TypedSimpleState,
}

impl Runner for TractRunner {
    fn run(&mut self, inputs: TVec<TValue>) -> Result<TVec<TValue>, ModelErrorKind> {
        match catch_unwind(AssertUnwindSafe(|| self.state.run(inputs))) {
            Ok(Ok(outputs)) => Ok(outputs),
            Ok(Err(e)) => Err(ModelErrorKind::Inference(chain(&e))),
            Err(panic) => self.after_panic(panic),
        }
    }

    fn profile(
        &mut self,
        inputs: TVec<TValue>,
        nodes: &mut Vec<NodeTime>,
    ) -> Result<bool, ModelErrorKind> {
        let model = self.plan.model();
        if nodes.len() < model.nodes().len() {
            nodes.resize(model.nodes().len(), NodeTime::default());
        }
        let run = || {
            self.state
                .run_plan_with_eval(inputs, |ctx, state, node, input| {
                    let t = std::time::Instant::now();
                    let out = tract_onnx::tract_core::plan::eval(ctx, state, node, input);
                    let slot = &mut nodes[node.id];
                    if slot.op.is_empty() {
                        slot.op = node.op.name().into_owned();
                        slot.node = node.name.clone();
                    }
                    slot.total += t.elapsed();
                    out
                })
        };
        match catch_unwind(AssertUnwindSafe(run)) {
            Ok(Ok(_)) => Ok(true),
            Ok(Err(e)) => Err(ModelErrorKind::Inference(chain(&e))),
            Err(panic) => self.after_panic(panic),
        }
    }
}

impl TractRunner {
    /// The state may be half-updated after a panic: start from a fresh one.
    fn after_panic<T>(
        &mut self,
        panic: Box<dyn std::any::Any + Send>,
    ) -> Result<T, ModelErrorKind> {
        self.state = SimpleState::new(&self.plan).map_err(|e| ModelErrorKind::Engine(chain(&e)))?;
        Err(ModelErrorKind::Panic {
            stage: "running",
            message: panic_message(panic),
        })
    }
}

fn build_plan(
    proto: &tract_onnx::pb::ModelProto,
    manifest: &Manifest,
    facts: &mut GraphFacts,
) -> Result<Arc<TypedRunnableModel>, ModelErrorKind> {
    let loader = tract_onnx::onnx();
    let unknown = graph::unsupported_operators(proto, |op| loader.op_register.0.contains_key(op));
    if !unknown.is_empty() {
        let mut message = unknown.join(", ");
        if !facts.not_lowered.is_empty() {
            message = format!("{message} ({})", facts.not_lowered.join("; "));
        }
        return Err(ModelErrorKind::UnsupportedOperators(message));
    }
    let folded = if facts.data_branches.is_empty() {
        None
    } else {
        fold_shape_branches(&loader, proto, manifest, facts)
    };
    let proto = folded.as_ref().unwrap_or(proto);
    let (plan, ours) = match plan_from_proto(&loader, proto, manifest) {
        Ok(loaded) => loaded,
        Err(strict) => {
            // Some exporters declare value info or output shapes that tract
            // disagrees with; such models often load once those are ignored.
            let relaxed = tract_onnx::onnx()
                .with_ignore_value_info(true)
                .with_ignore_output_shapes(true);
            let loaded = plan_from_proto(&relaxed, proto, manifest)
                .map_err(|_| with_branch_hint(strict, facts))?;
            facts
                .rewrites
                .push("loaded ignoring the graph's declared value info and output shapes".into());
            loaded
        }
    };
    facts.rewrites.extend(ours.notes());
    Ok(plan)
}

/// A load failure in a graph that branches on data says so: tract analyses
/// both branches of an `If` together and refuses them when their shapes
/// differ, which is the usual reason such a graph does not load.
fn with_branch_hint(e: ModelErrorKind, facts: &GraphFacts) -> ModelErrorKind {
    match e {
        ModelErrorKind::Engine(msg) if !facts.data_branches.is_empty() => {
            ModelErrorKind::Engine(format!(
                "{msg} — the graph branches on data at If node(s) {}: tract analyses both branches \
                 together; if the condition is a configuration input (a sample rate, say), feed it \
                 with [[constant]] in the manifest so the branch folds at load, else ONNX Runtime \
                 runs the graph (backend = \"auto\")",
                facts.data_branches.join(", ")
            ))
        }
        other => other,
    }
}

/// The data input's shape from the manifest's `input.shape`, before tract
/// analyses the graph: dimensions the graph leaves open (neither a value
/// nor a name, as PaddleOCR and SCRFD exports have) and symbolic ones
/// (`height`, `N`). tract cannot analyse a source without a determined fact,
/// and with symbols it cannot always fold the shape arithmetic exporters
/// write (Shape → Cast → Mul → Floor → Cast → Resize sizes, say); with
/// values it folds them to constants. Values the graph gives are kept, so
/// the checks after typing still report a manifest that disagrees; a symbol
/// the manifest would give two values stays a symbol for the same reason.
fn fill_open_dims(model: &mut InferenceModel, manifest: &Manifest) -> TractResult<()> {
    let Some(wanted) = &manifest.input.shape else {
        return Ok(());
    };
    let outlets = model.input_outlets()?.to_vec();
    let names: Vec<String> = outlets
        .iter()
        .map(|o| {
            model
                .outlet_label(*o)
                .unwrap_or(&model.node(o.node).name)
                .to_owned()
        })
        .collect();
    let Some(ix) = manifest.data_input_index(&names) else {
        return Ok(());
    };
    let fact = model.input_fact(ix)?.clone();
    let Some(dt) = fact.datum_type.concretize() else {
        return Ok(());
    };
    let dims: Vec<Option<TDim>> = fact.shape.dims().map(|d| d.concretize()).collect();
    let is_value = |d: &Option<TDim>| matches!(d, Some(TDim::Val(_)));
    if !fact.shape.is_open() && (dims.len() != wanted.len() || dims.iter().all(is_value)) {
        return Ok(());
    }
    let mut symbols: HashMap<TDim, usize> = HashMap::new();
    for (d, w) in dims.iter().zip(wanted) {
        if let Some(sym) = d.as_ref().filter(|d| !matches!(d, TDim::Val(_))) {
            if *symbols.entry(sym.clone()).or_insert(*w) != *w {
                return Ok(());
            }
        }
    }
    let shape: TVec<TDim> = wanted
        .iter()
        .enumerate()
        .map(|(i, w)| match dims.get(i) {
            Some(Some(TDim::Val(v))) => TDim::Val(*v),
            _ => TDim::Val(*w as i64),
        })
        .collect();
    model.set_input_fact(ix, InferenceFact::dt_shape(dt, shape))?;
    // The other inputs (recurrent state) share the data input's symbols (a
    // batch, say): the same values; their other open or symbolic
    // dimensions are 1, as they would be after typing.
    for other in (0..outlets.len()).filter(|i| *i != ix) {
        let fact = model.input_fact(other)?.clone();
        let Some(dt) = fact.datum_type.concretize() else {
            continue;
        };
        if fact.shape.is_open() {
            continue;
        }
        let dims: Vec<Option<TDim>> = fact.shape.dims().map(|d| d.concretize()).collect();
        if dims.iter().all(is_value) {
            continue;
        }
        let shape: TVec<TDim> = dims
            .iter()
            .map(|d| match d {
                Some(TDim::Val(v)) => TDim::Val(*v),
                Some(sym) => TDim::Val(symbols.get(sym).map_or(1, |w| *w as i64)),
                None => TDim::Val(1),
            })
            .collect();
        model.set_input_fact(other, InferenceFact::dt_shape(dt, shape))?;
    }
    Ok(())
}

/// `If` nodes whose condition tract's analysis finds constant once the
/// input shapes are set (Silero VAD branches on `x.shape[0] == 1` and on
/// the state's batch dimension) are folded on the ONNX graph, over as many
/// rounds as folding one makes another's condition known.
fn fold_shape_branches(
    loader: &tract_onnx::Onnx,
    proto: &tract_onnx::pb::ModelProto,
    manifest: &Manifest,
    facts: &mut GraphFacts,
) -> Option<tract_onnx::pb::ModelProto> {
    let mut folded: Option<tract_onnx::pb::ModelProto> = None;
    for _ in 0..8 {
        let current = folded.as_ref().unwrap_or(proto);
        let graph = current.graph.as_ref()?;
        let conditions: Vec<String> = graph
            .node
            .iter()
            .filter(|n| n.op_type == "If")
            .filter_map(|n| n.input.first().cloned())
            .collect();
        if conditions.is_empty() {
            break;
        }
        let mut inference = loader.model_for_proto_model(current).ok()?;
        fill_open_dims(&mut inference, manifest).ok()?;
        let _ = inference.analyse(true);
        let mut known = HashMap::new();
        for c in &conditions {
            let Some(outlet) = inference.find_outlet_label(c) else {
                continue;
            };
            let Ok(fact) = inference.outlet_fact(outlet) else {
                continue;
            };
            let value = fact.value.concretize().and_then(|t| {
                let t = t.cast_to::<f64>().ok()?.into_owned();
                t.try_as_plain_ram()
                    .ok()?
                    .as_slice::<f64>()
                    .ok()?
                    .first()
                    .copied()
            });
            if let Some(v) = value {
                known.insert(c.clone(), v);
            }
        }
        if known.is_empty() {
            break;
        }
        let mut next = current.clone();
        let (notes, left) = crate::model::fold::fold_ifs_given(next.graph.as_mut()?, &known);
        if notes.is_empty() {
            break;
        }
        facts.rewrites.extend(notes);
        facts.data_branches = left;
        folded = Some(next);
    }
    folded
}

fn plan_from_proto(
    loader: &tract_onnx::Onnx,
    proto: &tract_onnx::pb::ModelProto,
    manifest: &Manifest,
) -> Result<(Arc<TypedRunnableModel>, OwnOps), ModelErrorKind> {
    let engine = |e: TractError| ModelErrorKind::Engine(chain(&e));
    let mut inference = loader.model_for_proto_model(proto).map_err(engine)?;
    fill_open_dims(&mut inference, manifest).map_err(engine)?;
    let typed = inference.into_typed().map_err(engine)?;
    // Symbolic dimensions (a batch `N`, say) become concrete: from the
    // manifest's input.shape where it gives one, else 1.
    let mut subs = HashMap::new();
    let outlets = typed.input_outlets().map_err(engine)?.to_vec();
    let label = |o: &OutletId| {
        typed
            .outlet_label(*o)
            .unwrap_or(&typed.node(o.node).name)
            .to_owned()
    };
    let is_state = |name: &str| manifest.state.iter().any(|s| s.input == name);
    let data_ix = match &manifest.input.name {
        Some(n) => outlets.iter().position(|o| &label(o) == n),
        None => outlets.iter().position(|o| !is_state(&label(o))),
    };
    for (ix, outlet) in outlets.iter().enumerate() {
        let fact = typed.outlet_fact(*outlet).map_err(engine)?;
        let wanted = if Some(ix) == data_ix {
            manifest.input.shape.as_deref()
        } else {
            None
        };
        if let Some(w) = wanted {
            if w.len() != fact.rank() {
                return Err(ModelErrorKind::Unsupported(format!(
                    "manifest input.shape {w:?} has rank {}, the graph's input has shape {:?}",
                    w.len(),
                    fact.shape
                )));
            }
        }
        for (d, dim) in fact.shape.iter().enumerate() {
            let want = wanted.map(|w| w[d]);
            match (dim.as_i64(), want) {
                (Some(have), Some(want)) if have as usize != want => {
                    return Err(ModelErrorKind::Unsupported(format!(
                        "manifest input.shape {:?} disagrees with the graph's input shape {:?}",
                        wanted.unwrap_or_default(),
                        fact.shape
                    )));
                }
                (Some(_), _) => {}
                (None, want) => {
                    for sym in dim.symbols() {
                        subs.entry(sym)
                            .or_insert_with(|| TDim::Val(want.unwrap_or(1) as i64));
                    }
                }
            }
        }
    }
    let typed = if subs.is_empty() {
        typed
    } else {
        typed.set_symbols(&subs).map_err(engine)?
    };
    let mut typed = typed.into_decluttered().map_err(engine)?;
    let mut ours = OwnOps::default();
    ours.substitute_decluttered(&mut typed).map_err(engine)?;
    let mut optimized = typed.into_optimized().map_err(engine)?;
    ours.substitute_optimized(&mut optimized).map_err(engine)?;
    Ok((optimized.into_runnable().map_err(engine)?, ours))
}
