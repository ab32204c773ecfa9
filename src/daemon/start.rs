//! One run of the daemon, start to stop: the outbox, the pipelines, the
//! services beside them (health, /metrics, Home Assistant, the operations,
//! reloads) and the connection that joins them to the broker; then the
//! stop, in order.

use super::*;
use bytes::Bytes;
use tokio_util::task::TaskTracker;

/// A started run: what its stop needs.
pub(super) struct Running {
    tasks: TaskTracker,
    driver: tokio::task::JoinHandle<()>,
    publisher: tokio::task::JoinHandle<()>,
    threads: Vec<std::thread::JoinHandle<()>>,
    stop_driver: CancellationToken,
    stop_services: CancellationToken,
    /// A reload that needs a restart sends the new configuration here.
    pub restart: flume::Receiver<Config>,
}

/// What the poll loop hands to the services: the command lanes, Home
/// Assistant's topics, a signal per connection; and what it subscribes to
/// for them.
struct Inbound {
    priority: flume::Sender<(String, Bytes)>,
    general: flume::Sender<(String, Bytes)>,
    side: Vec<(String, flume::Sender<(String, Bytes)>)>,
    subscriptions: Vec<(String, QoS)>,
    connected: flume::Sender<()>,
}

/// What the services are started with.
struct Services {
    telemetry: Arc<Telemetry>,
    latest: Option<Arc<mqtt::LatestResults>>,
    /// Every configured pipeline and its output kind, for Home Assistant.
    kinds: Vec<(String, String)>,
    entries: std::collections::BTreeMap<String, crate::ops::Entry>,
    store: Option<crate::ops::store::Store>,
    reloads: Option<flume::Receiver<()>>,
}

fn config_error(key: &str) -> impl Fn(String) -> RunError + '_ {
    move |message| {
        RunError::Config(vec![Problem {
            key: key.into(),
            message,
        }])
    }
}

/// Starts a run of a validated configuration; it is online (or trying to
/// be) when this returns.
pub(super) async fn start(
    config: Config,
    shutdown: &CancellationToken,
    reloads: Option<flume::Receiver<()>>,
    restarting: bool,
) -> Result<Running, RunError> {
    let mut options = mqtt::connect_options(&config).map_err(config_error("broker"))?;
    let telemetry = Arc::new(Telemetry::default());
    let spool = open_spool(&config, &telemetry, restarting)
        .await
        .map_err(config_error("outbox.dir"))?;
    let (outbox, outbox_rx, tracker) = mqtt::outbox(
        spool,
        mqtt::OutboxSettings {
            transient_cap: config.limits.outbox_capacity,
            limits: config.effective().publish_limits,
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

    // Room for a full window of publishes plus the acks of incoming messages.
    let (client, mut eventloop) = AsyncClient::new(options, 1024);
    // Results are small and latency matters: no Nagle delay.
    eventloop.network_options.set_tcp_nodelay(true);
    let status = mqtt::status_topic(&config);
    let tasks = TaskTracker::new();
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
    let stop_services = shutdown.child_token();
    let services = Services {
        telemetry: Arc::clone(&telemetry),
        latest,
        kinds,
        entries,
        store,
        reloads,
    };
    let (inbound, restart) =
        spawn_services(&config, services, outbox, &tasks, &stop_services).await;

    let mut subscriptions = subscriptions(
        pipelines
            .iter()
            .flat_map(|(route, _)| route.filters.iter().map(|f| (f.as_str(), route.qos))),
    );
    subscriptions.extend(inbound.subscriptions);
    let cmd_filter = format!("{}/cmd/#", config.prefix());
    let router = Router {
        pipelines,
        commands: Some(mqtt::CommandLanes {
            filter: TopicFilter::parse(&cmd_filter).map_err(RunError::Mqtt)?,
            priority: inbound.priority,
            general: inbound.general,
            max_bytes: crate::ops::LANE_BYTES,
            stats: Arc::clone(&telemetry.ops),
            reporter: reporter.clone(),
            reply_prefix: format!("{}/cmd/", config.prefix()),
        }),
        side: inbound.side,
    };
    let connected = inbound.connected;
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
            let _ = connected.try_send(());
        }),
        reporter: Some(reporter),
        acks_done,
    };
    let stop_driver = CancellationToken::new();
    let driver = tokio::spawn(mqtt::drive_connection(
        eventloop,
        client,
        router,
        ctx,
        stop_driver.clone(),
    ));
    systemd::notify_ready();
    tracing::info!(device = %config.device_id(), pipelines = config.pipelines.len(), broker = %config.broker.url, "Started");
    crate::pageout::after_loading();
    Ok(Running {
        tasks,
        driver,
        publisher,
        threads,
        stop_driver,
        stop_services,
        restart,
    })
}

/// Starts health, /metrics, Home Assistant, the operations and the reload
/// loop; returns what the poll loop feeds them, and where a reload that
/// needs a restart says so. Takes the outbox: the publisher ends when the
/// last holder of one is gone.
async fn spawn_services(
    config: &Config,
    s: Services,
    outbox: Outbox,
    tasks: &TaskTracker,
    stop: &CancellationToken,
) -> (Inbound, flume::Receiver<Config>) {
    let prefix = config.prefix();
    tasks.spawn(health_loop(
        Arc::clone(&s.telemetry),
        outbox.clone(),
        format!("{prefix}/health"),
        config.device_id(),
        Duration::from_secs(config.health.interval_s),
        config.health.thermal_dir.clone(),
        stop.clone(),
    ));
    if config.metrics.enabled {
        start_metrics(config, &s.telemetry, tasks, stop.clone()).await;
    }
    let (side_tx, side_rx) = flume::bounded(16);
    let (connected, connected_rx) = flume::bounded(4);
    let (priority, priority_rx) = flume::bounded(crate::ops::PRIORITY_LANE);
    let (general, general_rx) = flume::bounded(crate::ops::GENERAL_LANE);
    let mut inbound = Inbound {
        priority,
        general,
        side: Vec::new(),
        subscriptions: vec![(format!("{prefix}/cmd/#"), QoS::AtLeastOnce)],
        connected,
    };
    if let Some(latest) = s.latest {
        let discovery = crate::homeassistant::Discovery {
            discovery_prefix: config.home_assistant.discovery_prefix.clone(),
            device: config.device_id(),
            prefix: prefix.clone(),
            pipelines: s.kinds,
        };
        for topic in [discovery.ha_status_topic(), discovery.topic()] {
            inbound.subscriptions.push((topic.clone(), QoS::AtMostOnce));
            inbound.side.push((topic, side_tx.clone()));
        }
        tasks.spawn(crate::homeassistant::run(
            discovery,
            outbox.clone(),
            latest,
            connected_rx,
            side_rx,
            stop.clone(),
        ));
    }
    let (reload_tx, reload_rx) = flume::bounded(4);
    let shared = Arc::new(crate::ops::Shared {
        config: std::sync::RwLock::new(Arc::new(config.clone())),
        pipelines: std::sync::RwLock::new(s.entries),
        telemetry: Arc::clone(&s.telemetry),
        store: s.store,
        reload: config.source.is_some().then_some(reload_tx),
    });
    let ops = crate::ops::Ops::new(Arc::clone(&shared), outbox, stop.child_token());
    tasks.spawn(ops.run(priority_rx, general_rx));
    let (restart_tx, restart_rx) = flume::bounded::<Config>(1);
    tasks.spawn(reload_loop(
        shared,
        s.reloads,
        reload_rx,
        restart_tx,
        stop.clone(),
    ));
    (inbound, restart_rx)
}

impl Running {
    /// Stops the run in order: ingest first (the workers end once the poll
    /// loop drops the router, their only sender, and they have emptied
    /// their queues), then the publisher once everything is sent, within
    /// [`SHUTDOWN_GRACE`]; past it, what is left is abandoned (the spool
    /// keeps unacknowledged results).
    pub(super) async fn stop(self) {
        let Running {
            tasks,
            driver,
            publisher,
            threads,
            stop_driver,
            stop_services,
            restart: _,
        } = self;
        stop_driver.cancel();
        stop_services.cancel();
        tasks.close();
        let (abort_driver, abort_publisher) = (driver.abort_handle(), publisher.abort_handle());
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
            // The connection goes too (the broker publishes the Last Will):
            // left running, it would fight the next run (a reload) for the
            // client id.
            abort_driver.abort();
            abort_publisher.abort();
            tracing::warn!(
                grace_s = SHUTDOWN_GRACE.as_secs(),
                "Shutdown grace period over; queued work abandoned (unacknowledged results stay in the outbox)"
            );
            // The workers hold the outbox (and its spool, which a restart's
            // next run opens) until they have emptied their queues; aborted
            // tasks go at their next poll.
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
    }
}
