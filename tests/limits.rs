//! The daemon at the edges of its limits, against a real mosquitto: input
//! larger than it accepts (acknowledged and reported; the connection stays
//! up), results the broker would not take (refused and reported, or
//! quarantined when the broker drops the connection on them), health and
//! command replies while the broker withholds acknowledgements, and camera
//! frames whose decoding would exceed the memory budget (measured in a
//! child process).
mod common;

use common::*;
use rumqttc::QoS;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

fn window_of_50() -> Vec<u8> {
    let input = activity_reference().cases[0].input.clone();
    serde_json::json!({ "samples": input })
        .to_string()
        .into_bytes()
}

/// The bundled activity model on `topic` filters, one window per message.
fn sensor_pipeline(topic: &str, results: &str) -> String {
    format!(
        r#"
[[pipeline]]
name = "activity"
kind = "sensor"
topics = ["{topic}"]
model = "{}"
window = {{ size = 50, stride = 50 }}
results = "{results}"
"#,
        repo().join("models/activity.toml").display()
    )
}

fn camera_pipeline() -> String {
    format!(
        r#"
[[pipeline]]
name = "objects"
kind = "camera"
topics = ["cameras/+/objects"]
model = "{}"
results = "edgeinfer/{{device}}/results/objects/{{1}}"
"#,
        repo().join("models/objects.toml").display()
    )
}

async fn health(obs: &mut Observer) -> serde_json::Value {
    obs.next_where(T, |m| m.topic.ends_with("/health"))
        .await
        .expect("health keeps coming")
        .json()
}

async fn error_of(obs: &mut Observer, kind: &str) -> serde_json::Value {
    obs.next_where(T, |m| {
        m.topic.ends_with("/errors") && m.json()["kind"] == kind
    })
    .await
    .unwrap_or_else(|| panic!("an errors-topic entry of kind {kind}"))
    .json()
}

async fn result_on(obs: &mut Observer, topic: &str) -> serde_json::Value {
    obs.next_where(T, |m| m.topic == topic)
        .await
        .unwrap_or_else(|| panic!("a result on {topic}"))
        .json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_over_the_size_limits_is_reported_and_the_connection_stays_up() {
    let broker = Mosquitto::start();
    let device = "gw-big";
    let extra = format!(
        "{}{}",
        sensor_pipeline("sensors/+/imu", "edgeinfer/{device}/results/activity/{1}"),
        camera_pipeline()
    );
    let mut obs = Observer::connect(
        broker.port,
        &[
            "edgeinfer/gw-big/results/#",
            "edgeinfer/gw-big/errors",
            "edgeinfer/gw-big/health",
        ],
    )
    .await;
    let daemon = Daemon::start_online(
        parse(&config_text(&broker.url(), device, &extra)),
        broker.port,
    )
    .await;
    let big = BigPublisher::connect(broker.port);
    // Over broker.max_packet_bytes (4 MiB): rumqttc would fail the
    // connection on it, and the broker would send it again on every connect.
    let batch = vec![b' '; 4_300_000];
    let frame = vec![0xFF; 20_000_000];
    for qos in [QoS::AtLeastOnce, QoS::AtMostOnce] {
        big.publish("sensors/pump-1/imu", qos, batch.clone()).await;
        let e = error_of(&mut obs, "too_large").await;
        assert_eq!(e["pipeline"], "activity");
        assert_eq!(e["source"], "sensors/pump-1/imu");
        assert!(
            e["reason"].as_str().unwrap().contains("4300000 bytes"),
            "{e}"
        );
        big.publish("cameras/yard/objects", qos, frame.clone())
            .await;
        let e = error_of(&mut obs, "too_large").await;
        assert_eq!(e["pipeline"], "objects");
        assert!(
            e["reason"].as_str().unwrap().contains("20000000 bytes"),
            "{e}"
        );
        // The next valid input is answered.
        obs.publish("sensors/pump-1/imu", window_of_50()).await;
        result_on(&mut obs, "edgeinfer/gw-big/results/activity/pump-1").await;
    }
    let h = health(&mut obs).await;
    println!(
        "oversize input: reconnects {}, oversize packets {}, largest packet read {}",
        h["broker"]["reconnects"],
        h["broker"]["oversize_packets"],
        h["broker"]["max_incoming_bytes"]
    );
    assert_eq!(h["broker"]["reconnects"], 0, "the connection stayed up");
    assert_eq!(h["broker"]["oversize_packets"], 0);
    assert_eq!(h["pipelines"]["activity"]["errors"], 2);
    assert_eq!(h["pipelines"]["objects"]["errors"], 2);
    daemon.stop().await;
}

/// Input on a topic of `levels` levels under `deep/`.
fn deep_topic(levels: usize) -> String {
    let mut t = String::from("deep");
    for i in 1..levels {
        t.push_str(&format!("/l{i}"));
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_topic_too_deep_for_the_broker_is_refused_and_the_daemon_serves_on() {
    let broker = Mosquitto::start();
    let spool = tempfile::tempdir().unwrap();
    let device = "gw-deep";
    let extra = format!(
        "{}\n[outbox]\ndir = \"{}\"\n",
        sensor_pipeline("deep/#", "edgeinfer/{device}/results/deep/{1}"),
        spool.path().display()
    );
    let config = parse(&config_text(&broker.url(), device, &extra));
    let mut obs = Observer::connect(
        broker.port,
        &[
            "edgeinfer/gw-deep/results/#",
            "edgeinfer/gw-deep/errors",
            "edgeinfer/gw-deep/health",
        ],
    )
    .await;
    let daemon = Daemon::start_online(config.clone(), broker.port).await;
    // 199 levels in, 4 + 198 = 202 out: over mosquitto's 201 (it drops
    // the connection of a client that publishes one).
    let input = deep_topic(199);
    obs.publish(&input, window_of_50()).await;
    let e = error_of(&mut obs, "unpublishable").await;
    assert!(e["reason"].as_str().unwrap().contains("202 levels"), "{e}");
    obs.publish("deep/ok", window_of_50()).await;
    result_on(&mut obs, "edgeinfer/gw-deep/results/deep/ok").await;
    let h = health(&mut obs).await;
    assert_eq!(h["broker"]["reconnects"], 0);
    assert_eq!(h["outbox"]["unpublishable"], 1);
    daemon.stop().await;
    // Nothing poisonous was left in the outbox: the next run serves.
    let daemon = Daemon::start_online(config, broker.port).await;
    obs.publish("deep/again", window_of_50()).await;
    result_on(&mut obs, "edgeinfer/gw-deep/results/deep/again").await;
    let h = health(&mut obs).await;
    assert_eq!(h["broker"]["reconnects"], 0);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_broker_drops_the_connection_on_is_quarantined() {
    let broker = Mosquitto::start();
    let spool = tempfile::tempdir().unwrap();
    let device = "gw-quar";
    // The daemon is told the broker takes any depth: mosquitto disagrees,
    // and drops the connection on the result each time it is sent.
    let extra = format!(
        "{}\n[outbox]\ndir = \"{}\"\n",
        sensor_pipeline("deep/#", "edgeinfer/{device}/results/deep/{1}"),
        spool.path().display()
    );
    let text = config_text(&broker.url(), device, &extra)
        .replace("[broker]\n", "[broker]\nmax_topic_levels = 100000\n");
    let mut obs = Observer::connect(
        broker.port,
        &[
            "edgeinfer/gw-quar/results/#",
            "edgeinfer/gw-quar/errors",
            "edgeinfer/gw-quar/health",
        ],
    )
    .await;
    let daemon = Daemon::start_online(parse(&text), broker.port).await;
    obs.publish(&deep_topic(199), window_of_50()).await;
    obs.publish("deep/after", window_of_50()).await;
    // The report and the next result may come in either order: the
    // report is queued as the record is dropped, the next record goes out
    // at once.
    let (mut reported, mut answered) = (false, false);
    while !(reported && answered) {
        let m = obs
            .next_where(T, |m| {
                m.topic == "edgeinfer/gw-quar/results/deep/after"
                    || (m.topic.ends_with("/errors") && m.json()["kind"] == "quarantined")
            })
            .await
            .expect("the quarantine report and the result after it");
        if m.topic.ends_with("/errors") {
            println!("quarantined: {}", m.text());
            reported = true;
        } else {
            answered = true;
        }
    }
    // The input itself may come again (its acknowledgement can be lost
    // with the connection the result broke), and its result is quarantined
    // again: what counts is that the outbox drains and the daemon settles.
    let settled = loop {
        let a = health(&mut obs).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let b = health(&mut obs).await;
        if a["broker"]["reconnects"] == b["broker"]["reconnects"]
            && b["outbox"]["queued_messages"] == 0
        {
            break b;
        }
    };
    let (reconnects, quarantined) = (
        settled["broker"]["reconnects"].as_u64().unwrap(),
        settled["outbox"]["quarantined"].as_u64().unwrap(),
    );
    println!("quarantine: reconnects {reconnects}, quarantined {quarantined}");
    assert!(quarantined >= 1);
    // Three connection ends per quarantined record, and now and then one
    // more (an end while another record's PUBACK was still on its way
    // restarts the count); it settled above, so nothing loops forever.
    assert!(
        reconnects <= 5 * quarantined,
        "{reconnects} reconnects for {quarantined} quarantined records"
    );
    obs.publish("deep/last", window_of_50()).await;
    result_on(&mut obs, "edgeinfer/gw-quar/results/deep/last").await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_replies_flow_while_the_broker_withholds_acknowledgements() {
    let broker = Mosquitto::start();
    let proxy = AckHoldingProxy::start(broker.port).await;
    let device = "gw-held";
    let extra = sensor_pipeline("sensors/+/imu", "edgeinfer/{device}/results/activity/{1}");
    // The daemon talks to the broker through the proxy; its in-flight
    // window is small so that it fills quickly.
    let text = config_text(&format!("mqtt://127.0.0.1:{}", proxy.port), device, &extra)
        .replace("[broker]\n", "[broker]\ninflight = 4\n");
    let mut obs = Observer::connect(
        broker.port,
        &[
            "edgeinfer/gw-held/results/#",
            "edgeinfer/gw-held/health",
            "edgeinfer/gw-held/cmd/ping/reply",
        ],
    )
    .await;
    let daemon = Daemon::start_online(parse(&text), broker.port).await;
    proxy.hold.store(true, std::sync::atomic::Ordering::Relaxed);
    for i in 0..10 {
        obs.publish(&format!("sensors/d{i}/imu"), window_of_50())
            .await;
    }
    // The window fills: 4 results out, the rest wait in the outbox.
    let results = obs
        .collect(10, Duration::from_secs(5), |m| {
            m.topic.contains("/results/")
        })
        .await;
    println!("acks withheld: {} of 10 results out", results.len());
    assert!(results.len() <= 4, "results wait for acknowledgements");
    // Health and a ping reply still get through.
    let h = health(&mut obs).await;
    // The window is full: the results out (and `online`, when its PUBACK
    // was withheld too) wait for acknowledgements.
    assert_eq!(h["broker"]["in_flight"].as_u64().unwrap(), 4, "{h}");
    obs.publish("edgeinfer/gw-held/cmd/ping", "").await;
    let reply = obs
        .next_where(T, |m| m.topic.ends_with("/cmd/ping/reply"))
        .await
        .expect("a ping reply while results are held back");
    assert_eq!(reply.json()["ok"], true);
    health(&mut obs).await;
    // Not `stop`: a clean stop waits (up to its grace period) for the
    // acknowledgements the proxy threw away.
    daemon.shutdown.cancel();
}

fn spawn_daemon(dir: &Path, port: u16, device: &str, extra: &str) -> Child {
    let path = dir.join("edgeinfer.toml");
    std::fs::write(
        &path,
        format!(
            "[device]\nid = \"{device}\"\n[broker]\nurl = \"mqtt://127.0.0.1:{port}\"\n[health]\ninterval_s = 1\n{extra}"
        ),
    )
    .unwrap();
    Command::new(env!("CARGO_BIN_EXE_edgeinfer"))
        .args(["run", "-c"])
        .arg(&path)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("daemon.log")).unwrap())
        .spawn()
        .unwrap()
}

fn png_gray(w: u32, h: u32) -> Vec<u8> {
    // Flat grey, best compression: a few KB of PNG for millions of pixels.
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    use image::ImageEncoder;
    let img = image::GrayImage::from_pixel(w, h, image::Luma([128]));
    let mut out = Vec::new();
    PngEncoder::new_with_quality(&mut out, CompressionType::Best, FilterType::NoFilter)
        .write_image(&img, w, h, image::ExtendedColorType::L8)
        .unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_that_would_blow_the_memory_budget_are_refused_before_decoding() {
    const BUDGET_MB: u64 = 96;
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let device = "gw-pixels";
    let extra = format!("[limits]\nmemory_mb = {BUDGET_MB}\n{}", camera_pipeline());
    let mut obs = Observer::connect(
        broker.port,
        &[
            "edgeinfer/gw-pixels/status",
            "edgeinfer/gw-pixels/results/#",
            "edgeinfer/gw-pixels/errors",
        ],
    )
    .await;
    let big = BigPublisher::connect(broker.port);
    let mut child = spawn_daemon(dir.path(), broker.port, device, &extra);
    assert!(
        obs.next_where(T, |m| m.text() == "online").await.is_some(),
        "came online"
    );
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("16000000x1 PNG", png_gray(16_000_000, 1)),
        ("1x16000000 PNG", png_gray(1, 16_000_000)),
        ("160000x100 PNG", png_gray(160_000, 100)),
        (
            "4000x4000 progressive JPEG",
            std::fs::read(repo().join("tests/fixtures/progressive_4000.jpg")).unwrap(),
        ),
    ];
    for (what, payload) in cases {
        println!("{what}: {} bytes", payload.len());
        big.publish("cameras/yard/objects", QoS::AtLeastOnce, payload)
            .await;
        let answer = obs
            .next_where(Duration::from_secs(60), |m| {
                m.topic.ends_with("/errors") || m.topic.contains("/results/")
            })
            .await
            .unwrap_or_else(|| panic!("{what}: an answer"));
        let peak = vm_hwm_bytes(child.id());
        println!(
            "{what}: {} {}, peak RSS so far {:.1} MiB (budget {BUDGET_MB} MiB)",
            answer.topic,
            answer.text(),
            peak as f64 / (1 << 20) as f64
        );
        assert!(
            answer.topic.ends_with("/errors"),
            "{what}: {}",
            answer.text()
        );
        assert_eq!(answer.json()["kind"], "too_large", "{what}");
        assert!(
            peak < BUDGET_MB << 20,
            "{what}: peak RSS {peak} over the {BUDGET_MB} MiB budget"
        );
    }
    // A real frame still gets its result.
    let frame = std::fs::read(repo().join("models/samples/camera/astronaut.jpg")).unwrap();
    obs.publish("cameras/yard/objects", frame).await;
    assert!(obs
        .next_where(T, |m| m.topic.ends_with("/results/objects/yard"))
        .await
        .is_some());
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    assert!(child.wait().unwrap().success());
    let log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap();
    assert!(!log.contains("panicked"), "{log}");
}

/// The executable's resident size, from `/proc/self/smaps`.
fn exe_rss_kib() -> u64 {
    let exe = std::fs::read_link("/proc/self/exe").unwrap();
    let maps =
        edgeinfer::pageout::parse_smaps(&std::fs::read_to_string("/proc/self/smaps").unwrap());
    maps.iter()
        .filter(|m| Path::new(&m.path) == exe)
        .map(|m| m.rss_kib)
        .sum()
}

/// Handing back the start-up code (what the daemon does once ready): the
/// executable's resident pages go, and a model loaded before still answers
/// bit for bit the same, its code and constants refaulted from the file.
/// Not run under qemu-user (the ARM lists in .ci/run), which ignores
/// madvise hints.
#[test]
fn start_up_code_pages_are_handed_back_and_refault_unchanged() {
    use edgeinfer::pipeline::pre::Preprocessor;
    let model = std::sync::Arc::new(
        edgeinfer::model::Model::load(&repo().join("models/activity.toml")).unwrap(),
    );
    let case = &activity_reference().cases[0];
    let raw: Vec<f32> = case.input.iter().flatten().copied().collect();
    let answer = || {
        let channels = *model.input().shape.last().unwrap();
        let mut pre = Preprocessor::new(&model, channels).unwrap();
        let mut normalised = Vec::new();
        let tensor = pre.tensor(&raw, &mut normalised);
        model.session().unwrap().run(tensor).unwrap()
    };
    let before = answer();

    let resident = exe_rss_kib();
    let released = edgeinfer::pageout::release_code_pages().unwrap();
    let after_release = exe_rss_kib();
    assert!(released.mappings >= 1, "{released:?}");
    assert!(released.bytes > 0, "{released:?}");
    assert!(
        after_release * 2 < resident,
        "executable still {after_release} KiB resident of {resident} KiB"
    );

    let again = answer();
    assert_eq!(
        before.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        again.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    // The second call finds the pages the model just faulted back in.
    assert!(edgeinfer::pageout::release_code_pages().unwrap().bytes > 0);
}
