//! Reloads (SIGHUP, the `reload` operation): in place when only pipelines'
//! model settings or model files changed, else a restart of the parts.

use super::*;

/// Applies reloads (SIGHUP, the `reload` operation) one at a time.
pub(super) async fn reload_loop(
    shared: Arc<crate::ops::Shared>,
    hup: Option<flume::Receiver<()>>,
    requests: flume::Receiver<crate::ops::ReloadRequest>,
    restart: flume::Sender<Config>,
    stop: CancellationToken,
) {
    loop {
        let reply = tokio::select! {
            _ = stop.cancelled() => return,
            Ok(()) = async { hup.as_ref().expect("guarded").recv_async().await }, if hup.is_some() => None,
            Ok(r) = requests.recv_async() => Some(r.reply),
        };
        systemd::notify_reloading();
        let outcome = reload(&shared).await;
        let answer = match outcome {
            Ok(Reloaded::InPlace(report)) => {
                tracing::info!(report = %report, "Configuration reloaded in place");
                systemd::notify_ready();
                Ok(report)
            }
            Ok(Reloaded::Restart(config, why)) => {
                if let Some(r) = reply {
                    let _ = r.send(Ok(serde_json::json!({"full_restart": why})));
                }
                tracing::info!(reason = %why, "Reload needs a restart of the daemon's parts");
                let _ = restart.send_async(*config).await;
                return;
            }
            Err(problems) => {
                for p in &problems {
                    tracing::error!(problem = %p, "Reload rejected; keeping the running configuration");
                }
                systemd::notify_ready();
                Err(problems.join("; "))
            }
        };
        if let Some(r) = reply {
            let _ = r.send(answer);
        }
    }
}

pub(super) enum Reloaded {
    InPlace(serde_json::Value),
    Restart(Box<Config>, String),
}

/// Pipeline keys a reload applies in place (the model and what the model's
/// spec is built from); any other change needs a restart.
pub(super) const IN_PLACE_KEYS: &[&str] = &[
    "model",
    "window",
    "score_threshold",
    "iou_threshold",
    "max_detections",
    "classes",
    "backend",
    "providers",
    "fallback",
    "strict",
    "threads",
];

/// Reads the configuration file again and applies it: pipelines whose
/// settings in [`IN_PLACE_KEYS`] or model files changed get the new spec
/// swapped in (windows kept when the input is the same); the others are
/// not touched; the connection stays. Anything else asks for a restart.
pub(super) async fn reload(shared: &Arc<crate::ops::Shared>) -> Result<Reloaded, Vec<String>> {
    let old = shared.config();
    let new = read_again(&old)?;
    let changed = match plan(shared, &old, &new) {
        Ok(changed) => changed,
        Err(why) => return restart(new, why).await,
    };
    let unchanged: Vec<String> = new
        .pipelines
        .iter()
        .map(|p| p.name.clone())
        .filter(|n| !changed.iter().any(|(p, _, _)| &p.name == n))
        .collect();
    // Load everything first: a failing model keeps the whole old config.
    let mut ready = Vec::new();
    let mut problems = Vec::new();
    for (p, path, entry) in changed {
        let (config, pcfg) = (Arc::new(new.clone()), p.clone());
        let loaded =
            tokio::task::spawn_blocking(move || crate::ops::load_spec(&config, &pcfg, &path, None))
                .await
                .expect("model loading does not panic");
        match loaded {
            Ok((spec, _)) => ready.push((p, spec, entry)),
            Err(e) => problems.push(format!("pipeline[{}].model: {e}", p.name)),
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let restarted = swap_in(shared, ready);
    *shared.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
    Ok(Reloaded::InPlace(
        serde_json::json!({"restarted": restarted, "unchanged": unchanged}),
    ))
}

/// The configuration file read again and checked, or every problem.
fn read_again(old: &Config) -> Result<Config, Vec<String>> {
    let Some(path) = old.source.clone() else {
        return Err(vec!["the configuration was not loaded from a file".into()]);
    };
    let new = Config::load(&path).map_err(|e| {
        e.problems()
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
    })?;
    let problems: Vec<String> = new
        .validate()
        .iter()
        .chain(&check_providers(&new))
        .map(|p| p.to_string())
        .collect();
    if problems.is_empty() {
        Ok(new)
    } else {
        Err(problems)
    }
}

/// A restart for `why`, once every model of the new config loads (`check`,
/// off the async workers): a config that fails keeps the running one.
async fn restart(new: Config, why: String) -> Result<Reloaded, Vec<String>> {
    let checked = tokio::task::spawn_blocking(move || (check(&new), new))
        .await
        .expect("checking a config does not panic");
    match checked {
        (problems, c) if problems.is_empty() => Ok(Reloaded::Restart(Box::new(c), why)),
        (problems, _) => Err(problems.iter().map(|p| p.to_string()).collect()),
    }
}

/// A pipeline to change in place: its new settings, the model it is to
/// serve, and its entry.
type InPlace = (
    crate::config::Pipeline,
    std::path::PathBuf,
    crate::ops::Entry,
);

/// The pipelines a reload changes in place, or why it needs a restart.
fn plan(shared: &crate::ops::Shared, old: &Config, new: &Config) -> Result<Vec<InPlace>, String> {
    let as_value = |c: &Config| {
        let mut v = serde_json::to_value(c).expect("config serializes");
        let pipelines = v.as_object_mut().and_then(|o| o.remove("pipeline"));
        if let Some(o) = v.as_object_mut() {
            o.remove("operations");
        }
        let list = pipelines
            .as_ref()
            .and_then(|v| v.as_array())
            .cloned()
            .unwrap_or_default();
        (v, list)
    };
    let (old_rest, old_pipes) = as_value(old);
    let (new_rest, new_pipes) = as_value(new);
    if old_rest != new_rest {
        let keys: Vec<String> = old_rest
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, v)| new_rest.get(k.as_str()) != Some(v))
            .map(|(k, _)| format!("[{k}]"))
            .collect();
        return Err(format!("{} changed", keys.join(", ")));
    }
    if old_pipes.len() != new_pipes.len() {
        return Err("pipelines were added or removed".into());
    }
    let strip = |v: &serde_json::Value| {
        let mut v = v.clone();
        if let Some(o) = v.as_object_mut() {
            o.retain(|k, _| !IN_PLACE_KEYS.contains(&k.as_str()));
        }
        v
    };
    let mut changed = Vec::new();
    for (i, (a, b)) in old_pipes.iter().zip(&new_pipes).enumerate() {
        let p = &new.pipelines[i];
        if strip(a) != strip(b) {
            return Err(format!(
                "pipeline {:?} changed beyond its model settings",
                p.name
            ));
        }
        let Some(entry) = shared
            .pipelines
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&p.name)
            .cloned()
        else {
            // It failed to start: a restart gives it another chance.
            return Err(format!("pipeline {:?} is not running", p.name));
        };
        let serving = entry.control.spec();
        let installed = shared.store.as_ref().and_then(|s| {
            let a = s.load_active();
            a.pipelines
                .get(&p.name)?
                .current
                .as_ref()
                .map(|i| s.manifest_path(i))
        });
        let path = installed.unwrap_or_else(|| new.model_path(p));
        if a != b || model_changed(&serving.model, &path) {
            changed.push((p.clone(), path, entry));
        }
    }
    Ok(changed)
}

/// Hands each pipeline its new model (probations end); returns their names.
fn swap_in(
    shared: &crate::ops::Shared,
    ready: Vec<(
        crate::config::Pipeline,
        crate::pipeline::PipelineSpec,
        crate::ops::Entry,
    )>,
) -> Vec<String> {
    let mut restarted = Vec::new();
    let mut entries = shared.pipelines.write().unwrap_or_else(|e| e.into_inner());
    for (p, spec, entry) in ready {
        let model = Arc::clone(&spec.model);
        *shared
            .telemetry
            .model(&model.name)
            .placement
            .lock()
            .expect("telemetry lock") = Some(model.placement.clone());
        entry.control.end_probation();
        entry.control.swap(
            crate::pipeline::control::Serving {
                stats: shared.telemetry.model(&model.name),
                spec: Arc::new(spec),
            },
            None,
        );
        restarted.push(p.name.clone());
        if let Some(e) = entries.get_mut(&p.name) {
            e.config = p;
        }
    }
    restarted
}

/// Whether the model at `path` (manifest and ONNX file) is not the one
/// serving.
pub(super) fn model_changed(serving: &crate::model::Model, path: &std::path::Path) -> bool {
    use sha2::Digest;
    let Ok((manifest, onnx, _)) = crate::model::locate(path) else {
        return true;
    };
    let Ok(bytes) = std::fs::read(&onnx) else {
        return true;
    };
    let sha = crate::model::hex(&sha2::Sha256::digest(&bytes));
    sha != serving.sha256 || format!("{manifest:?}") != format!("{:?}", serving.manifest)
}
