//! The operations API: requests on `{prefix}/cmd/{op}` as
//! `{"id": "…", "args": {…}}`, the reply on `{prefix}/cmd/{op}/reply` with
//! the same id, and for operations that change the device a retained
//! status at `{prefix}/ops/{id}` moving `accepted → executing →
//! successful | failed | rolled_back | rejected`. The operations offered
//! are listed, retained, at `{prefix}/ops`.
//!
//! Each changing operation's record is written to the state directory
//! before it acts (and at every stage), so a restart finds it: one that was
//! not finished is failed as interrupted, and a model update whose
//! probation did not finish is rolled back (see [`store`]).

pub mod bundle;
pub mod reference;
pub mod store;

use crate::config::{Config, OPERATIONS};
use crate::health::{PipelineStats, SystemSampler, Telemetry};
use crate::model::Model;
use crate::mqtt::{Outbox, Outgoing};
use crate::pipeline::control::{Control, Probation, Serving};
use crate::pipeline::PipelineSpec;
use rumqttc::QoS;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use store::{Installed, Store};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Accepted,
    Executing,
    Successful,
    Failed,
    RolledBack,
    Rejected,
}

impl State {
    pub fn finished(self) -> bool {
        !matches!(self, State::Accepted | State::Executing)
    }
}

/// An operation's status, as persisted and as published at `ops/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub op: String,
    pub state: State,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub figures: Map<String, Value>,
    pub accepted_ms: u64,
    pub updated_ms: u64,
}

/// A running pipeline as the operations see it.
#[derive(Clone)]
pub struct Entry {
    pub config: crate::config::Pipeline,
    pub control: Arc<Control>,
    pub stats: Arc<PipelineStats>,
}

/// Asks the daemon to reload its configuration; the answer says what
/// changed, or why nothing did.
pub struct ReloadRequest {
    pub reply: tokio::sync::oneshot::Sender<Result<Value, String>>,
}

/// What the daemon shares with the operations.
pub struct Shared {
    pub config: RwLock<Arc<Config>>,
    pub pipelines: RwLock<BTreeMap<String, Entry>>,
    pub telemetry: Arc<Telemetry>,
    pub store: Option<Store>,
    pub reload: Option<flume::Sender<ReloadRequest>>,
}

impl Shared {
    pub fn config(&self) -> Arc<Config> {
        Arc::clone(&self.config.read().unwrap_or_else(|p| p.into_inner()))
    }

    fn entry(&self, pipeline: &str) -> Option<Entry> {
        self.pipelines
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(pipeline)
            .cloned()
    }
}

/// Test hook (fault injection for the power-loss tests): an update stops
/// for good at the stage `EDGEINFER_TEST_HALT_AT` names, after persisting
/// it, so that the process can be killed there.
async fn halt_point(stage: &str) {
    if std::env::var("EDGEINFER_TEST_HALT_AT").as_deref() == Ok(stage) {
        tracing::warn!(stage, "EDGEINFER_TEST_HALT_AT: halting here");
        std::future::pending::<()>().await;
    }
}

/// What the start finds in the store for the pipelines.
#[derive(Debug, Default)]
pub struct StartPlan {
    /// Pipelines serving an installed model: its manifest.
    pub overrides: HashMap<String, PathBuf>,
    /// Pipelines left disabled by `pipeline/disable`.
    pub disabled: HashSet<String>,
}

/// What the daemon does at start with the store: finishes what a crash
/// left (a probation rolled back, unfinished operations failed) and says
/// which pipelines serve an installed model and which stay disabled.
pub fn prepare_start(store: &Store, config: &Config) -> StartPlan {
    let mut active = store.load_active();
    let mut changed = false;
    let mut records = read_records(store);
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
                save_record(store, r);
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
        save_record(store, r);
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
            let path = store.manifest_path(&inst.sha256);
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

fn describe(i: &Installed) -> String {
    format!(
        "{} {} (seq {}, {})",
        i.name,
        i.version,
        i.seq,
        &i.sha256[..12.min(i.sha256.len())]
    )
}

fn read_records(store: &Store) -> Vec<Record> {
    let Ok(dir) = std::fs::read_dir(store.ops_dir()) else {
        return Vec::new();
    };
    let mut records: Vec<Record> = dir
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
        .collect();
    records.sort_by_key(|r| r.accepted_ms);
    records
}

fn save_record(store: &Store, r: &Record) {
    let path = store.ops_dir().join(format!("{}.json", r.id));
    if let Err(e) = store::write_atomic(&path, &serde_json::to_vec(r).expect("record serializes")) {
        tracing::error!(op = %r.id, error = %e, "Cannot persist the operation's state");
    }
}

/// Records kept in the state directory (and retained on the broker).
const KEPT_RECORDS: usize = 100;

/// A valid id: what a topic level and a file name can both hold.
fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !id.starts_with('.')
}

const CHANGING: &[&str] = &[
    "reload",
    "pipeline/enable",
    "pipeline/disable",
    "model/update",
    "model/rollback",
];

pub struct Ops {
    shared: Arc<Shared>,
    outbox: Outbox,
    prefix: String,
    device: String,
    seen: Mutex<(HashSet<String>, VecDeque<String>)>,
    /// One changing operation at a time.
    busy: tokio::sync::Mutex<()>,
    /// Pipelines with a model on probation: the operation and its watcher.
    probations: Mutex<HashMap<String, (String, CancellationToken)>>,
    /// The spec each pipeline served before its last swap (instant rollback).
    replaced: Mutex<HashMap<String, Arc<PipelineSpec>>>,
    sampler: Mutex<SystemSampler>,
    stop: CancellationToken,
}

impl Ops {
    pub fn new(shared: Arc<Shared>, outbox: Outbox, stop: CancellationToken) -> Arc<Ops> {
        let config = shared.config();
        Arc::new(Ops {
            prefix: config.prefix(),
            device: config.device_id(),
            sampler: Mutex::new(SystemSampler::new(&config.health.thermal_dir)),
            shared,
            outbox,
            seen: Mutex::default(),
            busy: tokio::sync::Mutex::new(()),
            probations: Mutex::default(),
            replaced: Mutex::default(),
            stop,
        })
    }

    /// Serves requests until the channel closes (the router is dropped at
    /// shutdown). Publishes the operations list and the stored records first.
    pub async fn run(self: Arc<Self>, rx: flume::Receiver<(String, bytes::Bytes)>) {
        self.publish_list();
        if let Some(store) = &self.shared.store {
            let mut records = read_records(store);
            let excess = records.len().saturating_sub(KEPT_RECORDS);
            for old in records.drain(..excess) {
                let _ = std::fs::remove_file(store.ops_dir().join(format!("{}.json", old.id)));
                self.publish(format!("{}/ops/{}", self.prefix, old.id), Vec::new(), true);
            }
            for r in &records {
                self.remember(&r.id);
                self.publish_record(r);
            }
        }
        while let Ok((op, payload)) = rx.recv_async().await {
            // Our own replies come back on cmd/#.
            if op == "reply" || op.ends_with("/reply") {
                continue;
            }
            Arc::clone(&self).dispatch(op, payload);
        }
        self.stop.cancel();
    }

    fn publish(&self, topic: String, payload: Vec<u8>, retain: bool) {
        let _ = self.outbox.offer(Outgoing {
            topic,
            payload,
            qos: QoS::AtLeastOnce,
            retain,
        });
    }

    fn publish_list(&self) {
        let config = self.shared.config();
        let ops = &config.operations;
        let list: Vec<Value> = OPERATIONS
            .iter()
            .map(|op| {
                let allowed = ops.enabled && ops.allow.iter().any(|a| a == op)
                    || !ops.enabled && matches!(*op, "ping" | "health");
                json!({"op": op, "allowed": allowed, "changes": CHANGING.contains(op)})
            })
            .collect();
        let body = json!({
            "device": self.device,
            "enabled": ops.enabled,
            "request": format!("{}/cmd/{{op}}", self.prefix),
            "operations": list,
        });
        self.publish(
            format!("{}/ops", self.prefix),
            body.to_string().into_bytes(),
            true,
        );
    }

    fn reply(&self, op: &str, id: &Value, ok: bool, mut body: Map<String, Value>) {
        body.insert("id".into(), id.clone());
        body.insert("op".into(), op.into());
        body.insert("ok".into(), ok.into());
        body.insert("ts".into(), crate::flow::unix_ms().into());
        self.publish(
            format!("{}/cmd/{op}/reply", self.prefix),
            Value::Object(body).to_string().into_bytes(),
            false,
        );
    }

    fn error(&self, op: &str, id: &Value, message: String) {
        tracing::info!(op, error = %message, "Operation refused");
        let mut m = Map::new();
        m.insert("error".into(), message.into());
        self.reply(op, id, false, m);
    }

    fn publish_record(&self, r: &Record) {
        self.publish(
            format!("{}/ops/{}", self.prefix, r.id),
            serde_json::to_vec(r).expect("record serializes"),
            true,
        );
    }

    /// Persists, then publishes: the record on disk is never behind what
    /// the fleet was told.
    fn record(&self, r: &mut Record, state: State, stage: Option<&str>) {
        r.state = state;
        r.stage = stage.map(String::from);
        r.updated_ms = crate::flow::unix_ms();
        if let Some(store) = &self.shared.store {
            save_record(store, r);
        }
        self.publish_record(r);
    }

    /// True when the id was seen before (and remembers it).
    fn remember(&self, id: &str) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.0.contains(id) {
            return true;
        }
        seen.0.insert(id.to_owned());
        seen.1.push_back(id.to_owned());
        if seen.1.len() > 4096 {
            if let Some(old) = seen.1.pop_front() {
                seen.0.remove(&old);
            }
        }
        false
    }

    fn stored_record(&self, id: &str) -> Option<Record> {
        let store = self.shared.store.as_ref()?;
        serde_json::from_slice(&std::fs::read(store.ops_dir().join(format!("{id}.json"))).ok()?)
            .ok()
    }

    fn dispatch(self: Arc<Self>, op: String, payload: bytes::Bytes) {
        let received = Instant::now();
        let config = self.shared.config();
        let ops = &config.operations;
        // Before this API, cmd/ping and cmd/health took any payload: an
        // empty or non-JSON one is still a request without an id.
        let parsed: Result<Value, String> = if payload.iter().all(u8::is_ascii_whitespace) {
            Ok(json!({}))
        } else {
            serde_json::from_slice(&payload).map_err(|e| format!("malformed request: {e}"))
        };
        let legacy = matches!(op.as_str(), "ping" | "health");
        let request = match parsed {
            Ok(Value::Object(m)) => m,
            Ok(_) => {
                return self.error(
                    &op,
                    &Value::Null,
                    "malformed request: expected a JSON object {\"id\": \"…\", \"args\": {…}}"
                        .into(),
                )
            }
            Err(e) if !legacy => return self.error(&op, &Value::Null, e),
            Err(_) => Map::new(),
        };
        let id = request.get("id").cloned().unwrap_or(Value::Null);
        let args = match request.get("args") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(a)) => a.clone(),
            Some(_) => {
                return self.error(&op, &id, "malformed request: args must be an object".into())
            }
        };
        if let Some(extra) = request
            .keys()
            .find(|k| !matches!(k.as_str(), "id" | "args"))
        {
            return self.error(&op, &id, format!("malformed request: unknown field {extra:?} (a request is {{\"id\", \"args\"}})"));
        }
        if !OPERATIONS.contains(&op.as_str()) {
            return self.error(
                &op,
                &id,
                format!("unknown operation {op:?}; known: {}", OPERATIONS.join(", ")),
            );
        }
        if !ops.enabled && !legacy {
            return self.error(
                &op,
                &id,
                "the operations API is disabled on this device (operations.enabled = false)".into(),
            );
        }
        if ops.enabled && !ops.allow.contains(&op) {
            return self.error(
                &op,
                &id,
                format!("operation {op:?} is not allowed on this device (operations.allow)"),
            );
        }
        let changing = CHANGING.contains(&op.as_str());
        let id_text = match &id {
            Value::String(s) if valid_id(s) => Some(s.clone()),
            Value::Null if !changing => None,
            _ => return self.error(&op, &id, "malformed request: id must be 1 to 64 characters of A-Z a-z 0-9 . _ - (and is required for operations that change the device)".into()),
        };
        if let Some(id_text) = &id_text {
            if self.remember(id_text) {
                let mut m = Map::new();
                m.insert("duplicate".into(), true.into());
                if let Some(r) = self.stored_record(id_text) {
                    m.insert(
                        "state".into(),
                        serde_json::to_value(r.state).expect("state"),
                    );
                    m.insert("record".into(), serde_json::to_value(&r).expect("record"));
                }
                return self.reply(&op, &id, true, m);
            }
        }
        if !changing {
            let body = self.read_only(&op, &args, &config);
            return match body {
                Ok(m) => self.reply(&op, &id, true, m),
                Err(e) => self.error(&op, &id, e),
            };
        }
        let id_text = id_text.expect("changing operations have an id");
        tokio::spawn(async move {
            let mut record = Record {
                id: id_text,
                op: op.clone(),
                state: State::Accepted,
                stage: None,
                pipeline: args
                    .get("pipeline")
                    .and_then(|p| p.as_str())
                    .map(String::from),
                reason: None,
                figures: Map::new(),
                accepted_ms: crate::flow::unix_ms(),
                updated_ms: 0,
            };
            self.record(&mut record, State::Accepted, None);
            let _turn = self.busy.lock().await;
            let outcome = match op.as_str() {
                "reload" => self.reload(&mut record).await,
                "pipeline/enable" => self.enable(&mut record, true),
                "pipeline/disable" => self.enable(&mut record, false),
                "model/update" => Arc::clone(&self).update(&mut record, &args, received).await,
                "model/rollback" => self.rollback_request(&mut record).await,
                _ => unreachable!("changing operations are listed"),
            };
            let (ok, state) = match outcome {
                Ok(state) => (true, state),
                Err((state, reason)) => {
                    record.reason = Some(reason);
                    (false, state)
                }
            };
            let stage = record.stage.clone();
            self.record(&mut record, state, stage.as_deref());
            let mut m = Map::new();
            m.insert("state".into(), serde_json::to_value(state).expect("state"));
            m.insert(
                "record".into(),
                serde_json::to_value(&record).expect("record"),
            );
            if let Some(reason) = &record.reason {
                m.insert("error".into(), reason.clone().into());
            }
            self.reply(&op, &Value::String(record.id.clone()), ok, m);
        });
    }

    fn read_only(
        &self,
        op: &str,
        args: &Map<String, Value>,
        config: &Config,
    ) -> Result<Map<String, Value>, String> {
        let _ = args;
        let mut m = Map::new();
        match op {
            "ping" => {
                m.insert("device".into(), self.device.clone().into());
            }
            "health" => {
                let snapshot = {
                    let mut sampler = self.sampler.lock().unwrap_or_else(|p| p.into_inner());
                    self.shared.telemetry.snapshot(&self.device, &mut sampler)
                };
                m.insert(
                    "health".into(),
                    serde_json::to_value(snapshot).expect("health"),
                );
            }
            "status" => {
                m.insert("device".into(), self.device.clone().into());
                m.insert(
                    "pipelines".into(),
                    Value::Object(self.pipeline_status(false)),
                );
            }
            "models" => {
                m.insert(
                    "pipelines".into(),
                    Value::Object(self.pipeline_status(true)),
                );
            }
            "config" => {
                m.insert("config".into(), redacted(config));
            }
            _ => unreachable!("read-only operations are listed"),
        }
        Ok(m)
    }

    fn pipeline_status(&self, detail: bool) -> Map<String, Value> {
        let active = self
            .shared
            .store
            .as_ref()
            .map(|s| s.load_active())
            .unwrap_or_default();
        let probations = self
            .probations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let pipelines = self
            .shared
            .pipelines
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let failed: Vec<(String, Option<String>)> = self
            .shared
            .telemetry
            .pipeline_stats()
            .into_iter()
            .map(|(n, s)| (n, s.failed.lock().expect("stats lock").clone()))
            .collect();
        let mut out = Map::new();
        for (name, error) in failed {
            let Some(e) = pipelines.get(&name) else {
                out.insert(name, json!({"state": "failed", "error": error}));
                continue;
            };
            let spec = e.control.spec();
            let model = &spec.model;
            let installed = active.pipelines.get(&name);
            let mut v = json!({
                "state": if e.stats.disabled.load(std::sync::atomic::Ordering::Relaxed) { "disabled" } else { "running" },
                "model": model.name,
                "sha256": model.sha256,
                "runs_on": model.runs_on(),
                "installed": installed.and_then(|a| a.current.clone()),
                "can_roll_back": installed.is_some_and(|a| a.previous.is_some()),
            });
            if let Some((op, _)) = probations.get(&name) {
                v["probation"] =
                    json!({"op": op, "figures": e.control.probation().map(|p| figures(&p, None))});
            }
            if detail {
                v["inputs"] = json!(model
                    .inputs
                    .iter()
                    .map(|t| t.to_string())
                    .collect::<Vec<_>>());
                v["outputs"] = json!(model
                    .outputs
                    .iter()
                    .map(|t| t.to_string())
                    .collect::<Vec<_>>());
                v["reason"] = json!(model.placement.reason);
                v["path"] = json!(model.path);
                v["load_ms"] = json!(model.load_ms);
                v["warnings"] = json!(model.warnings);
            }
            out.insert(name, v);
        }
        out
    }

    async fn reload(&self, record: &mut Record) -> Result<State, (State, String)> {
        self.record(record, State::Executing, Some("reload"));
        let Some(tx) = &self.shared.reload else {
            return Err((
                State::Failed,
                "this daemon cannot reload (not started from a config file)".into(),
            ));
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        tx.send_async(ReloadRequest { reply })
            .await
            .map_err(|_| (State::Failed, "the daemon is stopping".to_string()))?;
        match answer.await {
            Ok(Ok(Value::Object(figures))) => {
                record.figures = figures;
                Ok(State::Successful)
            }
            Ok(Ok(_)) => Ok(State::Successful),
            Ok(Err(e)) => Err((State::Failed, e)),
            Err(_) => Err((
                State::Failed,
                "the daemon restarted to apply the new configuration".into(),
            )),
        }
    }

    fn enable(&self, record: &mut Record, on: bool) -> Result<State, (State, String)> {
        let name = record
            .pipeline
            .clone()
            .ok_or((State::Rejected, "args.pipeline is required".to_string()))?;
        let entry = self
            .shared
            .entry(&name)
            .ok_or_else(|| (State::Rejected, format!("no running pipeline {name:?}")))?;
        if let Some(store) = &self.shared.store {
            // Recorded first: a restart keeps what was asked.
            let mut active = store.load_active();
            active.pipelines.entry(name.clone()).or_default().disabled = !on;
            store.save_active(&active).map_err(|e| {
                (
                    State::Failed,
                    format!("cannot write the active model record: {e}"),
                )
            })?;
        }
        let was_disabled = entry
            .stats
            .disabled
            .swap(!on, std::sync::atomic::Ordering::Relaxed);
        record
            .figures
            .insert("was_enabled".into(), (!was_disabled).into());
        record.figures.insert("enabled".into(), on.into());
        tracing::info!(pipeline = %name, enabled = on, "Pipeline {}", if on { "enabled" } else { "disabled" });
        Ok(State::Successful)
    }

    fn canary(&self, percent: u64) -> (bool, u64) {
        use sha2::{Digest, Sha256};
        let h = Sha256::digest(self.device.as_bytes());
        let bucket = u64::from_be_bytes(h[..8].try_into().expect("8 bytes")) % 100;
        (bucket < percent, bucket)
    }

    async fn update(
        self: Arc<Self>,
        record: &mut Record,
        args: &Map<String, Value>,
        received: Instant,
    ) -> Result<State, (State, String)> {
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

        // Verify before anything is parsed or written.
        self.record(record, State::Executing, Some("verify"));
        halt_point("verify").await;
        let max = config.operations.max_bundle_mb << 20;
        let (bytes, signature) = read_bundle(args, max).map_err(reject)?;
        let keys = trusted_keys(&config).map_err(reject)?;
        let verified = bundle::verify(&bytes, &signature, &keys, bundle::now_s())
            .map_err(|e| reject(e.to_string()))?;
        let meta = verified.meta.clone();
        record.figures.insert("bundle".into(), json!({"name": meta.name, "version": meta.version, "seq": meta.seq, "sha256": meta.sha256, "size": meta.size, "signed_by": verified.key_id}));
        let active = store.load_active();
        if let Some(highest) = active.highest_seq.get(&meta.name) {
            if meta.seq < *highest {
                return Err(reject(format!("bundle {} seq {} is older than seq {highest} already installed (a replay or a downgrade; publish a new seq to go back)", meta.name, meta.seq)));
            }
        }

        self.record(record, State::Executing, Some("stage"));
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

        self.record(record, State::Executing, Some("load"));
        halt_point("load").await;
        let path = store.manifest_path(&installed.sha256);
        let loaded_at = Instant::now();
        let spec = {
            let (config, pcfg) = (Arc::clone(&config), entry.config.clone());
            tokio::task::spawn_blocking(move || {
                load_spec(&config, &pcfg, &path, reference.as_ref())
            })
            .await
            .expect("model loading does not panic: model panics are caught")
            .map_err(|e| (State::Failed, e))?
        };
        let (spec, checked) = spec;
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

        // The commit point: the record names the new model (and the one to
        // return to) before it serves.
        self.record(record, State::Executing, Some("swap"));
        halt_point("swap").await;
        let old = entry.control.serving();
        let mut active = store.load_active();
        let a = active.pipelines.entry(name.clone()).or_default();
        let before = a.current.clone();
        a.previous = Some(store::Previous { model: before });
        a.current = Some(installed.clone());
        a.probation = (probation_s > 0).then(|| record.id.clone());
        let highest = active.highest_seq.entry(meta.name.clone()).or_insert(0);
        *highest = (*highest).max(meta.seq);
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
            .insert(name.clone(), Arc::clone(&old.spec));
        let to_serving = received.elapsed().as_secs_f64() * 1000.0;
        record
            .figures
            .insert("request_to_serving_ms".into(), json!(round(to_serving)));
        tracing::info!(pipeline = %name, model = %meta.name, version = %meta.version, seq = meta.seq, request_to_serving_ms = round(to_serving), "Model swapped in");
        store.prune(&active);
        let Some(probation) = probation else {
            record.figures.insert("applied".into(), true.into());
            return Ok(State::Successful);
        };

        // Probation: watched by its own task so that rollbacks on request
        // and other operations are not held behind it.
        self.record(record, State::Executing, Some("probation"));
        let token = self.stop.child_token();
        self.probations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.clone(), (record.id.clone(), token.clone()));
        let watcher = Arc::clone(&self);
        let mut watched = record.clone();
        tokio::spawn(async move {
            watcher
                .watch(&mut watched, name, probation, baseline, probation_s, token)
                .await;
        });
        Ok(State::Executing)
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
                self.record(record, State::Successful, Some("done"));
            }
            Some(reason) => {
                tracing::warn!(pipeline = %pipeline, op = %record.id, reason = %reason, "Probation failed; rolling back");
                match self.roll_back(&pipeline).await {
                    Ok(to) => {
                        record.reason = Some(format!("{reason}; rolled back to {to}"));
                        self.record(record, State::RolledBack, Some("rolled_back"));
                    }
                    Err(e) => {
                        record.reason = Some(format!("{reason}; the rollback failed: {e}"));
                        self.record(record, State::Failed, Some("rollback"));
                    }
                }
            }
        }
    }

    async fn rollback_request(&self, record: &mut Record) -> Result<State, (State, String)> {
        let name = record
            .pipeline
            .clone()
            .ok_or((State::Rejected, "args.pipeline is required".to_string()))?;
        if self.shared.entry(&name).is_none() {
            return Err((State::Rejected, format!("no running pipeline {name:?}")));
        }
        self.record(record, State::Executing, Some("rollback"));
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
                self.record(&mut r, State::RolledBack, Some("rolled_back"));
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
            Some(i) => store.manifest_path(&i.sha256),
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
                    tokio::task::spawn_blocking(move || load_spec(&config, &pcfg, &p2, None))
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

/// The replaced model's record at the swap: what the new one is held to.
struct Baseline {
    error_rate: Option<f64>,
    p99_ms: Option<f64>,
}

impl Baseline {
    fn of(old: &Serving) -> Baseline {
        let served = old.stats.served.get();
        let failures = old.stats.failures.get();
        let total = served + failures;
        Baseline {
            error_rate: (total >= 20).then(|| failures as f64 / total as f64),
            p99_ms: (served >= 20).then(|| old.stats.inference.percentiles().p99),
        }
    }
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn figures(p: &Probation, baseline: Option<&Baseline>) -> Value {
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

/// The bundle's bytes and signature from the request: inline (base64) or
/// a path on the device (signature beside it as `PATH.minisig`, unless
/// given).
fn read_bundle(args: &Map<String, Value>, max: u64) -> Result<(Vec<u8>, String), String> {
    use base64::Engine;
    let signature = args
        .get("signature")
        .and_then(|s| s.as_str())
        .map(String::from);
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
            let size = std::fs::metadata(&path)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .len();
            if size > max {
                return Err(format!(
                    "{}: {size} bytes, over operations.max_bundle_mb ({} MiB)",
                    path.display(),
                    max >> 20
                ));
            }
            let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let signature = match signature {
                Some(s) => s,
                None => {
                    let sig = PathBuf::from(format!("{}.minisig", path.display()));
                    std::fs::read_to_string(&sig).map_err(|e| format!("{}: {e}", sig.display()))?
                }
            };
            Ok((bytes, signature))
        }
        _ => Err("give args.bundle (base64) with args.signature, or args.path".into()),
    }
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
/// reference (or warms it on one input), off the async runtime.
pub fn load_spec(
    config: &Config,
    pipeline: &crate::config::Pipeline,
    path: &std::path::Path,
    reference: Option<&bundle::Reference>,
) -> Result<(PipelineSpec, Option<reference::Checked>), String> {
    let model = Arc::new(
        Model::load_with(path, &crate::daemon::engine_options(config, pipeline))
            .map_err(|e| format!("the new model does not load: {e}"))?,
    );
    let spec = PipelineSpec::new(config, pipeline, Arc::clone(&model))
        .map_err(|e| format!("the new model does not fit pipeline {}: {e}", pipeline.name))?;
    let checked = match reference {
        Some(r) => {
            Some(reference::check(&model, r).map_err(|e| format!("reference check failed: {e}"))?)
        }
        None => {
            // Warm: the first inference allocates the plan's buffers.
            reference::outputs(&model, &[vec![0.0; model.input().len()]])
                .map_err(|e| format!("the new model fails on a zero input: {e}"))?;
            None
        }
    };
    // The parser and optimiser ran again (a reload or a model update); their
    // pages go back too.
    crate::pageout::after_loading();
    Ok((spec, checked))
}

/// The configuration with what could help an attacker removed: the broker
/// user name and where the password and private key are.
pub fn redacted(config: &Config) -> Value {
    let mut v = serde_json::to_value(config).expect("config serializes");
    let hidden = json!("<redacted>");
    if let Some(b) = v.get_mut("broker").and_then(|b| b.as_object_mut()) {
        for key in [
            "username",
            "password_file",
            "password_credential",
            "key_file",
        ] {
            if b.get(key).is_some_and(|x| !x.is_null()) {
                b.insert(key.into(), hidden.clone());
            }
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_topic_levels_and_file_names() {
        assert!(valid_id("op-2026.12.02_1"));
        for bad in ["", "a/b", "a+b", "#", ".hidden", &"x".repeat(65), "é"] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn secrets_are_redacted_from_the_config() {
        let text = "[broker]\nurl = \"mqtt://127.0.0.1:1\"\nusername = \"gw\"\npassword_file = \"/etc/pw\"\n";
        let config = Config::parse(text, std::path::Path::new(".")).unwrap();
        let v = redacted(&config);
        let s = v.to_string();
        assert!(!s.contains("/etc/pw") && !s.contains("\"gw\""), "{s}");
        assert_eq!(v["broker"]["url"], "mqtt://127.0.0.1:1");
    }

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
