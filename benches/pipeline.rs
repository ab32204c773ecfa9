//! Where a sensor message's time goes, stage by stage.
//!
//!   cargo bench --bench pipeline
//!
//! decode (JSON and f32le) → window push → preprocess → tract inference →
//! postprocess → result serialization, on the bundled models.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use edgeinfer::model::Model;
use edgeinfer::pipeline::post::postprocess;
use edgeinfer::pipeline::pre::Preprocessor;
use edgeinfer::pipeline::sensor::{decode_f32le, decode_json, SensorWindow};
use std::path::Path;
use std::sync::Arc;

fn model(name: &str) -> Arc<Model> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(format!("{name}.toml"));
    Arc::new(Model::load(&path).unwrap())
}

fn stages(c: &mut Criterion) {
    let json = br#"{"ts":1764331200123,"values":[0.0123,-0.9811,0.1204,0.0021,-0.0213,0.5012]}"#;
    c.bench_function("decode_json_1_sample", |b| {
        b.iter(|| decode_json(black_box(json), 6).unwrap())
    });
    let raw: Vec<u8> = (0..6)
        .flat_map(|i| (i as f32 * 0.1).to_le_bytes())
        .collect();
    c.bench_function("decode_f32le_1_sample", |b| {
        b.iter(|| decode_f32le(black_box(&raw), 6).unwrap())
    });

    let mut window = SensorWindow::new(50, 10, 6);
    let sample = [0.1f32, 0.2, 0.3, 0.4, 0.5, 0.6];
    c.bench_function("window_push", |b| {
        b.iter(|| window.push(black_box(&sample)))
    });
    let mut out = Vec::with_capacity(300);
    c.bench_function("window_copy_50x6", |b| {
        b.iter(|| window.copy_into(black_box(&mut out)))
    });

    for (name, channels) in [("activity", 6usize), ("motion", 3)] {
        let m = model(name);
        let mut pre = Preprocessor::new(&m, channels).unwrap();
        let raw: Vec<f32> = (0..m.input().len())
            .map(|i| (i as f32 * 0.37).sin())
            .collect();
        let mut normalised = Vec::new();
        let mut session = m.session().unwrap();
        c.bench_function(&format!("{name}_preprocess"), |b| {
            b.iter(|| pre.tensor(black_box(&raw), &mut normalised))
        });
        c.bench_function(&format!("{name}_infer"), |b| {
            b.iter_batched(
                || pre.tensor(&raw, &mut normalised),
                |t| session.run(t).unwrap(),
                criterion::BatchSize::SmallInput,
            )
        });
        let out = session.run(pre.tensor(&raw, &mut normalised)).unwrap();
        c.bench_function(&format!("{name}_postprocess_and_serialize"), |b| {
            b.iter(|| {
                serde_json::to_vec(&postprocess(&m, out.clone(), &normalised).unwrap()).unwrap()
            })
        });
    }
}

/// JPEGs of 640x480 and 1600x1200 (an ESP32-CAM's UXGA; the astronaut photo
/// when ../shared is there, else a synthetic gradient) decoded alone, and
/// into 224x224 NCHW f32 and 96x96 NHWC: decode, resize, colour/layout and
/// normalisation, the whole `pre` of a camera frame.
fn camera_preprocess(c: &mut Criterion) {
    use edgeinfer::model::manifest::{ColorOrder, Layout, ResizeMode};
    use edgeinfer::pipeline::frame::{
        decode, to_chw, Fitter, FrameFormat, FrameLimits, ImageInput,
    };
    let photo =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/samples/images/astronaut.png");
    let photo = image::open(&photo).ok();
    for (w, h) in [(640u32, 480u32), (1600, 1200)] {
        let img = match &photo {
            Some(i) => i
                .resize_exact(w, h, image::imageops::FilterType::Triangle)
                .to_rgb8(),
            None => {
                image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, (x ^ y) as u8]))
            }
        };
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(
            &mut std::io::Cursor::new(&mut jpeg),
            85,
        )
        .encode_image(&img)
        .unwrap();
        let mut fitter = Fitter::default();
        let (mut hwc, mut chw) = (Vec::new(), Vec::new());
        c.bench_function(&format!("camera_decode_{w}x{h}_jpeg"), |b| {
            b.iter(|| {
                decode(
                    black_box(&jpeg),
                    FrameFormat::Encoded,
                    &FrameLimits::pixels(16_000_000),
                )
                .unwrap()
            })
        });
        for (size, layout) in [(224u32, Layout::Nchw), (96, Layout::Nhwc)] {
            let input = ImageInput {
                width: size,
                height: size,
                channels: 3,
                layout,
                color: ColorOrder::Rgb,
                resize: ResizeMode::Stretch,
            };
            c.bench_function(&format!("camera_pre_{w}x{h}_jpeg_to_{size}"), |b| {
                b.iter(|| {
                    let frame = decode(
                        black_box(&jpeg),
                        FrameFormat::Encoded,
                        &FrameLimits::pixels(16_000_000),
                    )
                    .unwrap();
                    fitter.fit(&frame, &input, &mut hwc);
                    for v in hwc.iter_mut() {
                        *v = (*v - 127.0) / 128.0;
                    }
                    if layout == Layout::Nchw {
                        to_chw(&hwc, 3, &mut chw);
                    }
                })
            });
        }
    }
}

criterion_group!(benches, stages, camera_preprocess);
criterion_main!(benches);
