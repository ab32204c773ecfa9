//! `[engine]`: which engine runs the models, and how.

use super::*;
use serde::{Deserialize, Serialize};

/// Which engine runs the models, and how (README "Engines"). Pipelines
/// may override `backend`, `providers`, `fallback`, `strict` and `threads`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    /// `auto` (measure every available engine, serve with the fastest that
    /// agrees), `tract` or `onnxruntime`.
    #[serde(default)]
    pub backend: Backend,
    /// ONNX Runtime execution providers in the order tried, e.g.
    /// `["qnn", "openvino", "cpu"]`.
    #[serde(default = "default_providers")]
    pub providers: Vec<String>,
    /// Every provider passed over: go on to tract (true) or fail the model.
    #[serde(default = "default_true")]
    pub fallback: bool,
    /// Refuse a provider that leaves part of the graph to the CPU provider.
    #[serde(default)]
    pub strict: bool,
    /// ONNX Runtime threads per worker. Default 1: the worker's own thread.
    #[serde(default = "default_engine_threads")]
    pub threads: usize,
    /// `libonnxruntime.so` to load. Default: `ORT_DYLIB_PATH`, else the usual places.
    pub onnxruntime_library: Option<PathBuf>,
    /// Where `auto` keeps its decisions. Default: `$STATE_DIRECTORY`.
    pub cache_dir: Option<PathBuf>,
    /// Time `auto` may spend timing each engine per model, ms.
    #[serde(default = "default_probe_budget_ms")]
    pub probe_budget_ms: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            backend: Default::default(),
            providers: default_providers(),
            fallback: true,
            strict: false,
            threads: default_engine_threads(),
            onnxruntime_library: None,
            cache_dir: None,
            probe_budget_ms: default_probe_budget_ms(),
        }
    }
}

/// `[engine] backend`: the model layer's choice, spelled for the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Auto,
    Tract,
    #[serde(rename = "onnxruntime")]
    OnnxRuntime,
}

fn default_providers() -> Vec<String> {
    vec!["cpu".into()]
}

const fn default_true() -> bool {
    true
}

const fn default_engine_threads() -> usize {
    1
}

const fn default_probe_budget_ms() -> u64 {
    300
}

impl Config {
    pub(super) fn check_engine(&self, out: &mut Problems) {
        // Provider names are checked against the engine's list by `check`
        // (the config does not know the engines).
        let threads = std::iter::once(("engine.threads".to_string(), self.engine.threads)).chain(
            self.pipelines
                .iter()
                .enumerate()
                .filter_map(|(i, p)| Some((format!("pipeline[{i}].threads"), p.threads?))),
        );
        for (key, n) in threads {
            if !(1..=64).contains(&n) {
                out.bad(&key, "must be between 1 and 64".into());
            }
        }
        if self.engine.probe_budget_ms > 10_000 {
            out.bad("engine.probe_budget_ms", "must be at most 10000".into());
        }
    }
}
