//! Pipelines: MQTT message → decode → window → preprocess → inference →
//! postprocess → result. Each pipeline has `workers` dedicated OS threads
//! (never tokio workers); a source topic always goes to the same worker, so
//! its samples stay in order, and each worker owns its tract state.

pub mod camera;
pub mod post;
pub mod sensor;

use crate::config::{Config, PayloadFormat, Pipeline as PipelineConfig, PipelineKind};
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
    /// Empty when the payload was over the pipeline's limit (see `size`).
    pub payload: Bytes,
    /// The payload's size as received.
    pub size: usize,
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
    /// Camera pipelines: frames, not samples.
    pub camera: Option<CameraSpec>,
}

/// What a camera pipeline needs beyond the common spec.
#[derive(Debug)]
pub struct CameraSpec {
    pub frame: camera::FrameFormat,
    pub input: camera::ImageInput,
    pub detection: Option<camera::DetectionSpec>,
    pub max_pixels: u64,
    pub snapshot: Option<TopicTemplate>,
}

impl PipelineSpec {
    /// Checks a pipeline against its loaded model and fixes the window.
    pub fn new(
        config: &Config,
        p: &PipelineConfig,
        model: Arc<Model>,
    ) -> Result<PipelineSpec, String> {
        if p.kind == PipelineKind::Camera {
            return Self::camera(config, p, model);
        }
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
            payload: p.payload(),
            channels,
            size,
            stride,
            max_payload: config.limits.max_payload_bytes,
            max_sources: config.limits.max_sources,
            model,
            camera: None,
        })
    }

    fn camera(
        config: &Config,
        p: &PipelineConfig,
        model: Arc<Model>,
    ) -> Result<PipelineSpec, String> {
        let input = camera::ImageInput::new(&model)?;
        let mut detection = camera::DetectionSpec::new(&model)?;
        if let Some(d) = &mut detection {
            d.score_threshold = p.score_threshold.unwrap_or(d.score_threshold);
            d.iou_threshold = p.iou_threshold.unwrap_or(d.iou_threshold);
            d.max_detections = p.max_detections.unwrap_or(d.max_detections);
            d.classes = p.classes.clone().unwrap_or_default();
        } else if p.snapshot.is_some() || p.classes.is_some() {
            return Err(format!(
                "snapshot and classes need a detection model; {} is not one (output.kind)",
                model.name
            ));
        }
        // Checks the manifest's preprocessing against the image channels.
        Preprocessor::new(&model, input.channels)?;
        let frame = match p.payload() {
            PayloadFormat::Rgb8 => camera::FrameFormat::Rgb8 {
                width: p.width.unwrap_or(0),
                height: p.height.unwrap_or(0),
            },
            PayloadFormat::Gray8 => camera::FrameFormat::Gray8 {
                width: p.width.unwrap_or(0),
                height: p.height.unwrap_or(0),
            },
            _ => camera::FrameFormat::Encoded,
        };
        let filters = p
            .topics
            .iter()
            .map(|t| TopicFilter::parse(t))
            .collect::<Result<Vec<_>, _>>()?;
        let template =
            |t: &str| TopicTemplate::new(t, &config.device_id(), &p.name, &config.prefix());
        Ok(PipelineSpec {
            name: p.name.clone(),
            results: template(&p.results_template()),
            errors_topic: format!("{}/errors", config.prefix()),
            filters,
            qos: crate::mqtt::qos(p.qos),
            payload: p.payload(),
            channels: input.channels,
            size: 1,
            stride: 1,
            max_payload: config.limits.max_image_bytes,
            max_sources: config.limits.max_sources,
            model,
            camera: Some(CameraSpec {
                frame,
                input,
                detection,
                max_pixels: config.limits.max_image_pixels,
                snapshot: p.snapshot.as_deref().map(template),
            }),
        })
    }

    fn captures<'t>(&self, topic: &'t str) -> Vec<&'t str> {
        self.filters
            .iter()
            .find_map(|f| f.captures(topic))
            .unwrap_or_default()
    }
}

/// A camera frame decoded and preprocessed, on its way to inference.
struct Prepared {
    picked: Instant,
    prepared: Instant,
    /// Kept only when a snapshot is drawn.
    frame: Option<camera::Frame>,
    placement: camera::Placement,
    tensor: Tensor,
    msg: Ingested,
}

/// The router's handle on a running pipeline.
pub struct PipelineHandle {
    pub spec: Arc<PipelineSpec>,
    pub stats: Arc<PipelineStats>,
    queue: Queue,
    budget: Arc<Budget>,
}

enum Queue {
    /// Sensor pipelines: a bounded FIFO per worker.
    Fifo(Vec<flume::Sender<Ingested>>),
    /// Camera pipelines: one slot per camera, the latest frame wins.
    Latest(Arc<Slots>),
}

/// One waiting frame per source topic; a newer frame replaces an
/// unprocessed one. Sources are served in the order they became ready, so
/// a fast camera cannot starve a slow one.
pub struct Slots {
    state: std::sync::Mutex<SlotState>,
    ready: std::sync::Condvar,
}

#[derive(Default)]
struct SlotState {
    frames: HashMap<String, Ingested>,
    order: std::collections::VecDeque<String>,
    closed: bool,
}

impl Slots {
    fn new() -> Slots {
        Slots {
            state: Default::default(),
            ready: Default::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Puts a frame in its source's slot; returns the frame it replaced.
    fn put(&self, msg: Ingested, max_sources: usize) -> Result<Option<Ingested>, Ingested> {
        let mut st = self.lock();
        if !st.frames.contains_key(&msg.topic) && st.frames.len() >= max_sources {
            return Err(msg);
        }
        let topic = msg.topic.clone();
        let old = st.frames.insert(topic.clone(), msg);
        if old.is_none() {
            st.order.push_back(topic);
        }
        drop(st);
        self.ready.notify_one();
        Ok(old)
    }

    /// The next waiting frame; `None` once closed and empty.
    fn take(&self) -> Option<Ingested> {
        let mut st = self.lock();
        loop {
            if let Some(topic) = st.order.pop_front() {
                return st.frames.remove(&topic);
            }
            if st.closed {
                return None;
            }
            st = self.ready.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }
}

impl Drop for PipelineHandle {
    fn drop(&mut self) {
        if let Queue::Latest(slots) = &self.queue {
            slots.close();
        }
    }
}

impl PipelineHandle {
    pub fn matches(&self, topic: &str) -> bool {
        self.spec.filters.iter().any(|f| f.matches(topic))
    }

    /// Hands a message to the worker that owns its source, never waiting: a
    /// full queue, or input queues holding their share of the memory
    /// budget, drop the message and count it.
    pub fn offer(&self, mut msg: Ingested) {
        self.stats.received.inc();
        if msg.size > self.spec.max_payload {
            // Rejected by the worker as too large; its bytes are let go here
            // (they need not fit in the queues' budget to be reported).
            msg.payload = Bytes::new();
        }
        let bytes = msg.payload.len() as u64;
        if !self.budget.try_take(bytes) {
            self.stats.dropped.inc();
            return;
        }
        let senders = match &self.queue {
            Queue::Fifo(s) => s,
            Queue::Latest(slots) => {
                // A camera frame is acknowledged once it is in its camera's
                // slot, not after inference: MQTT acks go out in arrival
                // order, so a frame held for its 10–100 ms of inference would
                // hold back the ack of every message behind it, and once the
                // broker's in-flight window (mosquitto: 20) is full, all
                // input — sensors too — would stall behind the camera. A
                // frame lost to a crash is replaced by the next one anyway.
                msg.ack = None;
                match slots.put(msg, self.spec.max_sources) {
                    Ok(None) => {
                        self.stats.queued.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Some(old)) => {
                        self.budget.give(old.payload.len() as u64);
                        self.stats.replaced.inc();
                    }
                    Err(_) => {
                        self.budget.give(bytes);
                        self.stats.dropped.inc();
                    }
                }
                return;
            }
        };
        let shard = if senders.len() == 1 {
            0
        } else {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            msg.topic.hash(&mut h);
            (h.finish() % senders.len() as u64) as usize
        };
        // Count before sending: the worker may take it off the queue at once.
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        if senders[shard].try_send(msg).is_err() {
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
    let slots = spec.camera.is_some().then(|| Arc::new(Slots::new()));
    for i in 0..workers {
        let next: Box<dyn FnMut() -> Option<Ingested> + Send> = match &slots {
            Some(slots) => {
                let slots = Arc::clone(slots);
                Box::new(move || slots.take())
            }
            None => {
                let (tx, rx) = flume::bounded(per_worker);
                senders.push(tx);
                Box::new(move || rx.recv().ok())
            }
        };
        let mut next = next;
        let session = spec.model.session().map_err(|e| e.to_string())?;
        let budget = Arc::clone(&telemetry.input_budget);
        let pre = Preprocessor::new(&spec.model, spec.channels)?;
        let chw = spec
            .camera
            .as_ref()
            .is_some_and(|c| c.input.layout == crate::model::manifest::Layout::Nchw);
        let mut worker = Worker {
            pre: if chw { pre.channel_first() } else { pre },
            fitter: camera::Fitter::default(),
            seqs: HashMap::new(),
            spec: Arc::clone(&spec),
            session: Some(session),
            sources: HashMap::new(),
            clock: 0,
            outbox: outbox.clone(),
            stats: Arc::clone(&stats),
            model_stats: Arc::clone(&model_stats),
            raw: Vec::with_capacity(spec.size * spec.channels),
            normalised: Vec::with_capacity(spec.size * spec.channels),
            frame_budget: Arc::clone(&telemetry.frame_budget),
        };
        if spec.camera.is_some() {
            // Two threads per camera worker: decoding and preprocessing the
            // next frame overlaps inference of the current one. The hand-off
            // holds one prepared frame; newer frames wait in their slot.
            let (ptx, prx) = flume::bounded::<Prepared>(1);
            let mut decoder = worker.decoder();
            let budget = Arc::clone(&budget);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("decode-{}-{i}", spec.name))
                    .spawn(move || {
                        lower_priority();
                        while let Some(msg) = next() {
                            decoder.stats.queued.fetch_sub(1, Ordering::Relaxed);
                            budget.give(msg.payload.len() as u64);
                            let topic = msg.topic.clone();
                            let prepared =
                                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                    decoder.prepare_frame(msg)
                                }));
                            match prepared {
                                Ok(Some(p)) => {
                                    if ptx.send(p).is_err() {
                                        break;
                                    }
                                }
                                Ok(None) => {}
                                Err(_) => decoder.reject(
                                    &topic,
                                    "internal",
                                    "internal error while decoding this frame (see the log)".into(),
                                ),
                            }
                        }
                    })
                    .map_err(|e| format!("cannot start decode thread: {e}"))?,
            );
            threads.push(
                std::thread::Builder::new()
                    .name(format!("infer-{}-{i}", spec.name))
                    .spawn(move || {
                        while let Ok(p) = prx.recv() {
                            let topic = p.msg.topic.clone();
                            let done =
                                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                    worker.infer_frame(p)
                                }));
                            if done.is_err() {
                                worker.reject(
                                    &topic,
                                    "internal",
                                    "internal error while handling this frame (see the log)".into(),
                                );
                            }
                        }
                    })
                    .map_err(|e| format!("cannot start worker thread: {e}"))?,
            );
            continue;
        }
        let thread = std::thread::Builder::new()
            .name(format!("infer-{}-{i}", spec.name))
            .spawn(move || {
                while let Some(msg) = next() {
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
            queue: match slots {
                Some(s) => Queue::Latest(s),
                None => Queue::Fifo(senders),
            },
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
    /// None on a camera's decode thread, which never runs the model.
    session: Option<Session>,
    pre: Preprocessor,
    fitter: camera::Fitter,
    /// Camera pipelines: result sequence number per source.
    seqs: HashMap<String, u64>,
    sources: HashMap<String, Source>,
    /// Logical clock for least-recently-seen eviction.
    clock: u64,
    outbox: Outbox,
    stats: Arc<PipelineStats>,
    model_stats: Arc<crate::health::ModelStats>,
    raw: Vec<f32>,
    normalised: Vec<f32>,
    /// Bytes one frame's decoding and fitting may take (0: no limit).
    frame_budget: Arc<std::sync::atomic::AtomicU64>,
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

/// Makes the calling thread yield to the others when the CPU is short: a
/// camera's decode thread should not slow the inference it feeds (inside the
/// pipeline UltraFace ran ~0.8 ms slower than alone on the 2-core test
/// machine; that this helps is plausible but within that machine's noise).
/// Best effort: on failure the thread keeps its priority.
fn lower_priority() {
    // On Linux, PRIO_PROCESS with who = 0 sets the calling thread's nice value.
    #[cfg(target_os = "linux")]
    if let Ok(now) = rustix::process::getpriority_process(None) {
        let _ = rustix::process::setpriority_process(None, (now + 5).min(19));
    }
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
        let decoded = if msg.size > self.spec.max_payload {
            Err(InputError::TooLarge {
                size: msg.size,
                max: self.spec.max_payload,
            })
        } else {
            match self.spec.payload {
                PayloadFormat::Json => sensor::decode_json(&msg.payload, self.spec.channels),
                PayloadFormat::F32le => sensor::decode_f32le(&msg.payload, self.spec.channels),
                _ => unreachable!("camera payloads go to prepare_frame"),
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

    /// A worker for a camera's decode thread: the same spec, preprocessing,
    /// outbox and counters, no model session and no sample buffers.
    fn decoder(&self) -> Worker {
        Worker {
            spec: Arc::clone(&self.spec),
            session: None,
            pre: self.pre.clone(),
            fitter: camera::Fitter::default(),
            seqs: HashMap::new(),
            sources: HashMap::new(),
            clock: 0,
            outbox: self.outbox.clone(),
            stats: Arc::clone(&self.stats),
            model_stats: Arc::clone(&self.model_stats),
            raw: Vec::new(),
            normalised: Vec::new(),
            frame_budget: Arc::clone(&self.frame_budget),
        }
    }

    fn session(&mut self) -> &mut Session {
        self.session
            .as_mut()
            .expect("only inference threads run the model")
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
        let out = self.session().run_with_state(tensor, state);
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
        self.publish_result(topic, result_topic, payload);
    }

    /// Queues a result; one the broker would not take (its topic too long
    /// or too deep, or too large) is reported on the errors topic instead.
    fn publish_result(&mut self, source: &str, topic: String, payload: Vec<u8>) {
        let sent = self.outbox.send(Outgoing {
            topic,
            payload,
            qos: self.spec.qos,
            retain: false,
        });
        match sent {
            Ok(()) => self.stats.results.inc(),
            Err(e) => self.reject(source, "unpublishable", format!("result {e}")),
        }
    }

    /// A camera frame, first half (on the decode thread): size check,
    /// decode, fit, preprocess. Bad frames are rejected here.
    fn prepare_frame(&mut self, msg: Ingested) -> Option<Prepared> {
        let picked = Instant::now();
        let spec = Arc::clone(&self.spec);
        let cam = spec.camera.as_ref().expect("camera pipeline");
        if msg.size > spec.max_payload {
            let e = InputError::TooLarge {
                size: msg.size,
                max: spec.max_payload,
            };
            self.reject(&msg.topic, e.kind(), e.to_string());
            return None;
        }
        let limits = camera::FrameLimits {
            max_pixels: cam.max_pixels,
            max_bytes: self.frame_budget.load(Ordering::Relaxed),
            input: Some(&cam.input),
        };
        let frame = match camera::decode(&msg.payload, cam.frame, &limits) {
            Ok(f) => f,
            Err(e) => {
                self.reject(&msg.topic, e.kind(), e.to_string());
                return None;
            }
        };
        self.stats.processed.inc();
        let placement = self.fitter.fit(&frame, &cam.input, &mut self.raw);
        let tensor = self.pre.tensor(&self.raw, &mut self.normalised);
        Some(Prepared {
            picked,
            prepared: Instant::now(),
            frame: cam.snapshot.is_some().then_some(frame),
            placement,
            tensor,
            msg,
        })
    }

    /// A camera frame, second half (on the inference thread): infer,
    /// detect or classify, publish (and the annotated snapshot when
    /// configured). The message (and its ack) is dropped only after.
    fn infer_frame(&mut self, p: Prepared) {
        let Prepared {
            picked,
            prepared: t1_pre,
            frame,
            placement,
            tensor,
            msg,
        } = p;
        let queue = picked - msg.received;
        let spec = Arc::clone(&self.spec);
        let cam = spec.camera.as_ref().expect("camera pipeline");
        let t1 = Instant::now();
        let waited = t1 - t1_pre;
        let output = match &cam.detection {
            Some(d) => self
                .session()
                .run_all(tensor)
                .map_err(|e| e.to_string())
                .and_then(|outs| d.detect(&outs, &cam.input, &placement))
                .map(|detections| Output::Detection { detections }),
            None => self
                .session()
                .run(tensor)
                .map_err(|e| e.to_string())
                .and_then(|out| post::postprocess(&spec.model, out, &[])),
        };
        let t2 = Instant::now();
        let output = match output {
            Ok(o) => o,
            Err(reason) => return self.reject(&msg.topic, "inference", reason),
        };
        if !self.seqs.contains_key(&msg.topic) && self.seqs.len() >= spec.max_sources {
            self.seqs.clear();
        }
        let seq = self.seqs.entry(msg.topic.clone()).or_insert(0);
        let this_seq = *seq;
        *seq += 1;
        let captures = spec.captures(&msg.topic);
        if let (Some(t), Some(frame), Output::Detection { detections }) =
            (&cam.snapshot, &frame, &output)
        {
            // A snapshot the broker would not take is counted and logged.
            let _ = self.outbox.offer(Outgoing {
                topic: t.render(&captures),
                payload: camera::annotate(frame, detections),
                qos: QoS::AtMostOnce,
                retain: false,
            });
        }
        let t3 = Instant::now();
        let message = ResultMessage {
            pipeline: &spec.name,
            source: &msg.topic,
            model: &spec.model.name,
            model_sha256: &spec.model.sha256,
            ts: unix_ms(),
            seq: this_seq,
            latency_ms: LatencyMs {
                // Waiting for the inference thread counts as queueing.
                queue: ms(queue + waited),
                pre: ms(t1_pre - picked),
                infer: ms(t2 - t1),
                post: ms(t3 - t2),
            },
            output: &output,
        };
        let payload = serde_json::to_vec(&message).expect("result serializes");
        self.model_stats
            .inference
            .record((t2 - t1).as_secs_f64() * 1e3);
        self.stats
            .latency
            .record((t3 - picked + queue).as_secs_f64() * 1e3);
        self.publish_result(&msg.topic, spec.results.render(&captures), payload);
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
        let sent = self.outbox.send(Outgoing {
            topic: self.spec.errors_topic.clone(),
            payload,
            qos: QoS::AtLeastOnce,
            retain: false,
        });
        if let Err(e) = sent {
            tracing::warn!(pipeline = %self.spec.name, error = %e, "Cannot report a rejected input");
        }
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
