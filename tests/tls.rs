//! TLS to a real mosquitto: server verification against a CA file, mutual
//! TLS, and a server certificate from the wrong CA refused with a clear error.
//! Certificates are made per test (rcgen); everything stays on 127.0.0.1.

mod common;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const T: Duration = Duration::from_secs(15);

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    Ca {
        cert: params.self_signed(&key).unwrap(),
        key,
    }
}

/// Writes NAME.pem and NAME.key signed by `ca` into `dir`.
fn leaf(dir: &Path, name: &str, sans: &[&str], ca: &Ca) {
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.signed_by(&key, &ca.cert, &ca.key).unwrap();
    std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
}

/// mosquitto with a plain listener (for the observer) and a TLS one.
fn broker(dir: &Path, require_client_cert: bool) -> (Mosquitto, u16) {
    let tls_port = free_port();
    let extra = format!(
        "listener {tls_port} 127.0.0.1\ncafile {d}/ca.pem\ncertfile {d}/server.pem\nkeyfile {d}/server.key\nrequire_certificate {require_client_cert}\n",
        d = dir.display()
    );
    (Mosquitto::start_with(free_port(), extra), tls_port)
}

fn setup() -> (tempfile::TempDir, Ca) {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca("edgeinfer test CA");
    std::fs::write(dir.path().join("ca.pem"), ca.cert.pem()).unwrap();
    leaf(dir.path(), "server", &["localhost", "127.0.0.1"], &ca);
    (dir, ca)
}

fn tls_config(dir: &Path, tls_port: u16, device: &str, broker_extra: &str) -> String {
    config_text(
        &format!("mqtts://127.0.0.1:{tls_port}"),
        device,
        ACTIVITY_PIPELINE,
    )
    .replace(
        "reconnect_max_ms = 1000\n",
        &format!(
            "reconnect_max_ms = 1000\nca_file = \"{}/ca.pem\"\n{broker_extra}",
            dir.display()
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_over_tls_verifying_the_server_against_the_ca_file() {
    let (dir, _ca) = setup();
    let (broker, tls_port) = broker(dir.path(), false);
    let mut obs = Observer::connect(broker.port, &["edgeinfer/gw-tls/#"]).await;
    let daemon = Daemon::start(parse(&tls_config(dir.path(), tls_port, "gw-tls", "")));
    let online = obs
        .next_where(T, |m| m.topic.ends_with("/status"))
        .await
        .expect("online over TLS");
    assert_eq!(online.text(), "online");
    // And results flow through the TLS connection.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let window = serde_json::json!({"samples": activity_reference().cases[0].input}).to_string();
    obs.publish("sensors/t1/imu", window).await;
    assert!(obs
        .next_where(T, |m| m.topic.contains("/results/"))
        .await
        .is_some());
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_a_client_certificate() {
    let (dir, ca) = setup();
    leaf(dir.path(), "client", &["edgeinfer-gw-mtls"], &ca);
    let (broker, tls_port) = broker(dir.path(), true);
    let mut obs = Observer::connect(
        broker.port,
        &["edgeinfer/gw-mtls/status", "edgeinfer/gw-anon/status"],
    )
    .await;
    let client = format!(
        "cert_file = \"{d}/client.pem\"\nkey_file = \"{d}/client.key\"\n",
        d = dir.path().display()
    );
    let daemon = Daemon::start(parse(&tls_config(dir.path(), tls_port, "gw-mtls", &client)));
    let online = obs
        .next_where(T, |m| m.topic == "edgeinfer/gw-mtls/status")
        .await
        .expect("online with mTLS");
    assert_eq!(online.text(), "online");
    daemon.stop().await;
    // Without a client certificate the same broker refuses the connection.
    let anon = Daemon::start(parse(&tls_config(dir.path(), tls_port, "gw-anon", "")));
    assert!(
        obs.next_where(Duration::from_secs(3), |m| m.topic
            == "edgeinfer/gw-anon/status")
            .await
            .is_none(),
        "a client without a certificate must not get in"
    );
    anon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_from_another_ca_is_refused_clearly() {
    let (dir, _ca) = setup();
    let (broker, tls_port) = broker(dir.path(), false);
    // The daemon trusts a different CA than the one that signed the server.
    let other = tempfile::tempdir().unwrap();
    std::fs::write(other.path().join("ca.pem"), ca("some other CA").cert.pem()).unwrap();
    let config_path = dir.path().join("edgeinfer.toml");
    let text = tls_config(other.path(), tls_port, "gw-wrong", "")
        .replace("\"models/", &format!("\"{}/models/", repo().display()));
    std::fs::write(&config_path, text).unwrap();
    let mut obs = Observer::connect(broker.port, &["edgeinfer/gw-wrong/status"]).await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgeinfer"))
        .args(["run", "-c", config_path.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        obs.next_where(Duration::from_secs(3), |_| true)
            .await
            .is_none(),
        "must not connect"
    );
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    println!("{stderr}");
    assert_eq!(
        status.code(),
        Some(0),
        "shuts down cleanly while unable to connect"
    );
    assert!(
        stderr.contains("TLS handshake with the broker failed")
            && stderr.contains("broker.ca_file"),
        "{stderr}"
    );
    assert!(
        stderr.contains("UnknownIssuer") || stderr.contains("invalid peer certificate"),
        "{stderr}"
    );
}

#[test]
fn check_config_reports_unusable_tls_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), "not a certificate\n").unwrap();
    let text = config_text("mqtts://127.0.0.1:1", "gw-x", ACTIVITY_PIPELINE)
        .replace(
            "reconnect_max_ms = 1000\n",
            "reconnect_max_ms = 1000\nca_file = \"ca.pem\"\ncert_file = \"client.pem\"\n",
        )
        .replace("\"models/", &format!("\"{}/models/", repo().display()));
    let path = dir.path().join("e.toml");
    let check = |config: &str| {
        std::fs::write(&path, config).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_edgeinfer"))
            .args(["check-config", "-c", path.to_str().unwrap()])
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(78),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = check(&text);
    assert!(
        err.contains("broker.cert_file") && err.contains("needs both"),
        "{err}"
    );
    // With the pair fixed, the CA file's content is the problem.
    let err = check(&text.replace("cert_file = \"client.pem\"\n", ""));
    assert!(
        err.contains("broker.ca_file") && err.contains("no PEM certificate"),
        "{err}"
    );
}
