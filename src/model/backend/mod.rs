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

#[cfg(target_arch = "x86_64")]
mod conv;
mod depthwise;
mod downsample;
pub(crate) mod fakequant;
#[cfg(feature = "onnxruntime")]
pub mod onnxruntime;
mod pad;
#[cfg(target_arch = "x86_64")]
mod pointwise;
mod softmax;
pub mod tract;
#[cfg(target_arch = "x86_64")]
mod x86;

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

/// The elements of a tensor in plain memory.
pub(crate) fn plain_slice<D: Datum>(t: &Tensor) -> TractResult<&[D]> {
    t.try_as_plain_ram()?.as_slice::<D>()
}

/// What our convolution ops need of a decluttered f32 `Conv` node, when
/// they can take it: a 2-D kernel in OIHW of constant finite taps, a
/// constant bias (one value per output channel or one for all), data of
/// batch 1 with concrete non-empty planes, channel-first or channel-last.
pub(crate) struct ConvFacts<'a> {
    pub conv: &'a tract_onnx::tract_core::ops::cnn::Conv,
    /// The input's shape.
    pub shape: &'a [usize],
    pub hw: [usize; 2],
    pub channels_last: bool,
    /// `[out][in / group][kh][kw]`.
    pub kernel: &'a [f32],
    pub kernel_hw: [usize; 2],
    /// One value per output channel.
    pub bias: Vec<f32>,
    pub strides: [usize; 2],
    pub dilations: [usize; 2],
    pub pad_before: [usize; 2],
    pub output_hw: [usize; 2],
}

impl<'a> ConvFacts<'a> {
    pub(crate) fn of(model: &'a TypedModel, node: &'a TypedNode) -> TractResult<Option<Self>> {
        use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat};
        use tract_onnx::tract_core::ops::nn::DataFormat;
        let Some(conv) = node.op_as::<Conv>() else {
            return Ok(None);
        };
        let spec = &conv.pool_spec;
        let (c, o) = (spec.input_channels, spec.output_channels);
        if conv.q_params.is_some()
            || conv.kernel_fmt != KernelFormat::OIHW
            || spec.kernel_shape.len() != 2
            || node.inputs.len() != 3
            || conv.group == 0
            || c % conv.group != 0
        {
            return Ok(None);
        }
        let x = model.outlet_fact(node.inputs[0])?;
        let Some(shape) = x.shape.as_concrete() else {
            return Ok(None);
        };
        let (hw, channels_last) = match (spec.data_format, shape) {
            (DataFormat::NCHW, &[1, ch, h, w]) | (DataFormat::CHW, &[ch, h, w]) if ch == c => {
                ([h, w], false)
            }
            (DataFormat::NHWC, &[1, h, w, ch]) | (DataFormat::HWC, &[h, w, ch]) if ch == c => {
                ([h, w], true)
            }
            _ => return Ok(None),
        };
        if x.datum_type != f32::datum_type() || hw.contains(&0) {
            return Ok(None);
        }
        let kernel = model.outlet_fact(node.inputs[1])?;
        let bias = model.outlet_fact(node.inputs[2])?;
        let (Some(kernel), Some(bias)) = (&kernel.konst, &bias.konst) else {
            return Ok(None);
        };
        let [kh, kw] = [spec.kernel_shape[0], spec.kernel_shape[1]];
        if kernel.datum_type() != f32::datum_type()
            || kernel.shape() != [o, c / conv.group, kh, kw]
            || bias.datum_type() != f32::datum_type()
            || !(bias.len() == o || bias.len() == 1)
        {
            return Ok(None);
        }
        let kernel = plain_slice::<f32>(kernel)?;
        // A tap over the padding adds `tap · 0`, which is 0 only for a
        // finite tap.
        if kernel.iter().any(|k| !k.is_finite()) {
            return Ok(None);
        }
        let bias = plain_slice::<f32>(bias)?;
        let bias = (0..o).map(|ch| bias[ch.min(bias.len() - 1)]).collect();
        let padding = spec.computed_padding(&hw);
        let (strides, dilations) = (spec.strides(), spec.dilations());
        Ok(Some(ConvFacts {
            conv,
            shape,
            hw,
            channels_last,
            kernel,
            kernel_hw: [kh, kw],
            bias,
            strides: [strides[0], strides[1]],
            dilations: [dilations[0], dilations[1]],
            pad_before: [padding[0].pad_before, padding[1].pad_before],
            output_hw: [padding[0].convoluted, padding[1].convoluted],
        }))
    }
}

/// `x`, `rows` × `cols` in row-major order, as `cols` × `rows`.
#[inline(always)]
pub(crate) fn transposed(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; x.len()];
    transpose_into(x, rows, cols, &mut t);
    t
}

/// [`transposed`] into `t`, which has `x`'s length.
#[inline(always)]
pub(crate) fn transpose_into(x: &[f32], rows: usize, cols: usize, t: &mut [f32]) {
    for (r, row) in x.chunks_exact(cols).enumerate() {
        for (c, v) in row.iter().enumerate() {
            t[c * rows + r] = *v;
        }
    }
}

/// The evaluation of one of our f32 ops: `write` reads the input `x`
/// (which must hold `input_len` values) and writes a zeroed output of
/// `shape` in place — a tract `Tensor` made from a `Vec` or an ndarray
/// array would be a copy of it.
pub(crate) fn eval_f32(
    what: &str,
    x: &Tensor,
    input_len: usize,
    shape: &[usize],
    write: impl FnOnce(&[f32], &mut [f32]),
) -> TractResult<TVec<TValue>> {
    let x = plain_slice::<f32>(x)?;
    if x.len() != input_len {
        return Err(anyhow::anyhow!(
            "{what} input of {} values, {input_len} expected",
            x.len()
        ));
    }
    let mut y = Tensor::zero::<f32>(shape)?;
    write(x, y.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?);
    Ok(tvec!(y.into_tvalue()))
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
