//! The `edgeinfer` binary as operators and systemd use it: exit codes,
//! signals, the retained status and the Last Will.

mod common;

use common::*;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_edgeinfer");
const T: Duration = Duration::from_secs(15);

fn edgeinfer(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run edgeinfer")
}

fn write_config(dir: &Path, text: &str) -> String {
    // Configs resolve model paths against their own directory.
    let models = repo().join("models");
    let text = text.replace("\"models/", &format!("\"{}/", models.display()));
    let path = dir.join("edgeinfer.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "edgeinfer did not exit within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn print_config_output_is_a_valid_config() {
    let out = edgeinfer(&["print-config"]);
    assert!(out.status.success());
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &String::from_utf8(out.stdout).unwrap());
    let check = edgeinfer(&["check-config", "-c", &path]);
    assert_eq!(
        check.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}

#[test]
fn check_config_reports_every_problem_with_its_key_and_exits_78() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("corrupt.onnx"), b"\x08\x07garbage").unwrap();
    let fixtures = repo().join("tests/fixtures");
    let pipeline = |name: &str, model: &str| {
        format!("[[pipeline]]\nname = \"{name}\"\nkind = \"sensor\"\ntopics = [\"s/{name}\"]\nmodel = \"{model}\"\n")
    };
    let text = format!(
        "[broker]\nurl = \"mqtt://127.0.0.1:1\"\nkeep_alive_s = 0\n{}window = {{ size = 40 }}\n{}{}{}",
        pipeline("a", "models/activity.toml"),
        pipeline("b", &dir.path().join("corrupt.onnx").display().to_string()),
        pipeline("c", &fixtures.join("unsupported_op.onnx").display().to_string()),
        pipeline("d", &fixtures.join("pnet_dynamic.onnx").display().to_string()),
    );
    let path = write_config(dir.path(), &text);
    // Config-level problems are reported first (no model is loaded then)...
    let out = edgeinfer(&["check-config", "-c", &path]);
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("broker.keep_alive_s"), "{err}");
    // ...then, with the config fixed, every model problem at once.
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("keep_alive_s = 0", "keep_alive_s = 30");
    std::fs::write(&path, text).unwrap();
    let out = edgeinfer(&["check-config", "-c", &path]);
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("pipeline[0]") && err.contains("window.size = 40"),
        "{err}"
    );
    assert!(
        err.contains("pipeline[1].model") && err.contains("not a readable ONNX model"),
        "{err}"
    );
    assert!(
        err.contains("pipeline[2].model")
            && err.contains("FrobnicateV2 (com.example) at node \"mystery_node\""),
        "{err}"
    );
    assert!(
        err.contains("pipeline[3].model") && err.contains("panicked while loading"),
        "{err}"
    );
    assert!(err.contains("4 problem(s)"), "{err}");
}

#[test]
fn models_check_tables_every_model_in_a_folder() {
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "unsupported_op.onnx",
        "pnet_dynamic.onnx",
        "bad_value_info.onnx",
    ] {
        std::fs::copy(repo().join("tests/fixtures").join(f), dir.path().join(f)).unwrap();
    }
    std::fs::create_dir(dir.path().join("bundled")).unwrap();
    for f in ["activity.onnx", "activity.toml"] {
        std::fs::copy(
            repo().join("models").join(f),
            dir.path().join("bundled").join(f),
        )
        .unwrap();
    }
    let bytes = std::fs::read(repo().join("models/motion.onnx")).unwrap();
    std::fs::write(dir.path().join("truncated.onnx"), &bytes[..bytes.len() / 2]).unwrap();
    let out = edgeinfer(&["models", "--check", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "some models fail");
    let table = String::from_utf8_lossy(&out.stdout);
    let row = |name: &str| {
        table
            .lines()
            .find(|l| l.starts_with(&format!("| {name} ")))
            .unwrap_or_else(|| panic!("no row for {name}:\n{table}"))
            .to_owned()
    };
    assert!(row("bundled/activity.onnx")
        .contains("| yes | tract-cpu | imu f32[1, 50, 6] | logits f32[1, 4] |"));
    assert!(
        row("unsupported_op.onnx").contains("| no |")
            && row("unsupported_op.onnx").contains("mystery_node")
    );
    assert!(row("pnet_dynamic.onnx").contains("panicked while loading"));
    assert!(
        row("bad_value_info.onnx").contains("| yes |")
            && row("bad_value_info.onnx").contains("ignoring the graph's declared value info")
    );
    assert!(row("truncated.onnx").contains("not a readable ONNX model"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("5 model(s), 2 load, 3 fail"));
}

#[test]
fn checksum_mismatch_is_a_clear_load_error() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = std::fs::read_to_string(repo().join("models/activity.toml")).unwrap();
    let sha = manifest
        .lines()
        .find(|l| l.starts_with("sha256"))
        .unwrap()
        .to_owned();
    let tampered = manifest.replace(&sha, &format!("sha256 = \"{}\"", "0".repeat(64)));
    std::fs::write(dir.path().join("activity.toml"), tampered).unwrap();
    std::fs::copy(
        repo().join("models/activity.onnx"),
        dir.path().join("activity.onnx"),
    )
    .unwrap();
    let out = edgeinfer(&[
        "models",
        "-c",
        &write_config(
            dir.path(),
            &format!(
                "[[pipeline]]\nname = \"p\"\nkind = \"sensor\"\ntopics = [\"x\"]\nmodel = \"{}\"\n",
                dir.path().join("activity.toml").display()
            ),
        ),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        text.contains("checksum mismatch") && text.contains(&"0".repeat(64)),
        "{text}"
    );
}

#[test]
fn run_with_an_invalid_config_exits_78_before_any_network_io() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        "[broker]\nurl = \"mqtt://127.0.0.1:1\"\nbogus = 1\n",
    );
    let started = Instant::now();
    let out = edgeinfer(&["run", "-c", &path]);
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bogus"));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "no connection attempt, no backoff"
    );
}

#[test]
fn infer_prints_the_result_schema_and_rejects_bad_input_with_65() {
    let dir = tempfile::tempdir().unwrap();
    let case = &activity_reference().cases[5];
    let input = dir.path().join("window.json");
    std::fs::write(
        &input,
        serde_json::json!({"ts": 42, "samples": case.input}).to_string(),
    )
    .unwrap();
    let manifest = repo().join("models/activity.toml");
    let out = edgeinfer(&[
        "infer",
        "-m",
        manifest.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ts"], 42);
    assert_eq!(v["model"], "activity");
    assert_eq!(
        v["output"]["top"][0]["label"],
        ACTIVITY_LABELS[argmax(&case.output)]
    );

    // The same window as raw f32le through the bare .onnx (its manifest is found beside it).
    let raw = dir.path().join("window.f32");
    std::fs::write(
        &raw,
        case.input
            .iter()
            .flatten()
            .flat_map(|x| x.to_le_bytes())
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    let onnx = repo().join("models/activity.onnx");
    let out = edgeinfer(&[
        "infer",
        "-m",
        onnx.to_str().unwrap(),
        "--input",
        raw.to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["output"]["top"][0]["label"],
        ACTIVITY_LABELS[argmax(&case.output)]
    );

    for bad in [
        r#"{"values": [1, 2, 3, 4, 5, 6]}"#,
        r#"{"values": [1, 2"#,
        r#"{"samples": [[1, null, 3, 4, 5, 6]]}"#,
    ] {
        let out = edgeinfer(&["infer", "-m", manifest.to_str().unwrap(), "--json", bad]);
        assert_eq!(out.status.code(), Some(65), "{bad}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("bad input"));
    }
}

#[test]
fn bench_json_has_the_documented_fields() {
    let manifest = repo().join("models/motion.toml");
    let out = edgeinfer(&[
        "bench",
        "-m",
        manifest.to_str().unwrap(),
        "--runs",
        "50",
        "--json",
    ]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["runs"], 50);
    for k in ["load_ms", "p50_ms", "p90_ms", "p99_ms", "peak_rss_bytes"] {
        assert!(v[k].as_f64().unwrap() > 0.0, "{k}: {v}");
    }
    assert!(v["p50_ms"].as_f64() <= v["p99_ms"].as_f64());
    // A sensor model's input stage: one window of JSON messages.
    assert_eq!(v["pre"]["runs"], 50);
    assert!(
        v["pre"]["what"].as_str().unwrap().contains("JSON messages"),
        "{v}"
    );
    assert!(v["pre"]["p50_ms"].as_f64().unwrap() > 0.0, "{v}");
}

#[test]
fn bench_times_an_images_decode_and_fit_and_refuses_what_it_cannot_use() {
    let objects = repo().join("models/objects.toml");
    let jpeg = repo().join("tests/fixtures/progressive_small.jpg");
    let bench = |model: &std::path::Path, image: &std::path::Path| {
        edgeinfer(&[
            "bench",
            "-m",
            model.to_str().unwrap(),
            "--image",
            image.to_str().unwrap(),
            "--runs",
            "5",
            "--json",
        ])
    };
    let out = bench(&objects, &jpeg);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let what = v["pre"]["what"].as_str().unwrap();
    assert!(
        what.contains("JPEG decoded") && what.ends_with("to 160x120, normalised"),
        "{what}"
    );
    assert!(v["pre"]["p50_ms"].as_f64().unwrap() > 0.0, "{v}");

    // A sensor model has no image input; a cut-off JPEG does not decode.
    let out = bench(&repo().join("models/motion.toml"), &jpeg);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--image needs an image model"));
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.jpg");
    let bytes = std::fs::read(&jpeg).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let out = bench(&objects, &cut);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("truncated JPEG"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn models_lists_the_bundled_models_with_facts() {
    let out = edgeinfer(&["models", "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["activity", "motion", "objects"]);
    assert_eq!(v[0]["inputs"][0]["shape"], serde_json::json!([1, 50, 6]));
    assert_eq!(v[0]["outputs"][0]["name"], "logits");
    assert_eq!(v[0]["sha256"].as_str().unwrap().len(), 64);
}

async fn status(obs: &mut Observer) -> Option<(String, bool)> {
    obs.next_where(T, |m| m.topic == "edgeinfer/gw-s/status")
        .await
        .map(|m| (m.text(), m.retain))
}

/// SIGTERM: `offline` replaces the retained `online` and the exit is 0.
/// SIGKILL: the broker publishes the retained Last Will, `offline`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_status_clean_shutdown_and_last_will() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &config_text(&broker.url(), "gw-s", ACTIVITY_PIPELINE),
    );
    let spawn = || {
        Command::new(BIN)
            .args(["run", "-c", &path])
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };

    let mut daemon = spawn();
    let mut live = Observer::connect(broker.port, &["edgeinfer/gw-s/status"]).await;
    assert_eq!(status(&mut live).await.expect("online").0, "online");
    // A subscriber that arrives later gets the retained state.
    let mut late = Observer::connect(broker.port, &["edgeinfer/gw-s/status"]).await;
    assert_eq!(status(&mut late).await, Some(("online".into(), true)));

    signal(&daemon, "-TERM");
    assert_eq!(wait_exit(&mut daemon, T).code(), Some(0));
    assert_eq!(
        status(&mut live)
            .await
            .expect("offline on clean shutdown")
            .0,
        "offline"
    );
    let mut after = Observer::connect(broker.port, &["edgeinfer/gw-s/status"]).await;
    assert_eq!(status(&mut after).await, Some(("offline".into(), true)));

    let mut daemon = spawn();
    assert_eq!(status(&mut live).await.expect("online again").0, "online");
    signal(&daemon, "-KILL");
    wait_exit(&mut daemon, T);
    // The broker notices the dropped connection and sends the will.
    assert_eq!(status(&mut live).await.expect("Last Will").0, "offline");
    let mut after = Observer::connect(broker.port, &["edgeinfer/gw-s/status"]).await;
    assert_eq!(status(&mut after).await, Some(("offline".into(), true)));
}

/// SIGHUP with a broken config keeps serving the old one; with a good
/// config the new pipeline takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_a_valid_config_and_keeps_running_on_an_invalid_one() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let good = config_text(&broker.url(), "gw-hup", ACTIVITY_PIPELINE);
    let path = write_config(dir.path(), &good);
    let mut daemon = Command::new(BIN)
        .args(["run", "-c", &path])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut obs = Observer::connect(broker.port, &["edgeinfer/gw-hup/#"]).await;
    obs.next_where(T, |m| m.topic.ends_with("/status") && m.text() == "online")
        .await
        .expect("online");
    let window = serde_json::json!({"samples": activity_reference().cases[0].input}).to_string();

    write_config(
        dir.path(),
        &good.replace("[health]", "[health]\nnot_a_key = 1"),
    );
    signal(&daemon, "-HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    obs.publish("sensors/x/imu", window.clone()).await;
    let r = obs
        .next_where(T, |m| m.topic.contains("/results/"))
        .await
        .expect("old config still serves");
    assert_eq!(r.topic, "edgeinfer/gw-hup/results/activity/x");

    write_config(
        dir.path(),
        &good.replace("results/activity/{1}", "reloaded/{1}"),
    );
    signal(&daemon, "-HUP");
    obs.next_where(T, |m| m.topic.ends_with("/status") && m.text() == "online")
        .await
        .expect("online after reload");
    obs.publish("sensors/x/imu", window).await;
    let r = obs
        .next_where(T, |m| m.topic.contains("/reloaded/"))
        .await
        .expect("new config serves");
    assert_eq!(r.topic, "edgeinfer/gw-hup/reloaded/x");

    signal(&daemon, "-TERM");
    assert_eq!(wait_exit(&mut daemon, T).code(), Some(0));
}

#[test]
fn dynamic_spatial_dimensions_are_fixed_from_the_manifest() {
    // pnet_dynamic.onnx has input [1, 3, H, W]: with H = W = 1 tract panics
    // (contained, see check-config's test); with the manifest's shape it runs.
    let dir = tempfile::tempdir().unwrap();
    let fixture = repo().join("tests/fixtures/pnet_dynamic.onnx");
    let manifest = dir.path().join("pnet.toml");
    std::fs::write(
        &manifest,
        format!(
            "file = {:?}\n[input]\nshape = [1, 3, 48, 64]\n",
            fixture.display().to_string()
        ),
    )
    .unwrap();
    let out = edgeinfer(&[
        "models",
        "--json",
        "-c",
        &write_config(
            dir.path(),
            &format!(
                "[[pipeline]]\nname = \"p\"\nkind = \"sensor\"\ntopics = [\"x\"]\nmodel = \"{}\"\n",
                manifest.display()
            ),
        ),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v[0]["inputs"][0]["shape"],
        serde_json::json!([1, 3, 48, 64])
    );
    assert_eq!(
        v[0]["outputs"][0]["shape"],
        // 48 -conv3-> 46 -pool2-> 23 -conv3-> 21; 64 -> 62 -> 31 -> 29.
        serde_json::json!([1, 16, 21, 29])
    );
    let out = edgeinfer(&[
        "bench",
        "-m",
        manifest.to_str().unwrap(),
        "--runs",
        "3",
        "--json",
    ]);
    assert!(out.status.success());
}

#[test]
fn a_model_with_wrong_declared_shapes_loads_relaxed_and_matches_onnxruntime() {
    let model = repo().join("tests/fixtures/bad_value_info.onnx");
    let out = edgeinfer(&[
        "infer",
        "-m",
        model.to_str().unwrap(),
        "--json",
        r#"{"values": [1, 1, 1, 1]}"#,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // onnxruntime 1.32 on the same input (it warns about the declared shape too).
    let want = [1.5, 1.625, 1.75, 1.875, 2.0, 2.125, 2.25, 2.375];
    assert_eq!(v["output"]["values"], serde_json::json!(want));
}

/// The password comes from a systemd credential and never reaches the logs,
/// even at debug level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_from_a_systemd_credential_is_used_and_never_logged() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("creds");
    std::fs::create_dir(&creds).unwrap();
    let secret = "s3cret-Pa55-7f1c9";
    std::fs::write(creds.join("mqtt-password"), format!("{secret}\n")).unwrap();
    let text = config_text(&broker.url(), "gw-cred", ACTIVITY_PIPELINE).replace(
        "reconnect_max_ms = 1000\n",
        "reconnect_max_ms = 1000\nusername = \"gateway\"\npassword_credential = \"mqtt-password\"\n",
    );
    let path = write_config(dir.path(), &text);
    let mut obs = Observer::connect(broker.port, &["edgeinfer/gw-cred/status"]).await;
    // A file, not a pipe: trace logging would fill an unread pipe and block.
    let log = dir.path().join("stderr.log");
    let mut child = Command::new(BIN)
        .args(["-v", "run", "-c", &path])
        .env("CREDENTIALS_DIRECTORY", &creds)
        .env("RUST_LOG", "trace")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    assert_eq!(
        obs.next_where(T, |_| true)
            .await
            .map(|m| m.text())
            .as_deref(),
        Some("online")
    );
    signal(&child, "-TERM");
    assert_eq!(wait_exit(&mut child, T).code(), Some(0));
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(
        stderr.contains("Connected to broker"),
        "the log was captured: {stderr}"
    );
    assert!(!stderr.contains(secret), "the password leaked into the log");
    // Without the credentials directory the config is refused, clearly.
    let out = Command::new(BIN)
        .args(["check-config", "-c", &path])
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("CREDENTIALS_DIRECTORY"));
}
