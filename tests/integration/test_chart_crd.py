"""The chart's CRD copies render with real helm to exactly the generated CRDs
(FineTuneJob and Adapter), and only when crds.enabled."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from kubetune_dev.crd import ADAPTER_CRD_FILE, CRD_FILE
from kubetune_dev.devcluster.tools import tool_binary

pytestmark = pytest.mark.tools

GENERATED = {
    (d := yaml.safe_load(f.read_text()))["metadata"]["name"]: d for f in (CRD_FILE, ADAPTER_CRD_FILE)
}
CHART = Path(__file__).resolve().parents[2] / "charts" / "kubetune"


def helm_template(*flags: str) -> list[dict]:
    helm = tool_binary("helm")
    out = subprocess.run(
        [str(helm), "template", "kt", str(CHART), "--kube-version", "1.34.4", *flags],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def crds(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] == "CustomResourceDefinition"]


def test_chart_renders_the_generated_crds():
    rendered = {d["metadata"]["name"]: d for d in crds(helm_template())}
    assert set(rendered) == set(GENERATED)
    for name, chart_crd in rendered.items():
        # kept on helm uninstall: removing the CRD would delete every job, and the library
        assert chart_crd["metadata"].pop("annotations") == {"helm.sh/resource-policy": "keep"}
        assert chart_crd == GENERATED[name]


def test_chart_can_leave_the_crds_out():
    assert crds(helm_template("--set", "crds.enabled=false")) == []
    # more than one replica adds no CRD (a Lease elects the leader, not kopf's peering)
    assert crds(helm_template("--set", "crds.enabled=false,replicaCount=2")) == []
    names = {d["metadata"]["name"] for d in crds(helm_template("--set", "replicaCount=2"))}
    assert names == set(GENERATED)
