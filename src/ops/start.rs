//! What the daemon does with the state directory at start: finishes what a
//! crash left (a probation rolled back, unfinished operations failed) and
//! says which pipelines serve an installed model and which stay disabled.

use super::records::{read_records, save_record};
use super::store::{Installed, Store};
use super::State;
use crate::config::Config;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

/// What the start finds in the store for the pipelines.
#[derive(Debug, Default)]
pub struct StartPlan {
    /// Pipelines serving an installed model: its manifest.
    pub overrides: HashMap<String, PathBuf>,
    /// Pipelines left disabled by `pipeline/disable`.
    pub disabled: HashSet<String>,
}

pub fn prepare_start(store: &Store, config: &Config) -> StartPlan {
    let mut active = store.load_active();
    let mut changed = false;
    let dir = store.ops_dir();
    let mut records = read_records(&dir);
    for (pipeline, a) in active.pipelines.iter_mut() {
        if let Some(id) = a.probation.take() {
            let back = a.previous.take().and_then(|p| p.model);
            let reason = format!(
                "the daemon restarted while {} was on probation; rolled back to {}",
                a.current.as_ref().map_or("?".into(), describe),
                back.as_ref()
                    .map_or("the configured model".into(), describe)
            );
            tracing::warn!(pipeline = %pipeline, op = %id, "{reason}");
            a.current = back;
            changed = true;
            if let Some(r) = records.iter_mut().find(|r| r.id == id) {
                r.state = State::RolledBack;
                r.reason = Some(reason);
                r.updated_ms = crate::flow::unix_ms();
                save_record(&dir, r);
            }
        }
    }
    for r in records.iter_mut().filter(|r| !r.state.finished()) {
        r.reason = Some(format!(
            "interrupted: the daemon restarted at stage {}",
            r.stage.as_deref().unwrap_or("accepted")
        ));
        r.state = State::Failed;
        r.updated_ms = crate::flow::unix_ms();
        save_record(&dir, r);
    }
    let mut overrides = HashMap::new();
    let mut disabled = HashSet::new();
    for p in &config.pipelines {
        let Some(a) = active.pipelines.get_mut(&p.name) else {
            continue;
        };
        if a.disabled {
            tracing::warn!(pipeline = %p.name, "Pipeline stays disabled (pipeline/disable); pipeline/enable turns it on");
            disabled.insert(p.name.clone());
        }
        if let Some(inst) = &a.current {
            let path = store.manifest_path(inst);
            if path.is_file() {
                overrides.insert(p.name.clone(), path);
            } else {
                tracing::error!(pipeline = %p.name, sha256 = %inst.sha256, "Installed model is missing; serving the configured one");
                a.current = None;
                a.previous = None;
                changed = true;
            }
        }
    }
    if changed {
        if let Err(e) = store.save_active(&active) {
            tracing::error!(error = %e, "Cannot write the active model record");
        }
    }
    store.prune(&active);
    StartPlan {
        overrides,
        disabled,
    }
}

/// An installed model in a reason: name, version, seq and its digest.
pub(super) fn describe(i: &Installed) -> String {
    format!(
        "{} {} (seq {}, {})",
        i.name,
        i.version,
        i.seq,
        &i.sha256[..12.min(i.sha256.len())]
    )
}
