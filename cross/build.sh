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
case "$TARGET" in
    aarch64-unknown-linux-gnu) PKGS="gcc-aarch64-linux-gnu libc6-dev-arm64-cross" ;;
    armv7-unknown-linux-gnueabihf) PKGS="gcc-arm-linux-gnueabihf libc6-dev-armhf-cross" ;;
    *) echo "build.sh: unknown target $TARGET" >&2; exit 2 ;;
esac
missing=""
for p in $PKGS qemu-user; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing
fi
rustup target add "$TARGET"
cargo --config cross/config.toml build --locked --release --target "$TARGET" "$@"
ls -l "target/$TARGET/release/edgeinfer"
