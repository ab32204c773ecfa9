//! The operations API: requests on `{prefix}/cmd/{op}` as
//! `{"id": "…", "args": {…}}`, the reply on `{prefix}/cmd/{op}/reply` with
//! the same id, and for operations that change the device a retained
//! status at `{prefix}/ops/{id}` moving `accepted → executing →
//! successful | failed | rolled_back | rejected`. The operations offered
//! are listed, retained, at `{prefix}/ops`.
//!
//! How a request travels: the poll loop hands it to one of two bounded
//! lanes (`ping`/`health`, everything else; a full lane is counted and
//! logged) → [`Ops::run`], the intake, parses it ([`request`]) and answers
//! read-only operations at once ([`status`]); a changing one is checked
//! against the ids already acted on ([`records`]) and queued for the
//! executor, or answered `busy` when [`QUEUE`] are waiting → the executor
//! runs them one at a time ([`update`], [`probation`]), each step persisted
//! before it acts. Nothing here runs on the poll loop, and file reads and
//! writes run off the async runtime's threads.
//!
//! Records and the replies of changing operations go through the outbox's
//! durable lane (the spool): a burst never drops them. A restart finds each
//! record on disk: one that was not finished is failed as interrupted, and
//! a model update whose probation did not finish is rolled back
//! ([`start`]).

pub mod bundle;
mod probation;
pub mod records;
pub mod reference;
pub mod request;
mod start;
mod status;
pub mod store;
pub mod untrusted;
mod update;

pub use start::{prepare_start, StartPlan};
pub use status::redacted;
pub use update::{load_spec, trusted_keys};

use crate::config::{Config, OPERATIONS};
use crate::health::{OpsStats, PipelineStats, SystemSampler, Telemetry};
use crate::mqtt::{Outbox, Outgoing};
use crate::pipeline::control::Control;
use crate::pipeline::PipelineSpec;
use records::{Earlier, Records};
use request::{Policy, Refusal, Request, CHANGING};
use rumqttc::QoS;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// Requests of `ping` and `health` the poll loop may hand over before the
/// intake takes them.
pub const PRIORITY_LANE: usize = 16;
/// Requests of the other operations the poll loop may hand over.
pub const GENERAL_LANE: usize = 1024;
/// Bytes of requests the poll loop may hand over (inline bundles are
/// large): beyond, requests wait in no queue of ours (see
/// [`crate::mqtt::CommandLanes`]).
pub const LANE_BYTES: u64 = 16 << 20;
/// Changing operations that may wait for their turn; beyond, `busy`.
pub const QUEUE: usize = 64;

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
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
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
    pub store: Option<store::Store>,
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

/// How an operation ended: its state, or the state and the reason.
type Outcome = Result<State, (State, String)>;

pub struct Ops {
    shared: Arc<Shared>,
    outbox: Outbox,
    prefix: String,
    device: String,
    records: Arc<Records>,
    stats: Arc<OpsStats>,
    /// One changing operation at a time (the executor, and a probation's
    /// verdict).
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
        let dir = shared.store.as_ref().map(|s| s.ops_dir());
        let (records, _) = Records::open(dir.as_deref());
        Arc::new(Ops {
            prefix: config.prefix(),
            device: config.device_id(),
            sampler: Mutex::new(SystemSampler::new(&config.health.thermal_dir)),
            stats: Arc::clone(&shared.telemetry.ops),
            records: Arc::new(records),
            shared,
            outbox,
            busy: tokio::sync::Mutex::new(()),
            probations: Mutex::default(),
            replaced: Mutex::default(),
            stop,
        })
    }

    /// The intake: serves requests until the lanes close (the router is
    /// dropped at shutdown). Publishes the operations list and the kept
    /// records first, and clears the retained records pruned since.
    pub async fn run(
        self: Arc<Self>,
        priority: flume::Receiver<(String, bytes::Bytes)>,
        general: flume::Receiver<(String, bytes::Bytes)>,
    ) {
        self.publish_list();
        let records = Arc::clone(&self.records);
        let cleared = tokio::task::spawn_blocking(move || records.prune(true))
            .await
            .unwrap_or_default();
        for id in cleared {
            self.clear_record(&id);
        }
        if let Some(dir) = self.shared.store.as_ref().map(|s| s.ops_dir()) {
            let kept = tokio::task::spawn_blocking(move || records::read_records(&dir))
                .await
                .unwrap_or_default();
            for r in &kept {
                self.publish_record(r);
            }
        }
        let (queue, taken) = flume::bounded::<(Request, Instant)>(QUEUE);
        let executor = tokio::spawn(Arc::clone(&self).execute(taken));
        loop {
            let next = tokio::select! {
                biased;
                m = priority.recv_async() => m,
                m = general.recv_async() => m,
            };
            let Ok((op, payload)) = next else { break };
            self.intake(&op, &payload, &queue);
            self.stats
                .lane_bytes
                .fetch_sub(payload.len() as u64, Ordering::Relaxed);
        }
        drop(queue);
        let _ = executor.await;
        self.stop.cancel();
    }

    /// Takes one request: refused, answered (read-only), a duplicate,
    /// queued, or `busy`. Never waits.
    fn intake(&self, op: &str, payload: &[u8], queue: &flume::Sender<(Request, Instant)>) {
        self.stats.requests.inc();
        let received = Instant::now();
        let config = self.shared.config();
        let policy = Policy {
            enabled: config.operations.enabled,
            allow: &config.operations.allow,
        };
        let request = match request::parse(op, payload, &policy) {
            Ok(r) => r,
            Err(refusal) => return self.refuse(op, refusal),
        };
        let id = request.id.clone().map_or(Value::Null, Value::String);
        if !request.changing() {
            return match self.read_only(request.op, &config) {
                Ok(m) => self.reply(request.op, &id, true, m, false),
                Err(e) => self.error(request.op, &id, e, false),
            };
        }
        let id_text = request.id.clone().expect("changing operations have an id");
        if let Some(earlier) = self.records.earlier(&id_text) {
            return self.duplicate(&request, &id, earlier);
        }
        self.records.take(&id_text, request.op);
        let op = request.op;
        match queue.try_send((request, received)) {
            Ok(()) => {
                self.stats.queued.fetch_add(1, Ordering::Relaxed);
            }
            Err(flume::TrySendError::Full(_)) => {
                // Not acted on: the same id may come again.
                self.records.release(&id_text);
                self.stats.busy.inc();
                let mut m = Map::new();
                m.insert("busy".into(), true.into());
                m.insert(
                    "error".into(),
                    format!("busy: {QUEUE} operations are waiting for their turn; nothing was done, send it again later").into(),
                );
                self.reply(op, &id, false, m, true);
            }
            Err(flume::TrySendError::Disconnected(_)) => {}
        }
    }

    /// The executor: changing operations one at a time, in arrival order.
    async fn execute(self: Arc<Self>, taken: flume::Receiver<(Request, Instant)>) {
        while let Ok((request, received)) = taken.recv_async().await {
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
            Arc::clone(&self).perform(request, received).await;
            let records = Arc::clone(&self.records);
            let cleared = tokio::task::spawn_blocking(move || records.prune(false))
                .await
                .unwrap_or_default();
            for id in cleared {
                self.clear_record(&id);
            }
        }
    }

    async fn perform(self: Arc<Self>, request: Request, received: Instant) {
        let op = request.op;
        let mut record = Record {
            id: request.id.clone().expect("changing operations have an id"),
            op: op.to_owned(),
            state: State::Accepted,
            stage: None,
            pipeline: request.pipeline().map(String::from),
            reason: None,
            figures: Map::new(),
            accepted_ms: crate::flow::unix_ms(),
            updated_ms: 0,
        };
        self.record(&mut record, State::Accepted, None).await;
        let _turn = self.busy.lock().await;
        let outcome = match op {
            "reload" => self.reload(&mut record).await,
            "pipeline/enable" => self.enable(&mut record, true).await,
            "pipeline/disable" => self.enable(&mut record, false).await,
            "model/update" => {
                Arc::clone(&self)
                    .update(&mut record, &request.args, received)
                    .await
            }
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
        self.record(&mut record, state, stage.as_deref()).await;
        let mut m = Map::new();
        m.insert("state".into(), serde_json::to_value(state).expect("state"));
        m.insert(
            "record".into(),
            serde_json::to_value(&record).expect("record"),
        );
        if let Some(reason) = &record.reason {
            m.insert("error".into(), reason.clone().into());
        }
        self.reply(op, &Value::String(record.id.clone()), ok, m, true);
    }

    /// A repeated id: not acted on again. The same operation is answered
    /// with its recorded state; another operation is an error.
    fn duplicate(&self, request: &Request, id: &Value, earlier: Earlier) {
        if earlier.op != request.op {
            return self.error(
                request.op,
                id,
                format!(
                    "id {id} was already used for {:?}; nothing was done (use a new id)",
                    earlier.op
                ),
                true,
            );
        }
        let mut m = Map::new();
        m.insert("duplicate".into(), true.into());
        match earlier.record {
            Some(r) => {
                m.insert(
                    "state".into(),
                    serde_json::to_value(r.state).expect("state"),
                );
                m.insert("record".into(), serde_json::to_value(&r).expect("record"));
            }
            None => {
                m.insert(
                    "note".into(),
                    "taken before; its record is not kept (still waiting its turn, or pruned: the last 100 are kept)".into(),
                );
            }
        }
        self.reply(request.op, id, true, m, true);
    }

    fn refuse(&self, op: &str, refusal: Refusal) {
        // A reply topic is built only from an operation's whole name.
        if refusal.op == op {
            self.error(op, &refusal.id, refusal.error, false);
        } else {
            tracing::info!(op = %refusal.op, error = %refusal.error, "Operation refused (no reply: its name is too long for a topic)");
        }
    }

    fn publish(&self, topic: String, payload: Vec<u8>, retain: bool, durable: bool) {
        let msg = Outgoing {
            topic,
            payload,
            qos: QoS::AtLeastOnce,
            retain,
        };
        let _ = if durable {
            self.outbox.send(msg)
        } else {
            self.outbox.offer(msg)
        };
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
            true,
        );
    }

    /// Replies on `cmd/{op}/reply`; `durable` for changing operations
    /// (the spool: never dropped by a burst).
    fn reply(&self, op: &str, id: &Value, ok: bool, mut body: Map<String, Value>, durable: bool) {
        body.insert("id".into(), id.clone());
        body.insert("op".into(), op.into());
        body.insert("ok".into(), ok.into());
        body.insert("ts".into(), crate::flow::unix_ms().into());
        self.publish(
            format!("{}/cmd/{op}/reply", self.prefix),
            Value::Object(body).to_string().into_bytes(),
            false,
            durable,
        );
    }

    fn error(&self, op: &str, id: &Value, message: String, durable: bool) {
        tracing::info!(op, error = %message, "Operation refused");
        let mut m = Map::new();
        m.insert("error".into(), message.into());
        self.reply(op, id, false, m, durable);
    }

    fn publish_record(&self, r: &Record) {
        self.publish(
            format!("{}/ops/{}", self.prefix, r.id),
            serde_json::to_vec(r).expect("record serializes"),
            true,
            true,
        );
    }

    fn clear_record(&self, id: &str) {
        self.publish(format!("{}/ops/{id}", self.prefix), Vec::new(), true, true);
    }

    /// Persists (off the runtime's threads), then publishes: the record on
    /// disk is never behind what the fleet was told.
    async fn record(&self, r: &mut Record, state: State, stage: Option<&str>) {
        r.state = state;
        r.stage = stage.map(String::from);
        r.updated_ms = crate::flow::unix_ms();
        let (records, copy) = (Arc::clone(&self.records), r.clone());
        let _ = tokio::task::spawn_blocking(move || records.save(&copy)).await;
        self.publish_record(r);
    }

    fn stored_record(&self, id: &str) -> Option<Record> {
        self.records.stored(id)
    }

    async fn reload(&self, record: &mut Record) -> Outcome {
        self.record(record, State::Executing, Some("reload")).await;
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

    async fn enable(&self, record: &mut Record, on: bool) -> Outcome {
        let name = record
            .pipeline
            .clone()
            .ok_or((State::Rejected, "args.pipeline is required".to_string()))?;
        let entry = self
            .shared
            .entry(&name)
            .ok_or_else(|| (State::Rejected, format!("no running pipeline {name:?}")))?;
        if self.shared.store.is_some() {
            // Recorded first: a restart keeps what was asked.
            let shared = Arc::clone(&self.shared);
            let pipeline = name.clone();
            tokio::task::spawn_blocking(move || {
                let store = shared.store.as_ref().expect("checked");
                let mut active = store.load_active();
                active.pipelines.entry(pipeline).or_default().disabled = !on;
                store.save_active(&active)
            })
            .await
            .expect("writing the record does not panic")
            .map_err(|e| {
                (
                    State::Failed,
                    format!("cannot write the active model record: {e}"),
                )
            })?;
        }
        let was_disabled = entry.stats.disabled.swap(!on, Ordering::Relaxed);
        record
            .figures
            .insert("was_enabled".into(), (!was_disabled).into());
        record.figures.insert("enabled".into(), on.into());
        tracing::info!(pipeline = %name, enabled = on, "Pipeline {}", if on { "enabled" } else { "disabled" });
        Ok(State::Successful)
    }
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
