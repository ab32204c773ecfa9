//! Helpers of the operations tests (tests/operations.rs, tests/hardening.rs):
//! signing keys and bundles, requests and their replies, records, a
//! daemon run as its own process.

use super::*;
use base64::Engine;
use edgeinfer::config::Config;
use edgeinfer::ops::bundle;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const T: Duration = Duration::from_secs(30);

/// A signing key pair in `dir`: (public key file, secret key text).
pub fn keys(dir: &Path) -> (PathBuf, String) {
    let (public, secret) = bundle::keygen().unwrap();
    let path = dir.join("fleet.pub");
    std::fs::write(&path, public).unwrap();
    (path, secret)
}

/// A manifest for a bundled model under another name (the "new version"
/// of an update: same weights, so the same answers).
pub fn renamed(stem: &str, dir: &Path, name: &str) -> PathBuf {
    let text = std::fs::read_to_string(repo().join(format!("models/{stem}.toml"))).unwrap();
    let text: String = text
        .lines()
        .filter(|l| !l.starts_with("name =") && !l.starts_with("file ="))
        .map(|l| format!("{l}\n"))
        .collect();
    let onnx = repo().join(format!("models/{stem}.onnx"));
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "name = \"{name}\"\nfile = {:?}\n{text}",
            onnx.display().to_string()
        ),
    )
    .unwrap();
    path
}

pub fn renamed_activity(dir: &Path, name: &str) -> PathBuf {
    renamed("activity", dir, name)
}

pub struct Signed {
    pub bytes: Vec<u8>,
    pub signature: String,
}

pub fn signed(model: &Path, seq: u64, not_after: u64, secret: &str) -> Signed {
    let bytes = bundle::create(bundle::CreateArgs {
        model,
        version: format!("v{seq}"),
        seq,
        not_after,
        reference: None,
    })
    .unwrap();
    let signature = bundle::sign(&bytes, secret, None).unwrap();
    Signed { bytes, signature }
}

pub fn inline(pipeline: &str, b: &Signed, extra: Value) -> Value {
    let mut args = json!({
        "pipeline": pipeline,
        "bundle": base64::engine::general_purpose::STANDARD.encode(&b.bytes),
        "signature": b.signature,
    });
    for (k, v) in extra.as_object().unwrap() {
        args[k] = v.clone();
    }
    args
}

pub fn ops_section(state: &Path, key: &Path, probation: &str) -> String {
    format!(
        r#"
[operations]
enabled = true
allow = ["ping", "health", "status", "models", "config", "reload", "pipeline/enable", "pipeline/disable", "model/update", "model/rollback"]
state_dir = {state:?}
trusted_key_files = [{key:?}]
[operations.probation]
{probation}
"#,
        state = state.display().to_string(),
        key = key.display().to_string(),
    )
}

/// A gateway for the operations tests: mosquitto, a signing key trusted by
/// the daemon, the activity pipeline with every operation allowed and
/// `probation`, an observer on `topics`, the daemon online.
pub struct Rig {
    pub broker: Mosquitto,
    pub dir: tempfile::TempDir,
    pub secret: String,
    pub obs: Observer,
    pub daemon: Daemon,
}

pub async fn rig(device: &str, probation: &str, topics: &[&str]) -> Rig {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let (_, secret) = keys(dir.path());
    let config = rig_config(&broker, dir.path(), device, probation);
    let obs = Observer::connect(broker.port, topics).await;
    let daemon = Daemon::start_online(config, broker.port).await;
    Rig {
        broker,
        dir,
        secret,
        obs,
        daemon,
    }
}

/// A rig's configuration: the activity pipeline, every operation allowed,
/// its state directory and key in `dir`. Also what a rig's daemon is
/// started again with.
pub fn rig_config(broker: &Mosquitto, dir: &Path, device: &str, probation: &str) -> Config {
    let ops = ops_section(&dir.join("state"), &dir.join("fleet.pub"), probation);
    parse(&config_text(
        &broker.url(),
        device,
        &format!("{ACTIVITY_PIPELINE}{ops}"),
    ))
}

/// Publishes a request and waits for its reply.
pub async fn request(obs: &mut Observer, device: &str, op: &str, id: &str, args: Value) -> Value {
    obs.publish(
        &format!("edgeinfer/{device}/cmd/{op}"),
        json!({"id": id, "args": args}).to_string(),
    )
    .await;
    reply(obs, device, op, id).await
}

pub async fn reply(obs: &mut Observer, device: &str, op: &str, id: &str) -> Value {
    let topic = format!("edgeinfer/{device}/cmd/{op}/reply");
    obs.next_where(T, |m| m.topic == topic && m.json()["id"] == id)
        .await
        .unwrap_or_else(|| panic!("no reply to {op} {id}"))
        .json()
}

/// Waits for the retained status of operation `id` to satisfy `pred` (a
/// subscription of its own: the retained message is its first).
pub async fn status_where(
    port: u16,
    device: &str,
    id: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let topic = format!("edgeinfer/{device}/ops/{id}");
    let mut obs = Observer::connect(port, &[&topic]).await;
    let last = std::sync::Mutex::new(Value::Null);
    obs.next_where(timeout, |m| {
        let ok = m.topic == topic && !m.payload.is_empty() && pred(&m.json());
        if m.topic == topic {
            *last.lock().unwrap() = m.json();
        }
        ok
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "operation {id} did not reach the expected status; last: {}",
            last.lock().unwrap()
        )
    })
    .json()
}

/// `n` samples of the activity model's six channels, from its reference
/// (over again when it runs out).
pub fn samples(n: usize) -> Vec<Vec<f32>> {
    let r = activity_reference();
    r.cases
        .iter()
        .flat_map(|c| c.input.clone())
        .cycle()
        .take(n)
        .collect()
}

pub fn batch(rows: &[Vec<f32>]) -> String {
    json!({ "samples": rows }).to_string()
}

pub const SENSOR: &str = "sensors/w1/imu";

pub fn spawn(config: &Path, log: &Path, halt_at: Option<&str>) -> Child {
    let mut c = Command::new(env!("CARGO_BIN_EXE_edgeinfer"));
    c.args(["run", "-c"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    if let Some(stage) = halt_at {
        c.env("EDGEINFER_TEST_HALT_AT", stage);
    }
    c.spawn().unwrap()
}

pub async fn online(obs: &mut Observer, log: &Path) {
    assert!(
        obs.next_where(T, |m| m.topic.ends_with("/status") && m.text() == "online")
            .await
            .is_some(),
        "the daemon came online ({})",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}
