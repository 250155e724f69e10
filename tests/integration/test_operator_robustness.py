"""The operator under stress: killed and restarted in the middle of a burst of jobs, and
fed generated specs (valid and not). It never duplicates pods, never crashes, and every
job ends where it should."""

from __future__ import annotations

import random
import threading
import time
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubernetes.client.rest import ApiException

from kubetune.api import GROUP, PLURAL, VERSION
from tests.helpers import make_namespace, wait_for
from tests.integration.helpers import create, minimal_job, status

pytestmark = pytest.mark.cluster
SMALL_CPU = {"accelerator": "cpu", "cpu": "100m", "memory": "128Mi"}  # 50 of them fit the CPU node


def test_operator_killed_at_random_points_during_a_burst(operator, core, custom, namespace):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    jobs = [f"burst-{i:02d}" for i in range(50)]
    stop = threading.Event()
    kills = []
    min_kills = 3

    def chaos():
        # Kills go on until every job is created *and* the operator has died min_kills
        # times: a fast burst (about 2 s) once left the test with a single kill. The later
        # kills still hit the operator mid-work, catching up on the burst's backlog.
        while not (stop.is_set() and len(kills) >= min_kills):
            time.sleep(rng.uniform(0.2, 1.5))
            operator.kill()  # SIGKILL: no chance to finish anything in flight
            kills.append(time.monotonic())
            time.sleep(rng.uniform(0.0, 0.5))
            operator.start()

    killer = threading.Thread(target=chaos, daemon=True)
    killer.start()
    try:
        for name in jobs:
            create(custom, namespace, minimal_job(name, resources=SMALL_CPU))
            time.sleep(rng.uniform(0, 0.05))
        time.sleep(1.0)
    finally:
        stop.set()
        killer.join()
    assert operator.alive(), "the chaos loop ends by restarting the operator"

    def all_running():
        items = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
        return (
            len(items) == 50
            and all((j.get("status") or {}).get("phase") == "Running" for j in items)
            and items
        )

    items = wait_for(all_running, 120, f"all 50 jobs Running (seed {seed})", interval_s=0.5)
    for job in items:
        st_ = job["status"]
        assert (st_["attempt"], st_["preemptions"], st_["failures"]) == (1, 0, 0), (
            seed,
            job["metadata"]["name"],
        )
    pods = core.list_namespaced_pod(namespace).items
    names = sorted(p.metadata.name for p in pods)
    assert names == sorted(f"{j}-a1-w0" for j in jobs), f"seed {seed}: duplicate or missing pods"


# -- generated specs -----------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 10**6),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.text(max_size=12),
    st.sampled_from(
        [
            "s3://bucket-x/p/",
            "file:///data",
            "cpu",
            "nvidia",
            "qlora",
            "all-linear",
            "4Gi",
            "custom",
            "{output}",
        ]
    ),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)
FIELDS = {
    "model": st.one_of(
        values,
        st.fixed_dictionaries({"name": st.text(max_size=20)}),
        st.fixed_dictionaries({"uri": st.sampled_from(["s3://models-x/m/", "http://x"])}),
    ),
    "dataset": st.one_of(
        values,
        st.fixed_dictionaries(
            {
                "uri": st.sampled_from(["s3://data-x/d/", "s3://"]),
                "template": st.sampled_from(["chat", "custom", "x"]),
                "maxSeqLength": st.integers(-1, 200000),
            }
        ),
    ),
    "lora": st.one_of(values, st.fixed_dictionaries({"r": st.integers(-2, 2000), "alpha": values})),
    "training": st.one_of(
        values,
        st.fixed_dictionaries(
            {"maxSteps": st.integers(-1, 10), "learningRate": st.floats(-1, 2, allow_nan=False)}
        ),
    ),
    "resources": st.one_of(
        values,
        st.fixed_dictionaries(
            {
                "accelerator": st.sampled_from(["cpu", "nvidia", "tpu"]),
                "gpusPerWorker": st.integers(-1, 20),
                "cpu": st.just("100m"),
                "memory": st.just("64Mi"),
            }
        ),
    ),
    "workers": values,
    "spot": values,
    "suspend": values,
    "backoffLimit": values,
}


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.fixed_dictionaries({}, optional=FIELDS))
def test_generated_specs_never_crash_the_operator(operator, custom, crd_installed, hyp_namespace, spec):
    base = minimal_job(f"gen-{uuid.uuid4().hex[:10]}", resources=SMALL_CPU)
    base["spec"].update(spec)
    try:
        create(custom, hyp_namespace, base)
    except ApiException as e:
        assert e.status == 422, e.body  # refused by the schema: a clear 422, nothing else
        return
    except ValueError:
        return  # not even JSON-serializable by the client
    # accepted: the operator must give it a phase (valid ones run, the rest fail InvalidSpec)
    st_ = wait_for(
        lambda: status(custom, hyp_namespace, base["metadata"]["name"]).get("phase"),
        30,
        f"a phase for {spec}",
    )
    assert st_ in ("Pending", "Running", "Failed", "Suspended")
    assert operator.alive()


@pytest.fixture(scope="module")
def hyp_namespace(core):
    with make_namespace(core) as name:
        yield name


def test_operator_still_serves_after_generated_specs(operator, custom, namespace):
    create(custom, namespace, minimal_job("sentinel", resources=SMALL_CPU))
    wait_for(lambda: status(custom, namespace, "sentinel").get("phase") == "Running", 30, "the sentinel job")
