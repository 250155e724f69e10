#!/usr/bin/env bash
# Build the dev-cluster binaries from the pinned Go helper modules under hack/,
# each into a version-stamped cache directory, only when that directory lacks it.
# Prints what it builds and how long each piece took. Prints the bin dirs on success.
#
#   hack/build-tools.sh            build what is missing
#   hack/build-tools.sh --print    print the cache dirs (KEY=dir), build nothing
set -euo pipefail
shopt -s inherit_errexit  # a failure inside $(...) stops the script too

HACK="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${KUBETUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubetune}"
export GOTOOLCHAIN=local CGO_ENABLED=0
# MinIO's pseudo-versions are not in the public checksum database; go.sum pins them.
export GONOSUMDB="github.com/minio/minio${GONOSUMDB:+,$GONOSUMDB}"

module_version() { # dir module -> version required by that helper module
  awk -v m="$2" '$1==m {print $2; exit} $1=="require" && $2==m {print $3; exit}' "$HACK/$1/go.mod"
}

K8S_VERSION=$(module_version k8s k8s.io/kubernetes)
ETCD_VERSION=$(module_version etcd go.etcd.io/etcd/server/v3)
KWOK_VERSION=$(module_version kwok sigs.k8s.io/kwok)
HELM_VERSION=$(module_version helm helm.sh/helm/v3)
MINIO_VERSION=$(module_version minio github.com/minio/minio)
COREDNS_VERSION=$(module_version coredns github.com/coredns/coredns)
KUEUE_VERSION=$(module_version kueue sigs.k8s.io/kueue)
# our own code: keyed by its sources
FAKEGPU_VERSION=$(cat "$HACK"/fakegpu/{main.go,go.mod,go.sum} | sha256sum | cut -c1-12)

declare -A DIRS=(
  [kubernetes]="$CACHE/bin/kubernetes-$K8S_VERSION"
  [kubectl]="$CACHE/bin/kubectl-$K8S_VERSION"
  [kubelet]="$CACHE/bin/kubelet-$K8S_VERSION"
  [etcd]="$CACHE/bin/etcd-$ETCD_VERSION"
  [kwok]="$CACHE/bin/kwok-$KWOK_VERSION"
  [helm]="$CACHE/bin/helm-$HELM_VERSION"
  [minio]="$CACHE/bin/minio-${MINIO_VERSION##*-}"
  [coredns]="$CACHE/bin/coredns-$COREDNS_VERSION"
  [kueue]="$CACHE/bin/kueue-$KUEUE_VERSION"
  [fake-gpu-plugin]="$CACHE/bin/fake-gpu-plugin-$FAKEGPU_VERSION"
)

if [[ "${1:-}" == "--print" ]]; then
  for k in kubernetes kubectl kubelet etcd kwok helm minio coredns fake-gpu-plugin kueue; do echo "$k=${DIRS[$k]}"; done
  exit 0
fi

k8s_ldflags() {
  local v=$K8S_VERSION minor major date flags=""
  major=${v#v}; major=${major%%.*}
  minor=${v#v*.}; minor=${minor%%.*}
  date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    flags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$date"
  done
  echo "-s -w$flags"
}

# build NAME MODULE_DIR LDFLAGS PACKAGE... : go build into a temp dir, then rename into
# place, so an interrupted build never leaves a half-filled cache directory.
build() {
  local name=$1 moddir=$2 ldflags=$3; shift 3
  local dest=${DIRS[$name]}
  if [[ -f "$dest/.complete" ]]; then
    echo "[build-tools] $name: cached in $dest"
    return
  fi
  echo "[build-tools] $name: building $* -> $dest (cold builds take minutes)"
  local start=$SECONDS tmp
  mkdir -p "$CACHE/bin"
  tmp=$(mktemp -d "$CACHE/bin/.$name.XXXXXX")
  # one package: the binary is named after the piece (go would name etcd's "server")
  local out="$tmp/"
  [[ $# -eq 1 ]] && out="$tmp/$name"
  (cd "$HACK/$moddir" && go build -trimpath -ldflags "$ldflags" -o "$out" "$@")
  if declare -F "after_$name" >/dev/null; then "after_$name" "$tmp"; fi
  touch "$tmp/.complete"
  rm -rf "$dest" && mv "$tmp" "$dest"
  echo "[build-tools] $name: built in $((SECONDS - start)) s"
}

build etcd etcd "-s -w" go.etcd.io/etcd/server/v3
build kwok kwok "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION" sigs.k8s.io/kwok/cmd/kwok
build helm helm "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" helm.sh/helm/v3/cmd/helm
build minio minio "-s -w" github.com/minio/minio
# the dev cluster's DNS (Services, headless-Service pod names), for the kubelet nodes' pods
build coredns coredns "-s -w" github.com/coredns/coredns
# a kubelet device plugin advertising nvidia.com/gpu on one runner node (hack/fakegpu)
build fake-gpu-plugin fakegpu "-s -w" .
# beside the binary, what installing it takes, from the same module: CRDs and webhooks
after_kueue() {
  local src
  src=$(cd "$HACK/kueue" && go list -m -f '{{.Dir}}' sigs.k8s.io/kueue)
  mkdir -p "$1/crds"
  cp "$src"/config/components/crd/bases/*.yaml "$1/crds/"
  cp "$src/config/components/webhook/manifests.yaml" "$1/webhook-manifests.yaml"
  chmod -R u+w "$1"
}
# Kueue: queueing, gang admission and preemption of the jobs that name a queue
build kueue kueue "-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=$KUEUE_VERSION" sigs.k8s.io/kueue/cmd/kueue
build kubernetes k8s "$(k8s_ldflags)" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler
# the client at the API server's version (a machine's kubectl may be outside the skew policy)
build kubectl k8s "$(k8s_ldflags)" k8s.io/kubernetes/cmd/kubectl
# the runner nodes' kubelets (on containerd): the node agent users' clusters run
build kubelet k8s "$(k8s_ldflags)" k8s.io/kubernetes/cmd/kubelet
echo "[build-tools] all pieces ready under $CACHE/bin"
