//! Fault tests against a real mosquitto: a broker restart and a SIGKILL in
//! the middle of QoS 1 streams (nothing accepted is lost; duplicates are
//! counted), and a burst against a slow model (memory stays within the
//! budget, drops are counted, nothing panics). Each prints its counts.
mod common;

use common::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn batch(ts: u64, samples: &[Vec<f32>]) -> Vec<u8> {
    serde_json::json!({ "ts": ts, "samples": samples })
        .to_string()
        .into_bytes()
}

/// One window (and so one result) per message; results at QoS 1.
fn full_window_pipeline() -> String {
    format!(
        r#"
[[pipeline]]
name = "activity"
kind = "sensor"
topics = ["sensors/+/imu"]
model = "{}"
window = {{ size = 50, stride = 50 }}
results = "edgeinfer/{{device}}/results/activity/{{1}}"
qos = 1
queue = 100000
"#,
        repo().join("models/activity.toml").display()
    )
}

/// A publisher with a persistent session that keeps publishing across
/// broker restarts; counts the broker's PUBACKs.
struct Publisher {
    client: AsyncClient,
    acked: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher {
    fn connect(port: u16, id: &str) -> Publisher {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_clean_session(false);
        o.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut ev) = AsyncClient::new(o, 1000);
        let acked = Arc::new(AtomicU64::new(0));
        let count = Arc::clone(&acked);
        let task = tokio::spawn(async move {
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Publisher {
            client,
            acked,
            task,
        }
    }
}

impl Publisher {
    /// Publishes `n` QoS 1 inputs (one full window each, `ts` = index) over
    /// `devices` topics, in the background.
    fn stream(
        &self,
        n: usize,
        devices: usize,
        input: Vec<Vec<f32>>,
    ) -> tokio::task::JoinHandle<()> {
        self.stream_from(0, n, devices, input)
    }

    /// Like `stream`, with ids (`ts`) `first..first + n`.
    fn stream_from(
        &self,
        first: usize,
        n: usize,
        devices: usize,
        input: Vec<Vec<f32>>,
    ) -> tokio::task::JoinHandle<()> {
        let client = self.client.clone();
        tokio::spawn(async move {
            for i in first..first + n {
                client
                    .publish(
                        format!("sensors/dev-{}/imu", i % devices),
                        QoS::AtLeastOnce,
                        false,
                        batch(i as u64, &input),
                    )
                    .await
                    .unwrap();
            }
        })
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Results by input id (the `ts` each input carried), and by the device
/// (daemon) that published them.
struct Tally {
    by_ts: HashMap<u64, u32>,
    by_device: HashMap<String, u64>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            by_ts: HashMap::new(),
            by_device: HashMap::new(),
        }
    }
    fn add(&mut self, m: &Seen) {
        let ts = m.json()["ts"].as_u64().expect("result has ts");
        *self.by_ts.entry(ts).or_default() += 1;
        let device = m.topic.split('/').nth(1).unwrap_or("").to_owned();
        *self.by_device.entry(device).or_default() += 1;
    }
    /// Collects results until `n` distinct inputs have one (`what` in the
    /// panic if they stop coming).
    async fn wait_for(&mut self, obs: &mut Observer, n: usize, what: &str) {
        while self.distinct() < n {
            let m = obs
                .next_where(Duration::from_secs(60), |m| m.topic.contains("/results/"))
                .await
                .unwrap_or_else(|| panic!("results flow {what}"));
            self.add(&m);
        }
    }
    fn distinct(&self) -> usize {
        self.by_ts.len()
    }
    fn total(&self) -> u64 {
        self.by_ts.values().map(|n| *n as u64).sum()
    }
    /// Collects from `obs` until every id in `0..n` has a result or `timeout`.
    async fn fill(&mut self, obs: &mut Observer, n: usize, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.distinct() < n {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match obs
                .next_where(left, |m| m.topic.contains("/results/"))
                .await
            {
                Some(m) => self.add(&m),
                None => break,
            }
        }
        // Late duplicates still in flight.
        while let Some(m) = obs
            .next_where(Duration::from_millis(500), |m| {
                m.topic.contains("/results/")
            })
            .await
        {
            self.add(&m);
        }
    }
    fn report(&self, what: &str, sent: usize) -> usize {
        self.report_range(what, 0..sent as u64)
    }
    fn report_range(&self, what: &str, ids: std::ops::Range<u64>) -> usize {
        let sent = ids.end - ids.start;
        let lost = ids.filter(|ts| !self.by_ts.contains_key(ts)).count();
        println!(
            "{what}: sent {sent}, results {}, distinct {}, duplicates {}, lost {lost}",
            self.total(),
            self.distinct(),
            self.total() - self.distinct() as u64
        );
        lost
    }
}

/// The stream tests run one at a time: each runs daemons, a broker and a
/// load generator, and on CI's 2 cores several at once starved each other
/// past their timeouts (a reload's daemon not online within 30 s).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_stream_loses_no_input() {
    let _turn = ONE_AT_A_TIME.lock().await;
    const N: usize = 10_000;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_default())
        .try_init();
    let mut broker = Mosquitto::start_persistent();
    let spool = tempfile::tempdir().unwrap();
    let extra = format!(
        "{}\n[outbox]\ndir = \"{}\"\n",
        full_window_pipeline(),
        spool.path().display()
    );
    let mut obs = Observer::connect_as(
        broker.port,
        &["edgeinfer/gw-rs/results/#"],
        "observer-restart",
        false,
    )
    .await;
    let daemon = Daemon::start_online(
        parse(&config_text(&broker.url(), "gw-rs", &extra)),
        broker.port,
    )
    .await;
    let publisher = Publisher::connect(broker.port, "publisher-restart");
    let sender = publisher.stream(N, 10, activity_reference().cases[0].input.clone());
    let mut tally = Tally::new();
    // Restart the broker once part of the stream went through.
    tally.wait_for(&mut obs, N / 4, "before the restart").await;
    let before = tally.distinct();
    let broker = tokio::task::spawn_blocking(move || {
        broker.restart_gracefully(Duration::from_millis(1500));
        broker
    })
    .await
    .unwrap();
    sender.await.unwrap();
    tally.fill(&mut obs, N, Duration::from_secs(180)).await;
    let lost = tally.report("broker restart", N);
    println!(
        "broker restart: {before} distinct results before the restart; publisher saw {} PUBACKs",
        publisher.acked.load(Ordering::Relaxed)
    );
    let mut health = Observer::connect(broker.port, &["edgeinfer/gw-rs/health"]).await;
    let h = health
        .next_where(Duration::from_secs(5), |_| true)
        .await
        .expect("health")
        .json();
    let p = &h["pipelines"]["activity"];
    // Duplicate inputs come from the broker (redelivery of its restored
    // queue); results beyond the inputs from the outbox's replay.
    println!(
        "broker restart: the daemon received {} inputs, produced {} results; reconnects {}",
        p["received"], p["results"], h["broker"]["reconnects"]
    );
    assert!(p["received"].as_u64().unwrap() >= N as u64);
    assert_eq!(lost, 0, "every input has a result after the broker restart");
    daemon.stop().await;
}

fn write_config(dir: &Path, port: u16, device: &str, extra: &str) -> std::path::PathBuf {
    let path = dir.join("edgeinfer.toml");
    let text = format!(
        "[device]\nid = \"{device}\"\n[broker]\nurl = \"mqtt://127.0.0.1:{port}\"\nreconnect_initial_ms = 100\nreconnect_max_ms = 1000\n[health]\ninterval_s = 1\n{extra}"
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn spawn_daemon(config: &Path, log: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_edgeinfer"))
        .args(["run", "-c"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// Starts the daemon binary and waits for its retained `online` (seen by
/// `obs`, which must be subscribed to the status topic).
async fn spawn_online(config: &Path, log: &Path, obs: &mut Observer) -> Child {
    let child = spawn_daemon(config, log);
    assert!(
        obs.next_where(Duration::from_secs(30), |m| m.text() == "online")
            .await
            .is_some(),
        "the daemon came online ({})",
        log.display()
    );
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_no_acknowledged_input() {
    let _turn = ONE_AT_A_TIME.lock().await;
    const N: usize = 3_000;
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "[outbox]\ndir = \"{}\"\n{}",
        dir.path().join("outbox").display(),
        full_window_pipeline()
    );
    let config = write_config(dir.path(), broker.port, "gw-kill", &extra);
    let mut obs = Observer::connect(
        broker.port,
        &["edgeinfer/gw-kill/results/#", "edgeinfer/gw-kill/status"],
    )
    .await;
    let mut child = spawn_online(&config, &dir.path().join("first.log"), &mut obs).await;
    let publisher = Publisher::connect(broker.port, "publisher-kill");
    let sender = publisher.stream(N, 7, activity_reference().cases[1].input.clone());
    let mut tally = Tally::new();
    tally.wait_for(&mut obs, N / 5, "before the kill").await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let before = tally.distinct();
    sender.await.unwrap();
    // The broker queues the rest for the daemon's persistent session.
    let mut child = spawn_daemon(&config, &dir.path().join("second.log"));
    tally.fill(&mut obs, N, Duration::from_secs(120)).await;
    let second = std::fs::read_to_string(dir.path().join("second.log")).unwrap();
    let reopened = second
        .lines()
        .find(|l| l.contains("Outbox opened"))
        .unwrap_or("")
        .to_owned();
    let lost = tally.report("SIGKILL", N);
    println!("SIGKILL: {before} distinct results before the kill; second run: {reopened}");
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    child.wait().unwrap();
    assert!(!second.contains("panicked"), "{second}");
    assert_eq!(lost, 0, "every input has a result after the restart");
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

/// A reload (SIGHUP) that restarts the daemon's parts and a clean stop
/// (SIGTERM) in the middle of a QoS 1 stream: every input is answered. Both signals come while a proxy
/// withholds the broker's PUBACKs, so the stopping daemon waits out its
/// grace period with input still arriving (as it does, for milliseconds, on
/// any stop): before the fix, the poll loop acknowledged that input without
/// handling it, and the broker forgot it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_and_clean_stop_mid_stream_lose_no_input() {
    let _turn = ONE_AT_A_TIME.lock().await;
    const N: usize = 3_000;
    let broker = Mosquitto::start();
    let proxy = AckHoldingProxy::start(broker.port).await;
    let hold = |on: bool| proxy.hold.store(on, Ordering::Relaxed);
    let dir = tempfile::tempdir().unwrap();
    // A model slow enough (0.6 ms a window) that the broker holds a backlog
    // and keeps its in-flight window (20) full when the signals come.
    let extra = format!(
        r#"[outbox]
dir = "{}"
[[pipeline]]
name = "slow"
kind = "sensor"
topics = ["sensors/+/imu"]
model = "{}"
window = {{ size = 64, stride = 64 }}
qos = 1
"#,
        dir.path().join("outbox").display(),
        repo().join("tests/fixtures/slow.onnx").display()
    );
    let config = write_config(dir.path(), proxy.port, "gw-stop", &extra);
    let mut obs = Observer::connect(
        broker.port,
        &["edgeinfer/gw-stop/results/#", "edgeinfer/gw-stop/status"],
    )
    .await;
    let mut child = spawn_online(&config, &dir.path().join("first.log"), &mut obs).await;
    let publisher = Publisher::connect(broker.port, "publisher-stop");
    let sender = publisher.stream(N, 7, slow_window());
    let mut tally = Tally::new();
    tally.wait_for(&mut obs, N / 5, "before the reload").await;
    hold(true);
    // A connection-level change: the reload restarts the daemon's parts
    // (a change to models alone would be applied in place, with no stop).
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("interval_s = 1", "interval_s = 2")).unwrap();
    signal(&child, "HUP");
    let at_reload = tally.distinct();
    tokio::time::sleep(Duration::from_secs(3)).await;
    hold(false);
    // The old run gives up on the withheld PUBACKs after its grace period
    // (its results stay in the spool); the new one comes online.
    let mut reloaded = Vec::new();
    while !reloaded.iter().any(|m: &Seen| m.text() == "online") {
        let m = obs
            .next_where(Duration::from_secs(30), |m| {
                m.topic.ends_with("/status") || m.topic.contains("/results/")
            })
            .await
            .unwrap_or_else(|| {
                panic!(
                    "the reloaded daemon comes online: {}",
                    std::fs::read_to_string(dir.path().join("first.log")).unwrap_or_default()
                )
            });
        if m.topic.contains("/results/") {
            tally.add(&m);
        } else {
            reloaded.push(m);
        }
    }
    tally.wait_for(&mut obs, N / 2, "after the reload").await;
    hold(true);
    signal(&child, "TERM");
    let at_stop = tally.distinct();
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "clean stop: {status}");
    hold(false);
    sender.await.unwrap();
    let mut child = spawn_daemon(&config, &dir.path().join("second.log"));
    tally.fill(&mut obs, N, Duration::from_secs(120)).await;
    let lost = tally.report("reload and stop", N);
    println!("reload and stop: {at_reload} distinct results at the reload, {at_stop} at the stop");
    signal(&child, "TERM");
    child.wait().unwrap();
    let first = std::fs::read_to_string(dir.path().join("first.log")).unwrap();
    assert!(first.contains("Reloading configuration"), "{first}");
    assert!(!first.contains("panicked"), "{first}");
    assert_eq!(
        lost, 0,
        "every input has a result across the reload and the stop"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_against_a_slow_model_stays_within_the_memory_budget() {
    let _turn = ONE_AT_A_TIME.lock().await;
    const N: usize = 100_000;
    const BUDGET_MB: u64 = 96;
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        r#"
[limits]
memory_mb = {BUDGET_MB}
[[pipeline]]
name = "slow"
kind = "sensor"
topics = ["burst/+"]
model = "{}"
window = {{ size = 64, stride = 64 }}
qos = 0
queue = 1000000
"#,
        repo().join("tests/fixtures/slow.onnx").display()
    );
    let config = write_config(dir.path(), broker.port, "gw-burst", &extra);
    let mut obs = Observer::connect(
        broker.port,
        &["edgeinfer/gw-burst/status", "edgeinfer/gw-burst/health"],
    )
    .await;
    let mut child = spawn_online(&config, &dir.path().join("burst.log"), &mut obs).await;
    // 64 samples × 8 channels per message: ~4 KB of JSON, 0.6 ms of model.
    let payload = batch(1, &slow_window());
    let mut o = MqttOptions::new("burst", "127.0.0.1", broker.port);
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut ev) = AsyncClient::new(o, 10_000);
    let poller = tokio::spawn(async move { while ev.poll().await.is_ok() {} });
    for i in 0..N {
        client
            .publish(
                format!("burst/{}", i % 16),
                QoS::AtMostOnce,
                false,
                payload.clone(),
            )
            .await
            .unwrap();
    }
    // Wait until the daemon has seen the whole burst (received + what
    // mosquitto dropped never arrives: stop when `received` stays put).
    let mut last = (0u64, 0u64, 0u64);
    let mut still = 0;
    while still < 3 {
        let h = obs
            .next_where(Duration::from_secs(10), |m| m.topic.ends_with("/health"))
            .await
            .expect("health keeps coming during the burst")
            .json();
        let p = &h["pipelines"]["slow"];
        let now = (
            p["received"].as_u64().unwrap(),
            p["dropped"].as_u64().unwrap(),
            p["processed"].as_u64().unwrap(),
        );
        still = if now.0 == last.0 { still + 1 } else { 0 };
        last = now;
    }
    let peak = vm_hwm_bytes(child.id());
    let (received, dropped, processed) = last;
    println!(
        "burst: sent {N}, received {received}, dropped {dropped}, processed so far {processed}, peak RSS {:.1} MiB (budget {BUDGET_MB} MiB)",
        peak as f64 / (1 << 20) as f64
    );
    poller.abort();
    // Still serving: it answers a ping.
    let mut replies = Observer::connect(broker.port, &["edgeinfer/gw-burst/cmd/ping/reply"]).await;
    replies.publish("edgeinfer/gw-burst/cmd/ping", "").await;
    assert!(
        replies
            .next_where(Duration::from_secs(30), |_| true)
            .await
            .is_some(),
        "answers a ping after the burst"
    );
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let status = child.wait().unwrap();
    let log = std::fs::read_to_string(dir.path().join("burst.log")).unwrap();
    assert!(!log.contains("panicked"), "{log}");
    assert!(
        status.success(),
        "clean exit after the burst: {status}\n{log}"
    );
    assert!(
        dropped > 0,
        "a slow model under a burst drops (and counts) input"
    );
    assert!(received > 0 && processed > 0);
    assert!(
        peak < BUDGET_MB << 20,
        "peak RSS {peak} over the {BUDGET_MB} MiB budget"
    );
}

/// Issue #17: two daemons share one QoS 1 stream through
/// `$share/edge/sensors/+/imu` (one window per message). Every input is
/// answered exactly once across both; then one daemon is SIGKILLed in the
/// middle of a second stream and restarted, as systemd would: its persistent
/// session kept what the broker had given it, so nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_share_a_stream_exactly_once_and_a_killed_one_loses_nothing() {
    let _turn = ONE_AT_A_TIME.lock().await;
    const N: usize = 2_000;
    let broker = Mosquitto::start();
    let shared = full_window_pipeline().replace(
        "topics = [\"sensors/+/imu\"]",
        "topics = [\"$share/edge/sensors/+/imu\"]",
    );
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let configs: Vec<_> = ["gw-a", "gw-b"]
        .iter()
        .zip(&dirs)
        .map(|(device, dir)| {
            let extra = format!(
                "[outbox]\ndir = \"{}\"\n{shared}",
                dir.path().join("outbox").display()
            );
            write_config(dir.path(), broker.port, device, &extra)
        })
        .collect();
    let mut obs = Observer::connect(
        broker.port,
        &["edgeinfer/+/results/#", "edgeinfer/+/status"],
    )
    .await;
    let mut daemons = Vec::new();
    for (device, (config, dir)) in ["gw-a", "gw-b"].iter().zip(configs.iter().zip(&dirs)) {
        let child = spawn_daemon(config, &dir.path().join("first.log"));
        let status = format!("edgeinfer/{device}/status");
        assert!(
            obs.next_where(Duration::from_secs(30), |m| m.topic == status
                && m.text() == "online")
                .await
                .is_some(),
            "{device} came online"
        );
        daemons.push(child);
    }
    let input = activity_reference().cases[1].input.clone();
    let publisher = Publisher::connect(broker.port, "publisher-share");

    // Both running: exactly once.
    let sender = publisher.stream(N, 7, input.clone());
    let mut tally = Tally::new();
    tally.fill(&mut obs, N, Duration::from_secs(120)).await;
    sender.await.unwrap();
    let by_daemon = tally.by_device.clone();
    let lost = tally.report("$share, both running", N);
    println!("$share, both running: answered by {by_daemon:?}");
    assert_eq!(lost, 0);
    assert_eq!(
        tally.total(),
        N as u64,
        "every input answered exactly once across both"
    );
    for device in ["gw-a", "gw-b"] {
        assert!(
            by_daemon.get(device).copied().unwrap_or(0) > N as u64 / 10,
            "{device} took a share: {by_daemon:?}"
        );
    }

    // One SIGKILLed mid-stream, restarted: nothing lost.
    let mut tally = Tally::new();
    let sender = publisher.stream_from(N, N, 7, input);
    tally.wait_for(&mut obs, N / 5, "before the kill").await;
    daemons[0].kill().unwrap(); // SIGKILL
    daemons[0].wait().unwrap();
    sender.await.unwrap();
    daemons[0] = spawn_daemon(&configs[0], &dirs[0].path().join("second.log"));
    // A fresh tally: its ids are N..2N.
    tally.fill(&mut obs, N, Duration::from_secs(120)).await;
    let lost = tally.report_range(
        "$share, gw-a SIGKILLed and restarted",
        N as u64..2 * N as u64,
    );
    for child in &daemons {
        signal(child, "TERM");
    }
    for child in &mut daemons {
        child.wait().unwrap();
    }
    assert_eq!(lost, 0, "no input lost across the kill");
}

/// Under the template unit (`edgeinfer@line1`, which sets
/// `EDGEINFER_INSTANCE=line1`) a config without `device.id` gets
/// "<hostname>-line1": its own client id and topics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_instance_without_a_device_id_gets_its_own_topics() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("line1.toml");
    std::fs::write(
        &config,
        format!(
            "[broker]\nurl = \"mqtt://127.0.0.1:{}\"\n{}",
            broker.port,
            full_window_pipeline()
        ),
    )
    .unwrap();
    let mut obs = Observer::connect(broker.port, &["edgeinfer/+/status"]).await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgeinfer"))
        .args(["run", "-c"])
        .arg(&config)
        .env("EDGEINFER_INSTANCE", "line1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let online = obs
        .next_where(Duration::from_secs(30), |m| m.text() == "online")
        .await
        .expect("the instance came online");
    signal(&child, "TERM");
    child.wait().unwrap();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(
        online.topic,
        format!("edgeinfer/{}-line1/status", host.trim())
    );
}
