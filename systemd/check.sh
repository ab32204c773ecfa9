#!/usr/bin/env bash
# Checks both units with systemd's own tools (in CI): `systemd-analyze
# verify`, and `systemd-analyze security --offline=true` with an overall
# exposure of at most 2.0 (--threshold=20). The units name /usr/bin/edgeinfer;
# verify wants an executable there, so it checks copies that name BINARY.
# usage: systemd/check.sh [BINARY]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="$(realpath "${1:-target/debug/edgeinfer}")"
command -v systemd-analyze >/dev/null 2>&1 || tests/apt-install.sh systemd
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
for unit in edgeinfer.service edgeinfer@.service; do
  sed "s#/usr/bin/edgeinfer#$BIN#g" "systemd/$unit" > "$dir/$unit"
done
# A template is verified and scored through an instance.
cp "$dir/edgeinfer@.service" "$dir/edgeinfer@line1.service"
for unit in edgeinfer.service edgeinfer@line1.service; do
  # verify exits 0 on warnings (an unknown key, say): any output fails here.
  warnings="$(systemd-analyze verify "$dir/$unit" 2>&1)"
  if [ -n "$warnings" ]; then
    echo "systemd/check.sh: $unit: $warnings"
    exit 1
  fi
  score="$(systemd-analyze security --offline=true "$dir/$unit" 2>/dev/null | grep -o 'Overall exposure level for .*' || true)"
  systemd-analyze security --offline=true --threshold=20 "$dir/$unit" >/dev/null 2>&1 || {
    echo "systemd/check.sh: $unit: $score, over 2.0"
    exit 1
  }
  echo "systemd/check.sh: $unit verified; $score"
done
