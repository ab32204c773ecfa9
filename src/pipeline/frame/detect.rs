//! Detection postprocessing: YOLOv8, SSD and UltraFace outputs to boxes in
//! the frame's own pixels, per-class NMS, and annotated snapshots.

use super::{Frame, ImageInput, Placement};
use crate::model::manifest::DetectionFormat;
use crate::model::{Model, OutputKind};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Detection {
    pub label: String,
    pub score: f32,
    /// x0, y0, x1, y1 in the frame's pixels.
    #[serde(rename = "box")]
    pub bbox: [f32; 4],
}

/// Detection settings: the manifest's, overridden per pipeline.
#[derive(Debug, Clone)]
pub struct DetectionSpec {
    pub format: DetectionFormat,
    pub score_threshold: f32,
    pub iou_threshold: f32,
    pub max_detections: usize,
    /// Only these labels are reported (empty: all).
    pub classes: Vec<String>,
    pub labels: Vec<String>,
}

impl DetectionSpec {
    pub fn new(model: &Model) -> Result<Option<DetectionSpec>, String> {
        let o = &model.manifest.output;
        if o.kind != OutputKind::Detection {
            return Ok(None);
        }
        let format = o.format.ok_or("output.format is required for detection")?;
        let need = match format {
            DetectionFormat::Yolov8 => 1,
            _ => 2,
        };
        if model.outputs.len() < need {
            return Err(format!(
                "format {format:?} needs {need} outputs; the model has {}",
                model.outputs.len()
            ));
        }
        let labels = if o.labels.is_empty() && format == DetectionFormat::Ultraface {
            vec!["background".into(), "face".into()]
        } else {
            o.labels.clone()
        };
        Ok(Some(DetectionSpec {
            format,
            score_threshold: o.score_threshold.unwrap_or(0.5),
            iou_threshold: o.iou_threshold.unwrap_or(0.45),
            max_detections: o.max_detections.unwrap_or(100),
            classes: Vec::new(),
            labels,
        }))
    }

    fn label(&self, class: usize) -> String {
        self.labels
            .get(class)
            .cloned()
            .unwrap_or_else(|| format!("class_{class}"))
    }

    /// Decodes the model's outputs into boxes in input pixels, filters,
    /// suppresses overlaps per class and maps the survivors to the frame.
    pub fn detect(
        &self,
        outputs: &[Vec<f32>],
        input: &ImageInput,
        placement: &Placement,
    ) -> Result<Vec<Detection>, String> {
        let (iw, ih) = (input.width as f32, input.height as f32);
        let mut cand: Vec<(usize, f32, [f32; 4])> = Vec::new();
        match self.format {
            DetectionFormat::Yolov8 => {
                let out = &outputs[0];
                let classes = self.labels.len().max(1);
                let rows = 4 + classes;
                if !out.len().is_multiple_of(rows) {
                    return Err(format!(
                        "yolov8 output of {} values is not [1, 4 + {classes} labels, anchors]",
                        out.len()
                    ));
                }
                let anchors = out.len() / rows;
                for a in 0..anchors {
                    let at = |r: usize| out[r * anchors + a];
                    let (best, score) = (0..classes)
                        .map(|k| (k, at(4 + k)))
                        .fold((0, f32::MIN), |b, x| if x.1 > b.1 { x } else { b });
                    if score >= self.score_threshold {
                        let (cx, cy, w, h) = (at(0), at(1), at(2), at(3));
                        cand.push((
                            best,
                            score,
                            [cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0],
                        ));
                    }
                }
            }
            DetectionFormat::Ssd | DetectionFormat::Ultraface => {
                let (boxes, scores) = match self.format {
                    DetectionFormat::Ultraface => (&outputs[1], &outputs[0]),
                    _ => (&outputs[0], &outputs[1]),
                };
                let n = boxes.len() / 4;
                if n == 0 || !scores.len().is_multiple_of(n) {
                    return Err(format!(
                        "{} boxes but {} scores: not [1, N, 4] and [1, N, classes]",
                        boxes.len() / 4,
                        scores.len()
                    ));
                }
                let classes = scores.len() / n;
                for i in 0..n {
                    // Class 0 is the background.
                    for k in 1..classes {
                        let s = scores[i * classes + k];
                        if s >= self.score_threshold {
                            let b = &boxes[4 * i..4 * i + 4];
                            cand.push((k, s, [b[0] * iw, b[1] * ih, b[2] * iw, b[3] * ih]));
                        }
                    }
                }
            }
        }
        if !self.classes.is_empty() {
            cand.retain(|(k, _, _)| self.classes.contains(&self.label(*k)));
        }
        let kept = nms(cand, self.iou_threshold, self.max_detections);
        Ok(kept
            .into_iter()
            .map(|(k, score, b)| Detection {
                label: self.label(k),
                score,
                bbox: placement.to_frame(b).map(|v| (v * 10.0).round() / 10.0),
            })
            .collect())
    }
}

pub fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    let union = (a[2] - a[0]).max(0.0) * (a[3] - a[1]).max(0.0)
        + (b[2] - b[0]).max(0.0) * (b[3] - b[1]).max(0.0)
        - inter;
    if union <= 0.0 {
        0.0
    } else {
        inter / union
    }
}

/// Greedy non-maximum suppression per class, best score first.
pub fn nms(
    mut cand: Vec<(usize, f32, [f32; 4])>,
    iou_threshold: f32,
    max: usize,
) -> Vec<(usize, f32, [f32; 4])> {
    cand.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut kept: Vec<(usize, f32, [f32; 4])> = Vec::new();
    for c in cand {
        if kept.len() >= max {
            break;
        }
        if kept
            .iter()
            .all(|k| k.0 != c.0 || iou(&k.2, &c.2) <= iou_threshold)
        {
            kept.push(c);
        }
    }
    kept
}

/// The frame with the detections drawn on it, as a JPEG.
pub fn annotate(frame: &Frame, detections: &[Detection]) -> Vec<u8> {
    let mut rgb = if frame.channels == 3 {
        frame.pixels.clone()
    } else {
        frame.pixels.iter().flat_map(|g| [*g, *g, *g]).collect()
    };
    let (w, h) = (frame.width as i64, frame.height as i64);
    let mut put = |x: i64, y: i64| {
        if (0..w).contains(&x) && (0..h).contains(&y) {
            let i = ((y * w + x) * 3) as usize;
            rgb[i..i + 3].copy_from_slice(&[255, 40, 40]);
        }
    };
    let t = (w.min(h) / 160).max(1);
    for d in detections {
        let [x0, y0, x1, y1] = d.bbox.map(|v| v.round() as i64);
        for k in 0..t {
            for x in x0..=x1 {
                put(x, y0 + k);
                put(x, y1 - k);
            }
            for y in y0..=y1 {
                put(x0 + k, y);
                put(x1 - k, y);
            }
        }
    }
    let mut out = Vec::new();
    let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 80);
    let _ = image::ImageEncoder::write_image(
        enc,
        &rgb,
        frame.width,
        frame.height,
        image::ExtendedColorType::Rgb8,
    );
    out
}
