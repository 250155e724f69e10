"""The operator image's Dockerfile, checked statically like the trainer images' (no Docker
engine needed): a pinned base, a non-root user, `python -m kubetune run` as the
entrypoint, and the operator's locked dependencies without torch. What the image ships is also imported
for real, with every trainer-only dependency made unimportable."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath

from tests.unit.dockerfiles import (
    Dockerfile,
    check_apt_installs_are_minimal,
    check_base_images_are_pinned,
    check_copy_sources_exist,
    check_pip_does_not_keep_its_cache,
    check_runs_as_a_non_root_user,
    copy_parts,
    norm,
    parse,
)

ROOT = Path(__file__).resolve().parents[2]
PATH = ROOT / "operator" / "Dockerfile"
ENTRYPOINT = ["python", "-m", "kubetune", "run"]


def load() -> Dockerfile:
    return Dockerfile("operator", PATH, parse(PATH.read_text()))


def trainer_only_modules() -> set[str]:
    """The import names of what the trainer extra adds to the operator's dependencies."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def names(reqs: list[str]) -> set[str]:
        return {re.split(r"[<>=!~\[;\s]", r, maxsplit=1)[0].lower().replace("-", "_") for r in reqs}

    return names(extras["trainer"]) - names(extras["operator"]) - names(project["dependencies"])


def test_base_is_pinned_and_the_user_is_not_root():
    dockerfile = load()
    check_base_images_are_pinned(dockerfile)
    check_runs_as_a_non_root_user(dockerfile)
    check_copy_sources_exist(dockerfile)
    check_pip_does_not_keep_its_cache(dockerfile)
    check_apt_installs_are_minimal(dockerfile)


def test_runs_the_operator():
    entrypoints = load().all("ENTRYPOINT", load().final)
    assert entrypoints, "no ENTRYPOINT"
    args = entrypoints[-1].args
    assert args.startswith("["), f"ENTRYPOINT {args}: use the exec form (SIGTERM must reach kopf)"
    assert json.loads(args) == ENTRYPOINT


def test_installs_the_operator_lock_and_no_torch():
    """The operator extra's pins (requirements/operator.lock, which holds no trainer
    dependency: tests/unit/test_lock.py), then the project itself without dependencies."""
    dockerfile = load()
    project = dockerfile.project_dir()
    installs = [tokens for _, tokens in dockerfile.pip_installs()]
    assert any("--require-hashes" in tokens and "/tmp/operator.lock" in tokens for tokens in installs), (
        installs
    )
    assert any(project in map(norm, tokens) and "--no-deps" in tokens for tokens in installs), installs
    trainer_only = trainer_only_modules()
    assert "torch" in trainer_only
    for tokens in installs:
        assert "--no-deps" in tokens, f"{tokens}: resolves versions outside the lock"
        named = {re.split(r"[<>=!~\[]", t, maxsplit=1)[0].lower().replace("-", "_") for t in tokens}
        assert not named & trainer_only, f"trainer dependencies in the operator image: {named & trainer_only}"


def image_tree(dest: Path) -> Path:
    """The project as the image installs it: what COPY brings."""
    dockerfile = load()
    project = PurePosixPath(dockerfile.project_dir())
    for ins in dockerfile.all("COPY", dockerfile.final):
        _, sources, target = copy_parts(ins)
        if not PurePosixPath(target).is_relative_to(project):
            continue  # the lock, read by pip only
        for source in sources:
            src = ROOT / source
            to = dest / PurePosixPath(target).relative_to(project)
            if src.is_dir():
                shutil.copytree(src, to, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                to = to / src.name if target.endswith("/") else to
                to.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(src, to)
    return dest


def test_copies_the_operator_package_as_it_is():
    """The package is the operator alone: nothing of what COPY brings is removed again."""
    dockerfile = load()
    project = str(dockerfile.project_dir())
    for run in dockerfile.all("RUN", dockerfile.final):
        assert not re.search(rf"rm -rf {re.escape(project)}/\S", run.args), run.args


IMPORT_ALL = """
import importlib, pkgutil, sys

class Absent:  # the trainer's dependencies are not in the image
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (not in the operator image)", name=name)

sys.meta_path.insert(0, Absent())
import kubetune
for mod in pkgutil.iter_modules(kubetune.__path__):
    if mod.name == "__main__":  # runs the command; started below as the entrypoint does
        continue
    importlib.import_module(f"kubetune.{mod.name}")
assert not [m for m in sys.modules if m.startswith("kubetune_dev")], "the operator imports dev tooling"
assert sys.modules["kubetune"].__file__.startswith(ROOT), sys.modules["kubetune"].__file__
print("ok", sorted(m for m in sys.modules if m.startswith("kubetune")))
sys.argv = ["kubetune", "run", "--help"]
import runpy
runpy.run_module("kubetune", run_name="__main__")
"""


def test_the_shipped_operator_imports_without_the_trainer_dependencies(tmp_path):
    tree = image_tree(tmp_path / "image")
    assert not (tree / "devtools").exists()
    shipped = sorted(p.name for p in (tree / "trainer_image" / "kubetune_trainer").iterdir())
    assert shipped == ["__init__.py", "config.py", "contract.py", "library.py"], shipped
    code = f"BLOCKED = {sorted(trainer_only_modules())!r}\nROOT = {str(tree)!r}\n" + IMPORT_ALL
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": f"{tree / 'operator'}:{tree / 'trainer_image'}", "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "kubetune.handlers" in out.stdout and "kubetune_trainer.config" in out.stdout
    assert "--namespace" in out.stdout  # `python -m kubetune run --help`
