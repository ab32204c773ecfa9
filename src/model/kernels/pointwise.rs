//! Pointwise (1×1) convolution, f32, as our own tract op: a matrix
//! product of the activations with a constant weight matrix, plus the
//! per-channel bias, computed without tract's packing step.
//!
//! tract declutters a 1×1 convolution into an `EinSum` with the bias as a
//! separate `Add`, and runs it as `OptMatMulPack` (the activations copied
//! into the kernel's panel layout, on every run) then `OptMatMul`. On
//! MobileNet-style models these layers are small: Keyword Spotting's are
//! 125 points × 64 channels → 64, which by `--profile` took 0.002 ms to
//! pack and 0.0105 to multiply; this op takes 0.006.
//!
//! Here each block of outputs is a set of accumulators in registers,
//! `MR` rows by `16 · NV` columns (one AVX-512 vector is 16 values).
//! The product is laid out as points × output channels or as output
//! channels × points, with the block shape, whichever wastes the least
//! (rows and columns are padded to whole blocks) counting the copies it
//! needs: the input transposed when its layout is the other one, the
//! result transposed when the output's is. Keyword Spotting's 125 × 64 →
//! 64 layers run as points × channels with no copy, VWW's last layer
//! (9 points, 256 → 256, output channel-first) as points × channels and
//! one transpose of the result, instead of 256 rows of 9 padded to 16.
//!
//! Each output is tract's own arithmetic in tract's order: a chain of
//! fused multiply-adds over the input channels in order, starting from
//! zero, then the bias added (tract's kernels on x86-64 clear their
//! accumulators, `vfmadd` over k one step at a time, and add the bias in
//! the epilogue). So the answers are tract's number for number, which
//! the tests hold it to. It is planned only where the CPU has AVX-512F and
//! FMA: elsewhere `mul_add` would be a libm call.

use std::arch::x86_64::*;
use std::sync::Arc;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::einsum::EinSum;

/// The block shapes: rows × vectors of 16 columns, at most 24
/// accumulator vectors of AVX-512's 32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Tile {
    R6V4,
    R12V2,
    R12V1,
    R24V1,
}

impl Tile {
    pub(super) const ALL: [Tile; 4] = [Tile::R6V4, Tile::R12V2, Tile::R12V1, Tile::R24V1];

    fn rows(self) -> usize {
        match self {
            Tile::R6V4 => 6,
            Tile::R12V2 | Tile::R12V1 => 12,
            Tile::R24V1 => 24,
        }
    }

    pub(super) fn columns(self) -> usize {
        match self {
            Tile::R6V4 => 64,
            Tile::R12V2 => 32,
            Tile::R12V1 | Tile::R24V1 => 16,
        }
    }
}

/// A copied value, in multiply-adds of one lane: a scalar copy is about a
/// cycle, in which the FMA units do 32 lanes.
const COPY_COST: usize = 32;

/// The product's layout and block shape with the least work for a layer
/// of `p` points, `i` → `o` channels: (rows are points, tile).
fn plan(p: usize, i: usize, o: usize, input_last: bool, output_last: bool) -> (bool, Tile) {
    let mut best: Option<(usize, bool, Tile)> = None;
    for rows_are_points in [true, false] {
        let (m, n) = if rows_are_points { (p, o) } else { (o, p) };
        // Rows of points read the input as [points][in], columns of
        // points as [in][points].
        let copies = (input_last != rows_are_points) as usize * p * i
            + (output_last != rows_are_points) as usize * p * o;
        let (work, tile) = best_tile(m, i, n);
        let work = work + copies * COPY_COST;
        if best.is_none_or(|(w, _, _)| work < w) {
            best = Some((work, rows_are_points, tile));
        }
    }
    let (_, rows_are_points, tile) = best.expect("two layouts");
    (rows_are_points, tile)
}

/// The tile with the least work for an `m × k` by `k × n` product: its
/// padded size, weighed by how much slower the narrower tiles ran per
/// multiply-add (ties to the widest). A tile of one vector loads a value
/// per row for each vector of multiply-adds, and the loads are the
/// bottleneck: on the bundled detector's convolutions the four tiles,
/// forced in turn, ran 1 : 1.2 : 1.6 : 2.5 (by `--profile`).
pub(super) fn best_tile(m: usize, k: usize, n: usize) -> (usize, Tile) {
    Tile::ALL
        .into_iter()
        .map(|t| {
            let padded = m.next_multiple_of(t.rows()) * n.next_multiple_of(t.columns()) * k;
            let tenths = match t {
                Tile::R6V4 => 10,
                Tile::R12V2 => 12,
                Tile::R12V1 => 16,
                Tile::R24V1 => 25,
            };
            (padded * tenths / 10, t)
        })
        .min_by_key(|(work, _)| *work)
        .expect("tiles")
}

#[derive(Debug, Clone, PartialEq)]
pub struct Pointwise {
    points: usize,
    inputs: usize,
    outputs: usize,
    /// The input is `[points][in]` in memory (else `[in][points]`).
    input_last: bool,
    /// The output is `[points][out]` in memory (else `[out][points]`).
    output_last: bool,
    /// The product's rows are points, its columns output channels (else
    /// the other way round).
    rows_are_points: bool,
    tile: Tile,
    /// `[in][out]` when the columns are output channels, its rows padded
    /// with zeros to a whole number of blocks; else `[out][in]`.
    weights: Arc<Vec<f32>>,
    /// Per output channel, padded with zeros as the weights' rows.
    bias: Option<Arc<Vec<f32>>>,
    output_shape: TVec<usize>,
}

impl Eq for Pointwise {}

/// Where the axes of an `EinSum`'s two inputs and output are, when it is
/// a matrix product with one summed axis `k` and one axis `o` from the
/// weights: the input's and the output's layouts, as (channel axis
/// innermost?) pairs.
fn layouts(op: &EinSum, x: &[usize], y: &[usize], w: &[usize]) -> Option<(bool, bool, usize)> {
    let (mut k, mut o) = (None, None);
    let mut points_x = vec![];
    let mut points_y = vec![];
    for axis in op.axes.iter_all_axes() {
        let [xs, ws] = [&axis.inputs[0], &axis.inputs[1]];
        let ys = &axis.outputs[0];
        match (xs.len(), ws.len(), ys.len()) {
            (1, 1, 0) => k = Some((xs[0], ws[0])),
            (0, 1, 1) => o = Some((ws[0], ys[0])),
            (1, 0, 1) => {
                points_x.push(xs[0]);
                points_y.push(ys[0]);
            }
            // An axis of one on one side only (a batch of one the
            // product drops or adds) moves no value.
            (1, 0, 0) if x[xs[0]] == 1 => {}
            (0, 0, 1) if y[ys[0]] == 1 => {}
            _ => return None,
        }
    }
    let ((kx, kw), (ow, oy)) = (k?, o?);
    // The points keep their order, so a point index is the same on
    // both sides.
    let mut order: Vec<usize> = (0..points_x.len()).collect();
    order.sort_by_key(|&i| points_x[i]);
    if !order.windows(2).all(|p| points_y[p[0]] < points_y[p[1]]) {
        return None;
    }
    let last = |shape: &[usize], axis: usize| -> Option<bool> {
        let after: usize = shape[axis + 1..].iter().product();
        let before: usize = shape[..axis].iter().product();
        if after == 1 {
            Some(true)
        } else if before == 1 {
            Some(false)
        } else {
            None
        }
    };
    if w.len() != 2 || kw == ow {
        return None;
    }
    Some((last(x, kx)?, last(y, oy)?, kw))
}

impl Pointwise {
    /// The op for a decluttered f32 `EinSum` that is a 1×1 convolution
    /// tract would run as a packed matrix product: a constant finite
    /// 2-D weight matrix, concrete shapes, and the input and output each
    /// channel-first or channel-last.
    fn of(
        model: &TypedModel,
        node: &TypedNode,
        forced: Option<(bool, Tile)>,
    ) -> TractResult<Option<Pointwise>> {
        let Some(op) = node.op_as::<EinSum>() else {
            return Ok(None);
        };
        if op.q_params.is_some() || op.operating_dt != f32::datum_type() || node.inputs.len() != 2 {
            return Ok(None);
        }
        let x = model.outlet_fact(node.inputs[0])?;
        let w = model.outlet_fact(node.inputs[1])?;
        let y = model.outlet_fact(OutletId::new(node.id, 0))?;
        let (Some(xs), Some(ys), Some(konst)) =
            (x.shape.as_concrete(), y.shape.as_concrete(), &w.konst)
        else {
            return Ok(None);
        };
        if x.datum_type != f32::datum_type() || konst.datum_type() != f32::datum_type() {
            return Ok(None);
        }
        let Some((input_last, output_last, k_in_w)) = layouts(op, xs, ys, konst.shape()) else {
            return Ok(None);
        };
        let ws = konst.shape();
        let (inputs, outputs) = (ws[k_in_w], ws[1 - k_in_w]);
        let points = xs.iter().product::<usize>() / inputs.max(1);
        // A product of one point or one input channel is a matrix-vector
        // product or an outer one to tract, with other kernels.
        if inputs < 2
            || points < 2
            || outputs < 2
            || ys.iter().product::<usize>() != points * outputs
        {
            return Ok(None);
        }
        let w = super::patch::plain_slice::<f32>(konst)?;
        if w.iter().any(|v| !v.is_finite()) {
            return Ok(None);
        }
        let at = |i: usize, o: usize| {
            if k_in_w == 0 {
                w[i * outputs + o]
            } else {
                w[o * inputs + i]
            }
        };
        let (rows_are_points, tile) =
            forced.unwrap_or_else(|| plan(points, inputs, outputs, input_last, output_last));
        let weights = match rows_are_points {
            true => {
                let padded = outputs.next_multiple_of(tile.columns());
                let mut t = vec![0f32; inputs * padded];
                for i in 0..inputs {
                    for o in 0..outputs {
                        t[i * padded + o] = at(i, o);
                    }
                }
                t
            }
            false => (0..outputs)
                .flat_map(|o| (0..inputs).map(move |i| (o, i)))
                .map(|(o, i)| at(i, o))
                .collect(),
        };
        Ok(Some(Pointwise {
            points,
            inputs,
            outputs,
            input_last,
            output_last,
            rows_are_points,
            tile,
            weights: Arc::new(weights),
            bias: None,
            output_shape: ys.into(),
        }))
    }

    /// The bias a following `Add` node adds, if it is one value per
    /// output channel (or one for all) on the output's channel axis.
    fn bias_of(
        &self,
        model: &TypedModel,
        add: &TypedNode,
        slot: usize,
    ) -> TractResult<Option<Vec<f32>>> {
        use tract_onnx::tract_core::ops::binary::TypedBinOp;
        use tract_onnx::tract_core::ops::math::Add;
        let Some(bin) = add.op_as::<TypedBinOp>() else {
            return Ok(None);
        };
        if !bin.0.is::<Add>() || bin.1.is_some() || add.inputs.len() != 2 {
            return Ok(None);
        }
        let other = model.outlet_fact(add.inputs[1 - slot])?;
        let Some(konst) = &other.konst else {
            return Ok(None);
        };
        let out = model.outlet_fact(OutletId::new(add.id, 0))?;
        if konst.datum_type() != f32::datum_type()
            || out.shape.as_concrete() != Some(&*self.output_shape)
        {
            return Ok(None);
        }
        let values = super::patch::plain_slice::<f32>(konst)?;
        let shape = konst.shape();
        let rank = self.output_shape.len();
        let channel_axis = (0..rank).find(|&a| {
            let n = self.output_shape[a];
            n == self.outputs && {
                let (before, after): (usize, usize) = (
                    self.output_shape[..a].iter().product(),
                    self.output_shape[a + 1..].iter().product(),
                );
                if self.output_last {
                    after == 1
                } else {
                    before == 1
                }
            }
        });
        let per_channel = values.len() == self.outputs
            && shape.len() <= rank
            && channel_axis.is_some_and(|a| {
                // Right-aligned broadcasting: the constant's one long
                // axis lands on the output's channel axis.
                let offset = rank - shape.len();
                shape
                    .iter()
                    .enumerate()
                    .all(|(i, &d)| d == 1 || i + offset == a)
            });
        if per_channel {
            Ok(Some(values.to_vec()))
        } else if values.len() == 1 {
            Ok(Some(vec![values[0]; self.outputs]))
        } else {
            Ok(None)
        }
    }

    /// Writes every value of `y`. Only called where [`planned`] holds.
    #[allow(unsafe_code)]
    fn run(&self, x: &[f32], y: &mut [f32]) {
        assert!(
            planned(),
            "pointwise op planned on a CPU without AVX-512F and FMA"
        );
        // SAFETY: `planned` saw the CPU has AVX-512F and FMA.
        unsafe { self.run_avx512(x, y) }
    }

    #[target_feature(enable = "avx512f,fma")]
    fn run_avx512(&self, x: &[f32], y: &mut [f32]) {
        let (p, i, o) = (self.points, self.inputs, self.outputs);
        let bias = self.bias.as_deref().map(|b| b.as_slice());
        let xt;
        let (a, m, b, ldb, n, bias) = if self.rows_are_points {
            let a = if self.input_last {
                x
            } else {
                xt = super::patch::transposed(x, i, p);
                &xt
            };
            let ldb = o.next_multiple_of(self.tile.columns());
            (a, p, &self.weights[..], ldb, o, bias.map(Bias::Columns))
        } else {
            let b = if self.input_last {
                xt = super::patch::transposed(x, p, i);
                &xt
            } else {
                x
            };
            (&self.weights[..], o, b, p, p, bias.map(Bias::Rows))
        };
        let k = i;
        let run = |c: &mut [f32]| multiply(self.tile, a, m, k, Right::Rows(b, ldb), n, c, bias);
        if self.rows_are_points == self.output_last {
            run(y);
        } else {
            let mut c = vec![0f32; y.len()];
            run(&mut c);
            super::patch::transpose_into(&c, m, n, y);
        }
    }
}

/// Whether the op is planned on this CPU (see the module's notes).
pub(super) fn planned() -> bool {
    super::x86::widest() == super::x86::Width::Avx512 && std::arch::is_x86_feature_detected!("fma")
}

#[derive(Clone, Copy)]
pub(super) enum Bias<'a> {
    /// One value per row of the product (a channel-first output).
    Rows(&'a [f32]),
    /// One value per column, padded to a whole number of blocks.
    Columns(&'a [f32]),
}

/// [`product`] in blocks of `tile`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,fma")]
pub(super) fn multiply(
    tile: Tile,
    a: &[f32],
    m: usize,
    k: usize,
    b: Right,
    n: usize,
    c: &mut [f32],
    bias: Option<Bias>,
) {
    match tile {
        Tile::R6V4 => product::<6, 4>(a, m, k, b, n, c, bias),
        Tile::R12V2 => product::<12, 2>(a, m, k, b, n, c, bias),
        Tile::R12V1 => product::<12, 1>(a, m, k, b, n, c, bias),
        Tile::R24V1 => product::<24, 1>(a, m, k, b, n, c, bias),
    }
}

/// The right-hand matrix of a product.
#[derive(Clone, Copy)]
pub(super) enum Right<'a> {
    /// `k` rows, `ldb` values apart.
    Rows(&'a [f32], usize),
    /// Packed: for each block of the tile's columns, its `k` rows one
    /// after the other, the last block padded with zeros.
    Panels(&'a [f32]),
}

/// `c[m][n] = a[m][k] · b[k][..n] (+ bias)`: each
/// value a chain of fused multiply-adds over k in order from zero, then
/// the bias added. `c` is `m` rows of `n`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,fma")]
fn product<const MR: usize, const NV: usize>(
    a: &[f32],
    m: usize,
    k: usize,
    b: Right,
    n: usize,
    c: &mut [f32],
    bias: Option<Bias>,
) {
    let nr = 16 * NV;
    let mut panel = Vec::new();
    // Sums of a last block narrower than `nr`, on their way to or from `c`.
    let mut spill_block = [0f32; 64];
    let spill = &mut spill_block[..nr];
    for j0 in (0..n).step_by(nr) {
        let width = nr.min(n - j0);
        // A last block narrower than the rows of `b` are long is read
        // from a zero-padded copy.
        let (block_b, ld, at) = match b {
            Right::Panels(p) => (p, nr, j0 * k),
            Right::Rows(b, ldb) if j0 + nr <= ldb => (b, ldb, j0),
            Right::Rows(b, ldb) => {
                panel.clear();
                panel.resize(k * nr, 0f32);
                for kk in 0..k {
                    panel[kk * nr..kk * nr + width].copy_from_slice(&b[kk * ldb + j0..][..width]);
                }
                (&panel[..], nr, 0)
            }
        };
        let column_bias = match bias {
            Some(Bias::Columns(b)) => Some(vectors::<NV>(&b[j0..j0 + nr])),
            _ => None,
        };
        // The sums run over k in chunks whose slice of `b` stays in
        // the L1 cache while every block of rows reads it; between chunks
        // they wait in `c`, and carry on from the same values.
        let chunk = (KC_VALUES / nr).max(1);
        for k0 in (0..k).step_by(chunk) {
            let k1 = (k0 + chunk).min(k);
            let last = k1 == k;
            for i0 in (0..m).step_by(MR) {
                // Rows past the end repeat the last one; their sums are
                // not stored.
                let rows: [&[f32]; MR] = std::array::from_fn(|r| {
                    let i = (i0 + r).min(m - 1);
                    &a[i * k + k0..i * k + k1]
                });
                let mut start = [[_mm512_setzero_ps(); NV]; MR];
                if k0 > 0 {
                    for (r, start) in start.iter_mut().enumerate() {
                        let i = (i0 + r).min(m - 1);
                        let sums = if width == nr {
                            &c[i * n + j0..][..nr]
                        } else {
                            spill[..width].copy_from_slice(&c[i * n + j0..][..width]);
                            &*spill
                        };
                        *start = vectors::<NV>(sums);
                    }
                }
                let acc = block::<MR, NV>(start, &rows, block_b, ld, at + k0 * ld);
                for (r, mut sums) in acc.into_iter().enumerate().take(m - i0) {
                    let i = i0 + r;
                    // The bias goes on once the sums are complete.
                    let add = match (last, column_bias, bias) {
                        (false, _, _) => None,
                        (true, Some(b), _) => Some(b),
                        (true, None, Some(Bias::Rows(b))) => Some([_mm512_set1_ps(b[i]); NV]),
                        (true, None, _) => None,
                    };
                    if let Some(add) = add {
                        for (s, b) in sums.iter_mut().zip(add) {
                            *s = _mm512_add_ps(*s, b);
                        }
                    }
                    let out = &mut c[i * n + j0..][..width];
                    if width == nr {
                        store(&sums, out);
                    } else {
                        store(&sums, spill);
                        out.copy_from_slice(&spill[..width]);
                    }
                }
            }
        }
    }
}

/// Values of `b` one chunk of the sums reads (`chunk × 16 · NV`): 24 KiB,
/// half of a 48 KiB L1 data cache.
const KC_VALUES: usize = 6 * 1024;

/// One block of sums carried on from `start`: `MR` rows of `a` against
/// `16 · NV` columns of `b` from offset `at`, in registers.
#[inline]
#[target_feature(enable = "avx512f,fma")]
fn block<const MR: usize, const NV: usize>(
    start: [[__m512; NV]; MR],
    rows: &[&[f32]; MR],
    b: &[f32],
    ldb: usize,
    at: usize,
) -> [[__m512; NV]; MR] {
    let mut acc = start;
    let k = rows[0].len();
    for kk in 0..k {
        let col = vectors::<NV>(&b[kk * ldb + at..][..16 * NV]);
        for (acc, row) in acc.iter_mut().zip(rows) {
            let v = _mm512_set1_ps(row[kk]);
            for (s, w) in acc.iter_mut().zip(col) {
                *s = _mm512_fmadd_ps(v, w, *s);
            }
        }
    }
    acc
}

/// `16 · NV` values as vectors.
#[inline]
#[target_feature(enable = "avx512f")]
#[allow(unsafe_code)]
fn vectors<const NV: usize>(x: &[f32]) -> [__m512; NV] {
    assert_eq!(x.len(), 16 * NV);
    let mut vectors = [_mm512_setzero_ps(); NV];
    for (v, vector) in vectors.iter_mut().enumerate() {
        // SAFETY: each load reads 16 of the values `x` holds.
        *vector = unsafe { _mm512_loadu_ps(x[v * 16..].as_ptr()) };
    }
    vectors
}

#[inline]
#[target_feature(enable = "avx512f")]
#[allow(unsafe_code)]
fn store<const NV: usize>(sums: &[__m512; NV], out: &mut [f32]) {
    assert_eq!(out.len(), 16 * NV);
    for (v, s) in sums.iter().enumerate() {
        // SAFETY: each store writes 16 of the values `out` holds.
        unsafe { _mm512_storeu_ps(out[v * 16..].as_mut_ptr(), *s) }
    }
}

impl Op for Pointwise {
    fn name(&self) -> StaticName {
        "OurPointwise".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{} points, {} → {} channels, channel-{} → channel-{}, product {} × {:?}{}",
            self.points,
            self.inputs,
            self.outputs,
            if self.input_last { "last" } else { "first" },
            if self.output_last { "last" } else { "first" },
            if self.rows_are_points {
                "points"
            } else {
                "channels"
            },
            self.tile,
            if self.bias.is_some() { ", bias" } else { "" }
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for Pointwise {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let len = self.points * self.inputs;
        super::patch::eval_f32("pointwise", &inputs[0], len, &self.output_shape, |x, y| {
            self.run(x, y)
        })
    }
}

impl TypedOp for Pointwise {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(&*self.output_shape)))
    }

    as_op!();
}

/// Replaces each 1×1 convolution of a decluttered `model` (an `EinSum`
/// [`Pointwise`] takes, with the bias `Add` after it when there is one);
/// returns how many. Only where the CPU has AVX-512F and FMA (see the
/// module's notes).
pub fn substitute(model: &mut TypedModel) -> TractResult<usize> {
    if planned() {
        substitute_planned(model, None)
    } else {
        Ok(0)
    }
}

/// Whether node `id`'s one output goes on to a binary op with a constant
/// (a batch normalisation's `Mul` and `Add` left after the layer, a
/// Relu's `Max`). tract fuses those into its matrix product's epilogue;
/// after ours they ran as separate passes with generic broadcasting,
/// which made UltraFace slim 1.8× slower (its `Mul` and `Add` nodes 0.9 ms
/// each). Such layers stay tract's.
pub(super) fn feeds_a_constant_step(model: &TypedModel, id: usize) -> TractResult<bool> {
    use tract_onnx::tract_core::ops::binary::TypedBinOp;
    let node = model.node(id);
    for next in &node.outputs[0].successors {
        let then = model.node(next.node);
        if then.op_is::<TypedBinOp>() && then.inputs.len() == 2 {
            let other = model.outlet_fact(then.inputs[1 - next.slot])?;
            if other.konst.is_some() || other.uniform.is_some() {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// [`substitute`], with the product's layout and tile `forced` (tests).
fn substitute_planned(model: &mut TypedModel, forced: Option<(bool, Tile)>) -> TractResult<usize> {
    let mut found = Vec::new();
    let outputs = model.output_outlets()?.to_vec();
    for node in model.nodes() {
        let Some(mut op) = Pointwise::of(model, node, forced)? else {
            continue;
        };
        let mut last = node.id;
        if let [next] = &*node.outputs[0].successors {
            if !outputs.contains(&OutletId::new(node.id, 0)) {
                let add = model.node(next.node);
                if let Some(mut bias) = op.bias_of(model, add, next.slot)? {
                    bias.resize(op.outputs.next_multiple_of(op.tile.columns()), 0.0);
                    op.bias = Some(Arc::new(bias));
                    last = add.id;
                }
            }
        }
        if feeds_a_constant_step(model, last)? {
            continue;
        }
        found.push((node.id, last, op));
    }
    let n = found.len();
    for (first, last, op) in found {
        super::patch::replace_with(model, first, last, op)?;
    }
    if n > 0 {
        model.compact()?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_graphs::{self, float_tensor, ints};
    use proptest::prelude::*;
    use tract_onnx::pb::ModelProto;

    #[derive(Debug, Clone)]
    struct Case {
        inputs: usize,
        outputs: usize,
        hw: [usize; 2],
        bias: bool,
        /// The graph's input is `[1, H, W, C]`, transposed to the Conv.
        input_last: bool,
        /// The graph's output is `[1, H, W, C]`, transposed from the Conv.
        output_last: bool,
    }

    /// A 1×1 Conv between optional transposes (tract folds them into the
    /// product's layout), weights from a seeded generator.
    fn model(case: &Case) -> ModelProto {
        let (i, o) = (case.inputs, case.outputs);
        let mut rng = fastrand::Rng::with_seed((i * 131 + o) as u64);
        let mut initializer = vec![float_tensor(
            "w",
            &[o, i, 1, 1],
            (0..o * i).map(|_| rng.f32() * 2.0 - 1.0).collect(),
        )];
        let mut conv_in = vec![if case.input_last { "x_nchw" } else { "x" }, "w"];
        if case.bias {
            initializer.push(float_tensor(
                "b",
                &[o],
                (0..o).map(|_| rng.f32() - 0.5).collect(),
            ));
            conv_in.push("b");
        }
        let mut nodes = vec![];
        if case.input_last {
            nodes.push(test_graphs::node(
                "Transpose",
                &["x"],
                "x_nchw",
                vec![ints("perm", &[0, 3, 1, 2])],
            ));
        }
        let conv_out = if case.output_last { "y_nchw" } else { "y" };
        nodes.push(test_graphs::node(
            "Conv",
            &conv_in,
            conv_out,
            vec![ints("kernel_shape", &[1, 1])],
        ));
        if case.output_last {
            nodes.push(test_graphs::node(
                "Transpose",
                &["y_nchw"],
                "y",
                vec![ints("perm", &[0, 2, 3, 1])],
            ));
        }
        test_graphs::model(
            "pointwise",
            nodes,
            initializer,
            vec![test_graphs::float_value("x", &input_shape(case))],
            vec![test_graphs::untyped_value("y")],
        )
    }

    fn input_shape(case: &Case) -> Vec<usize> {
        let [h, w] = case.hw;
        if case.input_last {
            vec![1, h, w, case.inputs]
        } else {
            vec![1, case.inputs, h, w]
        }
    }

    /// tract's plan and ours, with `forced` layout and tile, on one
    /// random input: (substituted, tract's output, ours).
    fn both(case: &Case, forced: Option<(bool, Tile)>) -> (usize, Tensor, Tensor) {
        let x = test_graphs::seeded(&input_shape(case), 5);
        test_graphs::decluttered_plans(&model(case), &x, |m| substitute_planned(m, forced))
    }

    fn cases() -> impl Strategy<Value = Case> {
        (
            (2usize..80, 2usize..140, 1usize..20, 1usize..20),
            (any::<bool>(), any::<bool>(), any::<bool>()),
        )
            .prop_map(
                |((inputs, outputs, h, w), (bias, input_last, output_last))| Case {
                    inputs,
                    outputs,
                    hw: [h, w],
                    bias,
                    input_last,
                    output_last,
                },
            )
            .prop_filter("two points or more", |c| c.hw[0] * c.hw[1] >= 2)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]
        #[test]
        fn the_same_answers_as_tracts_matrix_product(
            case in cases(),
            rows_are_points in any::<bool>(),
            tile in prop::sample::select(Tile::ALL.to_vec()),
        ) {
            if !planned() {
                eprintln!("no AVX-512F and FMA here: the op is not planned, nothing to compare");
                return Ok(());
            }
            let (n, given, ours) = both(&case, Some((rows_are_points, tile)));
            prop_assert_eq!(n, 1);
            // Bit for bit: tract's kernels sum in the same order.
            let bits = |t: &Tensor| -> Vec<u32> {
                super::super::patch::plain_slice::<f32>(t).unwrap().iter().map(|v| v.to_bits()).collect()
            };
            prop_assert_eq!(given.shape(), ours.shape());
            prop_assert_eq!(bits(&given), bits(&ours), "{:?}", case);
        }
    }

    #[test]
    fn the_plan_weighs_padding_against_copies() {
        // Keyword Spotting: channel-last through, no copy, full blocks.
        assert_eq!(plan(125, 64, 64, true, true), (true, Tile::R6V4));
        // 9 points to a channel-first output: rows of points and one
        // transpose, not 256 rows of 9 columns padded to 16.
        assert_eq!(plan(9, 256, 256, true, false), (true, Tile::R6V4));
        // 16 output channels: one vector wide.
        assert_eq!(plan(2304, 8, 16, true, true), (true, Tile::R12V1));
        // Channel-first through with many points: rows of channels.
        assert!(!plan(576, 32, 32, false, false).0);
    }
}
