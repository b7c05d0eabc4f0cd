#!/usr/bin/env bash
# Runs every test: pure unit and property tests, root tests of the netlink
# appliers in their own namespaces, then the lab end-to-end tests (a real
# etcd per lab, the real CNI plugin, podman, a real Kubernetes control
# plane). Ends with one summary line.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "test.sh: the end-to-end tests build network namespaces and need root" >&2
  exit 1
fi
./scripts/install-deps.sh
# Real Kubernetes 1.20.2 for the Kubernetes lab tests: built from Debian's
# source once (~6-10 min), then cached.
./scripts/install-kubernetes.sh
# containerd 1.6 and the pause image for the lab's real kubelets (seconds).
./scripts/install-containerd.sh
cargo build --workspace --all-targets --locked
# The image users install (a static build, checked to run in an empty root).
./scripts/build-image.sh
log=$(mktemp)
rm -f target/tmp/skipped-tests.txt
set +e
cargo test --workspace --all-targets --locked --no-fail-fast -- --test-threads 4 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
skipped=0
if [ -s target/tmp/skipped-tests.txt ]; then
  echo "!!! tests that could not run on this machine (they passed without testing anything; see why):"
  sed 's/^/!!!   /' target/tmp/skipped-tests.txt
  skipped=$(wc -l < target/tmp/skipped-tests.txt)
fi
awk -v s="$skipped" '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tweed: %d passed, %d failed, %d skipped\n", p - s, f, s }' "$log"
rm -f "$log"
exit "$rc"
