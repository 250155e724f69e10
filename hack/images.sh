#!/usr/bin/env bash
# Build the operator and trainer images from their unchanged Dockerfiles, daemonless
# (podman with runc), and push them to the project's registry storage, only when an input
# changed: each image is tagged with a hash of its Dockerfile, its lock and the sources it
# copies. Where the real base image cannot be pulled (no registry reachable), a stand-in
# for python:3.11-slim-bookworm is bootstrapped from Debian packages, and this says so.
#
#   hack/images.sh           build and push what is missing; print the images file
#   hack/images.sh --print   print the images file's path, build nothing
#   hack/images.sh --ipex-llm [--print]
#                            the same for the opt-in ipex-llm trainer image alone
#                            (trainer_image/Dockerfile.ipex-llm, ~7 GB unpacked), in its own
#                            images file: only its tests and examples need it
#
# The images file (JSON) names each image by repository and digest in the registry storage
# ($CACHE/registry), which the dev cluster serves on loopback for its nodes to pull from.
set -euo pipefail
shopt -s inherit_errexit  # a failure inside $(...) stops the script too

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${KUBETUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubetune}"
BASE_IMAGE="docker.io/library/python:3.11-slim-bookworm"
# what the stand-in base is made of (Debian bookworm's python3 is 3.11, as the venv's)
STANDIN_PACKAGES="python3,python3-pip,python3-venv,ca-certificates"
PACKAGES=(podman buildah skopeo mmdebstrap docker-registry runc containerd containernetworking-plugins
  iptables uidmap)

log() { echo "[images] $*" >&2; }

# key IMAGE: a hash of everything the image's build reads
key() {
  local files=()
  case $1 in
    operator) files=(operator/Dockerfile requirements/operator.lock pyproject.toml README.md operator/kubetune
      trainer_image/kubetune_trainer/__init__.py trainer_image/kubetune_trainer/config.py
      trainer_image/kubetune_trainer/contract.py trainer_image/kubetune_trainer/library.py) ;;
    trainer) files=(trainer_image/Dockerfile.cuda requirements/trainer.lock pyproject.toml README.md
      trainer_image/kubetune_trainer) ;;
    pause) files=(hack/pause) ;;
    trainer-ipex-llm) files=(trainer_image/Dockerfile.ipex-llm requirements/ipex-llm.lock pyproject.toml
      README.md trainer_image/kubetune_trainer) ;;
  esac
  (cd "$ROOT" && find "${files[@]}" -type f ! -name '*.pyc' ! -path '*/__pycache__/*' \
    -print0 | sort -z |
    xargs -0 sha256sum; echo "$STANDIN_PACKAGES") | sha256sum | cut -c1-16
}

IPEX_LLM=false
if [[ "${1:-}" == "--ipex-llm" ]]; then IPEX_LLM=true; shift; fi
if $IPEX_LLM; then
  IMAGES_FILE="$CACHE/images/ipex-llm-$(key trainer-ipex-llm).json"
else
  IMAGES_FILE="$CACHE/images/images-$(key operator)-$(key trainer)-$(key pause).json"
fi
if [[ "${1:-}" == "--print" ]]; then echo "$IMAGES_FILE"; exit 0; fi
if [[ -f "$IMAGES_FILE" ]]; then echo "$IMAGES_FILE"; exit 0; fi

# One build at a time per cache (two checkouts, or a test session and `make images`, share
# podman's storage and the registry): the second waits, then finds its images built.
mkdir -p "$CACHE/images"
exec 8>"$CACHE/images/.build.lock"
flock 8
if [[ -f "$IMAGES_FILE" ]]; then echo "$IMAGES_FILE"; exit 0; fi

start=$SECONDS
missing=()
for p in "${PACKAGES[@]}"; do
  # installed, not merely known: a removed package keeps its config ("deinstall ... config-files")
  [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == "install ok installed" ]] || missing+=("$p")
done
if ((${#missing[@]})); then
  [[ $(id -u) == 0 ]] || { log "missing Debian packages (${missing[*]}): install them as root"; exit 1; }
  log "installing ${missing[*]} (apt-get)"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

# podman's own storage and settings, under the cache (never the host's defaults).
# runc, cgroupfs and explicit ulimits: without CAP_SYS_RESOURCE runc cannot raise rlimits
# to the engine's defaults, and crun does not support this host's hybrid cgroups.
CONF="$CACHE/containers"
mkdir -p "$CONF/storage" "$CONF/run" "$CACHE/images" "$CACHE/registry"
cat >"$CONF/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$CONF/storage"
runroot = "$CONF/run"
EOF
cat >"$CONF/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
events_logger = "file"
EOF
export CONTAINERS_STORAGE_CONF="$CONF/storage.conf" CONTAINERS_CONF="$CONF/containers.conf"

if ! podman image exists "$BASE_IMAGE"; then
  if timeout 60 podman pull -q "$BASE_IMAGE" >/dev/null 2>&1; then
    log "base: pulled $BASE_IMAGE"
  else
    log "base: $BASE_IMAGE cannot be pulled (no registry reachable): building a stand-in from Debian" \
      "bookworm's packages ($STANDIN_PACKAGES) under that name"
    tmp=$(mktemp -d)
    mmdebstrap --quiet --variant=minbase --include="$STANDIN_PACKAGES" bookworm "$tmp/base.tar" >&2
    podman import -q "$tmp/base.tar" localhost/kubetune/debian-python:bookworm >/dev/null
    rm -rf "$tmp"
    # what the real image offers that the Dockerfiles use: python and pip on PATH, pip
    # allowed to install into the system interpreter
    cat >"$CONF/Containerfile.base" <<'EOF'
FROM localhost/kubetune/debian-python:bookworm
RUN rm -f /usr/lib/python3.*/EXTERNALLY-MANAGED \
    && ln -s /usr/bin/python3 /usr/local/bin/python \
    && ln -s /usr/bin/pip3 /usr/local/bin/pip
ENV LANG=C.UTF-8
CMD ["python3"]
EOF
    podman build -q --network host --pull=never -f "$CONF/Containerfile.base" -t "$BASE_IMAGE" "$CONF" >/dev/null
  fi
fi

# A cold trainer build needs room: its ~6 GB layer, a copy of it while podman commits it,
# the compressed copy in the registry and the nodes' unpacked store.
# (an earlier trainer image means its big layer is cached: a rebuild adds a small one)
big=trainer
$IPEX_LLM && big=trainer-ipex-llm
if [[ -z $(podman images -q "localhost/kubetune/$big") ]]; then
  avail_gb=$(($(df --output=avail -k "$CACHE" | tail -1) / 1024 / 1024))
  if ((avail_gb < 25)); then
    log "only ${avail_gb} GB free under $CACHE: building the $big image needs about 25 GB"
    exit 1
  fi
fi
export TMPDIR="$CONF/tmp"  # podman's copies of layers while it commits them: beside its storage
mkdir -p "$TMPDIR"

# The build's pip reaches PyPI with the host's CA bundle, mounted for the build only.
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
build() { # NAME DOCKERFILE [CONTEXT]
  local name=$1 dockerfile=$2 context=${3:-$ROOT} tag t0=$SECONDS
  tag="localhost/kubetune/$name:$(key "$name")"
  if podman image exists "$tag"; then
    log "$name: $tag cached"
  else
    log "$name: building $tag from $dockerfile (a cold trainer build downloads torch: minutes)"
    podman build -q --network host --pull=never --layers -v "$CA_BUNDLE:$CA_BUNDLE:ro" \
      -f "$ROOT/$dockerfile" -t "$tag" "$context" >/dev/null
    log "$name: built in $((SECONDS - t0)) s"
  fi
  echo "$tag"
}
if $IPEX_LLM; then
  ipex_llm_tag=$(build trainer-ipex-llm trainer_image/Dockerfile.ipex-llm)
else
  operator_tag=$(build operator operator/Dockerfile)
  trainer_tag=$(build trainer trainer_image/Dockerfile.cuda)
  # the sandbox image of the dev cluster's containerd: our static pause binary
  pause_context=$(mktemp -d)
  (cd "$ROOT/hack/pause" && GOTOOLCHAIN=local CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$pause_context/pause" .)
  pause_tag=$(build pause hack/pause/Containerfile "$pause_context")
  rm -rf "$pause_context"
fi

# Push into the registry's storage through a registry on loopback for the duration.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat >"$CONF/registry.yml" <<EOF
version: 0.1
log: {level: warn}
storage:
  filesystem: {rootdirectory: $CACHE/registry}
  delete: {enabled: true}
http: {addr: 127.0.0.1:$port}
EOF
docker-registry serve "$CONF/registry.yml" >"$CONF/registry.log" 2>&1 &
registry_pid=$!
trap 'kill $registry_pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done
push() { # TAG REPOSITORY -> digest
  local t0=$SECONDS digestfile digest
  # pushed before (the tag is the inputs' hash): podman would recompress every layer to find out
  digest=$( (curl -sfI -H "Accept: application/vnd.oci.image.manifest.v1+json" \
    "http://127.0.0.1:$port/v2/$2/manifests/${1##*:}" || true) | tr -d '\r' |
    awk 'tolower($1)=="docker-content-digest:" {print $2}')
  if [[ -n $digest ]]; then
    log "$2: ${1##*:} already in the registry"
    echo "$digest"
    return
  fi
  digestfile=$(mktemp)
  # zstd: several times faster than gzip on these cores, and containerd 1.6 pulls it
  podman push -q --tls-verify=false --compression-format=zstd --digestfile "$digestfile" \
    "$1" "docker://127.0.0.1:$port/$2:${1##*:}" >&2
  log "$2: pushed in $((SECONDS - t0)) s"
  cat "$digestfile"
  rm -f "$digestfile"
}
# What this run pushes (KEY REPOSITORY TAG), then the images file naming each by digest
if $IPEX_LLM; then
  images=("trainer-ipex-llm kubetune/trainer-ipex-llm $ipex_llm_tag")
  base=""
else
  images=("operator kubetune/operator $operator_tag" "trainer kubetune/trainer-cuda $trainer_tag"
    "pause kubetune/pause $pause_tag")
  base=$BASE_IMAGE
fi
fields=()
for entry in "${images[@]}"; do
  read -r name repository tag <<<"$entry"
  digest=$(push "$tag" "$repository")
  fields+=("$name" "$repository" "${tag##*:}" "$digest")
done
python3 - "$IMAGES_FILE" "$CACHE/registry" "$base" "${fields[@]}" <<'EOF'
import json, sys
out, storage, base, *fields = sys.argv[1:]
data = {"registry_storage": storage, **({"base": base} if base else {})}
for i in range(0, len(fields), 4):
    name, repository, tag, digest = fields[i : i + 4]
    data[name] = {"repository": repository, "tag": tag, "digest": digest}
json.dump(data, open(out + ".tmp", "w"), indent=2)
EOF
mv "$IMAGES_FILE.tmp" "$IMAGES_FILE"
log "images ready in $((SECONDS - start)) s: $IMAGES_FILE"
echo "$IMAGES_FILE"
