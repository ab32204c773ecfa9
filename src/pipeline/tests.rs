//! The workers with no broker: bytes in, verdicts out (a [`Collected`]
//! sink), on the bundled models.

use super::camera::{Decoder, Inferrer};
use super::result::Emitter;
use super::sensor::worker::SensorWorker;
use super::{Kind, PipelineSpec};
use crate::config::Config;
use crate::flow::{Collected, Input};
use crate::health::Telemetry;
use crate::model::Registry;
use bytes::Bytes;
use std::path::Path;
use std::sync::Arc;

fn spec(pipeline: &str) -> PipelineSpec {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = Config::parse(pipeline, repo).unwrap();
    let p = &config.pipelines[0];
    let model = Registry::default()
        .get_or_load(&config.model_path(p), &crate::model::EngineOptions::tract())
        .unwrap();
    PipelineSpec::new(&config, p, model).unwrap()
}

fn emitter(sink: &Arc<Collected>, telemetry: &Telemetry) -> Emitter {
    Emitter {
        pipeline: "p".into(),
        sink: Arc::clone(sink) as Arc<dyn crate::flow::Sink>,
        stats: telemetry.pipeline("p"),
    }
}

const SENSOR: &str = r#"
[[pipeline]]
name = "p"
kind = "sensor"
topics = ["s/+"]
model = "models/activity.toml"
window = { size = 50, stride = 25 }
"#;

fn samples(n: usize, channels: usize) -> String {
    let rows: Vec<Vec<f32>> = (0..n)
        .map(|i| {
            (0..channels)
                .map(|c| ((i + c) as f32 * 0.1).sin())
                .collect()
        })
        .collect();
    serde_json::json!({ "ts": 7, "samples": rows }).to_string()
}

fn sensor_worker(sink: &Arc<Collected>, telemetry: &Telemetry) -> SensorWorker {
    let spec = Arc::new(spec(SENSOR));
    let Kind::Sensor(sensor) = spec.kind else {
        panic!("a sensor spec")
    };
    let model_stats = telemetry.model(&spec.model.name);
    SensorWorker::new(spec, sensor, emitter(sink, telemetry), model_stats).unwrap()
}

#[test]
fn sensor_windows_slide_by_their_stride_per_source() {
    let sink = Arc::new(Collected::default());
    let telemetry = Telemetry::default();
    let mut w = sensor_worker(&sink, &telemetry);
    let channels = w_channels();
    // 40 samples: no window yet; 20 more: the first (50); 15 more: 75, the second.
    w.handle(Input::new("s/a", Bytes::from(samples(40, channels))));
    assert!(sink.results.lock().unwrap().is_empty());
    w.handle(Input::new("s/a", Bytes::from(samples(20, channels))));
    w.handle(Input::new("s/b", Bytes::from(samples(60, channels))));
    w.handle(Input::new("s/a", Bytes::from(samples(15, channels))));
    let results = sink.results.lock().unwrap();
    let by = |src: &str| results.iter().filter(|(s, _)| s == src).count();
    assert_eq!((by("s/a"), by("s/b")), (2, 1));
    let seqs: Vec<u64> = results
        .iter()
        .filter(|(s, _)| s == "s/a")
        .map(|(_, r)| r["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![0, 1]);
    assert_eq!(results[0].1["ts"], 7);
    assert!(results[0].1["output"]["top"].is_array());
}

fn w_channels() -> usize {
    match spec(SENSOR).kind {
        Kind::Sensor(s) => s.channels,
        Kind::Camera(_) => unreachable!(),
    }
}

#[test]
fn every_sensor_rejection_is_a_typed_verdict_and_leaves_the_window_alone() {
    let sink = Arc::new(Collected::default());
    let telemetry = Telemetry::default();
    let mut w = sensor_worker(&sink, &telemetry);
    let channels = w_channels();
    w.handle(Input::new("s/a", Bytes::from(samples(30, channels))));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("malformed_json", b"{".to_vec()),
        ("no_samples", b"{\"ts\": 1}".to_vec()),
        ("wrong_channel_count", b"{\"values\": [1]}".to_vec()),
        (
            "non_finite",
            format!("{{\"values\": [{}]}}", vec!["null"; channels].join(",")).into_bytes(),
        ),
        (
            "bad_ts",
            samples(1, channels)
                .replace("\"ts\":7", "\"ts\":\"now\"")
                .into_bytes(),
        ),
    ];
    for (_, payload) in &cases {
        w.handle(Input::new("s/a", Bytes::from(payload.clone())));
    }
    let mut big = Input::new("s/a", Bytes::new());
    big.size = 10 << 20;
    w.handle(big);
    let kinds: Vec<&str> = sink
        .rejections
        .lock()
        .unwrap()
        .iter()
        .map(|(_, r)| r.kind())
        .collect();
    let mut want: Vec<&str> = cases.iter().map(|(k, _)| *k).collect();
    want.push("too_large");
    assert_eq!(kinds, want);
    // The 30 samples before are still in the window: 20 more complete it.
    w.handle(Input::new("s/a", Bytes::from(samples(20, channels))));
    assert_eq!(sink.results.lock().unwrap().len(), 1);
    assert_eq!(telemetry.pipeline("p").errors.get(), want.len() as u64);
}

const CAMERA: &str = r#"
[[pipeline]]
name = "p"
kind = "camera"
topics = ["c/+"]
model = "models/objects.toml"
snapshot = "snap/{1}"
"#;

#[test]
fn camera_frames_in_detections_and_snapshots_out_bad_frames_rejected() {
    let sink = Arc::new(Collected::default());
    let telemetry = Telemetry::default();
    let spec = Arc::new(spec(CAMERA));
    let emit = emitter(&sink, &telemetry);
    let mut decoder = Decoder::new(
        Arc::clone(&spec),
        emit.clone(),
        Arc::clone(&telemetry.frame_budget),
    )
    .unwrap();
    let mut inferrer = Inferrer::new(Arc::clone(&spec), emit, telemetry.model("objects")).unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let jpeg = std::fs::read(repo.join("models/samples/camera/chelsea.jpg")).unwrap();
    let prepared = decoder.prepare(Input::new("c/yard", Bytes::from(jpeg.clone())));
    inferrer.infer(prepared.expect("a good frame is prepared"));
    for (kind, payload) in [
        ("empty", Vec::new()),
        ("image", b"GIF89a".to_vec()),
        ("image", jpeg[..jpeg.len() / 2].to_vec()),
    ] {
        assert!(decoder
            .prepare(Input::new("c/yard", Bytes::from(payload)))
            .is_none());
        let last = sink.rejections.lock().unwrap().last().unwrap().1.kind();
        assert_eq!(last, kind);
    }
    let results = sink.results.lock().unwrap();
    assert_eq!(results.len(), 1);
    let detections = results[0].1["output"]["detections"].as_array().unwrap();
    assert!(
        detections.iter().any(|d| d["label"] == "cat"),
        "{detections:?}"
    );
    assert_eq!(sink.snapshots.lock().unwrap().len(), 1);
    assert!(sink.snapshots.lock().unwrap()[0]
        .1
        .starts_with(&[0xFF, 0xD8]));
}

#[test]
fn an_engine_panic_is_internal_and_an_engine_error_is_inference() {
    use super::result::engine_rejection;
    use crate::model::{ModelError, ModelErrorKind};
    let err = |kind| ModelError {
        model: "m".into(),
        kind,
    };
    let panic = err(ModelErrorKind::Panic {
        stage: "running",
        message: "index out of bounds".into(),
    });
    assert_eq!(engine_rejection(panic).kind(), "internal");
    let failed = err(ModelErrorKind::Engine("shape mismatch".into()));
    assert_eq!(engine_rejection(failed).kind(), "inference");
}
