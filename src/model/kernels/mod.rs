//! edgeinfer's own compute kernels: tract ops of ours that a tract plan
//! runs in place of some of tract's own nodes, where `--profile` showed
//! tract slow. Each gives tract's answers (bit for bit, or value for value
//! for the copies), held to tract's own plan by a property test beside it.
//!
//! | file | replaces (in tract's plan) | runs on | measured |
//! |---|---|---|---|
//! | [`fakequant`] | an activation `QuantizeLinear → DequantizeLinear` pair (and a Relu before it) | every CPU; loops at SSE2/AVX/AVX-512 width on x86-64 ([`x86`]) | VWW: the pair was a quarter of the model (`rintf` per element) |
//! | [`depthwise`] | a depthwise `Conv` (and the per-channel `Mul`/`Add` after it), channel-last or plane by plane | x86-64 (tract's AArch64 kernel rounds differently); SSE2/AVX/AVX-512 loops | KWS channel-last 0.053 → 0.038 ms by `--profile` |
//! | [`softmax`] | a `Softmax` over rows of two | every CPU | UltraFace slim: 1.54 of 8.57 ms before |
//! | [`axis_softmax`] | a `Softmax` over an axis that is not the last (YOLOv8/YOLO11's DFL head) | every CPU | nudenet's YOLOv8n: 24.0 of 73.3 ms before |
//! | [`pad`] | a constant `Pad` of the optimised plan | every CPU | VWW: 7 % of the model before |
//! | [`downsample`] | a `Downsample` of the optimised plan | every CPU | ResNet-8: 0.050 of 0.49 ms before |
//! | [`pointwise`] | a 1×1 `Conv` (`OptMatMulPack` + `OptMatMul`) and its bias `Add` | x86-64 with AVX-512F and FMA | KWS layer 0.0125 → 0.006 ms |
//! | [`conv`] | a one-group channel-first `Conv` (`LazyIm2col` + `OptMatMul`): first layers of ≤ 4 channels, stride-1 layers of ≥ 256 points | x86-64 with AVX-512F and FMA | detector 0.84 → 0.70 ms |
//!
//! The figures are single-thread `edgeinfer bench --profile` medians on
//! this project's AVX-512 x86-64 host (the README's Performance section
//! and each file's doc say how). On ARM only the portable ones run
//! (fakequant, softmax, pad, downsample); ARM figures are instruction
//! counts from `../shared/tools/arm-icount`, never times. The longer
//! account of each is [README.md](README.md) beside this file.
//!
//! [`patch`] is what they share (graph patching, the facts of a
//! convolution node, tensor plumbing) and sits below them and the engine
//! seam alike. `EDGEINFER_OWN_OPS=0` in the environment plans with tract's
//! ops alone — to compare, or to rule ours out when a model answers
//! unexpectedly; `EDGEINFER_AVX512=0` keeps the loops at AVX width.

mod axis_softmax;
#[cfg(target_arch = "x86_64")]
mod conv;
mod depthwise;
mod downsample;
pub(crate) mod fakequant;
mod pad;
pub(crate) mod patch;
#[cfg(target_arch = "x86_64")]
mod pointwise;
mod softmax;
#[cfg(target_arch = "x86_64")]
mod x86;

pub(crate) use patch::plain_slice;
use tract_onnx::prelude::*;

/// `EDGEINFER_OWN_OPS=0` plans with tract's ops alone: to compare, or to
/// rule ours out when a model answers unexpectedly (README "Engines").
pub fn own_ops_wanted() -> bool {
    std::env::var_os("EDGEINFER_OWN_OPS").is_none_or(|v| v != "0")
}

/// How many of edgeinfer's own ops a plan runs in place of tract's.
#[derive(Debug, Default)]
pub struct OwnOps {
    fake_quantize: usize,
    /// Relus before those pairs taken into them.
    fake_quantize_relus: usize,
    depthwise: usize,
    /// Per-channel Mul and Add nodes folded into those.
    depthwise_steps: usize,
    pair_softmax: usize,
    /// Softmax over a leading or middle axis.
    axis_softmax: usize,
    constant_pad: usize,
    downsample: usize,
    /// 1×1 convolutions (with their bias `Add`).
    pointwise: usize,
    /// Other convolutions of one group, by im2col and our product.
    patch_conv: usize,
}

impl OwnOps {
    /// Puts our ops in place of tract's in a decluttered model (before
    /// tract's optimiser), unless `EDGEINFER_OWN_OPS=0`.
    pub fn substitute_decluttered(&mut self, typed: &mut TypedModel) -> TractResult<()> {
        if !own_ops_wanted() {
            return Ok(());
        }
        (self.fake_quantize, self.fake_quantize_relus) = fakequant::fuse_pairs(typed)?;
        (self.depthwise, self.depthwise_steps) = depthwise::substitute(typed)?;
        self.pair_softmax = softmax::substitute(typed)?;
        self.axis_softmax = axis_softmax::substitute(typed)?;
        #[cfg(target_arch = "x86_64")]
        {
            self.pointwise = pointwise::substitute(typed)?;
            self.patch_conv = conv::substitute(typed)?;
        }
        Ok(())
    }

    /// Our ops in place of nodes tract's optimiser adds: the Pad before a
    /// padded convolution, the Downsample before a strided 1×1 one.
    pub fn substitute_optimized(&mut self, optimized: &mut TypedModel) -> TractResult<()> {
        if !own_ops_wanted() {
            return Ok(());
        }
        self.constant_pad = pad::substitute(optimized)?;
        self.downsample = downsample::substitute(optimized)?;
        Ok(())
    }

    /// A line for the model's notes per kind of our op the plan runs.
    pub fn notes(&self) -> Vec<String> {
        let relus = match self.fake_quantize_relus {
            0 => String::new(),
            n => format!(", {n} of them with the Relu before them"),
        };
        let steps = match self.depthwise_steps {
            0 => String::new(),
            n => format!(", with the {n} per-channel Mul and Add nodes after them"),
        };
        [
            (self.fake_quantize, format!("activation QuantizeLinear → DequantizeLinear pairs run as one fused op each{relus} (same answers, one pass)")),
            (self.depthwise, format!("depthwise convolutions run as edgeinfer's own vectorised op, channel-last or plane by plane{steps} (same answers)")),
            (self.constant_pad, "constant Pad nodes of the optimised plan run as edgeinfer's own op, copying rows instead of values (same answers)".into()),
            (self.downsample, "Downsample nodes of the optimised plan (before strided 1×1 convolutions) run as edgeinfer's own op, copying blocks instead of values (same answers)".into()),
            (self.pointwise, "1×1 convolutions run as edgeinfer's own matrix product, without packing the activations (same answers)".into()),
            (self.patch_conv, "convolutions run as edgeinfer's own op, patches copied once then its matrix product (same answers)".into()),
            (self.pair_softmax, "softmax over pairs run as edgeinfer's own op, one pass over the tensor instead of one per pair (same answers)".into()),
            (self.axis_softmax, "softmax over a leading or middle axis run as edgeinfer's own op, without tract's per-row views and with each exponential computed once (same answers)".into()),
        ]
        .into_iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!("{n} {what}"))
        .collect()
    }
}
