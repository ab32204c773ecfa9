//! `[operations]`: the operations API, its allow list, keys, bundle limit
//! and the probation's thresholds.

use super::*;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The operations API on `{prefix}/cmd/{op}` (README "Fleet operations").
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OperationsConfig {
    /// Off: only `ping` and `health` are answered (as before this API).
    #[serde(default)]
    pub enabled: bool,
    /// Operations that may run. Default: the read-only ones; those that
    /// change the device (`reload`, `pipeline/…`, `model/…`) must be listed.
    #[serde(default = "default_allowed_ops")]
    pub allow: Vec<String>,
    /// Operation records, installed models and the replay counter. Default:
    /// `$STATE_DIRECTORY` under systemd; without one, `model/update` is refused.
    pub state_dir: Option<PathBuf>,
    /// Minisign public keys (the base64 line of a `.pub` file) whose
    /// signatures `model/update` accepts.
    #[serde(default)]
    pub trusted_keys: Vec<String>,
    /// Files holding such keys (minisign's `.pub` format), relative to the config.
    #[serde(default)]
    pub trusted_key_files: Vec<PathBuf>,
    /// Largest bundle accepted, MiB (inline bundles are also bounded by
    /// `broker.max_packet_bytes`).
    #[serde(default = "default_max_bundle_mb")]
    pub max_bundle_mb: u64,
    #[serde(default)]
    pub probation: ProbationConfig,
}

impl Default for OperationsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            allow: default_allowed_ops(),
            state_dir: None,
            trusted_keys: Vec::new(),
            trusted_key_files: Vec::new(),
            max_bundle_mb: default_max_bundle_mb(),
            probation: ProbationConfig::default(),
        }
    }
}

/// Every operation the API knows.
pub const OPERATIONS: &[&str] = &[
    "ping",
    "health",
    "status",
    "models",
    "config",
    "reload",
    "pipeline/enable",
    "pipeline/disable",
    "model/update",
    "model/rollback",
];

fn default_allowed_ops() -> Vec<String> {
    ["ping", "health", "status", "models", "config"]
        .map(String::from)
        .to_vec()
}

const fn default_max_bundle_mb() -> u64 {
    64
}

/// How a new model is watched after `model/update` before it is kept.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProbationConfig {
    /// How long the new model is watched; 0 keeps it at once.
    #[serde(default = "default_probation_s")]
    pub duration_s: u64,
    /// Inferences needed before a verdict on rates; a probation that ends
    /// with fewer keeps the model (nothing showed it worse).
    #[serde(default = "default_min_inferences")]
    pub min_inferences: u64,
    /// Share of inferences failing (errors, non-finite output) above the
    /// old model's rate that rolls back: 0.05 = five points more.
    #[serde(default = "default_max_error_increase")]
    pub max_error_rate_increase: f64,
    /// The new model's inference p99 over the old one's that rolls back.
    #[serde(default = "default_max_p99_ratio")]
    pub max_p99_ratio: f64,
    /// Percent of inputs also run on the old model (in shadow, results not
    /// published) to compare answers; 0 turns the shadow off.
    #[serde(default = "default_shadow_percent")]
    pub shadow_percent: u8,
    /// Share of shadowed inputs whose answers differ (top label, detection
    /// count, or an output moved by more than 5 % of its range) that rolls back.
    #[serde(default = "default_max_disagreement")]
    pub max_disagreement: f64,
}

impl Default for ProbationConfig {
    fn default() -> Self {
        Self {
            duration_s: default_probation_s(),
            min_inferences: default_min_inferences(),
            max_error_rate_increase: default_max_error_increase(),
            max_p99_ratio: default_max_p99_ratio(),
            shadow_percent: default_shadow_percent(),
            max_disagreement: default_max_disagreement(),
        }
    }
}

const fn default_probation_s() -> u64 {
    300
}

const fn default_min_inferences() -> u64 {
    20
}

const fn default_max_error_increase() -> f64 {
    0.05
}

const fn default_max_p99_ratio() -> f64 {
    3.0
}

const fn default_shadow_percent() -> u8 {
    10
}

const fn default_max_disagreement() -> f64 {
    0.25
}

impl Config {
    pub(super) fn check_operations(&self, out: &mut Problems) {
        let ops = &self.operations;
        for op in &ops.allow {
            if !OPERATIONS.contains(&op.as_str()) {
                out.bad(
                    "operations.allow",
                    format!(
                        "unknown operation {op:?} (known: {})",
                        OPERATIONS.join(", ")
                    ),
                );
            }
        }
        for (i, key) in ops.trusted_keys.iter().enumerate() {
            if let Err(e) = minisign::PublicKey::from_base64(key.trim()) {
                out.bad(
                    &format!("operations.trusted_keys[{i}]"),
                    format!("not a minisign public key: {e}"),
                );
            }
        }
        for (i, file) in ops.trusted_key_files.iter().enumerate() {
            let path = self.base_dir.join(file);
            if let Err(e) = minisign::PublicKey::from_file(&path) {
                out.bad(
                    &format!("operations.trusted_key_files[{i}]"),
                    format!("{}: {e}", path.display()),
                );
            }
        }
        let p = &ops.probation;
        if !(1.0..=1000.0).contains(&p.max_p99_ratio) {
            out.bad(
                "operations.probation.max_p99_ratio",
                "must be between 1 and 1000".into(),
            );
        }
        if p.shadow_percent > 100 {
            out.bad(
                "operations.probation.shadow_percent",
                "must be at most 100".into(),
            );
        }
        for (key, v) in [
            ("max_error_rate_increase", p.max_error_rate_increase),
            ("max_disagreement", p.max_disagreement),
        ] {
            if !(0.0..=1.0).contains(&v) {
                out.bad(
                    &format!("operations.probation.{key}"),
                    "must be between 0 and 1".into(),
                );
            }
        }
        let writes = ops.allow.iter().any(|o| o == "model/update");
        if ops.enabled && writes && ops.trusted_keys.is_empty() && ops.trusted_key_files.is_empty()
        {
            out.bad(
                "operations.trusted_keys",
                "model/update is allowed but no key is trusted: every bundle would be refused"
                    .into(),
            );
        }
    }
}
