//! Models: a manifest plus an ONNX file, loaded and optimised with tract.
//!
//! A loaded [`Model`] is shared (`Arc`) between worker threads; each worker
//! owns a [`Session`] (tract state, whose buffers are reused across calls).
//! Panics inside tract, at load or at inference, are caught and become
//! errors: a bad model never takes the daemon down.

pub mod backend;
pub mod choice;
pub(crate) mod fold;
pub mod graph;
pub(crate) mod kernels;
mod lower;
pub mod manifest;
mod names;
mod qdq;
mod session;
#[cfg(test)]
pub(crate) mod test_graphs;

pub use backend::{BackendChoice, EngineOptions, NodeTime, RuntimeStatus};
pub use choice::EngineReport;
pub use graph::{GraphFacts, QuantParams};
pub use manifest::{AnomalyScore, Manifest, OutputKind};
pub use session::Session;

use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tract_onnx::prelude::*;

#[derive(Debug, thiserror::Error)]
#[error("model {model}: {kind}")]
pub struct ModelError {
    pub model: String,
    pub kind: ModelErrorKind,
}

#[derive(Debug, thiserror::Error)]
pub enum ModelErrorKind {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("manifest {path}: {message}")]
    Manifest { path: PathBuf, message: String },
    #[error("{path}: expected a model manifest (.toml) or an ONNX file (.onnx)")]
    UnknownFormat { path: PathBuf },
    #[error("checksum mismatch: manifest says sha256 {expected}, {path} has {actual}")]
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("not a readable ONNX model (truncated, corrupt or another format): {0}")]
    Corrupt(String),
    #[error("unsupported operator(s): {0}")]
    UnsupportedOperators(String),
    #[error("{0}")]
    Engine(String),
    #[error("the inference engine panicked while {stage}: {message}")]
    Panic {
        stage: &'static str,
        message: String,
    },
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("inference failed: {0}")]
    Inference(String),
}

/// Element type of a model input or output, as edgeinfer handles it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElemType {
    F32,
    I8,
    U8,
}

impl ElemType {
    fn of(dt: DatumType) -> Option<ElemType> {
        match dt.unquantized() {
            DatumType::F32 => Some(ElemType::F32),
            DatumType::I8 => Some(ElemType::I8),
            DatumType::U8 => Some(ElemType::U8),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ElemType::F32 => "f32",
            ElemType::I8 => "i8",
            ElemType::U8 => "u8",
        }
    }
}

/// Name, concrete shape and element type of a graph input or output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: String,
}

impl TensorInfo {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Display for TensorInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}{:?}", self.name, self.dtype, self.shape)
    }
}

pub struct Model {
    pub name: String,
    /// The ONNX file.
    pub path: PathBuf,
    pub sha256: String,
    pub manifest: Manifest,
    pub inputs: Vec<TensorInfo>,
    pub outputs: Vec<TensorInfo>,
    /// Element type of the (single) input that edgeinfer feeds.
    pub input_type: ElemType,
    /// Index of the output that postprocessing reads.
    pub output_index: usize,
    /// Index (in `inputs`) of the input fed with data.
    pub data_input: usize,
    /// (input, output) index pairs of recurrent state, fed back per source.
    pub state_io: Vec<(usize, usize)>,
    /// The state a new source starts from: zeros.
    pub initial_state: Vec<Tensor>,
    /// Quantization of the fed input (int8/uint8): the manifest's, else the graph's.
    pub input_quant: Option<QuantParams>,
    /// Quantization of each output (manifest for the read one, else the graph's).
    pub output_quant: Vec<Option<QuantParams>>,
    /// What was learnt from the graph and rewritten in it at load.
    pub graph: GraphFacts,
    /// Dimensions defaulted to 1 and inputs or outputs with no elements: a
    /// model loaded so may "run" in microseconds on nothing.
    pub warnings: Vec<String>,
    pub load_ms: f64,
    /// Where the model runs and why there.
    pub placement: EngineReport,
    engine: Arc<dyn backend::Engine>,
}

impl fmt::Debug for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Model")
            .field("name", &self.name)
            .field("path", &self.path)
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .finish_non_exhaustive()
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic payload".into())
}

/// Formats a tract error with its whole cause chain on one line, so the
/// operator and node named deep in the chain reach the user.
fn chain(e: &TractError) -> String {
    e.chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}

impl Model {
    /// Loads a manifest (`*.toml`) or a bare `.onnx` (with `NAME.toml` beside
    /// it used as its manifest when present).
    pub fn load(path: &Path) -> Result<Model, ModelError> {
        Model::load_with(path, &EngineOptions::default())
    }

    /// Loads a model onto the engine `options` choose (see [`choice`]).
    pub fn load_with(path: &Path, options: &EngineOptions) -> Result<Model, ModelError> {
        let started = Instant::now();
        let (manifest, onnx_path, name) = locate(path)?;
        let err = |kind| ModelError {
            model: name.clone(),
            kind,
        };

        let bytes = std::fs::read(&onnx_path).map_err(|source| {
            err(ModelErrorKind::Read {
                path: onnx_path.clone(),
                source,
            })
        })?;
        let sha256 = hex(&Sha256::digest(&bytes));
        if let Some(expected) = &manifest.sha256 {
            if !expected.eq_ignore_ascii_case(&sha256) {
                return Err(err(ModelErrorKind::Checksum {
                    path: onnx_path,
                    expected: expected.clone(),
                    actual: sha256,
                }));
            }
        }

        // The graph is decoded once. Edits both engines need (`[[constant]]`
        // inputs become initializers, ZipMaps are dropped) are re-encoded
        // for ONNX Runtime; tract's own preparation comes after.
        let mut proto = backend::tract::decode(&bytes).map_err(err)?;
        let neutral = engine_neutral(&mut proto, &manifest, path).map_err(err)?;
        let bytes = if neutral.is_empty() {
            bytes
        } else {
            prost::Message::encode_to_vec(&proto)
        };
        let mut graph = graph::prepare(&mut proto);
        graph.rewrites.splice(0..0, neutral);
        let facts = choice::ModelFacts {
            bytes: &bytes,
            proto: &proto,
            manifest: &manifest,
            sha256: &sha256,
        };
        let placed = choice::place(&facts, &mut graph, options)
            .map_err(|e| err(with_defaults_hint(e, &proto, &manifest)))?;
        let engine = placed.engine;
        let inputs: Vec<TensorInfo> = engine.inputs().iter().map(|f| f.info.clone()).collect();
        let outputs: Vec<TensorInfo> = engine.outputs().iter().map(|f| f.info.clone()).collect();
        let (state_io, data_input) =
            bind_inputs(&manifest, &inputs, &outputs, path).map_err(err)?;
        let initial_state = state_io
            .iter()
            .map(|(i, _)| {
                Tensor::zero_dt(engine.inputs()[*i].datum, &inputs[*i].shape)
                    .map_err(|e| err(ModelErrorKind::Engine(chain(&e))))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let input_dt = engine.inputs()[data_input].datum;
        let input_type = ElemType::of(input_dt).ok_or_else(|| {
            err(ModelErrorKind::Unsupported(format!(
                "input {} has type {input_dt:?}; f32, i8 and u8 are supported",
                inputs[data_input].name
            )))
        })?;
        let input_quant = match manifest.preprocess.quant_scale {
            Some(scale) => Some(QuantParams {
                scale,
                zero_point: manifest.preprocess.zero_point.unwrap_or(0),
            }),
            None => graph.input_quant.get(&inputs[data_input].name).copied(),
        };
        if input_type != ElemType::F32 && input_quant.is_none() {
            return Err(err(ModelErrorKind::Manifest {
                path: path.to_owned(),
                message: format!(
                    "input {} is {} and the graph does not say how it is quantized: give preprocess.quant_scale and zero_point",
                    inputs[data_input].name,
                    input_type.as_str()
                ),
            }));
        }
        let output_index =
            check_output(&manifest, &inputs, &outputs, data_input, &state_io, path).map_err(err)?;
        let warnings = degenerate(
            &proto,
            &manifest,
            &inputs[data_input].name,
            &inputs,
            &outputs,
        );
        for w in &warnings {
            tracing::warn!(model = %name, "{w}");
        }

        let output_quant = outputs
            .iter()
            .enumerate()
            .map(
                |(i, o)| match (i == output_index, manifest.output.quant_scale) {
                    (true, Some(scale)) => Some(QuantParams {
                        scale,
                        zero_point: manifest.output.zero_point.unwrap_or(0),
                    }),
                    _ => graph.output_quant.get(&o.name).copied(),
                },
            )
            .collect();
        Ok(Model {
            name,
            path: onnx_path,
            sha256,
            manifest,
            inputs,
            outputs,
            input_type,
            output_quant,
            output_index,
            data_input,
            state_io,
            initial_state,
            input_quant,
            graph,
            warnings,
            load_ms: started.elapsed().as_secs_f64() * 1e3,
            placement: placed.report,
            engine,
        })
    }

    pub fn input(&self) -> &TensorInfo {
        &self.inputs[self.data_input]
    }

    pub fn output(&self) -> &TensorInfo {
        &self.outputs[self.output_index]
    }

    /// What the model runs on: `tract-cpu`, `onnxruntime-cpu`, …
    pub fn runs_on(&self) -> &str {
        self.engine.runs_on()
    }

    pub fn session(self: &Arc<Self>) -> Result<Session, ModelError> {
        let runner = self.engine.runner().map_err(|kind| ModelError {
            model: self.name.clone(),
            kind,
        })?;
        Ok(Session {
            model: Arc::clone(self),
            runner,
        })
    }
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Every model a configuration names, loaded once each (pipelines sharing a
/// model file and engine options share the loaded model).
#[derive(Default)]
pub struct Registry {
    models: HashMap<(PathBuf, EngineOptions), Result<Arc<Model>, Arc<ModelError>>>,
}

impl Registry {
    pub fn get_or_load(
        &mut self,
        path: &Path,
        options: &EngineOptions,
    ) -> Result<Arc<Model>, Arc<ModelError>> {
        let key = path.canonicalize().unwrap_or_else(|_| path.to_owned());
        self.models
            .entry((key, options.clone()))
            .or_insert_with(|| {
                Model::load_with(path, options)
                    .map(Arc::new)
                    .map_err(Arc::new)
            })
            .clone()
    }
}

/// The manifest, the ONNX file and the model's name for a manifest or a
/// bare `.onnx` path (with a `NAME.toml` beside it used when present); the
/// manifest's own problems are errors here.
pub fn locate(path: &Path) -> Result<(Manifest, PathBuf, String), ModelError> {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let err = |name: &str, kind| ModelError {
        model: name.to_owned(),
        kind,
    };
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let (manifest, onnx_path) = match ext {
        "toml" => {
            let manifest = Manifest::load(path).map_err(|message| {
                err(
                    &stem,
                    ModelErrorKind::Manifest {
                        path: path.to_owned(),
                        message,
                    },
                )
            })?;
            let file = manifest
                .file
                .clone()
                .unwrap_or_else(|| PathBuf::from(format!("{stem}.onnx")));
            let onnx = path.parent().unwrap_or(Path::new(".")).join(file);
            (manifest, onnx)
        }
        "onnx" => {
            let beside = path.with_extension("toml");
            let manifest = if beside.is_file() {
                Manifest::load(&beside).map_err(|message| {
                    err(
                        &stem,
                        ModelErrorKind::Manifest {
                            path: beside.clone(),
                            message,
                        },
                    )
                })?
            } else {
                Manifest::default()
            };
            (manifest, path.to_owned())
        }
        _ => {
            return Err(err(
                &stem,
                ModelErrorKind::UnknownFormat {
                    path: path.to_owned(),
                },
            ))
        }
    };
    let name = manifest.name.clone().unwrap_or(stem);
    let problems = manifest.problems();
    if !problems.is_empty() {
        return Err(ModelError {
            model: name,
            kind: ModelErrorKind::Manifest {
                path: path.to_owned(),
                message: problems.join("; "),
            },
        });
    }
    Ok((manifest, onnx_path, name))
}

/// Graph inputs' dimensions that are symbolic or open, as `d (name)`.
fn open_dims(proto: &tract_onnx::pb::ModelProto) -> Vec<(String, Vec<String>)> {
    use tract_onnx::pb::{tensor_shape_proto::dimension, type_proto};
    let Some(graph) = &proto.graph else {
        return vec![];
    };
    let inits: std::collections::HashSet<&str> =
        graph.initializer.iter().map(|t| t.name.as_str()).collect();
    graph
        .input
        .iter()
        .filter(|i| !inits.contains(i.name.as_str()))
        .filter_map(|i| {
            let Some(type_proto::Value::TensorType(t)) = i.r#type.as_ref()?.value.as_ref() else {
                return None;
            };
            let open: Vec<String> = t
                .shape
                .as_ref()?
                .dim
                .iter()
                .enumerate()
                .filter_map(|(d, dim)| match &dim.value {
                    Some(dimension::Value::DimValue(_)) => None,
                    Some(dimension::Value::DimParam(p)) if !p.is_empty() => {
                        Some(format!("{d} ({p})"))
                    }
                    _ => Some(format!("{d} (unnamed)")),
                })
                .collect();
            (!open.is_empty()).then(|| (i.name.clone(), open))
        })
        .collect()
}

/// A model that fails to load with dimensions defaulted to 1 says so: a
/// 1 × 1 image is often what makes the engine fail.
fn with_defaults_hint(
    e: ModelErrorKind,
    proto: &tract_onnx::pb::ModelProto,
    manifest: &Manifest,
) -> ModelErrorKind {
    let open = open_dims(proto);
    if manifest.input.shape.is_some() || open.is_empty() {
        return e;
    }
    let hint = format!(
        " (with input dimensions defaulted to 1: {}; give input.shape in the manifest)",
        open.iter()
            .map(|(n, d)| format!("{n} {}", d.join(", ")))
            .collect::<Vec<_>>()
            .join("; ")
    );
    match e {
        ModelErrorKind::Panic { stage, message } => ModelErrorKind::Panic {
            stage,
            message: message + &hint,
        },
        ModelErrorKind::Engine(message) => ModelErrorKind::Engine(message + &hint),
        other => other,
    }
}

/// Which input dimensions were defaulted to 1 (symbolic or open in the
/// graph, and not given by the manifest's input.shape), and which inputs or
/// outputs have no elements at all.
fn degenerate(
    proto: &tract_onnx::pb::ModelProto,
    manifest: &Manifest,
    data_input: &str,
    inputs: &[TensorInfo],
    outputs: &[TensorInfo],
) -> Vec<String> {
    let mut warnings = vec![];
    for (name, open) in open_dims(proto) {
        if name == data_input && manifest.input.shape.is_some() {
            continue;
        }
        let Some(input) = inputs.iter().find(|i| i.name == name) else {
            continue;
        };
        let hint = if name == data_input {
            "; give input.shape in the manifest"
        } else {
            ""
        };
        warnings.push(format!(
            "input {name} dimension(s) {} defaulted to 1, so it runs as {:?}{hint}",
            open.join(", "),
            input.shape
        ));
    }
    for (what, t) in inputs
        .iter()
        .map(|t| ("input", t))
        .chain(outputs.iter().map(|t| ("output", t)))
    {
        if t.is_empty() {
            warnings.push(format!(
                "{what} {} has shape {:?}: no elements, the model computes nothing",
                t.name, t.shape
            ));
        }
    }
    warnings
}

/// Binds the manifest's `[[constant]]` inputs and drops ZipMaps in
/// `proto`; returns a note per edit (none: the graph is as it was).
fn engine_neutral(
    proto: &mut tract_onnx::pb::ModelProto,
    manifest: &Manifest,
    path: &Path,
) -> Result<Vec<String>, ModelErrorKind> {
    fold::bind_constants(proto, &manifest.constant).map_err(|message| {
        ModelErrorKind::Manifest {
            path: path.to_owned(),
            message,
        }
    })?;
    let mut notes: Vec<String> = manifest
        .constant
        .iter()
        .map(|c| {
            format!(
                "input {:?} bound to the constant {:?}",
                c.input,
                c.value.values()
            )
        })
        .collect();
    notes.extend(fold::drop_zipmaps(proto));
    Ok(notes)
}

/// Which inputs and outputs are recurrent state (`[[state]]` pairs) and
/// which input is the data input.
fn bind_inputs(
    manifest: &Manifest,
    inputs: &[TensorInfo],
    outputs: &[TensorInfo],
    path: &Path,
) -> Result<(Vec<(usize, usize)>, usize), ModelErrorKind> {
    let bad_manifest = |message: String| ModelErrorKind::Manifest {
        path: path.to_owned(),
        message,
    };
    let mut state_io = Vec::new();
    for st in &manifest.state {
        let i = inputs.iter().position(|t| t.name == st.input);
        let o = outputs.iter().position(|t| t.name == st.output);
        let (Some(i), Some(o)) = (i, o) else {
            return Err(bad_manifest(format!(
                "state {:?} -> {:?}: the graph has no such input or output",
                st.output, st.input
            )));
        };
        if inputs[i].shape != outputs[o].shape {
            return Err(bad_manifest(format!(
                "state output {} and input {} differ in shape",
                outputs[o], inputs[i]
            )));
        }
        state_io.push((i, o));
    }
    let is_state_input = |i: usize| state_io.iter().any(|(si, _)| *si == i);
    let data_input = match &manifest.input.name {
        Some(name) => inputs
            .iter()
            .position(|t| &t.name == name)
            .filter(|i| !is_state_input(*i))
            .ok_or_else(|| {
                bad_manifest(format!(
                    "input.name {name:?} is not a data input of the graph"
                ))
            })?,
        None => {
            let data: Vec<usize> = (0..inputs.len()).filter(|i| !is_state_input(*i)).collect();
            match data.as_slice() {
                [one] => *one,
                [] => {
                    return Err(ModelErrorKind::Unsupported(
                        "the graph has no input to feed".into(),
                    ))
                }
                _ => {
                    return Err(ModelErrorKind::Unsupported(format!(
                        "{} inputs not declared as [[state]] ({}); edgeinfer feeds one data input per \
                         model: name it with input.name, declare recurrent inputs as [[state]] and \
                         configuration inputs as [[constant]] (several data inputs are not supported)",
                        data.len(),
                        data.iter().map(|i| inputs[*i].name.as_str()).collect::<Vec<_>>().join(", ")
                    )))
                }
            }
        }
    };
    let unfed: Vec<&str> = (0..inputs.len())
        .filter(|i| *i != data_input && !is_state_input(*i))
        .map(|i| inputs[i].name.as_str())
        .collect();
    if !unfed.is_empty() {
        return Err(ModelErrorKind::Unsupported(format!(
            "input(s) {} are neither the data input ({}) nor [[state]]: edgeinfer feeds one data \
             input per model; give a configuration input (a sample rate, say) its value with \
             [[constant]] in the manifest (several data inputs are not supported)",
            unfed.join(", "),
            inputs[data_input].name
        )));
    }
    Ok((state_io, data_input))
}

/// The output that carries the answer, checked against the manifest
/// (labels, reconstruction size) and `input.name`.
fn check_output(
    manifest: &Manifest,
    inputs: &[TensorInfo],
    outputs: &[TensorInfo],
    data_input: usize,
    state_io: &[(usize, usize)],
    path: &Path,
) -> Result<usize, ModelErrorKind> {
    let output_index =
        match &manifest.output.name {
            Some(n) => outputs.iter().position(|o| &o.name == n).ok_or_else(|| {
                ModelErrorKind::Manifest {
                    path: path.to_owned(),
                    message: format!("output.name {n:?} is not an output of the graph"),
                }
            })?,
            None => (0..outputs.len())
                .find(|o| !state_io.iter().any(|(_, so)| so == o))
                .unwrap_or(0),
        };
    if let Some(name) = &manifest.input.name {
        if &inputs[data_input].name != name {
            return Err(ModelErrorKind::Manifest {
                path: path.to_owned(),
                message: format!(
                    "input.name {name:?}, but the graph's input is {:?}",
                    inputs[data_input].name
                ),
            });
        }
    }
    let out = &outputs[output_index];
    let labels = &manifest.output.labels;
    if manifest.output.kind == OutputKind::Classification
        && !labels.is_empty()
        && labels.len() != out.len()
    {
        return Err(ModelErrorKind::Manifest {
            path: path.to_owned(),
            message: format!("{} labels for output {out}", labels.len()),
        });
    }
    if manifest.output.kind == OutputKind::Anomaly
        && manifest.output.score == AnomalyScore::ReconstructionMse
        && out.len() != inputs[data_input].len()
    {
        return Err(ModelErrorKind::Manifest {
            path: path.to_owned(),
            message: format!(
                "score = \"reconstruction_mse\" needs output {out} the size of input {}",
                inputs[data_input]
            ),
        });
    }

    Ok(output_index)
}
