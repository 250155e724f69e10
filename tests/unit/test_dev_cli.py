"""`python -m kubetune_dev`: each subcommand reaches the code it names (a moved module once
left `demo` importing from the operator package, which no longer has it)."""

from __future__ import annotations

import pytest

from kubetune_dev import cli, crd, demo


def test_demo_runs_the_dev_packages_demo(monkeypatch, tmp_path):
    ran = []
    monkeypatch.setattr(demo, "run", lambda workdir: ran.append(workdir) or 0)
    with pytest.raises(SystemExit) as done:
        cli.main(["demo", "--workdir", str(tmp_path)])
    assert done.value.code == 0 and ran == [tmp_path]


def test_generate_check_runs_the_crd_generators_check(monkeypatch):
    asked = []
    monkeypatch.setattr(crd, "main", lambda argv: asked.append(argv) or 0)
    with pytest.raises(SystemExit) as done:
        cli.main(["generate", "--check"])
    assert done.value.code == 0 and asked == [["--check"]]
