//! The MQTT side of a pipeline: which topics feed it (its route) and where
//! its verdicts go (results template, QoS, snapshots, the errors topic).

use super::outbox::{error_message, Outbox};
use super::{qos, Outgoing};
use crate::config::{Config, Pipeline as PipelineConfig};
use crate::flow::{Sink, Verdict};
use crate::topic::{TopicFilter, TopicTemplate};
use rumqttc::QoS;

/// A pipeline's topics: the filters it takes input from, and the templates
/// its results (and snapshots) are published under.
#[derive(Debug)]
pub struct Route {
    pub pipeline: String,
    pub filters: Vec<TopicFilter>,
    pub results: TopicTemplate,
    pub snapshot: Option<TopicTemplate>,
    pub qos: QoS,
}

impl Route {
    /// `p` must have passed config validation (filters and templates).
    pub fn new(config: &Config, p: &PipelineConfig) -> Result<Route, String> {
        let template =
            |t: &str| TopicTemplate::new(t, &config.device_id(), &p.name, &config.prefix());
        Ok(Route {
            pipeline: p.name.clone(),
            filters: p
                .topics
                .iter()
                .map(|t| TopicFilter::parse(t))
                .collect::<Result<Vec<_>, _>>()?,
            results: template(&p.results_template()),
            snapshot: p.snapshot.as_deref().map(template),
            qos: qos(p.qos),
        })
    }

    pub fn matches(&self, topic: &str) -> bool {
        self.filters.iter().any(|f| f.matches(topic))
    }

    fn captures<'t>(&self, topic: &'t str) -> Vec<&'t str> {
        self.filters
            .iter()
            .find_map(|f| f.captures(topic))
            .unwrap_or_default()
    }
}

/// Publishes a pipeline's verdicts through the outbox: results under the
/// route's template at its QoS (spooled), rejections on the errors topic
/// (spooled, QoS 1), snapshots at QoS 0 (transient).
pub struct PipelineSink {
    pub route: std::sync::Arc<Route>,
    pub errors_topic: String,
    pub outbox: Outbox,
    /// Where the latest result is kept for Home Assistant, when enabled.
    pub latest: Option<std::sync::Arc<LatestResults>>,
}

/// The latest result of each pipeline, for publishers that want a fixed
/// topic per pipeline (Home Assistant's state topics) at their own pace.
#[derive(Debug, Default)]
pub struct LatestResults {
    /// Pipeline → (result JSON, changed since last taken).
    slots: std::sync::Mutex<std::collections::BTreeMap<String, (Vec<u8>, bool)>>,
}

impl LatestResults {
    pub fn set(&self, pipeline: &str, json: &[u8]) {
        let mut slots = self.slots.lock().expect("latest lock");
        match slots.get_mut(pipeline) {
            Some((v, changed)) => {
                v.clear();
                v.extend_from_slice(json);
                *changed = true;
            }
            None => {
                slots.insert(pipeline.to_owned(), (json.to_vec(), true));
            }
        }
    }

    /// The results that changed since the last call.
    pub fn take_changed(&self) -> Vec<(String, Vec<u8>)> {
        let mut slots = self.slots.lock().expect("latest lock");
        slots
            .iter_mut()
            .filter(|(_, (_, changed))| *changed)
            .map(|(p, (v, changed))| {
                *changed = false;
                (p.clone(), v.clone())
            })
            .collect()
    }

    /// Every pipeline's latest result.
    pub fn all(&self) -> Vec<(String, Vec<u8>)> {
        let slots = self.slots.lock().expect("latest lock");
        slots
            .iter()
            .map(|(p, (v, _))| (p.clone(), v.clone()))
            .collect()
    }
}

impl Sink for PipelineSink {
    fn emit(&self, verdict: Verdict) -> Result<(), String> {
        let sent = match verdict {
            Verdict::Result { source, json } => {
                if let Some(latest) = &self.latest {
                    latest.set(&self.route.pipeline, &json);
                }
                self.outbox.send(Outgoing {
                    topic: self.route.results.render(&self.route.captures(source)),
                    payload: json,
                    qos: self.route.qos,
                    retain: false,
                })
            }
            Verdict::Rejected { source, rejection } => {
                // Debug: bad traffic must not flood the journal; the errors
                // topic has every one.
                tracing::debug!(topic = %source, kind = rejection.kind(), "Input rejected: {rejection}");
                self.outbox.send(error_message(
                    &self.errors_topic,
                    &self.route.pipeline,
                    source,
                    rejection.kind(),
                    &rejection.to_string(),
                ))
            }
            Verdict::Snapshot { source, jpeg } => match &self.route.snapshot {
                Some(t) => self.outbox.offer(Outgoing {
                    topic: t.render(&self.route.captures(source)),
                    payload: jpeg,
                    qos: QoS::AtMostOnce,
                    retain: false,
                }),
                None => Ok(()),
            },
        };
        sent.map_err(|e| e.0)
    }
}
