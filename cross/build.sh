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
# The dist profile (fat LTO, one codegen unit): what ships. It is linked
# by the toolchain's own lld (rust-lld, through the gcc-ld wrapper rustc
# uses for x86-64 itself) with identical code folding: the functions whose
# machine code came out the same are kept once (tract carries operator code
# for every element type). Stripped: aarch64 23,093,704 -> 22,769,992
# bytes, armv7 20,630,132 -> 20,005,416 (README, "Size"). Not gold: rustc
# warns it is deprecated and mislinks some Rust programs.
GCC_LD="$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin/gcc-ld"
LINK="target.$TARGET.rustflags=['-C','link-arg=-fuse-ld=lld','-C','link-arg=-B$GCC_LD','-C','link-arg=-Wl,--icf=all']"
cargo --config cross/config.toml --config "$LINK" build --locked --profile dist --target "$TARGET" "$@"
ls -l "${CARGO_TARGET_DIR:-target}/$TARGET/dist/edgeinfer"
