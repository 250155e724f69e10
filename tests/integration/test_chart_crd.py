"""The chart's CRD copy renders with real helm to exactly the generated CRD, and only
when crds.enabled."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from kubetune.crd import CRD_FILE
from kubetune.devcluster.cluster import tool_dirs

CHART = Path(__file__).resolve().parents[2] / "charts" / "kubetune"


def helm_template(*flags: str) -> list[dict]:
    helm = tool_dirs()["helm"] / "helm"
    out = subprocess.run(
        [str(helm), "template", "kt", str(CHART), "--kube-version", "1.34.4", *flags],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_chart_renders_the_generated_crd():
    docs = helm_template()
    assert docs == [yaml.safe_load(CRD_FILE.read_text())]


def test_chart_can_leave_the_crd_out():
    assert helm_template("--set", "crds.enabled=false") == []
