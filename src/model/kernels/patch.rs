//! What the kernels share: graph patching (one of our ops in place of a
//! node or a chain of tract's), the facts of a convolution node they can
//! take, and tensor plumbing (plain slices, transposes, an f32 op's
//! evaluation). Below every kernel and the engine seam alike.

use tract_onnx::prelude::*;

/// Puts `op` in place of node `replaced` (its first output), reading the
/// first input of node `reads`: one of our ops for a node or a chain of
/// tract's. The input is read when the patch is made, as an earlier patch
/// may have rewired it.
pub(crate) fn replace_with(
    model: &mut TypedModel,
    reads: usize,
    replaced: usize,
    op: impl Into<Box<dyn TypedOp>>,
) -> TractResult<()> {
    let input = model.node(reads).inputs[0];
    let name = model.node(replaced).name.clone();
    let mut patch = TypedModelPatch::default();
    let wire = patch.tap_model(model, input)?;
    let out = patch.wire_node(name, op, &[wire])?[0];
    patch.shunt_outside(model, OutletId::new(replaced, 0), out)?;
    patch.apply(model)
}

/// Puts the op `of` finds for a node in place of each node of `model` it
/// finds one for (see [`replace_with`]); returns how many.
pub(crate) fn substitute_each<O: Into<Box<dyn TypedOp>>>(
    model: &mut TypedModel,
    of: impl Fn(&TypedModel, &TypedNode) -> TractResult<Option<O>>,
) -> TractResult<usize> {
    let mut found = Vec::new();
    for node in model.nodes() {
        if let Some(op) = of(model, node)? {
            found.push((node.id, op));
        }
    }
    let n = found.len();
    for (id, op) in found {
        replace_with(model, id, id, op)?;
    }
    if n > 0 {
        model.compact()?;
    }
    Ok(n)
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
