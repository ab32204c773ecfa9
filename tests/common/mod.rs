//! Shared test harness: a real mosquitto on a free loopback port, an MQTT
//! observer, and the daemon run as a library call.
#![allow(dead_code)]

pub mod ops;

use edgeinfer::config::Config;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn mosquitto_bin() -> PathBuf {
    for p in [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    panic!("mosquitto is not installed: run `apt-get install -y mosquitto` (the README's test command does)");
}

/// A mosquitto broker bound to 127.0.0.1 on its own port, killed on drop.
pub struct Mosquitto {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// More mosquitto.conf lines (extra listeners, TLS).
    extra: String,
    /// Keep sessions and queued messages across restarts (in `dir`).
    persistent: bool,
}

impl Mosquitto {
    pub fn start() -> Mosquitto {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Mosquitto {
        Self::start_with(port, String::new())
    }

    /// With more configuration after the plain listener on `port`.
    pub fn start_with(port: u16, extra: String) -> Mosquitto {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Mosquitto {
            port,
            dir,
            child: None,
            extra,
            persistent: false,
        };
        m.spawn();
        m
    }

    /// A broker with persistence on: sessions, subscriptions and queued
    /// QoS 1 messages survive a [`Mosquitto::restart_gracefully`].
    pub fn start_persistent() -> Mosquitto {
        let dir = tempfile::tempdir().unwrap();
        // mosquitto started as root runs as the `mosquitto` user: it must be
        // able to write its persistence file here.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let mut m = Mosquitto {
            port: free_port(),
            dir,
            child: None,
            extra: String::new(),
            persistent: true,
        };
        m.spawn();
        m
    }

    fn spawn(&mut self) {
        let conf = self.dir.path().join("mosquitto.conf");
        let persistence = if self.persistent {
            format!(
                "persistence true\npersistence_location {}/\n",
                self.dir.path().display()
            )
        } else {
            "persistence false\n".to_owned()
        };
        std::fs::write(
            &conf,
            format!(
                "allow_anonymous true\n{persistence}max_queued_messages 100000\nlog_dest none\nlistener {} 127.0.0.1\n{}",
                self.port, self.extra
            ),
        )
        .unwrap();
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not listen on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// SIGTERM (mosquitto saves its persistence file), wait, start again.
    pub fn restart_gracefully(&mut self, down_for: Duration) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let _ = c.wait();
        }
        std::thread::sleep(down_for);
        self.spawn();
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A message seen by the observer.
#[derive(Debug, Clone)]
pub struct Seen {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

impl Seen {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload)
            .unwrap_or_else(|e| panic!("{} is not JSON ({e})", self.topic))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

/// An MQTT client that subscribes to `filters` and forwards what it sees.
pub struct Observer {
    pub client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl Observer {
    pub async fn connect(port: u16, filters: &[&str]) -> Observer {
        Self::connect_as(
            port,
            filters,
            &format!("observer-{}", fastrand::u32(..)),
            true,
        )
        .await
    }

    /// With a fixed client id and, with `clean` false, a persistent
    /// session: messages published while it is cut off reach it later.
    pub async fn connect_as(port: u16, filters: &[&str], id: &str, clean: bool) -> Observer {
        Self::connect_with(port, filters, id, clean, None).await
    }

    /// Logged in as `user` with `password`.
    pub async fn connect_user(port: u16, filters: &[&str], user: &str, password: &str) -> Observer {
        let id = format!("{user}-{}", fastrand::u32(..));
        Self::connect_with(port, filters, &id, true, Some((user, password))).await
    }

    async fn connect_with(
        port: u16,
        filters: &[&str],
        id: &str,
        clean: bool,
        login: Option<(&str, &str)>,
    ) -> Observer {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        if let Some((user, password)) = login {
            o.set_credentials(user, password);
        }
        o.set_clean_session(clean);
        o.set_max_packet_size(1 << 20, 1 << 20);
        o.set_keep_alive(Duration::from_secs(30));
        let (client, mut ev) = AsyncClient::new(o, 1024);
        for f in filters {
            client.subscribe(*f, QoS::AtLeastOnce).await.unwrap();
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
        let wanted = filters.len();
        let task = tokio::spawn(async move {
            let mut acked = 0;
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        acked += 1;
                        if acked == wanted {
                            let _ = ready_tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(Seen {
                            topic: p.topic,
                            payload: p.payload.to_vec(),
                            retain: p.retain,
                        });
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx.recv())
            .await
            .expect("observer subscribed");
        Observer { client, rx, task }
    }

    /// The next message whose topic satisfies `pred`, within `timeout`.
    pub async fn next_where(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&Seen) -> bool,
    ) -> Option<Seen> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(m)) if pred(&m) => return Some(m),
                Ok(Some(_)) => continue,
                _ => return None,
            }
        }
    }

    /// Every message on topics satisfying `pred` until `n` arrived or `timeout`.
    pub async fn collect(
        &mut self,
        n: usize,
        timeout: Duration,
        pred: impl Fn(&Seen) -> bool,
    ) -> Vec<Seen> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < n {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(m)) if pred(&m) => out.push(m),
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        out
    }

    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A config for the bundled activity model against `broker`, plus `extra` TOML.
pub fn config_text(broker: &str, device: &str, extra: &str) -> String {
    // Daemons run inside the test process and share its RSS, which the
    // memory budget is measured against: give them room.
    const BUDGET: &str = "[limits]\nmemory_mb = 16384\n";
    let extra = if extra.contains("[limits]\n") {
        extra.replace("[limits]\n", BUDGET)
    } else {
        format!("{BUDGET}{extra}")
    };
    format!(
        r#"
[device]
id = "{device}"
[broker]
url = "{broker}"
reconnect_initial_ms = 100
reconnect_max_ms = 1000
[health]
interval_s = 1
{extra}
"#
    )
}

pub const ACTIVITY_PIPELINE: &str = r#"
[[pipeline]]
name = "activity"
kind = "sensor"
topics = ["sensors/+/imu"]
model = "models/activity.toml"
window = { size = 50, stride = 50 }
results = "edgeinfer/{device}/results/activity/{1}"
"#;

pub fn parse(text: &str) -> Config {
    Config::parse(text, &repo()).unwrap()
}

/// The daemon, run as a library call on this runtime.
pub struct Daemon {
    pub shutdown: CancellationToken,
    pub handle: tokio::task::JoinHandle<Result<(), edgeinfer::RunError>>,
}

impl Daemon {
    pub fn start(config: Config) -> Daemon {
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(edgeinfer::run(config, shutdown.clone()));
        Daemon { shutdown, handle }
    }

    /// Starts the daemon and returns once it is online: its `online` is
    /// published after its subscribe requests on the same connection, so
    /// from then on it receives what is published. (A fixed sleep raced
    /// with slow start-ups, e.g. a model that panics while loading.)
    pub async fn start_online(config: Config, port: u16) -> Daemon {
        let status = format!("{}/status", config.prefix());
        let mut obs = Observer::connect(port, &[&status]).await;
        let daemon = Daemon::start(config);
        let online = obs
            .next_where(Duration::from_secs(30), |m| m.text() == "online")
            .await;
        assert!(
            online.is_some(),
            "the daemon did not come online within 30 s"
        );
        daemon
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.handle)
            .await
            .expect("daemon stops within 20 s")
            .unwrap()
            .unwrap();
    }
}

#[derive(serde::Deserialize)]
pub struct Reference {
    pub cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
pub struct Case {
    pub label: String,
    pub input: Vec<Vec<f32>>,
    pub output: Vec<f32>,
}

pub fn activity_reference() -> Reference {
    serde_json::from_str(
        &std::fs::read_to_string(repo().join("models/activity.reference.json")).unwrap(),
    )
    .unwrap()
}

pub fn argmax(v: &[f32]) -> usize {
    (0..v.len()).max_by(|a, b| v[*a].total_cmp(&v[*b])).unwrap()
}

pub const ACTIVITY_LABELS: [&str; 4] = ["standing", "walking", "running", "badminton"];

/// The public model zoo for the compatibility tests: `$EDGEINFER_MODEL_ZOO`,
/// else `../shared/models` beside the checkout when it exists (CI has it).
/// `None` (the caller says it skipped) when there is none — except under
/// CI (`CI` set), where a missing zoo fails the test instead of passing it.
pub fn model_zoo() -> Option<PathBuf> {
    let zoo = match std::env::var_os("EDGEINFER_MODEL_ZOO") {
        Some(dir) => PathBuf::from(dir),
        None => repo().join("../shared/models"),
    };
    if zoo.is_dir() {
        Some(zoo)
    } else if std::env::var_os("CI").is_some() {
        panic!(
            "model zoo: {} is not a folder, and CI is set: the compatibility tests must run in CI",
            zoo.display()
        );
    } else {
        println!(
            "model zoo: {} is not a folder (set EDGEINFER_MODEL_ZOO); skipped",
            zoo.display()
        );
        None
    }
}

/// A `libonnxruntime.so` from PyPI's wheels, as tests/install-deps.sh
/// unpacks them: `cpu` (onnxruntime 1.32.0) or `openvino`
/// (onnxruntime-openvino 1.24.1, x86-64 only) or `too-old` (onnxruntime
/// 1.22.0, below the API edgeinfer takes; x86-64 only). `None` (the caller says it
/// skipped) when missing, except under CI, where that fails the test.
pub fn onnxruntime_library(flavor: &str) -> Option<PathBuf> {
    let dir = match std::env::var_os("EDGEINFER_ORT_DIR").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache")
                });
            cache.join("edgeinfer/onnxruntime")
        }
    };
    let lib = match flavor {
        "cpu" => dir.join("cpu-1.32.0/libonnxruntime.so.1.32.0"),
        "openvino" => dir.join("openvino-1.24.1/libonnxruntime.so.1.24.1"),
        "too-old" => dir.join("cpu-1.22.0/libonnxruntime.so.1.22.0"),
        other => panic!("no such ONNX Runtime flavour {other}"),
    };
    if lib.is_file() {
        Some(lib)
    } else if std::env::var_os("CI").is_some() {
        panic!(
            "{} is missing and CI is set: tests/install-deps.sh installs it",
            lib.display()
        );
    } else {
        println!(
            "{} is missing (run tests/install-deps.sh); skipped",
            lib.display()
        );
        None
    }
}

/// A client for sending inputs larger than the observer takes (64 MiB
/// packets), polling in the background; dropped with the handle.
pub struct BigPublisher {
    pub client: AsyncClient,
    task: tokio::task::JoinHandle<()>,
}

impl BigPublisher {
    pub fn connect(port: u16) -> BigPublisher {
        let mut o = MqttOptions::new(format!("big-{}", fastrand::u32(..)), "127.0.0.1", port);
        o.set_max_packet_size(64 << 20, 64 << 20);
        let (client, mut ev) = AsyncClient::new(o, 100);
        let task = tokio::spawn(async move {
            loop {
                if ev.poll().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        });
        BigPublisher { client, task }
    }

    pub async fn publish(&self, topic: &str, qos: QoS, payload: Vec<u8>) {
        self.client
            .publish(topic, qos, false, payload)
            .await
            .unwrap();
    }
}

impl Drop for BigPublisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TCP proxy on a free loopback port in front of a broker that can
/// withhold the broker's PUBACKs from the client (a broker that stops
/// acknowledging, as a slow or overloaded one does). Everything else passes.
pub struct AckHoldingProxy {
    pub port: u16,
    pub hold: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl AckHoldingProxy {
    pub async fn start(broker_port: u16) -> AckHoldingProxy {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hold = std::sync::Arc::new(AtomicBool::new(false));
        let held = std::sync::Arc::clone(&hold);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(broker) = tokio::net::TcpStream::connect(("127.0.0.1", broker_port)).await
                else {
                    continue;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut br, mut bw) = broker.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut cr, &mut bw).await;
                });
                let held = std::sync::Arc::clone(&held);
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    // Broker → client, one MQTT packet at a time.
                    loop {
                        let mut first = [0u8; 1];
                        if br.read_exact(&mut first).await.is_err() {
                            break;
                        }
                        let mut header = vec![first[0]];
                        let mut len = 0usize;
                        let mut shift = 0;
                        loop {
                            let mut b = [0u8; 1];
                            if br.read_exact(&mut b).await.is_err() {
                                return;
                            }
                            header.push(b[0]);
                            len |= ((b[0] & 0x7f) as usize) << shift;
                            shift += 7;
                            if b[0] & 0x80 == 0 {
                                break;
                            }
                        }
                        let mut body = vec![0u8; len];
                        if br.read_exact(&mut body).await.is_err() {
                            break;
                        }
                        let puback = first[0] >> 4 == 4;
                        if puback && held.load(Ordering::Relaxed) {
                            continue;
                        }
                        header.extend_from_slice(&body);
                        if cw.write_all(&header).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        AckHoldingProxy { port, hold, task }
    }
}

impl Drop for AckHoldingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The peak resident set (VmHWM) of a child process, in bytes.
pub fn vm_hwm_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM")
        * 1024
}

/// 64 samples of 8 channels: one window of tests/fixtures/slow.onnx
/// (about 0.6 ms of inference).
pub fn slow_window() -> Vec<Vec<f32>> {
    (0..64)
        .map(|i| (0..8).map(|c| ((i * 8 + c) as f32 * 0.37).sin()).collect())
        .collect()
}
