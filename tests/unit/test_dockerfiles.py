"""The trainer images' Dockerfiles, checked statically: no Docker engine is needed (and
none is available where the tests run), so this reads the instructions the way the
builder does (continuations joined, comments dropped) and checks what must hold for the
pods the operator creates: a pinned base, a non-root user, the trainer module as the
entrypoint, the progress port, the backend, and lean installs."""

from __future__ import annotations

import json
import re

import pytest

from kubetune.manifests import PROGRESS_PORT
from kubetune_trainer.model import BACKEND_ENV, BACKENDS
from tests.unit.dockerfiles import (
    IMAGES,
    Dockerfile,
    Instruction,
    check_apt_installs_are_minimal,
    check_base_images_are_pinned,
    check_copy_sources_exist,
    check_pip_does_not_keep_its_cache,
    check_runs_as_a_non_root_user,
    copy_parts,
    env_of,
    expand,
    norm,
    parse,
    shell_commands,
)

# Dockerfile.<flavor> -> the KUBETUNE_BACKEND it must set
BACKEND_OF = {"cuda": "cuda-bnb", "xpu": "xpu-bnb", "ipex-llm": "ipex-llm", "ipex-llm-xpu": "ipex-llm"}
# the flavors installed from a lock (hashes required), then the trainer without its deps
FROM_LOCK = {"cuda": "requirements/trainer.lock", "ipex-llm": "requirements/ipex-llm.lock"}
# the flavors that take torch from the PyTorch index: the index and the local version
# (cuda installs PyPI's torch from requirements/trainer.lock: tests/unit/test_lock.py)
TORCH_BUILD = {"xpu": ("https://download.pytorch.org/whl/xpu", "xpu")}
IPEX_INDEX = "https://pytorch-extension.intel.com/release-whl/stable/xpu/us/"
ENTRYPOINTS = (["python", "-m", "kubetune_trainer"], ["python3", "-m", "kubetune_trainer"])
REQUIREMENT_WITH_EXTRAS = re.compile(r"^(?P<name>[^\[\]]+)\[(?P<extras>[^\[\]]+)\]$")


FLAVORS = sorted(BACKEND_OF)


@pytest.fixture(params=FLAVORS)
def dockerfile(request) -> Dockerfile:
    return Dockerfile.load(request.param)


def test_parse_joins_continuations_and_drops_comments():
    text = (
        "# syntax=docker/dockerfile:1\n"
        "FROM  ubuntu:24.04 AS base\n"
        "\n"
        "RUN apt-get update \\\n"
        "    # a comment inside the continuation\n"
        "    && apt-get install -y --no-install-recommends \\\n"
        "\n"
        "        curl \\\n"
        "    && rm -rf /var/lib/apt/lists/*\n"
        'entrypoint ["python", "-m", "kubetune_trainer"]\n'
    )
    assert parse(text) == [
        Instruction(2, "FROM", "ubuntu:24.04 AS base"),
        Instruction(
            4,
            "RUN",
            "apt-get update && apt-get install -y --no-install-recommends curl && rm -rf /var/lib/apt/lists/*",
        ),
        Instruction(10, "ENTRYPOINT", '["python", "-m", "kubetune_trainer"]'),
    ]
    with pytest.raises(ValueError, match="continuation"):
        parse("FROM ubuntu:24.04\nRUN true \\\n")


def test_helpers():
    assert expand("torch==${V}+cpu $V $OTHER", {"V": "2.9.1"}) == "torch==2.9.1+cpu 2.9.1 $OTHER"
    assert shell_commands("a && b || c; d | e") == ["a", "b", "c", "d", "e"]
    env = env_of(parse('FROM x:1\nENV A=1 B="two words"\nENV C three words\nENV A=3'))
    assert env == {"A": "3", "B": "two words", "C": "three words"}
    copy = parse('FROM x:1\nCOPY --chown=1:1 --from=build a b /dst/\nCOPY ["c d", "/e"]')[1:]
    assert copy_parts(copy[0]) == ({"chown": "1:1", "from": "build"}, ["a", "b"], "/dst/")
    assert copy_parts(copy[1]) == ({}, ["c d"], "/e")


def test_every_trainer_dockerfile_is_checked():
    on_disk = sorted(p.name.removeprefix("Dockerfile.") for p in IMAGES.glob("Dockerfile.*"))
    assert on_disk == FLAVORS
    # the cpu backend has no image of its own: the CUDA image runs it (KUBETUNE_BACKEND=cpu)
    assert set(BACKEND_OF.values()) | {"cpu"} == set(BACKENDS)


def test_base_images_are_pinned(dockerfile: Dockerfile):
    check_base_images_are_pinned(dockerfile)


def test_runs_as_a_non_root_user(dockerfile: Dockerfile):
    check_runs_as_a_non_root_user(dockerfile)


def test_runs_the_trainer_module(dockerfile: Dockerfile):
    entrypoints = dockerfile.all("ENTRYPOINT", dockerfile.final)
    assert entrypoints, "no ENTRYPOINT"
    args = entrypoints[-1].args
    assert args.startswith("["), f"ENTRYPOINT {args}: use the exec form (signals reach the trainer)"
    assert json.loads(args) in ENTRYPOINTS, f"ENTRYPOINT {args}"


def test_installs_the_trainer(dockerfile: Dockerfile):
    project = dockerfile.project_dir()
    package = [
        copy_parts(i)
        for i in dockerfile.all("COPY", dockerfile.final)
        if norm(copy_parts(i)[1][0]) == "trainer_image/kubetune_trainer"
    ]
    assert package, "trainer_image/kubetune_trainer is never copied"
    assert norm(package[0][2]) == f"{project}/trainer_image/kubetune_trainer", (
        "the package must sit where pyproject's packages.find looks (trainer_image/)"
    )

    installs = [tokens for _, tokens in dockerfile.pip_installs()]
    if dockerfile.flavor == "ipex-llm-xpu":
        # the seed-compatible stack: ipex-llm with its own torch, the trainer without its deps
        assert any(
            any(t.startswith("ipex-llm[xpu]==") for t in tokens) and IPEX_INDEX in tokens
            for tokens in installs
        ), "ipex-llm[xpu]==<version> from Intel's XPU index is not installed"
        assert any(project in map(norm, tokens) and "--no-deps" in tokens for tokens in installs), (
            f"the trainer ({project}) is not installed with --no-deps"
        )
        return
    if dockerfile.flavor in FROM_LOCK:
        # every dependency from the lock (hashes required), then the trainer without deps
        lock = FROM_LOCK[dockerfile.flavor]
        assert any(norm(copy_parts(i)[1][0]) == lock for i in dockerfile.all("COPY", dockerfile.final)), (
            f"{lock} is not what the image installs"
        )
        assert any("--require-hashes" in tokens for tokens in installs), installs
        assert any(project in map(norm, tokens) and "--no-deps" in tokens for tokens in installs), (
            f"the trainer ({project}) is not installed with --no-deps"
        )
        return

    def with_trainer_extra(token: str) -> bool:
        m = REQUIREMENT_WITH_EXTRAS.match(token)
        return bool(m) and norm(m["name"]) == project and "trainer" in m["extras"].replace(" ", "").split(",")

    assert any(any(map(with_trainer_extra, tokens)) for tokens in installs), (
        f"no `pip install {project}[trainer]`"
    )
    assert not any("--no-deps" in tokens for tokens in installs)


@pytest.mark.parametrize("flavor", sorted(TORCH_BUILD))  # ipex-llm brings its own torch
def test_torch_is_the_accelerators_build(flavor: str):
    dockerfile = Dockerfile.load(flavor)
    index, local = TORCH_BUILD[flavor]
    installs = [tokens for _, tokens in dockerfile.pip_installs()]
    pins = {t for tokens in installs for t in tokens if t.startswith("torch")}
    assert pins, "torch is never pinned"
    assert all(re.fullmatch(rf"torch==\d+\.\d+\.\d+\+{local}", pin) for pin in pins), pins
    assert any(
        any(t.startswith("torch==") for t in tokens)
        and any(t in (index, f"--extra-index-url={index}", f"--index-url={index}") for t in tokens)
        for tokens in installs
    ), f"torch is not installed from {index}"


def test_copy_sources_exist(dockerfile: Dockerfile):
    check_copy_sources_exist(dockerfile)


def test_exposes_the_progress_port(dockerfile: Dockerfile):
    ports = {
        port.partition("/")[0]
        for ins in dockerfile.all("EXPOSE", dockerfile.final)
        for port in ins.args.split()
    }
    assert ports == {str(PROGRESS_PORT)}, f"EXPOSE {ports}: the pods' metrics port is {PROGRESS_PORT}"


def test_sets_its_backend(dockerfile: Dockerfile):
    backend = env_of(dockerfile.final).get(BACKEND_ENV)
    assert backend == BACKEND_OF[dockerfile.flavor], f"{BACKEND_ENV}={backend}"


def test_runtime_conventions(dockerfile: Dockerfile):
    env = env_of(dockerfile.final)
    assert env.get("HF_HOME") == "/cache/hf"  # the pod's cache volume; the root filesystem is read-only
    assert env.get("PYTHONUNBUFFERED") == "1"  # logs reach kubectl logs as they happen
    workdirs = dockerfile.all("WORKDIR", dockerfile.final)
    assert workdirs and workdirs[-1].args == "/home/trainer", "WORKDIR must be /home/trainer"


def test_pip_does_not_keep_its_cache(dockerfile: Dockerfile):
    check_pip_does_not_keep_its_cache(dockerfile)


def test_apt_installs_are_minimal(dockerfile: Dockerfile):
    check_apt_installs_are_minimal(dockerfile)


def test_readme_names_every_image_and_its_backend():
    readme = (IMAGES / "README.md").read_text()
    for flavor, backend in BACKEND_OF.items():
        assert f"docker build -f trainer_image/Dockerfile.{flavor} " in " ".join(readme.split())
        assert f"`{backend}`" in readme
