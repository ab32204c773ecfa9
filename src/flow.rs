//! The neutral seam between transports and pipelines.
//!
//! A transport (MQTT today) turns what it receives into [`Input`]s and
//! offers them to an [`Inlet`]; a pipeline turns inputs into [`Verdict`]s
//! and emits them to its [`Sink`]. Pipelines know nothing of brokers, topic
//! templates or QoS; transports know nothing of windows, frames or models.
//! The daemon's wiring (`daemon/`) joins the two.

use bytes::Bytes;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Holds an input unacknowledged: the transport acknowledges it once every
/// holder has dropped its handle (every pipeline it went to handled it and
/// emitted what it produced).
#[derive(Clone)]
pub struct AckHandle(#[allow(dead_code)] Arc<dyn Send + Sync>);

impl AckHandle {
    /// `released` is dropped when the last handle goes: the transport's
    /// signal (a oneshot sender, for MQTT).
    pub fn new(released: impl Send + Sync + 'static) -> AckHandle {
        AckHandle(Arc::new(released))
    }
}

impl std::fmt::Debug for AckHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AckHandle")
    }
}

/// One message from a transport, on its way to a pipeline.
#[derive(Debug)]
pub struct Input {
    /// Where it came from (the MQTT topic): the unit of windows and camera
    /// slots, and what results are reported against.
    pub source: String,
    /// Empty when the payload was over the pipeline's limit (see `size`).
    pub payload: Bytes,
    /// The payload's size as received.
    pub size: usize,
    pub received: Instant,
    pub ack: Option<AckHandle>,
}

impl Input {
    pub fn new(source: impl Into<String>, payload: Bytes) -> Input {
        Input {
            source: source.into(),
            size: payload.len(),
            payload,
            received: Instant::now(),
            ack: None,
        }
    }
}

/// Takes inputs without waiting (a pipeline's queue).
pub trait Inlet: Send + Sync {
    fn offer(&self, input: Input);
}

/// What a pipeline says about an input.
#[derive(Debug)]
pub enum Verdict<'a> {
    /// A result, as JSON (the results schema).
    Result { source: &'a str, json: Vec<u8> },
    /// The input, or what was made of it, was refused.
    Rejected {
        source: &'a str,
        rejection: Rejection,
    },
    /// A camera frame with its detections drawn, as JPEG.
    Snapshot { source: &'a str, jpeg: Vec<u8> },
}

/// Why an input was refused. Each becomes one entry on the errors topic,
/// whose `kind` is [`Rejection::kind`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejection {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error("{0}")]
    Inference(String),
    /// A bug caught in edgeinfer itself.
    #[error("{0}")]
    Internal(String),
    /// The sink could not take the result (for MQTT: the broker would not).
    #[error("result cannot be published: {0}")]
    Undeliverable(String),
}

impl Rejection {
    /// Stable machine-readable class, the `kind` field on the errors topic.
    pub fn kind(&self) -> &'static str {
        match self {
            Rejection::Input(e) => e.kind(),
            Rejection::Inference(_) => "inference",
            Rejection::Internal(_) => "internal",
            Rejection::Undeliverable(_) => "unpublishable",
        }
    }
}

/// Where a pipeline's verdicts go. `Err` from [`Sink::emit`] for a result
/// means it was not taken (the reason says why); the pipeline reports that
/// as [`Rejection::Undeliverable`].
pub trait Sink: Send + Sync {
    fn emit(&self, verdict: Verdict) -> Result<(), String>;
}

/// Why an input's payload was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InputError {
    #[error("payload of {size} bytes is over the limit of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("empty payload")]
    Empty,
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    #[error("JSON payload needs \"values\" (one sample) or \"samples\" (a batch)")]
    NoSamples,
    #[error("sample {sample} has {got} values, the model takes {expected} channels")]
    WrongChannelCount {
        sample: usize,
        expected: usize,
        got: usize,
    },
    #[error("sample {sample}, channel {channel} is not a finite number")]
    NonFinite { sample: usize, channel: usize },
    #[error("f32le payload of {len} bytes is not a whole number of {channels}-channel samples")]
    BadLength { len: usize, channels: usize },
    #[error("image: {0}")]
    Image(String),
    #[error("image of {width}x{height} pixels is over the limit of {max} pixels (not decoded)")]
    TooManyPixels { width: u32, height: u32, max: u64 },
    #[error("decoding and fitting this {what} would take about {} MiB, over the {} MiB a frame may use (limits.memory_mb; not decoded)", .need.div_ceil(1 << 20), .max >> 20)]
    TooCostly { what: String, need: u64, max: u64 },
    #[error("\"ts\" must be milliseconds since the Unix epoch, a number from 0 up (or left out); got {0}")]
    BadTs(String),
}

impl InputError {
    /// Stable machine-readable class, the `kind` field on the errors topic.
    pub fn kind(&self) -> &'static str {
        match self {
            InputError::TooLarge { .. } => "too_large",
            InputError::Empty => "empty",
            InputError::MalformedJson(_) => "malformed_json",
            InputError::NoSamples => "no_samples",
            InputError::WrongChannelCount { .. } => "wrong_channel_count",
            InputError::NonFinite { .. } => "non_finite",
            InputError::BadLength { .. } => "bad_length",
            InputError::Image(_) => "image",
            InputError::TooManyPixels { .. } => "too_many_pixels",
            InputError::TooCostly { .. } => "too_large",
            InputError::BadTs(_) => "bad_ts",
        }
    }
}

/// A sink that keeps what it is given, for tests and one-shot commands.
#[derive(Default)]
pub struct Collected {
    pub results: std::sync::Mutex<Vec<(String, serde_json::Value)>>,
    pub rejections: std::sync::Mutex<Vec<(String, Rejection)>>,
    pub snapshots: std::sync::Mutex<Vec<(String, Vec<u8>)>>,
}

impl Sink for Collected {
    fn emit(&self, verdict: Verdict) -> Result<(), String> {
        match verdict {
            Verdict::Result { source, json } => {
                let v = serde_json::from_slice(&json).map_err(|e| e.to_string())?;
                lock(&self.results).push((source.to_owned(), v));
            }
            Verdict::Rejected { source, rejection } => {
                lock(&self.rejections).push((source.to_owned(), rejection))
            }
            Verdict::Snapshot { source, jpeg } => {
                lock(&self.snapshots).push((source.to_owned(), jpeg))
            }
        }
        Ok(())
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
