//! Configuration: serde structs, defaults, and a `validate()` that reports
//! every problem at once, each with the key it belongs to.

use serde::{Deserialize, Serialize};

use std::fmt;

mod broker;
mod engine;
mod operations;
mod pipeline;
mod service;

pub use broker::{Broker, BrokerAddress};
pub use engine::{Backend, EngineConfig};
pub use operations::{OperationsConfig, ProbationConfig, OPERATIONS};
pub use pipeline::{PayloadFormat, Pipeline, PipelineKind, Window};
pub use service::{
    default_memory_mb, Device, Health, HomeAssistantConfig, Limits, MetricsConfig, OutboxConfig,
    Topics,
};

use std::path::{Path, PathBuf};

/// The complete, commented example printed by `edgeinfer print-config`.
/// Tests parse and validate it, so it cannot rot.
pub const EXAMPLE: &str = include_str!("../example.toml");

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
    /// [`Config::effective`], resolved on first use.
    #[serde(skip)]
    effective: std::sync::OnceLock<Effective>,
}

/// The settings in effect: what the file says with the environment's
/// defaults filled in (the host name and systemd's instance name, its
/// state directory), resolved once per configuration. The daemon's parts
/// read them here rather than each deriving its own.
#[derive(Debug, Clone, PartialEq)]
pub struct Effective {
    /// `device.id`, else the host name (with `-NAME` under the template
    /// unit `edgeinfer@NAME`).
    pub device_id: String,
    /// `topics.prefix` with `{device}` filled in.
    pub prefix: String,
    /// `broker.client_id`, else `edgeinfer-{device}`.
    pub client_id: String,
    /// The operations' state (installed models, records):
    /// `operations.state_dir`, else `$STATE_DIRECTORY`.
    pub state_dir: Option<PathBuf>,
    /// The outbox's spool: `outbox.dir`, else `$STATE_DIRECTORY/outbox`;
    /// none: in memory.
    pub spool_dir: Option<PathBuf>,
    /// Where `auto` caches its engine choices: `engine.cache_dir`, else
    /// `$STATE_DIRECTORY`.
    pub engine_cache_dir: Option<PathBuf>,
    /// What the broker takes (checked before anything is queued).
    pub publish_limits: crate::topic::PublishLimits,
}

impl Effective {
    fn of(c: &Config) -> Effective {
        let device_id =
            c.device
                .id
                .clone()
                .unwrap_or_else(|| match std::env::var("EDGEINFER_INSTANCE") {
                    Ok(instance) if !instance.is_empty() => format!("{}-{instance}", hostname()),
                    _ => hostname(),
                });
        let state = state_directory();
        let resolve = |d: &Option<PathBuf>| d.as_ref().map(|d| c.base_dir.join(d));
        Effective {
            prefix: c.topics.prefix.replace("{device}", &device_id),
            client_id: c
                .broker
                .client_id
                .clone()
                .unwrap_or_else(|| format!("edgeinfer-{device_id}")),
            state_dir: resolve(&c.operations.state_dir).or_else(|| state.clone()),
            spool_dir: resolve(&c.outbox.dir).or_else(|| state.as_ref().map(|d| d.join("outbox"))),
            engine_cache_dir: resolve(&c.engine.cache_dir).or(state),
            publish_limits: crate::topic::PublishLimits {
                max_topic_bytes: c.broker.max_topic_bytes,
                max_topic_levels: c.broker.max_topic_levels,
                max_packet_bytes: c.broker.max_packet_bytes,
            },
            device_id,
        }
    }
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

    /// The settings in effect ([`Effective`]), resolved on first use.
    pub fn effective(&self) -> &Effective {
        self.effective.get_or_init(|| Effective::of(self))
    }

    pub fn device_id(&self) -> String {
        self.effective().device_id.clone()
    }

    pub fn prefix(&self) -> String {
        self.effective().prefix.clone()
    }

    pub fn client_id(&self) -> String {
        self.effective().client_id.clone()
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
        self.check_integrations(&mut out);
        self.check_operations(&mut out);
        let mut names = std::collections::HashSet::new();
        for (i, p) in self.pipelines.iter().enumerate() {
            self.check_pipeline(i, p, &mut names, &mut out);
        }
        self.check_discovery_ids(&mut out);
        out.0
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_settings_are_resolved_once_from_the_file() {
        let text = "[device]\nid = \"gw-7\"\n[topics]\nprefix = \"site/{device}\"\n[operations]\nstate_dir = \"state\"\n[outbox]\ndir = \"spool\"\n[engine]\ncache_dir = \"cache\"\n[broker]\nmax_topic_levels = 9\n";
        let c = Config::parse(text, Path::new("/etc/e")).unwrap();
        let e = c.effective();
        assert_eq!(e.device_id, "gw-7");
        assert_eq!(e.prefix, "site/gw-7");
        assert_eq!(e.client_id, "edgeinfer-gw-7");
        assert_eq!(e.state_dir.as_deref(), Some(Path::new("/etc/e/state")));
        assert_eq!(e.spool_dir.as_deref(), Some(Path::new("/etc/e/spool")));
        assert_eq!(
            e.engine_cache_dir.as_deref(),
            Some(Path::new("/etc/e/cache"))
        );
        assert_eq!(e.publish_limits.max_topic_levels, 9);
        // The same value every time (resolved once), and in the helpers.
        assert!(std::ptr::eq(e, c.effective()));
        assert_eq!(c.prefix(), "site/gw-7");
    }

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
        let unit = include_str!("../../systemd/edgeinfer.service");
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
        let example = Config::parse(include_str!("../example.toml"), Path::new(".")).unwrap();
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
