#!/usr/bin/env bash
# Installs everything tweed's build, demo, tests and benchmarks need on a
# fresh Debian 12 machine. Idempotent. Run as root.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
  echo "install-deps.sh: run as root (it uses apt-get)" >&2
  exit 1
fi

pkgs=(
  # data plane and lab
  iproute2 nftables iptables conntrack iputils-ping util-linux procps ethtool
  # the datastore: a real etcd v3 and etcdctl
  etcd-server etcd-client
  # build: a C toolchain that links (gcc alone has no crt1.o or libc.so:
  # that is libc6-dev); etcd-client's gRPC code is generated with protoc,
  # which needs the well-known .proto files (descriptor.proto, struct.proto)
  # from libprotobuf-dev; cargo fetches crates over TLS (ca-certificates)
  gcc libc6-dev pkg-config protobuf-compiler libprotobuf-dev ca-certificates
  # the benchmarks' helpers; the Kubernetes lab's certificates; the
  # offline image build (scripts/build-image.sh)
  python3 openssl mmdebstrap
  # a real CNI runtime and the reference plugins (for comparison benchmarks)
  podman runc busybox-static containernetworking-plugins
  # measurement and debugging
  iperf3 curl jq socat tcpdump hyperfine
  # BGP: the speaker the agent will run (its generated configuration is
  # checked with `bird -p`); never started as a service here
  bird2
  # BGP: the lab's ToR and core routers (routers with `bgp:`), so every
  # BGP test is interop between BIRD on the nodes and FRR on the routers;
  # the lab runs zebra and bgpd inside router namespaces, never as a service
  frr
)

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing: ${missing[*]}"
  apt-get update -qq
  # etcd-server's and frr's packages would start a system etcd and FRR on a
  # machine with an init system; tweed's lab runs its own inside namespaces
  # and needs none. RUNLEVEL=1 covers sysvinit; a policy-rc.d that denies
  # every start (kept only for the install) covers invoke-rc.d under systemd.
  policy=/usr/sbin/policy-rc.d
  made_policy=
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# tweed install-deps.sh: no service starts during its install\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    made_policy=1
    trap 'rm -f "$policy"' EXIT
  fi
  DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if [ -n "$made_policy" ]; then
    rm -f "$policy"
    trap - EXIT
  fi
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "install-deps.sh: no Rust toolchain; install Rust >= 1.85 (rustup) and re-run" >&2
  exit 1
fi
echo "dependencies are installed"
