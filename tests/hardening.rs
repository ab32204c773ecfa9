//! One request must not freeze or exhaust a gateway (issue #36): the
//! operations API, bundles, /metrics and discovery attacked from outside
//! against a real mosquitto, each test counting what still works meanwhile
//! (inputs answered, replies, peak RSS of the daemon's own process,
//! descriptors held). Each prints its figures (`-- --nocapture`).

mod common;

use common::ops::*;
use common::*;
use edgeinfer::ops::bundle;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// A config for a daemon run as its own process: the activity pipeline,
/// every operation allowed, the default memory budget (128 MiB).
fn child_config(broker: &Mosquitto, device: &str, dir: &Path, key: &Path, extra: &str) -> PathBuf {
    let pipeline = ACTIVITY_PIPELINE.replace(
        "models/activity.toml",
        &repo().join("models/activity.toml").display().to_string(),
    );
    let ops = ops_section(&dir.join("state"), key, "duration_s = 0");
    let text = format!(
        r#"
[device]
id = "{device}"
[broker]
url = "{}"
reconnect_initial_ms = 100
reconnect_max_ms = 1000
[health]
interval_s = 1
{extra}
{pipeline}
{ops}
"#,
        broker.url()
    );
    let path = dir.join("edgeinfer.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// SIGTERM, then SIGKILL if it has not exited within 10 s.
fn stop_child(mut child: Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// Messages matching `pred` until `done` says enough, or `timeout`.
async fn gather(
    obs: &mut Observer,
    timeout: Duration,
    pred: impl Fn(&Seen) -> bool,
    done: impl Fn(&[Seen]) -> bool,
) -> Vec<Seen> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while !done(&out) {
        let left = deadline.saturating_duration_since(Instant::now());
        match obs.next_where(left, &pred).await {
            Some(m) => out.push(m),
            None => break,
        }
    }
    out
}

fn reply_of<'a>(seen: &'a [Seen], id: &str) -> Option<&'a Seen> {
    seen.iter()
        .find(|m| m.topic.ends_with("/reply") && m.json()["id"] == id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_or_a_device_as_bundle_path_neither_freezes_nor_exhausts_the_daemon() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let (key, _) = keys(dir.path());
    let config = child_config(&broker, "gw-f", dir.path(), &key, "");
    let log = dir.path().join("daemon.log");
    let mut obs = Observer::connect(
        broker.port,
        &[
            "edgeinfer/gw-f/status",
            "edgeinfer/gw-f/cmd/+/reply",
            "edgeinfer/gw-f/cmd/model/update/reply",
            "edgeinfer/gw-f/results/#",
        ],
    )
    .await;
    let child = spawn(&config, &log, None);
    online(&mut obs, &log).await;
    let fifo = dir.path().join("x.eib");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let update = |id: &str, path: &str| {
        json!({"id": id, "args": {"pipeline": "activity", "path": path, "signature": "untrusted comment: x\nRWQ"}})
            .to_string()
    };
    obs.publish(
        "edgeinfer/gw-f/cmd/model/update",
        update("pa-7", fifo.to_str().unwrap()),
    )
    .await;
    obs.publish(
        "edgeinfer/gw-f/cmd/model/update",
        update("pa-8", "/dev/zero"),
    )
    .await;
    // 20 windows a second for two seconds, a ping among them.
    let rows = samples(50 * 40);
    for (i, w) in rows.chunks(50).enumerate() {
        obs.publish(SENSOR, batch(w)).await;
        if i == 5 {
            obs.publish("edgeinfer/gw-f/cmd/ping", json!({"id": "p-1"}).to_string())
                .await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = gather(
        &mut obs,
        Duration::from_secs(30),
        |m| m.topic.ends_with("/reply") || m.topic.contains("/results/"),
        |s| s.len() >= 43,
    )
    .await;
    let hwm = vm_hwm_bytes(child.id());
    let answered = seen
        .iter()
        .filter(|m| m.topic.contains("/results/"))
        .count();
    let ping = reply_of(&seen, "p-1").is_some();
    eprintln!(
        "FIFO and /dev/zero paths: {answered} of 40 inputs answered, ping answered: {ping}, peak RSS {:.1} MiB",
        mib(hwm)
    );
    for (id, what) in [("pa-7", "FIFO"), ("pa-8", "device")] {
        let r = reply_of(&seen, id)
            .unwrap_or_else(|| panic!("no reply to the {what} path"))
            .json();
        assert_eq!(r["ok"], false, "{r}");
        assert_eq!(r["state"], "rejected", "{r}");
        let e = r["error"].as_str().unwrap();
        assert!(e.contains("regular file"), "{e}");
    }
    assert!(ping, "ping was not answered");
    assert_eq!(answered, 40, "every input answered during the attack");
    assert!(
        hwm < 200 << 20,
        "peak RSS {:.1} MiB against a 128 MiB budget",
        mib(hwm)
    );
    stop_child(child);
}

/// `bundle` rebuilt with its manifest edited (and bundle.json's digest of
/// it updated): signed again, it is a bundle a publisher could sign.
fn rebundle(bytes: &[u8], edit: impl Fn(&mut toml::Table)) -> Vec<u8> {
    use sha2::Digest;
    use std::io::Read;
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let mut archive = tar::Archive::new(bytes);
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        files.push((name, data));
    }
    let mut manifest: toml::Table =
        std::str::from_utf8(&files.iter().find(|f| f.0 == "model.toml").unwrap().1)
            .unwrap()
            .parse()
            .unwrap();
    edit(&mut manifest);
    let manifest = toml::to_string(&manifest).unwrap().into_bytes();
    let digest = edgeinfer::model::hex(&sha2::Sha256::digest(&manifest));
    let mut meta: Value = serde_json::from_slice(&files[0].1).unwrap();
    meta["files"]["model.toml"] = json!(digest);
    let mut tar = tar::Builder::new(Vec::new());
    for (name, data) in &files {
        let data = match name.as_str() {
            "bundle.json" => serde_json::to_vec(&meta).unwrap(),
            "model.toml" => manifest.clone(),
            _ => data.clone(),
        };
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, name, data.as_slice()).unwrap();
    }
    tar.into_inner().unwrap()
}

/// An edit of a bundle's manifest.
type Edit = Box<dyn Fn(&mut toml::Table)>;

fn edited(dir: &Path, secret: &str, seq: u64, edit: impl Fn(&mut toml::Table)) -> Signed {
    let base = signed(
        &renamed_activity(dir, "activity_v2"),
        seq,
        bundle::now_s() + 3600,
        secret,
    );
    let bytes = rebundle(&base.bytes, edit);
    let signature = bundle::sign(&bytes, secret, None).unwrap();
    Signed { bytes, signature }
}

fn labels(list: [&'static str; 4]) -> impl Fn(&mut toml::Table) {
    move |m: &mut toml::Table| {
        m["output"]["labels"] = toml::Value::Array(list.iter().map(|l| (*l).into()).collect());
    }
}

/// Streams `n` windows and returns the labels the results carry.
async fn result_labels(obs: &mut Observer, res: &mut Observer, n: usize) -> Vec<String> {
    let rows = samples(50 * n);
    for w in rows.chunks(50) {
        obs.publish(SENSOR, batch(w)).await;
    }
    res.collect(n, T, |m| m.topic.contains("/results/"))
        .await
        .iter()
        .flat_map(|m| {
            m.json()["output"]["top"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["label"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_manifest_may_load_only_its_own_model() {
    let Rig {
        broker: _b,
        dir,
        secret,
        mut obs,
        daemon,
    } = rig("gw-m", "duration_s = 0", &["edgeinfer/gw-m/cmd/#"]).await;
    let outside = repo().join("models/activity.onnx").display().to_string();
    let tricks: [(&str, Edit); 3] = [
        (
            "abs",
            Box::new(move |m: &mut toml::Table| {
                m.insert("file".into(), outside.clone().into());
                m.remove("sha256");
            }),
        ),
        (
            "up",
            Box::new(|m: &mut toml::Table| {
                m.insert("file".into(), "../../activity.onnx".into());
                m.remove("sha256");
            }),
        ),
        (
            "pin",
            Box::new(|m: &mut toml::Table| {
                m.insert("sha256".into(), "00".repeat(32).into());
            }),
        ),
    ];
    let mut states = Vec::new();
    for (i, (name, edit)) in tricks.iter().enumerate() {
        let b = edited(dir.path(), &secret, 1 + i as u64, edit);
        let r = request(
            &mut obs,
            "gw-m",
            "model/update",
            &format!("out-{name}"),
            inline("activity", &b, json!({})),
        )
        .await;
        states.push((name.to_string(), r));
    }
    eprintln!(
        "outside manifests: {:?}",
        states
            .iter()
            .map(|(n, r)| format!("{n}: {}", r["state"]))
            .collect::<Vec<_>>()
    );
    for (name, r) in &states {
        assert_eq!(r["state"], "rejected", "{name}: {r}");
        let e = r["error"].as_str().unwrap();
        assert!(
            e.contains("must load its own model.onnx") || e.contains("pins another sha256"),
            "{name}: {e}"
        );
    }
    let status = request(&mut obs, "gw-m", "status", "st-1", json!({})).await;
    assert!(
        status["pipelines"]["activity"]["installed"].is_null(),
        "{status}"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_manifest_for_the_same_onnx_is_its_own_install() {
    let Rig {
        broker,
        dir,
        secret,
        mut obs,
        daemon,
    } = rig("gw-c", "duration_s = 0", &["edgeinfer/gw-c/cmd/#"]).await;
    let mut res = Observer::connect(broker.port, &["edgeinfer/gw-c/results/#"]).await;
    // The same ONNX three times: a manifest that fails to load, then two
    // that load with other labels. Each is its own install.
    let update = |id: &'static str, b: Signed| {
        let args = inline("activity", &b, json!({}));
        (id, args)
    };
    let broken = edited(dir.path(), &secret, 16, |m| {
        let input = m["input"].as_table_mut().unwrap();
        input.insert("name".into(), "no_such_input".into());
    });
    let (id, args) = update("seq-16", broken);
    let r16 = request(&mut obs, "gw-c", "model/update", id, args).await;
    let v17 = ["still", "walk", "run", "racket"];
    let (id, args) = update("seq-17", edited(dir.path(), &secret, 17, labels(v17)));
    let r17 = request(&mut obs, "gw-c", "model/update", id, args).await;
    let seen17 = result_labels(&mut obs, &mut res, 6).await;
    let v18 = ["still-18", "walk-18", "run-18", "racket-18"];
    let (id, args) = update("seq-18", edited(dir.path(), &secret, 18, labels(v18)));
    let r18 = request(&mut obs, "gw-c", "model/update", id, args).await;
    let seen18 = result_labels(&mut obs, &mut res, 6).await;
    eprintln!(
        "same ONNX: seq 16 {} ; seq 17 {} ({}), results labelled {:?} ; seq 18 {}, results labelled {:?}",
        r16["state"],
        r17["state"],
        r17["error"],
        seen17.first(),
        r18["state"],
        seen18.first()
    );
    assert_eq!(r16["state"], "failed", "{r16}");
    assert_eq!(
        r17["state"], "successful",
        "seq 17 after a failed seq 16 of the same ONNX: {r17}"
    );
    assert!(
        !seen17.is_empty() && seen17.iter().all(|l| v17.contains(&l.as_str())),
        "{seen17:?}"
    );
    assert_eq!(r18["state"], "successful", "{r18}");
    assert!(
        !seen18.is_empty() && seen18.iter().all(|l| v18.contains(&l.as_str())),
        "{seen18:?}"
    );
    let status = request(&mut obs, "gw-c", "status", "st-2", json!({})).await;
    let p = &status["pipelines"]["activity"];
    assert_eq!(p["installed"]["seq"], 18, "{p}");
    assert_eq!(
        p["sha256"], p["installed"]["sha256"],
        "what runs is what was installed: {p}"
    );
    daemon.stop().await;
}

/// Sends `ids` as `op` requests in batches, waiting for each batch's
/// replies: (replies, of which ok).
async fn paced(
    obs: &mut Observer,
    device: &str,
    op: &str,
    ids: &[String],
    args: Value,
) -> (usize, usize) {
    let (mut replies, mut ok) = (0, 0);
    for chunk in ids.chunks(40) {
        for id in chunk {
            obs.publish(
                &format!("edgeinfer/{device}/cmd/{op}"),
                json!({"id": id, "args": args}).to_string(),
            )
            .await;
        }
        let topic = format!("edgeinfer/{device}/cmd/{op}/reply");
        let got = obs.collect(chunk.len(), T, |m| m.topic == topic).await;
        replies += got.len();
        ok += got.iter().filter(|m| m.json()["ok"] == true).count();
    }
    (replies, ok)
}

/// A `pipeline/disable` of the activity pipeline under `id`.
async fn replay(obs: &mut Observer, id: &str) -> Value {
    request(
        obs,
        "gw-r",
        "pipeline/disable",
        id,
        json!({"pipeline": "activity"}),
    )
    .await
}

/// Streams `n` windows: how many were answered.
async fn answered_windows(obs: &mut Observer, res: &mut Observer, n: usize) -> usize {
    let rows = samples(50 * n);
    for w in rows.chunks(50) {
        obs.publish(SENSOR, batch(w)).await;
    }
    res.collect(n, Duration::from_secs(5), |m| m.topic.contains("/results/"))
        .await
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_acted_on_is_not_acted_on_again_after_thousands_of_others_or_a_restart() {
    let Rig {
        broker,
        dir,
        secret: _,
        mut obs,
        daemon,
    } = rig("gw-r", "duration_s = 0", &["edgeinfer/gw-r/cmd/#"]).await;
    let mut res = Observer::connect(broker.port, &["edgeinfer/gw-r/results/#"]).await;
    let pipeline = json!({"pipeline": "activity"});
    let r = request(
        &mut obs,
        "gw-r",
        "pipeline/disable",
        "old-1",
        pipeline.clone(),
    )
    .await;
    assert_eq!(r["state"], "successful", "{r}");
    let r = request(
        &mut obs,
        "gw-r",
        "pipeline/enable",
        "en-1",
        pipeline.clone(),
    )
    .await;
    assert_eq!(r["state"], "successful", "{r}");
    // 150 changing operations (past the 100 records kept) and 4,200
    // read-only ones with ids.
    let ids: Vec<String> = (0..150).map(|i| format!("n-{i}")).collect();
    let (replies, ok) = paced(&mut obs, "gw-r", "pipeline/enable", &ids, pipeline.clone()).await;
    assert_eq!((replies, ok), (150, 150));
    let ids: Vec<String> = (0..4200).map(|i| format!("s-{i}")).collect();
    let (replies, _) = paced(&mut obs, "gw-r", "status", &ids, json!({})).await;
    assert_eq!(replies, 4200);

    let r = replay(&mut obs, "old-1").await;
    assert_eq!(r["duplicate"], true, "{r}");
    let answered = answered_windows(&mut obs, &mut res, 10).await;
    eprintln!("replayed disable after 4,350 others: {answered} of 10 inputs answered after it");
    assert_eq!(answered, 10, "the replayed disable was not acted on");

    // A restart: the kept records and the ledger are read back.
    daemon.stop().await;
    let config = rig_config(&broker, dir.path(), "gw-r", "duration_s = 0");
    let daemon = Daemon::start_online(config, broker.port).await;
    let r = replay(&mut obs, "old-1").await;
    assert_eq!(r["duplicate"], true, "after a restart: {r}");
    // n-0's record was pruned: its id is in the ledger.
    let r = request(&mut obs, "gw-r", "pipeline/enable", "n-0", pipeline.clone()).await;
    assert_eq!(r["duplicate"], true, "a pruned id after a restart: {r}");
    assert!(r["record"].is_null(), "{r}");
    // Another operation under a used id: refused, nothing done.
    let r = request(
        &mut obs,
        "gw-r",
        "pipeline/enable",
        "old-1",
        pipeline.clone(),
    )
    .await;
    assert_eq!(r["ok"], false, "{r}");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("already used for \"pipeline/disable\""),
        "{r}"
    );
    let answered = answered_windows(&mut obs, &mut res, 10).await;
    eprintln!("after a restart, replays of old-1 and n-0: {answered} of 10 inputs answered");
    assert_eq!(answered, 10);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_requests_is_answered_or_counted_and_leaves_no_record_behind() {
    let Rig {
        broker,
        dir,
        secret: _,
        mut obs,
        daemon,
    } = rig(
        "gw-b",
        "duration_s = 0",
        &[
            "edgeinfer/gw-b/cmd/+/reply",
            "edgeinfer/gw-b/cmd/pipeline/enable/reply",
        ],
    )
    .await;
    const N: usize = 5000;
    let started = Instant::now();
    for i in 0..N {
        obs.publish(
            "edgeinfer/gw-b/cmd/pipeline/enable",
            json!({"id": format!("b-{i}"), "args": {"pipeline": "activity"}}).to_string(),
        )
        .await;
        if i % 500 == 0 {
            obs.publish(
                "edgeinfer/gw-b/cmd/health",
                json!({"id": format!("h-{}", i / 500)}).to_string(),
            )
            .await;
        }
    }
    // Until no reply came for 5 s.
    let mut seen = Vec::new();
    while let Some(m) = obs
        .next_where(Duration::from_secs(5), |m| m.topic.ends_with("/reply"))
        .await
    {
        seen.push(m);
    }
    let enables: Vec<Value> = seen
        .iter()
        .filter(|m| m.topic.ends_with("pipeline/enable/reply"))
        .map(Seen::json)
        .collect();
    let healths = seen
        .iter()
        .filter(|m| m.topic.ends_with("health/reply"))
        .count();
    let busy = enables.iter().filter(|r| r["busy"] == true).count();
    let done = enables
        .iter()
        .filter(|r| r["state"] == "successful")
        .count();
    // Wait for the queue to drain, then read the counters.
    let mut health = Value::Null;
    for i in 0..100 {
        health = request(&mut obs, "gw-b", "health", &format!("h-end-{i}"), json!({})).await;
        if health["health"]["operations"]["queued"] == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let overflowed = health["health"]["operations"]["overflowed"]
        .as_u64()
        .unwrap_or(0) as usize;
    eprintln!(
        "burst of {N} in {:.1} s: {} replies ({done} done, {busy} busy), {overflowed} counted as overflowed, health {healths}/10",
        started.elapsed().as_secs_f64(),
        enables.len()
    );
    assert_eq!(
        enables.len() + overflowed,
        N,
        "every request answered or counted"
    );
    assert_eq!(healths, 10, "health keeps its own lane");
    assert_eq!(
        health["health"]["operations"]["busy"].as_u64().unwrap_or(0) as usize,
        busy
    );

    // Retained records: none stuck at accepted, no more than are kept.
    let retained = |port| async move {
        let mut o = Observer::connect(port, &["edgeinfer/gw-b/ops/+"]).await;
        o.collect(100_000, Duration::from_secs(3), |m| {
            m.retain && !m.payload.is_empty()
        })
        .await
    };
    let kept = retained(broker.port).await;
    let stuck = kept
        .iter()
        .filter(|m| {
            !matches!(
                m.json()["state"].as_str(),
                Some("successful" | "failed" | "rejected" | "rolled_back")
            )
        })
        .count();
    eprintln!(
        "retained records after the burst: {} ({stuck} unfinished)",
        kept.len()
    );
    assert_eq!(stuck, 0);
    assert!(kept.len() <= 100 + 16, "{} retained records", kept.len());
    daemon.stop().await;

    // After a restart: the retained records are exactly the files kept.
    let config = rig_config(&broker, dir.path(), "gw-b", "duration_s = 0");
    let daemon = Daemon::start_online(config, broker.port).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let kept = retained(broker.port).await;
    let files = std::fs::read_dir(dir.path().join("state/ops"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .count();
    eprintln!(
        "after a restart: {} retained records, {files} record files",
        kept.len()
    );
    assert_eq!(kept.len(), files);
    assert!(files <= 100);
    daemon.stop().await;
}

/// Connections that send a request line, then a byte every two seconds.
async fn slow_connections(port: u16, n: usize, hold: Duration) -> usize {
    use tokio::io::AsyncWriteExt;
    // All at once: connections beyond what the server takes wait in its
    // backlog (or time out here).
    let attempts: Vec<_> = (0..n)
        .map(|_| {
            tokio::spawn(tokio::time::timeout(
                Duration::from_secs(3),
                tokio::net::TcpStream::connect(("127.0.0.1", port)),
            ))
        })
        .collect();
    let mut held = Vec::new();
    for a in attempts {
        if let Ok(Ok(Ok(s))) = a.await {
            held.push(s);
        }
    }
    let opened = held.len();
    tokio::spawn(async move {
        let end = Instant::now() + hold;
        for s in held.iter_mut() {
            let _ = s.write_all(b"GET /metrics HTTP/1.1\r\n").await;
        }
        while Instant::now() < end {
            for s in held.iter_mut() {
                let _ = s.write_all(b"X").await;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    });
    opened
}

fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// A raw HTTP exchange: everything the server sent.
async fn raw_http(port: u16, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(request).await.unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(T, s.read_to_end(&mut reply)).await;
    String::from_utf8_lossy(&reply).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_metrics_connections_starve_neither_inputs_nor_the_outbox_nor_reconnects() {
    let mut broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let (key, _) = keys(dir.path());
    let port = free_port();
    let extra = format!(
        "[metrics]\nenabled = true\nlisten = \"127.0.0.1:{port}\"\n[outbox]\ndir = {:?}\nsync_ms = 100\n",
        dir.path().join("outbox").display().to_string()
    );
    let config = child_config(&broker, "gw-h", dir.path(), &key, &extra);
    let log = dir.path().join("daemon.log");
    let mut obs = Observer::connect(
        broker.port,
        &["edgeinfer/gw-h/status", "edgeinfer/gw-h/results/#"],
    )
    .await;
    let child = Command::new("prlimit")
        .arg("--nofile=1024:1024")
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_edgeinfer"))
        .args(["run", "-c"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    online(&mut obs, &log).await;
    let opened = slow_connections(port, 1100, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let fds = descriptors(child.id());
    // Inputs during the attack.
    let rows = samples(50 * 40);
    for w in rows.chunks(50) {
        obs.publish(SENSOR, batch(w)).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let answered = obs
        .collect(40, T, |m| m.topic.contains("/results/"))
        .await
        .len();
    // A broker restart during the attack: back online within the backoff.
    broker.restart();
    let restarted = Instant::now();
    let mut status = Observer::connect(broker.port, &["edgeinfer/gw-h/status"]).await;
    let back = status
        .next_where(T, |m| m.text() == "online")
        .await
        .map(|_| restarted.elapsed());
    // A well-formed scrape gets its answer once the slow ones are cut.
    let scrape = raw_http(port, b"GET /metrics HTTP/1.1\r\nHost: gw\r\n\r\n").await;
    let text = std::fs::read_to_string(&log).unwrap();
    eprintln!(
        "{opened} slow /metrics connections opened: daemon holds {fds} descriptors, {answered} of 40 inputs answered, online again {back:?} after a broker restart, scrape answered: {}",
        scrape.starts_with("HTTP/1.1 200")
    );
    assert!(fds < 100, "{fds} descriptors held");
    assert_eq!(answered, 40);
    assert!(back.is_some(), "no reconnect after the broker restart");
    assert!(scrape.starts_with("HTTP/1.1 200"), "{scrape}");
    for bad in ["cannot sync", "Too many open files", "accept failed"] {
        assert!(!text.contains(bad), "{bad:?} in the log:\n{text}");
    }
    stop_child(child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_answer_head_without_a_body_and_bare_lf_requests() {
    let broker = Mosquitto::start();
    let port = free_port();
    let extra =
        format!("[metrics]\nenabled = true\nlisten = \"127.0.0.1:{port}\"\n{ACTIVITY_PIPELINE}");
    let daemon = Daemon::start_online(
        parse(&config_text(&broker.url(), "gw-l", &extra)),
        broker.port,
    )
    .await;
    let head = raw_http(port, b"HEAD /metrics HTTP/1.1\r\nHost: gw\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let (_, body) = head.split_once("\r\n\r\n").unwrap();
    assert!(
        body.is_empty(),
        "HEAD answered with a body of {} bytes",
        body.len()
    );
    let lf = raw_http(port, b"GET /metrics HTTP/1.1\nHost: gw\n\n").await;
    assert!(
        lf.starts_with("HTTP/1.1 200") && lf.ends_with("# EOF\n"),
        "{lf}"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_retained_discovery_config_is_replaced_within_the_memory_budget() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let (key, _) = keys(dir.path());
    let topic = "homeassistant/device/edgeinfer_gw-d/config";
    // 200,000 components (17 MB), retained on our topic before we start.
    let cmps: serde_json::Map<String, Value> = (0..200_000)
        .map(|i| (format!("x{i}_result"), json!({"p": "sensor", "name": "x", "unique_id": format!("edgeinfer_gw-d_x{i}_result")})))
        .collect();
    let foreign =
        json!({"dev": {"ids": ["edgeinfer_gw-d"]}, "o": {"name": "edgeinfer"}, "cmps": cmps})
            .to_string();
    let size = foreign.len();
    let big = BigPublisher::connect(broker.port);
    big.client
        .publish(topic, rumqttc::QoS::AtLeastOnce, true, foreign.into_bytes())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let config = child_config(
        &broker,
        "gw-d",
        dir.path(),
        &key,
        "[home_assistant]\nenabled = true\n[broker]\nmax_packet_bytes = 16777216\n",
    );
    // [broker] twice is not TOML: fold the packet limit into the first.
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[broker]\nmax_packet_bytes = 16777216\n", "")
        .replace(
            "reconnect_max_ms = 1000\n",
            "reconnect_max_ms = 1000\nmax_packet_bytes = 16777216\n",
        );
    std::fs::write(&config, text).unwrap();
    let log = dir.path().join("daemon.log");
    let mut obs = Observer::connect(broker.port, &["edgeinfer/gw-d/status"]).await;
    let child = spawn(&config, &log, None);
    online(&mut obs, &log).await;
    // Ours replaces it at once (a foreign one is not waited on).
    let mut after = None;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut o = Observer::connect(broker.port, &[topic]).await;
        if let Some(m) = o
            .next_where(Duration::from_secs(2), |m| m.topic == topic)
            .await
        {
            if m.payload.len() < 100_000 {
                after = Some(m.json());
                break;
            }
        }
    }
    let hwm = vm_hwm_bytes(child.id());
    let n = after
        .as_ref()
        .map(|a| a["cmps"].as_object().map_or(0, |c| c.len()));
    eprintln!(
        "foreign retained config of {size} bytes: replaced by ours: {n:?} components, peak RSS {:.1} MiB",
        mib(hwm)
    );
    let n = n.expect("our config replaced the foreign one");
    assert_eq!(
        n,
        3 + 4,
        "ours, without removal stubs for the foreign components"
    );
    assert!(hwm < 160 << 20, "peak RSS {:.1} MiB", mib(hwm));
    stop_child(child);
}

#[test]
fn names_that_would_collide_or_crash_are_config_errors() {
    let dir = tempfile::tempdir().unwrap();
    let model = repo().join("models/activity.toml").display().to_string();
    let pipeline = |name: &str| {
        format!("[[pipeline]]\nname = {name}\nkind = \"sensor\"\ntopics = [\"s/+/imu\"]\nmodel = {model:?}\n")
    };
    let cases = [
        (
            format!(
                "[home_assistant]\nenabled = true\n{}{}",
                pipeline("\"a b\""),
                pipeline("\"a_b\"")
            ),
            "pipeline[1].name",
            "same Home Assistant id",
        ),
        (
            pipeline("\"a\\u0000b\""),
            "pipeline[0].name",
            "control character",
        ),
        (pipeline("\"a{b\""), "pipeline[0].name", "'{'"),
    ];
    for (text, key, why) in cases {
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_edgeinfer"))
            .args(["check-config", "-c"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{err}");
        assert!(
            err.contains(key) && err.contains(why),
            "{key} / {why}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_to_a_name_with_a_nul_keeps_the_daemon_serving() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let (key, _) = keys(dir.path());
    let config = child_config(&broker, "gw-n", dir.path(), &key, "");
    let log = dir.path().join("daemon.log");
    let mut obs = Observer::connect(
        broker.port,
        &["edgeinfer/gw-n/status", "edgeinfer/gw-n/results/#"],
    )
    .await;
    let mut child = spawn(&config, &log, None);
    online(&mut obs, &log).await;
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("name = \"activity\"", "name = \"act\\u0000ivity\""),
    )
    .unwrap();
    let _ = Command::new("kill")
        .arg("-HUP")
        .arg(child.id().to_string())
        .status();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rows = samples(50 * 5);
    for w in rows.chunks(50) {
        obs.publish(SENSOR, batch(w)).await;
    }
    let answered = obs
        .collect(5, T, |m| m.topic.contains("/results/"))
        .await
        .len();
    assert!(
        child.try_wait().unwrap().is_none(),
        "the daemon exited: {}",
        std::fs::read_to_string(&log).unwrap()
    );
    assert_eq!(answered, 5);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("panicked"), "{text}");
    stop_child(child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_are_bounded_and_say_what_went_wrong() {
    let Rig {
        broker: _b,
        dir,
        secret: _,
        mut obs,
        daemon,
    } = rig(
        "gw-s",
        "duration_s = 0",
        &["edgeinfer/gw-s/cmd/+/reply", "edgeinfer/gw-s/cmd/+/+/reply"],
    )
    .await;
    // A 1 MB pipeline name: a short refusal.
    let big = BigPublisher::connect(_b.port);
    big.publish(
        "edgeinfer/gw-s/cmd/pipeline/enable",
        rumqttc::QoS::AtLeastOnce,
        json!({"id": "big-1", "args": {"pipeline": "p".repeat(1 << 20)}})
            .to_string()
            .into_bytes(),
    )
    .await;
    let topic = "edgeinfer/gw-s/cmd/pipeline/enable/reply";
    let r = obs
        .next_where(T, |m| m.topic == topic)
        .await
        .expect("a reply");
    eprintln!("1 MB args.pipeline: a reply of {} bytes", r.payload.len());
    assert!(r.payload.len() < 1024, "{} bytes", r.payload.len());
    assert_eq!(r.json()["ok"], false);
    // Paths outside: a missing file and a directory get the same answer.
    let mut errors = Vec::new();
    for (id, path) in [
        ("nf-1", "/nonexistent/x.eib".to_string()),
        ("nf-2", dir.path().display().to_string()),
    ] {
        let r = request(
            &mut obs,
            "gw-s",
            "model/update",
            id,
            json!({"pipeline": "activity", "path": path, "signature": "x"}),
        )
        .await;
        errors.push(r["error"].as_str().unwrap().to_owned());
    }
    assert_eq!(errors[0], errors[1]);
    assert!(!errors[0].contains("No such file"), "{}", errors[0]);
    daemon.stop().await;
}
