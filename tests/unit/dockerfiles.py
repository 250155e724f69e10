"""Dockerfiles read the way the builder reads them (continuations joined, comments
dropped), and the checks every image's Dockerfile must pass: the trainer images'
(tests/unit/test_dockerfiles.py) and the operator's (tests/unit/test_operator_dockerfile.py)."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "trainer_image"
PIP_INSTALL = re.compile(r"\bpip[\d.]*\s+install\b")
APT_GET_INSTALL = re.compile(r"\bapt-get\s+(?:\S+\s+)*?install\b")
APT_LISTS_REMOVED = re.compile(r"\brm\s+-(?:rf|fr)\s+/var/lib/apt/lists/\*?")


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


# -- checks for every image ----------------------------------------------------------------------


def check_base_images_are_pinned(dockerfile: Dockerfile):
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


def check_runs_as_a_non_root_user(dockerfile: Dockerfile):
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


def check_copy_sources_exist(dockerfile: Dockerfile):
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


def check_pip_does_not_keep_its_cache(dockerfile: Dockerfile):
    installs = dockerfile.pip_installs()
    assert installs
    for run, tokens in installs:
        assert "--no-cache-dir" in tokens, f"line {run.line}: {shlex.join(tokens)}"


def check_apt_installs_are_minimal(dockerfile: Dockerfile):
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
