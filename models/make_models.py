#!/usr/bin/env python3
"""Train, export and quantize edgeinfer's bundled models.

Writes into models/ (committed, so `cargo test` needs no Python):

  activity.onnx            int8 QDQ activity classifier (standing / walking /
                           running / badminton) trained on UEA BasicMotions
                           (smart-watch accelerometer + gyroscope, 6 channels)
  activity.toml            manifest: input, preprocessing, labels
  activity.reference.json  onnxruntime outputs on held-back test windows
  motion.onnx              int8 QDQ autoencoder on the BasicMotions
                           accelerometer, trained on calm activity only;
                           its reconstruction error flags vigorous motion
  motion.toml, motion.reference.json
  samples/*.json           small real sample streams for `edgeinfer demo`
  objects.onnx             int8 QDQ object detector (person, cat, cup, rocket;
                           YOLOv8 output layout) trained on frames composed
                           from scikit-image's public-domain photos
  objects.toml, objects.reference.json, samples/objects/*.png (its inputs)
  samples/camera/*.jpg     demo camera frames: four of those photos and
                           composites on backgrounds the detector never saw
  samples/camera.json      the frames' known boxes

The data sets come from the `aeon` and `scikit-image` packages (their bundled
copies), never from the network. Run:
    models/.venv/bin/python models/make_models.py [activity] [motion] [objects]
(no argument: all three).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from sklearn.neural_network import MLPClassifier, MLPRegressor

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "models"
SEED = 7
F32 = np.float32

ACT_WINDOW = 50  # samples (5 s at 10 Hz)
ACT_STRIDE = 5
ACT_CHANNELS = ["acc_x", "acc_y", "acc_z", "gyr_x", "gyr_y", "gyr_z"]
ACT_LABELS = ["standing", "walking", "running", "badminton"]

MOTION_WINDOW = 20  # samples (2 s at 10 Hz)
MOTION_STRIDE = 2
MOTION_NORMAL = ("standing", "walking")


def f32_list(a) -> list:
    """Floats that round-trip exactly through f32 (JSON keeps the f64 repr)."""
    return [float(v) for v in np.asarray(a, dtype=F32).ravel()]


def windows(series: np.ndarray, size: int, stride: int) -> np.ndarray:
    """series: [T, C] -> [N, size, C]"""
    starts = range(0, series.shape[0] - size + 1, stride)
    return np.stack([series[s : s + size] for s in starts])


def mlp_graph(name, layers, in_shape, out_dim, in_name, out_name, relu_last=False):
    """Flatten -> (MatMul + Add + Relu)* -> MatMul + Add, batch dimension symbolic.

    MatMul + Add rather than Gemm: onnxruntime's QOperator format turns Gemm
    into com.microsoft QGemm, which other runtimes do not implement."""
    nodes = [helper.make_node("Flatten", [in_name], ["flat"], axis=1, name="flatten")]
    inits = []
    prev = "flat"
    for i, (w, b) in enumerate(layers):
        wn, bn = f"W{i}", f"B{i}"
        inits += [numpy_helper.from_array(w.astype(F32), wn), numpy_helper.from_array(b.astype(F32), bn)]
        last = i == len(layers) - 1
        mm, add = f"mm{i}", (out_name if last and not relu_last else f"add{i}")
        nodes.append(helper.make_node("MatMul", [prev, wn], [mm], name=f"dense{i}/matmul"))
        nodes.append(helper.make_node("Add", [mm, bn], [add], name=f"dense{i}/bias"))
        prev = add
        if not last:
            nodes.append(helper.make_node("Relu", [add], [f"relu{i}"], name=f"dense{i}/relu"))
            prev = f"relu{i}"
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, ["N", *in_shape])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["N", out_dim])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="edgeinfer/tools")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


class Calibration(CalibrationDataReader):
    def __init__(self, name: str, data: np.ndarray):
        self.items = iter([{name: x[None].astype(F32)} for x in data])

    def get_next(self):
        return next(self.items, None)


def quantize(fp32_path: Path, int8_path: Path, input_name: str, calib: np.ndarray):
    quantize_static(
        str(fp32_path),
        str(int8_path),
        Calibration(input_name, calib),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
    )


def variants(fp32_path: Path, name: str, input_name: str, calib: np.ndarray) -> list:
    """The other two int8 flavours, for compatibility tests (not bundled in the binary):
    QOperator (QLinearMatMul; only MatMul is quantized, because a quantized Add
    becomes com.microsoft QLinearAdd, which is not a standard ONNX operator) and
    dynamic (DynamicQuantizeLinear + MatMulInteger)."""
    qop = OUT / f"{name}_qop.onnx"
    quantize_static(
        str(fp32_path),
        str(qop),
        Calibration(input_name, calib),
        quant_format=QuantFormat.QOperator,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul"],
    )
    dyn = OUT / f"{name}_dyn.onnx"
    quantize_dynamic(str(fp32_path), str(dyn), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
    return [("qop", qop), ("dyn", dyn)]


def write_variant_files(name: str, manifest: str, flavours: list, cases_input: np.ndarray, prep, extra_case_fields):
    """Manifest and onnxruntime references for each variant, same held-back inputs."""
    for flavour, path in flavours:
        ops = sorted({n.op_type for n in onnx.load(path).graph.node})
        out = run_ort(path, input_name_of(path), prep(cases_input))
        (OUT / f"{name}_{flavour}.toml").write_text(
            manifest.replace(f'name = "{name}"', f'name = "{name}_{flavour}"')
            .replace(f'file = "{name}.onnx"', f'file = "{name}_{flavour}.onnx"')
            .replace(f"sha256 = \"{sha256(OUT / f'{name}.onnx')}\"", f"sha256 = \"{sha256(path)}\"")
        )
        write_json(
            OUT / f"{name}_{flavour}.reference.json",
            {
                "model": path.name,
                "model_sha256": sha256(path),
                "operators": ops,
                "producer": f"onnxruntime {ort.__version__}, CPUExecutionProvider, 1 thread",
                "cases": [dict(extra_case_fields(i), input=[f32_list(r) for r in x], output=f32_list(o)) for i, (x, o) in enumerate(zip(cases_input, out))],
            },
        )
        print(f"{name}_{flavour}: operators {ops}")


def input_name_of(path: Path) -> str:
    return onnx.load(path).graph.input[0].name


def ort_session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_ort(path: Path, input_name: str, x: np.ndarray) -> np.ndarray:
    sess = ort_session(path)
    return np.concatenate([sess.run(None, {input_name: xi[None].astype(F32)})[0] for xi in x])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, separators=(",", ":")) + "\n")


def activity():
    from aeon.datasets import load_basic_motions

    xtr, ytr = load_basic_motions(split="train")  # [40, 6, 100]
    xte, yte = load_basic_motions(split="test")
    xtr = xtr.transpose(0, 2, 1).astype(F32)  # [40, 100, 6]: time-major, as samples arrive
    xte = xte.transpose(0, 2, 1).astype(F32)
    mean = xtr.reshape(-1, 6).mean(0).astype(F32)
    std = (xtr.reshape(-1, 6).std(0) + 1e-3).astype(F32)

    def prep(w):
        return ((w.astype(F32) - mean) / std).astype(F32)

    wx, wy = [], []
    for s, label in zip(xtr, ytr):
        for w in windows(s, ACT_WINDOW, ACT_STRIDE):
            wx.append(prep(w))
            wy.append(ACT_LABELS.index(label))
    wx, wy = np.stack(wx), np.array(wy)
    clf = MLPClassifier(hidden_layer_sizes=(32,), alpha=1e-2, max_iter=600, random_state=SEED)
    clf.fit(wx.reshape(len(wx), -1), wy)

    layers = list(zip(clf.coefs_, clf.intercepts_))
    model = mlp_graph("activity", layers, [ACT_WINDOW, 6], len(ACT_LABELS), "imu", "logits")
    fp32 = OUT / "activity_fp32.onnx"
    onnx.save(model, fp32)
    quantize(fp32, OUT / "activity.onnx", "imu", wx[::3])
    act_flavours = variants(fp32, "activity", "imu", wx[::3])

    # Held-back: the 40 test recordings, windows at offsets 0 and 50.
    test_raw = np.stack([w for s in xte for w in (s[:ACT_WINDOW], s[ACT_WINDOW:])])
    test_y = [label for label in yte for _ in range(2)]
    out_q = run_ort(OUT / "activity.onnx", "imu", prep(test_raw))
    out_f = run_ort(fp32, "imu", prep(test_raw))
    acc_q = np.mean([ACT_LABELS[i] == y for i, y in zip(out_q.argmax(1), test_y)])
    acc_f = np.mean([ACT_LABELS[i] == y for i, y in zip(out_f.argmax(1), test_y)])
    print(f"activity: held-back accuracy fp32 {acc_f:.3f}, int8 {acc_q:.3f} on {len(test_y)} windows")
    fp32.unlink()  # the float variant is a training by-product; issue #3 adds flavours

    write_json(
        OUT / "activity.reference.json",
        {
            "model": "activity.onnx",
            "model_sha256": sha256(OUT / "activity.onnx"),
            "producer": f"onnxruntime {ort.__version__}, CPUExecutionProvider, 1 thread",
            "note": "inputs are raw sensor values (before the manifest's mean/std); outputs are the model's logits",
            "accuracy_int8": float(acc_q),
            "cases": [
                {"label": y, "input": [f32_list(r) for r in x], "output": f32_list(o)}
                for x, y, o in zip(test_raw, test_y, out_q)
            ],
        },
    )
    manifest = f'''# Activity classifier: UEA BasicMotions (smart watch, 10 Hz), int8 QDQ.
# Generated by models/make_models.py; held-back accuracy (int8): {acc_q:.3f}.
name = "activity"
file = "activity.onnx"
sha256 = "{sha256(OUT / 'activity.onnx')}"
description = "Human activity from a wrist IMU: 50 samples x (acc xyz, gyro xyz)"

[input]
name = "imu"
shape = [1, {ACT_WINDOW}, 6]
channels = {json.dumps(ACT_CHANNELS)}

[preprocess]
mean = {json.dumps(f32_list(mean))}
std = {json.dumps(f32_list(std))}

[output]
kind = "classification"
softmax = true
top_k = 2
labels = {json.dumps(ACT_LABELS)}
'''
    (OUT / "activity.toml").write_text(manifest)
    write_variant_files("activity", manifest, act_flavours, test_raw, prep, lambda i: {"label": test_y[i]})

    # Demo stream: one held-back recording per class, 100 samples each.
    streams = []
    for label in ACT_LABELS:
        i = list(yte).index(label)
        streams.append({"device": f"watch-{len(streams) + 1}", "label": label, "samples": [f32_list(r) for r in xte[i]]})
    write_json(OUT / "samples" / "activity_stream.json", {"rate_hz": 10, "channels": ACT_CHANNELS, "streams": streams})


def motion():
    """Anomaly model: an autoencoder trained only on calm activity (standing,
    walking) of the BasicMotions accelerometer; vigorous motion (running,
    badminton) reconstructs badly. Real labels, so the held-back check means
    something. (aeon's Daphnet S06R02E0 copy carries no freeze labels.)"""
    from aeon.datasets import load_basic_motions

    xtr, ytr = load_basic_motions(split="train")
    xte, yte = load_basic_motions(split="test")
    xtr = xtr.transpose(0, 2, 1)[:, :, :3].astype(F32)  # accelerometer only
    xte = xte.transpose(0, 2, 1)[:, :, :3].astype(F32)
    calm = [i for i, y in enumerate(ytr) if y in MOTION_NORMAL]
    mean = xtr[calm].reshape(-1, 3).mean(0).astype(F32)
    std = (xtr[calm].reshape(-1, 3).std(0) + 1e-3).astype(F32)

    def prep(w):
        return ((w.astype(F32) - mean) / std).astype(F32)

    train = np.stack([prep(w) for i in calm for w in windows(xtr[i], MOTION_WINDOW, MOTION_STRIDE)])
    flat = train.reshape(len(train), -1)
    ae = MLPRegressor(hidden_layer_sizes=(12,), alpha=1e-3, max_iter=2000, random_state=SEED)
    ae.fit(flat, flat)
    layers = list(zip(ae.coefs_, ae.intercepts_))
    model = mlp_graph("motion", layers, [MOTION_WINDOW, 3], MOTION_WINDOW * 3, "accel", "reconstruction")
    fp32 = OUT / "motion_fp32.onnx"
    onnx.save(model, fp32)
    quantize(fp32, OUT / "motion.onnx", "accel", train[::2])
    motion_flavours = variants(fp32, "motion", "accel", train[::2])
    fp32.unlink()

    def score(raw):
        rec = run_ort(OUT / "motion.onnx", "accel", prep(raw))
        return ((rec - prep(raw).reshape(len(raw), -1)) ** 2).mean(1), rec

    train_raw = np.stack([w for i in calm for w in windows(xtr[i], MOTION_WINDOW, MOTION_STRIDE)])
    threshold = float(np.quantile(score(train_raw)[0], 0.99))

    # Held-back: every test recording, windows at offsets 0, 40, 80.
    raw = np.stack([s[o : o + MOTION_WINDOW] for s in xte for o in (0, 40, 80)])
    labels = [y for y in yte for _ in range(3)]
    scores, rec = score(raw)
    truth = np.array([y not in MOTION_NORMAL for y in labels])
    flags = scores > threshold
    acc = float((flags == truth).mean())
    print(
        f"motion: threshold {threshold:.3f}; held-back calm flagged {flags[~truth].mean():.2f}, "
        f"vigorous flagged {flags[truth].mean():.2f}, agreement {acc:.3f} ({len(labels)} windows)"
    )
    write_json(
        OUT / "motion.reference.json",
        {
            "model": "motion.onnx",
            "model_sha256": sha256(OUT / "motion.onnx"),
            "producer": f"onnxruntime {ort.__version__}, CPUExecutionProvider, 1 thread",
            "note": "inputs are raw accelerometer values; outputs are the reconstruction of the normalised window",
            "threshold": threshold,
            "agreement": acc,
            "cases": [
                {"label": y, "anomalous": bool(t), "input": [f32_list(r) for r in w], "output": f32_list(o), "score": float(sc)}
                for w, y, t, o, sc in zip(raw, labels, truth, rec, scores)
            ],
        },
    )
    manifest = f'''# Unusual-motion detector: UEA BasicMotions wrist accelerometer (10 Hz), int8 QDQ
# autoencoder trained on standing and walking only; the score is the reconstruction
# error, so running or badminton score high. Generated by models/make_models.py;
# threshold = 99th percentile of the training windows' scores.
name = "motion"
file = "motion.onnx"
sha256 = "{sha256(OUT / 'motion.onnx')}"
description = "Anomaly score of 2 s of wrist acceleration (3 axes)"

[input]
name = "accel"
shape = [1, {MOTION_WINDOW}, 3]
channels = {json.dumps(ACT_CHANNELS[:3])}

[preprocess]
mean = {json.dumps(f32_list(mean))}
std = {json.dumps(f32_list(std))}

[output]
kind = "anomaly"
score = "reconstruction_mse"
threshold = {threshold:.6f}
'''
    (OUT / "motion.toml").write_text(manifest)
    write_variant_files(
        "motion", manifest, motion_flavours, raw, prep, lambda i: {"label": labels[i], "anomalous": bool(truth[i])}
    )


def main():
    np.random.seed(SEED)
    (OUT / "samples").mkdir(parents=True, exist_ok=True)
    parts = sys.argv[1:] or ["activity", "motion", "objects"]
    for part in parts:
        if part not in ("activity", "motion", "objects"):
            print(f"unknown part {part!r}: activity, motion or objects", file=sys.stderr)
            return 2
    if "activity" in parts:
        activity()
    if "motion" in parts:
        motion()
    if "objects" in parts:
        from objects import objects

        objects(sys.modules[__name__])
    return 0


if __name__ == "__main__":
    sys.exit(main())
