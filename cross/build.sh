#!/bin/sh
# Installs the cross toolchain and builds edgeinfer for an ARM target, on a
# Debian machine: cross/build.sh [TARGET] [cargo build args…]
#   TARGET: aarch64-unknown-linux-gnu (default) or armv7-unknown-linux-gnueabihf
# Afterwards `cargo --config cross/config.toml test --target TARGET` runs the
# tests under qemu-user.
set -eu
cd "$(dirname "$0")/.."
TARGET=${1:-aarch64-unknown-linux-gnu}
[ $# -gt 0 ] && shift
cross/install.sh "$TARGET"
# The dist profile (fat LTO, one codegen unit): what ships. On aarch64 also
# gold's identical code folding (cross/dist.toml), where gold is installed
# (Debian's binutils-aarch64-linux-gnu has it; without it the build links as
# the tests do, 2.6 % larger).
DIST=""
if [ "$TARGET" = aarch64-unknown-linux-gnu ] && command -v aarch64-linux-gnu-ld.gold >/dev/null; then
    DIST="--config cross/dist.toml"
fi
# shellcheck disable=SC2086
cargo --config cross/config.toml $DIST build --locked --profile dist --target "$TARGET" "$@"
ls -l "${CARGO_TARGET_DIR:-target}/$TARGET/dist/edgeinfer"
