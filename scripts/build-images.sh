#!/bin/bash
# Build croft's local images into OUTDIR: busybox.tar.gz and debian12.tar.gz (LXD unified
# tarballs). An image is rebuilt only when missing or older than its definition.
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
