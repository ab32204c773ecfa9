//! Camera frames, without I/O: decode (JPEG, PNG, raw RGB8/GRAY8) within
//! limits checked before any pixel is decoded, fit to the model input
//! (stretch or letterbox, SIMD resize), and detection postprocessing
//! (YOLOv8, SSD, UltraFace; per-class NMS; boxes back in the frame's own
//! pixels). The camera worker ([`super::camera`]) runs them.

mod decode;
mod detect;
mod fit;

pub use decode::{decode, scan_jpeg, Frame, FrameFormat, FrameLimits, JpegScan};
pub use detect::{annotate, iou, nms, Detection, DetectionSpec};
pub use fit::{fit_cost, to_chw, Fitter, ImageInput, Placement};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::manifest::{ColorOrder, DetectionFormat, Layout, ResizeMode};
    use proptest::prelude::*;
    use std::io::Cursor;

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
