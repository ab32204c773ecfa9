//! Fitting frames to the model input: stretch or letterbox, SIMD resize,
//! colour order, HWC/CHW.

use super::Frame;
use crate::model::manifest::{ColorOrder, Layout, ResizeMode};
use crate::model::Model;
use fast_image_resize as fr;

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
            sensor => {
                return Err(format!(
                    "input.layout = {sensor:?} is for sensor models; images take nchw or nhwc"
                ))
            }
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
pub(super) fn target(w: u32, h: u32, input: &ImageInput) -> (u32, u32, Placement) {
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

pub(super) fn luma(r: u8, g: u8, b: u8) -> u8 {
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
