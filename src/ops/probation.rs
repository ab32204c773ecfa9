//! A new model's probation and rollbacks: the new model is held to the
//! replaced one's record (error rate, p99, shadowed answers) and rolled
//! back by itself on a breach; `model/rollback` does the same on request.

use super::start::describe;
use super::{round, Ops, Outcome, Record, State};
use crate::pipeline::control::{Probation, Serving};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The replaced model's record at the swap: what the new one is held to.
pub(super) struct Baseline {
    error_rate: Option<f64>,
    p99_ms: Option<f64>,
}

impl Baseline {
    pub(super) fn of(old: &Serving) -> Baseline {
        let served = old.stats.served.get();
        let failures = old.stats.failures.get();
        let total = served + failures;
        Baseline {
            error_rate: (total >= 20).then(|| failures as f64 / total as f64),
            p99_ms: (served >= 20).then(|| old.stats.inference.percentiles().p99),
        }
    }
}

impl Ops {
    /// Watches the probation on its own task, so that rollbacks on request
    /// and other operations are not held behind it.
    pub(super) fn start_probation(
        self: Arc<Self>,
        record: &Record,
        pipeline: &str,
        probation: Arc<Probation>,
        baseline: Baseline,
        duration_s: u64,
    ) {
        let token = self.stop.child_token();
        self.probations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(pipeline.to_owned(), (record.id.clone(), token.clone()));
        let mut watched = record.clone();
        let pipeline = pipeline.to_owned();
        tokio::spawn(async move {
            self.watch(
                &mut watched,
                pipeline,
                probation,
                baseline,
                duration_s,
                token,
            )
            .await;
        });
    }

    /// Watches a probation to its verdict: kept, or rolled back with the
    /// figures that breached.
    async fn watch(
        &self,
        record: &mut Record,
        pipeline: String,
        p: Arc<Probation>,
        baseline: Baseline,
        duration_s: u64,
        token: CancellationToken,
    ) {
        let limits = self.shared.config().operations.probation.clone();
        let end = Instant::now() + Duration::from_secs(duration_s);
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let verdict = loop {
            tokio::select! {
                _ = token.cancelled() => return,
                _ = tick.tick() => {}
            }
            let over = Instant::now() >= end;
            if let Some(breach) = breach(&p, &baseline, &limits, over) {
                break Some(breach);
            }
            if over {
                break None;
            }
        };
        let _turn = self.busy.lock().await;
        if token.is_cancelled() {
            return;
        }
        self.probations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&pipeline);
        record
            .figures
            .insert("probation".into(), figures(&p, Some(&baseline)));
        match verdict {
            None => {
                if let Some(store) = &self.shared.store {
                    let mut active = store.load_active();
                    if let Some(a) = active.pipelines.get_mut(&pipeline) {
                        a.probation = None;
                    }
                    if let Err(e) = store.save_active(&active) {
                        tracing::error!(error = %e, "Cannot write the active model record");
                    }
                }
                if let Some(entry) = self.shared.entry(&pipeline) {
                    entry.control.end_probation();
                }
                tracing::info!(pipeline = %pipeline, op = %record.id, "Probation passed; the new model is kept");
                record.figures.insert("applied".into(), true.into());
                self.record(record, State::Successful, Some("done")).await;
            }
            Some(reason) => {
                tracing::warn!(pipeline = %pipeline, op = %record.id, reason = %reason, "Probation failed; rolling back");
                match self.roll_back(&pipeline).await {
                    Ok(to) => {
                        record.reason = Some(format!("{reason}; rolled back to {to}"));
                        self.record(record, State::RolledBack, Some("rolled_back"))
                            .await;
                    }
                    Err(e) => {
                        record.reason = Some(format!("{reason}; the rollback failed: {e}"));
                        self.record(record, State::Failed, Some("rollback")).await;
                    }
                }
            }
        }
    }

    pub(super) async fn rollback_request(&self, record: &mut Record) -> Outcome {
        let name = record
            .pipeline
            .clone()
            .ok_or((State::Rejected, "args.pipeline is required".to_string()))?;
        if self.shared.entry(&name).is_none() {
            return Err((State::Rejected, format!("no running pipeline {name:?}")));
        }
        self.record(record, State::Executing, Some("rollback"))
            .await;
        let watched = self
            .probations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&name);
        let to = self
            .roll_back(&name)
            .await
            .map_err(|e| (State::Failed, e))?;
        record.figures.insert("serving".into(), to.clone().into());
        if let Some((op, token)) = watched {
            token.cancel();
            if let Some(mut r) = self.stored_record(&op) {
                r.reason = Some(format!(
                    "rolled back on request (operation {}) to {to}",
                    record.id
                ));
                self.record(&mut r, State::RolledBack, Some("rolled_back"))
                    .await;
            }
        }
        Ok(State::Successful)
    }

    /// Puts the pipeline's previous model back: the record first, then the
    /// swap. Returns what serves now.
    async fn roll_back(&self, pipeline: &str) -> Result<String, String> {
        let store = self.shared.store.as_ref().ok_or("no state directory")?;
        let entry = self
            .shared
            .entry(pipeline)
            .ok_or_else(|| format!("no running pipeline {pipeline:?}"))?;
        let mut active = store.load_active();
        let a = active.pipelines.get(pipeline).cloned().unwrap_or_default();
        let target = a
            .previous
            .clone()
            .ok_or_else(|| format!("pipeline {pipeline:?} has no previous model to roll back to"))?
            .model;
        let config = self.shared.config();
        let path = match &target {
            Some(i) => store.manifest_path(i),
            None => config.model_path(&entry.config),
        };
        let cached = self
            .replaced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(pipeline);
        let spec = match cached.filter(|s| {
            target.as_ref().map_or(
                s.model.path == path || s.model.path == config.model_path(&entry.config),
                |i| i.sha256 == s.model.sha256,
            )
        }) {
            Some(spec) => spec,
            None => {
                let (config, pcfg) = (Arc::clone(&config), entry.config.clone());
                let p2 = path.clone();
                Arc::new(
                    tokio::task::spawn_blocking(move || {
                        super::load_spec(&config, &pcfg, &p2, None)
                    })
                    .await
                    .expect("model loading does not panic")?
                    .0,
                )
            }
        };
        let e = active.pipelines.entry(pipeline.to_owned()).or_default();
        e.current = target.clone();
        e.previous = None;
        e.probation = None;
        store
            .save_active(&active)
            .map_err(|e| format!("cannot write the active model record: {e}"))?;
        entry.control.end_probation();
        entry.control.swap(
            Serving {
                stats: self.shared.telemetry.model(&spec.model.name),
                spec,
            },
            None,
        );
        store.prune(&active);
        let to = target.as_ref().map_or(
            format!("the configured model ({})", path.display()),
            describe,
        );
        tracing::info!(pipeline, serving = %to, "Rolled back");
        Ok(to)
    }
}

pub(super) fn figures(p: &Probation, baseline: Option<&Baseline>) -> Value {
    let n = p.inferences.get();
    let errors = p.errors.get();
    let compared = p.compared.get();
    let differed = p.differed.get();
    let mut v = json!({
        "elapsed_s": round(p.started.elapsed().as_secs_f64()),
        "inferences": n,
        "errors": errors,
        "error_rate": if n > 0 { round(errors as f64 / n as f64) } else { 0.0 },
        "p99_ms": p.p99_ms().map(round),
        "shadow_compared": compared,
        "shadow_differed": differed,
        "disagreement": if compared > 0 { round(differed as f64 / compared as f64) } else { 0.0 },
    });
    if let Some(b) = baseline {
        v["previous_error_rate"] = json!(b.error_rate.map(round));
        v["previous_p99_ms"] = json!(b.p99_ms.map(round));
    }
    v
}

/// A breach of the probation's thresholds, once enough was seen.
fn breach(
    p: &Probation,
    b: &Baseline,
    limits: &crate::config::ProbationConfig,
    over: bool,
) -> Option<String> {
    let n = p.inferences.get();
    if n < limits.min_inferences.max(1) {
        return None;
    }
    let rate = p.errors.get() as f64 / n as f64;
    let before = b.error_rate.unwrap_or(0.0);
    if rate - before > limits.max_error_rate_increase {
        return Some(format!(
            "error rate {:.3} over {n} inferences against {:.3} before (allowed +{})",
            rate, before, limits.max_error_rate_increase
        ));
    }
    if let (Some(new), Some(old)) = (p.p99_ms(), b.p99_ms) {
        // Latency is judged on enough samples only: a p99 of a handful is
        // its maximum, and one scheduling hiccup is not a slower model.
        let enough = p.inferences.get() - p.errors.get() >= 100 || over;
        if enough && old > 0.0 && new > old * limits.max_p99_ratio {
            return Some(format!(
                "inference p99 {new:.3} ms against {old:.3} ms before (allowed {}x)",
                limits.max_p99_ratio
            ));
        }
    }
    let compared = p.compared.get();
    if compared >= 5 {
        let share = p.differed.get() as f64 / compared as f64;
        if share > limits.max_disagreement {
            return Some(format!(
                "answers differ from the previous model's on {} of {compared} shadowed inputs (allowed {})",
                p.differed.get(),
                limits.max_disagreement
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::pipeline::PipelineSpec;

    #[test]
    fn a_probation_breaches_on_errors_but_not_before_enough_inferences() {
        let spec_less = Baseline {
            error_rate: Some(0.0),
            p99_ms: Some(1.0),
        };
        let limits = crate::config::ProbationConfig::default();
        let model = Arc::new(
            crate::model::Model::load(
                &std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/motion.toml"),
            )
            .unwrap(),
        );
        let config = Config::parse(
            "[[pipeline]]\nname = \"m\"\nkind = \"sensor\"\ntopics = [\"s/#\"]\nmodel = \"models/motion.toml\"\n",
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")),
        )
        .unwrap();
        let spec = Arc::new(PipelineSpec::new(&config, &config.pipelines[0], model).unwrap());
        let p = Probation::new(spec, 0);
        for _ in 0..limits.min_inferences - 1 {
            p.record(None);
        }
        assert_eq!(breach(&p, &spec_less, &limits, false), None);
        p.record(None);
        let why = breach(&p, &spec_less, &limits, false).unwrap();
        assert!(why.contains("error rate 1.000"), "{why}");
    }
}
