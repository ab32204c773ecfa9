//! The daemon against a real mosquitto, driven the way a user's devices
//! would drive it: publish sensor payloads, read results, errors and health.

mod common;

use common::*;
use std::time::Duration;

const T: Duration = Duration::from_secs(15);

fn batch(ts: u64, samples: &[Vec<f32>]) -> String {
    serde_json::json!({ "ts": ts, "samples": samples }).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_back_samples_get_the_reference_labels_in_the_documented_schema() {
    let broker = Mosquitto::start();
    let mut obs = Observer::connect(broker.port, &["edgeinfer/gw-test/results/#"]).await;
    let daemon = Daemon::start_online(
        parse(&config_text(&broker.url(), "gw-test", ACTIVITY_PIPELINE)),
        broker.port,
    )
    .await;
    // One window per source: every case is its own device.
    let reference = activity_reference();
    for (i, case) in reference.cases.iter().enumerate() {
        obs.publish(
            &format!("sensors/case-{i}/imu"),
            batch(1_000_000 + i as u64, &case.input),
        )
        .await;
    }
    let results = obs
        .collect(reference.cases.len(), T, |m| {
            m.topic.contains("/results/activity/")
        })
        .await;
    assert_eq!(
        results.len(),
        reference.cases.len(),
        "one result per held-back window"
    );
    let sha = edgeinfer::model::Model::load(&repo().join("models/activity.toml"))
        .unwrap()
        .sha256;
    let mut correct = 0;
    for r in &results {
        let v = r.json();
        let i: usize = r
            .topic
            .rsplit('/')
            .next()
            .unwrap()
            .trim_start_matches("case-")
            .parse()
            .unwrap();
        let case = &reference.cases[i];
        assert_eq!(v["pipeline"], "activity");
        assert_eq!(v["source"], format!("sensors/case-{i}/imu"));
        assert_eq!(v["model"], "activity");
        assert_eq!(v["model_sha256"], sha.as_str());
        assert_eq!(v["ts"], 1_000_000 + i as u64, "ts comes from the payload");
        assert_eq!(v["seq"], 0);
        for k in ["queue", "pre", "infer", "post"] {
            let ms = v["latency_ms"][k].as_f64().unwrap();
            assert!((0.0..10_000.0).contains(&ms), "latency_ms.{k} = {ms}");
        }
        // Running the model takes time (microseconds: 0.001 ms and more).
        assert!(v["latency_ms"]["infer"].as_f64().unwrap() > 0.0);
        let top = v["output"]["top"].as_array().unwrap();
        assert_eq!(top.len(), 2, "top_k = 2 in the manifest");
        let label = top[0]["label"].as_str().unwrap();
        assert_eq!(
            label,
            ACTIVITY_LABELS[argmax(&case.output)],
            "case {i}: tract and onnxruntime disagree"
        );
        let s0 = top[0]["score"].as_f64().unwrap();
        assert!(s0 > 0.0 && s0 <= 1.0 && s0 >= top[1]["score"].as_f64().unwrap());
        if label == case.label {
            correct += 1;
        }
    }
    assert!(
        correct * 100 >= results.len() * 85,
        "{correct}/{} correct",
        results.len()
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sliding_windows_follow_size_and_stride_per_source() {
    let broker = Mosquitto::start();
    let mut obs = Observer::connect(broker.port, &["edgeinfer/gw-w/results/#"]).await;
    let pipeline = ACTIVITY_PIPELINE.replace("stride = 50", "stride = 10");
    let daemon = Daemon::start_online(
        parse(&config_text(&broker.url(), "gw-w", &pipeline)),
        broker.port,
    )
    .await;
    let case = &activity_reference().cases[0];
    // 80 single-sample messages from one device: windows at samples 50, 60, 70, 80.
    for k in 0..80 {
        let sample = &case.input[k % 50];
        obs.publish(
            "sensors/w1/imu",
            serde_json::json!({ "ts": k, "values": sample }).to_string(),
        )
        .await;
    }
    let results = obs
        .collect(10, Duration::from_secs(5), |m| m.topic.ends_with("/w1"))
        .await;
    let seqs: Vec<u64> = results
        .iter()
        .map(|r| r.json()["seq"].as_u64().unwrap())
        .collect();
    let ts: Vec<u64> = results
        .iter()
        .map(|r| r.json()["ts"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![0, 1, 2, 3]);
    assert_eq!(
        ts,
        vec![49, 59, 69, 79],
        "each result carries the ts of the message that completed its window"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_class_of_bad_input_is_reported_and_the_pipeline_keeps_serving() {
    let broker = Mosquitto::start();
    let mut obs = Observer::connect(
        broker.port,
        &["edgeinfer/gw-bad/errors", "edgeinfer/gw-bad/results/#"],
    )
    .await;
    let extra = format!(
        "[limits]\nmax_payload_bytes = 16384\n{ACTIVITY_PIPELINE}\n{}",
        r#"
[[pipeline]]
name = "raw"
kind = "sensor"
topics = ["raw/+/imu"]
model = "models/activity.toml"
payload = "f32le"
"#
    );
    let daemon = Daemon::start_online(
        parse(&config_text(&broker.url(), "gw-bad", &extra)),
        broker.port,
    )
    .await;

    let f32le = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let bad: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "sensors/d1/imu",
            b"{\"values\": [1, 2".to_vec(),
            "malformed_json",
        ),
        (
            "sensors/d2/imu",
            b"{\"values\": [1, 2, 3]}".to_vec(),
            "wrong_channel_count",
        ),
        (
            "sensors/d3/imu",
            b"{\"values\": [1, null, 3, 4, 5, 6]}".to_vec(),
            "non_finite",
        ),
        (
            "sensors/d4/imu",
            b"{\"values\": [1, 1e39, 3, 4, 5, 6]}".to_vec(),
            "non_finite",
        ),
        ("sensors/d5/imu", vec![b' '; 20_000], "too_large"),
        ("sensors/d6/imu", Vec::new(), "empty"),
        ("sensors/d7/imu", b"{\"ts\": 5}".to_vec(), "no_samples"),
        (
            "raw/d8/imu",
            f32le(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])[..10].to_vec(),
            "bad_length",
        ),
        (
            "raw/d9/imu",
            f32le(&[1.0, 2.0, f32::NAN, 4.0, 5.0, 6.0]),
            "non_finite",
        ),
        (
            "raw/d10/imu",
            f32le(&[1.0, 2.0, f32::INFINITY, 4.0, 5.0, 6.0]),
            "non_finite",
        ),
    ];
    for (topic, payload, _) in &bad {
        obs.publish(topic, payload.clone()).await;
    }
    let errors = obs
        .collect(bad.len(), T, |m| m.topic.ends_with("/errors"))
        .await;
    assert_eq!(
        errors.len(),
        bad.len(),
        "one errors-topic entry per bad input"
    );
    for (topic, _, kind) in &bad {
        let e = errors
            .iter()
            .map(|e| e.json())
            .find(|e| e["source"] == *topic)
            .unwrap_or_else(|| panic!("no error for {topic}"));
        assert_eq!(e["kind"], *kind, "{topic}: {e}");
        assert!(!e["reason"].as_str().unwrap().is_empty());
        let expected_pipeline = if topic.starts_with("raw/") {
            "raw"
        } else {
            "activity"
        };
        assert_eq!(e["pipeline"], expected_pipeline);
    }

    // Both pipelines still serve, and the bad inputs left no partial windows
    // behind: a full good window from a device that sent garbage first works.
    let case = &activity_reference().cases[3];
    obs.publish("sensors/d2/imu", batch(7, &case.input)).await;
    let flat: Vec<f32> = case.input.iter().flatten().copied().collect();
    obs.publish("raw/d9/imu", f32le(&flat)).await;
    let results = obs.collect(2, T, |m| m.topic.contains("/results/")).await;
    assert_eq!(
        results.len(),
        2,
        "pipelines serve after bad input: {:?}",
        results.iter().map(|r| r.topic.clone()).collect::<Vec<_>>()
    );
    for r in results {
        assert_eq!(
            r.json()["output"]["top"][0]["label"],
            ACTIVITY_LABELS[argmax(&case.output)]
        );
    }
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_counters_system_and_broker_state() {
    let broker = Mosquitto::start();
    let mut obs = Observer::connect(
        broker.port,
        &["edgeinfer/gw-h/health", "edgeinfer/gw-h/results/#"],
    )
    .await;
    let daemon = Daemon::start_online(
        parse(&config_text(&broker.url(), "gw-h", ACTIVITY_PIPELINE)),
        broker.port,
    )
    .await;
    let case = &activity_reference().cases[0];
    obs.publish("sensors/h1/imu", batch(1, &case.input)).await;
    obs.publish("sensors/h1/imu", "not json").await;
    obs.next_where(T, |m| m.topic.contains("/results/"))
        .await
        .expect("a result");
    // The first health after both inputs were handled.
    let health = loop {
        let h = obs
            .next_where(T, |m| m.topic.ends_with("/health"))
            .await
            .expect("health arrives")
            .json();
        if h["pipelines"]["activity"]["errors"] == 1 {
            break h;
        }
    };
    assert_eq!(health["device"], "gw-h");
    assert!(health["uptime_s"].is_u64());
    // Percent of one core: at most 100 per core.
    let cores = std::thread::available_parallelism().unwrap().get() as f64;
    let cpu = health["cpu_percent"].as_f64().unwrap();
    assert!((0.0..=100.0 * cores).contains(&cpu), "cpu_percent {cpu}");
    assert_eq!(health["load_avg"].as_array().unwrap().len(), 3);
    assert!(health["memory"]["rss_bytes"].as_u64().unwrap() > 1_000_000);
    assert!(health["memory"]["system_available_bytes"].as_u64().unwrap() > 0);
    assert!(health["temperature_c"].is_object());
    let p = &health["pipelines"]["activity"];
    assert_eq!(p["state"], "running");
    assert_eq!(p["received"], 2);
    assert_eq!(p["processed"], 1);
    assert_eq!(p["results"], 1);
    assert_eq!(p["dropped"], 0);
    assert_eq!(p["queue_depth"], 0);
    assert!(p["latency_ms"]["p50"].as_f64().unwrap() > 0.0);
    let m = &health["models"]["activity"];
    assert_eq!(m["backend"], "tract-cpu");
    assert!(m["inference_ms"]["p99"].as_f64().unwrap() > 0.0);
    assert_eq!(health["broker"]["connected"], true);
    assert_eq!(health["broker"]["reconnects"], 0);
    assert!(health["outbox"]["queued_messages"].is_u64());
    assert!(health["outbox"]["queued_bytes"].is_u64());
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_commands_are_answered_on_their_reply_topic() {
    let broker = Mosquitto::start();
    let mut obs = Observer::connect(broker.port, &["edgeinfer/gw-c/cmd/+/reply"]).await;
    let daemon = Daemon::start_online(
        parse(&config_text(&broker.url(), "gw-c", ACTIVITY_PIPELINE)),
        broker.port,
    )
    .await;
    obs.publish("edgeinfer/gw-c/cmd/ping", "").await;
    let pong = obs
        .next_where(T, |m| m.topic == "edgeinfer/gw-c/cmd/ping/reply")
        .await
        .expect("ping reply")
        .json();
    assert_eq!(pong["ok"], true);
    assert_eq!(pong["device"], "gw-c");
    obs.publish("edgeinfer/gw-c/cmd/reboot", "").await;
    let no = obs
        .next_where(T, |m| m.topic == "edgeinfer/gw-c/cmd/reboot/reply")
        .await
        .expect("reply")
        .json();
    assert_eq!(no["ok"], false);
    obs.publish("edgeinfer/gw-c/cmd/health", "").await;
    let h = obs
        .next_where(T, |m| m.topic == "edgeinfer/gw-c/cmd/health/reply")
        .await
        .expect("reply")
        .json();
    assert_eq!(h["health"]["device"], "gw-c");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_fails_to_load_disables_only_its_own_pipeline() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("broken.onnx"), b"this is not a protobuf").unwrap();
    let extra = format!(
        "{ACTIVITY_PIPELINE}\n[[pipeline]]\nname = \"broken\"\nkind = \"sensor\"\ntopics = [\"other/+\"]\nmodel = \"{}\"\n\
         [[pipeline]]\nname = \"panics\"\nkind = \"sensor\"\ntopics = [\"third/+\"]\nmodel = \"{}\"\n",
        dir.path().join("broken.onnx").display(),
        repo().join("tests/fixtures/pnet_dynamic.onnx").display()
    );
    let mut obs = Observer::connect(
        broker.port,
        &["edgeinfer/gw-f/health", "edgeinfer/gw-f/results/#"],
    )
    .await;
    let daemon = Daemon::start_online(
        parse(&config_text(&broker.url(), "gw-f", &extra)),
        broker.port,
    )
    .await;
    obs.publish(
        "sensors/f1/imu",
        batch(1, &activity_reference().cases[0].input),
    )
    .await;
    assert!(
        obs.next_where(T, |m| m.topic.contains("/results/"))
            .await
            .is_some(),
        "the good pipeline serves"
    );
    let health = obs
        .next_where(T, |m| m.topic.ends_with("/health"))
        .await
        .unwrap()
        .json();
    assert_eq!(health["pipelines"]["broken"]["state"], "failed");
    let error = health["pipelines"]["broken"]["error"].as_str().unwrap();
    assert!(
        error.contains("model broken") && error.contains("not a readable ONNX model"),
        "{error}"
    );
    let panicked = health["pipelines"]["panics"]["error"].as_str().unwrap();
    assert!(panicked.contains("panicked while loading"), "{panicked}");
    assert_eq!(health["pipelines"]["panics"]["state"], "failed");
    assert_eq!(health["pipelines"]["activity"]["state"], "running");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_and_resubscribes_after_a_broker_restart() {
    let mut broker = Mosquitto::start();
    let daemon = Daemon::start_online(
        parse(&config_text(&broker.url(), "gw-r", ACTIVITY_PIPELINE)),
        broker.port,
    )
    .await;
    {
        let mut obs = Observer::connect(broker.port, &["edgeinfer/gw-r/results/#"]).await;
        obs.publish(
            "sensors/r1/imu",
            batch(1, &activity_reference().cases[0].input),
        )
        .await;
        assert!(
            obs.next_where(T, |_| true).await.is_some(),
            "result before the restart"
        );
    }
    broker.stop();
    tokio::time::sleep(Duration::from_millis(1500)).await; // the daemon sees the loss and backs off
    broker.restart();
    // A fresh broker has no sessions: the daemon must subscribe again.
    let mut obs = Observer::connect(
        broker.port,
        &[
            "edgeinfer/gw-r/results/#",
            "edgeinfer/gw-r/health",
            "edgeinfer/gw-r/status",
        ],
    )
    .await;
    let online = obs
        .next_where(T, |m| m.topic.ends_with("/status"))
        .await
        .expect("status after reconnect");
    assert_eq!(online.text(), "online");
    obs.publish(
        "sensors/r2/imu",
        batch(2, &activity_reference().cases[1].input),
    )
    .await;
    let r = obs
        .next_where(T, |m| m.topic.contains("/results/"))
        .await
        .expect("result after the restart");
    assert_eq!(r.json()["source"], "sensors/r2/imu");
    let h = obs
        .next_where(T, |m| m.topic.ends_with("/health"))
        .await
        .unwrap()
        .json();
    assert!(h["broker"]["reconnects"].as_u64().unwrap() >= 1);
    assert_eq!(h["broker"]["connected"], true);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_without_a_broker_and_connects_when_it_comes_up() {
    let port = free_port();
    let daemon = Daemon::start(parse(&config_text(
        &format!("mqtt://127.0.0.1:{port}"),
        "gw-late",
        ACTIVITY_PIPELINE,
    )));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(
        !daemon.handle.is_finished(),
        "an unreachable broker is not fatal"
    );
    let broker = Mosquitto::start_on(port);
    let mut obs = Observer::connect(broker.port, &["edgeinfer/gw-late/status"]).await;
    let status = obs
        .next_where(T, |_| true)
        .await
        .expect("status once the broker is up");
    assert_eq!(status.text(), "online");
    daemon.stop().await;
}

/// A streaming model's recurrent state is fed back per source topic: two
/// devices interleaved give each the results onnxruntime gives when it
/// carries that device's state alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_models_keep_recurrent_state_per_source() {
    #[derive(serde::Deserialize)]
    struct Stream {
        windows: Vec<Vec<Vec<f32>>>,
        logits: Vec<Vec<f32>>,
        stateless_logits: Vec<Vec<f32>>,
    }
    let text =
        std::fs::read_to_string(repo().join("tests/fixtures/stateful.reference.json")).unwrap();
    let reference: std::collections::HashMap<String, Stream> = serde_json::from_str(&text).unwrap();
    let broker = Mosquitto::start();
    let mut obs = Observer::connect(broker.port, &["edgeinfer/gw-st/results/#"]).await;
    let pipeline = format!(
        "[[pipeline]]\nname = \"stream\"\nkind = \"sensor\"\ntopics = [\"mic/+\"]\nmodel = \"{}\"\nresults = \"edgeinfer/{{device}}/results/{{1}}\"\n",
        repo().join("tests/fixtures/stateful.toml").display()
    );
    let daemon = Daemon::start_online(
        parse(&config_text(&broker.url(), "gw-st", &pipeline)),
        broker.port,
    )
    .await;
    for k in 0..5 {
        for source in ["src-a", "src-b"] {
            obs.publish(
                &format!("mic/{source}"),
                batch(k as u64, &reference[source].windows[k]),
            )
            .await;
        }
    }
    let results = obs.collect(10, T, |_| true).await;
    assert_eq!(results.len(), 10);
    let softmax = |v: &[f32]| {
        let m = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = v.iter().map(|x| (x - m).exp()).collect();
        let s: f32 = e.iter().sum();
        e.into_iter().map(|x| x / s).collect::<Vec<f32>>()
    };
    for r in results {
        let v = r.json();
        let source = r.topic.rsplit('/').next().unwrap().to_owned();
        let k = v["seq"].as_u64().unwrap() as usize;
        let want = softmax(&reference[&source].logits[k]);
        let cold = softmax(&reference[&source].stateless_logits[k]);
        for entry in v["output"]["top"].as_array().unwrap() {
            let i = ["a", "b", "c"]
                .iter()
                .position(|l| *l == entry["label"])
                .unwrap();
            let got = entry["score"].as_f64().unwrap() as f32;
            assert!(
                (got - want[i]).abs() < 1e-4,
                "{source} window {k} class {i}: {got} vs {}",
                want[i]
            );
        }
        if k > 0 {
            let differs = (0..3).any(|i| (want[i] - cold[i]).abs() > 1e-3);
            assert!(differs, "{source} window {k}: the reference does not depend on state, the test proves nothing");
        }
    }
    daemon.stop().await;
}

/// `run` is a library call: it must work on a current-thread runtime too
/// (model loading runs on the blocking pool, not `block_in_place`).
#[tokio::test]
async fn runs_on_a_current_thread_runtime() {
    let broker = Mosquitto::start();
    let mut obs = Observer::connect(broker.port, &["edgeinfer/gw-ct/#"]).await;
    let daemon = Daemon::start(parse(&config_text(
        &broker.url(),
        "gw-ct",
        ACTIVITY_PIPELINE,
    )));
    let online = obs
        .next_where(T, |m| m.topic.ends_with("/status"))
        .await
        .expect("online");
    assert_eq!(online.text(), "online");
    tokio::time::sleep(Duration::from_millis(300)).await;
    obs.publish(
        "sensors/ct/imu",
        batch(1, &activity_reference().cases[0].input),
    )
    .await;
    assert!(obs
        .next_where(T, |m| m.topic.contains("/results/"))
        .await
        .is_some());
    daemon.stop().await;
}

/// `limits.max_sources` bounds the windows kept per pipeline: a new source
/// beyond it evicts the least recently seen one, whose window starts over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_beyond_the_limit_evict_the_least_recently_seen_window() {
    let broker = Mosquitto::start();
    let mut obs = Observer::connect(
        broker.port,
        &["edgeinfer/gw-ev/results/#", "edgeinfer/gw-ev/health"],
    )
    .await;
    let extra = format!("[limits]\nmax_sources = 2\n{ACTIVITY_PIPELINE}");
    let daemon = Daemon::start_online(
        parse(&config_text(&broker.url(), "gw-ev", &extra)),
        broker.port,
    )
    .await;
    let samples = &activity_reference().cases[0].input; // 50 samples: one window
                                                        // a, b, c each send 30 samples: c evicts a (the least recently seen).
    for device in ["a", "b", "c"] {
        obs.publish(&format!("sensors/{device}/imu"), batch(1, &samples[..30]))
            .await;
    }
    // 20 more from b (completes its window), then from a: a's return evicts
    // c (now the least recently seen) and a starts over with only 20.
    for device in ["b", "a"] {
        obs.publish(&format!("sensors/{device}/imu"), batch(2, &samples[30..]))
            .await;
    }
    let results = obs
        .collect(2, Duration::from_secs(3), |m| m.topic.contains("/results/"))
        .await;
    let sources: Vec<String> = results
        .iter()
        .map(|r| r.json()["source"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(sources, vec!["sensors/b/imu"], "only b has a full window");
    let health = loop {
        let h = obs
            .next_where(T, |m| m.topic.ends_with("/health"))
            .await
            .expect("health")
            .json();
        if h["pipelines"]["activity"]["processed"] == 5 {
            break h;
        }
    };
    // c evicted a, then a's return evicted c.
    assert_eq!(health["pipelines"]["activity"]["evicted_sources"], 2);
    daemon.stop().await;
}

/// A raw HTTP/1.1 exchange with the metrics endpoint: (status line, headers, body).
async fn http(port: u16, request: &str) -> (String, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).await.unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap();
    let (status, headers) = head.split_once("\r\n").unwrap();
    (status.to_owned(), headers.to_owned(), body.to_owned())
}

/// The value of the sample `name{labels}` in an exposition.
fn sample(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in\n{body}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn metrics_are_scraped_over_http_in_openmetrics_form() {
    let broker = Mosquitto::start();
    let port = free_port();
    let extra =
        format!("[metrics]\nenabled = true\nlisten = \"127.0.0.1:{port}\"\n{ACTIVITY_PIPELINE}");
    let config = parse(&config_text(&broker.url(), "m1", &extra));
    let mut obs = Observer::connect(broker.port, &["edgeinfer/m1/results/#"]).await;
    let daemon = Daemon::start_online(config, broker.port).await;
    let case = &activity_reference().cases[0];
    for ts in 0..3 {
        obs.publish("sensors/w1/imu", batch(ts, &case.input)).await;
    }
    let results = obs
        .collect(3, Duration::from_secs(20), |m| {
            m.topic.contains("/results/")
        })
        .await;
    assert_eq!(results.len(), 3);

    let (status, headers, body) = http(port, "GET /metrics HTTP/1.1\r\nHost: gw\r\n\r\n").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        headers.contains("application/openmetrics-text; version=1.0.0"),
        "{headers}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");
    assert_eq!(
        sample(
            &body,
            "edgeinfer_pipeline_received_total{pipeline=\"activity\"}"
        ),
        3.0
    );
    assert_eq!(
        sample(
            &body,
            "edgeinfer_pipeline_results_total{pipeline=\"activity\"}"
        ),
        3.0
    );
    assert_eq!(
        sample(
            &body,
            "edgeinfer_pipeline_errors_total{pipeline=\"activity\"}"
        ),
        0.0
    );
    assert_eq!(
        sample(&body, "edgeinfer_pipeline_up{pipeline=\"activity\"}"),
        1.0
    );
    assert_eq!(sample(&body, "edgeinfer_broker_connected"), 1.0);
    assert_eq!(
        sample(
            &body,
            "edgeinfer_pipeline_latency_seconds_count{pipeline=\"activity\"}"
        ),
        3.0
    );
    // Cumulative buckets, ending at the count.
    let buckets: Vec<f64> = body
        .lines()
        .filter(|l| l.starts_with("edgeinfer_pipeline_latency_seconds_bucket{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(buckets.len(), 17);
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
    assert_eq!(*buckets.last().unwrap(), 3.0);
    assert_eq!(
        sample(
            &body,
            "edgeinfer_model_inference_seconds_count{model=\"activity\",backend=\"tract-cpu\"}"
        ),
        3.0
    );
    assert!(sample(&body, "edgeinfer_resident_memory_bytes") > 1e6);

    let (status, _, _) = http(port, "GET / HTTP/1.1\r\n\r\n").await;
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let (status, _, _) = http(port, "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
    daemon.stop().await;
    // Stopped with the daemon: the port is free again.
    assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_ok());
}

/// Resolves every `value_json…` path in a Home Assistant template against
/// `json` (`.key`, `[0]`, `["key"]`; a trailing `.method(` is a call, not a
/// key): each must name a value that exists.
fn template_paths_resolve(template: &str, json: &serde_json::Value) -> Result<(), String> {
    let mut rest = template;
    while let Some(at) = rest.find("value_json") {
        let path = &rest[at + "value_json".len()..];
        let mut v = json;
        let mut chars = path;
        loop {
            if let Some(r) = chars.strip_prefix('.') {
                let end = r
                    .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .unwrap_or(r.len());
                if r[end..].starts_with('(') {
                    break; // a method call such as .values()
                }
                v = &v[&r[..end]];
                chars = &r[end..];
            } else if let Some(r) = chars.strip_prefix('[') {
                let end = r.find(']').unwrap();
                let key = &r[..end];
                v = match key.parse::<usize>() {
                    Ok(i) => &v[i],
                    Err(_) => &v[key.trim_matches('"').trim_matches('\'')],
                };
                chars = &r[end + 1..];
            } else {
                break;
            }
            if v.is_null() {
                return Err(format!("{template}: {path} is not in {json}"));
            }
        }
        rest = chars;
    }
    Ok(())
}

/// Keys Home Assistant documents for MQTT sensors and binary sensors (and
/// the shared keys of a device-based discovery payload).
const HA_KEYS: &[&str] = &[
    "p",
    "name",
    "unique_id",
    "state_topic",
    "value_template",
    "json_attributes_topic",
    "json_attributes_template",
    "unit_of_measurement",
    "device_class",
    "state_class",
    "entity_category",
    "icon",
    "payload_on",
    "payload_off",
    "expire_after",
    "force_update",
    "availability_topic",
    "payload_available",
    "payload_not_available",
    "qos",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn home_assistant_discovery_is_published_kept_current_and_cleans_up() {
    let broker = Mosquitto::start();
    let config_topic = "homeassistant/device/edgeinfer_ha1/config";
    // A config from an earlier run, with a pipeline that is gone now.
    let publisher = Observer::connect(broker.port, &["unused/for-publishing"]).await;
    let stale = serde_json::json!({
        "dev": {"ids": ["edgeinfer_ha1"]}, "o": {"name": "edgeinfer"},
        "cmps": {"old_result": {"p": "sensor", "unique_id": "edgeinfer_ha1_old_result"},
                 "old_running": {"p": "binary_sensor", "unique_id": "edgeinfer_ha1_old_running"}}
    });
    publisher
        .client
        .publish(
            config_topic,
            rumqttc::QoS::AtLeastOnce,
            true,
            stale.to_string(),
        )
        .await
        .unwrap();
    let mut obs = Observer::connect(
        broker.port,
        &[
            config_topic,
            "edgeinfer/ha1/state/#",
            "edgeinfer/ha1/health",
        ],
    )
    .await;
    // The stale retained config reaches the observer first.
    obs.next_where(T, |m| m.topic == config_topic)
        .await
        .unwrap();
    let extra = format!("[home_assistant]\nenabled = true\n{ACTIVITY_PIPELINE}");
    let config = parse(&config_text(&broker.url(), "ha1", &extra));
    let daemon = Daemon::start_online(config, broker.port).await;

    // Published within the jitter (2 s), retained; the stale pipeline's
    // components come back reduced to their platform.
    let mut published = Vec::new();
    let removed = loop {
        let m = obs
            .next_where(T, |m| m.topic == config_topic)
            .await
            .expect("a discovery config from the daemon");
        let json = m.json();
        published.push(json.clone());
        if json["cmps"]["old_result"] == serde_json::json!({"p": "sensor"}) {
            break json;
        }
    };
    println!(
        "discovery: {}",
        serde_json::to_string_pretty(&removed).unwrap()
    );
    assert_eq!(
        removed["cmps"]["old_running"],
        serde_json::json!({"p": "binary_sensor"})
    );
    assert_eq!(removed["dev"]["ids"][0], "edgeinfer_ha1");
    assert_eq!(removed["o"]["name"], "edgeinfer");
    assert_eq!(removed["availability_topic"], "edgeinfer/ha1/status");
    let cmps = removed["cmps"].as_object().unwrap();
    for key in [
        "activity_result",
        "activity_latency",
        "activity_running",
        "cpu",
        "rss",
        "temperature",
        "outbox",
    ] {
        let c = cmps
            .get(key)
            .unwrap_or_else(|| panic!("no {key} in {removed}"));
        assert!(["sensor", "binary_sensor"].contains(&c["p"].as_str().unwrap()));
        assert_eq!(c["unique_id"], format!("edgeinfer_ha1_{key}"));
        for k in c.as_object().unwrap().keys() {
            assert!(
                HA_KEYS.contains(&k.as_str()),
                "{key}: {k} is not a documented option"
            );
        }
    }
    for k in removed.as_object().unwrap().keys() {
        assert!(
            ["dev", "o", "cmps"].contains(&k.as_str()) || HA_KEYS.contains(&k.as_str()),
            "{k}"
        );
    }

    // The latest result on its fixed state topic, which the result sensor reads.
    let case = &activity_reference().cases[0];
    obs.publish("sensors/w1/imu", batch(1, &case.input)).await;
    let state = obs
        .next_where(T, |m| m.topic == "edgeinfer/ha1/state/activity")
        .await
        .expect("the latest result on the state topic");
    let state = state.json();
    // Retained, for Home Assistant's restarts.
    let mut late = Observer::connect(broker.port, &["edgeinfer/ha1/state/activity"]).await;
    let kept = late.next_where(T, |_| true).await.unwrap();
    assert!(kept.retain);
    assert_eq!(kept.json(), state);
    assert_eq!(state["output"]["top"][0]["label"], case.label.as_str());
    let result = &cmps["activity_result"];
    assert_eq!(result["state_topic"], "edgeinfer/ha1/state/activity");
    template_paths_resolve(result["value_template"].as_str().unwrap(), &state).unwrap();
    template_paths_resolve(result["json_attributes_template"].as_str().unwrap(), &state).unwrap();
    // The other entities read the health message.
    let health = obs
        .next_where(T, |m| m.topic == "edgeinfer/ha1/health")
        .await
        .unwrap()
        .json();
    for key in [
        "activity_latency",
        "activity_running",
        "cpu",
        "rss",
        "temperature",
        "outbox",
    ] {
        assert_eq!(cmps[key]["state_topic"], "edgeinfer/ha1/health");
        template_paths_resolve(cmps[key]["value_template"].as_str().unwrap(), &health).unwrap();
    }

    // Home Assistant's birth message: discovery again.
    publisher.publish("homeassistant/status", "online").await;
    let again = obs
        .next_where(Duration::from_secs(5), |m| m.topic == config_topic)
        .await;
    assert!(
        again.is_some(),
        "republished after Home Assistant's birth message"
    );
    daemon.stop().await;
}
