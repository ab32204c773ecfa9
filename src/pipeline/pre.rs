//! Preprocessing: a raw window (or a fitted frame) → the model's input
//! tensor, driven by the manifest (scale, mean/std, int8/uint8 quantization).

use crate::model::manifest::Layout;
use crate::model::{ElemType, Model};
use tract_onnx::prelude::Tensor;

/// How a sensor model's input holds a window of `samples` samples of
/// `channels` values each (they arrive sample by sample).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SensorLayout {
    pub channels: usize,
    pub samples: usize,
    /// `[…, channels, samples]`: the window is transposed.
    pub channel_first: bool,
}

impl SensorLayout {
    /// From the manifest's `input.layout` (default `samples_channels`) and
    /// the input's shape.
    pub fn of(model: &Model) -> Result<SensorLayout, String> {
        let input = model.input();
        let shape = &input.shape;
        let layout = model
            .manifest
            .input
            .layout
            .unwrap_or(Layout::SamplesChannels);
        let (channels, channel_first) = match layout {
            Layout::SamplesChannels => (shape.last().copied(), false),
            Layout::ChannelsSamples if shape.len() >= 2 => (Some(shape[shape.len() - 2]), true),
            Layout::ChannelsSamples => {
                return Err(format!(
                    "input.layout = channels_samples needs [.., channels, samples]; {input} has rank {}",
                    shape.len()
                ))
            }
            Layout::Flat => (
                Some(model.manifest.input.channels.as_ref().map_or(1, Vec::len)),
                false,
            ),
            image => {
                return Err(format!(
                    "input.layout = {image:?} is for image models; sensor models take samples_channels, channels_samples or flat"
                ))
            }
        };
        let channels = channels
            .filter(|c| *c > 0)
            .ok_or_else(|| format!("model input {input} has no channel dimension"))?;
        if !input.len().is_multiple_of(channels) {
            return Err(format!(
                "model input {input} ({} values) does not hold whole samples of {channels} channels",
                input.len()
            ));
        }
        Ok(SensorLayout {
            channels,
            samples: input.len() / channels,
            channel_first,
        })
    }
}

/// Turns a window of raw samples into the model's input tensor:
/// `(x * scale - mean[c]) / std[c]`, then quantized for int8/uint8 inputs.
#[derive(Debug, Clone)]
pub struct Preprocessor {
    channels: usize,
    scale: f32,
    mean: Vec<f32>,
    inv_std: Vec<f32>,
    shape: Vec<usize>,
    quant: Option<(ElemType, f32, i32)>,
    /// Image models with channel-first input: HWC values are transposed.
    chw: bool,
    scratch: Vec<f32>,
}

impl Preprocessor {
    /// `channels` values make one sample; the model's input holds
    /// `len / channels` samples, oldest first.
    pub fn new(model: &Model, channels: usize) -> Result<Preprocessor, String> {
        let p = &model.manifest.preprocess;
        let per_channel =
            |v: &Option<Vec<f32>>, what: &str, default: f32| -> Result<Vec<f32>, String> {
                match v.as_deref() {
                    None => Ok(vec![default; channels]),
                    Some([one]) => Ok(vec![*one; channels]),
                    Some(v) if v.len() == channels => Ok(v.to_vec()),
                    Some(v) => Err(format!(
                        "preprocess.{what} has {} values for {channels} channels",
                        v.len()
                    )),
                }
            };
        let mean = per_channel(&p.mean, "mean", 0.0)?;
        let inv_std = per_channel(&p.std, "std", 1.0)?
            .iter()
            .map(|s| 1.0 / s)
            .collect();
        let quant = match (model.input_type, model.input_quant) {
            (ElemType::F32, _) => None,
            (t, Some(q)) => Some((t, q.scale, q.zero_point)),
            (t, None) => {
                return Err(format!(
                    "input of type {} without quantization parameters",
                    t.as_str()
                ))
            }
        };
        Ok(Preprocessor {
            channels,
            scale: p.scale.unwrap_or(1.0),
            mean,
            inv_std,
            shape: model.input().shape.clone(),
            quant,
            chw: false,
            scratch: Vec::new(),
        })
    }

    /// A sensor model's preprocessor, laid out as its input wants.
    pub fn sensor(model: &Model) -> Result<Preprocessor, String> {
        let layout = SensorLayout::of(model)?;
        let pre = Preprocessor::new(model, layout.channels)?;
        Ok(if layout.channel_first {
            pre.channel_first()
        } else {
            pre
        })
    }

    /// Values arrive interleaved (HWC) and the model wants them channel-first.
    pub fn channel_first(mut self) -> Preprocessor {
        self.chw = true;
        self
    }

    /// Normalises `raw` into `normalised` (kept for reconstruction scores)
    /// and returns the input tensor.
    pub fn tensor(&mut self, raw: &[f32], normalised: &mut Vec<f32>) -> Tensor {
        normalised.clear();
        normalised.extend(raw.chunks_exact(self.channels).flat_map(|sample| {
            sample
                .iter()
                .enumerate()
                .map(|(c, x)| (x * self.scale - self.mean[c]) * self.inv_std[c])
        }));
        if self.chw {
            super::frame::to_chw(normalised, self.channels, &mut self.scratch);
            std::mem::swap(normalised, &mut self.scratch);
        }
        let built = match self.quant {
            None => Tensor::from_shape(&self.shape, normalised),
            Some((ElemType::I8, s, zp)) => {
                let q: Vec<i8> = normalised
                    .iter()
                    .map(|x| quantize(*x, s, zp, -128, 127) as i8)
                    .collect();
                Tensor::from_shape(&self.shape, &q)
            }
            Some((_, s, zp)) => {
                let q: Vec<u8> = normalised
                    .iter()
                    .map(|x| quantize(*x, s, zp, 0, 255) as u8)
                    .collect();
                Tensor::from_shape(&self.shape, &q)
            }
        };
        // The shape's element count equals the window's by construction.
        built.expect("window length matches the model input")
    }
}

fn quantize(x: f32, scale: f32, zero_point: i32, lo: i32, hi: i32) -> i32 {
    // Round half to even, as ONNX QuantizeLinear does; clamped first (the
    // bounds are integers, so that is the same) and NaN to the zero point.
    let t = x / scale;
    let t = if t.is_nan() {
        0.0
    } else {
        t.max((lo - zero_point) as f32)
            .min((hi - zero_point) as f32)
    };
    crate::model::kernels::fakequant::round_ties_even_small(t) as i32 + zero_point
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantize_rounds_half_to_even_and_saturates() {
        assert_eq!(quantize(0.5, 1.0, 0, -128, 127), 0);
        assert_eq!(quantize(1.5, 1.0, 0, -128, 127), 2);
        assert_eq!(quantize(1000.0, 0.1, 0, -128, 127), 127);
        assert_eq!(quantize(-1.0, 0.5, 3, 0, 255), 1);
        assert_eq!(quantize(-1000.0, 1.0, 0, 0, 255), 0);
        assert_eq!(quantize(2.5, 1.0, 0, -128, 127), 2);
        assert_eq!(quantize(-2.5, 1.0, 0, -128, 127), -2);
        assert_eq!(quantize(f32::NAN, 1.0, 5, -128, 127), 5);
        assert_eq!(quantize(f32::INFINITY, 1.0, 5, -128, 127), 127);
        assert_eq!(quantize(f32::NEG_INFINITY, 1.0, 200, 0, 255), 0);
    }
}
