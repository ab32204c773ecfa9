//! Every file in tests/corpus is a known-bad input for one decoder. Each
//! must be rejected with an error (never a panic, never accepted). The
//! files double as seeds for the fuzz targets (tests/fuzz).

use edgeinfer::config::Config;
use edgeinfer::model::Model;
use edgeinfer::pipeline::sensor::{decode_f32le, decode_json};
use std::path::{Path, PathBuf};

fn corpus(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 6, "the {kind} corpus is too small");
    files
}

#[test]
fn every_bad_json_payload_is_rejected() {
    for f in corpus("json") {
        let result = decode_json(&std::fs::read(&f).unwrap(), 3);
        assert!(result.is_err(), "{} was accepted: {result:?}", f.display());
        println!(
            "{}: {}",
            f.file_name().unwrap().to_string_lossy(),
            result.unwrap_err()
        );
    }
}

#[test]
fn every_bad_f32le_payload_is_rejected() {
    for f in corpus("f32le") {
        let result = decode_f32le(&std::fs::read(&f).unwrap(), 3);
        assert!(result.is_err(), "{} was accepted: {result:?}", f.display());
    }
}

#[test]
fn every_bad_config_is_rejected_with_a_message() {
    for f in corpus("config") {
        let problems = match Config::load(&f) {
            Err(e) => e.problems(),
            Ok(c) => c.validate(),
        };
        assert!(!problems.is_empty(), "{} was accepted", f.display());
        println!(
            "{}: {}",
            f.file_name().unwrap().to_string_lossy(),
            problems[0]
        );
    }
}

#[test]
fn every_bad_model_file_is_a_load_error() {
    for f in corpus("model") {
        let e = Model::load(&f).expect_err(&format!("{} loaded", f.display()));
        println!("{}: {e}", f.file_name().unwrap().to_string_lossy());
        assert!(
            e.to_string().starts_with("model "),
            "the error names the model: {e}"
        );
    }
}
