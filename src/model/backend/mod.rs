//! The seam between models and the engines that run them.
//!
//! A backend loads an ONNX graph for given input facts and hands back an
//! [`Engine`]: what it really runs on, the graph's inputs and outputs with
//! concrete shapes, and a [`Runner`] per worker. Tensors cross the seam as
//! tract [`Tensor`]s (plain f32/i8/u8/i64 data with a shape); pipelines
//! never learn which backend answered.
//!
//! - [`tract`]: pure Rust, always there (`tract-cpu`).
//! - [`onnxruntime`]: ONNX Runtime, loaded at run time with its execution
//!   providers (`onnxruntime-cpu`, `onnxruntime-openvino`, …); built with
//!   the `onnxruntime` feature.
//!
//! How a vendor runtime (RKNN, HailoRT) would fit is written down in the
//! README's "Engines" section.

#[cfg(feature = "onnxruntime")]
pub mod onnxruntime;
pub mod tract;

pub(crate) use super::kernels::plain_slice;

use super::{ModelErrorKind, TensorInfo};
use std::path::PathBuf;
use tract_onnx::prelude::*;

/// A model loaded on one backend, shared by every worker.
pub trait Engine: Send + Sync {
    /// What the model really runs on: `tract-cpu`, `onnxruntime-cpu`,
    /// `onnxruntime-openvino`, …
    fn runs_on(&self) -> &str;
    /// Which form of the graph it runs, where an engine has several
    /// (tract's `qdq-folded`); `None` for the graph as given.
    fn variant(&self) -> Option<&str> {
        None
    }
    /// `runs_on`, with the variant where there is one: for messages.
    fn label(&self) -> String {
        label(self.runs_on(), self.variant())
    }
    /// Graph inputs, in the order [`Runner::run`] takes them.
    fn inputs(&self) -> &[Fact];
    /// Graph outputs, in the order [`Runner::run`] returns them.
    fn outputs(&self) -> &[Fact];
    /// A private handle for one worker thread.
    fn runner(&self) -> Result<Box<dyn Runner>, ModelErrorKind>;
}

/// `tract-cpu (qdq-folded)`: what runs, and in which form where there are
/// several.
pub fn label(runs_on: &str, variant: Option<&str>) -> String {
    match variant {
        Some(v) => format!("{runs_on} ({v})"),
        None => runs_on.to_owned(),
    }
}

/// One worker's handle: runs the graph on every input at once.
pub trait Runner: Send {
    fn run(&mut self, inputs: TVec<TValue>) -> Result<TVec<TValue>, ModelErrorKind>;

    /// Runs once and adds each node's time to `nodes` (indexed by node id);
    /// false where the engine cannot time its nodes (ONNX Runtime).
    fn profile(
        &mut self,
        _inputs: TVec<TValue>,
        _nodes: &mut Vec<NodeTime>,
    ) -> Result<bool, ModelErrorKind> {
        Ok(false)
    }
}

/// Time spent in one node of a plan, summed over profiled runs.
#[derive(Debug, Clone, Default)]
pub struct NodeTime {
    pub op: String,
    pub node: String,
    pub total: std::time::Duration,
}

/// A graph input or output: its description and the element type the
/// backend takes or gives (tract's quantized types carry scale and zero
/// point; ONNX Runtime's are plain integers).
#[derive(Debug, Clone)]
pub struct Fact {
    pub info: TensorInfo,
    pub datum: DatumType,
}

/// Which backend serves a model.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// Every available backend is tried and measured; the fastest one that
    /// agrees serves (tract alone when ONNX Runtime is not available).
    #[default]
    Auto,
    Tract,
    OnnxRuntime,
}

impl BackendChoice {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendChoice::Auto => "auto",
            BackendChoice::Tract => "tract",
            BackendChoice::OnnxRuntime => "onnxruntime",
        }
    }
}

/// How a model is put on an engine: from the config's `[engine]` section
/// and the pipeline's own keys.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EngineOptions {
    pub backend: BackendChoice,
    /// ONNX Runtime execution providers, tried in order (`cpu` is ONNX
    /// Runtime's own CPU provider).
    pub providers: Vec<String>,
    /// When every provider is passed over: go on to the next backend
    /// (finally tract) rather than fail the model.
    pub fallback: bool,
    /// Refuse a provider that would leave part of the graph to ONNX
    /// Runtime's CPU provider.
    pub strict: bool,
    /// ONNX Runtime intra-op threads per worker (1: the worker's own thread).
    pub threads: usize,
    /// `libonnxruntime.so` to load; else `ORT_DYLIB_PATH`, else the usual places.
    pub library: Option<PathBuf>,
    /// Where `auto` keeps its decisions (keyed by model, versions and CPU).
    pub cache_dir: Option<PathBuf>,
    /// Time `auto` may spend measuring each backend, ms.
    pub probe_budget_ms: u64,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            backend: BackendChoice::Auto,
            providers: vec!["cpu".into()],
            fallback: true,
            strict: false,
            threads: 1,
            library: None,
            cache_dir: None,
            probe_budget_ms: 300,
        }
    }
}

impl EngineOptions {
    /// Only tract, nothing measured: what unit tests and tools that must not
    /// touch ONNX Runtime use.
    pub fn tract() -> EngineOptions {
        EngineOptions {
            backend: BackendChoice::Tract,
            ..EngineOptions::default()
        }
    }
}

/// ONNX Runtime as this process sees it: loaded (version, path) or why not.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RuntimeStatus {
    pub available: bool,
    pub version: Option<String>,
    pub library: Option<String>,
    /// Execution providers compiled into the loaded library.
    pub providers: Vec<String>,
    /// Why it is not available (not built in, library missing or too old).
    pub reason: Option<String>,
}

/// The execution provider names `providers = [...]` takes (none without
/// the onnxruntime feature).
pub fn provider_names() -> Vec<&'static str> {
    #[cfg(feature = "onnxruntime")]
    {
        onnxruntime::provider_names()
    }
    #[cfg(not(feature = "onnxruntime"))]
    {
        vec![]
    }
}

/// ONNX Runtime as far as this process has tried it, without loading it.
pub fn runtime_seen() -> RuntimeStatus {
    #[cfg(feature = "onnxruntime")]
    {
        onnxruntime::seen()
    }
    #[cfg(not(feature = "onnxruntime"))]
    {
        runtime_status(None)
    }
}

/// Loads ONNX Runtime if it is not loaded yet (see [`EngineOptions::library`])
/// and says what this process has.
pub fn runtime_status(library: Option<&std::path::Path>) -> RuntimeStatus {
    #[cfg(feature = "onnxruntime")]
    {
        onnxruntime::status(library)
    }
    #[cfg(not(feature = "onnxruntime"))]
    {
        let _ = library;
        RuntimeStatus {
            available: false,
            version: None,
            library: None,
            providers: vec![],
            reason: Some("this edgeinfer was built without the onnxruntime feature".into()),
        }
    }
}
