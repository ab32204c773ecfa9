#!/bin/sh
# Builds the edgeinfer-onnxruntime package for one target, from the pinned
# PyPI wheel's CPU library (sha256-checked): cross/make-deb-onnxruntime.sh [TARGET]
#   x86_64-unknown-linux-gnu (amd64, the default) or aarch64-unknown-linux-gnu
#   (arm64). There is no 32-bit ARM build of ONNX Runtime.
# It installs libonnxruntime.so where edgeinfer looks first on Debian
# (/usr/lib/<multiarch>/libonnxruntime.so), with the wheel's licence and
# third-party notices; `edgeinfer` recommends it, and `backend = "auto"`
# then measures both engines per model on the device.
# Output: target/deb/edgeinfer-onnxruntime_VERSION-1_ARCH.deb. Nothing is
# downloaded at `cargo build` time: this script fetches the wheel.
set -eu
cd "$(dirname "$0")/.."
TARGET=${1:-x86_64-unknown-linux-gnu}
VERSION=1.32.0
case "$TARGET" in
    x86_64-unknown-linux-gnu)
        ARCH=amd64 MULTIARCH=x86_64-linux-gnu PLATFORM=manylinux_2_28_x86_64
        SHA256=5a34fc4dfeb5a7b4a74c95dcba1e773d722abda720b474edf1b0c419dc6d163d ;;
    aarch64-unknown-linux-gnu)
        ARCH=arm64 MULTIARCH=aarch64-linux-gnu PLATFORM=manylinux_2_28_aarch64
        SHA256=2303372a85299b6757b0e11e1cbf13e410ddf7e10c37f4b37e99d1c90e7daf7c ;;
    *) echo "make-deb-onnxruntime.sh: no ONNX Runtime for $TARGET" >&2; exit 2 ;;
esac
OUT=${CARGO_TARGET_DIR:-target}
WHEEL_DIR=${XDG_CACHE_HOME:-$HOME/.cache}/edgeinfer/wheels
WHEEL=$WHEEL_DIR/onnxruntime-$VERSION-cp311-cp311-$PLATFORM.whl
if [ ! -e "$WHEEL" ]; then
    mkdir -p "$WHEEL_DIR"
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        --platform "$PLATFORM" --python-version 3.11 --implementation cp --abi cp311 \
        --dest "$WHEEL_DIR" "onnxruntime==$VERSION"
fi
echo "$SHA256  $WHEEL" | sha256sum -c --quiet

ROOT=$OUT/deb/edgeinfer-onnxruntime_${VERSION}-1_$ARCH
rm -rf "$ROOT"
LIBDIR=$ROOT/usr/lib/$MULTIARCH
DOC=$ROOT/usr/share/doc/edgeinfer-onnxruntime
mkdir -p "$LIBDIR" "$DOC"
python3 - "$WHEEL" "$LIBDIR" "$DOC" <<'PY'
import os, sys, zipfile
wheel, libdir, doc = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        base = os.path.basename(name)
        if name.startswith("onnxruntime/capi/libonnxruntime.so"):
            dest = os.path.join(libdir, base)
        elif base in ("LICENSE", "ThirdPartyNotices.txt", "Privacy.md") and name.count("/") <= 1:
            dest = os.path.join(doc, base)
        else:
            continue
        with z.open(name) as i, open(dest, "wb") as o:
            o.write(i.read())
        os.chmod(dest, 0o644)
PY
ln -s "libonnxruntime.so.$VERSION" "$LIBDIR/libonnxruntime.so"
cat > "$DOC/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: onnxruntime
Source: https://pypi.org/project/onnxruntime/$VERSION/

Files: *
Copyright: Microsoft Corporation
License: MIT
 The library is the one in PyPI's onnxruntime $VERSION wheel
 ($(basename "$WHEEL"), sha256 $SHA256), unchanged. LICENSE and
 ThirdPartyNotices.txt beside this file are the wheel's own.
COPYRIGHT
GLIBC=$(readelf --dyn-syms --wide "$LIBDIR/libonnxruntime.so.$VERSION" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -t. -k1,1n -k2,2n -k3,3n | tail -n 1)
mkdir -p "$ROOT/DEBIAN"
cat > "$ROOT/DEBIAN/control" <<CONTROL
Package: edgeinfer-onnxruntime
Version: ${VERSION}-1
Architecture: $ARCH
Maintainer: edgeinfer developers <edgeinfer@localhost>
Installed-Size: $(du -sk "$ROOT" | cut -f1)
Depends: libc6 (>= $GLIBC), libstdc++6, libgcc-s1
Section: libs
Priority: optional
Homepage: https://onnxruntime.ai
Description: ONNX Runtime $VERSION (CPU) for edgeinfer
 The CPU build of ONNX Runtime from PyPI's onnxruntime $VERSION wheel,
 installed where edgeinfer looks for it. With it, edgeinfer's
 backend = "auto" measures tract and ONNX Runtime per model on the
 device and serves each with the faster engine that agrees.
CONTROL
dpkg-deb --root-owner-group -Zxz --build "$ROOT" "$OUT/deb/edgeinfer-onnxruntime_${VERSION}-1_$ARCH.deb"
