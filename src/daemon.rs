//! The daemon's wiring: loads the models, starts the pipelines, joins them
//! to the MQTT transport (routes in, sinks out), runs the health and
//! command loops, and shuts it all down in order.

use crate::config::{self, Config, Problem};
use crate::health::{self, SystemSampler, Telemetry};
use crate::model::Registry;
use crate::mqtt::{self, Backoff, ConnectionContext, Outbox, Outgoing, Router, TopicFilter};
use crate::{flow, pipeline, systemd};
use rumqttc::{AsyncClient, QoS};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long shutdown may take to drain queues and say `offline`.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("invalid configuration:\n{}", .0.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    Config(Vec<Problem>),
    #[error("MQTT setup failed: {0}")]
    Mqtt(String),
}

/// Provider names the engine does not know, keyed like the config.
fn check_providers(config: &Config) -> Vec<Problem> {
    let known = crate::model::backend::provider_names();
    let lists = std::iter::once((
        "engine.providers".to_string(),
        Some(&config.engine.providers),
    ))
    .chain(
        config
            .pipelines
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("pipeline[{i}].providers"), p.providers.as_ref())),
    );
    let mut problems = Vec::new();
    for (key, list) in lists {
        for p in list.into_iter().flatten() {
            let name = p.split(':').next().unwrap_or("");
            if !known.contains(&name) {
                problems.push(Problem {
                    key: key.clone(),
                    message: format!("unknown provider {p:?} (known: {})", known.join(", ")),
                });
            }
        }
    }
    problems
}

/// Loads every model the config names and checks each pipeline against its
/// model. Returns every problem, keyed like the config (`pipeline[0].model`).
pub fn check(config: &Config) -> Vec<Problem> {
    let mut problems = config.validate();
    problems.extend(check_providers(config));
    if problems.iter().any(|p| p.key.starts_with("pipeline")) {
        return problems;
    }
    if problems.is_empty() {
        // Reads the password and the TLS files, as `run` will.
        if let Err(message) = mqtt::connect_options(config) {
            problems.push(Problem {
                key: "broker".into(),
                message,
            });
        }
    }
    let mut registry = Registry::default();
    for (i, p) in config.pipelines.iter().enumerate() {
        match registry.get_or_load(
            &config.model_path(p),
            &crate::pipeline::engine_options(config, p),
        ) {
            Ok(model) => {
                if let Err(message) = pipeline::PipelineSpec::new(config, p, model)
                    .and_then(|_| mqtt::Route::new(config, p).map(|_| ()))
                {
                    problems.push(Problem {
                        key: format!("pipeline[{i}]"),
                        message,
                    });
                }
            }
            Err(e) => problems.push(Problem {
                key: format!("pipeline[{i}].model"),
                message: e.to_string(),
            }),
        }
    }
    problems
}

/// Runs the daemon until `shutdown` is cancelled, then stops ingest,
/// finishes queued work, publishes `offline` and returns.
///
/// The configuration is validated first (no network I/O happens when it is
/// invalid). A pipeline whose model fails to load is reported (log, health)
/// and the others keep serving.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    run_with(config, shutdown, None).await
}

/// [`run`], reloading the configuration file (`Config::source`) on each
/// message of `reloads` (SIGHUP) and on the `reload` operation. A reload
/// that touches only pipelines' models and model settings is applied in
/// place (see [`reload`]); any other change restarts the daemon's parts in
/// order, as a stop and a start would.
pub async fn run_with(
    mut config: Config,
    shutdown: CancellationToken,
    reloads: Option<flume::Receiver<()>>,
) -> Result<(), RunError> {
    let mut restarting = false;
    loop {
        match run_once(config, shutdown.clone(), reloads.clone(), restarting).await? {
            Some(next) => config = next,
            None => return Ok(()),
        }
        restarting = true;
    }
}

async fn run_once(
    config: Config,
    shutdown: CancellationToken,
    reloads: Option<flume::Receiver<()>>,
    restarting: bool,
) -> Result<Option<Config>, RunError> {
    let problems = config.validate();
    if !problems.is_empty() {
        return Err(RunError::Config(problems));
    }
    let mut options = mqtt::connect_options(&config).map_err(|message| {
        RunError::Config(vec![Problem {
            key: "broker".into(),
            message,
        }])
    })?;
    let telemetry = Arc::new(Telemetry::default());
    let spool = open_spool(&config, &telemetry, restarting)
        .await
        .map_err(|message| {
            RunError::Config(vec![Problem {
                key: "outbox.dir".into(),
                message,
            }])
        })?;
    let (outbox, outbox_rx, tracker) = mqtt::outbox(
        spool,
        mqtt::OutboxSettings {
            transient_cap: config.limits.outbox_capacity,
            limits: publish_limits(&config),
            errors_topic: format!("{}/errors", config.prefix()),
        },
        Arc::clone(&telemetry.outbox),
        Arc::clone(&telemetry.broker),
    );

    let latest = config
        .home_assistant
        .enabled
        .then(|| Arc::new(mqtt::LatestResults::default()));
    let store = open_store(&config);
    let plan = store
        .as_ref()
        .map(|s| crate::ops::prepare_start(s, &config))
        .unwrap_or_default();
    let Started(pipelines, threads, kinds, entries) =
        start_pipelines(&config, &outbox, &telemetry, latest.clone(), plan).await;
    let queue_share = apply_memory_budget(&config, &telemetry, &outbox_rx);
    // Input over broker.max_packet_bytes (and the pipelines' own limits) is
    // still read, up to what the input queues may hold, so that it can be
    // acknowledged and reported as too large instead of failing the
    // connection (see mqtt::connection).
    let ceiling = queue_share
        .max(config.broker.max_packet_bytes as u64)
        .min(MQTT_MAX_PACKET as u64) as usize;
    options.set_max_packet_size(ceiling, config.broker.max_packet_bytes);
    let mut subscriptions = subscriptions(
        pipelines
            .iter()
            .flat_map(|(route, _)| route.filters.iter().map(|f| (f.as_str(), route.qos))),
    );
    let cmd_filter = format!("{}/cmd/#", config.prefix());
    subscriptions.push((cmd_filter.clone(), QoS::AtLeastOnce));
    let (priority_tx, priority_rx) = flume::bounded(crate::ops::PRIORITY_LANE);
    let (general_tx, general_rx) = flume::bounded(crate::ops::GENERAL_LANE);
    let discovery = latest.as_ref().map(|_| crate::homeassistant::Discovery {
        discovery_prefix: config.home_assistant.discovery_prefix.clone(),
        device: config.device_id(),
        prefix: config.prefix(),
        pipelines: kinds,
    });
    let (side_tx, side_rx) = flume::bounded(16);
    let (connected_tx, connected_rx) = flume::bounded(4);
    let mut side = Vec::new();
    if let Some(d) = &discovery {
        for topic in [d.ha_status_topic(), d.topic()] {
            subscriptions.push((topic.clone(), QoS::AtMostOnce));
            side.push((topic, side_tx.clone()));
        }
    }

    // Room for a full window of publishes plus the acks of incoming messages.
    let (client, mut eventloop) = AsyncClient::new(options, 1024);
    // Results are small and latency matters: no Nagle delay.
    eventloop.network_options.set_tcp_nodelay(true);
    let status = mqtt::status_topic(&config);
    let tasks = tokio_util::task::TaskTracker::new();
    let acks_done = CancellationToken::new();
    let publisher = tasks.spawn(mqtt::publish_loop(
        client.clone(),
        outbox_rx,
        config.broker.inflight as usize,
        Duration::from_millis(config.outbox.sync_ms),
        status.clone(),
        acks_done.clone(),
    ));
    let reporter = outbox.reporter();

    let device = config.device_id();
    let prefix = config.prefix();
    let stop_health = shutdown.child_token();
    tasks.spawn(health_loop(
        Arc::clone(&telemetry),
        outbox.clone(),
        format!("{prefix}/health"),
        device.clone(),
        Duration::from_secs(config.health.interval_s),
        config.health.thermal_dir.clone(),
        stop_health.clone(),
    ));
    if config.metrics.enabled {
        start_metrics(&config, &telemetry, &tasks, stop_health.clone()).await;
    }
    if let (Some(d), Some(latest)) = (discovery, latest) {
        tasks.spawn(crate::homeassistant::run(
            d,
            outbox.clone(),
            latest,
            connected_rx,
            side_rx,
            stop_health.clone(),
        ));
    }
    let (reload_tx, reload_rx) = flume::bounded(4);
    let shared = Arc::new(crate::ops::Shared {
        config: std::sync::RwLock::new(Arc::new(config.clone())),
        pipelines: std::sync::RwLock::new(entries),
        telemetry: Arc::clone(&telemetry),
        store,
        reload: config.source.is_some().then_some(reload_tx),
    });
    let ops = crate::ops::Ops::new(
        Arc::clone(&shared),
        outbox.clone(),
        stop_health.child_token(),
    );
    tasks.spawn(ops.run(priority_rx, general_rx));
    let (restart_tx, restart_rx) = flume::bounded::<Config>(1);
    tasks.spawn(reload_loop(
        Arc::clone(&shared),
        reloads,
        reload_rx,
        restart_tx,
        stop_health.clone(),
    ));
    drop(outbox);

    let router = Router {
        pipelines,
        commands: Some(mqtt::CommandLanes {
            filter: TopicFilter::parse(&cmd_filter).map_err(RunError::Mqtt)?,
            priority: priority_tx,
            general: general_tx,
            max_bytes: crate::ops::LANE_BYTES,
            stats: Arc::clone(&telemetry.ops),
            reporter: reporter.clone(),
            reply_prefix: format!("{}/cmd/", config.prefix()),
        }),
        side,
    };
    let ctx = ConnectionContext {
        subscriptions,
        status_topic: status,
        backoff: Backoff::new(
            Duration::from_millis(config.broker.reconnect_initial_ms),
            Duration::from_millis(config.broker.reconnect_max_ms),
        ),
        stats: Arc::clone(&telemetry.broker),
        tracker,
        on_connect: Box::new(move || {
            let _ = connected_tx.try_send(());
        }),
        reporter: Some(reporter),
        acks_done,
    };
    let stop_driver = CancellationToken::new();
    let driver = tokio::spawn(mqtt::drive(
        eventloop,
        client,
        router,
        ctx,
        stop_driver.clone(),
    ));
    systemd::notify_ready();
    tracing::info!(device = %device, pipelines = config.pipelines.len(), broker = %config.broker.url, "Started");
    crate::pageout::after_loading();

    let restart = tokio::select! {
        _ = shutdown.cancelled() => None,
        next = restart_rx.recv_async() => next.ok(),
    };
    // A restart for a reload stops everything but the process, in order.
    if restart.is_some() {
        tracing::info!("Restarting to apply the new configuration");
    } else {
        systemd::notify_stopping();
        tracing::info!("Shutting down");
    }
    stop_driver.cancel();
    stop_health.cancel();
    tasks.close();
    let (abort_driver, abort_publisher) = (driver.abort_handle(), publisher.abort_handle());
    // Workers end once the poll loop drops the router (their only senders)
    // and they have emptied their queues.
    let workers_done = CancellationToken::new();
    let joiner = {
        let done = workers_done.clone();
        tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
            done.cancel();
        })
    };
    let drained = async {
        workers_done.cancelled().await;
        let _ = publisher.await;
        let _ = driver.await;
        tasks.wait().await;
    };
    if tokio::time::timeout(SHUTDOWN_GRACE, drained).await.is_err() {
        // The connection goes too (the broker publishes the Last Will): left
        // running, it would fight the next run (a reload) for the client id.
        abort_driver.abort();
        abort_publisher.abort();
        tracing::warn!(
            grace_s = SHUTDOWN_GRACE.as_secs(),
            "Shutdown grace period over; queued work abandoned (unacknowledged results stay in the outbox)"
        );
        // The workers hold the outbox (and its spool, which a restart's next
        // run opens) until they have emptied their queues; aborted tasks go
        // at their next poll.
        let waited = tokio::time::timeout(SHUTDOWN_GRACE, async {
            workers_done.cancelled().await;
            tasks.wait().await;
        })
        .await;
        if waited.is_err() {
            tracing::warn!(
                workers_done = workers_done.is_cancelled(),
                tasks = tasks.len(),
                "Parts of the stopped run are still running"
            );
        }
    }
    drop(joiner);
    tracing::info!("Stopped");
    Ok(restart)
}

/// The state directory of the operations (installed models, records), when
/// there is one.
fn open_store(config: &Config) -> Option<crate::ops::store::Store> {
    let dir = config.operations.effective_state_dir(&config.base_dir)?;
    match crate::ops::store::Store::open(&dir) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(dir = %dir.display(), error = %e, "Cannot open the operations state directory; model updates are refused");
            None
        }
    }
}

/// Applies reloads (SIGHUP, the `reload` operation) one at a time.
async fn reload_loop(
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

enum Reloaded {
    InPlace(serde_json::Value),
    Restart(Box<Config>, String),
}

/// Pipeline keys a reload applies in place (the model and what the model's
/// spec is built from); any other change needs a restart.
const IN_PLACE_KEYS: &[&str] = &[
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
async fn reload(shared: &Arc<crate::ops::Shared>) -> Result<Reloaded, Vec<String>> {
    let old = shared.config();
    let Some(path) = old.source.clone() else {
        return Err(vec!["the configuration was not loaded from a file".into()]);
    };
    let new = Config::load(&path).map_err(|e| {
        e.problems()
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
    })?;
    let mut problems: Vec<String> = new
        .validate()
        .iter()
        .chain(&check_providers(&new))
        .map(|p| p.to_string())
        .collect();
    if !problems.is_empty() {
        return Err(problems);
    }
    let as_value = |c: &Config| {
        let mut v = serde_json::to_value(c).expect("config serializes");
        let pipelines = v.as_object_mut().and_then(|o| o.remove("pipeline"));
        if let Some(o) = v.as_object_mut() {
            o.remove("operations");
        }
        (v, pipelines)
    };
    let (old_rest, old_pipes) = as_value(&old);
    let (new_rest, new_pipes) = as_value(&new);
    // A restart loads every model of the new config first (`check`), off
    // the async workers: a config that fails keeps the running one.
    let full = |why: String| {
        let candidate = new.clone();
        async move {
            let checked = tokio::task::spawn_blocking(move || (check(&candidate), candidate))
                .await
                .expect("checking a config does not panic");
            match checked {
                (problems, c) if problems.is_empty() => Ok(Reloaded::Restart(Box::new(c), why)),
                (problems, _) => Err(problems.iter().map(|p| p.to_string()).collect()),
            }
        }
    };
    if old_rest != new_rest {
        let keys: Vec<String> = old_rest
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, v)| new_rest.get(k.as_str()) != Some(v))
            .map(|(k, _)| format!("[{k}]"))
            .collect();
        return full(format!("{} changed", keys.join(", "))).await;
    }
    let list = |v: &Option<serde_json::Value>| {
        v.as_ref()
            .and_then(|v| v.as_array())
            .cloned()
            .unwrap_or_default()
    };
    let (old_pipes, new_pipes) = (list(&old_pipes), list(&new_pipes));
    if old_pipes.len() != new_pipes.len() {
        return full("pipelines were added or removed".into()).await;
    }
    let mut changed = Vec::new();
    for (i, (a, b)) in old_pipes.iter().zip(&new_pipes).enumerate() {
        let strip = |v: &serde_json::Value| {
            let mut v = v.clone();
            if let Some(o) = v.as_object_mut() {
                o.retain(|k, _| !IN_PLACE_KEYS.contains(&k.as_str()));
            }
            v
        };
        if strip(a) != strip(b) {
            return full(format!(
                "pipeline {:?} changed beyond its model settings",
                new.pipelines[i].name
            ))
            .await;
        }
        let p = &new.pipelines[i];
        let Some(entry) = shared
            .pipelines
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&p.name)
            .cloned()
        else {
            // It failed to start: a restart gives it another chance.
            return full(format!("pipeline {:?} is not running", p.name)).await;
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
    let unchanged: Vec<String> = new
        .pipelines
        .iter()
        .map(|p| p.name.clone())
        .filter(|n| !changed.iter().any(|(p, _, _)| &p.name == n))
        .collect();
    // Load everything first: a failing model keeps the whole old config.
    let mut ready = Vec::new();
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
    let mut restarted = Vec::new();
    {
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
    }
    *shared.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
    Ok(Reloaded::InPlace(
        serde_json::json!({"restarted": restarted, "unchanged": unchanged}),
    ))
}

/// Whether the model at `path` (manifest and ONNX file) is not the one
/// serving.
fn model_changed(serving: &crate::model::Model, path: &std::path::Path) -> bool {
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

/// The outbox's spool: on disk in `outbox.dir` (or the systemd state
/// directory), else in memory.
async fn open_spool(
    config: &Config,
    telemetry: &Telemetry,
    restarting: bool,
) -> Result<mqtt::spool::Spool, String> {
    let limits = mqtt::spool::SpoolLimits {
        max_bytes: config.outbox.max_mb << 20,
        ttl_ms: config.outbox.ttl_s.saturating_mul(1000),
    };
    let stats = Arc::clone(&telemetry.outbox);
    match config.outbox.effective_dir(&config.base_dir) {
        Some(dir) => {
            // On a restart for a reload, the stopped run's last holders of
            // the spool (tasks aborted at the end of the grace period) may
            // take a moment to go: wait for its lock rather than fail.
            let deadline = std::time::Instant::now() + SHUTDOWN_GRACE;
            let spool = loop {
                match mqtt::spool::Spool::open(&dir, limits, Arc::clone(&stats)) {
                    Err(e)
                        if restarting
                            && e.kind() == std::io::ErrorKind::WouldBlock
                            && std::time::Instant::now() < deadline =>
                    {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    other => break other.map_err(|e| format!("{}: {e}", dir.display()))?,
                }
            };
            telemetry
                .outbox
                .persistent
                .store(true, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(dir = %dir.display(), waiting = telemetry.outbox.queued_messages.load(std::sync::atomic::Ordering::Relaxed), "Outbox opened");
            Ok(spool)
        }
        None => Ok(mqtt::spool::Spool::in_memory(limits, stats)),
    }
}

/// The largest packet MQTT 3.1.1 can frame (a 4-byte remaining length).
const MQTT_MAX_PACKET: usize = 268_435_455 + 5;

/// What the broker takes, from the config.
pub fn publish_limits(config: &Config) -> mqtt::PublishLimits {
    mqtt::PublishLimits {
        max_topic_bytes: config.broker.max_topic_bytes,
        max_topic_levels: config.broker.max_topic_levels,
        max_packet_bytes: config.broker.max_packet_bytes,
    }
}

/// The memory budget in force: `limits.memory_mb`, lowered to 80 % of the
/// cgroup's limit when that is tighter (a unit's MemoryHigh=/MemoryMax=
/// below the budget would throttle or kill the daemon before its own
/// limits act).
pub fn memory_budget(configured: u64, cgroup_limit: Option<u64>) -> u64 {
    match cgroup_limit {
        Some(limit) if limit / 5 * 4 < configured => limit / 5 * 4,
        _ => configured,
    }
}

/// Splits what the memory budget leaves after start-up (models loaded)
/// into thirds: the input queues, an in-memory outbox, and decoding camera
/// frames (shared by the decode threads). Returns the input queues' share.
fn apply_memory_budget(
    config: &Config,
    telemetry: &Telemetry,
    outbox: &mqtt::OutboxReceiver,
) -> u64 {
    use std::sync::atomic::Ordering::Relaxed;
    let configured = config.limits.memory_mb << 20;
    let cgroup = health::cgroup_memory_limit();
    let budget = memory_budget(configured, cgroup);
    if budget < configured {
        tracing::warn!(
            memory_mb = config.limits.memory_mb,
            cgroup_limit_mib = cgroup.unwrap_or(0) >> 20,
            budget_mib = budget >> 20,
            "limits.memory_mb is above the service's memory limit; using 80 % of that limit"
        );
    }
    let rss = health::rss_bytes().unwrap_or(0);
    let left = budget.saturating_sub(rss);
    if left < budget / 4 {
        tracing::warn!(
            budget_mib = budget >> 20,
            rss_mib = rss >> 20,
            "limits.memory_mb leaves little room for queues after start-up"
        );
    }
    // A floor, so that a budget set too low still lets input through.
    let share = (left / 3).max(4 << 20);
    telemetry.input_budget.set_cap(share);
    telemetry.memory_budget.store(budget, Relaxed);
    telemetry.cgroup_limit.store(cgroup.unwrap_or(0), Relaxed);
    outbox.limit_memory(share);
    let decoders: usize = config
        .pipelines
        .iter()
        .filter(|p| p.kind == config::PipelineKind::Camera)
        .map(|p| p.workers)
        .sum();
    if decoders > 0 {
        let per_frame = (share / decoders as u64).max(8 << 20);
        telemetry.frame_budget.store(per_frame, Relaxed);
        tracing::info!(
            frame_mib = per_frame >> 20,
            decoders,
            "Camera frames: decoding one may take this much"
        );
    }
    share
}

/// One subscription per distinct filter, at the highest QoS any pipeline
/// using it asks for (the broker delivers at the subscription's QoS, so the
/// first pipeline's lower QoS must not win).
fn subscriptions<'a>(filters: impl IntoIterator<Item = (&'a str, QoS)>) -> Vec<(String, QoS)> {
    let mut subs: Vec<(String, QoS)> = Vec::new();
    for (filter, wanted) in filters {
        match subs.iter_mut().find(|(s, _)| s == filter) {
            Some((_, qos)) if wanted as u8 > *qos as u8 => *qos = wanted,
            Some(_) => {}
            None => subs.push((filter.to_owned(), wanted)),
        }
    }
    subs
}

/// Loads every model and starts each pipeline's workers. Model loading is
/// blocking work (milliseconds to seconds): it runs on the blocking pool, so
/// `run` works on any tokio runtime, current-thread included.
async fn start_pipelines(
    config: &Config,
    outbox: &Outbox,
    telemetry: &Arc<Telemetry>,
    latest: Option<Arc<mqtt::LatestResults>>,
    plan: crate::ops::StartPlan,
) -> Started {
    let (config, outbox, telemetry) = (config.clone(), outbox.clone(), Arc::clone(telemetry));
    tokio::task::spawn_blocking(move || {
        let mut registry = Registry::default();
        let mut started = Started::default();
        for p in &config.pipelines {
            let stats = telemetry.pipeline(&p.name);
            stats.disabled.store(
                plan.disabled.contains(&p.name),
                std::sync::atomic::Ordering::Relaxed,
            );
            // What Home Assistant shows as the pipeline's result; a pipeline
            // whose model fails keeps its entities (running: off).
            let mut kind = String::from("classification");
            let options = crate::pipeline::engine_options(&config, p);
            let loaded = match plan.overrides.get(&p.name) {
                Some(installed) => registry.get_or_load(installed, &options).or_else(|e| {
                    tracing::error!(pipeline = %p.name, error = %e, "Installed model does not load; serving the configured one");
                    registry.get_or_load(&config.model_path(p), &options)
                }),
                None => registry.get_or_load(&config.model_path(p), &options),
            };
            let result = loaded
                .map_err(|e| e.to_string())
                .and_then(|model| {
                    let placement = &model.placement;
                    tracing::info!(pipeline = %p.name, model = %model.name, sha256 = %model.sha256, load_ms = model.load_ms, runs_on = %placement.runs_on, reason = %placement.reason, "Model loaded");
                    for passed in &placement.passed_over {
                        tracing::info!(pipeline = %p.name, model = %model.name, "Engine passed over: {passed}");
                    }
                    *telemetry.model(&model.name).placement.lock().expect("telemetry lock") = Some(placement.clone());
                    kind = format!("{:?}", model.manifest.output.kind).to_lowercase();
                    let spec = pipeline::PipelineSpec::new(&config, p, model)?;
                    let route = Arc::new(mqtt::Route::new(&config, p)?);
                    let sink = Arc::new(mqtt::PipelineSink {
                        route: Arc::clone(&route),
                        errors_topic: format!("{}/errors", config.prefix()),
                        outbox: outbox.clone(),
                        latest: latest.clone(),
                    });
                    let (handle, threads) =
                        pipeline::start(spec, p.queue, p.workers, sink, &telemetry)?;
                    Ok((route, handle, threads))
                });
            started.2.push((p.name.clone(), kind));
            match result {
                Ok((route, handle, threads)) => {
                    started.3.insert(
                        p.name.clone(),
                        crate::ops::Entry {
                            config: p.clone(),
                            control: Arc::clone(&handle.control),
                            stats: Arc::clone(&handle.stats),
                        },
                    );
                    let inlet: Arc<dyn flow::Inlet> = Arc::new(handle);
                    started.0.push((route, inlet));
                    started.1.extend(threads);
                }
                Err(e) => {
                    tracing::error!(pipeline = %p.name, error = %e, "Pipeline disabled");
                    *stats.failed.lock().expect("stats lock") = Some(e);
                }
            }
        }
        *telemetry.onnxruntime.lock().expect("telemetry lock") = crate::model::backend::runtime_seen();
        started
    })
    .await
    .expect("pipeline start-up does not panic: model panics are caught")
}

/// Running pipelines and their worker threads.
#[derive(Default)]
struct Started(
    Vec<(Arc<mqtt::Route>, Arc<dyn flow::Inlet>)>,
    Vec<std::thread::JoinHandle<()>>,
    /// Every configured pipeline and its output kind, for Home Assistant.
    Vec<(String, String)>,
    /// The running pipelines, for the operations.
    std::collections::BTreeMap<String, crate::ops::Entry>,
);

/// Binds `metrics.listen` and serves /metrics until `stop`. A port that
/// cannot be bound is logged; the daemon runs on without metrics.
async fn start_metrics(
    config: &Config,
    telemetry: &Arc<Telemetry>,
    tasks: &tokio_util::task::TaskTracker,
    stop: CancellationToken,
) {
    let listen = &config.metrics.listen;
    match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => {
            tracing::info!(listen = %listen, "Serving /metrics");
            let registry = Arc::new(crate::metrics::registry(Arc::clone(telemetry)));
            tasks.spawn(crate::metrics::serve(
                listener,
                registry,
                config.metrics.max_connections,
                stop,
            ));
        }
        Err(e) => tracing::error!(listen = %listen, error = %e, "Cannot serve /metrics"),
    }
}

async fn health_loop(
    telemetry: Arc<Telemetry>,
    outbox: Outbox,
    topic: String,
    device: String,
    every: Duration,
    thermal_dir: std::path::PathBuf,
    stop: CancellationToken,
) {
    let mut sampler = SystemSampler::new(&thermal_dir);
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watchdog = systemd::watchdog_interval().map(tokio::time::interval);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = ticker.tick() => {
                let snapshot = telemetry.snapshot(&device, &mut sampler);
                let budget = telemetry.memory_budget.load(std::sync::atomic::Ordering::Relaxed);
                if budget > 0 && snapshot.memory.rss_bytes > budget {
                    tracing::warn!(rss_mib = snapshot.memory.rss_bytes >> 20, budget_mib = budget >> 20, "Process memory over limits.memory_mb");
                }
                let payload = serde_json::to_vec(&snapshot).expect("health serializes");
                let _ = outbox.offer(Outgoing { topic: topic.clone(), payload, qos: QoS::AtMostOnce, retain: false });
            }
            _ = async { watchdog.as_mut().expect("guarded").tick().await }, if watchdog.is_some() => {
                systemd::notify_watchdog();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tighter_cgroup_limit_lowers_the_budget() {
        assert_eq!(memory_budget(128 << 20, None), 128 << 20);
        assert_eq!(memory_budget(128 << 20, Some(192 << 20)), 128 << 20);
        // 256 MiB configured under a 192 MiB MemoryMax: 80 % of 192.
        assert_eq!(
            memory_budget(256 << 20, Some(192 << 20)),
            (192 << 20) / 5 * 4
        );
    }

    #[test]
    fn shared_filters_subscribe_once_at_the_highest_qos() {
        let subs = subscriptions([
            ("a/+", QoS::AtMostOnce),
            ("b/#", QoS::AtLeastOnce),
            ("a/+", QoS::AtLeastOnce),
            ("b/#", QoS::AtMostOnce),
        ]);
        assert_eq!(
            subs,
            vec![
                ("a/+".to_string(), QoS::AtLeastOnce),
                ("b/#".to_string(), QoS::AtLeastOnce)
            ]
        );
    }
}
