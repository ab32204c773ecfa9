//! Camera pipeline throughput against bare inference, side by side.
//!
//!   cargo bench --bench camera        (needs mosquitto and ../shared/models)
//!
//! Starts mosquitto and the release `edgeinfer run` with two camera
//! pipelines (UltraFace RFB-320 face detection, Visual Wake Words int8),
//! reads the daemon's RSS, then publishes a 640x480 JPEG of the astronaut
//! photo to the face pipeline and counts results per second, twice: offered
//! faster than it can keep up (a frame every 5 ms; the camera's slot keeps
//! the latest), and in a closed loop (two frames outstanding, the next sent
//! when a result arrives). Then runs `edgeinfer bench` on the same model for
//! the bare inference time, and reports the pipeline's overhead per frame.

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::io::Cursor;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn status_kib(pid: u32, key: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .unwrap_or(0.0)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let zoo = std::env::var_os("EDGEINFER_MODEL_ZOO")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo.join("../shared/models"));
    let Some(mosquitto) = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    else {
        println!("camera: mosquitto is not installed; skipped");
        return;
    };
    if !zoo.join("ultraface/version-RFB-320.onnx").exists() {
        println!("camera: no model zoo at {}; skipped", zoo.display());
        return;
    }
    let seconds: f64 = std::env::var("SECONDS_RUN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10.0);

    // The frame: the astronaut photo as a 640x480 JPEG (quality 85).
    let photo = image::open(zoo.join("../samples/images/astronaut.png"))
        .unwrap()
        .resize_exact(640, 480, image::imageops::FilterType::Triangle)
        .to_rgb8();
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut Cursor::new(&mut jpeg), 85)
        .encode_image(&photo)
        .unwrap();

    let dir = std::env::temp_dir().join(format!("edgeinfer-camera-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(
        dir.join("mosquitto.conf"),
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest none\n"
        ),
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
    let uf = dir.join("ultraface.toml");
    std::fs::write(
        &uf,
        format!(
            "file = {:?}\n[preprocess]\nmean = [127.0]\nstd = [128.0]\n[output]\nkind = \"detection\"\nformat = \"ultraface\"\nscore_threshold = 0.7\niou_threshold = 0.3\n",
            zoo.join("ultraface/version-RFB-320.onnx").display().to_string()
        ),
    )
    .unwrap();
    let vww = dir.join("vww.toml");
    std::fs::write(
        &vww,
        format!(
            "file = {:?}\n[preprocess]\nscale = 0.003921569\n[output]\nkind = \"classification\"\nlabels = [\"no person\", \"person\"]\n",
            zoo.join("mlperf-tiny/vww_96_int8.onnx").display().to_string()
        ),
    )
    .unwrap();
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
name = "faces"
kind = "camera"
topics = ["cameras/+/faces"]
model = "{}"
results = "bench/faces/{{1}}"
qos = 0
[[pipeline]]
name = "person"
kind = "camera"
topics = ["cameras/+/person"]
model = "{}"
results = "bench/person/{{1}}"
qos = 0
"#,
            uf.display(),
            vww.display()
        ),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_edgeinfer");
    let mut daemon = Command::new(bin)
        .args(["run", "-c"])
        .arg(dir.join("edgeinfer.toml"))
        .env("RUST_LOG", "warn")
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let pid = daemon.id();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (idle_rss, flood, closed) = rt.block_on(async {
        let mut o = MqttOptions::new("bench-camera", "127.0.0.1", port);
        o.set_max_packet_size(8 << 20, 8 << 20);
        let (client, mut ev) = AsyncClient::new(o, 1000);
        client.subscribe("bench/#", QoS::AtMostOnce).await.unwrap();
        client
            .subscribe("edgeinfer/bench/status", QoS::AtMostOnce)
            .await
            .unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Vec<u8>)>();
        tokio::spawn(async move {
            while let Ok(e) = ev.poll().await {
                if let Event::Incoming(Packet::Publish(p)) = e {
                    let _ = tx.send((p.topic, p.payload.to_vec()));
                }
            }
        });
        loop {
            let (t, p) = rx.recv().await.unwrap();
            if t.ends_with("/status") && p == b"online" {
                break;
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let idle_rss = status_kib(pid, "VmRSS:") / 1024.0;
        // One frame through each pipeline first (warm-up, and a check).
        client
            .publish("cameras/c1/person", QoS::AtMostOnce, false, jpeg.clone())
            .await
            .unwrap();
        let (_, first) = rx.recv().await.unwrap();
        println!(
            "vww on the 640x480 JPEG: {}",
            String::from_utf8_lossy(&first)
        );
        // Saturate the face pipeline: a frame every 5 ms.
        let publisher = client.clone();
        let frame = jpeg.clone();
        let feeding = tokio::spawn(async move {
            loop {
                if publisher
                    .publish("cameras/c1/faces", QoS::AtMostOnce, false, frame.clone())
                    .await
                    .is_err()
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        // Warm-up second, then count.
        let warm = Instant::now() + Duration::from_secs(1);
        while Instant::now() < warm {
            let _ = rx.recv().await;
        }
        let flood = count(&mut rx, seconds, |_| async {}).await;
        feeding.abort();
        // Drain what the flood left in flight, then the closed loop: two
        // frames outstanding, a new one published as each result arrives (a
        // camera sending exactly as fast as the pipeline can take).
        tokio::time::sleep(Duration::from_millis(500)).await;
        while rx.try_recv().is_ok() {}
        for _ in 0..2 {
            client
                .publish("cameras/c1/faces", QoS::AtMostOnce, false, jpeg.clone())
                .await
                .unwrap();
        }
        let closed = count(&mut rx, seconds, |_| {
            let c = client.clone();
            let frame = jpeg.clone();
            async move {
                let _ = c
                    .publish("cameras/c1/faces", QoS::AtMostOnce, false, frame)
                    .await;
            }
        })
        .await;
        (idle_rss, flood, closed)
    });
    let peak_rss = status_kib(pid, "VmHWM:") / 1024.0;
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
    let _ = daemon.wait();
    let _ = broker.kill();
    let _ = broker.wait();

    let out = Command::new(bin)
        .args(["bench", "-m"])
        .arg(&uf)
        .args(["--runs", "200", "--json"])
        .output()
        .unwrap();
    let bare: serde_json::Value = serde_json::from_slice(
        out.stdout
            .split(|b| *b == b'\n')
            .find(|l| l.starts_with(b"{"))
            .unwrap(),
    )
    .unwrap();
    let bare_p50 = bare["p50_ms"].as_f64().unwrap();
    println!("camera: two camera pipelines loaded (UltraFace RFB-320 + VWW int8): RSS {idle_rss:.1} MiB idle, peak {peak_rss:.1} MiB during the run");
    println!(
        "camera: bare inference (edgeinfer bench, same model, same run): p50 {bare_p50:.2} ms"
    );
    for (how, r) in [
        ("a 640x480 JPEG offered every 5 ms", flood),
        ("closed loop, 2 frames outstanding", closed),
    ] {
        let per_frame = 1000.0 / r.fps;
        println!(
            "camera: UltraFace pipeline, {how}: {:.1} frames/s ({} results in {seconds} s) = {per_frame:.2} ms per frame; medians pre {:.2} ms (decode + resize + normalise), infer {:.2} ms, post {:.2} ms; overhead per frame {:.1}% of bare inference",
            r.fps,
            r.frames,
            r.pre,
            r.infer,
            r.post,
            (per_frame - bare_p50) / bare_p50 * 100.0
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[derive(Clone, Copy)]
struct Rate {
    fps: f64,
    frames: usize,
    pre: f64,
    infer: f64,
    post: f64,
}

/// Counts UltraFace results for `seconds`, calling `on_result` after each.
async fn count<F, Fut>(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    seconds: f64,
    on_result: F,
) -> Rate
where
    F: Fn(()) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let start = Instant::now();
    let (mut n, mut pre, mut infer, mut post) = (0usize, vec![], vec![], vec![]);
    while start.elapsed().as_secs_f64() < seconds {
        let Ok(Some((t, p))) = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await else {
            break;
        };
        if !t.starts_with("bench/faces/") {
            continue;
        }
        on_result(()).await;
        let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
        pre.push(v["latency_ms"]["pre"].as_f64().unwrap());
        infer.push(v["latency_ms"]["infer"].as_f64().unwrap());
        post.push(v["latency_ms"]["post"].as_f64().unwrap());
        n += 1;
    }
    Rate {
        fps: n as f64 / start.elapsed().as_secs_f64(),
        frames: n,
        pre: median(&mut pre),
        infer: median(&mut infer),
        post: median(&mut post),
    }
}
