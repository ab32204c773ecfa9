//! The result message (PRODUCT.md schema), built in one place for the
//! workers and the one-shot `infer` command, and the [`Emitter`] through
//! which workers hand their verdicts to the sink and count them.

use super::post::Output;
use crate::flow::{Rejection, Sink, Verdict};
use crate::health::{ModelStats, PipelineStats};
use crate::model::{Model, ModelError, ModelErrorKind};
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;

/// Where a result's time went, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct LatencyMs {
    pub queue: f64,
    pub pre: f64,
    pub infer: f64,
    pub post: f64,
}

/// A duration in milliseconds, to the microsecond.
pub fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

#[derive(Serialize)]
struct ResultMessage<'a> {
    pipeline: &'a str,
    source: &'a str,
    model: &'a str,
    model_sha256: &'a str,
    ts: u64,
    seq: u64,
    latency_ms: LatencyMs,
    output: &'a Output,
}

/// The fields of one result.
pub struct ResultFields<'a> {
    pub pipeline: &'a str,
    pub source: &'a str,
    pub model: &'a Model,
    pub ts: u64,
    pub seq: u64,
    pub latency: LatencyMs,
    pub output: &'a Output,
}

impl ResultFields<'_> {
    pub fn json(&self) -> Vec<u8> {
        serde_json::to_vec(&self.message()).expect("result serializes")
    }

    pub fn value(&self) -> serde_json::Value {
        serde_json::to_value(self.message()).expect("result serializes")
    }

    fn message(&self) -> ResultMessage<'_> {
        ResultMessage {
            pipeline: self.pipeline,
            source: self.source,
            model: &self.model.name,
            model_sha256: &self.model.sha256,
            ts: self.ts,
            seq: self.seq,
            latency_ms: self.latency,
            output: self.output,
        }
    }
}

/// What a failed model run is on the errors topic: `internal` when the
/// engine panicked (a bug, caught), `inference` otherwise.
pub fn engine_rejection(e: ModelError) -> Rejection {
    match e.kind {
        ModelErrorKind::Panic { .. } => Rejection::Internal(e.to_string()),
        _ => Rejection::Inference(e.to_string()),
    }
}

/// Hands a pipeline's verdicts to its sink and counts them.
#[derive(Clone)]
pub struct Emitter {
    pub pipeline: String,
    pub sink: Arc<dyn Sink>,
    pub stats: Arc<PipelineStats>,
}

impl Emitter {
    /// A result; one the sink will not take is reported as a rejection.
    pub fn result(&self, source: &str, json: Vec<u8>) {
        match self.sink.emit(Verdict::Result { source, json }) {
            Ok(()) => self.stats.results.inc(),
            Err(reason) => self.reject(source, Rejection::Undeliverable(reason)),
        }
    }

    /// A result, its timings recorded first: the inference per model, the
    /// whole latency (queue + pre + infer + post) per pipeline.
    pub fn timed_result(&self, fields: &ResultFields, model_stats: &ModelStats) {
        let l = fields.latency;
        model_stats.inference.record(l.infer);
        model_stats.served.inc();
        self.stats
            .latency
            .record(l.queue + l.pre + l.infer + l.post);
        self.result(fields.source, fields.json());
    }

    pub fn reject(&self, source: &str, rejection: Rejection) {
        self.stats.errors.inc();
        tracing::debug!(pipeline = %self.pipeline, source, kind = rejection.kind(), reason = %rejection, "Rejected input");
        if let Err(e) = self.sink.emit(Verdict::Rejected { source, rejection }) {
            tracing::warn!(pipeline = %self.pipeline, error = %e, "Cannot report a rejected input");
        }
    }

    pub fn snapshot(&self, source: &str, jpeg: Vec<u8>) {
        // A snapshot the sink will not take is counted and logged there.
        let _ = self.sink.emit(Verdict::Snapshot { source, jpeg });
    }
}
