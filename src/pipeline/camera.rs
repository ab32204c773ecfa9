//! A camera pipeline's worker is two threads: the [`Decoder`] decodes,
//! fits and preprocesses the next frame while the [`Inferrer`] runs the
//! model on the current one (one prepared frame between them).

use super::frame::{annotate, decode, Fitter, Frame, FrameLimits, Placement};
use crate::flow::{unix_ms, Input, InputError, Rejection};
use crate::health::ModelStats;
use crate::model::manifest::Layout;
use crate::model::Session;
use crate::pipeline::control::{same_input, Follower, Shadow};
use crate::pipeline::post::{self, Output};
use crate::pipeline::pre::Preprocessor;
use crate::pipeline::result::{engine_rejection, ms, Emitter, LatencyMs, ResultFields};
use crate::pipeline::spec::{CameraSpec, Kind, PipelineSpec};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tract_onnx::prelude::Tensor;

/// A camera frame decoded and preprocessed, on its way to inference.
pub struct Prepared {
    picked: Instant,
    prepared: Instant,
    /// Kept only when a snapshot is drawn.
    frame: Option<Frame>,
    placement: Placement,
    tensor: Tensor,
    msg: Input,
    /// The spec it was prepared for.
    spec: Arc<PipelineSpec>,
}

impl Prepared {
    pub fn source(&self) -> &str {
        &self.msg.source
    }
}

fn camera(spec: &PipelineSpec) -> &CameraSpec {
    match &spec.kind {
        Kind::Camera(c) => c,
        Kind::Sensor(_) => panic!("a camera worker for sensor pipeline {}", spec.name),
    }
}

/// The first half: size check, decode, fit, preprocess. Bad frames are
/// rejected here.
pub struct Decoder {
    spec: Arc<PipelineSpec>,
    pre: Preprocessor,
    fitter: Fitter,
    raw: Vec<f32>,
    normalised: Vec<f32>,
    /// Bytes one frame's decoding and fitting may take (0: no limit).
    frame_budget: Arc<AtomicU64>,
    emit: Emitter,
    follower: Option<Follower>,
}

fn preprocessor(spec: &PipelineSpec) -> Result<Preprocessor, String> {
    let cam = camera(spec);
    let pre = Preprocessor::new(&spec.model, cam.input.channels)?;
    Ok(if cam.input.layout == Layout::Nchw {
        pre.channel_first()
    } else {
        pre
    })
}

impl Decoder {
    pub fn new(
        spec: Arc<PipelineSpec>,
        emit: Emitter,
        frame_budget: Arc<AtomicU64>,
    ) -> Result<Decoder, String> {
        Ok(Decoder {
            pre: preprocessor(&spec)?,
            follower: None,
            fitter: Fitter::default(),
            raw: Vec::new(),
            normalised: Vec::new(),
            frame_budget,
            emit,
            spec,
        })
    }

    pub fn follow(mut self, follower: Follower) -> Decoder {
        self.follower = Some(follower);
        self
    }

    /// [`Decoder::prepare`] with a panic inside caught and reported.
    pub fn prepare_caught(&mut self, msg: Input) -> Option<Prepared> {
        if let Some(serving) = self.follower.as_mut().and_then(|f| f.changed()) {
            match preprocessor(&serving.spec) {
                Ok(pre) => {
                    self.pre = pre;
                    self.spec = serving.spec;
                }
                Err(e) => {
                    tracing::error!(error = %e, "Swapped-in model cannot be fed; keeping the previous one")
                }
            }
        }
        let source = msg.source.clone();
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.prepare(msg))).unwrap_or_else(
            |_| {
                self.emit.reject(
                    &source,
                    Rejection::Internal(
                        "internal error while decoding this frame (see the log)".into(),
                    ),
                );
                None
            },
        )
    }

    pub fn prepare(&mut self, msg: Input) -> Option<Prepared> {
        let picked = Instant::now();
        let spec = Arc::clone(&self.spec);
        let cam = camera(&spec);
        if msg.size > spec.max_payload {
            let e = InputError::TooLarge {
                size: msg.size,
                max: spec.max_payload,
            };
            self.emit.reject(&msg.source, e.into());
            return None;
        }
        let limits = FrameLimits {
            max_pixels: cam.max_pixels,
            max_bytes: self.frame_budget.load(Ordering::Relaxed),
            input: Some(&cam.input),
        };
        let frame = match decode(&msg.payload, cam.frame, &limits) {
            Ok(f) => f,
            Err(e) => {
                self.emit.reject(&msg.source, e.into());
                return None;
            }
        };
        self.emit.stats.processed.inc();
        let placement = self.fitter.fit(&frame, &cam.input, &mut self.raw);
        let tensor = self.pre.tensor(&self.raw, &mut self.normalised);
        Some(Prepared {
            picked,
            prepared: Instant::now(),
            frame: cam.snapshot.then_some(frame),
            placement,
            tensor,
            msg,
            spec,
        })
    }
}

/// The second half: infer, detect or classify, emit the result (and the
/// annotated snapshot when configured). The input (and its ack) is dropped
/// only after.
pub struct Inferrer {
    spec: Arc<PipelineSpec>,
    session: Session,
    /// Result sequence number per source.
    seqs: HashMap<String, u64>,
    emit: Emitter,
    model_stats: Arc<ModelStats>,
    follower: Option<Follower>,
    shadow: Shadow,
}

impl Inferrer {
    pub fn new(
        spec: Arc<PipelineSpec>,
        emit: Emitter,
        model_stats: Arc<ModelStats>,
    ) -> Result<Inferrer, String> {
        Ok(Inferrer {
            session: spec.model.session().map_err(|e| e.to_string())?,
            seqs: HashMap::new(),
            emit,
            model_stats,
            spec,
            follower: None,
            shadow: Shadow::default(),
        })
    }

    pub fn follow(mut self, follower: Follower) -> Inferrer {
        self.follower = Some(follower);
        self
    }

    fn take_swap(&mut self) {
        let Some(serving) = self.follower.as_mut().and_then(|f| f.changed()) else {
            return;
        };
        match serving.spec.model.session() {
            Ok(session) => {
                self.session = session;
                self.spec = serving.spec;
                self.model_stats = serving.stats;
            }
            Err(e) => {
                tracing::error!(error = %e, "Swapped-in model cannot serve; keeping the previous one")
            }
        }
    }

    /// Runs `tensor` on `spec`'s detection or classification.
    fn answer(
        session: &mut Session,
        spec: &PipelineSpec,
        tensor: Tensor,
        placement: &Placement,
    ) -> Result<Output, Rejection> {
        let cam = camera(spec);
        match &cam.detection {
            Some(d) => session
                .run_all(tensor)
                .map_err(engine_rejection)
                .and_then(|outs| {
                    d.detect(&outs, &cam.input, placement)
                        .map_err(Rejection::Inference)
                })
                .map(|detections| Output::Detection { detections }),
            None => session
                .run(tensor)
                .map_err(engine_rejection)
                .and_then(|out| {
                    post::postprocess(&spec.model, out, &[]).map_err(Rejection::Inference)
                }),
        }
    }

    /// [`Inferrer::infer`] with a panic inside caught and reported.
    pub fn infer_caught(&mut self, p: Prepared) {
        let source = p.source().to_owned();
        let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.infer(p)));
        if done.is_err() {
            self.emit.reject(
                &source,
                Rejection::Internal(
                    "internal error while handling this frame (see the log)".into(),
                ),
            );
        }
    }

    pub fn infer(&mut self, p: Prepared) {
        let Prepared {
            picked,
            prepared: t1_pre,
            frame,
            placement,
            tensor,
            msg,
            spec: prepared_for,
        } = p;
        self.take_swap();
        let queue = picked - msg.received;
        let spec = Arc::clone(&self.spec);
        if !Arc::ptr_eq(&prepared_for, &spec) && !same_input(&prepared_for.model, &spec.model) {
            // Prepared for a model with another input, just swapped out:
            // the camera's next frame is served instead.
            self.emit.stats.replaced.inc();
            return;
        }
        let probation = self.follower.as_ref().and_then(|f| f.probation());
        let shadow_input = probation
            .as_ref()
            .filter(|p| p.shadow_every > 0)
            .map(|_| tensor.clone());
        let t1 = Instant::now();
        let waited = t1 - t1_pre;
        let output = Self::answer(&mut self.session, &spec, tensor, &placement);
        let t2 = Instant::now();
        if let Some(p) = probation {
            let shadow = p.record(output.is_ok().then(|| ms(t2 - t1)));
            if let (true, Some(input), Ok(new)) = (shadow, shadow_input, &output) {
                let old = self
                    .shadow
                    .session(&p)
                    .and_then(|s| Self::answer(s, &p.previous, input, &placement).ok());
                p.compare(new, old.as_ref().ok_or(()));
            }
        }
        let output = match output {
            Ok(o) => o,
            Err(rejection) => {
                self.model_stats.failures.inc();
                return self.emit.reject(&msg.source, rejection);
            }
        };
        if !self.seqs.contains_key(&msg.source) && self.seqs.len() >= spec.max_sources {
            self.seqs.clear();
        }
        let seq = self.seqs.entry(msg.source.clone()).or_insert(0);
        let this_seq = *seq;
        *seq += 1;
        if let (Some(frame), Output::Detection { detections }) = (&frame, &output) {
            self.emit.snapshot(&msg.source, annotate(frame, detections));
        }
        let t3 = Instant::now();
        let fields = ResultFields {
            pipeline: &spec.name,
            source: &msg.source,
            model: &spec.model,
            ts: unix_ms(),
            seq: this_seq,
            latency: LatencyMs {
                // Waiting for the inference thread counts as queueing.
                queue: ms(queue + waited),
                pre: ms(t1_pre - picked),
                infer: ms(t2 - t1),
                post: ms(t3 - t2),
            },
            output: &output,
        };
        self.emit.timed_result(&fields, &self.model_stats);
    }
}

/// Makes the calling thread yield to the others when the CPU is short: a
/// camera's decode thread should not slow the inference it feeds (inside the
/// pipeline UltraFace ran ~0.8 ms slower than alone on the 2-core test
/// machine; that this helps is plausible but within that machine's noise).
/// Best effort: on failure the thread keeps its priority.
pub fn lower_priority() {
    // On Linux, PRIO_PROCESS with who = 0 sets the calling thread's nice value.
    #[cfg(target_os = "linux")]
    if let Ok(now) = rustix::process::getpriority_process(None) {
        let _ = rustix::process::setpriority_process(None, (now + 5).min(19));
    }
}
