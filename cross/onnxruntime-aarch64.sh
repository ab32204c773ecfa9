#!/usr/bin/env bash
# The aarch64 build against PyPI's aarch64 onnxruntime 1.32.0, under
# qemu-aarch64: every bundled model through tract and ONNX Runtime
# (`backend = "auto"`), outputs compared; fails unless all agree.
#
# qemu-user shows the host's /proc/cpuinfo, and ONNX Runtime's cpuinfo
# library crashes on an x86 one while the library loads (real ARM boards
# have an ARM one). So the run gets an ARM cpuinfo bound over it in a
# private mount namespace: that needs root (or CAP_SYS_ADMIN); without it
# the check says so and is skipped.
#
# usage: cross/onnxruntime-aarch64.sh [EDGEINFER_AARCH64_BINARY]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${1:-target/aarch64-unknown-linux-gnu/debug/edgeinfer}"
ORT_DIR="${EDGEINFER_ORT_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/edgeinfer/onnxruntime}"
LIB="$ORT_DIR/aarch64-cpu-1.32.0/libonnxruntime.so.1.32.0"

if [ ! -e "$LIB" ]; then
  tmp="$(mktemp -d)"
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --platform manylinux_2_28_aarch64 --python-version 3.11 --implementation cp --abi cp311 \
    --dest "$tmp" onnxruntime==1.32.0
  mkdir -p "$(dirname "$LIB")"
  python3 - "$tmp" "$(dirname "$LIB")" <<'PY'
import glob, os, sys, zipfile
for wheel in glob.glob(os.path.join(sys.argv[1], "*.whl")):
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            base = os.path.basename(name)
            if name.startswith("onnxruntime/capi/libonnxruntime.so"):
                out = os.path.join(sys.argv[2], base)
                with z.open(name) as i, open(out, "wb") as o:
                    o.write(i.read())
PY
  rm -rf "$tmp"
fi

cpuinfo="$(mktemp)"
for n in 0 1; do
  printf 'processor\t: %s\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x3\nCPU part\t: 0xd0c\nCPU revision\t: 1\n\n' "$n" >> "$cpuinfo"
done
if ! unshare -m true 2>/dev/null; then
  echo "cross/onnxruntime-aarch64.sh: cannot make a mount namespace here (needs root); skipped"
  exit 0
fi
out="$(mktemp)"
unshare -m sh -c "mount --bind '$cpuinfo' /proc/cpuinfo && \
  qemu-aarch64 -L /usr/aarch64-linux-gnu '$BIN' models --json --onnxruntime-library '$LIB'" > "$out"
python3 - "$out" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))
bad = 0
for r in rows:
    # tract on the graph as given (its variants of QDQ models are rows with a
    # "variant", held to the same rule by auto itself).
    measured = {m["runs_on"]: m for m in (r.get("engine") or {}).get("measured", []) if not m.get("variant")}
    t = measured.get("tract-cpu", {})
    ok = r["error"] is None and "onnxruntime-cpu" in measured and t.get("agrees") is True
    bad += not ok
    print(f'{r["name"]}: {r["backend"] or r["error"]}, max |difference| {t.get("max_abs_diff")}, agrees {t.get("agrees")}')
if bad or not rows:
    sys.exit(f"{bad} of {len(rows)} models did not run on both engines in agreement")
print(f"aarch64: {len(rows)} models, tract and ONNX Runtime 1.32.0 agree on all")
PY
rm -f "$cpuinfo" "$out"
