//! Home Assistant MQTT discovery (off by default): one device-based
//! discovery config per daemon at `{discovery_prefix}/device/{id}/config`,
//! with, per pipeline, a sensor for the latest result, a latency sensor and
//! a "running" binary sensor, and daemon-level CPU, memory, temperature
//! and outbox depth. Availability is the daemon's retained status topic.
//!
//! The per-pipeline latest result is republished (retained, QoS 0, at most
//! once a second) on a fixed topic, `{prefix}/state/{pipeline}`, because a
//! results template usually varies per source. The other entities read the
//! health message. Discovery is republished, after a random delay of up to
//! two seconds (a fleet must not answer in lockstep), on every connect and
//! whenever Home Assistant's birth message (`{discovery_prefix}/status` =
//! `online`) arrives. Pipelines that were in the previously published
//! config and are gone now are removed: their entries are sent with only
//! their platform, which is how Home Assistant removes a component from a
//! device-based config.

use crate::mqtt::{LatestResults, Outbox, Outgoing, QoS};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What the discovery config describes.
#[derive(Debug, Clone)]
pub struct Discovery {
    pub discovery_prefix: String,
    pub device: String,
    /// The daemon's topic prefix (`edgeinfer/{device}`).
    pub prefix: String,
    /// (pipeline, output kind: `classification`, `anomaly` or `detection`).
    pub pipelines: Vec<(String, String)>,
}

impl Discovery {
    /// `edgeinfer_{device}`: the device's id in Home Assistant and its
    /// discovery topic's node.
    pub fn node_id(&self) -> String {
        format!("edgeinfer_{}", crate::topic::discovery_id(&self.device))
    }

    pub fn topic(&self) -> String {
        format!("{}/device/{}/config", self.discovery_prefix, self.node_id())
    }

    /// Home Assistant's birth and last-will topic.
    pub fn ha_status_topic(&self) -> String {
        format!("{}/status", self.discovery_prefix)
    }

    pub fn state_topic(&self, pipeline: &str) -> String {
        format!("{}/state/{pipeline}", self.prefix)
    }

    /// The components, by their id in `cmps`.
    pub fn components(&self) -> BTreeMap<String, Value> {
        let node = self.node_id();
        let health = format!("{}/health", self.prefix);
        let mut cmps = BTreeMap::new();
        let mut add = |key: String, mut c: Value| {
            c["unique_id"] = json!(format!("{node}_{key}"));
            cmps.insert(key, c);
        };
        for (name, kind) in &self.pipelines {
            let id = crate::topic::discovery_id(name);
            // Jinja string literal for the pipeline's key in the health JSON.
            let p = serde_json::to_string(name).expect("a string serializes");
            let (value, extra) = match kind.as_str() {
                "anomaly" => (
                    "{{ value_json.output.score }}",
                    json!({"state_class": "measurement", "icon": "mdi:chart-bell-curve"}),
                ),
                "detection" => (
                    "{{ value_json.output.detections | length }}",
                    json!({"state_class": "measurement", "unit_of_measurement": "objects", "icon": "mdi:select-search"}),
                ),
                _ => (
                    "{{ value_json.output.top[0].label }}",
                    json!({"icon": "mdi:label-outline"}),
                ),
            };
            let mut result = json!({
                "p": "sensor",
                "name": format!("{name} result"),
                "state_topic": self.state_topic(name),
                "value_template": value,
                "json_attributes_topic": self.state_topic(name),
                "json_attributes_template":
                    "{{ {'source': value_json.source, 'model': value_json.model, 'ts': value_json.ts, 'output': value_json.output, 'latency_ms': value_json.latency_ms} | tojson }}",
            });
            merge(&mut result, extra);
            add(format!("{id}_result"), result);
            add(
                format!("{id}_latency"),
                json!({
                    "p": "sensor",
                    "name": format!("{name} latency p50"),
                    "state_topic": health,
                    "value_template": format!("{{{{ value_json.pipelines[{p}].latency_ms.p50 }}}}"),
                    "unit_of_measurement": "ms",
                    "device_class": "duration",
                    "state_class": "measurement",
                    "entity_category": "diagnostic",
                }),
            );
            add(
                format!("{id}_running"),
                json!({
                    "p": "binary_sensor",
                    "name": format!("{name} running"),
                    "state_topic": health,
                    "value_template": format!("{{{{ 'ON' if value_json.pipelines[{p}].state == 'running' else 'OFF' }}}}"),
                    "device_class": "running",
                    "entity_category": "diagnostic",
                }),
            );
        }
        let daemon = [
            ("cpu", "CPU", "{{ value_json.cpu_percent }}", json!({"unit_of_measurement": "%", "icon": "mdi:cpu-64-bit"})),
            ("rss", "memory", "{{ value_json.memory.rss_bytes }}", json!({"unit_of_measurement": "B", "device_class": "data_size"})),
            (
                "temperature",
                "temperature",
                "{{ (value_json.temperature_c.values() | list | max) if value_json.temperature_c else None }}",
                json!({"unit_of_measurement": "°C", "device_class": "temperature"}),
            ),
            ("outbox", "outbox depth", "{{ value_json.outbox.queued_messages }}", json!({"unit_of_measurement": "messages", "icon": "mdi:tray-full"})),
        ];
        for (key, name, value, extra) in daemon {
            let mut c = json!({
                "p": "sensor",
                "name": name,
                "state_topic": health,
                "value_template": value,
                "state_class": "measurement",
                "entity_category": "diagnostic",
            });
            merge(&mut c, extra);
            add(key.to_owned(), c);
        }
        cmps
    }

    /// The discovery payload; `removed` are component ids to remove, with
    /// their platform.
    pub fn payload(&self, removed: &[(String, String)]) -> Value {
        let version = env!("CARGO_PKG_VERSION");
        let mut cmps: Map<String, Value> = self.components().into_iter().collect();
        for (key, platform) in removed {
            cmps.insert(key.clone(), json!({ "p": platform }));
        }
        json!({
            "dev": {
                "ids": [self.node_id()],
                "name": format!("edgeinfer {}", self.device),
                "mf": "edgeinfer",
                "mdl": "edgeinfer inference daemon",
                "sw": version,
            },
            "o": {
                "name": "edgeinfer",
                "sw": version,
                "url": "https://github.com/edgeinfer/edgeinfer",
            },
            "availability_topic": format!("{}/status", self.prefix),
            "payload_available": "online",
            "payload_not_available": "offline",
            "qos": 1,
            "cmps": cmps,
        })
    }

    /// Reads back the retained config on our discovery topic (from a run
    /// before this one, or anyone's). Bounded: one over
    /// [`MAX_READBACK_BYTES`] or [`MAX_READBACK_COMPONENTS`] is not parsed
    /// further. Only a config of ours (our device id and origin) is merged:
    /// its components this config no longer has are removed; any other is
    /// replaced whole by ours, and nothing of it is echoed back.
    pub fn read_back(&self, previous: &[u8]) -> Readback {
        if previous.is_empty() {
            return Readback::Ours(vec![]);
        }
        if previous.len() > MAX_READBACK_BYTES {
            return Readback::Foreign(format!(
                "{} bytes, over the {MAX_READBACK_BYTES} a config of ours can be",
                previous.len()
            ));
        }
        let Ok(previous) = serde_json::from_slice::<Value>(previous) else {
            return Readback::Foreign("not JSON".into());
        };
        let node = self.node_id();
        let ours = previous["o"]["name"] == "edgeinfer"
            && previous["dev"]["ids"]
                .as_array()
                .is_some_and(|ids| ids.iter().any(|i| *i == node.as_str()));
        let Some(cmps) = previous["cmps"].as_object().filter(|_| ours) else {
            return Readback::Foreign("not this daemon's device config".into());
        };
        if cmps.len() > MAX_READBACK_COMPONENTS {
            return Readback::Foreign(format!(
                "{} components, over the {MAX_READBACK_COMPONENTS} a config of ours can have",
                cmps.len()
            ));
        }
        let current = self.components();
        let gone = cmps
            .iter()
            .filter(|(key, c)| {
                // A live component of ours: more than its platform, and
                // the unique id we give it.
                !current.contains_key(*key)
                    && c.as_object().is_some_and(|o| o.len() > 1)
                    && c["unique_id"] == format!("{node}_{key}").as_str()
            })
            .filter_map(|(key, c)| {
                let p = c["p"].as_str()?;
                matches!(p, "sensor" | "binary_sensor").then(|| (key.clone(), p.to_owned()))
            })
            .collect();
        Readback::Ours(gone)
    }
}

/// Largest retained config read back (ours is about 1.5 KiB a pipeline).
pub const MAX_READBACK_BYTES: usize = 256 * 1024;
/// Most components read back (ours has three a pipeline and four more).
pub const MAX_READBACK_COMPONENTS: usize = 1024;

/// What the retained config on our discovery topic is.
#[derive(Debug, PartialEq)]
pub enum Readback {
    /// Ours: the components to remove (id, platform).
    Ours(Vec<(String, String)>),
    /// Not ours, or too large to be: replaced, with the reason logged.
    Foreign(String),
}

fn merge(into: &mut Value, extra: Value) {
    if let (Some(into), Value::Object(extra)) = (into.as_object_mut(), extra) {
        into.extend(extra);
    }
}

/// Publishes discovery and latest results until `stop`. `connected`
/// fires on every connection to the broker; `messages` carries what
/// arrives on Home Assistant's status topic and on our own discovery topic
/// (the retained config from before).
pub async fn run(
    discovery: Discovery,
    outbox: Outbox,
    latest: Arc<LatestResults>,
    connected: flume::Receiver<()>,
    messages: flume::Receiver<(String, bytes::Bytes)>,
    stop: CancellationToken,
) {
    let own = discovery.topic();
    let birth = discovery.ha_status_topic();
    let mut removed: Vec<(String, String)> = Vec::new();
    let mut due: Option<tokio::time::Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let jitter = || tokio::time::Instant::now() + Duration::from_millis(fastrand::u64(..=2000));
    let state = |pipeline: &str, payload: Vec<u8>| Outgoing {
        topic: discovery.state_topic(pipeline),
        payload,
        qos: QoS::AtMostOnce,
        retain: true,
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            Ok(()) = connected.recv_async() => due = Some(jitter()),
            message = messages.recv_async() => match message {
                Err(_) => break,
                Ok((topic, payload)) if topic == birth => {
                    if payload.as_ref() == b"online" {
                        due = Some(jitter());
                    }
                }
                Ok((topic, payload)) if topic == own => match discovery.read_back(&payload) {
                    Readback::Ours(gone) if gone.is_empty() => {}
                    Readback::Ours(gone) => {
                        tracing::info!(components = gone.len(), "Home Assistant: removing the components of pipelines no longer configured");
                        removed = gone;
                        due = Some(tokio::time::Instant::now());
                    }
                    Readback::Foreign(why) => {
                        tracing::warn!(topic = %own, reason = %why, "Home Assistant: the retained discovery config is not ours; replacing it");
                        removed.clear();
                        due = Some(tokio::time::Instant::now());
                    }
                },
                Ok(_) => {}
            },
            _ = async { tokio::time::sleep_until(due.expect("guarded")).await }, if due.is_some() => {
                due = None;
                let payload = discovery.payload(&removed).to_string().into_bytes();
                let _ = outbox.offer(Outgoing { topic: own.clone(), payload, qos: QoS::AtLeastOnce, retain: true });
                for (pipeline, json) in latest.all() {
                    let _ = outbox.offer(state(&pipeline, json));
                }
            }
            _ = tick.tick() => {
                for (pipeline, json) in latest.take_changed() {
                    let _ = outbox.offer(state(&pipeline, json));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn discovery() -> Discovery {
        Discovery {
            discovery_prefix: "homeassistant".into(),
            device: "gw.1".into(),
            prefix: "edgeinfer/gw.1".into(),
            pipelines: vec![
                ("activity".into(), "classification".into()),
                ("cams".into(), "detection".into()),
            ],
        }
    }

    #[test]
    fn ids_and_topics_follow_the_discovery_rules() {
        let d = discovery();
        assert_eq!(d.node_id(), "edgeinfer_gw_1");
        assert_eq!(d.topic(), "homeassistant/device/edgeinfer_gw_1/config");
        let cmps = d.components();
        assert_eq!(cmps.len(), 3 * 2 + 4);
        assert_eq!(
            cmps["cams_result"]["value_template"],
            "{{ value_json.output.detections | length }}"
        );
        assert_eq!(
            cmps["activity_latency"]["value_template"],
            "{{ value_json.pipelines[\"activity\"].latency_ms.p50 }}"
        );
    }

    #[test]
    fn a_pipeline_gone_since_the_last_config_is_removed_once() {
        let before = discovery().payload(&[]).to_string();
        let mut now = discovery();
        now.pipelines.truncate(1);
        let Readback::Ours(mut gone) = now.read_back(before.as_bytes()) else {
            panic!("our own config")
        };
        gone.sort();
        assert_eq!(
            gone,
            vec![
                ("cams_latency".to_string(), "sensor".to_string()),
                ("cams_result".to_string(), "sensor".to_string()),
                ("cams_running".to_string(), "binary_sensor".to_string()),
            ]
        );
        // Published with the removals, then read back: nothing more to remove.
        let after = now.payload(&gone).to_string();
        assert_eq!(after.matches("\"p\"").count(), 3 + 4 + 3);
        assert_eq!(now.read_back(after.as_bytes()), Readback::Ours(vec![]));
    }

    #[test]
    fn a_foreign_or_huge_config_is_replaced_not_merged() {
        let d = discovery();
        // Someone else's device config on our topic: nothing of it removed.
        let mut foreign = discovery().payload(&[]);
        foreign["dev"]["ids"] = json!(["someone_else"]);
        assert!(matches!(
            d.read_back(foreign.to_string().as_bytes()),
            Readback::Foreign(_)
        ));
        // Ours in name, but with many components: not parsed further.
        let mut big = discovery().payload(&[]);
        let cmps = big["cmps"].as_object_mut().unwrap();
        for i in 0..(MAX_READBACK_COMPONENTS + 1) {
            cmps.insert(format!("x{i}_result"), json!({"p": "sensor", "name": "x"}));
        }
        assert!(matches!(
            d.read_back(big.to_string().as_bytes()),
            Readback::Foreign(_)
        ));
        let huge = vec![b' '; MAX_READBACK_BYTES + 1];
        assert!(matches!(d.read_back(&huge), Readback::Foreign(_)));
        // A component without our unique id is not ours to remove.
        let mut odd = discovery().payload(&[]);
        odd["cmps"]["stranger_result"] = json!({"p": "sensor", "name": "s", "unique_id": "x"});
        assert_eq!(
            d.read_back(odd.to_string().as_bytes()),
            Readback::Ours(vec![])
        );
    }
}
