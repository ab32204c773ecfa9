//! A running pipeline's control: the model its workers serve (swapped in
//! place by `model/update`, `model/rollback` and a reload) and the
//! probation record of a model just swapped in.
//!
//! A swap never stops the workers. Each worker checks the generation before
//! every input and, when it moved, rebuilds its session from the new spec:
//! every input is handled exactly once, by the model current when its
//! worker took it off the queue. Windows (and camera sequence numbers) are
//! kept when the new model takes the same input; recurrent state starts
//! over (it belongs to the old model's weights).

use super::post::Output;
use super::spec::PipelineSpec;
use crate::health::{percentile, Counter, ModelStats};
use crate::model::{Model, Session};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub struct Control {
    generation: AtomicU64,
    current: Mutex<Serving>,
    probation: Mutex<Option<Arc<Probation>>>,
    /// Whether `probation` is set: every inference asks, and without a
    /// probation (nearly always) it must not take a lock to learn there is none.
    on_probation: AtomicBool,
}

/// The spec in service and its model's latency record.
#[derive(Clone)]
pub struct Serving {
    pub spec: Arc<PipelineSpec>,
    pub stats: Arc<ModelStats>,
}

impl Control {
    pub fn new(serving: Serving) -> Control {
        Control {
            generation: AtomicU64::new(0),
            current: Mutex::new(serving),
            probation: Mutex::new(None),
            on_probation: AtomicBool::new(false),
        }
    }

    pub fn serving(&self) -> Serving {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn spec(&self) -> Arc<PipelineSpec> {
        self.serving().spec
    }

    /// Puts `serving` in service: each worker takes it before its next
    /// input. `probation` (the old model in shadow, counters) watches it.
    pub fn swap(&self, serving: Serving, probation: Option<Arc<Probation>>) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        *current = serving;
        self.on_probation
            .store(probation.is_some(), Ordering::Release);
        *self.probation.lock().unwrap_or_else(|p| p.into_inner()) = probation;
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Ends the probation (the new model is kept, or was rolled back).
    pub fn end_probation(&self) -> Option<Arc<Probation>> {
        self.on_probation.store(false, Ordering::Release);
        self.probation
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    pub fn probation(&self) -> Option<Arc<Probation>> {
        if !self.on_probation.load(Ordering::Acquire) {
            return None;
        }
        self.probation
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn follower(self: &Arc<Self>) -> Follower {
        Follower {
            control: Arc::clone(self),
            seen: self.generation.load(Ordering::Acquire),
        }
    }
}

/// A worker's view of its control: tells it when to rebuild.
pub struct Follower {
    control: Arc<Control>,
    seen: u64,
}

impl Follower {
    /// What is in service now, once per swap.
    pub fn changed(&mut self) -> Option<Serving> {
        let now = self.control.generation.load(Ordering::Acquire);
        if now == self.seen {
            return None;
        }
        self.seen = now;
        Some(self.control.serving())
    }

    pub fn probation(&self) -> Option<Arc<Probation>> {
        self.control.probation()
    }
}

/// Whether two models can swap without resetting windows and slots.
pub fn same_input(a: &Model, b: &Model) -> bool {
    a.input().shape == b.input().shape && a.input_type == b.input_type
}

/// What a new model did while on probation, next to the model it replaced.
pub struct Probation {
    /// What was serving before (its model runs in shadow).
    pub previous: Arc<PipelineSpec>,
    /// Every how many inferences one also runs on `previous` (0: never).
    pub shadow_every: u64,
    pub started: std::time::Instant,
    pub inferences: Counter,
    pub errors: Counter,
    pub compared: Counter,
    pub differed: Counter,
    latencies: Mutex<Vec<f32>>,
    ticket: AtomicU64,
}

/// Latency samples kept for the probation's p99 (the first ones: enough
/// for a p99 and bounded).
const LATENCY_SAMPLES: usize = 8192;

impl Probation {
    pub fn new(previous: Arc<PipelineSpec>, shadow_percent: u8) -> Probation {
        Probation {
            previous,
            shadow_every: match shadow_percent {
                0 => 0,
                p => (100 / p as u64).max(1),
            },
            started: std::time::Instant::now(),
            inferences: Counter::default(),
            errors: Counter::default(),
            compared: Counter::default(),
            differed: Counter::default(),
            latencies: Mutex::new(Vec::new()),
            ticket: AtomicU64::new(0),
        }
    }

    /// Counts one inference of the new model; true when this one is to be
    /// shadowed as well.
    pub fn record(&self, infer_ms: Option<f64>) -> bool {
        self.inferences.inc();
        match infer_ms {
            Some(ms) => {
                let mut l = self.latencies.lock().unwrap_or_else(|p| p.into_inner());
                if l.len() < LATENCY_SAMPLES {
                    l.push(ms as f32);
                }
            }
            None => self.errors.inc(),
        }
        let n = self.ticket.fetch_add(1, Ordering::Relaxed);
        self.shadow_every > 0 && n.is_multiple_of(self.shadow_every)
    }

    pub fn compare(&self, new: &Output, old: Result<&Output, ()>) {
        self.compared.inc();
        if old.map_or(true, |old| differ(new, old)) {
            self.differed.inc();
        }
    }

    pub fn p99_ms(&self) -> Option<f64> {
        let mut l = self
            .latencies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if l.is_empty() {
            return None;
        }
        l.sort_by(f32::total_cmp);
        Some(percentile(&l, 0.99) as f64)
    }
}

/// A worker's shadow session on the previous model of a probation.
#[derive(Default)]
pub struct Shadow {
    of: Option<(usize, Session)>,
}

impl Shadow {
    /// The session on `p.previous`, made on first use per probation.
    pub fn session(&mut self, p: &Arc<Probation>) -> Option<&mut Session> {
        let key = Arc::as_ptr(p) as usize;
        if self.of.as_ref().map(|(k, _)| *k) != Some(key) {
            self.of = p.previous.model.session().ok().map(|s| (key, s));
        }
        self.of.as_mut().map(|(_, s)| s)
    }
}

/// Two answers differ when a user would see a different result: another
/// top label, another number of detections or top detection class, an
/// anomaly verdict flipped, or raw values apart by more than 5 % of the
/// new values' range.
pub fn differ(a: &Output, b: &Output) -> bool {
    match (a, b) {
        (Output::Classification { top: x }, Output::Classification { top: y }) => {
            x.first().map(|s| &s.label) != y.first().map(|s| &s.label)
        }
        (Output::Anomaly { anomaly: x, .. }, Output::Anomaly { anomaly: y, .. }) => x != y,
        (Output::Detection { detections: x }, Output::Detection { detections: y }) => {
            x.len() != y.len() || x.first().map(|d| &d.label) != y.first().map(|d| &d.label)
        }
        (Output::Raw { values: x }, Output::Raw { values: y }) => {
            if x.len() != y.len() {
                return true;
            }
            let (lo, hi) = x
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), v| {
                    (l.min(*v), h.max(*v))
                });
            let tol = ((hi - lo) * 0.05).max(1e-6);
            x.iter().zip(y).any(|(p, q)| (p - q).abs() > tol)
        }
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::post::Scored;

    fn top(label: &str) -> Output {
        Output::Classification {
            top: vec![Scored {
                label: label.into(),
                score: 0.9,
            }],
        }
    }

    #[test]
    fn answers_differ_by_what_a_user_sees() {
        assert!(!differ(&top("walking"), &top("walking")));
        assert!(differ(&top("walking"), &top("running")));
        let raw = |v: Vec<f32>| Output::Raw { values: v };
        assert!(!differ(&raw(vec![0.0, 1.0]), &raw(vec![0.01, 1.0])));
        assert!(differ(&raw(vec![0.0, 1.0]), &raw(vec![0.2, 1.0])));
        assert!(differ(&raw(vec![0.0]), &top("x")));
    }
}
