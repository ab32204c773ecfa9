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
# The dist profile (fat LTO, one codegen unit): what ships.
cargo --config cross/config.toml build --locked --profile dist --target "$TARGET" "$@"
ls -l "${CARGO_TARGET_DIR:-target}/$TARGET/dist/edgeinfer"
