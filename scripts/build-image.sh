#!/usr/bin/env bash
# Builds tweed's container image offline, as an OCI archive that
# `ctr -n k8s.io images import` and `podman load` read: a minimal Debian 12
# root made by mmdebstrap from this machine's apt sources (no registry is
# involved), the runtime tools the agent calls (nft for the ruleset's fixed
# shape, conntrack, ip, ping, ethtool), and the `tweed` binary at
# /usr/local/bin/tweed. The same image runs the agent (DaemonSet) and the
# lab's echo pods (`tweed echo`).
#
# Usage (as root):  scripts/build-image.sh [--binary PATH] [--tag NAME:TAG] [--out FILE]
#   defaults: target/release/tweed, tweed:0.1.0, target/image/tweed-0.1.0.oci.tar
# Prints the archive's path. Takes ~30 s (mmdebstrap) on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release/tweed
tag=tweed:0.1.0
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) bin=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "build-image.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "build-image.sh: run as root (mmdebstrap)" >&2; exit 2; }
[ -x "$bin" ] || { echo "build-image.sh: no binary at $bin (cargo build --release)" >&2; exit 2; }
case "$tag" in *:*) ;; *) echo "build-image.sh: --tag wants NAME:TAG" >&2; exit 2 ;; esac
name=${tag%:*}; version=${tag##*:}
[ -n "$out" ] || out=target/image/${name##*/}-$version.oci.tar
if ! command -v mmdebstrap >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap >/dev/null
fi

work=$(mktemp -d /var/tmp/tweed-image.XXXXXX)
trap 'rm -rf --one-file-system "$work"' EXIT
mkdir -p "$work/oci/blobs/sha256" "$(dirname "$out")"

# The root: Debian's minimal base plus what the agent runs, without docs.
mmdebstrap --quiet --variant=minbase --mode=root \
  --include=iproute2,nftables,conntrack,iputils-ping,ethtool,ca-certificates \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --customize-hook='rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/*' \
  bookworm "$work/rootfs" >/dev/null
install -D -m 0755 "$bin" "$work/rootfs/usr/local/bin/tweed"

# One layer; timestamps and owners normalised so the digest depends on
# content only.
tar --sort=name --mtime=@0 --numeric-owner --owner=0 --group=0 \
  -C "$work/rootfs" -cf "$work/layer.tar" .
diff_id=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
gzip -n -1 "$work/layer.tar"
layer=$(sha256sum "$work/layer.tar.gz" | cut -d' ' -f1)
mv "$work/layer.tar.gz" "$work/oci/blobs/sha256/$layer"

python3 - "$work/oci" "$layer" "$diff_id" "$name" "$version" <<'PY'
import hashlib, json, os, sys
oci, layer, diff_id, name, version = sys.argv[1:]
def blob(obj):
    data = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
    d = hashlib.sha256(data).hexdigest()
    open(os.path.join(oci, "blobs", "sha256", d), "wb").write(data)
    return d, len(data)
config = {
    "architecture": "amd64", "os": "linux",
    "config": {"Entrypoint": ["/usr/local/bin/tweed"],
               "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
    "rootfs": {"type": "layers", "diff_ids": ["sha256:" + diff_id]},
    "history": [{"created_by": "tweed scripts/build-image.sh"}],
}
cd, cl = blob(config)
lsize = os.path.getsize(os.path.join(oci, "blobs", "sha256", layer))
manifest = {
    "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:" + cd, "size": cl},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": "sha256:" + layer, "size": lsize}],
}
md, ml = blob(manifest)
# Kubernetes resolves `tweed:0.1.0` to docker.io/library/tweed:0.1.0.
full = name if "/" in name else "docker.io/library/" + name
index = {"schemaVersion": 2, "manifests": [{
    "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + md, "size": ml,
    "annotations": {"io.containerd.image.name": f"{full}:{version}",
                    "org.opencontainers.image.ref.name": version}}]}
json.dump(index, open(os.path.join(oci, "index.json"), "w"))
json.dump({"imageLayoutVersion": "1.0.0"}, open(os.path.join(oci, "oci-layout"), "w"))
PY
tar --sort=name --mtime=@0 --numeric-owner --owner=0 --group=0 -C "$work/oci" -cf "$out" .
echo "$out"
