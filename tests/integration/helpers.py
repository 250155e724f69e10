"""Helpers shared by the integration tests: a minimal FineTuneJob and its custom-object
calls against the dev cluster's API server."""

from __future__ import annotations

from kubetune.api import GROUP, PLURAL, VERSION
from tests.helpers import finetune_job

# the minimal spec these tests have always used (a model by name: nothing is downloaded)
SPEC = {
    "model": {"name": "org/tiny"},
    "dataset": {"uri": "s3://data/sql/"},
    "checkpoint": {"uri": "s3://ckpt/x/"},
    "output": {"uri": "s3://out/x/"},
    "resources": {"accelerator": "nvidia"},
}


def minimal_job(name: str, **spec) -> dict:
    """A FineTuneJob manifest named `name`; `spec` replaces top-level fields of SPEC."""
    return finetune_job(name, SPEC, **spec)


def create(custom, namespace: str, job: dict) -> dict:
    return custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job)


def get(custom, namespace: str, name: str) -> dict:
    return custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def status(custom, namespace, name) -> dict:
    return get(custom, namespace, name).get("status") or {}


def report_trainer_exit(core, namespace: str, pod: str, phase: str, terminated: dict) -> None:
    """Set a kwok pod's status as the kubelet reports a trainer that exited (kwok's pods run
    forever): `phase` Succeeded or Failed, the trainer container's `terminated` state."""
    core.patch_namespaced_pod_status(
        pod,
        namespace,
        {
            "status": {
                "phase": phase,
                "containerStatuses": [
                    {
                        "name": "trainer",
                        "image": "registry.invalid/none",
                        "imageID": "",
                        "ready": False,
                        "restartCount": 0,
                        "state": {"terminated": terminated},
                    }
                ],
            }
        },
    )
