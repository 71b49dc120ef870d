#!/usr/bin/env bash
# Makes prometheus and promtool available to the monitoring tests (tests/helm), once, in the same
# bin directory as the cluster binaries (~/.cache/llmop/bin). Prints that directory last.
#
# They come from Debian's `prometheus` package, unpacked rather than installed: installing it would
# start a system service listening on every interface (and pull in node-exporter); unpacked, nothing
# runs until a test starts Prometheus itself on 127.0.0.1. Binaries already on PATH are reused.
# Needs apt (Debian/Ubuntu); runs `apt-get update` (as root, as CI does) only if the package is unknown.
set -euo pipefail
cache=${LLMOP_CACHE_DIR:-$HOME/.cache/llmop}
bin=$cache/bin
mkdir -p "$bin"
log() { echo "[prometheus] $*" >&2; }

if [ -x "$bin/prometheus" ] && [ -x "$bin/promtool" ]; then
  echo "$bin"
  exit 0
fi
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
  ln -sfn "$(command -v prometheus)" "$bin/prometheus"
  ln -sfn "$(command -v promtool)" "$bin/promtool"
  echo "$bin"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
if ! apt-get download prometheus >/dev/null 2>&1; then
  log "apt-get update (the package lists do not know prometheus yet)"
  apt-get update -qq
  apt-get download prometheus
fi
deb=$(ls prometheus_*.deb)
version=$(dpkg-deb -f "$deb" Version)
log "unpacking $deb"
dpkg-deb -x "$deb" root
dest=$cache/dist/prometheus-$version
rm -rf "$dest.tmp" && mkdir -p "$dest.tmp"
cp root/usr/bin/prometheus root/usr/bin/promtool "$dest.tmp/"
rm -rf "$dest" && mv "$dest.tmp" "$dest"
ln -sfn "$dest/prometheus" "$bin/prometheus"
ln -sfn "$dest/promtool" "$bin/promtool"
echo "$bin"
