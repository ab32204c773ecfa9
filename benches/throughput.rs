//! Sustained sensor throughput through one pipeline on a local mosquitto.
//!
//!   cargo bench --bench throughput            (needs mosquitto installed)
//!   MESSAGES=400000 QOS=0 cargo bench --bench throughput
//!
//! Starts mosquitto on a free loopback port and the release `edgeinfer run`
//! as its own process (activity model, window 50, stride 10), publishes
//! single-sample JSON messages from 10 simulated devices as fast as the
//! client allows, and waits for every expected result. Reports messages per
//! second end to end and the CPU time each process used, which says where
//! the time goes.

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const DEVICES: usize = 10;
const WINDOW: usize = 50;
const STRIDE: usize = 10;

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(close) = stat.rfind(')') else {
        return 0.0;
    };
    let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    ticks as f64 / 100.0
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` lists; nothing to list here.
    }
    let Some(mosquitto) = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    else {
        println!("throughput: mosquitto is not installed; skipped (tests/run.sh installs it)");
        return;
    };
    let messages: usize = std::env::var("MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let qos = match std::env::var("QOS").as_deref() {
        Ok("0") => QoS::AtMostOnce,
        _ => QoS::AtLeastOnce,
    };
    let per_device = messages / DEVICES;
    let expected_results = DEVICES * ((per_device - WINDOW) / STRIDE + 1);

    let dir = std::env::temp_dir().join(format!("edgeinfer-throughput-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // No queue limit: mosquitto's default (1000) silently drops for a subscriber that lags.
    std::fs::write(
        dir.join("mosquitto.conf"),
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\nlog_dest none\n"),
    )
    .unwrap();
    let mut broker = Command::new(mosquitto)
        .arg("-c")
        .arg(dir.join("mosquitto.conf"))
        .spawn()
        .unwrap();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    std::fs::write(
        dir.join("edgeinfer.toml"),
        format!(
            r#"
[device]
id = "bench"
[broker]
url = "mqtt://127.0.0.1:{port}"
[health]
interval_s = 3600
[[pipeline]]
name = "activity"
kind = "sensor"
topics = ["sensors/+/imu"]
model = "{}/activity.toml"
window = {{ size = {WINDOW}, stride = {STRIDE} }}
results = "bench/results/{{1}}"
qos = {}
queue = 100000
"#,
            models.display(),
            if qos == QoS::AtMostOnce { 0 } else { 1 }
        ),
    )
    .unwrap();
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_edgeinfer"))
        .args(["run", "-c"])
        .arg(dir.join("edgeinfer.toml"))
        .env("RUST_LOG", "warn")
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (elapsed, results, publish_s) = rt.block_on(async {
        // Results observer.
        let mut o = MqttOptions::new("bench-observer", "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30));
        let (obs, mut obs_ev) = AsyncClient::new(o, 100);
        obs.subscribe("bench/results/#", QoS::AtMostOnce)
            .await
            .unwrap();
        obs.subscribe("edgeinfer/bench/status", QoS::AtMostOnce)
            .await
            .unwrap();
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<&'static str>();
        tokio::spawn(async move {
            let mut n = 0usize;
            while let Ok(ev) = obs_ev.poll().await {
                if let Event::Incoming(Packet::Publish(p)) = ev {
                    if p.topic.ends_with("/status") {
                        if &p.payload[..] == b"online" {
                            let _ = done_tx.send("online");
                        }
                        continue;
                    }
                    n += 1;
                    if n == expected_results {
                        let _ = done_tx.send("all");
                    }
                }
            }
        });
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(20), done_rx.recv())
                .await
                .unwrap(),
            Some("online"),
            "edgeinfer came online"
        );
        tokio::time::sleep(Duration::from_millis(300)).await; // its subscriptions

        let mut o = MqttOptions::new("bench-publisher", "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_inflight(1000);
        let (publisher, mut pub_ev) = AsyncClient::new(o, 10_000);
        tokio::spawn(async move { while pub_ev.poll().await.is_ok() {} });
        let payloads: Vec<Vec<u8>> = (0..WINDOW)
            .map(|k| {
                let x = k as f32 * 0.1;
                format!(
                    "{{\"ts\":{},\"values\":[{:.4},{:.4},{:.4},{:.4},{:.4},{:.4}]}}",
                    1_764_331_200_000u64 + k as u64,
                    x.sin(),
                    x.cos(),
                    -0.98,
                    0.01 * x,
                    -0.02,
                    0.5
                )
                .into_bytes()
            })
            .collect();
        let topics: Vec<String> = (0..DEVICES)
            .map(|d| format!("sensors/dev-{d}/imu"))
            .collect();
        let started = Instant::now();
        for k in 0..per_device {
            for t in &topics {
                publisher
                    .publish(t.as_str(), qos, false, payloads[k % WINDOW].clone())
                    .await
                    .unwrap();
            }
        }
        let publish_s = started.elapsed().as_secs_f64();
        let finished = tokio::time::timeout(Duration::from_secs(120), done_rx.recv()).await;
        let elapsed = started.elapsed();
        (elapsed, finished.ok().flatten() == Some("all"), publish_s)
    });

    let daemon_cpu = cpu_seconds(daemon.id());
    let broker_cpu = cpu_seconds(broker.id());
    let daemon_peak = rss_mib(daemon.id());
    let bench_cpu = cpu_seconds(std::process::id());
    let _ = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status();
    let _ = daemon.wait();
    let _ = broker.kill();
    let _ = broker.wait();
    let _ = std::fs::remove_dir_all(&dir);

    let secs = elapsed.as_secs_f64();
    let sent = per_device * DEVICES;
    println!("throughput: {sent} messages at QoS {:?} from {DEVICES} devices, window {WINDOW} stride {STRIDE}", qos);
    println!(
        "  all {expected_results} results arrived: {results}; publishing took {publish_s:.2} s, last result after {secs:.2} s"
    );
    println!(
        "  sustained: {:.0} messages/s end to end ({:.0} inferences/s)",
        sent as f64 / secs,
        expected_results as f64 / secs
    );
    println!(
        "  CPU: edgeinfer {daemon_cpu:.2} s ({:.1} us/message), mosquitto {broker_cpu:.2} s, publisher+observer {bench_cpu:.2} s, wall {secs:.2} s on {} cores",
        daemon_cpu * 1e6 / sent as f64,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    println!("  edgeinfer peak RSS {daemon_peak:.1} MiB");
    assert!(results, "not every expected result arrived");
}
