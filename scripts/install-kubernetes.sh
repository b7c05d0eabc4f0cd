#!/usr/bin/env bash
# Builds and caches real Kubernetes v1.20.2 binaries for tweed's Kubernetes
# lab:
#
#   ${TWEED_K8S_CACHE:-/var/cache/tweed/kubernetes}/v1.20.2/bin/
#     kube-apiserver kube-controller-manager kube-scheduler kubelet
#     kube-proxy kubectl pause
#
# Why from Debian's source package: no package registry ships the Kubernetes
# server binaries (Debian itself builds only kubectl from them), but Debian 12's
# own `kubernetes` source package (1.20.2, with vendor/) builds all of them
# with Debian's Go 1.19, so everything comes from the Debian archive this
# machine already trusts:
#   - the server binaries are built from that source in GOPATH mode
#     (Kubernetes 1.20 cannot build in module mode), with the version stamped
#     in (otherwise nodes report v0.0.0-master), after generating
#     pkg/generated/openapi (not in the tarball) and replacing the vendored
#     github.com/modern-go/reflect2 v1.0.1, which crashes kube-apiserver under
#     Go >= 1.18, with v1.0.2 from golang-github-modern-go-reflect2-dev;
#   - kubectl is Debian's kubernetes-client (1.20.2), unpacked privately (it
#     is not installed: /usr/bin/kubectl may belong to another package);
#   - pause (the pod sandbox process) is the tree's build/pause/linux/pause.c
#     linked with gcc -static.
#
# Run as root on Debian 12 (bookworm). It installs the Debian packages it
# needs (golang-1.19-go, dpkg-dev, gcc, libc6-dev, make, rsync), and fetches
# sources with a private apt sources list and private index/cache directories
# (the mirror is taken from the machine's own apt sources): /etc/apt is not
# changed. It only builds: it starts no Kubernetes component or service,
# changes no machine-wide setting and leaves the network configuration alone.
#
# Time on 2 cores: ~6 min on an idle machine; 10-13 min measured (590-760 s
# wall, removing the build directory included) while other builds shared the
# CPUs. kube-apiserver alone is 3.5-7 min of that. Downloads ~45 MB (+ ~100 MB
# of Debian packages the first time). Space: ~2.8 GB temporary at peak
# (source tree, Go build cache), removed at the end whatever happens; 414 MB
# kept (bin/ only).
# When the binaries are already cached it does nothing and exits at once
# (then root is not needed), so callers can run it unconditionally.
#
# Usage (as root):  scripts/install-kubernetes.sh
#   TWEED_K8S_CACHE=DIR     cache root (default /var/cache/tweed/kubernetes)
#   TWEED_DEBIAN_MIRROR=URL Debian mirror to fetch from (default: the one in
#                           this machine's apt sources for bookworm main)
#   TMPDIR=DIR              where the temporary build directory goes
# Output: progress on stderr; stdout gets one line, the bin directory, so
#   bin=$(scripts/install-kubernetes.sh)
# works. Exit status 0 when the binaries are cached, 1 with a message naming
# what failed otherwise.
set -euo pipefail

prog=install-kubernetes.sh
K8S_VERSION=v1.20.2
K8S_MAJOR=1
K8S_MINOR=20
SUITE=bookworm
GOROOT_DIR=/usr/lib/go-1.19
cache_root=${TWEED_K8S_CACHE:-/var/cache/tweed/kubernetes}
version_dir=$cache_root/$K8S_VERSION
bin_dir=$version_dir/bin
server_bins=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy)
all_bins=("${server_bins[@]}" kubectl pause)
build_pkgs=(golang-1.19-go dpkg-dev gcc libc6-dev make rsync ca-certificates)

log() { printf '%s: [%4ss] %s\n' "$prog" "$SECONDS" "$*" >&2; }
done_cached() {
  printf '%s: Kubernetes %s binaries are cached in:\n' "$prog" "$K8S_VERSION" >&2
  echo "$bin_dir"
  exit 0
}
die() { printf '%s: error: %s\n' "$prog" "$*" >&2; exit 1; }

# What the script is doing right now, named in the error message if a
# command fails.
step="starting"
on_err() {
  printf '%s: error: failed while %s (command: %s, line %s, exit status %s)\n' \
    "$prog" "$step" "$2" "$1" "$3" >&2
}
trap 'on_err "$LINENO" "$BASH_COMMAND" "$?"' ERR

cache_is_complete() {
  local b
  for b in "${all_bins[@]}"; do
    [ -x "$bin_dir/$b" ] || return 1
  done
  [ "$("$bin_dir/kube-apiserver" --version 2>/dev/null)" = "Kubernetes $K8S_VERSION" ]
}

cache_is_complete && done_cached

[ "$(id -u)" = 0 ] || die "the Kubernetes $K8S_VERSION binaries are not in $bin_dir yet; building them needs root (it installs Debian packages): run it as root"
. /etc/os-release 2>/dev/null || true
[ "${VERSION_CODENAME:-}" = "$SUITE" ] ||
  die "this builds Kubernetes $K8S_VERSION from Debian 12 ($SUITE) packages; this machine is '${PRETTY_NAME:-unknown}'"
[ "$(dpkg --print-architecture)" = amd64 ] || [ "$(dpkg --print-architecture)" = arm64 ] ||
  die "unsupported architecture $(dpkg --print-architecture) (amd64 or arm64 expected)"

umask 022
unset MAKEFLAGS MFLAGS MAKELEVEL GOROOT GOFLAGS GOPATH GOBIN

# One build at a time per cache: a second caller waits for the first one and
# then finds the binaries cached.
step="locking $version_dir"
mkdir -p "$version_dir"
exec 9<"$version_dir"
if ! flock -n 9; then
  log "another $prog is building into $version_dir; waiting for it (up to 30 min)"
  flock -w 1800 9 || die "timed out waiting for the other $prog building into $version_dir"
  cache_is_complete && done_cached
fi

# ---------------------------------------------------------------------------
step="checking free disk space"
tmp_base=${TMPDIR:-/tmp}
avail_kb() { df -Pk "$1" | awk 'NR==2 {print $4}'; }
[ "$(avail_kb "$tmp_base")" -ge $((4 * 1024 * 1024)) ] ||
  die "the build needs ~3 GB of temporary space and $tmp_base has less than 4 GB free; set TMPDIR to a roomier directory"
[ "$(avail_kb "$version_dir")" -ge $((1024 * 1024)) ] ||
  die "the binaries need ~0.5 GB and $version_dir has less than 1 GB free"

work=$(mktemp -d "$tmp_base/tweed-k8s-build.XXXXXX")
staging=""
cleanup() {
  local rc=$?
  [ -n "$staging" ] && rm -rf "$staging"
  rm -rf "$work"
  if [ "$rc" != 0 ]; then
    rmdir "$version_dir" 2>/dev/null || true
    printf '%s: build failed; removed %s (nothing cached)\n' "$prog" "$work" >&2
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
log "building Kubernetes $K8S_VERSION in $work"

# ---------------------------------------------------------------------------
step="installing the Debian packages the build needs (${build_pkgs[*]})"
missing=()
for p in "${build_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  apt-get -o DPkg::Lock::Timeout=600 update -qq >"$work/apt-install.log" 2>&1 || {
    cat "$work/apt-install.log" >&2
    die "apt-get update failed; cannot install ${missing[*]}"
  }
  # RUNLEVEL=1: rsync's package ships a daemon; never start it.
  DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get -o DPkg::Lock::Timeout=600 \
    install -y -qq --no-install-recommends "${missing[@]}" >>"$work/apt-install.log" 2>&1 || {
    cat "$work/apt-install.log" >&2
    die "apt-get install -y --no-install-recommends ${missing[*]} failed"
  }
fi
go=$GOROOT_DIR/bin/go
[ -x "$go" ] || die "$go is missing although golang-1.19-go is installed"

# ---------------------------------------------------------------------------
# A private apt configuration: deb and deb-src for bookworm main from the
# mirror the machine already uses, with its own index and cache directories.
step="finding the Debian mirror in /etc/apt"
# Prints a deb822 "URIs:" line and the stanza's options (Signed-By, ...) for
# the first enabled "deb" source of SUITE with component main, from one-line
# (.list) or deb822 (.sources) files, in apt's order.
find_mirror() {
  local files=() f
  [ -f /etc/apt/sources.list ] && files+=(/etc/apt/sources.list)
  for f in /etc/apt/sources.list.d/*; do
    case "$f" in *.list | *.sources) [ -f "$f" ] && files+=("$f") ;; esac
  done
  [ "${#files[@]}" -gt 0 ] || return 0
  awk -v suite="$SUITE" '
    function trim(s) { sub(/^[ \t]+/, "", s); sub(/[ \t]+$/, "", s); return s }
    function has(list, w,   n, a, i) {
      n = split(list, a, /[ \t]+/)
      for (i = 1; i <= n; i++) if (a[i] == w) return 1
      return 0
    }
    function first(list,   a) { split(trim(list), a, /[ \t]+/); return a[1] }
    function end_stanza(   u) {
      u = first(f["uris"])
      if (!done && has(f["types"], "deb") && has(f["suites"], suite) &&
          has(f["components"], "main") && tolower(f["enabled"]) != "no" &&
          u != "" && u !~ /^cdrom:/) {
        print "URIs: " u; printf "%s", opts; done = 1
      }
      delete f; opts = ""; cur = ""
    }
    FNR == 1 { if (NR > 1 && deb822) end_stanza(); deb822 = (FILENAME ~ /\.sources$/) }
    deb822 {
      if ($0 ~ /^#/) next
      if ($0 ~ /^[ \t]*$/) { end_stanza(); next }
      if ($0 ~ /^[ \t]/) {                       # continuation line
        if (cur == "opt") opts = opts $0 "\n"
        else if (cur != "" && cur != "skip") f[cur] = f[cur] " " trim($0)
        next
      }
      i = index($0, ":"); if (i == 0) next
      key = tolower(trim(substr($0, 1, i - 1))); val = trim(substr($0, i + 1))
      if (key ~ /^(types|uris|suites|components|enabled)$/) { f[key] = val; cur = key }
      else if (key == "targets") cur = "skip"
      else { opts = opts $0 "\n"; cur = "opt" }
      next
    }
    !deb822 && !done {
      line = $0; sub(/#.*/, "", line); line = trim(line)
      if (line == "") next
      type = line; sub(/[ \t].*/, "", type)
      rest = trim(substr(line, length(type) + 1)); o = ""
      if (substr(rest, 1, 1) == "[") {
        e = index(rest, "]"); if (e == 0) next
        o = substr(rest, 2, e - 2); rest = trim(substr(rest, e + 1))
      }
      if (type != "deb") next
      n = split(rest, w, /[ \t]+/)
      if (n < 3 || w[2] != suite || w[1] ~ /^cdrom:/) next
      m = 0; for (i = 3; i <= n; i++) if (w[i] == "main") m = 1
      if (!m) next
      print "URIs: " w[1]
      k = split(o, ow, /[ \t]+/)
      for (i = 1; i <= k; i++) {
        j = index(ow[i], "="); if (j < 2) continue
        key = substr(ow[i], 1, j - 1); val = substr(ow[i], j + 1)
        if (key ~ /[+-]$/ || key == "target") continue
        if (key == "arch") key = "Architectures"
        else if (key == "lang") key = "Languages"
        print key ": " val
      }
      done = 1
    }
    END { if (deb822) end_stanza() }
  ' "${files[@]}"
}
if [ -n "${TWEED_DEBIAN_MIRROR:-}" ]; then
  source_stanza="URIs: $TWEED_DEBIAN_MIRROR"
else
  source_stanza=$(find_mirror)
fi
[ -n "$source_stanza" ] ||
  die "found no enabled 'deb ... $SUITE main' source in /etc/apt/sources.list or /etc/apt/sources.list.d/ to take the Debian mirror from; set TWEED_DEBIAN_MIRROR (e.g. the URL of a Debian mirror)"
mirror=$(printf '%s\n' "$source_stanza" | sed -n 's/^URIs: //p')
log "Debian mirror: $mirror ($SUITE main, deb and deb-src)"

apt_dir=$work/apt
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/parts" "$apt_dir/prefs"
{
  echo "Types: deb deb-src"
  printf '%s\n' "$source_stanza"
  echo "Suites: $SUITE"
  echo "Components: main"
} >"$apt_dir/tweed-kubernetes.sources"
apt_opts=(
  -o "Dir::Etc::SourceList=$apt_dir/tweed-kubernetes.sources"
  -o "Dir::Etc::SourceParts=$apt_dir/parts"
  -o "Dir::Etc::Preferences=$apt_dir/prefs/none"
  -o "Dir::Etc::PreferencesParts=$apt_dir/prefs"
  -o "Dir::State::Lists=$apt_dir/lists"
  -o "Dir::Cache=$apt_dir/cache"
  -o "Acquire::Languages=none"
  # downloads land in this script's private (root-only) directories
  -o "APT::Sandbox::User=root"
)
papt() { apt-get "${apt_opts[@]}" "$@" >&2; }

step="updating the private apt index ($mirror $SUITE main)"
log "fetching the package indexes for $SUITE main (private lists in $apt_dir)"
papt -qq --error-on=any update || die "apt-get update of the private sources list failed (mirror $mirror)"

# ---------------------------------------------------------------------------
step="downloading Debian's kubernetes source package"
mkdir -p "$work/dl"
log "downloading the kubernetes source package (~35 MB)"
(cd "$work/dl" && papt -qq source --download-only kubernetes) ||
  die "apt-get source --download-only kubernetes failed (no deb-src for $SUITE main at $mirror?)"
dsc=$(ls "$work"/dl/kubernetes_*.dsc)
dsc_version=$(sed -n 's/^Version: //p' "$dsc")
case "$dsc_version" in
  *1.20.2-*) ;;
  *) die "Debian's kubernetes source is version $dsc_version, not ${K8S_VERSION#v}" ;;
esac

step="downloading kubernetes-client and golang-github-modern-go-reflect2-dev"
(cd "$work/dl" && papt -qq download kubernetes-client golang-github-modern-go-reflect2-dev) ||
  die "apt-get download kubernetes-client golang-github-modern-go-reflect2-dev failed"

step="unpacking the kubernetes source package (dpkg-source -x)"
tree=$work/src/kubernetes
mkdir -p "$work/src"
# --no-check: apt has already checked every file against the signed Sources
# index; dpkg-source would only warn that it cannot check the uploader's
# signature (no debian-keyring).
dpkg-source --no-check -x "$dsc" "$tree" >"$work/dpkg-source.log" 2>&1 || {
  cat "$work/dpkg-source.log" >&2
  die "dpkg-source -x $dsc failed"
}
[ -d "$tree/vendor/k8s.io/component-base/version" ] && [ -f "$tree/build/pause/linux/pause.c" ] ||
  die "the unpacked source in $tree lacks vendor/ or build/pause/linux/pause.c"

step="replacing the vendored github.com/modern-go/reflect2 with v1.0.2"
dpkg -x "$work"/dl/golang-github-modern-go-reflect2-dev_*.deb "$work/reflect2"
r2_new=$work/reflect2/usr/share/gocode/src/github.com/modern-go/reflect2
r2_old=$tree/vendor/github.com/modern-go/reflect2
[ -f "$r2_new/go_above_118.go" ] ||
  die "golang-github-modern-go-reflect2-dev has no go_above_118.go: not reflect2 v1.0.2 or later"
rm -f "$r2_old"/*.go
cp "$r2_new"/*.go "$r2_old"/

# ---------------------------------------------------------------------------
# Go in GOPATH mode, every cache inside $work.
export PATH=$GOROOT_DIR/bin:$PATH
export GO111MODULE=off GOENV=off GOFLAGS="" CGO_ENABLED=0
export GOPATH=$work/gopath GOCACHE=$work/gocache TMPDIR=$work/tmp HOME=$work/home
mkdir -p "$GOPATH/src/k8s.io" "$GOCACHE" "$TMPDIR" "$HOME"
ln -s "$tree" "$GOPATH/src/k8s.io/kubernetes"
gotree=$GOPATH/src/k8s.io/kubernetes

step="generating pkg/generated/openapi (make gen_openapi)"
log "generating pkg/generated/openapi/zz_generated.openapi.go (make gen_openapi)"
(cd "$gotree" && make gen_openapi) >"$work/gen_openapi.log" 2>&1 || {
  tail -n 30 "$work/gen_openapi.log" >&2
  die "make gen_openapi failed in the kubernetes source tree (log above)"
}
[ -s "$tree/pkg/generated/openapi/zz_generated.openapi.go" ] ||
  die "make gen_openapi did not write pkg/generated/openapi/zz_generated.openapi.go"

# Version stamps, as the upstream build sets them (hack/lib/version.sh); the
# source tarball is a 'git archive', which records its commit there.
git_commit=$(sed -n "s/^ *KUBE_GIT_COMMIT='\([0-9a-f]\{40\}\)'.*/\1/p" "$tree/hack/lib/version.sh" | head -n 1)
build_date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
ldflags="-s -w"
for pkg in k8s.io/kubernetes/vendor/k8s.io/component-base/version \
           k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=$K8S_MAJOR -X $pkg.gitMinor=$K8S_MINOR"
  ldflags+=" -X $pkg.gitTreeState=archive -X $pkg.buildDate=$build_date"
  [ -n "$git_commit" ] && ldflags+=" -X $pkg.gitCommit=$git_commit"
done

out=$work/bin
mkdir -p "$out"
log "$("$go" version)"
for b in "${server_bins[@]}"; do
  step="building $b (go build ./cmd/$b)"
  t0=$SECONDS
  # The upstream build's tags (hack/lib/golang.sh): selinux,notest.
  (cd "$gotree" && "$go" build -trimpath -tags selinux,notest -ldflags "$ldflags" \
      -o "$out/$b" "./cmd/$b") || die "go build of cmd/$b failed (output above)"
  log "built $b in $((SECONDS - t0)) s ($(du -h "$out/$b" | cut -f1))"
done

step="building pause (gcc -static build/pause/linux/pause.c)"
pause_tag=$(sed -n 's/^TAG *= *//p' "$tree/build/pause/Makefile" | head -n 1)
gcc -Os -Wall -Werror -static -DVERSION="v${pause_tag:-3.4}" \
  -o "$out/pause" "$tree/build/pause/linux/pause.c" ||
  die "gcc -static of build/pause/linux/pause.c failed (gcc and libc6-dev are needed)"
strip "$out/pause"

step="unpacking kubectl from kubernetes-client"
dpkg -x "$work"/dl/kubernetes-client_*.deb "$work/kubernetes-client"
[ -x "$work/kubernetes-client/usr/bin/kubectl" ] ||
  die "the kubernetes-client package has no usr/bin/kubectl"
cp "$work/kubernetes-client/usr/bin/kubectl" "$out/kubectl"

# ---------------------------------------------------------------------------
step="checking the built binaries"
for b in "${server_bins[@]}"; do
  v=$("$out/$b" --version 2>&1) || die "$b --version failed: $v"
  [ "$v" = "Kubernetes $K8S_VERSION" ] || die "$b --version printed '$v', not 'Kubernetes $K8S_VERSION'"
done
v=$("$out/kubectl" version --client --short 2>&1) || die "kubectl version --client failed: $v"
case "$v" in *"$K8S_VERSION"*) ;; *) die "kubectl version --client printed '$v', not $K8S_VERSION" ;; esac
v=$("$out/pause" -v 2>&1) || die "pause -v failed: $v"

step="installing the binaries into $bin_dir"
staging=$(mktemp -d "$version_dir/.bin.XXXXXX")
cp "$out"/* "$staging"/
chmod 0755 "$staging" "$staging"/*
rm -rf "$bin_dir"
mv "$staging" "$bin_dir"
staging=""
cache_is_complete || die "the binaries in $bin_dir do not pass the cache check"

log "build directory: $(du -sh "$work" 2>/dev/null | cut -f1) in $work; removing it"
log "cached $(du -sh "$bin_dir" | cut -f1) of binaries; total $SECONDS s"
done_cached
