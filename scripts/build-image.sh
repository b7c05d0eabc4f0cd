#!/usr/bin/env bash
# Builds container images offline, as one OCI archive that
# `ctr -n k8s.io images import` and `podman load` read. No registry is
# involved.
#
# By default the image is tweed's: a minimal Debian 12 root made by
# mmdebstrap from this machine's apt sources, with the runtime tools the
# agent calls (nft for the ruleset's fixed shape, conntrack, ip, ping,
# ethtool, and BIRD for BGP), and the `tweed` binary at /usr/local/bin/tweed, in a layer of
# its own. The Debian layer is cached in /var/cache/tweed/image-base (keyed
# by its package list), so a rebuild after a code change takes seconds.
# The same image runs the agent (DaemonSet) and the echo pods of the lab:
# its entrypoint is `tweed`, its default command `echo` (HTTP/UDP echo on
# :80 and :8080).
#
# The binary is built statically by default (glibc, `crt-static`): the
# agent copies itself onto the host as the CNI plugin, and the host's libc
# may be older than Debian 12's (CentOS 7 has glibc 2.17). The script checks
# that it runs in an empty root.
#
# Usage (as root):
#   scripts/build-image.sh [--binary PATH] [--tag NAME:TAG]... [--out FILE]
#                          [--alias NAME:TAG CMD_JSON]... [--rootfs DIR --entrypoint JSON]
#   defaults: a static release build, tweed:0.1.0, target/image/tweed-0.1.0.oci.tar
#   --tag      another name for the same image (repeatable)
#   --alias    another image in the archive, same layers, default command CMD_JSON
#   --rootfs   a one-layer image of DIR's contents instead (e.g. a static pause)
# Prints the archive's path. ~30 s the first time (mmdebstrap), then ~3 s.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=""
tags=()
aliases=()
out=""
rootfs=""
entrypoint='["/usr/local/bin/tweed"]'
cmd='["echo","--listen","0.0.0.0:80","--listen","0.0.0.0:8080"]'
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) bin=$2; shift 2 ;;
    --tag) tags+=("$2"); shift 2 ;;
    --alias) aliases+=("$2" "$3"); shift 3 ;;
    --out) out=$2; shift 2 ;;
    --rootfs) rootfs=$2; cmd='[]'; shift 2 ;;
    --entrypoint) entrypoint=$2; shift 2 ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "build-image.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ "${#tags[@]}" -gt 0 ] || tags=(tweed:0.1.0)
for t in "${tags[@]}" ${aliases[@]+"${aliases[@]}"}; do
  case "$t" in [[]*) continue ;; *:*) ;; *) echo "build-image.sh: $t: want NAME:TAG" >&2; exit 2 ;; esac
done
[ "$(id -u)" = 0 ] || { echo "build-image.sh: run as root (mmdebstrap)" >&2; exit 2; }
if [ -z "$rootfs" ]; then
  if [ -z "$bin" ]; then
    RUSTFLAGS='-C target-feature=+crt-static' \
      cargo build --release --locked -q --target x86_64-unknown-linux-gnu -p tweed
    bin=target/x86_64-unknown-linux-gnu/release/tweed
    # It must need nothing from the host: run it in an empty root.
    empty=$(mktemp -d /var/tmp/tweed-static.XXXXXX)
    cp "$bin" "$empty/tweed"
    if ! chroot "$empty" /tweed --version >/dev/null 2>&1; then
      rm -rf "$empty"
      echo "build-image.sh: $bin does not run without the host's libraries (not static?)" >&2
      exit 1
    fi
    rm -rf "$empty"
  fi
  [ -x "$bin" ] || { echo "build-image.sh: no binary at $bin" >&2; exit 2; }
else
  [ -d "$rootfs" ] || { echo "build-image.sh: --rootfs $rootfs is not a directory" >&2; exit 2; }
fi
first=${tags[0]}
[ -n "$out" ] || { n=${first%:*}; out=target/image/${n##*/}-${first##*:}.oci.tar; }

work=$(mktemp -d /var/tmp/tweed-image.XXXXXX)
trap 'rm -rf --one-file-system "$work"' EXIT
mkdir -p "$work/oci/blobs/sha256" "$(dirname "$out")"

# layer DIR: one gzip'd layer of DIR in the archive; prints "digest diff_id".
# Timestamps and owners are normalised so the digest depends on content only.
layer() {
  tar --sort=name --mtime=@0 --numeric-owner --owner=0 --group=0 -C "$1" -cf "$work/layer.tar" .
  local diff_id digest
  diff_id=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
  gzip -n -1 -f "$work/layer.tar"
  digest=$(sha256sum "$work/layer.tar.gz" | cut -d' ' -f1)
  mv "$work/layer.tar.gz" "$work/oci/blobs/sha256/$digest"
  echo "$digest $diff_id"
}

layers=()
if [ -n "$rootfs" ]; then
  layers+=("$(layer "$rootfs")")
else
  # bird2: the BGP speaker the agent starts when the cluster config has
  # `bgp:` (a separate program, GPL-2; never linked).
  pkgs=iproute2,nftables,conntrack,iputils-ping,ethtool,ca-certificates,bird2
  key=$(echo "bookworm minbase $pkgs v1" | sha256sum | cut -c1-16)
  cache=/var/cache/tweed/image-base/$key
  if [ ! -s "$cache/layer" ]; then
    if ! command -v mmdebstrap >/dev/null; then
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap >/dev/null
    fi
    # Debian's minimal base plus what the agent runs, without docs.
    mmdebstrap --quiet --variant=minbase --mode=root --include=$pkgs \
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
      --dpkgopt='path-exclude=/usr/share/locale/*' \
      --customize-hook='rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/*' \
      bookworm "$work/rootfs" >/dev/null
    read -r d i < <(layer "$work/rootfs")
    mkdir -p "$cache.tmp"
    mv "$work/oci/blobs/sha256/$d" "$cache.tmp/layer"
    echo "$d $i" > "$cache.tmp/ids"
    rm -rf "$cache"; mv "$cache.tmp" "$cache"
    rm -rf --one-file-system "$work/rootfs"
  fi
  read -r d i < "$cache/ids"
  cp "$cache/layer" "$work/oci/blobs/sha256/$d"
  layers+=("$d $i")
  install -D -m 0755 "$bin" "$work/bin/usr/local/bin/tweed"
  layers+=("$(layer "$work/bin")")
fi

python3 - "$work/oci" "$entrypoint" "$cmd" "${layers[@]}" -- "${tags[@]}" -- ${aliases[@]+"${aliases[@]}"} <<'PY'
import hashlib, json, os, sys
args = sys.argv[1:]
oci, entrypoint, cmd = args[0], json.loads(args[1]), json.loads(args[2])
rest = args[3:]
i = rest.index("--"); layers = [l.split() for l in rest[:i]]; rest = rest[i + 1:]
i = rest.index("--"); tags = rest[:i]; al = rest[i + 1:]
def blob(obj):
    data = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
    d = hashlib.sha256(data).hexdigest()
    open(os.path.join(oci, "blobs", "sha256", d), "wb").write(data)
    return d, len(data)
def image(cmd):
    config = {
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": entrypoint, "Cmd": cmd or None,
                   "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + diff for _, diff in layers]},
        "history": [{"created_by": "tweed scripts/build-image.sh"}],
    }
    cd, cl = blob(config)
    manifest = {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:" + cd, "size": cl},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": "sha256:" + d,
                    "size": os.path.getsize(os.path.join(oci, "blobs", "sha256", d))} for d, _ in layers],
    }
    return blob(manifest)
def entry(tag, md, ml):
    name, version = tag.rsplit(":", 1)
    # Kubernetes resolves `tweed:0.1.0` to docker.io/library/tweed:0.1.0.
    if "/" not in name:
        name = "docker.io/library/" + name
    elif "." not in name.split("/")[0] and ":" not in name.split("/")[0]:
        name = "docker.io/" + name
    return {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + md, "size": ml,
            "annotations": {"io.containerd.image.name": f"{name}:{version}",
                            "org.opencontainers.image.ref.name": version}}
md, ml = image(cmd)
manifests = [entry(t, md, ml) for t in tags]
for tag, c in zip(al[0::2], al[1::2]):
    amd, aml = image(json.loads(c))
    manifests.append(entry(tag, amd, aml))
json.dump({"schemaVersion": 2, "manifests": manifests}, open(os.path.join(oci, "index.json"), "w"))
json.dump({"imageLayoutVersion": "1.0.0"}, open(os.path.join(oci, "oci-layout"), "w"))
PY
tar --sort=name --mtime=@0 --numeric-owner --owner=0 --group=0 -C "$work/oci" -cf "$out" .
echo "$out"
