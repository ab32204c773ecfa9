#!/bin/sh
# The side-by-side suite (issue #15): edgeinfer against onnxruntime and a
# Python paho-mqtt + onnxruntime consumer, in one run, one table, one JSON.
#
#   benches/suite.sh                 # writes benches/results/suite-DATE.json
#   ROUNDS=5 benches/suite.sh        # more interleaved rounds
#
# Needs mosquitto (tests/install-deps.sh installs it) and python3 with venv;
# installs mosquitto-clients (mosquitto_sub) when missing;
# makes its pinned environment in ~/.cache/edgeinfer/suite-venv once, and
# builds the release binary. Reads ../shared/models when it is there.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
venv="${XDG_CACHE_HOME:-$HOME/.cache}/edgeinfer/suite-venv"
if [ ! -x "$venv/bin/python" ] || ! cmp -s "$here/requirements-suite.txt" "$venv/requirements-suite.txt"; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements-suite.txt"
    cp "$here/requirements-suite.txt" "$venv/requirements-suite.txt"
fi
# mosquitto_sub: the broker's own ceiling, measured beside the consumers.
if ! command -v mosquitto_sub >/dev/null 2>&1; then
    "$repo/tests/apt-install.sh" mosquitto-clients
fi
(cd "$repo" && cargo build --release --locked --quiet)
# The ONNX Runtime library edgeinfer loads is the one inside the pinned wheel,
# the same build the Python side runs.
lib=$(ls "$venv"/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* | head -1)
mkdir -p "$here/results"
exec "$venv/bin/python" "$here/suite.py" \
    --binary "$repo/target/release/edgeinfer" \
    --onnxruntime-library "$lib" \
    --out "$here/results/suite-$(date -u +%Y%m%dT%H%M%SZ).json" "$@"
