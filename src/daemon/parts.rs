//! The parts a run starts: the outbox and its spool, the operations'
//! store, the pipelines (off the async workers), the memory budget, the
//! subscriptions, /metrics and the health loop.

use super::*;

/// The state directory of the operations (installed models, records), when
/// there is one.
pub(super) fn open_store(config: &Config) -> Option<crate::ops::store::Store> {
    let dir = config.effective().state_dir.clone()?;
    match crate::ops::store::Store::open(&dir) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(dir = %dir.display(), error = %e, "Cannot open the operations state directory; model updates are refused");
            None
        }
    }
}

/// The outbox's spool: on disk in `outbox.dir` (or the systemd state
/// directory), else in memory.
pub(super) async fn open_spool(
    config: &Config,
    telemetry: &Telemetry,
    restarting: bool,
) -> Result<mqtt::spool::Spool, String> {
    let limits = mqtt::spool::SpoolLimits {
        max_bytes: config.outbox.max_mb << 20,
        ttl_ms: config.outbox.ttl_s.saturating_mul(1000),
    };
    let stats = Arc::clone(&telemetry.outbox);
    match config.effective().spool_dir.clone() {
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
pub(super) const MQTT_MAX_PACKET: usize = 268_435_455 + 5;

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
pub(super) fn apply_memory_budget(
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
pub(super) fn subscriptions<'a>(
    filters: impl IntoIterator<Item = (&'a str, QoS)>,
) -> Vec<(String, QoS)> {
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
pub(super) async fn start_pipelines(
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
pub(super) struct Started(
    pub Vec<(Arc<mqtt::Route>, Arc<dyn flow::Inlet>)>,
    pub Vec<std::thread::JoinHandle<()>>,
    /// Every configured pipeline and its output kind, for Home Assistant.
    pub Vec<(String, String)>,
    /// The running pipelines, for the operations.
    pub std::collections::BTreeMap<String, crate::ops::Entry>,
);

/// Binds `metrics.listen` and serves /metrics until `stop`. A port that
/// cannot be bound is logged; the daemon runs on without metrics.
pub(super) async fn start_metrics(
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

pub(super) async fn health_loop(
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
