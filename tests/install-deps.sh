#!/usr/bin/env bash
# Installs what the tests need when it is missing: mosquitto (Debian's
# package). The integration tests start their own brokers on 127.0.0.1.
# The README's test command: tests/install-deps.sh && cargo test --locked
set -euo pipefail
if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then
  exit 0
fi
echo "tests/install-deps.sh: installing mosquitto"
sudo_cmd=""
[ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
$sudo_cmd apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends mosquitto >/dev/null
