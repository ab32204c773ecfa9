//! Pipelines: MQTT message → decode → window → preprocess → inference →
//! postprocess → result. Each pipeline has `workers` dedicated OS threads
//! (never tokio workers); a source topic always goes to the same worker, so
//! its samples stay in order, and each worker owns its tract state.

pub mod post;
pub mod sensor;

use crate::config::{Config, PayloadFormat, Pipeline as PipelineConfig};
use crate::health::{Budget, PipelineStats, Telemetry};
use crate::model::{Model, Session};
use crate::mqtt::{Outbox, Outgoing, TopicFilter, TopicTemplate};
use bytes::Bytes;
use post::{Output, Preprocessor};
use rumqttc::QoS;
use sensor::{InputError, SensorWindow};
use serde::Serialize;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tract_onnx::prelude::Tensor;

/// One message handed from the MQTT poll loop to a pipeline worker.
#[derive(Debug)]
pub struct Ingested {
    pub topic: String,
    pub payload: Bytes,
    pub received: Instant,
    /// Acknowledges the MQTT message once every pipeline dropped it.
    pub ack: Option<crate::mqtt::AckToken>,
}

/// Everything a worker needs to know about its pipeline, fixed at start.
#[derive(Debug)]
pub struct PipelineSpec {
    pub name: String,
    pub filters: Vec<TopicFilter>,
    pub results: TopicTemplate,
    pub errors_topic: String,
    pub qos: QoS,
    pub payload: PayloadFormat,
    pub channels: usize,
    pub size: usize,
    pub stride: usize,
    pub max_payload: usize,
    pub max_sources: usize,
    pub model: Arc<Model>,
}

impl PipelineSpec {
    /// Checks a pipeline against its loaded model and fixes the window.
    pub fn new(
        config: &Config,
        p: &PipelineConfig,
        model: Arc<Model>,
    ) -> Result<PipelineSpec, String> {
        let input = model.input();
        // A sensor model's input is [.., samples, channels]: the last
        // dimension is the channel count, the rest hold the samples.
        let channels = *input
            .shape
            .last()
            .filter(|c| **c > 0)
            .ok_or_else(|| format!("model input {input} has no channel dimension"))?;
        let samples = input.len() / channels;
        let size = p.window.and_then(|w| w.size).unwrap_or(samples);
        if size != samples {
            return Err(format!(
                "window.size = {size}, but model {} takes {samples} samples of {channels} channels ({input})",
                model.name
            ));
        }
        let stride = p.window.and_then(|w| w.stride).unwrap_or(size);
        Preprocessor::new(&model, channels)?;
        let filters = p
            .topics
            .iter()
            .map(|t| TopicFilter::parse(t))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(PipelineSpec {
            name: p.name.clone(),
            results: TopicTemplate::new(
                &p.results_template(),
                &config.device_id(),
                &p.name,
                &config.prefix(),
            ),
            errors_topic: format!("{}/errors", config.prefix()),
            filters,
            qos: crate::mqtt::qos(p.qos),
            payload: p.payload,
            channels,
            size,
            stride,
            max_payload: config.limits.max_payload_bytes,
            max_sources: config.limits.max_sources,
            model,
        })
    }

    fn captures<'t>(&self, topic: &'t str) -> Vec<&'t str> {
        self.filters
            .iter()
            .find_map(|f| f.captures(topic))
            .unwrap_or_default()
    }
}

/// The router's handle on a running pipeline.
pub struct PipelineHandle {
    pub spec: Arc<PipelineSpec>,
    pub stats: Arc<PipelineStats>,
    senders: Vec<flume::Sender<Ingested>>,
    budget: Arc<Budget>,
}

impl PipelineHandle {
    pub fn matches(&self, topic: &str) -> bool {
        self.spec.filters.iter().any(|f| f.matches(topic))
    }

    /// Hands a message to the worker that owns its source, never waiting: a
    /// full queue, or input queues holding their share of the memory
    /// budget, drop the message and count it.
    pub fn offer(&self, msg: Ingested) {
        self.stats.received.inc();
        let bytes = msg.payload.len() as u64;
        if !self.budget.try_take(bytes) {
            self.stats.dropped.inc();
            return;
        }
        let shard = if self.senders.len() == 1 {
            0
        } else {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            msg.topic.hash(&mut h);
            (h.finish() % self.senders.len() as u64) as usize
        };
        // Count before sending: the worker may take it off the queue at once.
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        if self.senders[shard].try_send(msg).is_err() {
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
            self.budget.give(bytes);
            self.stats.dropped.inc();
        }
    }
}

/// Starts a pipeline's worker threads. They end when the handle (the only
/// sender) is dropped and their queues are drained.
pub fn start(
    spec: PipelineSpec,
    queue: usize,
    workers: usize,
    outbox: Outbox,
    telemetry: &Telemetry,
) -> Result<(PipelineHandle, Vec<JoinHandle<()>>), String> {
    let spec = Arc::new(spec);
    let stats = telemetry.pipeline(&spec.name);
    let model_stats = telemetry.model(&spec.model.name);
    let mut senders = Vec::with_capacity(workers);
    let mut threads = Vec::with_capacity(workers);
    let per_worker = queue.div_ceil(workers);
    for i in 0..workers {
        let (tx, rx) = flume::bounded(per_worker);
        senders.push(tx);
        let session = spec.model.session().map_err(|e| e.to_string())?;
        let budget = Arc::clone(&telemetry.input_budget);
        let mut worker = Worker {
            pre: Preprocessor::new(&spec.model, spec.channels)?,
            spec: Arc::clone(&spec),
            session,
            sources: HashMap::new(),
            clock: 0,
            outbox: outbox.clone(),
            stats: Arc::clone(&stats),
            model_stats: Arc::clone(&model_stats),
            raw: Vec::with_capacity(spec.size * spec.channels),
            normalised: Vec::with_capacity(spec.size * spec.channels),
        };
        let thread = std::thread::Builder::new()
            .name(format!("infer-{}-{i}", spec.name))
            .spawn(move || {
                while let Ok::<Ingested, _>(msg) = rx.recv() {
                    worker.stats.queued.fetch_sub(1, Ordering::Relaxed);
                    budget.give(msg.payload.len() as u64);
                    let topic = msg.topic.clone();
                    // A bug in one message's handling must not end the worker:
                    // its queue would then drop everything, silently.
                    let handled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| worker.handle(msg)));
                    if handled.is_err() {
                        worker.sources.remove(&topic);
                        worker.reject(&topic, "internal", "internal error while handling this input (see the log); the source's window was reset".into());
                    }
                }
            })
            .map_err(|e| format!("cannot start worker thread: {e}"))?;
        threads.push(thread);
    }
    Ok((
        PipelineHandle {
            spec,
            stats,
            senders,
            budget: Arc::clone(&telemetry.input_budget),
        },
        threads,
    ))
}

struct Source {
    window: SensorWindow,
    seq: u64,
    last_seen: u64,
    /// Recurrent state of streaming models (empty for the others).
    state: Vec<Tensor>,
}

struct Worker {
    spec: Arc<PipelineSpec>,
    session: Session,
    pre: Preprocessor,
    sources: HashMap<String, Source>,
    /// Logical clock for least-recently-seen eviction.
    clock: u64,
    outbox: Outbox,
    stats: Arc<PipelineStats>,
    model_stats: Arc<crate::health::ModelStats>,
    raw: Vec<f32>,
    normalised: Vec<f32>,
}

/// Where a result's time went, in milliseconds.
#[derive(Serialize)]
pub struct LatencyMs {
    pub queue: f64,
    pub pre: f64,
    pub infer: f64,
    pub post: f64,
}

/// The result message (PRODUCT.md schema).
#[derive(Serialize)]
pub struct ResultMessage<'a> {
    pub pipeline: &'a str,
    pub source: &'a str,
    pub model: &'a str,
    pub model_sha256: &'a str,
    pub ts: u64,
    pub seq: u64,
    pub latency_ms: LatencyMs,
    pub output: &'a Output,
}

#[derive(Serialize)]
struct ErrorMessage<'a> {
    pipeline: &'a str,
    source: &'a str,
    kind: &'a str,
    reason: String,
    ts: u64,
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

impl Worker {
    fn handle(&mut self, msg: Ingested) {
        let picked = Instant::now();
        let queue = picked - msg.received;
        let decoded = if msg.payload.len() > self.spec.max_payload {
            Err(InputError::TooLarge {
                size: msg.payload.len(),
                max: self.spec.max_payload,
            })
        } else {
            match self.spec.payload {
                PayloadFormat::Json => sensor::decode_json(&msg.payload, self.spec.channels),
                PayloadFormat::F32le => sensor::decode_f32le(&msg.payload, self.spec.channels),
            }
        };
        let samples = match decoded {
            Ok(s) => s,
            Err(e) => {
                self.reject(&msg.topic, e.kind(), e.to_string());
                return;
            }
        };
        self.stats.processed.inc();
        let ts = samples.ts.unwrap_or_else(unix_ms);

        self.clock += 1;
        // The source's state leaves the map while its samples are pushed, so
        // every window a batch completes is inferred in order.
        let mut source = match self.sources.remove(&msg.topic) {
            Some(s) => s,
            None => {
                if self.sources.len() >= self.spec.max_sources {
                    self.evict_idlest();
                }
                Source {
                    window: SensorWindow::new(self.spec.size, self.spec.stride, self.spec.channels),
                    seq: 0,
                    last_seen: 0,
                    state: self.spec.model.initial_state.clone(),
                }
            }
        };
        source.last_seen = self.clock;
        let decode = picked.elapsed();
        let mut first = true;
        for sample in samples.values.chunks_exact(self.spec.channels) {
            if source.window.push(sample) {
                source.window.copy_into(&mut self.raw);
                self.infer(
                    &msg.topic,
                    ts,
                    source.seq,
                    if first { Some((queue, decode)) } else { None },
                    &mut source.state,
                );
                source.seq += 1;
                first = false;
            }
        }
        self.sources.insert(msg.topic, source);
    }

    /// Runs the model on `self.raw`. `waited` is (queue time, decode time) for
    /// the first window of a message; later windows of a batch carry none.
    fn infer(
        &mut self,
        topic: &str,
        ts: u64,
        seq: u64,
        waited: Option<(Duration, Duration)>,
        state: &mut [Tensor],
    ) {
        let (queue, decode) = waited.unwrap_or_default();
        let t0 = Instant::now();
        let tensor = self.pre.tensor(&self.raw, &mut self.normalised);
        let t1 = Instant::now();
        let out = self.session.run_with_state(tensor, state);
        let t2 = Instant::now();
        let output = match out {
            Ok(out) => post::postprocess(&self.spec.model, out, &self.normalised),
            Err(e) => Err(e.to_string()),
        };
        let output = match output {
            Ok(o) => o,
            Err(reason) => {
                self.reject(topic, "inference", reason);
                return;
            }
        };
        let t3 = Instant::now();
        let latency = LatencyMs {
            queue: ms(queue),
            pre: ms(t1 - t0 + decode),
            infer: ms(t2 - t1),
            post: ms(t3 - t2),
        };
        let spec = &self.spec;
        let message = ResultMessage {
            pipeline: &spec.name,
            source: topic,
            model: &spec.model.name,
            model_sha256: &spec.model.sha256,
            ts,
            seq,
            latency_ms: latency,
            output: &output,
        };
        let payload = serde_json::to_vec(&message).expect("result serializes");
        let result_topic = spec.results.render(&spec.captures(topic));
        self.model_stats
            .inference
            .record((t2 - t1).as_secs_f64() * 1e3);
        self.stats
            .latency
            .record((t3 - t0 + decode + queue).as_secs_f64() * 1e3);
        self.stats.results.inc();
        self.outbox.send(Outgoing {
            topic: result_topic,
            payload,
            qos: spec.qos,
            retain: false,
        });
    }

    fn reject(&mut self, source: &str, kind: &str, reason: String) {
        self.stats.errors.inc();
        tracing::debug!(pipeline = %self.spec.name, source, kind, %reason, "Rejected input");
        let payload = serde_json::to_vec(&ErrorMessage {
            pipeline: &self.spec.name,
            source,
            kind,
            reason,
            ts: unix_ms(),
        })
        .expect("error serializes");
        self.outbox.send(Outgoing {
            topic: self.spec.errors_topic.clone(),
            payload,
            qos: QoS::AtLeastOnce,
            retain: false,
        });
    }

    fn evict_idlest(&mut self) {
        if let Some(topic) = self
            .sources
            .iter()
            .min_by_key(|(_, s)| s.last_seen)
            .map(|(t, _)| t.clone())
        {
            self.sources.remove(&topic);
            self.stats.evicted.inc();
        }
    }
}
