//! Real photos through real public models (needs the model zoo: `$EDGEINFER_MODEL_ZOO`,
//! default ../shared/models, with ../shared/samples beside it).
//!
//! The int8 models go through edgeinfer's own preprocessing: raw pixel
//! values, the manifest's scale, then quantization with the parameters
//! edgeinfer reads from the graph's input DequantizeLinear.

mod common;

use edgeinfer::model::Model;
use edgeinfer::pipeline::post::{postprocess, Output};
use edgeinfer::pipeline::pre::Preprocessor;
use image::imageops::FilterType;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tract_onnx::prelude::Tensor;

fn zoo() -> Option<PathBuf> {
    common::model_zoo()
}

fn photo(zoo: &Path, name: &str, w: u32, h: u32) -> Vec<f32> {
    let path = zoo.join("../samples/images").join(name);
    let img = image::open(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8();
    let img = image::imageops::resize(&img, w, h, FilterType::Triangle);
    img.into_raw().into_iter().map(f32::from).collect() // HWC, RGB, 0..255
}

/// Loads a zoo model through a manifest written beside a copy of it.
fn with_manifest(zoo: &Path, rel: &str, manifest: &str) -> (Arc<Model>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let file = zoo.join(rel);
    std::fs::write(
        dir.path().join("m.toml"),
        format!("file = {:?}\n{manifest}", file.display().to_string()),
    )
    .unwrap();
    (
        Arc::new(Model::load(&dir.path().join("m.toml")).unwrap()),
        dir,
    )
}

fn classify(model: &Arc<Model>, pixels: &[f32]) -> Vec<(String, f32)> {
    let mut pre = Preprocessor::new(model, 3).unwrap();
    let mut normalised = Vec::new();
    let out = model
        .session()
        .unwrap()
        .run(pre.tensor(pixels, &mut normalised))
        .unwrap();
    match postprocess(model, out, &normalised).unwrap() {
        Output::Classification { top } => top.into_iter().map(|s| (s.label, s.score)).collect(),
        other => panic!("not a classification: {other:?}"),
    }
}

#[test]
fn visual_wake_words_int8_sees_the_person_and_not_the_coffee() {
    let Some(zoo) = zoo() else { return };
    let manifest = "[preprocess]\nscale = 0.003921569\n[output]\nkind = \"classification\"\nlabels = [\"no person\", \"person\"]\n";
    let (vww, _dir) = with_manifest(&zoo, "mlperf-tiny/vww_96_int8.onnx", manifest);
    assert!(
        vww.input_quant.is_some(),
        "quantization read from the graph"
    );
    let astronaut = classify(&vww, &photo(&zoo, "astronaut.png", 96, 96));
    let coffee = classify(&vww, &photo(&zoo, "coffee.png", 96, 96));
    println!("vww int8: astronaut {astronaut:?}, coffee {coffee:?}");
    assert_eq!(astronaut[0].0, "person");
    assert_eq!(coffee[0].0, "no person");
}

#[test]
fn cifar10_resnet_int8_says_cat_on_chelsea() {
    let Some(zoo) = zoo() else { return };
    let labels = r#"["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]"#;
    let manifest = format!("[output]\nkind = \"classification\"\ntop_k = 3\nlabels = {labels}\n");
    let (resnet, _dir) = with_manifest(&zoo, "mlperf-tiny/pretrainedResnet_quant.onnx", &manifest);
    let top = classify(&resnet, &photo(&zoo, "chelsea.png", 32, 32));
    println!("resnet int8 on chelsea: {top:?}");
    assert_eq!(top[0].0, "cat");
}

fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)
}

#[test]
fn ultraface_finds_one_face_on_the_astronaut() {
    let Some(zoo) = zoo() else { return };
    let model = Arc::new(Model::load(&zoo.join("ultraface/version-RFB-320.onnx")).unwrap());
    let (w, h) = (320usize, 240usize);
    let hwc = photo(&zoo, "astronaut.png", w as u32, h as u32);
    // NCHW, (pixel - 127) / 128, as the model's authors preprocess.
    let mut chw = vec![0f32; 3 * w * h];
    for (i, px) in hwc.chunks_exact(3).enumerate() {
        for c in 0..3 {
            chw[c * w * h + i] = (px[c] - 127.0) / 128.0;
        }
    }
    let outputs = model
        .session()
        .unwrap()
        .run_all(Tensor::from_shape(&[1, 3, h, w], &chw).unwrap())
        .unwrap();
    let (scores, boxes) = (&outputs[0], &outputs[1]);
    // Candidates over 0.7, then greedy NMS at IoU 0.3 (the authors' defaults).
    let mut cand: Vec<(f32, [f32; 4])> = (0..scores.len() / 2)
        .filter(|&i| scores[2 * i + 1] > 0.7)
        .map(|i| {
            (
                scores[2 * i + 1],
                [
                    boxes[4 * i],
                    boxes[4 * i + 1],
                    boxes[4 * i + 2],
                    boxes[4 * i + 3],
                ],
            )
        })
        .collect();
    cand.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut faces: Vec<(f32, [f32; 4])> = Vec::new();
    for c in cand {
        if faces.iter().all(|f| iou(&f.1, &c.1) < 0.3) {
            faces.push(c);
        }
    }
    // In the 512 x 512 photo's pixels.
    let px: Vec<(f32, [f32; 4])> = faces
        .iter()
        .map(|(s, b)| (*s, b.map(|v| v * 512.0)))
        .collect();
    println!("ultraface on astronaut: {px:?}");
    assert_eq!(faces.len(), 1, "exactly one face");
    let b = px[0].1;
    // Eileen Collins' face in astronaut.png lies within x 150..290, y 40..200.
    let (cx, cy) = ((b[0] + b[2]) / 2.0, (b[1] + b[3]) / 2.0);
    assert!(
        (150.0..290.0).contains(&cx) && (40.0..200.0).contains(&cy),
        "box {b:?} is not on her face"
    );
    assert!(
        b[2] - b[0] > 50.0 && b[2] - b[0] < 200.0,
        "a face-sized box: {b:?}"
    );
}
