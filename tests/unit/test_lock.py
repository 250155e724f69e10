"""One set of versions everywhere: requirements/dev.lock pins every Python dependency with
its file hashes; the venv is installed from it (hack/ensure-env.sh), the images from its
subsets (operator.lock, trainer.lock), and the docs name its versions. These fail when the
venv, the locks, the Dockerfiles or the docs disagree."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.helpers import LOCKS, read_lock

ROOT = Path(__file__).resolve().parents[2]
DEV = read_lock(LOCKS / "dev.lock")


def project_requirements() -> dict[str, list[Requirement]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups = {"dependencies": project["dependencies"], **project["optional-dependencies"]}
    return {
        group: [Requirement(r) for r in reqs if not r.startswith("kubetune[")]
        for group, reqs in groups.items()
    }


def test_every_requirement_of_the_project_is_pinned_within_its_range():
    for group, reqs in project_requirements().items():
        for req in reqs:
            name = canonicalize_name(req.name)
            assert name in DEV, f"{group}: {req} is not in requirements/dev.lock (run make lock)"
            version = DEV[name][0]
            assert req.specifier.contains(version, prereleases=True), (
                f"{group}: {req} but the lock pins {version} (run make lock)"
            )


@pytest.mark.parametrize("image", ["operator", "trainer"])
def test_the_images_locks_are_the_dev_locks_pins(image):
    """Subsets of the one resolution: the same version and the same file hashes."""
    lock = read_lock(LOCKS / f"{image}.lock")
    assert lock
    for name, pin in lock.items():
        assert DEV.get(name) == pin, f"{image}.lock pins {name} {pin[0]}, dev.lock {DEV.get(name, ('-',))[0]}"
    extra = {canonicalize_name(r.name) for r in project_requirements()[image]}
    assert extra <= set(lock), f"{image}.lock lacks {extra - set(lock)}"


def test_the_operator_image_gets_no_trainer_dependency():
    reqs = project_requirements()
    trainer_only = {canonicalize_name(r.name) for r in reqs["trainer"]} - {
        canonicalize_name(r.name) for r in reqs["operator"] + reqs["dependencies"]
    }
    assert "torch" in trainer_only
    assert not trainer_only & set(read_lock(LOCKS / "operator.lock"))


def test_the_venv_is_exactly_the_lock():
    """The interpreter running the tests (the cached venv) has every pinned version."""
    wrong = {}
    for name, (version, _) in DEV.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            wrong[name] = (version, installed)
    assert not wrong, f"venv differs from requirements/dev.lock (locked, installed): {wrong}"


@pytest.mark.parametrize(
    ("dockerfile", "lock"),
    [
        ("operator/Dockerfile", "operator.lock"),
        ("trainer_image/Dockerfile.cuda", "trainer.lock"),
        ("trainer_image/Dockerfile.ipex-llm", "ipex-llm.lock"),
    ],
)
def test_the_dockerfiles_install_their_lock_with_hashes_and_nothing_else(dockerfile, lock):
    text = re.sub(r"\\\n", " ", (ROOT / dockerfile).read_text())
    copied = re.search(rf"^COPY requirements/{re.escape(lock)} (\S+)$", text, re.M)
    assert copied, f"{dockerfile} does not copy requirements/{lock}"
    installs = [line for line in text.splitlines() if re.search(r"\bpip install\b", line)]
    assert any(
        "--require-hashes" in line and "--no-deps" in line and f"-r {copied[1]}" in line for line in installs
    ), installs
    # every other install is the project itself, without dependencies: no version resolved at build
    for line in installs:
        assert "--no-deps" in line, f"{dockerfile}: {line.strip()} resolves versions outside the lock"
    assert "TORCH_VERSION" not in text and "download.pytorch.org" not in text


def test_the_ipex_llm_lock_is_complete_and_pins_the_seeds_stack():
    """Its own resolution (older torch/transformers than dev.lock): every package hashed,
    and the stack the README's backend table names."""
    lock = read_lock(LOCKS / "ipex-llm.lock")
    assert all(hashes for _, hashes in lock.values()), "a pin without hashes"
    for name in ("ipex-llm", "intel-extension-for-pytorch", "torch", "transformers", "peft"):
        assert name in lock, f"ipex-llm.lock lacks {name}"
    readme = (ROOT / "README.md").read_text()
    for name in ("ipex-llm", "intel-extension-for-pytorch", "torch", "transformers", "peft"):
        assert f"{name} {lock[name][0]}" in readme, f"README.md does not say {name} {lock[name][0]}"


def test_the_xpu_image_pins_the_locks_torch():
    """Its torch build comes from the PyTorch XPU index (not PyPI), at the locked version."""
    text = (ROOT / "trainer_image" / "Dockerfile.xpu").read_text()
    assert re.search(r"^ARG TORCH_VERSION=(\S+)$", text, re.M)[1] == DEV["torch"][0]


def test_the_docs_name_the_locked_versions():
    table = (ROOT / "trainer_image" / "README.md").read_text()
    for name in ("torch", "transformers", "peft", "bitsandbytes"):
        assert f"{name} {DEV[name][0]}" in table, (
            f"trainer_image/README.md does not say {name} {DEV[name][0]}"
        )
