#!/usr/bin/env bash
# make setup: everything croft needs on a fresh Debian 12 machine, as root. Idempotent:
# each step checks first and does only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

APT_PACKAGES=(
  etcd-server etcd-client                       # the cluster store
  lxc python3-lxc lxc-dev uidmap                # containers (python3-lxc only for Debian's python)
  lxcfs                                         # containers see their own /proc/meminfo, uptime...
  busybox-static debootstrap                    # building images locally
  btrfs-progs                                   # btrfs storage pools on loop files
  rsync                                         # custom volume copies across storage pools
  dnsmasq-base dnsmasq-utils nftables iproute2 iputils-ping bridge-utils   # managed networks (dhcp_release)
  ovn-central ovn-host openvswitch-switch openvswitch-common ethtool   # OVN networks (userspace datapath)
  python3-venv                                  # the virtual environment on /usr/bin/python3
  lxd-client lxd-tools                          # the real lxc client and lxd-benchmark, for tests
  curl xz-utils squashfs-tools openssl
  gzip bzip2 zstd                               # backup tarballs: lxc export --compression
  attr                                          # setfattr, getfattr: tests check that xattrs survive
  util-linux                                    # setpriv: the node agent's children die with it
  qemu-system-x86 qemu-utils                    # virtual machines (TCG where KVM cannot run guests)
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-daemon-system libvirt-clients python3-libvirt
  cpio                                          # the tiny VM image's initramfs
  ovmf                                          # UEFI for VMs that boot from their disk
  dosfstools mtools fdisk                       # the Debian VM image: ESP (mkfs.vfat, mcopy), GPT (sfdisk)
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  say "apt: installing ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if ! command -v uv >/dev/null 2>&1; then
  say "installing uv from PyPI"
  if command -v pip3 >/dev/null 2>&1 && ! pip3 --version | grep -q '/usr/lib/python3'; then
    pip3 install -q uv
  else
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-pip
    pip3 install -q --break-system-packages uv
  fi
fi

# The venv must be built on Debian's python with its site-packages visible:
# python3-lxc, python3-libvirt and python3-rados exist only there.
export UV_PYTHON=/usr/bin/python3 UV_PYTHON_PREFERENCE=only-system UV_LINK_MODE=copy
if ! grep -qs 'include-system-site-packages = true' .venv/pyvenv.cfg \
   || ! grep -qs '^home = /usr/bin$' .venv/pyvenv.cfg; then
  say "creating .venv on /usr/bin/python3 with system site-packages"
  rm -rf .venv
  uv venv -q --system-site-packages --python /usr/bin/python3 .venv
fi
say "uv sync (locked)"
uv sync -q --locked --all-packages

say "generating gRPC code"
make -s proto

# Kernel settings containers need (LXD's production setup): systemd containers all share
# one host uid range, so the per-user inotify limits are hit at ~17 containers otherwise.
cat > /etc/sysctl.d/60-croft.conf <<'SYSCTL'
fs.inotify.max_user_instances = 1048576
fs.inotify.max_user_watches = 1048576
fs.inotify.max_queued_events = 1048576
vm.max_map_count = 262144
kernel.keys.maxkeys = 2000
net.ipv4.neigh.default.gc_thresh3 = 8192
net.ipv4.ip_forward = 1
SYSCTL
sysctl -q -p /etc/sysctl.d/60-croft.conf >/dev/null 2>&1 || sysctl -p /etc/sysctl.d/60-croft.conf || true

# Unprivileged containers map container root to host ids from root's subordinate range.
for f in /etc/subuid /etc/subgid; do
  touch "$f"
  grep -qs '^root:' "$f" || { echo "root:1000000:1000000000" >> "$f"; say "added root range to $f"; }
done

# The OpenID provider the OIDC tests start (npm oidc-provider, tests/oidc/op.mjs): node and
# npm from Debian unless a node with npm is already installed (nodesource's ships both and
# conflicts with Debian's npm package); oidc-provider 8 runs on Debian's node 18.
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  say "apt: installing nodejs npm"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nodejs npm
fi
if [ ! -d tests/oidc/node_modules/oidc-provider ] \
   || [ tests/oidc/package-lock.json -nt tests/oidc/node_modules/.package-lock.json ]; then
  say "npm: installing the test OpenID provider (tests/oidc)"
  (cd tests/oidc && npm ci --no-audit --no-fund --loglevel=error)
fi

# libvirt gives each QEMU a mount namespace of its own by default, a copy of the host's
# mounts when the VM starts. Where / is not a shared mount (no systemd, as here), a pool
# mounted later (a btrfs pool made after the VM started) never appears in it, and a live
# disk move into that pool fails ("Could not open .../root.img"). LXD runs QEMU in the
# host's mount namespace; croft's libvirtd does too (read when libvirtd starts).
if [ -f /etc/libvirt/qemu.conf ] && ! grep -qs '^namespaces *=' /etc/libvirt/qemu.conf; then
  echo 'namespaces = []' >> /etc/libvirt/qemu.conf
  say "libvirt: QEMU in the host's mount namespace (/etc/libvirt/qemu.conf namespaces = [])"
fi

mkdir -p /etc/croft /var/lib/croft /var/log/croft
ln -sfn "$PWD/.venv/bin/croft" /usr/local/bin/croft

# The local images the tests use (debootstrap: minutes the first time, then cached;
# rebuilt only when their definitions change). Tests call the same script.
say "building local images into /var/lib/croft/build-images"
bash scripts/build-images.sh /var/lib/croft/build-images
say "setup done"
