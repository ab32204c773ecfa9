//! Where a sensor message's time goes, stage by stage.
//!
//!   cargo bench --bench pipeline
//!
//! decode (JSON and f32le) → window push → preprocess → tract inference →
//! postprocess → result serialization, on the bundled models.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use edgeinfer::model::Model;
use edgeinfer::pipeline::post::{postprocess, Preprocessor};
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

criterion_group!(benches, stages);
criterion_main!(benches);
