//! Running pipelines: worker threads, sharding of sources over workers,
//! latest-frame slots for cameras, and the input queues' memory budget.

use super::camera::{lower_priority, Decoder, Inferrer, Prepared};
use super::control::{Control, Serving};
use super::result::Emitter;
use super::sensor::worker::SensorWorker;
use super::spec::{Kind, PipelineSpec};
use crate::flow::{Inlet, Input, Sink};
use crate::health::{Budget, PipelineStats, Telemetry};
use bytes::Bytes;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

/// The transport's handle on a running pipeline.
pub struct PipelineHandle {
    /// Limits fixed by the config (the model may be swapped under them).
    max_payload: usize,
    max_sources: usize,
    pub control: Arc<Control>,
    pub stats: Arc<PipelineStats>,
    queue: Queue,
    budget: Arc<Budget>,
}

enum Queue {
    /// Sensor pipelines: a bounded FIFO per worker.
    Fifo(Vec<flume::Sender<Input>>),
    /// Camera pipelines: one slot per camera, the latest frame wins.
    Latest(Arc<Slots>),
}

/// One waiting frame per source; a newer frame replaces an unprocessed
/// one. Sources are served in the order they became ready, so a fast camera
/// cannot starve a slow one.
pub struct Slots {
    state: std::sync::Mutex<SlotState>,
    ready: std::sync::Condvar,
}

#[derive(Default)]
struct SlotState {
    frames: HashMap<String, Input>,
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
    fn put(&self, msg: Input, max_sources: usize) -> Result<Option<Input>, Input> {
        let mut st = self.lock();
        if !st.frames.contains_key(&msg.source) && st.frames.len() >= max_sources {
            return Err(msg);
        }
        let source = msg.source.clone();
        let old = st.frames.insert(source.clone(), msg);
        if old.is_none() {
            st.order.push_back(source);
        }
        drop(st);
        self.ready.notify_one();
        Ok(old)
    }

    /// The next waiting frame; `None` once closed and empty.
    fn take(&self) -> Option<Input> {
        let mut st = self.lock();
        loop {
            if let Some(source) = st.order.pop_front() {
                return st.frames.remove(&source);
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

impl Inlet for PipelineHandle {
    /// Hands an input to the worker that owns its source, never waiting: a
    /// full queue, or input queues holding their share of the memory
    /// budget, drop the input and count it.
    fn offer(&self, mut msg: Input) {
        self.stats.received.inc();
        if self.stats.disabled.load(Ordering::Relaxed) {
            // Acknowledged (the handle drops here) and counted.
            self.stats.ignored.inc();
            return;
        }
        if msg.size > self.max_payload {
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
                match slots.put(msg, self.max_sources) {
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
            msg.source.hash(&mut h);
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

/// Starts a pipeline's worker threads, which emit to `sink`. They end when
/// the handle (the only sender) is dropped and their queues are drained.
pub fn start(
    spec: PipelineSpec,
    queue: usize,
    workers: usize,
    sink: Arc<dyn Sink>,
    telemetry: &Telemetry,
) -> Result<(PipelineHandle, Vec<JoinHandle<()>>), String> {
    let spec = Arc::new(spec);
    let stats = telemetry.pipeline(&spec.name);
    let model_stats = telemetry.model(&spec.model.name);
    let control = Arc::new(Control::new(Serving {
        spec: Arc::clone(&spec),
        stats: Arc::clone(&model_stats),
    }));
    let emit = Emitter {
        pipeline: spec.name.clone(),
        sink,
        stats: Arc::clone(&stats),
    };
    let budget = Arc::clone(&telemetry.input_budget);
    let mut threads = Vec::with_capacity(workers);
    // Every event on a worker thread carries the pipeline and model (as
    // journal fields PIPELINE= and MODEL=).
    let span = tracing::info_span!("pipeline", pipeline = %spec.name, model = %spec.model.name);
    let thread = |name: String, body: Box<dyn FnOnce() + Send>| {
        let span = span.clone();
        // Names are validated (no control characters); a NUL here would
        // make `spawn` panic rather than fail, so none gets through.
        let name: String = name.chars().filter(|c| !c.is_control()).collect();
        std::thread::Builder::new()
            .name(name)
            .spawn(move || span.in_scope(body))
            .map_err(|e| format!("cannot start worker thread: {e}"))
    };
    // Takes an input off a queue: counted out, its bytes given back.
    let taken = {
        let (stats, budget) = (Arc::clone(&stats), Arc::clone(&budget));
        move |msg: &Input| {
            stats.queued.fetch_sub(1, Ordering::Relaxed);
            budget.give(msg.payload.len() as u64);
        }
    };
    let queue = match &spec.kind {
        Kind::Sensor(sensor) => {
            let per_worker = queue.div_ceil(workers);
            let mut senders = Vec::with_capacity(workers);
            for i in 0..workers {
                let (tx, rx) = flume::bounded::<Input>(per_worker);
                senders.push(tx);
                let mut worker = SensorWorker::new(
                    Arc::clone(&spec),
                    *sensor,
                    emit.clone(),
                    Arc::clone(&model_stats),
                )?
                .follow(control.follower());
                let taken = taken.clone();
                threads.push(thread(
                    format!("infer-{}-{i}", spec.name),
                    Box::new(move || {
                        while let Ok(msg) = rx.recv() {
                            taken(&msg);
                            worker.handle_caught(msg);
                        }
                    }),
                )?);
            }
            Queue::Fifo(senders)
        }
        Kind::Camera(_) => {
            let slots = Arc::new(Slots::new());
            for i in 0..workers {
                // Decoding and preprocessing the next frame overlaps
                // inference of the current one. The hand-off holds one
                // prepared frame; newer frames wait in their slot.
                let (ptx, prx) = flume::bounded::<Prepared>(1);
                let mut decoder = Decoder::new(
                    Arc::clone(&spec),
                    emit.clone(),
                    Arc::clone(&telemetry.frame_budget),
                )?
                .follow(control.follower());
                let mut inferrer =
                    Inferrer::new(Arc::clone(&spec), emit.clone(), Arc::clone(&model_stats))?
                        .follow(control.follower());
                let (slots, taken) = (Arc::clone(&slots), taken.clone());
                threads.push(thread(
                    format!("decode-{}-{i}", spec.name),
                    Box::new(move || {
                        lower_priority();
                        while let Some(msg) = slots.take() {
                            taken(&msg);
                            if let Some(p) = decoder.prepare_caught(msg) {
                                if ptx.send(p).is_err() {
                                    break;
                                }
                            }
                        }
                    }),
                )?);
                threads.push(thread(
                    format!("infer-{}-{i}", spec.name),
                    Box::new(move || {
                        while let Ok(p) = prx.recv() {
                            inferrer.infer_caught(p);
                        }
                    }),
                )?);
            }
            Queue::Latest(slots)
        }
    };
    Ok((
        PipelineHandle {
            max_payload: spec.max_payload,
            max_sources: spec.max_sources,
            control,
            stats,
            queue,
            budget,
        },
        threads,
    ))
}
