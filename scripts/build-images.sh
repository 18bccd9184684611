#!/bin/bash
# Build croft's local images into OUTDIR: busybox.tar.gz and debian12.tar.gz (LXD unified
# tarballs), the tiny VM image tiny-vm.meta.tar.gz + tiny-vm.rootfs.img and the Debian 12
# UEFI VM image debian-12-vm.meta.tar.xz + debian-12-vm.rootfs.img (LXD's split VM format:
# `lxc image import tiny-vm.meta.tar.gz tiny-vm.rootfs.img --alias tiny-vm`). An image is
# rebuilt only when missing or older than its definition.
# Usage: scripts/build-images.sh OUTDIR [NAME...]   (as root: debootstrap and chroot need
# it; NAMEs pick some of busybox debian12 tiny-vm debian-12-vm, default all)
set -euo pipefail
OUTDIR=${1:?usage: $0 OUTDIR [NAME...]}
shift
WANT=" ${*:-busybox debian12 tiny-vm debian-12-vm} "
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
DEFS=$ROOT/services/images/definitions
IMGFMT=$ROOT/libs/imageformat/src/croft/imageformat
wanted() { [[ "$WANT" == *" $1 "* ]]; }
mkdir -p "$OUTDIR"
for name in busybox debian12; do
    wanted "$name" || continue
    def=$DEFS/$name.yaml
    out=$OUTDIR/$name.tar.gz
    if [ -f "$out" ] && [ "$out" -nt "$def" ]; then
        echo "$out is up to date"
        continue
    fi
    "$PY" -m croft.imageformat.builder "$def" "$out"
done
# A VM image is up to date when its disk is newer than every file it is built from.
fresh() {
    local out=$1; shift
    [ -f "$out" ] || return 1
    for src in "$@"; do [ "$out" -nt "$src" ] || return 1; done
}
if wanted tiny-vm; then
    if fresh "$OUTDIR/tiny-vm.rootfs.img" "$IMGFMT/vmimage.py"; then
        echo "$OUTDIR/tiny-vm.rootfs.img is up to date"
    else
        "$PY" -m croft.imageformat.vmimage "$OUTDIR"
    fi
fi
if wanted debian-12-vm; then
    if fresh "$OUTDIR/debian-12-vm.rootfs.img" "$IMGFMT/debianvm.py" "$IMGFMT/vmimage.py"; then
        echo "$OUTDIR/debian-12-vm.rootfs.img is up to date"
    else
        "$PY" -m croft.imageformat.debianvm "$OUTDIR"
    fi
fi
