#!/usr/bin/env python3
"""onnxruntime reference outputs for the public model zoo (../shared/models).

For every .onnx under the zoo folder: feed a deterministic input (the LCG
below, which tests/zoo.rs reproduces bit for bit), run onnxruntime (CPU, one
thread) and store every output with the model's sha256 in
tests/zoo/onnxruntime.json. Also times onnxruntime (p50 of --runs) so the
side-by-side table can be made in one run:

  models/.venv/bin/python tests/zoo/make_reference.py ../shared/models
  models/.venv/bin/python tests/zoo/make_reference.py ../shared/models --compare target/release/edgeinfer
"""

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
DTYPES = {"tensor(float)": ("f32", np.float32), "tensor(int8)": ("i8", np.int8), "tensor(uint8)": ("u8", np.uint8)}


def lcg_bytes(n: int, seed: int = 12345) -> np.ndarray:
    out = np.empty(n, dtype=np.int64)
    state = seed
    for i in range(n):
        state = (state * 1664525 + 1013904223) & 0xFFFFFFFF
        out[i] = state >> 24
    return out


def make_input(shape, kind):
    v = lcg_bytes(int(np.prod(shape)))
    if kind == "i8":
        return (v - 128).astype(np.int8).reshape(shape)
    if kind == "u8":
        return v.astype(np.uint8).reshape(shape)
    return ((v - 128).astype(np.float32) / np.float32(64.0)).reshape(shape)


def session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("zoo")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--compare", help="an edgeinfer binary: print edgeinfer's bench next to onnxruntime's")
    args = ap.parse_args()
    zoo = Path(args.zoo)
    entries = {}
    rows = []
    for path in sorted(zoo.rglob("*.onnx")):
        rel = str(path.relative_to(zoo))
        sess = session(path)
        inputs = {}
        specs = []
        for i in sess.get_inputs():
            kind, _ = DTYPES[i.type]
            shape = [d if isinstance(d, int) else 1 for d in i.shape]
            inputs[i.name] = make_input(shape, kind)
            specs.append({"name": i.name, "dtype": kind, "shape": shape})
        outs = sess.run(None, inputs)
        times = []
        for _ in range(args.runs):
            t = time.perf_counter()
            sess.run(None, inputs)
            times.append((time.perf_counter() - t) * 1e3)
        p50 = float(np.percentile(times, 50))
        entries[rel] = {
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "inputs": specs,
            "outputs": [
                {"name": o.name, "dtype": str(v.dtype), "shape": list(v.shape), "values": [float(x) for x in v.ravel()]}
                for o, v in zip(sess.get_outputs(), outs)
            ],
        }
        rows.append((rel, p50))
        print(f"{rel}: {len(outs)} outputs, onnxruntime p50 {p50:.4f} ms", file=sys.stderr)
    out = HERE / "onnxruntime.json"
    meta = {"producer": f"onnxruntime {ort.__version__}, CPUExecutionProvider, 1 thread", "input": "LCG bytes, seed 12345 (see make_reference.py)"}
    out.write_text(json.dumps({"meta": meta, "models": entries}, separators=(",", ":")) + "\n")
    if args.compare:
        print(f"| model | onnxruntime p50 (ms) | edgeinfer p50 (ms) |")
        print(f"|---|---|---|")
        for rel, p50 in rows:
            r = subprocess.run([args.compare, "bench", "-m", str(zoo / rel), "--runs", str(args.runs), "--json"], capture_output=True, text=True)
            e = json.loads(r.stdout)["p50_ms"] if r.returncode == 0 else f"fails: {r.stderr.strip()[:80]}"
            print(f"| {rel} | {p50:.4f} | {e} |")


if __name__ == "__main__":
    main()
