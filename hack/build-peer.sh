#!/usr/bin/env bash
# Builds the peer controller benchmarks/peer.py compares llmop against, the Kubeflow Training
# Operator, from the Go module proxy (no release images or binaries are reachable here), once, into
# $cache/dist/training-operator-VERSION/ with its CRDs beside it. Prints that directory last.
# Not part of CI: only benchmarks/peer.py needs it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=peer-versions.env
source "$here/peer-versions.env"

cache=${LLMOP_CACHE_DIR:-$HOME/.cache/llmop}
export GOTOOLCHAIN=local GOFLAGS=-mod=mod
export GOMODCACHE=${GOMODCACHE:-$cache/go/mod} GOCACHE=${GOCACHE:-$cache/go/build}
log() { echo "[build-peer] $*" >&2; }

out=$cache/dist/training-operator-$TRAINING_OPERATOR_VERSION
if [ ! -e "$out/.done" ]; then
  log "building training-operator $TRAINING_OPERATOR_VERSION (several minutes cold)"
  # Like SeaweedFS and Kueue in build-cluster-bins.sh: its go.mod may carry replace directives, which
  # `go install pkg@version` refuses, so the downloaded module source is built as the main module.
  src=$cache/src/training-operator-$TRAINING_OPERATOR_VERSION
  moddir=$(go mod download -json "github.com/kubeflow/training-operator@$TRAINING_OPERATOR_VERSION" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
  rm -rf "$src" "$out.tmp" && mkdir -p "$(dirname "$src")" "$out.tmp/training-operator-crds"
  # The module cache is read-only; the build may write go.sum entries.
  cp -r "$moddir" "$src" && chmod -R u+w "$src"
  # The one change to its source: its webhook server takes only a port (no flag for the address) and
  # would listen on every interface; bind it to loopback, like everything else of the benchmark.
  main=$src/cmd/training-operator.v1/main.go
  grep -qP '^\t\t\tPort: webhookServerPort,$' "$main" || { log "unexpected $main: webhook options not found"; exit 1; }
  sed -i 's/^\t\t\tPort: webhookServerPort,$/\t\t\tHost: "127.0.0.1",\n&/' "$main"
  (cd "$src" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$out.tmp/training-operator" ./cmd/training-operator.v1)
  cp "$src"/manifests/base/crds/kubeflow.org_*.yaml "$out.tmp/training-operator-crds/"
  touch "$out.tmp/.done" && rm -rf "$out" && mv "$out.tmp" "$out"
fi
echo "$out"
