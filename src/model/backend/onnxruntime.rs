//! ONNX Runtime, loaded at run time (`ort` with `load-dynamic`), with its
//! execution providers tried in the configured order.
//!
//! Nothing here panics when the library is missing or too old: loading goes
//! through `ort::init_from`, which returns an error (the implicit load on
//! first use would panic), and every later `ort` call happens only once that
//! has succeeded. One library per process: the first one loaded stays.

use super::{EngineOptions, Fact, Runner, RuntimeStatus};
use crate::model::{ModelErrorKind, TensorInfo};
use ort::ep::{self, ExecutionProvider, ExecutionProviderDispatch};
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::{Session as OrtSession, SessionInputValue};
use ort::value::{TensorElementType, TensorRef, ValueType};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tract_onnx::prelude::*;

/// The loaded library and its environment.
struct Runtime {
    env: ort::environment::Environment,
    version: String,
    library: PathBuf,
}

static RUNTIME: Mutex<Option<Arc<Runtime>>> = Mutex::new(None);
/// Why the last attempt to load it failed.
static LAST_FAILURE: Mutex<Option<String>> = Mutex::new(None);

/// Where a `libonnxruntime.so` is looked for when the config names none
/// and `ORT_DYLIB_PATH` is unset: the dynamic loader's own search
/// (`LD_LIBRARY_PATH`, ld.so.cache) and the places packages and
/// `make install` put it.
const USUAL_PLACES: &[&str] = &[
    "libonnxruntime.so",
    "/usr/local/lib/libonnxruntime.so",
    "/usr/lib/libonnxruntime.so",
    "/usr/lib/aarch64-linux-gnu/libonnxruntime.so",
    "/usr/lib/x86_64-linux-gnu/libonnxruntime.so",
    "/opt/onnxruntime/lib/libonnxruntime.so",
];

/// Loads the library (first call) or returns the loaded one.
fn runtime(library: Option<&Path>) -> Result<Arc<Runtime>, String> {
    let mut loaded = RUNTIME.lock().expect("onnxruntime lock");
    if let Some(rt) = loaded.as_ref() {
        if let Some(wanted) = library.filter(|w| *w != rt.library) {
            tracing::warn!(
                wanted = %wanted.display(),
                loaded = %rt.library.display(),
                "ONNX Runtime is already loaded from another library; restart to switch"
            );
        }
        return Ok(Arc::clone(rt));
    }
    let candidates: Vec<PathBuf> = match (library, std::env::var_os("ORT_DYLIB_PATH")) {
        (Some(path), _) => vec![path.to_owned()],
        (None, Some(env)) if !env.is_empty() => vec![PathBuf::from(env)],
        _ => USUAL_PLACES.iter().map(PathBuf::from).collect(),
    };
    let mut failures = Vec::new();
    for path in &candidates {
        match ort::init_from(path) {
            Ok(builder) => {
                let env = builder
                    .with_name("edgeinfer")
                    .with_telemetry(false)
                    .build()
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                let rt = Arc::new(Runtime {
                    env,
                    version: version_of_file(path),
                    library: path.clone(),
                });
                tracing::info!(library = %path.display(), version = %rt.version, "ONNX Runtime loaded");
                *loaded = Some(Arc::clone(&rt));
                return Ok(rt);
            }
            Err(e) => failures.push(load_error(&e)),
        }
    }
    let reason = match (library, candidates.len()) {
        (Some(_), _) | (None, 1) => failures.join("; "),
        _ => format!(
            "no libonnxruntime.so found (set engine.onnxruntime_library or ORT_DYLIB_PATH; looked in {})",
            USUAL_PLACES.join(", ")
        ),
    };
    *LAST_FAILURE.lock().expect("onnxruntime lock") = Some(reason.clone());
    Err(reason)
}

/// `ort`'s message plus the dynamic loader's own reason (libloading keeps
/// dlerror's text as the error's source: "dlopen failed" alone says little).
fn load_error(e: &ort::LoadDynamicError) -> String {
    match e {
        ort::LoadDynamicError::Dlopen { error, path } => {
            let why = std::error::Error::source(error)
                .map(|s| s.to_string())
                .unwrap_or_else(|| error.to_string());
            format!("cannot load {}: {why}", path.display())
        }
        other => other.to_string(),
    }
}

/// The status without trying to load anything.
pub fn seen() -> RuntimeStatus {
    let loaded = RUNTIME.lock().expect("onnxruntime lock").is_some();
    if loaded {
        return status(None);
    }
    RuntimeStatus {
        reason: Some(
            LAST_FAILURE
                .lock()
                .expect("onnxruntime lock")
                .clone()
                .unwrap_or_else(|| "not loaded: no model asked for it".into()),
        ),
        ..RuntimeStatus::default()
    }
}

/// The library's version from its file name once symlinks are followed
/// (`libonnxruntime.so.1.32.0`); ONNX Runtime's build string does not
/// always carry it. Else `unknown` with the file's size, so that the
/// decision cache still tells two libraries apart.
fn version_of_file(path: &Path) -> String {
    // A bare name was found by the dynamic loader: look for the file in
    // the usual places (a package's symlink names the versioned file).
    let located = (path.parent() == Some(Path::new("")))
        .then(|| {
            USUAL_PLACES
                .iter()
                .map(Path::new)
                .find(|p| p.is_absolute() && p.file_name() == path.file_name() && p.exists())
        })
        .flatten()
        .unwrap_or(path);
    let real = std::fs::canonicalize(located).unwrap_or_else(|_| located.to_owned());
    let name = real
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match version_of(&name) {
        Some(v) => v,
        None => format!(
            "unknown ({} bytes)",
            std::fs::metadata(&real).map_or(0, |m| m.len())
        ),
    }
}

/// `1.32.0` out of `libonnxruntime.so.1.32.0`.
fn version_of(name: &str) -> Option<String> {
    let rest = &name[name.find(".so.")? + 4..];
    let parts: Vec<&str> = rest.split('.').collect();
    (parts.len() >= 2
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())))
    .then(|| rest.to_owned())
}

pub fn status(library: Option<&Path>) -> RuntimeStatus {
    match runtime(library) {
        Ok(rt) => RuntimeStatus {
            available: true,
            version: Some(rt.version.clone()),
            library: Some(rt.library.display().to_string()),
            providers: PROVIDERS
                .iter()
                .filter(|p| (p.available)().unwrap_or(false))
                .map(|p| p.name.to_owned())
                .collect(),
            reason: None,
        },
        Err(reason) => RuntimeStatus {
            available: false,
            version: None,
            library: None,
            providers: vec![],
            reason: Some(reason),
        },
    }
}

/// A provider edgeinfer knows: its config name, how to ask the library
/// whether it has it, and how to register it.
struct Provider {
    name: &'static str,
    available: fn() -> ort::Result<bool>,
    dispatch: fn(&ProviderArgs) -> Option<ExecutionProviderDispatch>,
}

struct ProviderArgs<'a> {
    /// After the colon in the config (`openvino:NPU`, `qnn:/path/libQnnHtp.so`).
    option: Option<&'a str>,
    threads: usize,
}

const PROVIDERS: &[Provider] = &[
    Provider {
        name: "cpu",
        available: ep::CPU::is_available,
        // ONNX Runtime's own CPU provider needs no registration.
        dispatch: |_| None,
    },
    Provider {
        name: "openvino",
        available: ep::OpenVINO::is_available,
        dispatch: |a| {
            Some(
                ep::OpenVINO::default()
                    .with_device_type(a.option.unwrap_or("CPU"))
                    .with_num_threads(a.threads)
                    .build(),
            )
        },
    },
    Provider {
        name: "qnn",
        available: ep::QNN::is_available,
        dispatch: |a| {
            Some(
                ep::QNN::default()
                    .with_backend_path(a.option.unwrap_or("libQnnHtp.so"))
                    .build(),
            )
        },
    },
    Provider {
        name: "vsinpu",
        available: ep::VSINPU::is_available,
        dispatch: |_| Some(ep::VSINPU.build()),
    },
    Provider {
        name: "xnnpack",
        available: ep::XNNPACK::is_available,
        dispatch: |a| {
            Some(
                ep::XNNPACK::default()
                    .with_intra_op_num_threads(
                        std::num::NonZeroUsize::new(a.threads)
                            .unwrap_or(std::num::NonZeroUsize::MIN),
                    )
                    .build(),
            )
        },
    },
    Provider {
        name: "acl",
        available: ep::ACL::is_available,
        dispatch: |_| Some(ep::ACL::default().build()),
    },
    Provider {
        name: "rknpu",
        available: ep::RKNPU::is_available,
        dispatch: |_| Some(ep::RKNPU::default().build()),
    },
];

/// The provider names `providers = [...]` accepts.
pub fn provider_names() -> Vec<&'static str> {
    PROVIDERS.iter().map(|p| p.name).collect()
}

/// A model on ONNX Runtime with one provider.
pub struct OrtEngine {
    runs_on: String,
    inputs: Vec<Fact>,
    outputs: Vec<Fact>,
    bytes: Arc<[u8]>,
    provider: &'static Provider,
    option: Option<String>,
    options: EngineOptions,
    /// Sessions not in use: the one made at load, and those given back by
    /// runners that ended (auto's measuring runner, a stopped worker), so
    /// the next runner takes one instead of building another.
    idle: Arc<Mutex<Vec<OrtSession>>>,
}

/// An ONNX Runtime engine, or why each provider was passed over.
pub struct Placed {
    pub engine: OrtEngine,
    /// `provider: reason` for each one passed over before it.
    pub passed_over: Vec<String>,
    pub note: Option<String>,
}

/// Tries the configured providers in order and returns the first that
/// takes the model; `Err` holds one reason per provider.
pub fn load(
    bytes: &[u8],
    data_shape: Option<&[usize]>,
    data_input: &dyn Fn(&[String]) -> Option<usize>,
    options: &EngineOptions,
) -> Result<Placed, Vec<String>> {
    let rt = runtime(options.library.as_deref()).map_err(|e| vec![format!("onnxruntime: {e}")])?;
    let bytes: Arc<[u8]> = Arc::from(bytes);
    let mut passed_over = Vec::new();
    for entry in &options.providers {
        let (name, option) = match entry.split_once(':') {
            Some((n, o)) => (n, Some(o)),
            None => (entry.as_str(), None),
        };
        let Some(provider) = PROVIDERS.iter().find(|p| p.name == name) else {
            passed_over.push(format!(
                "{entry}: unknown provider (known: {})",
                provider_names().join(", ")
            ));
            continue;
        };
        match (provider.available)() {
            Ok(true) => {}
            Ok(false) => {
                passed_over.push(format!(
                    "{name}: not in this ONNX Runtime build ({} {}, which has {})",
                    rt.library.display(),
                    rt.version,
                    status(None).providers.join(", ")
                ));
                continue;
            }
            Err(e) => {
                passed_over.push(format!("{name}: {e}"));
                continue;
            }
        }
        let args = ProviderArgs {
            option,
            threads: options.threads,
        };
        let made = session(&rt, &bytes, provider, &args, options)
            .and_then(|s| describe(s, data_shape, data_input));
        match made {
            Ok((session, inputs, outputs)) => {
                let note = (provider.name != "cpu" && !options.strict).then(|| {
                    format!(
                        "nodes {name} lacks run on ONNX Runtime's CPU provider (strict = false)"
                    )
                });
                return Ok(Placed {
                    engine: OrtEngine {
                        runs_on: format!("onnxruntime-{name}"),
                        inputs,
                        outputs,
                        bytes,
                        provider,
                        option: option.map(str::to_owned),
                        options: options.clone(),
                        idle: Arc::new(Mutex::new(vec![session])),
                    },
                    passed_over,
                    note,
                });
            }
            Err(e) => passed_over.push(format!("{name}: {}", one_line(&e))),
        }
    }
    if passed_over.is_empty() {
        passed_over.push("onnxruntime: no providers configured".into());
    }
    Err(passed_over)
}

/// ONNX Runtime's messages span lines (OpenVINO's nest several errors):
/// one line for logs, health and `models`.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn session(
    rt: &Runtime,
    bytes: &[u8],
    provider: &Provider,
    args: &ProviderArgs,
    options: &EngineOptions,
) -> Result<OrtSession, String> {
    let e = |e: ort::Error<SessionBuilder>| e.to_string();
    let mut builder = OrtSession::builder(&rt.env)
        .map_err(|e| e.to_string())?
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .map_err(e)?
        .with_intra_threads(options.threads.max(1))
        .map_err(e)?
        .with_inter_threads(1)
        .map_err(e)?;
    if options.threads > 1 {
        // Pool threads that spin between runs burn a gateway's CPU.
        builder = builder
            .with_config_entry("session.intra_op.allow_spinning", "0")
            .map_err(e)?;
    }
    if let Some(dispatch) = (provider.dispatch)(args) {
        builder = builder
            .with_execution_providers([dispatch.error_on_failure()])
            .map_err(e)?;
        if options.strict {
            builder = builder.with_disable_cpu_fallback().map_err(e)?;
        }
    }
    builder.commit_from_memory(bytes).map_err(|e| e.to_string())
}

/// Inputs with concrete shapes (the manifest's for the data input, 1 for
/// other free dimensions), and outputs as a zero input shows them.
fn describe(
    mut session: OrtSession,
    data_shape: Option<&[usize]>,
    data_input: &dyn Fn(&[String]) -> Option<usize>,
) -> Result<(OrtSession, Vec<Fact>, Vec<Fact>), String> {
    let names: Vec<String> = session
        .inputs()
        .iter()
        .map(|i| i.name().to_owned())
        .collect();
    let data_ix = data_input(&names);
    let mut inputs = Vec::new();
    for (ix, input) in session.inputs().iter().enumerate() {
        let (datum, dims) = tensor_type(input.dtype()).ok_or_else(|| {
            format!(
                "input {} is not a tensor of a supported type ({:?})",
                input.name(),
                input.dtype()
            )
        })?;
        let wanted = data_shape.filter(|_| Some(ix) == data_ix);
        if let Some(w) = wanted {
            if w.len() != dims.len() {
                return Err(format!(
                    "manifest input.shape {w:?} has rank {}, the graph's input {} has {dims:?}",
                    w.len(),
                    input.name()
                ));
            }
        }
        let shape = dims
            .iter()
            .enumerate()
            .map(|(d, &n)| match (n, wanted) {
                (n, Some(w)) if n >= 0 && n as usize != w[d] => Err(format!(
                    "manifest input.shape {w:?} disagrees with the graph's input shape {dims:?}"
                )),
                (n, _) if n >= 0 => Ok(n as usize),
                (_, Some(w)) => Ok(w[d]),
                _ => Ok(1),
            })
            .collect::<Result<Vec<usize>, String>>()?;
        inputs.push(fact(input.name(), shape, datum));
    }
    let zeros: TVec<TValue> = inputs
        .iter()
        .map(|f| {
            Tensor::zero_dt(f.datum, &f.info.shape)
                .map(|t| t.into_tvalue())
                .map_err(|e| e.to_string())
        })
        .collect::<Result<_, _>>()?;
    let output_names: Vec<String> = session
        .outputs()
        .iter()
        .map(|o| o.name().to_owned())
        .collect();
    let values =
        run_session(&mut session, &inputs, &output_names, zeros).map_err(|e| e.to_string())?;
    let outputs = output_names
        .iter()
        .zip(values)
        .map(|(name, v)| fact(name, v.shape().to_vec(), v.datum_type()))
        .collect();
    Ok((session, inputs, outputs))
}

fn fact(name: &str, shape: Vec<usize>, datum: DatumType) -> Fact {
    Fact {
        info: TensorInfo {
            name: name.to_owned(),
            shape,
            dtype: format!("{datum:?}").to_lowercase(),
        },
        datum,
    }
}

fn tensor_type(t: &ValueType) -> Option<(DatumType, Vec<i64>)> {
    let ValueType::Tensor { ty, shape, .. } = t else {
        return None;
    };
    let datum = match ty {
        TensorElementType::Float32 => DatumType::F32,
        TensorElementType::Float64 => DatumType::F64,
        TensorElementType::Int8 => DatumType::I8,
        TensorElementType::Uint8 => DatumType::U8,
        TensorElementType::Int16 => DatumType::I16,
        TensorElementType::Int32 => DatumType::I32,
        TensorElementType::Int64 => DatumType::I64,
        TensorElementType::Bool => DatumType::Bool,
        _ => return None,
    };
    Some((datum, shape.iter().copied().collect()))
}

impl super::Engine for OrtEngine {
    fn runs_on(&self) -> &str {
        &self.runs_on
    }

    fn inputs(&self) -> &[Fact] {
        &self.inputs
    }

    fn outputs(&self) -> &[Fact] {
        &self.outputs
    }

    fn runner(&self) -> Result<Box<dyn Runner>, ModelErrorKind> {
        let idle = self.idle.lock().expect("session lock").pop();
        let session = match idle {
            Some(s) => s,
            None => {
                let rt =
                    runtime(self.options.library.as_deref()).map_err(ModelErrorKind::Engine)?;
                let args = ProviderArgs {
                    option: self.option.as_deref(),
                    threads: self.options.threads,
                };
                session(&rt, &self.bytes, self.provider, &args, &self.options)
                    .map_err(ModelErrorKind::Engine)?
            }
        };
        Ok(Box::new(OrtRunner {
            session: Some(session),
            idle: Arc::clone(&self.idle),
            inputs: self.inputs.clone(),
            outputs: self.outputs.iter().map(|o| o.info.name.clone()).collect(),
        }))
    }
}

struct OrtRunner {
    /// Always `Some` until dropped.
    session: Option<OrtSession>,
    /// Where the session goes back to when the runner ends.
    idle: Arc<Mutex<Vec<OrtSession>>>,
    inputs: Vec<Fact>,
    outputs: Vec<String>,
}

impl Runner for OrtRunner {
    fn run(&mut self, inputs: TVec<TValue>) -> Result<TVec<TValue>, ModelErrorKind> {
        let session = self.session.as_mut().expect("a runner holds its session");
        run_session(session, &self.inputs, &self.outputs, inputs)
            .map_err(|e| ModelErrorKind::Inference(e.to_string()))
    }
}

impl Drop for OrtRunner {
    fn drop(&mut self) {
        if let (Some(session), Ok(mut idle)) = (self.session.take(), self.idle.lock()) {
            idle.push(session);
        }
    }
}

fn run_session(
    session: &mut OrtSession,
    facts: &[Fact],
    outputs: &[String],
    inputs: TVec<TValue>,
) -> ort::Result<TVec<TValue>> {
    let mut fed: Vec<(String, SessionInputValue<'_>)> = Vec::with_capacity(inputs.len());
    for (fact, value) in facts.iter().zip(inputs.iter()) {
        fed.push((fact.info.name.clone(), view(value)?));
    }
    let results = session.run(fed)?;
    outputs
        .iter()
        .map(|name| tract_tensor(&results[name.as_str()]))
        .collect()
}

/// A zero-copy ONNX Runtime view of a tract tensor.
fn view(t: &Tensor) -> ort::Result<SessionInputValue<'_>> {
    let shape: Vec<i64> = t.shape().iter().map(|d| *d as i64).collect();
    let bad = |e: TractError| ort::Error::new(e.to_string());
    Ok(match t.datum_type().unquantized() {
        DatumType::F32 => {
            TensorRef::from_array_view((shape, super::plain_slice::<f32>(t).map_err(bad)?))?.into()
        }
        DatumType::I8 => {
            TensorRef::from_array_view((shape, super::plain_slice::<i8>(t).map_err(bad)?))?.into()
        }
        DatumType::U8 => {
            TensorRef::from_array_view((shape, super::plain_slice::<u8>(t).map_err(bad)?))?.into()
        }
        DatumType::I64 => {
            TensorRef::from_array_view((shape, super::plain_slice::<i64>(t).map_err(bad)?))?.into()
        }
        DatumType::I32 => {
            TensorRef::from_array_view((shape, super::plain_slice::<i32>(t).map_err(bad)?))?.into()
        }
        DatumType::F64 => {
            TensorRef::from_array_view((shape, super::plain_slice::<f64>(t).map_err(bad)?))?.into()
        }
        DatumType::Bool => {
            TensorRef::from_array_view((shape, super::plain_slice::<bool>(t).map_err(bad)?))?.into()
        }
        other => {
            return Err(ort::Error::new(format!(
                "cannot pass a {other:?} tensor to ONNX Runtime"
            )))
        }
    })
}

fn tract_tensor(value: &ort::value::DynValue) -> ort::Result<TValue> {
    fn copy<T: Datum + ort::value::PrimitiveTensorElementType + Copy>(
        value: &ort::value::DynValue,
    ) -> ort::Result<Tensor> {
        let (shape, data) = value.try_extract_tensor::<T>()?;
        let dims: Vec<usize> = shape.iter().map(|d| *d as usize).collect();
        Tensor::from_shape(&dims, data).map_err(|e| ort::Error::new(e.to_string()))
    }
    let tensor = match value.dtype() {
        ValueType::Tensor { ty, .. } => match ty {
            TensorElementType::Float32 => copy::<f32>(value)?,
            TensorElementType::Float64 => copy::<f64>(value)?,
            TensorElementType::Int8 => copy::<i8>(value)?,
            TensorElementType::Uint8 => copy::<u8>(value)?,
            TensorElementType::Int16 => copy::<i16>(value)?,
            TensorElementType::Int32 => copy::<i32>(value)?,
            TensorElementType::Int64 => copy::<i64>(value)?,
            TensorElementType::Bool => copy::<bool>(value)?,
            other => {
                return Err(ort::Error::new(format!(
                    "output of type {other:?} is not supported"
                )))
            }
        },
        other => return Err(ort::Error::new(format!("output {other:?} is not a tensor"))),
    };
    Ok(tensor.into_tvalue())
}

#[cfg(test)]
mod tests {
    #[test]
    fn version_comes_from_the_file_name() {
        assert_eq!(
            super::version_of("libonnxruntime.so.1.32.0").as_deref(),
            Some("1.32.0")
        );
        assert_eq!(
            super::version_of("libonnxruntime.so.1.24").as_deref(),
            Some("1.24")
        );
        assert_eq!(super::version_of("libonnxruntime.so"), None);
        assert_eq!(super::version_of("libonnxruntime.so.1.x"), None);
    }
}
