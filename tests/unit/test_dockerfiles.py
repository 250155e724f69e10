"""The trainer images' Dockerfiles, checked statically: no Docker engine is needed (and
none is available where the tests run), so this reads the instructions the way the
builder does (continuations joined, comments dropped) and checks what must hold for the
pods the operator creates: a pinned base, a non-root user, the trainer module as the
entrypoint, the progress port, the backend, and lean installs."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest

from kubetune.manifests import PROGRESS_PORT
from kubetune_trainer.model import BACKEND_ENV, BACKENDS

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "trainer_image"
# Dockerfile.<flavor> -> the KUBETUNE_BACKEND it must set
BACKEND_OF = {"cuda": "cuda-bnb", "xpu": "xpu-bnb", "ipex-llm": "ipex-llm"}
# the flavors that take torch from the PyTorch index: the index and the local version
# (cuda installs PyPI's torch from requirements/trainer.lock: tests/unit/test_lock.py)
TORCH_BUILD = {"xpu": ("https://download.pytorch.org/whl/xpu", "xpu")}
IPEX_INDEX = "https://pytorch-extension.intel.com/release-whl/stable/xpu/us/"
ENTRYPOINTS = (["python", "-m", "kubetune_trainer"], ["python3", "-m", "kubetune_trainer"])
PIP_INSTALL = re.compile(r"\bpip[\d.]*\s+install\b")
APT_GET_INSTALL = re.compile(r"\bapt-get\s+(?:\S+\s+)*?install\b")
APT_LISTS_REMOVED = re.compile(r"\brm\s+-(?:rf|fr)\s+/var/lib/apt/lists/\*?")
REQUIREMENT_WITH_EXTRAS = re.compile(r"^(?P<name>[^\[\]]+)\[(?P<extras>[^\[\]]+)\]$")


@dataclass(frozen=True)
class Instruction:
    line: int
    keyword: str
    args: str


def parse(text: str) -> list[Instruction]:
    """Dockerfile text -> instructions. Lines ending in a backslash continue on the next
    line; comment and blank lines are dropped, inside a continuation too (as the builder
    does); parser directives (`# syntax=...`) are comments here."""
    instructions: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not parts:
            start = number
        if stripped.endswith("\\"):
            parts.append(stripped[:-1].strip())
            continue
        parts.append(stripped)
        keyword, _, args = " ".join(p for p in parts if p).partition(" ")
        instructions.append(Instruction(start, keyword.upper(), args.strip()))
        parts = []
    if parts:
        raise ValueError(f"line {start}: the last instruction ends in a line continuation")
    return instructions


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """Split at FROM; each stage starts with its FROM. ARGs before the first FROM are dropped."""
    result: list[list[Instruction]] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            result.append([ins])
        elif result:
            result[-1].append(ins)
    return result


def arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    defaults = {}
    for ins in instructions:
        if ins.keyword == "ARG":
            for token in shlex.split(ins.args):
                name, sep, value = token.partition("=")
                if sep:
                    defaults[name] = value
    return defaults


def expand(text: str, variables: dict[str, str]) -> str:
    """$NAME and ${NAME} -> the value, for the names given; anything else stays."""

    def value(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        return variables.get(name, m.group(0))

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, text)


def env_of(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in stage:
        if ins.keyword != "ENV":
            continue
        tokens = shlex.split(ins.args)
        if "=" not in tokens[0]:  # legacy form: ENV NAME value with spaces
            env[tokens[0]] = ins.args.split(None, 1)[1]
            continue
        for token in tokens:
            name, sep, value = token.partition("=")
            assert sep, f"line {ins.line}: ENV mixes the NAME=value and NAME value forms"
            env[name] = value
    return env


def copy_parts(ins: Instruction) -> tuple[dict[str, str], list[str], str]:
    """COPY/ADD -> (flags, sources, destination)."""
    args = ins.args
    flags: dict[str, str] = {}
    while args.startswith("--"):
        flag, _, args = args.partition(" ")
        name, _, value = flag[2:].partition("=")
        flags[name] = value
        args = args.strip()
    paths = json.loads(args) if args.startswith("[") else shlex.split(args)
    assert len(paths) >= 2, f"line {ins.line}: {ins.keyword} needs a source and a destination"
    return flags, paths[:-1], paths[-1]


def shell_commands(run: str) -> list[str]:
    """The simple commands of a RUN (split at &&, ||, ; and |)."""
    return [c.strip() for c in re.split(r"&&|\|\||;|\|", run) if c.strip()]


def norm(path: str) -> str:
    return str(PurePosixPath(path))


@dataclass
class Dockerfile:
    flavor: str
    path: Path
    instructions: list[Instruction]

    @classmethod
    def load(cls, flavor: str) -> Dockerfile:
        path = IMAGES / f"Dockerfile.{flavor}"
        return cls(flavor, path, parse(path.read_text()))

    @property
    def final(self) -> list[Instruction]:
        return stages(self.instructions)[-1]

    def all(self, keyword: str, stage: list[Instruction] | None = None) -> list[Instruction]:
        return [i for i in (self.instructions if stage is None else stage) if i.keyword == keyword]

    def pip_installs(self) -> list[tuple[Instruction, list[str]]]:
        """Every `pip install` command of every RUN, as (RUN, its tokens with ARGs expanded)."""
        found = []
        for stage in stages(self.instructions):
            variables = arg_defaults(stage)
            for run in self.all("RUN", stage):
                for command in shell_commands(run.args):
                    if PIP_INSTALL.search(command):
                        found.append((run, shlex.split(expand(command, variables))))
        return found

    def project_dir(self) -> str:
        """Where the final stage copies pyproject.toml to (the directory pip installs)."""
        for ins in self.all("COPY", self.final):
            flags, sources, dest = copy_parts(ins)
            if "from" not in flags and "pyproject.toml" in sources:
                assert dest.endswith("/") or len(sources) == 1, f"line {ins.line}: copy into a directory"
                return norm(dest) if dest.endswith("/") else norm(str(PurePosixPath(dest).parent))
        raise AssertionError(f"{self.path.name}: pyproject.toml is never copied into the image")


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
    global_args = arg_defaults(
        dockerfile.instructions[: dockerfile.instructions.index(dockerfile.all("FROM")[0])]
    )
    stage_names: set[str] = set()
    for ins in dockerfile.all("FROM"):
        tokens = [t for t in ins.args.split() if not t.startswith("--platform")]
        image = expand(tokens[0], global_args)
        if image.lower() not in stage_names | {"scratch"}:  # else an earlier stage
            assert "$" not in image, f"line {ins.line}: {image}: an ARG without a default picks the base"
            repository, _, digest = image.partition("@")
            tag = repository.rsplit("/", 1)[-1].partition(":")[2]
            assert tag or digest, f"line {ins.line}: {image} is untagged (that means :latest)"
            assert tag != "latest", f"line {ins.line}: {image}: pin a version, not latest"
            if digest:
                assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), f"line {ins.line}: bad digest {digest}"
        if len(tokens) == 3 and tokens[1].upper() == "AS":
            stage_names.add(tokens[2].lower())


def test_runs_as_a_non_root_user(dockerfile: Dockerfile):
    users = dockerfile.all("USER", dockerfile.final)
    assert users, "no USER: the image would run as root"
    user, _, group = expand(users[-1].args, arg_defaults(dockerfile.final)).partition(":")
    if user.isdigit():
        uid = int(user)
    else:
        uid = None
        for run in dockerfile.all("RUN", dockerfile.final):
            for command in shell_commands(run.args):
                tokens = shlex.split(command)
                if tokens and tokens[0] == "useradd" and tokens[-1] == user:
                    for i, token in enumerate(tokens):
                        if token in ("-u", "--uid"):
                            uid = int(tokens[i + 1])
                        elif token.startswith("--uid="):
                            uid = int(token.partition("=")[2])
        assert uid is not None, f"USER {user}: no `useradd --uid N {user}` creates it"
    assert uid >= 1000, f"USER {users[-1].args}: uid {uid} is a system (or root) uid"
    assert group not in ("0", "root"), f"USER {users[-1].args}: root group"


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
    if dockerfile.flavor == "ipex-llm":
        # the seed-compatible stack: ipex-llm with its own torch, the trainer without its deps
        assert any(
            any(t.startswith("ipex-llm[xpu]==") for t in tokens) and IPEX_INDEX in tokens
            for tokens in installs
        ), "ipex-llm[xpu]==<version> from Intel's XPU index is not installed"
        assert any(project in map(norm, tokens) and "--no-deps" in tokens for tokens in installs), (
            f"the trainer ({project}) is not installed with --no-deps"
        )
        return
    if dockerfile.flavor == "cuda":
        # every dependency from the lock (hashes required), then the trainer without deps
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
    for ins in dockerfile.all("COPY") + dockerfile.all("ADD"):
        flags, sources, _ = copy_parts(ins)
        if "from" in flags:
            continue  # from another stage or image
        for source in sources:
            assert "://" not in source, f"line {ins.line}: fetch {source} in a RUN with a checksum instead"
            assert not PurePosixPath(source).is_absolute() and ".." not in PurePosixPath(source).parts, (
                f"line {ins.line}: {source} is outside the build context (the repository root)"
            )
            assert list(ROOT.glob(source.rstrip("/"))), f"line {ins.line}: {source} is not in the repository"


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
    installs = dockerfile.pip_installs()
    assert installs
    for run, tokens in installs:
        assert "--no-cache-dir" in tokens, f"line {run.line}: {shlex.join(tokens)}"


def test_apt_installs_are_minimal(dockerfile: Dockerfile):
    for run in dockerfile.all("RUN"):
        commands = shell_commands(run.args)
        assert not any(re.match(r"apt\s+install\b", c) for c in commands), (
            f"line {run.line}: use apt-get in scripts (apt's CLI is not stable)"
        )
        installs = [c for c in commands if APT_GET_INSTALL.search(c)]
        for command in installs:
            assert "--no-install-recommends" in command.split(), f"line {run.line}: {command}"
        if installs:
            first_update = next(
                (n for n, c in enumerate(commands) if re.search(r"\bapt-get\s+update\b", c)), None
            )
            assert first_update is not None and first_update < commands.index(installs[0]), (
                f"line {run.line}: apt-get update belongs in the same RUN as apt-get install"
            )
            assert APT_LISTS_REMOVED.search(run.args), f"line {run.line}: remove /var/lib/apt/lists/*"


def test_readme_names_every_image_and_its_backend():
    readme = (IMAGES / "README.md").read_text()
    for flavor, backend in BACKEND_OF.items():
        assert f"docker build -f trainer_image/Dockerfile.{flavor} " in " ".join(readme.split())
        assert f"`{backend}`" in readme
