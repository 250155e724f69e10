"""The one module that talks to the API server: plain dicts in and out (no model
deserialization on the hot path), 404/409 folded into return values."""

from __future__ import annotations

import json
import logging
import urllib.parse
from collections.abc import Callable

import urllib3
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from kubetune.api import GROUP, KIND, PLURAL, VERSION

log = logging.getLogger(__name__)
JOBS = f"/apis/{GROUP}/{VERSION}/namespaces/{{ns}}/{PLURAL}"
ACTIVE_PODS = "status.phase!=Succeeded,status.phase!=Failed"  # what holds node capacity
# Called before every write and every reconcile under leader election (kubetune.leader):
# a replica whose Lease ran out ends there, even if its renew thread has not noticed yet.
before_acting: Callable[[], None] | None = None


COLLECTIONS = {
    "Pod": "api/v1/namespaces/{ns}/pods",
    "Service": "api/v1/namespaces/{ns}/services",
    "Event": "api/v1/namespaces/{ns}/events",
    "NetworkPolicy": "apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies",
    "Adapter": "apis/kubetune.io/v1alpha1/namespaces/{ns}/adapters",
}


class Kube:
    def __init__(self, api: client.ApiClient) -> None:
        self.api = api

    @classmethod
    def from_environment(cls, pool_size: int = 16, retries: bool | None = None) -> Kube:
        """retries: urllib3's (None: its default, 3; False: none, the caller retries)."""
        try:
            config.load_incluster_config()
            cfg = client.Configuration.get_default_copy()
        except config.ConfigException:
            cfg = client.Configuration()
            config.load_kube_config(client_configuration=cfg)
        cfg.connection_pool_maxsize = pool_size
        cfg.retries = retries
        return cls(client.ApiClient(cfg))

    def _auth(self) -> dict:
        """Accept header and the bearer token (refreshed, in a cluster); client
        certificates are already in the connection pool."""
        cfg = self.api.configuration
        if cfg.refresh_api_key_hook is not None:
            cfg.refresh_api_key_hook(cfg)
        headers = {"Accept": "application/json"}
        # the client's own view of its credentials (the key a token is kept under changed
        # between client versions: "authorization", now "BearerToken")
        for auth in cfg.auth_settings().values():
            if auth.get("in") == "header" and auth.get("value"):
                headers[auth["key"]] = auth["value"]
        return headers

    def call(self, method: str, path: str, body=None, query=None, content_type: str | None = None) -> dict:
        """One request through the client's connection pool and credentials. Bodies are
        sent as JSON exactly as given: the generated client would drop None values,
        which a merge patch needs to remove a field."""
        if method != "GET":
            self.fence()
        cfg = self.api.configuration
        headers = {**self._auth(), "Content-Type": content_type or "application/json"}
        url = cfg.host + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        resp = self.api.rest_client.pool_manager.request(
            method,
            url,
            body=json.dumps(body).encode() if body is not None else None,
            headers=headers,
            timeout=urllib3.Timeout(connect=10, read=60),
        )
        if not 200 <= resp.status < 300:
            err = ApiException(status=resp.status, reason=resp.reason)
            err.body = resp.data.decode(errors="replace")
            raise err
        return json.loads(resp.data) if resp.data else {}

    def fence(self) -> None:
        """Under leader election: stop here, before acting, once the Lease is lost."""
        if before_acting is not None:
            before_acting()

    def stream(self, path: str, query: dict):
        """A watch: one JSON event per line until the server ends it."""
        cfg = self.api.configuration
        resp = self.api.rest_client.pool_manager.request(
            "GET",
            cfg.host + path + "?" + urllib.parse.urlencode(query),
            headers=self._auth(),
            preload_content=False,
            timeout=urllib3.Timeout(connect=10, read=330),
        )
        try:
            if resp.status != 200:
                raise ApiException(status=resp.status, reason=resp.reason)
            buf = b""
            for chunk in resp.stream(65536):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield json.loads(line)
        finally:
            resp.release_conn()

    # -- typed helpers -------------------------------------------------------------------

    def create(self, namespace: str, obj: dict) -> dict | None:
        """Create; None if it already exists (deterministic names make this idempotent)."""
        try:
            return self.call("POST", f"/{COLLECTIONS[obj['kind']].format(ns=namespace)}", obj)
        except ApiException as e:
            if e.status == 409:
                return None
            raise

    def _get_or_none(self, path: str) -> dict | None:
        try:
            return self.call("GET", path)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def get(self, namespace: str, kind: str, name: str) -> dict | None:
        return self._get_or_none(f"/{COLLECTIONS[kind].format(ns=namespace)}/{name}")

    def delete_pod(self, namespace: str, name: str) -> None:
        """Graceful delete: the pod gets its terminationGracePeriodSeconds."""
        try:
            self.call("DELETE", f"/api/v1/namespaces/{namespace}/pods/{name}")
        except ApiException as e:
            if e.status != 404:
                raise

    def list_pods(self, namespace: str, label_selector: str) -> list[dict]:
        return self.call(
            "GET", f"/api/v1/namespaces/{namespace}/pods", query={"labelSelector": label_selector}
        )["items"]

    def list_nodes(self) -> list[dict]:
        return self.call("GET", "/api/v1/nodes")["items"]

    def list_active_pods(self) -> list[dict]:
        """Every pod in the cluster that is not finished: what holds node capacity."""
        return self.call("GET", "/api/v1/pods", query={"fieldSelector": ACTIVE_PODS})["items"]

    def list_active_pods_in(self, namespaces: list[str]) -> list[dict]:
        """The unfinished pods of these namespaces only, one list each (a Role there is
        enough): the gang check's capacity view without a cluster-wide pod list."""
        query = {"fieldSelector": ACTIVE_PODS}
        return [
            pod
            for ns in namespaces
            for pod in self.call("GET", f"/api/v1/namespaces/{ns}/pods", query=query)["items"]
        ]

    def _merge_patch(self, path: str, patch: dict) -> dict:
        return self.call("PATCH", path, patch, content_type="application/merge-patch+json")

    def patch_pod(self, namespace: str, name: str, patch: dict) -> dict:
        return self._merge_patch(f"/api/v1/namespaces/{namespace}/pods/{name}", patch)

    def patch_workload(self, namespace: str, name: str, patch: dict) -> dict:
        """Merge-patch a Kueue Workload (its priority-boost annotation)."""
        return self._merge_patch(
            f"/apis/kueue.x-k8s.io/v1beta2/namespaces/{namespace}/workloads/{name}", patch
        )

    def get_job(self, namespace: str, name: str) -> dict | None:
        return self._get_or_none(f"{JOBS.format(ns=namespace)}/{name}")

    def patch_job_status(self, namespace: str, name: str, status: dict, resource_version: str | None) -> dict:
        """Merge-patch the status subresource; with resource_version, a concurrent change
        fails with 409 instead of being overwritten."""
        meta = {"resourceVersion": resource_version} if resource_version else {}
        body = {"metadata": meta, "status": status}
        return self.call(
            "PATCH",
            f"{JOBS.format(ns=namespace)}/{name}/status",
            body,
            content_type="application/merge-patch+json",
        )

    def delete_job(self, namespace: str, name: str, uid: str) -> None:
        """Delete the job with this UID: a job of the same name created since (409 for the
        failed precondition) is another job and stays."""
        body = {"propagationPolicy": "Background", "preconditions": {"uid": uid}}
        try:
            self.call("DELETE", f"{JOBS.format(ns=namespace)}/{name}", body)
        except ApiException as e:
            if e.status == 409:
                log.info("%s/%s not deleted: it is another job now (uid %s is gone)", namespace, name, uid)
            elif e.status != 404:
                raise

    def post_event(self, event: dict) -> None:
        """Create a core Event (one event_object() made)."""
        self.create(event["metadata"]["namespace"], event)


def event_object(job: dict, event_type: str, reason: str, message: str, now: str) -> dict:
    """A core/v1 Event about a FineTuneJob, as client-go's recorder makes one."""
    meta = job["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
            "resourceVersion": meta.get("resourceVersion"),
        },
        "type": event_type,
        "reason": reason,
        "message": message[:1024],
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
        "source": {"component": "kubetune-operator"},
        "reportingComponent": "kubetune.io/operator",
    }
