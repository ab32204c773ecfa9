//! Journal fields (issue #17): the daemon binary, logging to the journal,
//! writes each event's fields as journal fields — `PIPELINE=`, `MODEL=`,
//! `TOPIC=` — so that `journalctl -u edgeinfer PIPELINE=activity` works.
//!
//! There is no journald here: the daemon runs in a private mount namespace
//! in which /run/systemd/journal is a folder of this test's, and the test
//! reads the datagrams from the socket it binds there, in journald's native
//! protocol. That needs root (a mount namespace); elsewhere the test says
//! it was skipped.

mod common;

use common::{repo, Mosquitto, Observer};
use std::collections::HashMap;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

/// One journal record: field → values (a field may repeat).
type Record = HashMap<String, Vec<String>>;

/// Parses journald's native protocol: `KEY=value\n`, or for binary-safe
/// values `KEY\n` + 64-bit little-endian length + value + `\n`.
fn parse(mut data: &[u8]) -> Record {
    let mut record = Record::new();
    while !data.is_empty() {
        let end = data.iter().position(|b| *b == b'\n').unwrap_or(data.len());
        let line = &data[..end];
        let (key, value, rest) = match line.iter().position(|b| *b == b'=') {
            Some(eq) => (
                &line[..eq],
                line[eq + 1..].to_vec(),
                &data[(end + 1).min(data.len())..],
            ),
            None => {
                let after = &data[end + 1..];
                let len = u64::from_le_bytes(after[..8].try_into().unwrap()) as usize;
                (
                    line,
                    after[8..8 + len].to_vec(),
                    &after[(8 + len + 1).min(after.len())..],
                )
            }
        };
        record
            .entry(String::from_utf8_lossy(key).into_owned())
            .or_default()
            .push(String::from_utf8_lossy(&value).into_owned());
        data = rest;
    }
    record
}

fn field<'a>(r: &'a Record, key: &str) -> Option<&'a str> {
    r.get(key).and_then(|v| v.first()).map(|s| s.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_records_carry_pipeline_model_and_topic_as_journal_fields() {
    let unshare = Command::new("unshare").args(["-m", "true"]).status();
    if !unshare.map(|s| s.success()).unwrap_or(false) {
        println!("no mount namespace here (needs root): skipped");
        return;
    }
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal");
    std::fs::create_dir(&journal).unwrap();
    let socket = UnixDatagram::bind(journal.join("socket")).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    // Read from the start, as journald does: a full socket queue would
    // block the daemon's logging.
    let records = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Record>::new()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (records, stop) = (records.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(n) = socket.recv(&mut buf) {
                    if n > 0 {
                        records.lock().unwrap().push(parse(&buf[..n]));
                    }
                }
            }
        })
    };
    let config = dir.path().join("edgeinfer.toml");
    std::fs::write(
        &config,
        common::config_text(&broker.url(), "j1", "")
            + &common::ACTIVITY_PIPELINE.replace(
                "models/activity.toml",
                repo().join("models/activity.toml").to_str().unwrap(),
            ),
    )
    .unwrap();
    let mut obs =
        Observer::connect(broker.port, &["edgeinfer/j1/status", "edgeinfer/j1/errors"]).await;
    let script = format!(
        "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal && \
         mount --bind '{}' /run/systemd/journal && exec '{}' run -c '{}'",
        journal.display(),
        env!("CARGO_BIN_EXE_edgeinfer"),
        config.display()
    );
    let mut child = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .env("EDGEINFER_LOG", "journal")
        .env("RUST_LOG", "info,edgeinfer=debug")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        obs.next_where(Duration::from_secs(30), |m| m.text() == "online")
            .await
            .is_some(),
        "the daemon came online"
    );
    obs.publish("sensors/w9/imu", "not json").await;
    assert!(obs
        .next_where(Duration::from_secs(10), |m| m.topic.ends_with("/errors"))
        .await
        .is_some());

    // The rejection is logged as it is reported; give the reader a moment.
    std::thread::sleep(Duration::from_millis(500));
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    child.wait().unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    reader.join().unwrap();
    let records = records.lock().unwrap().clone();

    let find = |text: &str| {
        records
            .iter()
            .find(|r| field(r, "MESSAGE").is_some_and(|m| m.contains(text)))
            .unwrap_or_else(|| panic!("no {text:?} record among {records:#?}"))
    };
    let loaded = find("Model loaded");
    println!("Model loaded: {loaded:#?}");
    assert_eq!(field(loaded, "PIPELINE"), Some("activity"));
    assert_eq!(field(loaded, "MODEL"), Some("activity"));
    assert_eq!(field(loaded, "RUNS_ON"), Some("tract-cpu"));
    assert_eq!(field(loaded, "PRIORITY"), Some("5"));
    assert_eq!(field(loaded, "SYSLOG_IDENTIFIER"), Some("edgeinfer"));
    // On a worker thread: pipeline and model come from the span.
    let rejected = find("Input rejected");
    println!("Input rejected: {rejected:#?}");
    assert_eq!(field(rejected, "TOPIC"), Some("sensors/w9/imu"));
    assert_eq!(field(rejected, "PIPELINE"), Some("activity"));
    assert_eq!(field(rejected, "MODEL"), Some("activity"));
    assert_eq!(field(rejected, "KIND"), Some("malformed_json"));
}
