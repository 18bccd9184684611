#!/bin/bash
# Build croft's local images into OUTDIR: busybox.tar.gz and debian12.tar.gz (LXD unified
# tarballs), and the tiny VM image tiny-vm.meta.tar.gz + tiny-vm.rootfs.img (LXD's split VM
# format: `lxc image import tiny-vm.meta.tar.gz tiny-vm.rootfs.img --alias tiny-vm`). An image is rebuilt only when missing or older than its definition.
# Usage: scripts/build-images.sh OUTDIR   (as root: debootstrap and chroot need it)
set -euo pipefail
OUTDIR=${1:?usage: $0 OUTDIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
DEFS=$ROOT/services/images/definitions
mkdir -p "$OUTDIR"
for name in busybox debian12; do
    def=$DEFS/$name.yaml
    out=$OUTDIR/$name.tar.gz
    if [ -f "$out" ] && [ "$out" -nt "$def" ]; then
        echo "$out is up to date"
        continue
    fi
    "$PY" -m croft.imageformat.builder "$def" "$out"
done
vmdef=$ROOT/libs/imageformat/src/croft/imageformat/vmimage.py
if [ -f "$OUTDIR/tiny-vm.rootfs.img" ] && [ "$OUTDIR/tiny-vm.rootfs.img" -nt "$vmdef" ]; then
    echo "$OUTDIR/tiny-vm.rootfs.img is up to date"
else
    "$PY" -m croft.imageformat.vmimage "$OUTDIR"
fi
