//! The daemon's own sections: `[device]`, `[topics]`, `[health]`,
//! `[limits]`, `[outbox]`, `[home_assistant]` and `[metrics]`, with their
//! checks.

use super::*;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Device {
    /// Used in every topic. Default: the host name.
    pub id: Option<String>,
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

impl Config {
    /// Topics, health, limits, outbox, and that there is a pipeline.
    pub(super) fn check_limits(&self, out: &mut Problems) {
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

    /// Home Assistant's discovery prefix and the metrics listener.
    pub(super) fn check_integrations(&self, out: &mut Problems) {
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
    }
}
