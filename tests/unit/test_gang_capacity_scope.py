"""Whose pods gang admission counts against node capacity: every active pod in the
cluster, or (the chart's gang.capacityView: namespaces, namespaced installs) only the
watched namespaces' pods, listed one namespace at a time under the operator's Roles."""

from __future__ import annotations

import json

import pytest

from kubetune.gang import CAPACITY_NAMESPACES_ENV, capacity_scope
from kubetune.kube import Kube


def env(value=None) -> dict[str, str]:
    return {} if value is None else {CAPACITY_NAMESPACES_ENV: value}


@pytest.mark.parametrize("value", [None, "", "null", "[]"])
def test_unset_counts_every_pod_in_the_cluster(value):
    assert capacity_scope(env(value)) is None


def test_the_charts_namespaces_narrow_it_to_those():
    assert capacity_scope(env(json.dumps(["team-a", "team-b"]))) == ["team-a", "team-b"]
    assert capacity_scope(env('["team-a", "team-a"]')) == ["team-a"]  # each listed once


@pytest.mark.parametrize("value", ['"team-a"', '{"team-a": 1}', "[1]", '[""]', "team-a"])
def test_anything_but_a_list_of_names_is_refused(value):
    with pytest.raises(ValueError):
        capacity_scope(env(value))


class RecordingKube(Kube):
    def __init__(self) -> None:
        super().__init__(api=None)
        self.calls: list[tuple[str, str, dict]] = []

    def call(self, method, path, body=None, query=None, content_type=None):
        self.calls.append((method, path, query))
        ns = path.split("/")[4] if "/namespaces/" in path else "any"
        return {"items": [{"metadata": {"namespace": ns, "name": f"p-{ns}"}}]}


def test_namespaced_listing_asks_each_namespace_with_the_cluster_wide_lists_selector():
    kube = RecordingKube()
    everywhere = kube.list_active_pods()
    pods = kube.list_active_pods_in(["team-a", "team-b"])
    (_, path, cluster_query), *per_ns = kube.calls
    assert path == "/api/v1/pods" and [p["metadata"]["name"] for p in everywhere] == ["p-any"]
    assert cluster_query == {"fieldSelector": "status.phase!=Succeeded,status.phase!=Failed"}
    assert per_ns == [
        ("GET", "/api/v1/namespaces/team-a/pods", cluster_query),
        ("GET", "/api/v1/namespaces/team-b/pods", cluster_query),
    ]
    assert [p["metadata"]["name"] for p in pods] == ["p-team-a", "p-team-b"]


def test_the_controller_takes_its_scope_from_the_environment(monkeypatch):
    from kubetune.handlers import Controller

    def scope():
        c = Controller(RecordingKube(), workers=1)
        c.pool.shutdown()
        c.events.shutdown()
        return c.capacity_namespaces

    monkeypatch.delenv(CAPACITY_NAMESPACES_ENV, raising=False)
    assert scope() is None
    monkeypatch.setenv(CAPACITY_NAMESPACES_ENV, '["team-a"]')
    assert scope() == ["team-a"]
