//! A sensor pipeline's worker: decodes each input's samples, pushes them
//! into its source's window, and runs the model on every window completed.

use super::{decode_f32le, decode_json, InputError, SensorWindow};
use crate::flow::{unix_ms, Input, Rejection};
use crate::health::ModelStats;
use crate::model::Session;
use crate::pipeline::control::{Follower, Shadow};
use crate::pipeline::post;
use crate::pipeline::pre::Preprocessor;
use crate::pipeline::result::{engine_rejection, ms, Emitter, LatencyMs, ResultFields};
use crate::pipeline::spec::{Kind, PipelineSpec, SensorPayload, SensorSpec};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tract_onnx::prelude::Tensor;

struct Source {
    window: SensorWindow,
    seq: u64,
    last_seen: u64,
    /// Recurrent state of streaming models (empty for the others).
    state: Vec<Tensor>,
}

pub struct SensorWorker {
    spec: Arc<PipelineSpec>,
    sensor: SensorSpec,
    session: Session,
    pre: Preprocessor,
    sources: HashMap<String, Source>,
    /// Logical clock for least-recently-seen eviction.
    clock: u64,
    emit: Emitter,
    model_stats: Arc<ModelStats>,
    raw: Vec<f32>,
    normalised: Vec<f32>,
    follower: Option<Follower>,
    /// The previous model during a probation, and its preprocessing.
    shadow: Shadow,
    shadow_pre: Option<(usize, Preprocessor)>,
}

impl SensorWorker {
    pub fn new(
        spec: Arc<PipelineSpec>,
        sensor: SensorSpec,
        emit: Emitter,
        model_stats: Arc<ModelStats>,
    ) -> Result<SensorWorker, String> {
        Ok(SensorWorker {
            follower: None,
            shadow: Shadow::default(),
            shadow_pre: None,
            session: spec.model.session().map_err(|e| e.to_string())?,
            pre: Preprocessor::sensor(&spec.model)?,
            sources: HashMap::new(),
            clock: 0,
            emit,
            model_stats,
            raw: Vec::with_capacity(sensor.size * sensor.channels),
            normalised: Vec::with_capacity(sensor.size * sensor.channels),
            spec,
            sensor,
        })
    }

    /// Follows a pipeline control: models swapped in are served from the
    /// next input on.
    pub fn follow(mut self, follower: Follower) -> SensorWorker {
        self.follower = Some(follower);
        self
    }

    /// Takes a model swapped in since the last input. Windows are kept when
    /// it takes the same window; recurrent state starts over.
    fn take_swap(&mut self) {
        let Some(serving) = self.follower.as_mut().and_then(|f| f.changed()) else {
            return;
        };
        let model = &serving.spec.model;
        let Kind::Sensor(sensor) = &serving.spec.kind else {
            return tracing::error!("A camera spec swapped into a sensor pipeline; ignored");
        };
        let ready = model
            .session()
            .map_err(|e| e.to_string())
            .and_then(|s| Ok((s, Preprocessor::sensor(model)?)));
        let (session, pre) = match ready {
            Ok(r) => r,
            Err(e) => {
                return tracing::error!(error = %e, "Swapped-in model cannot serve; keeping the previous one")
            }
        };
        if (sensor.size, sensor.stride, sensor.channels)
            != (self.sensor.size, self.sensor.stride, self.sensor.channels)
        {
            self.sources.clear();
        } else {
            for source in self.sources.values_mut() {
                source.state = model.initial_state.clone();
            }
        }
        self.session = session;
        self.pre = pre;
        self.sensor = *sensor;
        self.model_stats = serving.stats;
        self.spec = serving.spec;
    }

    /// Handles one input; a panic inside is caught here, reported as
    /// `internal`, and the source's window reset.
    pub fn handle_caught(&mut self, msg: Input) {
        self.take_swap();
        let source = msg.source.clone();
        // A bug in one message's handling must not end the worker: its
        // queue would then drop everything, silently.
        let handled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.handle(msg)));
        if handled.is_err() {
            self.sources.remove(&source);
            self.emit.reject(
                &source,
                Rejection::Internal("internal error while handling this input (see the log); the source's window was reset".into()),
            );
        }
    }

    pub fn handle(&mut self, msg: Input) {
        let picked = Instant::now();
        let queue = picked - msg.received;
        let channels = self.sensor.channels;
        let decoded = if msg.size > self.spec.max_payload {
            Err(InputError::TooLarge {
                size: msg.size,
                max: self.spec.max_payload,
            })
        } else {
            match self.sensor.payload {
                SensorPayload::Json => decode_json(&msg.payload, channels),
                SensorPayload::F32le => decode_f32le(&msg.payload, channels),
            }
        };
        let samples = match decoded {
            Ok(s) => s,
            Err(e) => return self.emit.reject(&msg.source, e.into()),
        };
        self.emit.stats.processed.inc();
        let ts = samples.ts.unwrap_or_else(unix_ms);

        self.clock += 1;
        // The source's state leaves the map while its samples are pushed, so
        // every window a batch completes is inferred in order.
        let mut source = match self.sources.remove(&msg.source) {
            Some(s) => s,
            None => {
                if self.sources.len() >= self.spec.max_sources {
                    self.evict_idlest();
                }
                Source {
                    window: SensorWindow::new(self.sensor.size, self.sensor.stride, channels),
                    seq: 0,
                    last_seen: 0,
                    state: self.spec.model.initial_state.clone(),
                }
            }
        };
        source.last_seen = self.clock;
        let decode = picked.elapsed();
        let mut first = true;
        for sample in samples.values.chunks_exact(channels) {
            if source.window.push(sample) {
                source.window.copy_into(&mut self.raw);
                self.infer(
                    &msg.source,
                    ts,
                    source.seq,
                    if first { Some((queue, decode)) } else { None },
                    &mut source.state,
                );
                source.seq += 1;
                first = false;
            }
        }
        self.sources.insert(msg.source, source);
    }

    /// Runs the model on `self.raw`. `waited` is (queue time, decode time) for
    /// the first window of a message; later windows of a batch carry none.
    fn infer(
        &mut self,
        source: &str,
        ts: u64,
        seq: u64,
        waited: Option<(Duration, Duration)>,
        state: &mut [Tensor],
    ) {
        let (queue, decode) = waited.unwrap_or_default();
        let t0 = Instant::now();
        let tensor = self.pre.tensor(&self.raw, &mut self.normalised);
        let probation = self.follower.as_ref().and_then(|f| f.probation());
        let t1 = Instant::now();
        let out = self.session.run_with_state(tensor, state);
        let t2 = Instant::now();
        let output = match out {
            Ok(out) => post::postprocess(&self.spec.model, out, &self.normalised)
                .map_err(Rejection::Inference),
            Err(e) => Err(engine_rejection(e)),
        };
        if let Some(p) = probation {
            let shadow = p.record(output.is_ok().then(|| ms(t2 - t1)));
            // Streaming models are compared on errors and latency only: the
            // old model's state would have to be carried beside the new one.
            if let (true, true, Ok(new)) = (shadow, state.is_empty(), &output) {
                let old = self.shadow_answer(&p);
                p.compare(new, old.as_ref().ok_or(()));
            }
        }
        let output = match output {
            Ok(o) => o,
            Err(rejection) => {
                self.model_stats.failures.inc();
                return self.emit.reject(source, rejection);
            }
        };
        let t3 = Instant::now();
        let fields = ResultFields {
            pipeline: &self.spec.name,
            source,
            model: &self.spec.model,
            ts,
            seq,
            latency: LatencyMs {
                queue: ms(queue),
                pre: ms(t1 - t0 + decode),
                infer: ms(t2 - t1),
                post: ms(t3 - t2),
            },
            output: &output,
        };
        self.emit.timed_result(&fields, &self.model_stats);
    }

    /// The previous model's answer on the current window (`self.raw`).
    fn shadow_answer(
        &mut self,
        p: &Arc<crate::pipeline::control::Probation>,
    ) -> Option<post::Output> {
        let key = Arc::as_ptr(p) as usize;
        if self.shadow_pre.as_ref().map(|(k, _)| *k) != Some(key) {
            self.shadow_pre = Preprocessor::sensor(&p.previous.model)
                .ok()
                .map(|pre| (key, pre));
        }
        let (_, pre) = self.shadow_pre.as_mut()?;
        let mut normalised = Vec::new();
        let tensor = pre.tensor(&self.raw, &mut normalised);
        let out = self.shadow.session(p)?.run(tensor).ok()?;
        post::postprocess(&p.previous.model, out, &normalised).ok()
    }

    fn evict_idlest(&mut self) {
        if let Some(topic) = self
            .sources
            .iter()
            .min_by_key(|(_, s)| s.last_seen)
            .map(|(t, _)| t.clone())
        {
            self.sources.remove(&topic);
            self.emit.stats.evicted.inc();
        }
    }
}
