#!/usr/bin/env bash
# The test command: installs what the tests need when it is missing
# (mosquitto, from Debian's packages), then runs the whole suite.
#   tests/run.sh [extra cargo test arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

have_mosquitto() { command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; }
if ! have_mosquitto; then
  echo "tests/run.sh: installing mosquitto (the integration tests start their own brokers on 127.0.0.1)"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends mosquitto >/dev/null
  # Debian starts the packaged service where systemd runs; the tests need only the binary.
fi

# The public models in ../shared/models feed the compatibility tests when present.
if [ -z "${EDGEINFER_MODEL_ZOO:-}" ] && [ -d ../shared/models ]; then
  export EDGEINFER_MODEL_ZOO="$(cd ../shared/models && pwd)"
fi

exec cargo test --locked "$@"
