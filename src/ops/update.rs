//! `model/update`, stage by stage: `verify` (the bundle read, bounded and
//! off the runtime, its signature and contents checked), `stage` (written
//! to the state directory), `load` (beside the running model, checked on
//! its reference cases), `swap` (the record first, then the workers), and
//! `probation` (watched by [`super::probation`]).

use super::bundle::{self, Verified};
use super::probation::Baseline;
use super::untrusted::{read_regular, Refused};
use super::{halt_point, round, store, Ops, Outcome, Record, State};
use crate::config::Config;
use crate::model::Model;
use crate::pipeline::control::{Probation, Serving};
use crate::pipeline::PipelineSpec;
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long reading and verifying a bundle may take (a slow disk, a
/// network mount that hangs): past it the update fails and nothing waits.
pub const VERIFY_DEADLINE: Duration = Duration::from_secs(60);
/// Largest signature file read beside a bundle.
const MAX_SIGNATURE_BYTES: u64 = 64 * 1024;

impl Ops {
    fn canary(&self, percent: u64) -> (bool, u64) {
        use sha2::{Digest, Sha256};
        let h = Sha256::digest(self.device.as_bytes());
        let bucket = u64::from_be_bytes(h[..8].try_into().expect("8 bytes")) % 100;
        (bucket < percent, bucket)
    }

    pub(super) async fn update(
        self: Arc<Self>,
        record: &mut Record,
        args: &Map<String, Value>,
        received: Instant,
    ) -> Outcome {
        let reject = |m: String| (State::Rejected, m);
        let name = record
            .pipeline
            .clone()
            .ok_or_else(|| reject("args.pipeline is required".into()))?;
        let entry = self
            .shared
            .entry(&name)
            .ok_or_else(|| reject(format!("no running pipeline {name:?}")))?;
        let store = self.shared.store.as_ref().ok_or_else(|| reject("no state directory (operations.state_dir or systemd's StateDirectory=): installed models would not survive a restart".into()))?;
        if let Some((op, _)) = self
            .probations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&name)
        {
            return Err(reject(format!("pipeline {name:?} has a model on probation (operation {op}); wait for it or roll it back")));
        }
        let config = self.shared.config();
        if let Some(pct) = args.get("canary_percent") {
            let pct = pct
                .as_u64()
                .filter(|p| *p <= 100)
                .ok_or_else(|| reject("args.canary_percent must be 0 to 100".into()))?;
            let (chosen, bucket) = self.canary(pct);
            record.figures.insert("canary_bucket".into(), bucket.into());
            if !chosen {
                record.figures.insert("applied".into(), false.into());
                record.reason = Some(format!(
                    "not in the canary: this device's bucket {bucket} is not under {pct} %"
                ));
                return Ok(State::Successful);
            }
        }
        let probation_s = match args.get("probation_s") {
            None => config.operations.probation.duration_s,
            Some(v) => v
                .as_u64()
                .ok_or_else(|| reject("args.probation_s must be a number of seconds".into()))?,
        };

        // Verify before anything is parsed or written, off the runtime.
        self.record(record, State::Executing, Some("verify")).await;
        halt_point("verify").await;
        let verified = {
            let (args, config) = (args.clone(), Arc::clone(&config));
            let work = tokio::task::spawn_blocking(move || verify_request(&args, &config));
            match tokio::time::timeout(VERIFY_DEADLINE, work).await {
                Ok(joined) => joined.expect("verifying does not panic").map_err(reject)?,
                Err(_) => {
                    return Err((
                        State::Failed,
                        format!(
                            "reading and verifying the bundle took over {} s; given up",
                            VERIFY_DEADLINE.as_secs()
                        ),
                    ))
                }
            }
        };
        let meta = verified.meta.clone();
        record.figures.insert("bundle".into(), json!({"name": meta.name, "version": meta.version, "seq": meta.seq, "sha256": meta.sha256, "size": meta.size, "signed_by": verified.key_id, "id": verified.id}));
        let active = store.load_active();
        if let Some(highest) = active.highest_seq.get(&meta.name) {
            if meta.seq < *highest {
                return Err(reject(format!("bundle {} seq {} is older than seq {highest} already installed (a replay or a downgrade; publish a new seq to go back)", meta.name, meta.seq)));
            }
        }

        self.record(record, State::Executing, Some("stage")).await;
        halt_point("stage").await;
        let reference = verified.reference.clone();
        let installed = {
            let verified = Arc::new(verified);
            let shared = Arc::clone(&self.shared);
            tokio::task::spawn_blocking(move || {
                shared.store.as_ref().expect("checked").stage(&verified)
            })
            .await
            .expect("staging does not panic")
            .map_err(|e| {
                (
                    State::Failed,
                    format!("cannot write the bundle to the state directory: {e}"),
                )
            })?
        };

        self.record(record, State::Executing, Some("load")).await;
        halt_point("load").await;
        let loaded = self
            .load_installed(record, &entry, &installed, reference)
            .await;
        let spec = match loaded {
            Ok(spec) => spec,
            Err(e) => {
                // Not served and nothing to roll back to: the directory goes,
                // so that it poisons nothing later.
                store.discard(&installed, &store.load_active());
                return Err((State::Failed, e));
            }
        };
        self.swap(
            record,
            &name,
            &entry,
            installed,
            spec,
            probation_s,
            received,
        )
        .await
    }

    /// Loads the staged model beside the running one and checks it: what
    /// loaded must be the bundle's model, and answer its reference.
    async fn load_installed(
        &self,
        record: &mut Record,
        entry: &super::Entry,
        installed: &store::Installed,
        reference: Option<bundle::Reference>,
    ) -> Result<PipelineSpec, String> {
        let store = self.shared.store.as_ref().expect("checked by update");
        let path = store.manifest_path(installed);
        let loaded_at = Instant::now();
        let (config, pcfg) = (self.shared.config(), entry.config.clone());
        let (spec, checked) = tokio::task::spawn_blocking(move || {
            load_spec(&config, &pcfg, &path, reference.as_ref())
        })
        .await
        .expect("model loading does not panic: model panics are caught")?;
        if spec.model.sha256 != installed.sha256 {
            return Err(format!(
                "the model loaded ({}) is not the bundle's ({})",
                spec.model.sha256, installed.sha256
            ));
        }
        record.figures.insert(
            "load_and_check_ms".into(),
            json!(round(loaded_at.elapsed().as_secs_f64() * 1000.0)),
        );
        record
            .figures
            .insert("runs_on".into(), spec.model.runs_on().into());
        *self
            .shared
            .telemetry
            .model(&spec.model.name)
            .placement
            .lock()
            .expect("telemetry lock") = Some(spec.model.placement.clone());
        if let Some(c) = checked {
            record.figures.insert(
                "reference".into(),
                serde_json::to_value(c).expect("checked"),
            );
        }
        Ok(spec)
    }

    /// The commit point: the record names the new model (and the one to
    /// return to) before it serves; then the probation starts.
    #[allow(clippy::too_many_arguments)]
    async fn swap(
        self: Arc<Self>,
        record: &mut Record,
        name: &str,
        entry: &super::Entry,
        installed: store::Installed,
        spec: PipelineSpec,
        probation_s: u64,
        received: Instant,
    ) -> Outcome {
        let store = self.shared.store.as_ref().expect("checked by update");
        let config = self.shared.config();
        self.record(record, State::Executing, Some("swap")).await;
        halt_point("swap").await;
        let old = entry.control.serving();
        let mut active = store.load_active();
        let a = active.pipelines.entry(name.to_owned()).or_default();
        let before = a.current.clone();
        a.previous = Some(store::Previous { model: before });
        a.current = Some(installed.clone());
        a.probation = (probation_s > 0).then(|| record.id.clone());
        let highest = active
            .highest_seq
            .entry(installed.name.clone())
            .or_insert(0);
        *highest = (*highest).max(installed.seq);
        store.save_active(&active).map_err(|e| {
            (
                State::Failed,
                format!("cannot write the active model record: {e}"),
            )
        })?;
        let baseline = Baseline::of(&old);
        let probation = (probation_s > 0).then(|| {
            Arc::new(Probation::new(
                Arc::clone(&old.spec),
                config.operations.probation.shadow_percent,
            ))
        });
        entry.control.swap(
            Serving {
                stats: self.shared.telemetry.model(&spec.model.name),
                spec: Arc::new(spec),
            },
            probation.clone(),
        );
        self.replaced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned(), Arc::clone(&old.spec));
        let to_serving = received.elapsed().as_secs_f64() * 1000.0;
        record
            .figures
            .insert("request_to_serving_ms".into(), json!(round(to_serving)));
        tracing::info!(pipeline = %name, model = %installed.name, version = %installed.version, seq = installed.seq, request_to_serving_ms = round(to_serving), "Model swapped in");
        store.prune(&active);
        let Some(probation) = probation else {
            record.figures.insert("applied".into(), true.into());
            return Ok(State::Successful);
        };
        self.record(record, State::Executing, Some("probation"))
            .await;
        self.start_probation(record, name, probation, baseline, probation_s);
        Ok(State::Executing)
    }
}

/// The bundle's bytes and signature from the request, verified: inline
/// (base64) or a path on the device (its signature beside it as
/// `PATH.minisig` unless given). Blocking: run off the async runtime.
fn verify_request(args: &Map<String, Value>, config: &Config) -> Result<Verified, String> {
    let max = config.operations.max_bundle_mb << 20;
    let (bytes, signature) = read_bundle(args, max)?;
    let keys = trusted_keys(config)?;
    bundle::verify(&bytes, &signature, &keys, bundle::now_s()).map_err(|e| e.to_string())
}

fn read_bundle(args: &Map<String, Value>, max: u64) -> Result<(Vec<u8>, String), String> {
    use base64::Engine;
    let signature = match args.get("signature") {
        None => None,
        Some(Value::String(s)) if s.len() as u64 <= MAX_SIGNATURE_BYTES => Some(s.clone()),
        Some(_) => return Err("args.signature must be the .minisig file's text".into()),
    };
    match (args.get("bundle"), args.get("path")) {
        (Some(Value::String(b64)), None) => {
            if b64.len() as u64 > max / 3 * 4 + 4 {
                return Err(format!(
                    "bundle is over operations.max_bundle_mb ({} MiB)",
                    max >> 20
                ));
            }
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|e| format!("args.bundle is not base64: {e}"))?;
            let signature = signature
                .ok_or("args.signature (the .minisig text) is required with an inline bundle")?;
            Ok((bytes, signature))
        }
        (None, Some(Value::String(path))) => {
            let path = PathBuf::from(path);
            let bytes = read_named(&path, max, "args.path")?;
            let signature = match signature {
                Some(s) => s,
                None => {
                    let sig = PathBuf::from(format!("{}.minisig", path.display()));
                    let bytes =
                        read_named(&sig, MAX_SIGNATURE_BYTES, "its signature (PATH.minisig)")?;
                    String::from_utf8(bytes)
                        .map_err(|_| "its signature (PATH.minisig) is not text".to_string())?
                }
            };
            Ok((bytes, signature))
        }
        _ => Err("give args.bundle (base64) with args.signature, or args.path".into()),
    }
}

/// Reads a file a request named. The reply says only what the caller must
/// fix (the rule), not whether something exists at a path outside the
/// state directory; the log has the cause.
fn read_named(path: &Path, max: u64, what: &str) -> Result<Vec<u8>, String> {
    read_regular(path, max).map_err(|e| {
        tracing::warn!(path = %path.display(), error = %e, "model/update: cannot read {what}");
        match e {
            Refused::TooLarge(_) => format!(
                "{what} is over operations.max_bundle_mb ({} MiB) or the signature limit",
                max >> 20
            ),
            _ => format!(
                "{what}: no readable bundle file there (it must be a regular file, not a link, FIFO or device; the daemon's log has the cause)"
            ),
        }
    })
}

pub fn trusted_keys(config: &Config) -> Result<Vec<minisign::PublicKey>, String> {
    let ops = &config.operations;
    let mut keys = Vec::new();
    for k in &ops.trusted_keys {
        keys.push(bundle::public_key(k)?);
    }
    for f in &ops.trusted_key_files {
        let path = config.base_dir.join(f);
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        keys.push(bundle::public_key(&text).map_err(|e| format!("{}: {e}", path.display()))?);
    }
    Ok(keys)
}

/// Loads a model for a pipeline, checks it against the pipeline and its
/// reference (or warms it on one input). Blocking: run off the runtime.
pub fn load_spec(
    config: &Config,
    pipeline: &crate::config::Pipeline,
    path: &Path,
    reference: Option<&bundle::Reference>,
) -> Result<(PipelineSpec, Option<super::reference::Checked>), String> {
    let model = Arc::new(
        Model::load_with(path, &crate::pipeline::engine_options(config, pipeline))
            .map_err(|e| format!("the new model does not load: {e}"))?,
    );
    let spec = PipelineSpec::new(config, pipeline, Arc::clone(&model))
        .map_err(|e| format!("the new model does not fit pipeline {}: {e}", pipeline.name))?;
    let checked = match reference {
        Some(r) => Some(
            super::reference::check(&model, r)
                .map_err(|e| format!("reference check failed: {e}"))?,
        ),
        None => {
            // Warm: the first inference allocates the plan's buffers.
            super::reference::outputs(&model, &[vec![0.0; model.input().len()]])
                .map_err(|e| format!("the new model fails on a zero input: {e}"))?;
            None
        }
    };
    // The parser and optimiser ran again (a reload or a model update); their
    // pages go back too.
    crate::pageout::after_loading();
    Ok((spec, checked))
}
