//! Camera frames: decode (JPEG, PNG, raw RGB8/GRAY8) within limits checked
//! before any pixel is decoded, fit to the model input (stretch or
//! letterbox, SIMD resize), and detection postprocessing (YOLOv8, SSD,
//! UltraFace; per-class NMS; boxes back in the frame's own pixels).

pub mod worker;

use super::sensor::InputError;
use crate::model::manifest::{ColorOrder, DetectionFormat, Layout, ResizeMode};
use crate::model::{Model, OutputKind};
use fast_image_resize as fr;
use serde::Serialize;
use std::io::Cursor;

/// How frames arrive on a camera pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameFormat {
    /// The payload is a JPEG or PNG file (told apart by its magic bytes).
    Encoded,
    Rgb8 {
        width: u32,
        height: u32,
    },
    Gray8 {
        width: u32,
        height: u32,
    },
}

/// A decoded frame: 8-bit RGB (or grey), rows top to bottom.
#[derive(Debug, Clone)]
pub struct Frame {
    pub width: u32,
    pub height: u32,
    /// 3 (RGB) or 1 (grey).
    pub channels: u8,
    pub pixels: Vec<u8>,
}

/// What decoding one frame may take.
#[derive(Debug, Clone, Copy)]
pub struct FrameLimits<'a> {
    /// Pixels, read from the header before decoding.
    pub max_pixels: u64,
    /// Bytes that decoding and fitting the frame may allocate, estimated
    /// from the header ([`frame_cost`]); 0: no limit.
    pub max_bytes: u64,
    /// The model input the frame is fitted to (the resize's share).
    pub input: Option<&'a ImageInput>,
}

impl FrameLimits<'_> {
    /// A pixel limit alone.
    pub fn pixels(max_pixels: u64) -> FrameLimits<'static> {
        FrameLimits {
            max_pixels,
            max_bytes: 0,
            input: None,
        }
    }
}

/// Decodes a frame. The pixel count and what decoding and fitting would
/// allocate are checked from the header before any decoding, and the
/// decoder's own allocation limit is set, so a small file that claims a
/// huge (or absurdly shaped) image is refused, not decoded. A JPEG must be
/// whole (its end-of-image marker after the last scan): decoders fill a
/// cut-off JPEG with grey and would answer for half a picture.
pub fn decode(
    payload: &[u8],
    format: FrameFormat,
    limits: &FrameLimits,
) -> Result<Frame, InputError> {
    if payload.is_empty() {
        return Err(InputError::Empty);
    }
    let raw = |w: u32, h: u32, ch: u8| -> Result<Frame, InputError> {
        let want = w as usize * h as usize * ch as usize;
        if payload.len() != want {
            return Err(InputError::Image(format!(
                "{} bytes, but {w}x{h} with {ch} channel(s) is {want}",
                payload.len()
            )));
        }
        check_cost(w, h, want as u64, ch, "raw", limits)?;
        Ok(Frame {
            width: w,
            height: h,
            channels: ch,
            pixels: payload.to_vec(),
        })
    };
    match format {
        FrameFormat::Rgb8 { width, height } => return raw(width, height, 3),
        FrameFormat::Gray8 { width, height } => return raw(width, height, 1),
        FrameFormat::Encoded => {}
    }
    let kind = if payload.starts_with(&[0xFF, 0xD8, 0xFF]) {
        image::ImageFormat::Jpeg
    } else if payload.starts_with(b"\x89PNG\r\n\x1a\n") {
        image::ImageFormat::Png
    } else {
        return Err(InputError::Image(
            "not a JPEG or PNG file (unknown magic bytes)".into(),
        ));
    };
    let mut progressive = false;
    if kind == image::ImageFormat::Jpeg {
        let scan = scan_jpeg(payload);
        if !scan.complete {
            return Err(InputError::Image(
                "truncated JPEG (no end-of-image marker after its last scan)".into(),
            ));
        }
        progressive = scan.progressive;
    }
    let mut limits_img = image::Limits::default();
    let max_alloc = match limits.max_bytes {
        0 => limits.max_pixels.saturating_mul(4),
        n => n,
    };
    limits_img.max_alloc = Some(max_alloc.max(1 << 20));
    let mut reader = image::ImageReader::with_format(Cursor::new(payload), kind);
    reader.limits(limits_img.clone());
    let header = reader
        .into_decoder()
        .map_err(|e| InputError::Image(format!("unreadable {kind:?} header: {e}")))?;
    let (w, h) = image::ImageDecoder::dimensions(&header);
    let color = image::ImageDecoder::color_type(&header);
    let decoded_bytes = image::ImageDecoder::total_bytes(&header);
    drop(header);
    let pixels = w as u64 * h as u64;
    if pixels == 0 || pixels > limits.max_pixels {
        return Err(InputError::TooManyPixels {
            width: w,
            height: h,
            max: limits.max_pixels,
        });
    }
    let gray = color == image::ColorType::L8;
    let channels: u8 = if gray { 1 } else { 3 };
    let mut decode_bytes = decoded_bytes;
    if !gray && color != image::ColorType::Rgb8 {
        // Alpha, 16 bits or a palette: converted to RGB8 beside the original.
        decode_bytes += pixels * 3;
    }
    if progressive {
        // A progressive JPEG keeps every DCT coefficient (16 bits each, up
        // to three full-size components) until its last scan.
        decode_bytes += pixels * 6;
    }
    check_cost(
        w,
        h,
        decode_bytes,
        channels,
        kind.extensions_str()[0],
        limits,
    )?;
    let mut reader = image::ImageReader::with_format(Cursor::new(payload), kind);
    reader.limits(limits_img);
    let img = reader
        .decode()
        .map_err(|e| InputError::Image(format!("corrupt or truncated {kind:?}: {e}")))?;
    Ok(match img {
        image::DynamicImage::ImageLuma8(g) => Frame {
            width: w,
            height: h,
            channels: 1,
            pixels: g.into_raw(),
        },
        other => Frame {
            width: w,
            height: h,
            channels: 3,
            pixels: other.into_rgb8().into_raw(),
        },
    })
}

/// Refuses a frame whose decoding (`decode_bytes`) and fitting would
/// allocate more than `limits.max_bytes`.
fn check_cost(
    w: u32,
    h: u32,
    decode_bytes: u64,
    channels: u8,
    what: &str,
    limits: &FrameLimits,
) -> Result<(), InputError> {
    if limits.max_bytes == 0 {
        return Ok(());
    }
    let fit = limits
        .input
        .map_or(0, |input| fit_cost(w, h, channels, input));
    let need = decode_bytes.saturating_add(fit);
    if need > limits.max_bytes {
        return Err(InputError::TooCostly {
            what: format!("{w}x{h} {what}"),
            need,
            max: limits.max_bytes,
        });
    }
    Ok(())
}

/// An upper bound of what [`Fitter::fit`] allocates for a `w`×`h` frame of
/// `channels`: colour conversion, the resize's coefficients (f64, a window
/// per output pixel that widens with the downscale factor) and its
/// intermediate image (fast_image_resize runs the vertical pass first on
/// 8-bit images: source width × target height), the resized image and the
/// float tensors.
pub fn fit_cost(w: u32, h: u32, channels: u8, input: &ImageInput) -> u64 {
    let c = input.channels as u64;
    let (w64, h64) = (w as u64, h as u64);
    let mut bytes = 0u64;
    if channels as usize != input.channels {
        bytes += w64 * h64 * c;
    }
    let (tw, th, _) = target(w, h, input);
    let (tw, th) = (tw as u64, th as u64);
    let axis = |src: u64, dst: u64| -> u64 {
        if src == dst {
            return 0;
        }
        let scale = (src as f64 / dst as f64).max(1.0);
        let window = 2 * scale.ceil() as u64 + 1;
        // f64 weights plus their fixed-point copy and bounds.
        window * dst * 16
    };
    bytes += axis(w64, tw) + axis(h64, th);
    if w64 != tw && h64 != th {
        bytes += w64 * th * c;
    }
    bytes += tw * th * c;
    // The f32 input in HWC, its normalised copy and the tensor.
    bytes += input.width as u64 * input.height as u64 * c * 4 * 3;
    bytes
}

/// What a walk over a JPEG's markers found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JpegScan {
    pub progressive: bool,
    /// An end-of-image marker follows the last scan.
    pub complete: bool,
}

/// Walks a JPEG's marker segments and entropy-coded scans (a marker inside
/// scan data is 0xFF followed by neither 0x00 stuffing nor a restart
/// marker), without decoding anything.
pub fn scan_jpeg(data: &[u8]) -> JpegScan {
    let mut out = JpegScan {
        progressive: false,
        complete: false,
    };
    let mut i = 2; // after SOI
    let len_at = |i: usize| -> Option<usize> {
        Some(u16::from_be_bytes([*data.get(i)?, *data.get(i + 1)?]) as usize)
    };
    while i < data.len() {
        if data[i] != 0xFF {
            return out; // not at a marker: corrupt
        }
        while data.get(i) == Some(&0xFF) {
            i += 1; // fill bytes
        }
        let Some(&marker) = data.get(i) else {
            return out;
        };
        i += 1;
        match marker {
            0xD9 => {
                out.complete = true;
                return out;
            }
            0x01 | 0xD0..=0xD7 => continue, // no length
            _ => {}
        }
        let Some(len) = len_at(i) else { return out };
        if len < 2 {
            return out;
        }
        if matches!(marker, 0xC2 | 0xC6 | 0xCA | 0xCE) {
            out.progressive = true;
        }
        i += len;
        if marker == 0xDA {
            // Entropy-coded data up to the next real marker.
            loop {
                match data.get(i..i + 2) {
                    None => return out,
                    Some([0xFF, next]) if *next != 0x00 && !(0xD0..=0xD7).contains(next) => break,
                    Some(_) => i += 1,
                }
            }
        }
    }
    out
}

/// Where the frame landed in the model input, to map boxes back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Placement {
    /// Input pixels per frame pixel, per axis.
    pub scale_x: f32,
    pub scale_y: f32,
    /// Padding (letterbox) before the frame starts, in input pixels.
    pub pad_x: f32,
    pub pad_y: f32,
    pub frame_w: u32,
    pub frame_h: u32,
}

impl Placement {
    /// A box in input pixels → the frame's pixels, clamped to the frame.
    pub fn to_frame(&self, b: [f32; 4]) -> [f32; 4] {
        let x = |v: f32| ((v - self.pad_x) / self.scale_x).clamp(0.0, self.frame_w as f32);
        let y = |v: f32| ((v - self.pad_y) / self.scale_y).clamp(0.0, self.frame_h as f32);
        [x(b[0]), y(b[1]), x(b[2]), y(b[3])]
    }
}

/// The model's image input: size, layout, colour order, fitting.
#[derive(Debug, Clone)]
pub struct ImageInput {
    pub width: u32,
    pub height: u32,
    pub channels: usize,
    pub layout: Layout,
    pub color: ColorOrder,
    pub resize: ResizeMode,
}

impl ImageInput {
    /// Reads the image geometry from the model's input shape and manifest.
    pub fn new(model: &Model) -> Result<ImageInput, String> {
        let shape = &model.input().shape;
        if shape.len() != 4 || shape[0] != 1 {
            return Err(format!(
                "an image model needs a [1, C, H, W] or [1, H, W, C] input; {} is {:?}",
                model.input().name,
                shape
            ));
        }
        let spec = &model.manifest.input;
        let layout = spec.layout.unwrap_or(if matches!(shape[1], 1 | 3) {
            Layout::Nchw
        } else {
            Layout::Nhwc
        });
        let (c, h, w) = match layout {
            Layout::Nchw => (shape[1], shape[2], shape[3]),
            Layout::Nhwc => (shape[3], shape[1], shape[2]),
        };
        if !matches!(c, 1 | 3) || h == 0 || w == 0 {
            return Err(format!(
                "input {:?} read as {layout:?} has {c} channels of {w}x{h}: expected 1 or 3 channels",
                shape
            ));
        }
        let color = spec.color.unwrap_or(if c == 1 {
            ColorOrder::Gray
        } else {
            ColorOrder::Rgb
        });
        if (color == ColorOrder::Gray) != (c == 1) {
            return Err(format!("input.color = {color:?} does not fit {c} channels"));
        }
        Ok(ImageInput {
            width: w as u32,
            height: h as u32,
            channels: c,
            layout,
            color,
            resize: spec.resize,
        })
    }
}

/// Fits frames to the model input, reusing its buffers across frames.
pub struct Fitter {
    resizer: fr::Resizer,
    resized: Vec<u8>,
}

impl Default for Fitter {
    fn default() -> Self {
        Fitter {
            resizer: fr::Resizer::new(),
            resized: Vec::new(),
        }
    }
}

impl Fitter {
    /// Resizes `frame` into the input geometry and writes interleaved (HWC)
    /// channel values in the model's colour order into `out` as f32 0..255.
    pub fn fit(&mut self, frame: &Frame, input: &ImageInput, out: &mut Vec<f32>) -> Placement {
        // Colour conversion first, on the smaller side of the resize.
        let want = input.channels as u8;
        let converted;
        let src: &[u8] = if frame.channels == want {
            &frame.pixels
        } else if want == 1 {
            converted = frame
                .pixels
                .chunks_exact(3)
                .map(|p| luma(p[0], p[1], p[2]))
                .collect::<Vec<u8>>();
            &converted
        } else {
            converted = frame.pixels.iter().flat_map(|g| [*g, *g, *g]).collect();
            &converted
        };
        let (iw, ih) = (input.width, input.height);
        let (tw, th, placement) = target(frame.width, frame.height, input);
        let pixel_type = if want == 1 {
            fr::PixelType::U8
        } else {
            fr::PixelType::U8x3
        };
        let c = want as usize;
        self.resized.clear();
        self.resized.resize(tw as usize * th as usize * c, 0);
        if tw == frame.width && th == frame.height {
            self.resized.copy_from_slice(src);
        } else {
            let src_img = fr::images::ImageRef::new(frame.width, frame.height, src, pixel_type)
                .expect("buffer matches the frame size");
            let mut dst = fr::images::Image::from_slice_u8(tw, th, &mut self.resized, pixel_type)
                .expect("buffer matches the target size");
            let options = fr::ResizeOptions::new()
                .resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::Bilinear));
            self.resizer
                .resize(&src_img, &mut dst, &options)
                .expect("same pixel type on both sides");
        }
        out.clear();
        out.resize(iw as usize * ih as usize * c, 114.0);
        let (px, py) = (placement.pad_x as usize, placement.pad_y as usize);
        let bgr = input.color == ColorOrder::Bgr;
        for y in 0..th as usize {
            let row = &self.resized[y * tw as usize * c..(y + 1) * tw as usize * c];
            let start = ((y + py) * iw as usize + px) * c;
            let dst = &mut out[start..start + tw as usize * c];
            if bgr {
                for (d, s) in dst.chunks_exact_mut(3).zip(row.chunks_exact(3)) {
                    d[0] = s[2] as f32;
                    d[1] = s[1] as f32;
                    d[2] = s[0] as f32;
                }
            } else {
                for (d, s) in dst.iter_mut().zip(row) {
                    *d = *s as f32;
                }
            }
        }
        placement
    }
}

/// The size a `w`×`h` frame is resized to, and where it lands in the input.
fn target(w: u32, h: u32, input: &ImageInput) -> (u32, u32, Placement) {
    let (iw, ih) = (input.width, input.height);
    match input.resize {
        ResizeMode::Stretch => (
            iw,
            ih,
            Placement {
                scale_x: iw as f32 / w as f32,
                scale_y: ih as f32 / h as f32,
                pad_x: 0.0,
                pad_y: 0.0,
                frame_w: w,
                frame_h: h,
            },
        ),
        ResizeMode::Letterbox => {
            let s = (iw as f32 / w as f32).min(ih as f32 / h as f32);
            let tw = ((w as f32 * s).round() as u32).clamp(1, iw);
            let th = ((h as f32 * s).round() as u32).clamp(1, ih);
            (
                tw,
                th,
                Placement {
                    scale_x: tw as f32 / w as f32,
                    scale_y: th as f32 / h as f32,
                    pad_x: ((iw - tw) / 2) as f32,
                    pad_y: ((ih - th) / 2) as f32,
                    frame_w: w,
                    frame_h: h,
                },
            )
        }
    }
}

fn luma(r: u8, g: u8, b: u8) -> u8 {
    ((r as u32 * 299 + g as u32 * 587 + b as u32 * 114 + 500) / 1000) as u8
}

/// HWC → CHW, in place through `tmp`.
pub fn to_chw(hwc: &[f32], c: usize, chw: &mut Vec<f32>) {
    let n = hwc.len() / c;
    chw.clear();
    chw.resize(hwc.len(), 0.0);
    for (i, px) in hwc.chunks_exact(c).enumerate() {
        for (k, v) in px.iter().enumerate() {
            chw[k * n + i] = *v;
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    /// A PNG whose header claims `w` x `h` pixels, with no image data.
    fn png_header_claiming(w: u32, h: u32) -> Vec<u8> {
        let mut v = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = b"IHDR".to_vec();
        ihdr.extend_from_slice(&w.to_be_bytes());
        ihdr.extend_from_slice(&h.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        v.extend_from_slice(&13u32.to_be_bytes());
        v.extend_from_slice(&ihdr);
        v.extend_from_slice(&crc32fast::hash(&ihdr).to_be_bytes());
        // The start of an image data chunk: the header is complete.
        v.extend_from_slice(&1000u32.to_be_bytes());
        v.extend_from_slice(b"IDAT");
        v.resize(1024, 0x5a);
        v
    }

    #[test]
    fn a_small_file_claiming_a_huge_image_is_refused_before_decoding() {
        let bomb = png_header_claiming(60_000, 60_000);
        let err = decode(
            &bomb,
            FrameFormat::Encoded,
            &FrameLimits::pixels(16_000_000),
        )
        .unwrap_err();
        assert_eq!(err.kind(), "too_many_pixels", "{err}");
    }

    #[test]
    fn truncated_and_foreign_files_are_errors() {
        let good = png(64, 48);
        assert_eq!(
            decode(&good, FrameFormat::Encoded, &FrameLimits::pixels(1 << 20))
                .unwrap()
                .width,
            64
        );
        let cut = &good[..good.len() / 2];
        assert_eq!(
            decode(cut, FrameFormat::Encoded, &FrameLimits::pixels(1 << 20))
                .unwrap_err()
                .kind(),
            "image"
        );
        assert_eq!(
            decode(
                b"GIF89a....",
                FrameFormat::Encoded,
                &FrameLimits::pixels(1 << 20)
            )
            .unwrap_err()
            .kind(),
            "image"
        );
        let raw = FrameFormat::Rgb8 {
            width: 4,
            height: 4,
        };
        assert_eq!(
            decode(&[0; 47], raw, &FrameLimits::pixels(1 << 20))
                .unwrap_err()
                .kind(),
            "image"
        );
        assert_eq!(
            decode(&[0; 48], raw, &FrameLimits::pixels(1 << 20))
                .unwrap()
                .channels,
            3
        );
    }

    fn jpeg(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Jpeg)
            .unwrap();
        out
    }

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(name)).unwrap()
    }

    fn input_224() -> ImageInput {
        ImageInput {
            width: 224,
            height: 224,
            channels: 3,
            layout: Layout::Nchw,
            color: ColorOrder::Rgb,
            resize: ResizeMode::Stretch,
        }
    }

    #[test]
    fn an_empty_frame_is_empty_and_a_cut_jpeg_is_an_image_error() {
        let none = &FrameLimits::pixels(1 << 20);
        assert_eq!(
            decode(&[], FrameFormat::Encoded, none).unwrap_err().kind(),
            "empty"
        );
        let whole = jpeg(64, 48);
        assert_eq!(
            decode(&whole, FrameFormat::Encoded, none).unwrap().width,
            64
        );
        for cut in [whole.len() / 2, whole.len() - 2] {
            let e = decode(&whole[..cut], FrameFormat::Encoded, none).unwrap_err();
            assert_eq!(e.kind(), "image", "{cut}: {e}");
            assert!(e.to_string().contains("truncated"), "{e}");
        }
        // Bytes after the end-of-image marker (some cameras pad) are fine.
        let mut padded = whole.clone();
        padded.extend_from_slice(&[0; 16]);
        assert!(decode(&padded, FrameFormat::Encoded, none).is_ok());
    }

    #[test]
    fn the_jpeg_walk_finds_progressive_scans_and_the_end() {
        let baseline = scan_jpeg(&jpeg(32, 32));
        assert_eq!(
            baseline,
            JpegScan {
                progressive: false,
                complete: true
            }
        );
        let progressive = fixture("tests/fixtures/progressive_small.jpg");
        let scan = scan_jpeg(&progressive);
        assert_eq!(
            scan,
            JpegScan {
                progressive: true,
                complete: true
            }
        );
        assert!(!scan_jpeg(&progressive[..progressive.len() * 2 / 3]).complete);
        for name in ["astronaut", "chelsea", "coffee", "rocket"] {
            let file = fixture(&format!("models/samples/camera/{name}.jpg"));
            assert!(scan_jpeg(&file).complete, "{name}");
        }
    }

    #[test]
    fn frames_whose_decoding_would_exceed_the_budget_are_refused_before_decoding() {
        let input = input_224();
        let limits = FrameLimits {
            max_pixels: 16_000_000,
            max_bytes: 32 << 20,
            input: Some(&input),
        };
        // A 16,000,000 x 1 grey PNG is 16 MB decoded, but resizing it to
        // 224x224 goes through a 16,000,000 x 224 intermediate image.
        let thin = image::GrayImage::new(16_000_000, 1);
        let mut png = Vec::new();
        thin.write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let e = decode(&png, FrameFormat::Encoded, &limits).unwrap_err();
        assert_eq!(e.kind(), "too_large", "{e}");
        assert!(fit_cost(16_000_000, 1, 1, &input) > 10 << 30);
        // Tall: the vertical weights alone are hundreds of MiB.
        assert!(fit_cost(1, 16_000_000, 1, &input) > 200 << 20);
        // A progressive 4000x4000 JPEG keeps every coefficient.
        let progressive = fixture("tests/fixtures/progressive_4000.jpg");
        let e = decode(&progressive, FrameFormat::Encoded, &limits).unwrap_err();
        assert_eq!(e.kind(), "too_large", "{e}");
        // An ordinary camera frame fits.
        let frame = decode(&jpeg(1280, 720), FrameFormat::Encoded, &limits).unwrap();
        assert_eq!((frame.width, frame.height), (1280, 720));
        let cost = fit_cost(1280, 720, 3, &input);
        assert!(cost < 4 << 20, "{cost}");
    }

    /// Weights of a bilinear (tent) convolution resampling `n_in` pixels to
    /// `n_out`, one `(first input pixel, weights)` per output pixel. When
    /// downscaling, the tent is widened by the scale so that every input
    /// pixel contributes (anti-aliasing, as Pillow and fast_image_resize do);
    /// the window is clipped to the image and the weights renormalised.
    fn tent_weights(n_in: usize, n_out: usize) -> Vec<(usize, Vec<f64>)> {
        let scale = n_in as f64 / n_out as f64;
        let width = scale.max(1.0);
        (0..n_out)
            .map(|o| {
                let centre = (o as f64 + 0.5) * scale;
                let lo = (centre - width).floor().max(0.0) as usize;
                let hi = ((centre + width).ceil() as usize).min(n_in);
                let w: Vec<f64> = (lo..hi)
                    .map(|i| (1.0 - ((i as f64 + 0.5 - centre) / width).abs()).max(0.0))
                    .collect();
                let sum: f64 = w.iter().sum();
                (lo, w.iter().map(|x| x / sum).collect())
            })
            .collect()
    }

    /// The resize as plain loops in f64: rows, then columns, no rounding.
    fn naive_resize(src: &[u8], sw: usize, sh: usize, dw: usize, dh: usize) -> Vec<f64> {
        let (wx, wy) = (tent_weights(sw, dw), tent_weights(sh, dh));
        let mut rows = vec![0.0; sh * dw * 3];
        for y in 0..sh {
            for (x, (lo, w)) in wx.iter().enumerate() {
                for c in 0..3 {
                    rows[(y * dw + x) * 3 + c] = w
                        .iter()
                        .enumerate()
                        .map(|(k, w)| w * src[(y * sw + lo + k) * 3 + c] as f64)
                        .sum();
                }
            }
        }
        let mut out = vec![0.0; dh * dw * 3];
        for (y, (lo, w)) in wy.iter().enumerate() {
            for x in 0..dw {
                for c in 0..3 {
                    out[(y * dw + x) * 3 + c] = w
                        .iter()
                        .enumerate()
                        .map(|(k, w)| w * rows[((lo + k) * dw + x) * 3 + c])
                        .sum();
                }
            }
        }
        out
    }

    fn input(w: u32, h: u32, resize: ResizeMode) -> ImageInput {
        ImageInput {
            width: w,
            height: h,
            channels: 3,
            layout: Layout::Nhwc,
            color: ColorOrder::Rgb,
            resize,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// The SIMD resize computes the same convolution as the naive loops,
        /// up- and downscaling, on arbitrary pixels: it differs only by its
        /// 8-bit rounding (fixed-point weights, a u8 image between passes).
        #[test]
        fn fast_resize_matches_a_naive_reference(
            (sw, sh, src) in (1usize..80, 1usize..80).prop_flat_map(|(w, h)| {
                (Just(w), Just(h), proptest::collection::vec(any::<u8>(), w * h * 3))
            }),
            dw in 1usize..64, dh in 1usize..64,
        ) {
            let frame = Frame { width: sw as u32, height: sh as u32, channels: 3, pixels: src.clone() };
            let mut fitted = Vec::new();
            Fitter::default().fit(&frame, &input(dw as u32, dh as u32, ResizeMode::Stretch), &mut fitted);
            let reference = naive_resize(&src, sw, sh, dw, dh);
            prop_assert_eq!(fitted.len(), reference.len());
            let worst = fitted.iter().zip(&reference).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
            prop_assert!(worst <= 1.5, "largest difference {} ({}x{} -> {}x{})", worst, sw, sh, dw, dh);
        }
    }

    #[test]
    fn letterbox_keeps_the_aspect_ratio_and_boxes_map_back() {
        let frame = Frame {
            width: 640,
            height: 480,
            channels: 3,
            pixels: vec![200; 640 * 480 * 3],
        };
        let mut out = Vec::new();
        let p = Fitter::default().fit(&frame, &input(320, 320, ResizeMode::Letterbox), &mut out);
        assert_eq!((p.pad_x, p.pad_y), (0.0, 40.0));
        assert_eq!(out[0], 114.0, "padding is grey");
        assert_eq!(
            out[(40 * 320) * 3],
            200.0,
            "the frame starts below the padding"
        );
        // The input box covering the frame's content maps to the whole frame.
        assert_eq!(
            p.to_frame([0.0, 40.0, 320.0, 280.0]),
            [0.0, 0.0, 640.0, 480.0]
        );
    }

    #[test]
    fn nms_keeps_the_best_of_overlapping_boxes_per_class() {
        let cand = vec![
            (0, 0.9, [10.0, 10.0, 50.0, 50.0]),
            (0, 0.8, [12.0, 12.0, 52.0, 52.0]), // overlaps the first
            (1, 0.7, [12.0, 12.0, 52.0, 52.0]), // other class: kept
            (0, 0.6, [100.0, 100.0, 140.0, 140.0]),
        ];
        let kept = nms(cand, 0.45, 10);
        let scores: Vec<f32> = kept.iter().map(|k| k.1).collect();
        assert_eq!(scores, vec![0.9, 0.7, 0.6]);
        assert_eq!(nms(kept, 0.45, 2).len(), 2, "max_detections");
    }

    #[test]
    fn yolov8_layout_is_decoded_to_frame_pixels() {
        // 3 anchors, 2 classes: rows cx, cy, w, h, score0, score1.
        let anchors = 3;
        let mut out = vec![0.0f32; 6 * anchors];
        let mut set = |row: usize, a: usize, v: f32| out[row * anchors + a] = v;
        // Anchor 0: class 1 at (100, 50) 40x20, score 0.9.
        for (r, v) in [
            (0, 100.0),
            (1, 50.0),
            (2, 40.0),
            (3, 20.0),
            (4, 0.1),
            (5, 0.9),
        ] {
            set(r, 0, v);
        }
        // Anchor 1: a weaker duplicate of anchor 0; anchor 2: below threshold.
        for (r, v) in [
            (0, 102.0),
            (1, 51.0),
            (2, 40.0),
            (3, 20.0),
            (4, 0.0),
            (5, 0.8),
        ] {
            set(r, 1, v);
        }
        set(4, 2, 0.2);
        let spec = DetectionSpec {
            format: DetectionFormat::Yolov8,
            score_threshold: 0.5,
            iou_threshold: 0.45,
            max_detections: 10,
            classes: Vec::new(),
            labels: vec!["cat".into(), "dog".into()],
        };
        let inp = input(320, 320, ResizeMode::Stretch);
        let placement = Placement {
            scale_x: 0.5,
            scale_y: 0.5,
            pad_x: 0.0,
            pad_y: 0.0,
            frame_w: 640,
            frame_h: 640,
        };
        let d = spec.detect(&[out], &inp, &placement).unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].label, "dog");
        assert_eq!(d[0].bbox, [160.0, 80.0, 240.0, 120.0]);
        let only_cats = DetectionSpec {
            classes: vec!["cat".into()],
            ..spec
        };
        assert!(only_cats
            .detect(&[vec![0.0; 18]], &inp, &placement)
            .unwrap()
            .is_empty());
    }
}
