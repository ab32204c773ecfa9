//! Decoding frames (JPEG, PNG, raw RGB8/GRAY8) within limits checked from
//! the header before any pixel is decoded.

use super::fit::fit_cost;
use super::ImageInput;
use crate::flow::InputError;
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
