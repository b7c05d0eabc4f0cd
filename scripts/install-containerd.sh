#!/usr/bin/env bash
# Caches what the lab's real kubelets run on (`kubelet:` topologies):
#
#   ${TWEED_CONTAINERD_DIR:-/var/cache/tweed/containerd}/
#     containerd containerd-shim-runc-v2 ctr   Debian 12's containerd 1.6.20
#     pause.oci.tar                            the pod sandbox image, tweed.local/pause:3.2
#
# containerd is unpacked from Debian's package (apt-get download + dpkg -x),
# not installed: installing it would register and start a containerd for the
# whole machine, and the lab runs one per node inside the node's namespaces.
# runc comes from Debian's runc package (scripts/install-deps.sh). The pause
# image is the static `pause` that scripts/install-kubernetes.sh builds,
# made into a one-layer OCI archive by scripts/build-image.sh (there is no
# registry to pull one from).
#
# Usage (as root): scripts/install-containerd.sh   (after install-kubernetes.sh)
# Prints the directory. Exits at once when everything is cached.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${TWEED_CONTAINERD_DIR:-/var/cache/tweed/containerd}
pause=${TWEED_K8S_BIN:-/var/cache/tweed/kubernetes/v1.20.2/bin}/pause
want=(containerd containerd-shim-runc-v2 ctr pause.oci.tar)
complete() { for f in "${want[@]}"; do [ -s "$dir/$f" ] || return 1; done; }
if complete; then echo "$dir"; exit 0; fi
[ "$(id -u)" = 0 ] || { echo "install-containerd.sh: run as root" >&2; exit 1; }
[ -x "$pause" ] || { echo "install-containerd.sh: no $pause (run scripts/install-kubernetes.sh first)" >&2; exit 1; }
command -v runc >/dev/null || { echo "install-containerd.sh: no runc (run scripts/install-deps.sh)" >&2; exit 1; }

work=$(mktemp -d /var/tmp/tweed-containerd.XXXXXX)
trap 'rm -rf --one-file-system "$work"' EXIT
chmod 0755 "$work"   # apt's download user must be able to write here
download() { (cd "$work" && apt-get download -qq containerd 2>&1 | grep -v '^W: Download is performed unsandboxed' || true); }
download
if ! ls "$work"/containerd_*.deb >/dev/null 2>&1; then
  apt-get update -qq --error-on=any   # stale or missing package lists
  download
fi
deb=$(ls "$work"/containerd_*.deb 2>/dev/null | head -1)
[ -n "$deb" ] || { echo "install-containerd.sh: apt-get download containerd failed (apt-get update?)" >&2; exit 1; }
dpkg -x "$deb" "$work/x"
mkdir -p "$work/out" "$work/pause"
for b in containerd containerd-shim-runc-v2 ctr; do
  [ -x "$work/x/usr/bin/$b" ] || { echo "install-containerd.sh: the containerd package has no usr/bin/$b" >&2; exit 1; }
  cp "$work/x/usr/bin/$b" "$work/out/"
done
"$work/out/containerd" --version >&2
cp "$pause" "$work/pause/pause"
scripts/build-image.sh --rootfs "$work/pause" --entrypoint '["/pause"]' \
  --tag tweed.local/pause:3.2 --out "$work/out/pause.oci.tar" >/dev/null
mkdir -p "$(dirname "$dir")"
rm -rf "$dir.tmp"; cp -a "$work/out" "$dir.tmp"
rm -rf "$dir"; mv "$dir.tmp" "$dir"
complete || { echo "install-containerd.sh: $dir is incomplete" >&2; exit 1; }
echo "$dir"
