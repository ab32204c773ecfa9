#!/bin/sh
# Installs what cross builds and emulated tests need, for each TARGET given
# (default: both ARM targets), when it is missing: Debian's cross compiler
# and libc for the target, qemu-user, and the Rust standard library.
#   cross/install.sh [aarch64-unknown-linux-gnu] [armv7-unknown-linux-gnueabihf]
set -eu
[ $# -eq 0 ] && set -- aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf
pkgs="qemu-user"
for target in "$@"; do
    case "$target" in
        aarch64-unknown-linux-gnu) pkgs="$pkgs gcc-aarch64-linux-gnu libc6-dev-arm64-cross" ;;
        armv7-unknown-linux-gnueabihf) pkgs="$pkgs gcc-arm-linux-gnueabihf libc6-dev-armhf-cross" ;;
        *) echo "install.sh: unknown target $target" >&2; exit 2 ;;
    esac
done
missing=""
for p in $pkgs; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "cross/install.sh: installing$missing"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
rustup target add "$@" >/dev/null 2>&1 || rustup target add "$@"
