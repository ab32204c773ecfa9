#!/bin/sh
# Builds the .deb for one target: cross/make-deb.sh [TARGET]
#   x86_64-unknown-linux-gnu (amd64, the default), aarch64-unknown-linux-gnu
#   (arm64), armv7-unknown-linux-gnueabihf (armhf).
# Output: target/deb/edgeinfer_VERSION-1_ARCH.deb (under $CARGO_TARGET_DIR if set),
# and for amd64 and arm64 edgeinfer-onnxruntime_*.deb (cross/make-deb-onnxruntime.sh),
# which it recommends. Needs dpkg-deb;
# the ARM targets are built by cross/build.sh, which installs their toolchain.
set -eu
cd "$(dirname "$0")/.."
TARGET=${1:-x86_64-unknown-linux-gnu}
case "$TARGET" in
    x86_64-unknown-linux-gnu) ARCH=amd64 ;;
    aarch64-unknown-linux-gnu) ARCH=arm64 ;;
    armv7-unknown-linux-gnueabihf) ARCH=armhf ;;
    *) echo "make-deb.sh: unknown target $TARGET" >&2; exit 2 ;;
esac
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)

OUT=${CARGO_TARGET_DIR:-target}
HOST=$(rustc -vV | sed -n 's/^host: //p')
if [ "$TARGET" = "$HOST" ]; then
    cargo build --locked --profile dist
    BIN=$OUT/dist/edgeinfer
else
    cross/build.sh "$TARGET"
    BIN=$OUT/$TARGET/dist/edgeinfer
fi

ROOT=$OUT/deb/edgeinfer_${VERSION}-1_$ARCH
rm -rf "$ROOT"
install -D -m 0755 "$BIN" "$ROOT/usr/bin/edgeinfer"
install -D -m 0644 systemd/edgeinfer.service "$ROOT/lib/systemd/system/edgeinfer.service"
install -D -m 0644 systemd/edgeinfer@.service "$ROOT/lib/systemd/system/edgeinfer@.service"
mkdir -p "$ROOT/etc/edgeinfer"
# The example config, with the bundled models where the package puts them.
sed 's|^model = "models/|model = "/usr/share/edgeinfer/models/|' src/example.toml \
    > "$ROOT/etc/edgeinfer/edgeinfer.toml"
chmod 0644 "$ROOT/etc/edgeinfer/edgeinfer.toml"
for f in models/*.onnx models/*.toml; do
    install -D -m 0644 "$f" "$ROOT/usr/share/edgeinfer/$f"
done
DOC=$ROOT/usr/share/doc/edgeinfer
install -D -m 0644 README.md "$DOC/README.md"
install -D -m 0644 cross/debian/README.Debian "$DOC/README.Debian"
gzip -9n -c cross/debian/changelog > "$DOC/changelog.Debian.gz"
cat > "$DOC/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: edgeinfer
Source: https://github.com/edgeinfer/edgeinfer

Files: *
Copyright: 2026 the edgeinfer developers
License: Apache-2.0
 On Debian systems the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
COPYRIGHT

# The highest glibc symbol version the binary needs.
GLIBC=$(readelf --dyn-syms --wide "$BIN" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -t. -k1,1n -k2,2n -k3,3n | tail -n 1)
# ONNX Runtime exists for amd64 and arm64: its package is built beside
# edgeinfer's and recommended, so `auto` has both engines to measure.
RECOMMENDS=mosquitto
case "$ARCH" in
    amd64|arm64)
        cross/make-deb-onnxruntime.sh "$TARGET"
        RECOMMENDS="mosquitto, edgeinfer-onnxruntime"
        ;;
esac
mkdir -p "$ROOT/DEBIAN"
cat > "$ROOT/DEBIAN/control" <<CONTROL
Package: edgeinfer
Version: ${VERSION}-1
Architecture: $ARCH
Maintainer: edgeinfer developers <edgeinfer@localhost>
Installed-Size: $(du -sk "$ROOT" | cut -f1)
Depends: libc6 (>= $GLIBC)
Recommends: $RECOMMENDS
Section: net
Priority: optional
Homepage: https://github.com/edgeinfer/edgeinfer
Description: on-device inference daemon for Linux gateways
 edgeinfer subscribes to MQTT sensor topics, runs quantized ONNX models on
 the CPU (tract, built in; or ONNX Runtime and its NPU providers when a
 libonnxruntime.so is installed: see README.Debian) and publishes results,
 errors and device health back to MQTT. It runs as a hardened systemd service; the unit is enabled but not
 started on install: edit /etc/edgeinfer/edgeinfer.toml, then
 systemctl start edgeinfer.
CONTROL
echo /etc/edgeinfer/edgeinfer.toml > "$ROOT/DEBIAN/conffiles"
install -m 0755 cross/debian/postinst cross/debian/prerm cross/debian/postrm "$ROOT/DEBIAN/"
dpkg-deb --root-owner-group -Zxz --build "$ROOT" "$OUT/deb/edgeinfer_${VERSION}-1_$ARCH.deb"
