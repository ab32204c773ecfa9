"""The bundled object detector and the demo camera's frames (called by make_models.py).

Task: find four objects cut from scikit-image's public-domain photos — a
person (astronaut.png), a cat (chelsea.png), a cup (coffee.png) and a rocket
(rocket.jpg, and the shuttle model in astronaut.png) — wherever they appear
in a 320x240 frame. Training frames paste the objects (soft-edged, scaled,
flipped, brightness-jittered, 1-3 per frame) on random crops of other
scikit-image pictures; the held-back check and the demo composites use
backgrounds the detector never saw. This is a demonstration model: it knows
these objects, not objects in general.

The network is a small fully convolutional detector (5 conv layers, stride 8,
an output per 8x8 cell of the 160x120 input) whose graph ends in the
Ultralytics YOLOv8 layout edgeinfer reads: [1, 4 + classes, anchors] with
cx, cy, w, h in input pixels and a sigmoid score per class. It is trained
with PyTorch, its BatchNorms folded into the convolutions, and the ONNX graph
is written from the weights with onnx.helper (no exporter), then quantized to
int8 QDQ by onnxruntime (convolutions only; the box decoding stays float).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
from PIL import Image

SEED = 7
F32 = np.float32
FRAME_W, FRAME_H = 320, 240  # demo camera frames
IN_W, IN_H = 160, 120  # model input (the frame stretched, here an exact halving)
STRIDE = 8
GW, GH = IN_W // STRIDE, IN_H // STRIDE
ANCHOR = 32.0  # w, h = (2 sigmoid(t))^2 * ANCHOR: 0..128 input pixels
LABELS = ["person", "cat", "cup", "rocket"]
# (label, scikit-image picture, crop x0 y0 x1 y1 in that picture)
OBJECTS = [
    ("person", "astronaut", (110, 10, 320, 300)),
    ("cat", "chelsea", (40, 0, 410, 295)),
    ("cup", "coffee", (75, 15, 480, 390)),
    ("rocket", "rocket", (293, 122, 347, 410)),
    ("rocket", "astronaut", (352, 0, 470, 282)),
]
TRAIN_BACKGROUNDS = [
    "grass", "gravel", "brick", "camera", "coins", "moon", "page", "clock",
    "immunohistochemistry", "retina", "cell", "colorwheel",
]
HELD_OUT_BACKGROUNDS = ["hubble_deep_field", "text", "stereo_motorcycle"]
TRAIN_FRAMES = 6000
EPOCHS = 25
BATCH = 32
SCORE_THRESHOLD = 0.6
IOU_THRESHOLD = 0.45


def picture(name: str) -> Image.Image:
    import skimage.data as skd

    a = getattr(skd, name)()
    if name == "stereo_motorcycle":
        a = a[0]
    a = np.asarray(a)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    return Image.fromarray(a[..., :3].astype(np.uint8))


def soft_mask(w: int, h: int) -> Image.Image:
    """A rounded rectangle (superellipse) with a feathered edge."""
    yy, xx = np.mgrid[0:h, 0:w]
    u = (xx + 0.5) / w * 2 - 1
    v = (yy + 0.5) / h * 2 - 1
    r = (np.abs(u) ** 4 + np.abs(v) ** 4) ** 0.25
    return Image.fromarray((np.clip((1.0 - r) / 0.08, 0, 1) * 255).astype(np.uint8))


def iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    i = w * h
    u = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - i
    return i / u if u > 0 else 0.0


def covered(a, b) -> float:
    """Share of the smaller box covered by the other."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return w * h / min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))


class Composer:
    def __init__(self, backgrounds):
        self.backgrounds = [picture(n) for n in backgrounds]
        self.crops = [(LABELS.index(label), picture(img).crop(box)) for label, img, box in OBJECTS]

    def frame(self, rng):
        """A 320x240 frame and its objects [(class, [x0, y0, x1, y1])]."""
        bg = self.backgrounds[rng.integers(len(self.backgrounds))]
        ch = min(int(bg.width * rng.uniform(0.3, 1.0) * 0.75), bg.height)
        cw = int(ch / 0.75)
        x0, y0 = rng.integers(0, bg.width - cw + 1), rng.integers(0, bg.height - ch + 1)
        frame = bg.crop((x0, y0, x0 + cw, y0 + ch)).resize((FRAME_W, FRAME_H), Image.BILINEAR)
        if rng.random() < 0.5:
            tint = rng.uniform(0.6, 1.3, 3)
            frame = Image.fromarray(np.clip(np.asarray(frame) * tint, 0, 255).astype(np.uint8))
        boxes = []
        for _ in range(rng.integers(1, 4)):
            k, crop = self.crops[rng.integers(len(self.crops))]
            thin = crop.width / crop.height < 0.3
            for _attempt in range(10):
                h = rng.uniform(90 if thin else 50, 190)
                w = h * crop.width / crop.height * rng.uniform(0.85, 1.15)
                if w > FRAME_W * 0.8:
                    continue
                x, y = rng.uniform(0, FRAME_W - w), rng.uniform(0, FRAME_H - h)
                b = [x, y, x + w, y + h]
                if all(covered(b, o) < 0.25 for _, o in boxes):
                    break
            else:
                continue
            c = crop.resize((int(round(w)), int(round(h))), Image.BILINEAR)
            if rng.random() < 0.5:
                c = c.transpose(Image.FLIP_LEFT_RIGHT)
            a = np.asarray(c).astype(F32) * rng.uniform(0.7, 1.25) + rng.uniform(-20, 20)
            c = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
            px, py = int(round(x)), int(round(y))
            frame.paste(c, (px, py), soft_mask(c.width, c.height))
            boxes.append((k, [px, py, px + c.width, py + c.height]))
        return frame, boxes


def to_input(frame: Image.Image) -> np.ndarray:
    """[3, 120, 160] in 0..1, as the manifest tells edgeinfer to prepare it."""
    small = frame.resize((IN_W, IN_H), Image.BILINEAR)
    return np.asarray(small, dtype=F32).transpose(2, 0, 1) / 255.0


def network():
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class Net(nn.Module):
        # (out channels, stride, dilation): three stride-2 stages, then two
        # dilated convolutions so a cell sees objects up to ~110 input pixels.
        SPEC = [(16, 2, 1), (32, 2, 1), (48, 2, 1), (64, 1, 2), (64, 1, 4)]

        def __init__(self):
            super().__init__()
            self.convs, self.bns = nn.ModuleList(), nn.ModuleList()
            cin = 3
            for cout, s, d in self.SPEC:
                self.convs.append(nn.Conv2d(cin, cout, 3, s, d, dilation=d, bias=False))
                self.bns.append(nn.BatchNorm2d(cout))
                cin = cout
            self.head = nn.Conv2d(cin, 4 + len(LABELS), 1)
            gy, gx = torch.meshgrid(torch.arange(GH), torch.arange(GW), indexing="ij")
            self.register_buffer("grid", torch.stack([gx, gy]).reshape(1, 2, -1).float())

        def raw(self, x):
            for c, b in zip(self.convs, self.bns):
                x = F.relu(b(c(x)))
            return self.head(x).flatten(2)  # [N, 4 + C, anchors]

        def decode(self, r):
            s = torch.sigmoid(r[:, :4])
            xy = (s[:, :2] * 2 - 0.5 + self.grid) * STRIDE
            wh = (s[:, 2:4] * 2) ** 2 * ANCHOR
            return torch.cat([xy, wh, torch.sigmoid(r[:, 4:])], 1)

    return Net()


def assign(boxes):
    """Positive cells of one frame: the cell holding each object's centre and
    its two nearest neighbours (the decoded centre reaches 0.5 cell beyond its
    own). Returns (cell, class, cx, cy, w, h) in input pixels."""
    pos = []
    for k, b in boxes:
        x0, y0, x1, y1 = (v / 2.0 for v in b)
        cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
        gx, gy = cx / STRIDE, cy / STRIDE
        ix, iy = int(gx), int(gy)
        cells = {(ix, iy), (ix - 1 if gx - ix < 0.5 else ix + 1, iy), (ix, iy - 1 if gy - iy < 0.5 else iy + 1)}
        pos += [(y * GW + x, k, cx, cy, w, h) for x, y in sorted(cells) if 0 <= x < GW and 0 <= y < GH]
    return pos


def train(composer, rng):
    import torch
    import torch.nn.functional as F

    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    frames, positives = [], []
    for _ in range(TRAIN_FRAMES):
        f, b = composer.frame(rng)
        frames.append(to_input(f))
        positives.append(assign(b))
    x_all = torch.from_numpy(np.stack(frames))
    net = network()
    steps = TRAIN_FRAMES // BATCH
    opt = torch.optim.AdamW(net.parameters(), 3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=EPOCHS * steps)

    def giou(p, t):
        p1, p2 = p[:, :2] - p[:, 2:] / 2, p[:, :2] + p[:, 2:] / 2
        t1, t2 = t[:, :2] - t[:, 2:] / 2, t[:, :2] + t[:, 2:] / 2
        inter = (torch.min(p2, t2) - torch.max(p1, t1)).clamp(min=0).prod(1)
        union = p[:, 2:].prod(1) + t[:, 2:].prod(1) - inter
        hull = (torch.max(p2, t2) - torch.min(p1, t1)).prod(1)
        return inter / union.clamp(min=1e-6) - (hull - union) / hull.clamp(min=1e-6)

    net.train()
    for epoch in range(EPOCHS):
        perm = rng.permutation(TRAIN_FRAMES)
        total = 0.0
        for i in range(steps):
            idx = perm[i * BATCH : (i + 1) * BATCH]
            r = net.raw(x_all[torch.from_numpy(idx)])
            cls_t = torch.zeros(len(idx), len(LABELS), GW * GH)
            bi, ai, bt = [], [], []
            for j, n in enumerate(idx):
                for a, k, cx, cy, w, h in positives[n]:
                    cls_t[j, k, a] = 1.0
                    bi.append(j)
                    ai.append(a)
                    bt.append((cx, cy, w, h))
            lcls = F.binary_cross_entropy_with_logits(r[:, 4:], cls_t, reduction="sum") / max(len(bi), 1)
            pred = net.decode(r)[torch.tensor(bi), :4, torch.tensor(ai)]
            lbox = (1 - giou(pred, torch.tensor(bt, dtype=torch.float32))).mean()
            loss = lcls + 5 * lbox
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        print(f"objects: epoch {epoch + 1}/{EPOCHS} loss {total / steps:.3f}", flush=True)
    net.eval()
    return net


def graph(net) -> onnx.ModelProto:
    """The ONNX graph written from the trained weights (BatchNorm folded)."""
    import torch

    nodes, inits = [], []

    def const(name, a):
        inits.append(numpy_helper.from_array(np.asarray(a), name))
        return name

    layers = []
    for c, b in zip(net.convs, net.bns):
        s = (b.weight / torch.sqrt(b.running_var + b.eps)).detach()
        layers.append(((c.weight.detach() * s[:, None, None, None]).numpy(), (b.bias - b.running_mean * s).detach().numpy(), c.stride[0], c.dilation[0]))
    layers.append((net.head.weight.detach().numpy(), net.head.bias.detach().numpy(), 1, 1))
    prev = "image"
    for i, (w, b, s, d) in enumerate(layers):
        last = i == len(layers) - 1
        k = w.shape[-1]
        p = d * (k // 2)
        out = "head" if last else f"conv{i}"
        nodes.append(
            helper.make_node(
                "Conv", [prev, const(f"W{i}", w.astype(F32)), const(f"B{i}", b.astype(F32))], [out],
                name=f"conv{i}", strides=[s, s], dilations=[d, d], pads=[p, p, p, p], kernel_shape=[k, k],
            )
        )
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"relu{i}"], name=f"relu{i}"))
            prev = f"relu{i}"
    classes, anchors = len(LABELS), GW * GH
    grid = net.grid.numpy().astype(F32)
    nodes += [
        helper.make_node("Reshape", ["head", const("flat_shape", np.array([1, 4 + classes, anchors], np.int64))], ["raw"], name="flatten"),
        helper.make_node("Split", ["raw", const("split_sizes", np.array([2, 2, classes], np.int64))], ["txy", "twh", "tcls"], axis=1, name="split"),
        helper.make_node("Sigmoid", ["txy"], ["sxy"], name="xy_sigmoid"),
        helper.make_node("Mul", ["sxy", const("xy_gain", np.array(2.0 * STRIDE, F32))], ["gxy"], name="xy_scale"),
        helper.make_node("Add", ["gxy", const("xy_offset", (grid - 0.5) * STRIDE)], ["xy"], name="xy_grid"),
        helper.make_node("Sigmoid", ["twh"], ["swh"], name="wh_sigmoid"),
        helper.make_node("Mul", ["swh", "swh"], ["swh2"], name="wh_square"),
        helper.make_node("Mul", ["swh2", const("wh_gain", np.array(4.0 * ANCHOR, F32))], ["wh"], name="wh_scale"),
        helper.make_node("Sigmoid", ["tcls"], ["scores"], name="class_sigmoid"),
        helper.make_node("Concat", ["xy", "wh", "scores"], ["detections"], axis=1, name="concat"),
    ]
    g = helper.make_graph(
        nodes,
        "objects",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, IN_H, IN_W])],
        [helper.make_tensor_value_info("detections", TensorProto.FLOAT, [1, 4 + classes, anchors])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], producer_name="edgeinfer/tools")
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def detect(out: np.ndarray):
    """Decoded output [4 + C, anchors] -> [(class, score, box in frame pixels)]
    after per-class greedy NMS: what edgeinfer does, for the checks here."""
    cand = []
    for a in range(out.shape[1]):
        k = int(out[4:, a].argmax())
        s = float(out[4 + k, a])
        if s >= SCORE_THRESHOLD:
            cx, cy, w, h = (float(v) * FRAME_W / IN_W for v in out[:4, a])
            cand.append((k, s, [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]))
    kept = []
    for c in sorted(cand, key=lambda c: -c[1]):
        if all(k[0] != c[0] or iou(k[2], c[2]) < IOU_THRESHOLD for k in kept):
            kept.append(c)
    return kept


def score(run, frames):
    """(found, missed, extra, mean IoU of the found) at IoU >= 0.5, same label."""
    found = missed = extra = 0
    ious = []
    for frame, boxes in frames:
        dets = detect(run(to_input(frame)))
        used = set()
        for k, b in boxes:
            best = max(((iou(d[2], b), i) for i, d in enumerate(dets) if d[0] == k and i not in used), default=(0.0, -1))
            if best[0] >= 0.5:
                found += 1
                used.add(best[1])
                ious.append(best[0])
            else:
                missed += 1
        extra += len(dets) - len(used)
    return found, missed, extra, float(np.mean(ious)) if ious else 0.0


def photo_frames():
    """The four photos as a camera would send them (320x240), with the known
    objects' boxes: the crops' places scaled to the frame."""
    frames = []
    for img, file in [("astronaut", "astronaut.jpg"), ("chelsea", "chelsea.jpg"), ("coffee", "coffee.jpg"), ("rocket", "rocket.jpg")]:
        pic = picture(img)
        sx, sy = FRAME_W / pic.width, FRAME_H / pic.height
        boxes = [
            (LABELS.index(label), [round(box[0] * sx), round(box[1] * sy), round(box[2] * sx), round(box[3] * sy)])
            for label, src, box in OBJECTS
            if src == img
        ]
        frames.append((file, f"scikit-image {img}, resized to {FRAME_W}x{FRAME_H}", pic.resize((FRAME_W, FRAME_H), Image.BILINEAR), boxes))
    return frames


def ort_runner(mk, path: Path):
    """One onnxruntime session, called per frame: [3, H, W] -> [4 + C, anchors]."""
    sess = mk.ort_session(path)
    return lambda x: sess.run(None, {"image": x[None].astype(F32)})[0][0]


def objects(mk):
    """`mk` is make_models: its output folder and helpers (sha256, write_json,
    f32_list, Calibration, ort_session)."""
    out, sha256, write_json, f32_list = mk.OUT, mk.sha256, mk.write_json, mk.f32_list
    import torch

    rng = np.random.default_rng(SEED)
    composer = Composer(TRAIN_BACKGROUNDS)
    net = train(composer, rng)
    fp32 = out / "objects_fp32.onnx"
    onnx.save(graph(net), fp32)

    calib = [to_input(composer.frame(rng)[0]) for _ in range(64)]
    quantize_static(
        str(fp32),
        str(out / "objects.onnx"),
        mk.Calibration("image", np.stack(calib)),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=["Conv"],
    )
    model = out / "objects.onnx"

    # Held back: 300 frames on backgrounds the detector never saw.
    held_out = Composer(HELD_OUT_BACKGROUNDS)
    check_rng = np.random.default_rng(SEED + 1)
    checks = [held_out.frame(check_rng) for _ in range(300)]
    with torch.no_grad():
        f_found, f_missed, f_extra, f_iou = score(lambda x: net.decode(net.raw(torch.from_numpy(x)[None]))[0].numpy(), checks)
    q_found, q_missed, q_extra, q_iou = score(ort_runner(mk, model), checks)
    n = q_found + q_missed
    summary = (
        f"held-back 300 frames, {n} objects: fp32 found {f_found} (mean IoU {f_iou:.2f}), extra {f_extra}; "
        f"int8 found {q_found} (mean IoU {q_iou:.2f}), extra {q_extra}"
    )
    print(f"objects: {summary}")
    fp32.unlink()

    # Demo camera frames: the four photos, then composites on unseen backgrounds.
    cam = out / "samples" / "camera"
    cam.mkdir(parents=True, exist_ok=True)
    frames = photo_frames()
    demo_rng = np.random.default_rng(SEED + 2)
    for i in range(8):
        f, b = held_out.frame(demo_rng)
        frames.append((f"scene_{i}.jpg", "objects pasted on a background the detector never saw", f, b))
    run = ort_runner(mk, model)
    index = []
    for file, what, frame, boxes in frames:
        frame.save(cam / file, quality=85)
        index.append({"file": file, "what": what, "objects": [{"label": LABELS[k], "box": [int(v) for v in b]} for k, b in boxes]})
    write_json(out / "samples" / "camera.json", {"width": FRAME_W, "height": FRAME_H, "frames": index})
    demo = score(run, [(f, b) for _, _, f, b in frames])
    print(f"objects: demo frames ({len(frames)}): found {demo[0]}, missed {demo[1]}, extra {demo[2]}, mean IoU {demo[3]:.2f}")

    # References: onnxruntime on exact model inputs, stored losslessly as PNG
    # (160x120: no resize in edgeinfer, so tract sees the same numbers).
    ref_dir = out / "samples" / "objects"
    ref_dir.mkdir(parents=True, exist_ok=True)
    cases = []
    for i, (file, _, frame, boxes) in enumerate(frames):
        small = frame.resize((IN_W, IN_H), Image.BILINEAR)
        name = f"input_{i:02}.png"
        small.save(ref_dir / name)
        x = np.asarray(small, dtype=F32).transpose(2, 0, 1) / 255.0
        cases.append({"image": f"samples/objects/{name}", "frame": file, "output": f32_list(run(x))})
    ops = sorted({node.op_type for node in onnx.load(model).graph.node})
    write_json(
        out / "objects.reference.json",
        {
            "model": "objects.onnx",
            "model_sha256": sha256(model),
            "operators": ops,
            "producer": f"onnxruntime {ort.__version__}, CPUExecutionProvider, 1 thread",
            "note": "inputs are 160x120 RGB PNGs (model resolution); outputs are [4 + classes, anchors] as the graph gives them",
            "held_back": summary,
            "cases": cases,
        },
    )
    (out / "objects.toml").write_text(
        f'''# Object detector for the demo camera: a person, a cat, a cup and rockets cut from
# scikit-image's public-domain photos, found in 320x240 frames. int8 QDQ, YOLOv8
# output layout. Generated by models/make_models.py (models/objects.py); {summary}.
# It knows these objects, not objects in general.
name = "objects"
file = "objects.onnx"
sha256 = "{sha256(model)}"
description = "Finds the demo's four objects (person, cat, cup, rocket) in a 4:3 frame"

[input]
name = "image"
shape = [1, 3, {IN_H}, {IN_W}]
layout = "nchw"
color = "rgb"
resize = "stretch"

[preprocess]
scale = {1.0 / 255.0!r}

[output]
kind = "detection"
format = "yolov8"
labels = {json.dumps(LABELS)}
score_threshold = {SCORE_THRESHOLD}
iou_threshold = {IOU_THRESHOLD}
max_detections = 20
'''
    )
    print(f"objects: operators {ops}")
