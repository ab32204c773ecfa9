//! `edgeinfer demo`: an in-process MQTT broker (rumqttd, small memory
//! limits), the bundled models, simulated smart watches replaying real
//! held-back BasicMotions recordings, and simulated cameras sending real
//! photos and scenes whose objects are known. Prints results as they arrive
//! and a summary at the end.

mod scoring;

pub use scoring::{match_known, Matched};

use crate::bundled::{self, CameraFrame, CameraIndex, TempDir};
use crate::config::Config;
use crate::health::percentile;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde::Deserialize;
use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Deserialize)]
struct Streams {
    rate_hz: f64,
    streams: Vec<Stream>,
}

#[derive(Deserialize)]
struct Stream {
    device: String,
    label: String,
    samples: Vec<Vec<f32>>,
}

/// Playback speed of the recordings (they were sampled at 10 Hz).
const SPEEDUP: f64 = 10.0;

/// The simulated cameras: name and the frames (indices into `camera.json`)
/// each one cycles through.
const CAMERAS: &[(&str, &[usize])] = &[
    ("cam-1", &[0, 1, 2, 3]),
    ("cam-2", &[4, 5, 6, 7]),
    ("cam-3", &[8, 9, 10, 11]),
];

/// Each camera sends a frame this often (or, on a machine too slow for
/// that, as soon as the result for its previous frame is in).
const FRAME_PERIOD: Duration = Duration::from_millis(500);

#[derive(Debug, Default, Clone)]
pub struct DemoSummary {
    pub sent: u64,
    pub bad_sent: u64,
    pub results: u64,
    pub errors: u64,
    pub correct: u64,
    pub classified: u64,
    pub anomalies: u64,
    pub pipeline_ms: (f64, f64),
    pub end_to_end_ms: (f64, f64),
    pub health_messages: u64,
    /// Camera frames published (JPEG).
    pub frames_sent: u64,
    /// Detection results received for them.
    pub camera_results: u64,
    /// Known objects in the frames that got a result, and how many of them a
    /// detection of the same label found (IoU ≥ 0.5).
    pub objects_known: u64,
    pub objects_found: u64,
    /// Detections that matched no known object.
    pub extra_detections: u64,
    pub snapshots: u64,
    /// Camera pipeline time in the daemon (queue + pre + infer + post).
    pub camera_ms: (f64, f64),
}

/// What the observer shares with the simulators and the summary.
struct Shared {
    summary: Mutex<DemoSummary>,
    /// Device → the activity its recording shows.
    truth: HashMap<String, String>,
    /// Sensor pipeline time, device → result time, camera pipeline time.
    latency: Mutex<[Vec<f64>; 3]>,
    frames: Vec<CameraFrame>,
    /// Camera → (index of the frame it sent last, whether that frame's
    /// result is still to come).
    showing: Mutex<HashMap<String, (usize, bool)>>,
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

#[cfg(not(feature = "demo-broker"))]
fn start_broker(_port: u16) -> Result<(), String> {
    Err("this build has no in-process broker: rebuild with the `demo-broker` feature (on by default)".into())
}

#[cfg(feature = "demo-broker")]
fn start_broker(port: u16) -> Result<(), String> {
    use rumqttd::{
        Broker, Config as BrokerConfig, ConnectionSettings, RouterConfig, ServerSettings,
    };
    let listen: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let server = ServerSettings {
        name: "demo".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 5000,
            max_payload_size: 256 * 1024,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = BrokerConfig {
        id: 0,
        router: RouterConfig {
            max_connections: 32,
            max_outgoing_packet_count: 200,
            // rumqttd's example reserves 100 MB segments; a demo needs far less.
            max_segment_size: 1024 * 1024,
            max_segment_count: 4,
            ..Default::default()
        },
        v4: Some(HashMap::from([("demo".to_string(), server)])),
        ..Default::default()
    };
    std::thread::Builder::new()
        .name("demo-broker".into())
        .spawn(move || {
            // rumqttd has no shutdown API: the thread ends with the process.
            if let Err(e) = Broker::new(config).start() {
                tracing::error!(error = %e, "Demo broker stopped");
            }
        })
        .map_err(|e| e.to_string())?;
    wait_listening(listen)
}

#[cfg(feature = "demo-broker")]
fn wait_listening(listen: std::net::SocketAddr) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(listen).is_err() {
        if Instant::now() > deadline {
            return Err(format!(
                "the demo broker did not start listening on {listen}"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn demo_config(dir: &std::path::Path, port: u16) -> String {
    format!(
        r#"
[device]
id = "demo"
[broker]
url = "mqtt://127.0.0.1:{port}"
client_id = "edgeinfer-demo"
[health]
interval_s = 2
[[pipeline]]
name = "activity"
kind = "sensor"
topics = ["sensors/+/imu"]
model = "{dir}/activity.toml"
window = {{ size = 50, stride = 10 }}
results = "edgeinfer/{{device}}/results/activity/{{1}}"
[[pipeline]]
name = "motion"
kind = "sensor"
topics = ["sensors/+/accel"]
model = "{dir}/motion.toml"
window = {{ size = 20, stride = 10 }}
results = "edgeinfer/{{device}}/results/motion/{{1}}"
[[pipeline]]
name = "objects"
kind = "camera"
topics = ["cameras/+/frame"]
model = "{dir}/objects.toml"
results = "edgeinfer/{{device}}/results/objects/{{1}}"
snapshot = "edgeinfer/{{device}}/snapshots/objects/{{1}}"
"#,
        dir = dir.display()
    )
}

/// Runs the demo for `seconds` of simulated traffic and prints as it goes.
pub async fn run(seconds: u64) -> Result<DemoSummary, String> {
    let dir = TempDir::new("demo").map_err(|e| e.to_string())?;
    bundled::unpack(dir.path()).map_err(|e| format!("cannot unpack the bundled models: {e}"))?;
    let port = free_port().map_err(|e| e.to_string())?;
    start_broker(port)?;
    println!("demo: MQTT broker (in-process rumqttd) on 127.0.0.1:{port}");

    let config = Config::parse(&demo_config(dir.path(), port), dir.path())?;
    let problems = crate::check(&config);
    if !problems.is_empty() {
        return Err(problems
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("\n"));
    }
    let stop_daemon = CancellationToken::new();
    let daemon = tokio::spawn(crate::run(config, stop_daemon.clone()));

    // The observer: what an operator's dashboard would see.
    let shared = Arc::new(Shared {
        summary: Mutex::new(DemoSummary::default()),
        truth: serde_json::from_str::<Streams>(bundled::ACTIVITY_STREAM)
            .map_err(|e| e.to_string())?
            .streams
            .into_iter()
            .map(|s| (s.device, s.label))
            .collect(),
        latency: Mutex::new(Default::default()),
        frames: CameraIndex::bundled().frames,
        showing: Mutex::new(HashMap::new()),
    });
    // Devices start once the daemon says `online` (it publishes that after
    // its subscriptions): earlier messages would find no subscriber. A
    // first start measures tract's variants of the QDQ models (about a
    // second here; under qemu-user, the ARM tests, the detector's runs take
    // seconds each), so the wait is generous.
    let online = CancellationToken::new();
    let observer = tokio::spawn(observe(port, Arc::clone(&shared), online.clone()));
    tokio::time::timeout(Duration::from_secs(90), online.cancelled())
        .await
        .map_err(|_| "the daemon did not come online within 90 s".to_string())?;

    let streams: Streams =
        serde_json::from_str(bundled::ACTIVITY_STREAM).map_err(|e| e.to_string())?;
    println!(
        "demo: {} simulated watches replay held-back BasicMotions recordings at {}x speed for {seconds} s",
        streams.streams.len(),
        SPEEDUP
    );
    let period = Duration::from_secs_f64(1.0 / (streams.rate_hz * SPEEDUP));
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut devices = Vec::new();
    for s in streams.streams {
        devices.push(tokio::spawn(simulate_watch(port, s, period, until)));
    }
    devices.push(tokio::spawn(simulate_faulty_device(port, until)));
    println!(
        "demo: {} simulated cameras send {} frames (4 scikit-image photos, 8 scenes on unseen backgrounds) every {} ms each",
        CAMERAS.len(),
        shared.frames.len(),
        FRAME_PERIOD.as_millis()
    );
    let mut cameras = Vec::new();
    for (i, (name, frames)) in CAMERAS.iter().enumerate() {
        // Cameras are not synchronised: spread their frames over the period.
        let offset = FRAME_PERIOD * i as u32 / CAMERAS.len() as u32;
        cameras.push(tokio::spawn(simulate_camera(
            port,
            name,
            frames,
            Arc::clone(&shared),
            offset,
            until,
        )));
    }
    let mut sent = (0, 0);
    for d in devices {
        let (good, bad) = d.await.map_err(|e| e.to_string())??;
        sent.0 += good;
        sent.1 += bad;
    }
    let mut frames_sent = 0;
    for c in cameras {
        frames_sent += c.await.map_err(|e| e.to_string())??;
    }
    wait_until_quiet(&shared).await;
    stop_daemon.cancel();
    daemon
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    observer.abort();

    let s = summarise(&shared, sent, frames_sent)?;
    print_summary(&s);
    Ok(s)
}

/// Lets the last results arrive: on a slow machine the daemon may still be
/// working through a backlog, so this waits until nothing new came for a
/// second (at most 60 s).
async fn wait_until_quiet(shared: &Shared) {
    let count = || {
        shared
            .summary
            .lock()
            .map(|s| s.results + s.errors)
            .unwrap_or(0)
    };
    let (mut last, mut quiet_since) = (count(), Instant::now());
    let give_up = Instant::now() + Duration::from_secs(60);
    while quiet_since.elapsed() < Duration::from_secs(1) && Instant::now() < give_up {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = count();
        if now != last {
            (last, quiet_since) = (now, Instant::now());
        }
    }
}

/// The summary: counts from the observer, what the devices sent, latency
/// percentiles.
fn summarise(shared: &Shared, sent: (u64, u64), frames_sent: u64) -> Result<DemoSummary, String> {
    let mut s = shared.summary.lock().map_err(|e| e.to_string())?.clone();
    s.sent = sent.0;
    s.bad_sent = sent.1;
    s.frames_sent = frames_sent;
    let [mut pipe, mut e2e, mut cam] = shared.latency.lock().map_err(|e| e.to_string())?.clone();
    for v in [&mut pipe, &mut e2e, &mut cam] {
        v.sort_by(f64::total_cmp);
    }
    s.pipeline_ms = (percentile(&pipe, 0.5), percentile(&pipe, 0.99));
    s.end_to_end_ms = (percentile(&e2e, 0.5), percentile(&e2e, 0.99));
    s.camera_ms = (percentile(&cam, 0.5), percentile(&cam, 0.99));
    Ok(s)
}

fn print_summary(s: &DemoSummary) {
    println!();
    println!("demo summary");
    println!(
        "  messages sent      {} sensor samples, {} deliberately bad payloads",
        s.sent, s.bad_sent
    );
    println!(
        "  results            {} ({} activity classifications, {} motion scores)",
        s.results,
        s.classified,
        s.results - s.classified
    );
    println!(
        "  activity correct   {}/{} ({:.0}%) against the recordings' true labels",
        s.correct,
        s.classified,
        100.0 * s.correct as f64 / s.classified.max(1) as f64
    );
    println!(
        "  motion anomalies   {} windows flagged (running and badminton are 'unusual')",
        s.anomalies
    );
    println!(
        "  errors             {} rejected inputs reported on edgeinfer/demo/errors",
        s.errors
    );
    println!(
        "  camera frames      {} JPEG frames sent, {} detection results, {} annotated snapshots",
        s.frames_sent, s.camera_results, s.snapshots
    );
    println!(
        "  objects found      {}/{} known objects ({:.0}%, same label and IoU >= 0.5), {} extra detections",
        s.objects_found,
        s.objects_known,
        100.0 * s.objects_found as f64 / s.objects_known.max(1) as f64,
        s.extra_detections
    );
    println!("  health messages    {}", s.health_messages);
    println!(
        "  latency in daemon  p50 {:.3} ms, p99 {:.3} ms (queue + pre + infer + post)",
        s.pipeline_ms.0, s.pipeline_ms.1
    );
    println!(
        "  device → result    p50 {:.0} ms, p99 {:.0} ms (ms-resolution timestamps)",
        s.end_to_end_ms.0, s.end_to_end_ms.1
    );
    println!(
        "  camera in daemon   p50 {:.3} ms, p99 {:.3} ms (queue + decode and resize + infer + post)",
        s.camera_ms.0, s.camera_ms.1
    );
}

async fn client(port: u16, id: &str) -> (AsyncClient, rumqttc::EventLoop) {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(10));
    o.set_max_packet_size(256 * 1024, 256 * 1024);
    let (client, mut eventloop) = AsyncClient::new(o, 64);
    // Devices send two small messages back to back: without this the second
    // can wait for a delayed ACK (tens of ms), which is not the daemon's latency.
    eventloop.network_options.set_tcp_nodelay(true);
    (client, eventloop)
}

async fn observe(port: u16, shared: Arc<Shared>, online: CancellationToken) {
    let (c, mut ev) = client(port, "demo-observer").await;
    let _ = c.subscribe("edgeinfer/demo/#", QoS::AtMostOnce).await;
    let mut printed = 0usize;
    while let Ok(event) = ev.poll().await {
        let p = match event {
            Event::Incoming(Packet::Publish(p)) => p,
            _ => continue,
        };
        if p.topic.ends_with("/status") {
            if p.payload.as_ref() == b"online" {
                online.cancel();
            }
            continue;
        }
        let Ok(mut s) = shared.summary.lock() else {
            return;
        };
        if p.topic.ends_with("/health") {
            s.health_messages += 1;
            continue;
        }
        if p.topic.contains("/snapshots/") {
            s.snapshots += 1;
            continue;
        }
        if p.topic.ends_with("/errors") {
            s.errors += 1;
            println!("  error   {}", String::from_utf8_lossy(&p.payload));
            continue;
        }
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&p.payload) else {
            continue;
        };
        if v.get("pipeline").is_none() {
            continue;
        }
        s.results += 1;
        let l = &v["latency_ms"];
        let total: f64 = ["queue", "pre", "infer", "post"]
            .iter()
            .map(|k| l[k].as_f64().unwrap_or(0.0))
            .sum();
        let source = v["source"].as_str().unwrap_or("");
        let device = source.split('/').nth(1).unwrap_or("");
        let line = if let Some(detections) = v["output"]["detections"].as_array() {
            if let Ok(mut lat) = shared.latency.lock() {
                lat[2].push(total);
            }
            camera_line(&shared, &mut s, device, detections)
        } else {
            // Sensor results carry the device's own timestamp.
            let e2e = crate::flow::unix_ms().saturating_sub(v["ts"].as_u64().unwrap_or(0)) as f64;
            if let Ok(mut lat) = shared.latency.lock() {
                lat[0].push(total);
                lat[1].push(e2e);
            }
            sensor_line(&shared, &mut s, source, device, &v["output"])
        };
        // Print the first results in full, then one in ten, so the screen stays readable.
        printed += 1;
        if printed <= 24 || printed.is_multiple_of(10) {
            println!(
                "  result  {line}  [infer {:.3} ms]",
                l["infer"].as_f64().unwrap_or(0.0)
            );
        }
    }
}

fn sensor_line(
    shared: &Shared,
    s: &mut DemoSummary,
    source: &str,
    device: &str,
    output: &serde_json::Value,
) -> String {
    if let Some(top) = output["top"].as_array() {
        s.classified += 1;
        let label = top[0]["label"].as_str().unwrap_or("?");
        let expected = shared.truth.get(device).map(String::as_str).unwrap_or("?");
        if label == expected {
            s.correct += 1;
        }
        format!(
            "{:<9} {source:<22} → {label:<9} {:.2}  (recorded: {expected})",
            "activity",
            top[0]["score"].as_f64().unwrap_or(0.0)
        )
    } else {
        let anomaly = output["anomaly"].as_bool().unwrap_or(false);
        if anomaly {
            s.anomalies += 1;
        }
        format!(
            "{:<9} {source:<22} → score {:.2}{}",
            "motion",
            output["score"].as_f64().unwrap_or(0.0),
            if anomaly { "  UNUSUAL" } else { "" }
        )
    }
}

/// Scores a detection result against the known objects of the frame the
/// camera sent last: a simulated camera sends its next frame only after the
/// result for the last one came (or 10 s passed), so that is the frame the
/// result is for, however slow the machine (qemu, a small board).
fn camera_line(
    shared: &Shared,
    s: &mut DemoSummary,
    camera: &str,
    detections: &[serde_json::Value],
) -> String {
    s.camera_results += 1;
    let frame = shared
        .showing
        .lock()
        .ok()
        .and_then(|mut m| {
            let entry = m.get_mut(camera)?;
            entry.1 = false;
            Some(entry.0)
        })
        .and_then(|i| shared.frames.get(i));
    let found: Vec<(String, f64, [f32; 4])> = detections
        .iter()
        .map(|d| {
            let b = |i: usize| d["box"][i].as_f64().unwrap_or(0.0) as f32;
            (
                d["label"].as_str().unwrap_or("?").to_owned(),
                d["score"].as_f64().unwrap_or(0.0),
                [b(0), b(1), b(2), b(3)],
            )
        })
        .collect();
    let boxes: Vec<(&str, [f32; 4])> = found.iter().map(|f| (f.0.as_str(), f.2)).collect();
    // A result whose frame is unknown has no known objects: all extra.
    let known_objects = frame.map_or(&[][..], |f| &f.objects[..]);
    let matched = match_known(known_objects, &boxes);
    s.objects_known += known_objects.len() as u64;
    s.objects_found += matched.found as u64;
    s.extra_detections += matched.extra as u64;
    let seen: Vec<String> = found
        .iter()
        .map(|(label, score, b)| {
            format!(
                "{label} {score:.2} [{:.0},{:.0},{:.0},{:.0}]",
                b[0], b[1], b[2], b[3]
            )
        })
        .collect();
    let file = frame.map_or("?", |f| f.file.as_str());
    format!(
        "{:<9} {:<22} → {}  ({file}: {}/{} known found)",
        "objects",
        format!("cameras/{camera}"),
        if seen.is_empty() {
            "nothing".to_owned()
        } else {
            seen.join(", ")
        },
        matched.found,
        known_objects.len(),
    )
}

/// Publishes one watch's recording, sample by sample, on `sensors/DEV/imu`
/// (all six channels) and `sensors/DEV/accel` (the accelerometer).
async fn simulate_watch(
    port: u16,
    s: Stream,
    period: Duration,
    until: Instant,
) -> Result<(u64, u64), String> {
    let (c, mut ev) = client(port, &format!("demo-{}", s.device)).await;
    let pump = tokio::spawn(async move { while ev.poll().await.is_ok() {} });
    let mut ticker = tokio::time::interval(period);
    let mut sent = 0u64;
    for sample in s.samples.iter().cycle() {
        ticker.tick().await;
        if Instant::now() >= until {
            break;
        }
        let ts = crate::flow::unix_ms();
        let imu = serde_json::json!({"ts": ts, "values": sample}).to_string();
        let acc = serde_json::json!({"ts": ts, "values": &sample[..3]}).to_string();
        c.publish(
            format!("sensors/{}/imu", s.device),
            QoS::AtLeastOnce,
            false,
            imu,
        )
        .await
        .map_err(|e| e.to_string())?;
        c.publish(
            format!("sensors/{}/accel", s.device),
            QoS::AtLeastOnce,
            false,
            acc,
        )
        .await
        .map_err(|e| e.to_string())?;
        sent += 2;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    pump.abort();
    Ok((sent, 0))
}

/// A camera that sends its frames (JPEG files, QoS 1) in a loop.
async fn simulate_camera(
    port: u16,
    name: &'static str,
    frames: &'static [usize],
    shared: Arc<Shared>,
    offset: Duration,
    until: Instant,
) -> Result<u64, String> {
    let (c, mut ev) = client(port, &format!("demo-{name}")).await;
    let pump = tokio::spawn(async move { while ev.poll().await.is_ok() {} });
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + offset, FRAME_PERIOD);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sent = 0u64;
    for &i in frames.iter().cycle() {
        ticker.tick().await;
        if Instant::now() >= until {
            break;
        }
        let Some(frame) = shared.frames.get(i) else {
            break;
        };
        let Some((_, jpeg)) = bundled::CAMERA_FRAMES
            .iter()
            .find(|(file, _)| *file == frame.file)
        else {
            return Err(format!("{} is not bundled", frame.file));
        };
        if let Ok(mut showing) = shared.showing.lock() {
            showing.insert(name.to_owned(), (i, true));
        }
        c.publish(
            format!("cameras/{name}/frame"),
            QoS::AtLeastOnce,
            false,
            jpeg.to_vec(),
        )
        .await
        .map_err(|e| e.to_string())?;
        sent += 1;
        // Wait for this frame's result before the next frame (see camera_line).
        let give_up = Instant::now() + Duration::from_secs(10);
        while Instant::now() < give_up
            && shared
                .showing
                .lock()
                .is_ok_and(|m| m.get(name).is_some_and(|e| e.1))
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    pump.abort();
    Ok(sent)
}

/// A device with a bad firmware day: every two seconds, one broken payload.
async fn simulate_faulty_device(port: u16, until: Instant) -> Result<(u64, u64), String> {
    let (c, mut ev) = client(port, "demo-faulty").await;
    let pump = tokio::spawn(async move { while ev.poll().await.is_ok() {} });
    let bad: [&[u8]; 4] = [
        b"{\"values\": [0.1, 0.2",
        b"{\"values\": [0.1, 0.2, 0.3]}",
        b"{\"values\": [0.1, null, 0.3, 0.4, 0.5, 0.6]}",
        b"{\"ts\": 1}",
    ];
    let mut sent = 0u64;
    let mut ticker = tokio::time::interval(Duration::from_secs(2));
    ticker.tick().await;
    for payload in bad.iter().cycle() {
        ticker.tick().await;
        if Instant::now() >= until {
            break;
        }
        c.publish(
            "sensors/watch-9/imu",
            QoS::AtLeastOnce,
            false,
            payload.to_vec(),
        )
        .await
        .map_err(|e| e.to_string())?;
        sent += 1;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    pump.abort();
    Ok((0, sent))
}
