#!/usr/bin/env bash
# Builds the local cluster's binaries from the Go module proxy (no release downloads are reachable
# here), once, into a cache outside the git tree keyed by version. Prints the bin directory last.
#
# Honours KUBEBUILDER_ASSETS: when set, kube-apiserver/etcd/kubectl come from there and only the
# tools envtest does not ship (kwok, kwokctl, controller-manager, scheduler, helm, kubeconform, and
# SeaweedFS's weed, the tests' S3 server; Kueue, the tests' queueing controller) are built.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"

cache=${LLMOP_CACHE_DIR:-$HOME/.cache/llmop}
bin=$cache/bin
mkdir -p "$bin"
# One build at a time per cache: test sessions started together (CI shards, a benchmark beside the
# suite) would otherwise build the same component into the same directories at once.
exec 9>"$cache/.build.lock"
flock 9
export GOTOOLCHAIN=local GOFLAGS=-mod=mod
export GOMODCACHE=${GOMODCACHE:-$cache/go/mod} GOCACHE=${GOCACHE:-$cache/go/build}
log() { echo "[cluster-bins] $*" >&2; }

# Each component lands in $cache/dist/NAME-VERSION/ and is linked into $bin only when complete, so
# an interrupted build is redone instead of leaving a half-written binary behind.
dist() { echo "$cache/dist/$1-$2"; }
link_all() { for f in "$1"/*; do ln -sfn "$f" "$bin/$(basename "$f")"; done; }

go_install() { # name version pkg...
  local name=$1 version=$2; shift 2
  local out; out=$(dist "$name" "$version")
  if [ ! -e "$out/.done" ]; then
    log "building $name $version"
    rm -rf "$out.tmp" && mkdir -p "$out.tmp"
    for pkg in "$@"; do GOBIN="$out.tmp" CGO_ENABLED=0 go install -trimpath -ldflags "-s -w" "$pkg@$version"; done
    touch "$out.tmp/.done" && rm -rf "$out" && mv "$out.tmp" "$out"
  fi
  link_all "$out"
}

build_kubernetes() {
  local out; out=$(dist kubernetes "$K8S_VERSION")
  if [ ! -e "$out/.done" ]; then
    log "building kubernetes $K8S_VERSION (tens of minutes cold)"
    local src=$cache/src/kubernetes-$K8S_VERSION
    rm -rf "$src" "$out.tmp" && mkdir -p "$src" "$out.tmp"
    cd "$src"
    go mod init llmop.local/k8s-build >/dev/null 2>&1
    # k8s.io/kubernetes pins its ~30 staging modules at v0.0.0 with local replaces, which only apply
    # in the main module: replace each with the published staging tag of the same release, reading
    # the list from that release's own go.mod (it changes between releases).
    local gomod staging_version=v0.${K8S_VERSION#v1.}
    gomod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
    go mod edit -require "k8s.io/kubernetes@$K8S_VERSION"
    for mod in $(grep -oE '^\s*k8s\.io/[a-z0-9-]+ => \./staging/' "$gomod" | awk '{print $1}'); do
      go mod edit -replace "$mod=$mod@$staging_version"
    done
    local major=1 minor; minor=$(echo "$K8S_VERSION" | cut -d. -f2)
    local stamp="" pkg
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
      stamp+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
      stamp+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
    done
    CGO_ENABLED=0 go build -trimpath -tags selinux,notest -ldflags "-s -w$stamp" -o "$out.tmp/" \
      k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl
    touch "$out.tmp/.done" && rm -rf "$out" && mv "$out.tmp" "$out"
  fi
  link_all "$out"
}

build_etcd() {
  local out; out=$(dist etcd "$ETCD_VERSION")
  if [ ! -e "$out/.done" ]; then
    log "building etcd $ETCD_VERSION"
    local src=$cache/src/etcd-$ETCD_VERSION
    rm -rf "$src" "$out.tmp" && mkdir -p "$src" "$out.tmp"
    cd "$src"
    go mod init llmop.local/etcd-build >/dev/null 2>&1
    # server/v3's go.mod replaces its sibling modules with local paths; pin them to the same tag.
    go mod edit -require "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
    for mod in api/v3 client/pkg/v3 client/v3 pkg/v3; do
      go mod edit -replace "go.etcd.io/etcd/$mod=go.etcd.io/etcd/$mod@$ETCD_VERSION"
    done
    CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$out.tmp/etcd" go.etcd.io/etcd/server/v3
    touch "$out.tmp/.done" && rm -rf "$out" && mv "$out.tmp" "$out"
  fi
  link_all "$out"
}

build_seaweedfs() {
  local out; out=$(dist seaweedfs "$SEAWEEDFS_VERSION")
  if [ ! -e "$out/.done" ]; then
    log "building seaweedfs $SEAWEEDFS_VERSION (about 5 minutes cold)"
    # Its go.mod carries replace directives, which `go install pkg@version` refuses: build the
    # downloaded module source as the main module instead, so its own go.mod and go.sum apply.
    local src=$cache/src/seaweedfs-$SEAWEEDFS_VERSION moddir
    moddir=$(go mod download -json "github.com/seaweedfs/seaweedfs@$SEAWEEDFS_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
    rm -rf "$src" "$out.tmp" && mkdir -p "$(dirname "$src")" "$out.tmp"
    # The module cache is read-only; the build may write go.sum entries.
    cp -r "$moddir" "$src" && chmod -R u+w "$src"
    (cd "$src" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$out.tmp/weed" ./weed)
    touch "$out.tmp/.done" && rm -rf "$out" && mv "$out.tmp" "$out"
  fi
  link_all "$out"
}

build_kueue() {
  local out; out=$(dist kueue "$KUEUE_VERSION")
  if [ ! -e "$out/.done" ]; then
    log "building kueue $KUEUE_VERSION (about 10 minutes cold)"
    # Like SeaweedFS: Kueue's go.mod has replace directives, so the module source is the main module.
    local src=$cache/src/kueue-$KUEUE_VERSION moddir
    moddir=$(go mod download -json "sigs.k8s.io/kueue@$KUEUE_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
    rm -rf "$src" "$out.tmp" && mkdir -p "$(dirname "$src")" "$out.tmp/kueue-manifests/crds"
    cp -r "$moddir" "$src" && chmod -R u+w "$src"
    (cd "$src" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=$KUEUE_VERSION" -o "$out.tmp/kueue" ./cmd/kueue)
    # The release's CRDs and webhook configurations, from the same source as the binary (tests/kueue.py).
    cp "$src"/config/components/crd/bases/*.yaml "$out.tmp/kueue-manifests/crds/"
    cp "$src"/config/components/webhook/manifests.yaml "$out.tmp/kueue-manifests/webhooks.yaml"
    touch "$out.tmp/.done" && rm -rf "$out" && mv "$out.tmp" "$out"
  fi
  link_all "$out"
}

# The control plane first: everything else needs it, and it is the longest build.
if [ -n "${KUBEBUILDER_ASSETS:-}" ]; then
  log "using kube-apiserver, etcd and kubectl from KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS"
  for f in kube-apiserver etcd kubectl; do
    [ -x "$KUBEBUILDER_ASSETS/$f" ] && ln -sfn "$KUBEBUILDER_ASSETS/$f" "$bin/$f"
  done
  [ -x "$bin/etcd" ] || build_etcd
  # envtest ships no controller-manager or scheduler; the cluster needs both.
  [ -x "$bin/kube-scheduler" ] && [ -x "$bin/kube-controller-manager" ] || build_kubernetes
else
  build_etcd
  build_kubernetes
fi
go_install kwok "$KWOK_VERSION" sigs.k8s.io/kwok/cmd/kwok sigs.k8s.io/kwok/cmd/kwokctl
go_install kubeconform "$KUBECONFORM_VERSION" github.com/yannh/kubeconform/cmd/kubeconform
go_install helm "$HELM_VERSION" helm.sh/helm/v3/cmd/helm
build_seaweedfs
build_kueue
echo "$bin"
