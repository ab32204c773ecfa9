//! Postprocessing: the model's output → the result's `output` (top-k
//! classes with labels, anomaly score, raw values), driven by the manifest.

use crate::model::{AnomalyScore, Model, OutputKind};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scored {
    pub label: String,
    pub score: f32,
}

/// The `output` object of a result message.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Output {
    Classification {
        top: Vec<Scored>,
    },
    Anomaly {
        score: f32,
        anomaly: bool,
    },
    Detection {
        detections: Vec<super::frame::Detection>,
    },
    Raw {
        values: Vec<f32>,
    },
}

pub fn softmax(v: &mut [f32]) {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for x in v.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    for x in v.iter_mut() {
        *x /= sum;
    }
}

/// Interprets a model output per its manifest. `normalised` is the input
/// the model was fed (before quantization), for reconstruction scores.
/// A non-finite output is an error, never a result.
pub fn postprocess(model: &Model, mut out: Vec<f32>, normalised: &[f32]) -> Result<Output, String> {
    if let Some(i) = out.iter().position(|v| !v.is_finite()) {
        return Err(format!(
            "model output {} is not finite at index {i}",
            model.output().name
        ));
    }
    let spec = &model.manifest.output;
    Ok(match spec.kind {
        OutputKind::Classification => {
            if spec.softmax {
                softmax(&mut out);
            }
            let k = spec.top_k.unwrap_or(1).min(out.len());
            let mut idx: Vec<usize> = (0..out.len()).collect();
            // Stable sort: ties keep class order, so results are deterministic.
            idx.sort_by(|a, b| out[*b].total_cmp(&out[*a]));
            let top = idx[..k]
                .iter()
                .map(|&i| Scored {
                    label: spec
                        .labels
                        .get(i)
                        .cloned()
                        .unwrap_or_else(|| format!("class_{i}")),
                    score: out[i],
                })
                .collect();
            Output::Classification { top }
        }
        OutputKind::Anomaly => {
            let score = match spec.score {
                AnomalyScore::Output => out[0],
                AnomalyScore::ReconstructionMse => {
                    out.iter()
                        .zip(normalised)
                        .map(|(o, x)| (o - x) * (o - x))
                        .sum::<f32>()
                        / out.len() as f32
                }
            };
            Output::Anomaly {
                score,
                anomaly: score > spec.threshold.unwrap_or(f32::INFINITY),
            }
        }
        OutputKind::Raw => Output::Raw { values: out },
        OutputKind::Detection => {
            return Err("detection output needs the camera pipeline's postprocessing".into())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_is_a_distribution_and_keeps_order() {
        let mut v = vec![1.0, 3.0, -2.0, 10.0];
        softmax(&mut v);
        assert!((v.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(v[3] > v[1] && v[1] > v[0] && v[0] > v[2]);
        // Large logits must not overflow into NaN.
        let mut big = vec![1000.0, 999.0];
        softmax(&mut big);
        assert!(big.iter().all(|x| x.is_finite()) && big[0] > big[1]);
    }
}
