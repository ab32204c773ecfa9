//! `[broker]`: where the broker is, how to log in, what it takes; the
//! broker URL's parser; and the device id's check beside it.

use super::*;
use serde::{Deserialize, Serialize};

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

impl Config {
    pub(super) fn check_device_and_broker(&self, out: &mut Problems) {
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

    pub(super) fn check_credentials(&self, out: &mut Problems) {
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

    pub(super) fn check_tls(&self, out: &mut Problems) {
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
}
