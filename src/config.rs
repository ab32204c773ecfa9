//! Configuration: serde structs, defaults, and a `validate()` that reports
//! every problem at once, each with the key it belongs to.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};

/// The complete, commented example printed by `edgeinfer print-config`.
/// Tests parse and validate it, so it cannot rot.
pub const EXAMPLE: &str = include_str!("example.toml");

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub device: Device,
    #[serde(default)]
    pub broker: Broker,
    #[serde(default)]
    pub topics: Topics,
    #[serde(default)]
    pub health: Health,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub outbox: OutboxConfig,
    #[serde(default)]
    pub engine: EngineConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub home_assistant: HomeAssistantConfig,
    #[serde(default)]
    pub operations: OperationsConfig,
    #[serde(default, rename = "pipeline")]
    pub pipelines: Vec<Pipeline>,
    /// Directory that relative model paths are resolved against: the config
    /// file's own directory. Not a config key.
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// The file it was loaded from (what a reload reads again). Not a key.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Device {
    /// Used in every topic. Default: the host name.
    pub id: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Broker {
    #[serde(default = "default_url")]
    pub url: String,
    /// Default: `edgeinfer-{device}`.
    pub client_id: Option<String>,
    pub username: Option<String>,
    /// File holding the password (first line). Never logged.
    pub password_file: Option<PathBuf>,
    /// Name of a systemd credential (`LoadCredential=`) holding the password,
    /// read from `$CREDENTIALS_DIRECTORY`. Never logged.
    pub password_credential: Option<String>,
    /// PEM CA certificate(s) the broker's certificate must chain to
    /// (`mqtts://`). Default: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain and private key, for mutual TLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    #[serde(default = "default_keep_alive")]
    pub keep_alive_s: u64,
    /// Largest MQTT packet accepted or sent, in bytes (rumqttc's own default
    /// is 10 KiB). Larger input is still read, up to a ceiling set by the
    /// memory budget, so that it can be acknowledged and reported.
    #[serde(default = "default_max_packet")]
    pub max_packet_bytes: usize,
    /// Longest topic the broker takes, in bytes (MQTT's own limit: 65,535).
    #[serde(default = "default_max_topic_bytes")]
    pub max_topic_bytes: usize,
    /// Most levels a topic may have (mosquitto refuses more than 201).
    #[serde(default = "default_max_topic_levels")]
    pub max_topic_levels: usize,
    #[serde(default = "default_backoff_initial")]
    pub reconnect_initial_ms: u64,
    #[serde(default = "default_backoff_max")]
    pub reconnect_max_ms: u64,
    /// Start a new MQTT session on each connect. Default false: the broker
    /// keeps the session, and queues QoS 1 input while edgeinfer is away.
    #[serde(default)]
    pub clean_session: bool,
    /// QoS 1 publishes sent and not yet acknowledged by the broker.
    #[serde(default = "default_inflight")]
    pub inflight: u16,
}

impl Default for Broker {
    fn default() -> Self {
        Self {
            url: default_url(),
            client_id: None,
            username: None,
            password_file: None,
            password_credential: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            keep_alive_s: default_keep_alive(),
            max_packet_bytes: default_max_packet(),
            max_topic_bytes: default_max_topic_bytes(),
            max_topic_levels: default_max_topic_levels(),
            reconnect_initial_ms: default_backoff_initial(),
            reconnect_max_ms: default_backoff_max(),
            clean_session: false,
            inflight: default_inflight(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Topics {
    /// Prefix of status, health, errors and cmd topics. `{device}` is replaced.
    #[serde(default = "default_prefix")]
    pub prefix: String,
}

impl Default for Topics {
    fn default() -> Self {
        Self {
            prefix: default_prefix(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    #[serde(default = "default_health_interval")]
    pub interval_s: u64,
    /// Where SoC temperatures are read from.
    #[serde(default = "default_thermal")]
    pub thermal_dir: PathBuf,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            interval_s: default_health_interval(),
            thermal_dir: default_thermal(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest accepted input payload; larger ones are rejected on the errors topic.
    #[serde(default = "default_max_payload")]
    pub max_payload_bytes: usize,
    /// Most distinct source topics one pipeline keeps a window for; the
    /// least recently seen one is evicted beyond this.
    #[serde(default = "default_max_sources")]
    pub max_sources: usize,
    /// Health messages and command replies waiting for the broker (in
    /// memory); results and errors wait in the outbox instead.
    #[serde(default = "default_outbox")]
    pub outbox_capacity: usize,
    /// Largest camera frame payload, bytes (sensor payloads: max_payload_bytes).
    #[serde(default = "default_max_image_bytes")]
    pub max_image_bytes: usize,
    /// Largest camera frame, pixels, checked from the header before decoding.
    #[serde(default = "default_max_image_pixels")]
    pub max_image_pixels: u64,
    /// Memory budget of the whole process, MiB (lowered to 80 % of the
    /// cgroup's MemoryHigh/MemoryMax when those are tighter). Of what is left
    /// after start-up, input queues take at most a third, an in-memory outbox
    /// a third, and decoding camera frames a third (split between the decode
    /// threads): a frame that would need more is rejected before decoding.
    #[serde(default = "default_memory_mb")]
    pub memory_mb: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload_bytes: default_max_payload(),
            max_sources: default_max_sources(),
            outbox_capacity: default_outbox(),
            memory_mb: default_memory_mb(),
            max_image_bytes: default_max_image_bytes(),
            max_image_pixels: default_max_image_pixels(),
        }
    }
}

/// Where results and errors wait for the broker.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxConfig {
    /// Spool directory. Default: `$STATE_DIRECTORY/outbox` when systemd
    /// gives a state directory, else none (the outbox is in memory).
    pub dir: Option<PathBuf>,
    /// Cap on the spool, MiB; beyond it the oldest records are dropped.
    #[serde(default = "default_outbox_mb")]
    pub max_mb: u64,
    /// Records older than this are dropped unsent (0: kept until delivered or capped).
    #[serde(default = "default_ttl")]
    pub ttl_s: u64,
    /// How often the spool is fsynced (and its commit point saved), ms.
    #[serde(default = "default_sync_ms")]
    pub sync_ms: u64,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            dir: None,
            max_mb: default_outbox_mb(),
            ttl_s: default_ttl(),
            sync_ms: default_sync_ms(),
        }
    }
}

impl OutboxConfig {
    /// The spool directory in effect, if any.
    pub fn effective_dir(&self, base: &Path) -> Option<PathBuf> {
        match &self.dir {
            Some(d) => Some(base.join(d)),
            None => state_directory().map(|d| d.join("outbox")),
        }
    }
}

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

/// Home Assistant MQTT discovery (README "Operating it").
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HomeAssistantConfig {
    #[serde(default)]
    pub enabled: bool,
    /// Home Assistant's discovery prefix (its MQTT integration's setting).
    #[serde(default = "default_discovery_prefix")]
    pub discovery_prefix: String,
}

impl Default for HomeAssistantConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            discovery_prefix: default_discovery_prefix(),
        }
    }
}

fn default_discovery_prefix() -> String {
    "homeassistant".into()
}

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

impl OperationsConfig {
    pub fn effective_state_dir(&self, base: &Path) -> Option<PathBuf> {
        self.state_dir
            .as_ref()
            .map(|d| base.join(d))
            .or_else(state_directory)
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

/// Prometheus/OpenMetrics at `GET /metrics` (README "Operating it").
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    #[serde(default)]
    pub enabled: bool,
    /// Address to listen on. Default loopback only: put a reverse proxy or
    /// the scraper on the gateway itself, or widen it knowingly.
    #[serde(default = "default_metrics_listen")]
    pub listen: String,
    /// Connections served at once; more wait in the kernel's backlog
    /// (they hold no descriptor of ours until accepted).
    #[serde(default = "default_metrics_connections")]
    pub max_connections: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: default_metrics_listen(),
            max_connections: default_metrics_connections(),
        }
    }
}

const fn default_metrics_connections() -> usize {
    4
}

fn default_metrics_listen() -> String {
    "127.0.0.1:9464".into()
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

/// The first of systemd's `$STATE_DIRECTORY` entries, if it gives one.
pub fn state_directory() -> Option<PathBuf> {
    std::env::var_os("STATE_DIRECTORY")
        .filter(|v| !v.is_empty())
        // systemd may pass several, colon-separated: the first is ours.
        .and_then(|v| {
            v.to_str()
                .map(|s| s.split(':').next().unwrap_or("").to_owned())
        })
        .map(PathBuf::from)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PipelineKind {
    Sensor,
    Camera,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PayloadFormat {
    /// `{"ts":…, "values":[…]}` or `{"ts":…, "samples":[[…],…]}`
    Json,
    /// Raw little-endian f32, whole samples.
    F32le,
    /// Camera: the payload is a JPEG or PNG file.
    Image,
    /// Camera: raw 8-bit RGB, `width` x `height` (from the pipeline config).
    Rgb8,
    /// Camera: raw 8-bit grey, `width` x `height`.
    Gray8,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// Samples per inference. Default: taken from the model's input shape.
    pub size: Option<usize>,
    /// Samples between inferences. Default: `size` (no overlap).
    pub stride: Option<usize>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    pub name: String,
    pub kind: PipelineKind,
    pub topics: Vec<String>,
    /// Manifest (`*.toml`) or bare `.onnx`, relative to the config file.
    pub model: PathBuf,
    /// Default: `json` for sensors, `image` for cameras (see [`Pipeline::payload`]).
    pub payload: Option<PayloadFormat>,
    pub window: Option<Window>,
    /// Result topic template: `{device}`, `{pipeline}`, and `{1}`, `{2}`… for
    /// the topic levels matched by the filter's wildcards.
    pub results: Option<String>,
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// Messages waiting for this pipeline's workers; more are dropped and counted.
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// Inference threads; sources are spread over them by topic.
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// Camera, raw frames: size of every frame.
    pub width: Option<u32>,
    pub height: Option<u32>,
    /// Camera: publish each frame with its detections drawn on it (JPEG,
    /// QoS 0, not spooled) to this topic template.
    pub snapshot: Option<String>,
    /// Camera detection overrides of the manifest's settings.
    pub score_threshold: Option<f32>,
    pub iou_threshold: Option<f32>,
    pub max_detections: Option<usize>,
    /// Only report these labels.
    pub classes: Option<Vec<String>>,
    /// Overrides of `[engine]` for this pipeline's model.
    pub backend: Option<Backend>,
    pub providers: Option<Vec<String>>,
    pub fallback: Option<bool>,
    pub strict: Option<bool>,
    pub threads: Option<usize>,
}

impl Pipeline {
    pub fn payload(&self) -> PayloadFormat {
        self.payload.unwrap_or(match self.kind {
            PipelineKind::Sensor => PayloadFormat::Json,
            PipelineKind::Camera => PayloadFormat::Image,
        })
    }

    pub fn results_template(&self) -> String {
        self.results
            .clone()
            .unwrap_or_else(|| format!("{{prefix}}/results/{}", self.name))
    }
}

fn default_url() -> String {
    "mqtt://127.0.0.1:1883".into()
}
const fn default_keep_alive() -> u64 {
    30
}
const fn default_max_packet() -> usize {
    4 << 20
}
const fn default_max_topic_bytes() -> usize {
    crate::topic::MAX_TOPIC_BYTES
}
/// mosquitto 2.0 drops the connection of a client that publishes to a
/// topic of more levels (200 separators).
const fn default_max_topic_levels() -> usize {
    201
}
const fn default_backoff_initial() -> u64 {
    500
}
const fn default_backoff_max() -> u64 {
    30_000
}
const fn default_inflight() -> u16 {
    100
}
const fn default_max_image_bytes() -> usize {
    4_000_000
}
const fn default_max_image_pixels() -> u64 {
    16_000_000
}
/// Below the shipped unit's MemoryHigh (160M) and MemoryMax (192M), so the
/// daemon's own limits act before the kernel's (a test holds them together).
pub const fn default_memory_mb() -> u64 {
    128
}
const fn default_outbox_mb() -> u64 {
    64
}
const fn default_ttl() -> u64 {
    7 * 24 * 3600
}
const fn default_sync_ms() -> u64 {
    1000
}
fn default_prefix() -> String {
    "edgeinfer/{device}".into()
}
const fn default_health_interval() -> u64 {
    30
}
fn default_thermal() -> PathBuf {
    PathBuf::from("/sys/class/thermal")
}
const fn default_max_payload() -> usize {
    64 * 1024
}
const fn default_max_sources() -> usize {
    1024
}
const fn default_outbox() -> usize {
    256
}
const fn default_qos() -> u8 {
    1
}
const fn default_queue() -> usize {
    4096
}
const fn default_workers() -> usize {
    1
}

/// One thing wrong with a configuration, with the key it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

/// Problems collected while validating, each with its key.
#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn bad(&mut self, key: &str, message: String) {
        self.0.push(Problem {
            key: key.into(),
            message,
        });
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{} problem(s):\n{}", .0.len(), .0.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

impl ConfigError {
    /// Every problem, as `key: message` lines, for `check-config`.
    pub fn problems(&self) -> Vec<Problem> {
        match self {
            ConfigError::Invalid(p) => p.clone(),
            ConfigError::Read { path, source } => {
                vec![Problem {
                    key: path.display().to_string(),
                    message: source.to_string(),
                }]
            }
            ConfigError::Parse { path, message } => {
                vec![Problem {
                    key: path.display().to_string(),
                    message: message.clone(),
                }]
            }
        }
    }
}

impl Config {
    /// Reads and parses a config file (no validation of models or the network).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut config = Config::parse(&text, &base).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })?;
        config.source = Some(path.to_owned());
        Ok(config)
    }

    pub fn parse(text: &str, base_dir: &Path) -> Result<Config, String> {
        let mut config: Config =
            toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())?;
        config.base_dir = base_dir.to_owned();
        Ok(config)
    }

    /// `device.id`, else the host name; under the template unit
    /// (`edgeinfer@NAME`, which sets `EDGEINFER_INSTANCE=NAME`) the host
    /// name plus `-NAME`, so that instances get their own client id and
    /// topics without saying so.
    pub fn device_id(&self) -> String {
        self.device
            .id
            .clone()
            .unwrap_or_else(|| match std::env::var("EDGEINFER_INSTANCE") {
                Ok(instance) if !instance.is_empty() => format!("{}-{instance}", hostname()),
                _ => hostname(),
            })
    }

    pub fn prefix(&self) -> String {
        self.topics.prefix.replace("{device}", &self.device_id())
    }

    pub fn client_id(&self) -> String {
        self.broker
            .client_id
            .clone()
            .unwrap_or_else(|| format!("edgeinfer-{}", self.device_id()))
    }

    pub fn model_path(&self, pipeline: &Pipeline) -> PathBuf {
        self.base_dir.join(&pipeline.model)
    }

    /// Checks everything that can be checked without loading models or
    /// touching the network, and returns every problem found.
    pub fn validate(&self) -> Vec<Problem> {
        let mut out = Problems::default();
        self.check_device_and_broker(&mut out);
        self.check_credentials(&mut out);
        self.check_tls(&mut out);
        self.check_limits(&mut out);
        self.check_engine(&mut out);
        let mut names = std::collections::HashSet::new();
        for (i, p) in self.pipelines.iter().enumerate() {
            self.check_pipeline(i, p, &mut names, &mut out);
        }
        self.check_discovery_ids(&mut out);
        out.0
    }

    /// Home Assistant's ids allow `[a-zA-Z0-9_-]`: two pipelines whose
    /// names differ only elsewhere (`a b`, `a_b`) would share entities.
    fn check_discovery_ids(&self, out: &mut Problems) {
        if !self.home_assistant.enabled {
            return;
        }
        let mut ids: std::collections::HashMap<String, &str> = Default::default();
        for (i, p) in self.pipelines.iter().enumerate() {
            let id = crate::topic::discovery_id(&p.name);
            match ids.get(&id) {
                Some(other) if *other != p.name => out.bad(
                    &format!("pipeline[{i}].name"),
                    format!(
                        "{:?} and {other:?} have the same Home Assistant id {id:?} (only A-Z a-z 0-9 _ - are kept); rename one",
                        p.name
                    ),
                ),
                _ => {
                    ids.insert(id, &p.name);
                }
            }
        }
    }

    fn check_engine(&self, out: &mut Problems) {
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
        let disc = &self.home_assistant.discovery_prefix;
        if disc.is_empty()
            || disc.contains(['+', '#'])
            || disc.starts_with('/')
            || disc.ends_with('/')
        {
            out.bad(
                "home_assistant.discovery_prefix",
                format!("{disc:?} must be a topic prefix without wildcards or a leading or trailing '/'"),
            );
        }
        if self.metrics.listen.parse::<std::net::SocketAddr>().is_err() {
            out.bad(
                "metrics.listen",
                format!(
                    "{:?} is not an address:port (e.g. 127.0.0.1:9464)",
                    self.metrics.listen
                ),
            );
        }
        if !(1..=256).contains(&self.metrics.max_connections) {
            out.bad(
                "metrics.max_connections",
                "must be between 1 and 256".into(),
            );
        }
        if self.engine.probe_budget_ms > 10_000 {
            out.bad("engine.probe_budget_ms", "must be at most 10000".into());
        }
        self.check_operations(out);
    }

    fn check_operations(&self, out: &mut Problems) {
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

    fn check_device_and_broker(&self, out: &mut Problems) {
        let device = self.device_id();
        if let Err(e) = check_name(&device) {
            out.bad("device.id", e);
        }
        if let Err(e) = BrokerAddress::parse(&self.broker.url) {
            out.bad("broker.url", e);
        }
        if self.broker.keep_alive_s < 5 {
            out.bad("broker.keep_alive_s", "must be at least 5 seconds".into());
        }
        if self.broker.max_packet_bytes < 1024 || self.broker.max_packet_bytes > 256 * 1024 * 1024 {
            out.bad(
                "broker.max_packet_bytes",
                "must be between 1024 and 268435456".into(),
            );
        }
        if self.broker.reconnect_initial_ms == 0
            || self.broker.reconnect_initial_ms > self.broker.reconnect_max_ms
        {
            out.bad(
                "broker.reconnect_initial_ms",
                "must be above 0 and at most broker.reconnect_max_ms".into(),
            );
        }
        if self.broker.inflight == 0 || self.broker.inflight > 60_000 {
            out.bad("broker.inflight", "must be between 1 and 60000".into());
        }
        if self.broker.max_topic_bytes == 0
            || self.broker.max_topic_bytes > crate::topic::MAX_TOPIC_BYTES
        {
            out.bad(
                "broker.max_topic_bytes",
                "must be between 1 and 65535 (MQTT's limit)".into(),
            );
        }
        if self.broker.max_topic_levels == 0 {
            out.bad("broker.max_topic_levels", "must be at least 1".into());
        }
    }

    fn check_credentials(&self, out: &mut Problems) {
        if let Some(file) = &self.broker.password_file {
            if self.broker.username.is_none() {
                out.bad("broker.password_file", "needs broker.username".into());
            }
            if let Err(e) = std::fs::metadata(self.base_dir.join(file)) {
                out.bad("broker.password_file", format!("{}: {e}", file.display()));
            }
        }
        if let Some(name) = &self.broker.password_credential {
            if self.broker.username.is_none() {
                out.bad("broker.password_credential", "needs broker.username".into());
            }
            if self.broker.password_file.is_some() {
                out.bad(
                    "broker.password_credential",
                    "give password_file or password_credential, not both".into(),
                );
            }
            if name.is_empty() || name.contains('/') {
                out.bad(
                    "broker.password_credential",
                    format!("{name:?} is not a credential name"),
                );
            }
        }
    }

    fn check_tls(&self, out: &mut Problems) {
        let tls = self.broker.url.starts_with("mqtts://");
        for (key, file) in [
            ("broker.ca_file", &self.broker.ca_file),
            ("broker.cert_file", &self.broker.cert_file),
            ("broker.key_file", &self.broker.key_file),
        ] {
            if let Some(file) = file {
                if !tls {
                    out.bad(key, "only used with an mqtts:// broker.url".into());
                } else if let Err(e) = std::fs::metadata(self.base_dir.join(file)) {
                    out.bad(key, format!("{}: {e}", file.display()));
                }
            }
        }
        if self.broker.cert_file.is_some() != self.broker.key_file.is_some() {
            out.bad(
                "broker.cert_file",
                "mutual TLS needs both cert_file and key_file".into(),
            );
        }
    }

    /// Topics, health, limits, outbox, and that there is a pipeline.
    fn check_limits(&self, out: &mut Problems) {
        if let Err(e) = crate::topic::check_template(&self.topics.prefix, 0) {
            out.bad("topics.prefix", e);
        }
        if self.health.interval_s == 0 {
            out.bad("health.interval_s", "must be at least 1".into());
        }
        if self.limits.max_payload_bytes == 0
            || self.limits.max_payload_bytes > self.broker.max_packet_bytes
        {
            out.bad(
                "limits.max_payload_bytes",
                "must be above 0 and at most broker.max_packet_bytes".into(),
            );
        }
        if self.limits.max_sources == 0 {
            out.bad("limits.max_sources", "must be at least 1".into());
        }
        if self.limits.outbox_capacity == 0 {
            out.bad("limits.outbox_capacity", "must be at least 1".into());
        }
        if self.limits.memory_mb < 32 {
            out.bad(
                "limits.memory_mb",
                format!(
                    "{} MiB is below what the daemon itself needs (32 at least)",
                    self.limits.memory_mb
                ),
            );
        }
        if self.outbox.max_mb == 0 {
            out.bad("outbox.max_mb", "must be at least 1".into());
        }
        if self.outbox.sync_ms == 0 {
            out.bad("outbox.sync_ms", "must be at least 1".into());
        }
        if self.pipelines.is_empty() {
            out.bad("pipeline", "no [[pipeline]] is configured".into());
        }
    }

    /// One `[[pipeline]]`: names unique, payload fits the kind, filters and
    /// template, sizes, the model file.
    fn check_pipeline<'a>(
        &self,
        i: usize,
        p: &'a Pipeline,
        names: &mut std::collections::HashSet<&'a str>,
        out: &mut Problems,
    ) {
        let key = |k: &str| format!("pipeline[{i}].{k}");
        if let Err(e) = check_name(&p.name) {
            out.bad(&key("name"), e);
        } else if !names.insert(p.name.as_str()) {
            out.bad(
                &key("name"),
                format!("{:?} is used by another pipeline", p.name),
            );
        }
        let payload = p.payload();
        let image_payload = matches!(
            payload,
            PayloadFormat::Image | PayloadFormat::Rgb8 | PayloadFormat::Gray8
        );
        match p.kind {
            PipelineKind::Camera if !image_payload => out.bad(
                &key("payload"),
                "a camera pipeline takes \"image\" (JPEG/PNG), \"rgb8\" or \"gray8\"".into(),
            ),
            PipelineKind::Sensor if image_payload => out.bad(
                &key("payload"),
                "a sensor pipeline takes \"json\" or \"f32le\"; frames need kind = \"camera\""
                    .into(),
            ),
            _ => {}
        }
        if matches!(payload, PayloadFormat::Rgb8 | PayloadFormat::Gray8)
            && (p.width.unwrap_or(0) == 0 || p.height.unwrap_or(0) == 0)
        {
            out.bad(&key("width"), "raw frames need width and height".into());
        }
        if p.kind == PipelineKind::Camera
            && self.broker.max_packet_bytes < self.limits.max_image_bytes.min(1 << 28)
            && payload == PayloadFormat::Image
        {
            out.bad(
                "broker.max_packet_bytes",
                format!(
                    "{} is below limits.max_image_bytes ({}): frames that size would be refused by the MQTT client",
                    self.broker.max_packet_bytes, self.limits.max_image_bytes
                ),
            );
        }
        if p.kind == PipelineKind::Sensor {
            let camera_only = [
                ("snapshot", p.snapshot.is_some()),
                ("classes", p.classes.is_some()),
                ("width", p.width.is_some()),
                ("height", p.height.is_some()),
            ];
            for (k, _) in camera_only.iter().filter(|(_, set)| *set) {
                out.bad(
                    &key(k),
                    "a camera setting, not for kind = \"sensor\"".into(),
                );
            }
        }
        if p.topics.is_empty() {
            out.bad(
                &key("topics"),
                "needs at least one MQTT topic filter".into(),
            );
        }
        let mut wildcards = usize::MAX;
        for (j, t) in p.topics.iter().enumerate() {
            match crate::topic::TopicFilter::parse(t) {
                Ok(f) => wildcards = wildcards.min(f.wildcards()),
                Err(e) => out.bad(&format!("pipeline[{i}].topics[{j}]"), e),
            }
        }
        if wildcards == usize::MAX {
            wildcards = 0;
        }
        if let Err(e) = crate::topic::check_template(&p.results_template(), wildcards) {
            out.bad(&key("results"), e);
        }
        if p.qos > 2 {
            out.bad(
                &key("qos"),
                format!("{} is not an MQTT QoS (0, 1 or 2)", p.qos),
            );
        }
        if p.queue == 0 {
            out.bad(&key("queue"), "must be at least 1".into());
        }
        if p.workers == 0 || p.workers > 64 {
            out.bad(&key("workers"), "must be between 1 and 64".into());
        }
        if let Some(w) = p.window {
            if w.size == Some(0) {
                out.bad(&key("window.size"), "must be at least 1".into());
            }
            if w.stride == Some(0) {
                out.bad(&key("window.stride"), "must be at least 1".into());
            }
        }
        let path = self.model_path(p);
        if !path.is_file() {
            out.bad(&key("model"), format!("{}: no such file", path.display()));
        }
    }
}

/// Longest device id or pipeline name: both are topic levels, thread and
/// file names, journal fields and metric labels.
pub const MAX_NAME_CHARS: usize = 128;

/// The rule for a device id or a pipeline name: one topic level (no '/',
/// '+', '#'), no template braces, no control characters (a NUL would end a
/// thread name, a newline a log line), at most [`MAX_NAME_CHARS`].
pub fn check_name(name: &str) -> Result<(), String> {
    let shown: String = name.chars().take(40).collect();
    let more = if name.chars().count() > 40 { "…" } else { "" };
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(format!(
            "{shown:?}{more} is longer than {MAX_NAME_CHARS} characters"
        ));
    }
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Err(format!(
            "{shown:?}{more} holds the control character U+{:04X}; use letters, digits and punctuation",
            c as u32
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| matches!(c, '/' | '+' | '#' | '{' | '}'))
    {
        return Err(format!(
            "{shown:?}{more} holds {c:?}; a name is one topic level, free of '/', '+', '#', '{{' and '}}'"
        ));
    }
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "edgeinfer".into())
}

/// Host, port and transport of a broker URL: `mqtt://HOST[:PORT]` (1883)
/// or `mqtts://HOST[:PORT]` (8883, TLS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddress {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl BrokerAddress {
    pub fn parse(url: &str) -> Result<BrokerAddress, String> {
        let (rest, tls) = if let Some(r) = url
            .strip_prefix("mqtt://")
            .or_else(|| url.strip_prefix("tcp://"))
        {
            (r, false)
        } else if let Some(r) = url
            .strip_prefix("mqtts://")
            .or_else(|| url.strip_prefix("ssl://"))
        {
            (r, true)
        } else {
            return Err(format!(
                "{url:?}: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]"
            ));
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains(['/', '?', '@']) {
            return Err(format!(
                "{url:?}: expected a host and port, with no path, query or credentials"
            ));
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (h, p) = v6
                .split_once(']')
                .ok_or_else(|| format!("{url:?}: unclosed '['"))?;
            (h, p.strip_prefix(':'))
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (rest, None),
            }
        };
        if host.is_empty() {
            return Err(format!("{url:?}: no host"));
        }
        let port = match port {
            None if tls => 8883,
            None => 1883,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("{url:?}: bad port {p:?}"))?,
        };
        Ok(BrokerAddress {
            host: host.to_owned(),
            port,
            tls,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        let a = |u| BrokerAddress::parse(u);
        let addr = |host: &str, port, tls| BrokerAddress {
            host: host.into(),
            port,
            tls,
        };
        assert_eq!(
            a("mqtt://127.0.0.1:1884").unwrap(),
            addr("127.0.0.1", 1884, false)
        );
        assert_eq!(
            a("mqtt://broker.local").unwrap(),
            addr("broker.local", 1883, false)
        );
        assert_eq!(a("tcp://[::1]:2000").unwrap(), addr("::1", 2000, false));
        assert_eq!(
            a("mqtts://broker.local").unwrap(),
            addr("broker.local", 8883, true)
        );
        assert_eq!(
            a("ssl://10.0.0.1:9000").unwrap(),
            addr("10.0.0.1", 9000, true)
        );
        assert!(a("http://x").is_err());
        assert!(a("mqtt://:1883").is_err());
        assert!(a("mqtt://x:0").is_err());
        assert!(a("mqtt://x:99999").is_err());
        assert!(a("mqtt://user:pw@x").is_err());
    }

    /// `MemoryHigh=` / `MemoryMax=` of the shipped unit, in bytes.
    fn unit_limit(key: &str) -> u64 {
        let unit = include_str!("../systemd/edgeinfer.service");
        let v = unit
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("the unit sets {key}"));
        let (n, unit) = v.split_at(v.len() - 1);
        assert_eq!(unit, "M", "{key}={v}");
        n.parse::<u64>().unwrap() << 20
    }

    #[test]
    fn the_default_budget_fits_under_the_shipped_units_limits() {
        let budget = default_memory_mb() << 20;
        let (high, max) = (unit_limit("MemoryHigh"), unit_limit("MemoryMax"));
        assert!(budget < high && high <= max, "{budget} < {high} <= {max}");
        // The daemon would lower a budget above 80 % of the limit.
        assert!(budget <= high / 5 * 4);
        let example = Config::parse(include_str!("example.toml"), Path::new(".")).unwrap();
        assert_eq!(example.limits.memory_mb, default_memory_mb());
    }

    fn with_models_dir(text: &str) -> Config {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        Config::parse(text, dir).unwrap()
    }

    #[test]
    fn example_config_parses_and_validates() {
        let config = with_models_dir(EXAMPLE);
        assert_eq!(config.validate(), vec![]);
        assert!(!config.pipelines.is_empty());
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = Config::parse(
            "[broker]\nurl = \"mqtt://127.0.0.1\"\npasword = \"x\"\n",
            Path::new("."),
        )
        .unwrap_err();
        assert!(err.contains("pasword"), "{err}");
    }

    #[test]
    fn validate_reports_every_problem_with_its_key() {
        let config = with_models_dir(
            r#"
            [broker]
            url = "http://example"
            keep_alive_s = 1
            [[pipeline]]
            name = "a/b"
            kind = "sensor"
            topics = ["sensors/#/x"]
            model = "models/missing.toml"
            results = "out/{3}"
            qos = 3
            "#,
        );
        let keys: Vec<_> = config.validate().into_iter().map(|p| p.key).collect();
        for key in [
            "broker.url",
            "broker.keep_alive_s",
            "pipeline[0].name",
            "pipeline[0].topics[0]",
            "pipeline[0].qos",
            "pipeline[0].model",
        ] {
            assert!(
                keys.contains(&key.to_string()),
                "{key} missing from {keys:?}"
            );
        }
    }

    #[test]
    fn results_template_may_not_use_more_wildcards_than_the_filters_have() {
        let config = with_models_dir(
            r#"
            [[pipeline]]
            name = "p"
            kind = "sensor"
            topics = ["sensors/+/accel", "other/fixed"]
            model = "models/activity.toml"
            results = "out/{1}"
            "#,
        );
        let problems = config.validate();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].key, "pipeline[0].results");
    }
}
