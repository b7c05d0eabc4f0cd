#!/usr/bin/env bash
# Runs a command on a brand-new Debian 12 root, the way a new user's machine
# would: a minimal Debian made by mmdebstrap (variant "apt": essential
# packages and apt, nothing else) plus only what the README assumes a user
# has, Rust as rustup installs it, bind-mounted read-only. Nothing installed
# on this machine by hand is visible inside, so a package that
# scripts/install-deps.sh forgets makes the command fail here.
#
# Usage (as root):  scripts/fresh-root.sh [--keep] [--rev REV] [COMMAND]
#   COMMAND defaults to the README's first command followed by tearing the
#   demo down:  ./scripts/demo.sh && ./target/release/tweed lab down --name demo
#   --rev REV   clone this commit of the repository (default HEAD: committed
#               work only, as CI sees it)
#   --keep      keep the root directory afterwards (mounts and processes are
#               still cleaned up)
#
# Exit status: the command's (or 2 when the root could not be made).
# Whatever happens, every process started inside the root is killed, every
# mount under it is removed and (without --keep) the directory is deleted.
# The machine's own network namespace is never touched: the lab builds its
# namespaces inside the root's private /run.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
keep=""
rev=HEAD
while [ $# -gt 0 ]; do
  case "$1" in
    --keep) keep=1; shift ;;
    --rev) rev=${2:?--rev needs a commit}; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
cmd=${1:-./scripts/demo.sh && ./target/release/tweed lab down --name demo}
[ "$(id -u)" = 0 ] || { echo "fresh-root.sh: run as root" >&2; exit 2; }

rustup_home=${RUSTUP_HOME:-$HOME/.rustup}
cargo_home=${CARGO_HOME:-$HOME/.cargo}
[ -x "$cargo_home/bin/cargo" ] && [ -d "$rustup_home/toolchains" ] || {
  echo "fresh-root.sh: no rustup-installed Rust at $cargo_home/bin and $rustup_home" >&2
  exit 2
}
if ! command -v mmdebstrap >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap >/dev/null
fi

root=$(mktemp -d /var/tmp/tweed-fresh-root.XXXXXX)
started=$(date +%s)

# Kill what runs inside the root (a process's /proc/PID/root names its
# chroot), unmount everything mounted at or below it, deepest first, and
# remove it. Every step keeps going when one fails.
cleanup() {
  local rc=$?
  set +e
  local pass pids
  for pass in TERM KILL; do
    pids=$(for p in /proc/[0-9]*; do
      [ "$(readlink "$p/root" 2>/dev/null)" = "$root" ] && echo "${p#/proc/}"
    done)
    [ -n "$pids" ] || break
    echo "== fresh-root: stopping processes left in the root ($pass): $(echo $pids)" >&2
    kill -"$pass" $pids 2>/dev/null
    for _ in $(seq 50); do
      pids=$(for p in $pids; do [ -d "/proc/$p" ] && echo "$p"; done)
      [ -n "$pids" ] || break
      sleep 0.1
    done
  done
  # Deepest mount first; lazy, so a busy one still lets go of the tree.
  findmnt -rn -o TARGET | grep -E "^$root(/|\$)" | sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null || echo "fresh-root: cannot unmount $m" >&2
  done
  if findmnt -rn -o TARGET | grep -qE "^$root(/|\$)"; then
    echo "fresh-root: mounts remain under $root; leaving it in place" >&2
  elif [ -n "$keep" ]; then
    echo "== fresh-root: kept $root" >&2
  else
    rm -rf --one-file-system "$root"
  fi
  echo "== fresh-root: $(( $(date +%s) - started )) s in all" >&2
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "== fresh-root: a new Debian 12 root at $root"
if ! mmdebstrap --quiet --variant=apt --mode=root bookworm "$root" >/dev/null; then
  echo "fresh-root: mmdebstrap failed" >&2
  exit 2
fi
echo "== fresh-root: root made in $(( $(date +%s) - started )) s"

# The root must be a mount point of its own: `ip netns exec` and `ip -n`
# run `mount --make-rslave /`, which fails on a plain directory. Private, so
# nothing mounted inside propagates back to this machine's mounts.
mount --bind "$root" "$root"
mount --make-private "$root"
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys" && mount --make-rslave "$root/sys"
mount --rbind /dev "$root/dev" && mount --make-rslave "$root/dev"
mount -t tmpfs tmpfs "$root/run"
# Rust as rustup installs it, read-only: the toolchains and the proxies
# (cargo, rustc) in ~/.cargo/bin. The crate download cache is shared so a
# run does not fetch every crate again; it holds sources only, nothing
# that could stand in for a missing system package.
bind_ro() { mkdir -p "$root$2"; mount --bind "$1" "$root$2"; mount -o remount,bind,ro "$root$2"; }
bind_ro "$rustup_home" /root/.rustup
bind_ro "$cargo_home/bin" /root/.cargo/bin
mkdir -p "$cargo_home/registry" "$root/root/.cargo/registry"
mount --bind "$cargo_home/registry" "$root/root/.cargo/registry"

git -c advice.detachedHead=false clone -q "$here" "$root/work/tweed"
git -C "$root/work/tweed" checkout -q "$rev"
echo "== fresh-root: cloned $(git -C "$root/work/tweed" rev-parse --short HEAD)"
# The project's shared notes sit beside the checkout, as in CI.
[ -d "$here/../shared" ] && cp -a "$here/../shared" "$root/work/shared"

echo "== fresh-root: running as root on the fresh root: $cmd"
set +e
chroot "$root" /usr/bin/env -i HOME=/root TERM=dumb LANG=C.UTF-8 \
  PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  /bin/bash -c "cd /work/tweed && $cmd"
rc=$?
set -e
echo "== fresh-root: exit status $rc after $(( $(date +%s) - started )) s"
exit "$rc"
