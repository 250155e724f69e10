"""Pure helpers of the pod runner: resolve a container's environment and command the
way the kubelet does, and build the status it reports. No I/O here."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping

from kubernetes.utils import parse_quantity

_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.\-]*)\)")
_FIELD_KEY = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


class ConfigError(Exception):
    """The kubelet's CreateContainerConfigError: a referenced key or object is missing."""


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes $(VAR) expansion: defined names are replaced, $$ escapes, others stay."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return _VAR_REF.sub(sub, text)


def field_value(pod: dict, path: str) -> str:
    """Value of a downward-API fieldRef path on a pod (camelCase dict)."""
    meta, spec, status = pod["metadata"], pod["spec"], pod.get("status") or {}
    m = _FIELD_KEY.match(path)
    if m:
        return (meta.get(m.group(1)) or {}).get(m.group(2), "")
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.podIP": status.get("podIP"),
        "status.podIPs": ",".join(p["ip"] for p in status.get("podIPs") or []),
        "status.hostIP": status.get("hostIP"),
        "status.hostIPs": ",".join(p["ip"] for p in status.get("hostIPs") or []),
    }
    if path not in simple:
        raise ConfigError(f"unsupported fieldRef {path!r}")
    return simple[path] or ""


def resource_value(container: dict, ref: dict) -> str:
    """resourceFieldRef: limits/requests of cpu or memory, divided and rounded up."""
    kind, _, res = ref["resource"].partition(".")
    resources = container.get("resources") or {}
    value = (resources.get(kind) or {}).get(res)
    if value is None and kind == "requests":
        value = (resources.get("limits") or {}).get(res)
    if value is None:
        return "0"
    # the API server stores an unset divisor as "0"; the kubelet reads that as 1
    divisor = parse_quantity(ref.get("divisor") or "1") or 1
    return str(math.ceil(parse_quantity(value) / divisor))


Lookup = Callable[[str, str, str], dict | None]  # (kind, namespace, name) -> data or None


def container_env(pod: dict, container: dict, base: Mapping[str, str], lookup: Lookup) -> dict[str, str]:
    """The environment a container starts with: base (the "image" env), envFrom, then
    env in order, each value expanded against what came before it."""
    ns = pod["metadata"]["namespace"]
    env = dict(base)

    def source(kind: str, ref: dict, what: str) -> dict:
        data = lookup(kind, ns, ref["name"])
        if data is None and not ref.get("optional"):
            raise ConfigError(f'{kind} "{ref["name"]}" not found ({what})')
        return data or {}

    for src in container.get("envFrom") or []:
        prefix = src.get("prefix", "")
        for kind, key in (("configmap", "configMapRef"), ("secret", "secretRef")):
            if key in src:
                for k, v in source(kind, src[key], "envFrom").items():
                    env[prefix + k] = v

    for var in container.get("env") or []:
        name, value_from = var["name"], var.get("valueFrom")
        if value_from is None:
            env[name] = expand(var.get("value", ""), env)
        elif "fieldRef" in value_from:
            env[name] = field_value(pod, value_from["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in value_from:
            env[name] = resource_value(container, value_from["resourceFieldRef"])
        else:
            kind, ref = (
                ("secret", value_from["secretKeyRef"])
                if "secretKeyRef" in value_from
                else ("configmap", value_from["configMapKeyRef"])
            )
            data = source(kind, ref, f"env {name}")
            if ref["key"] in data:
                env[name] = data[ref["key"]]
            elif not ref.get("optional"):
                raise ConfigError(f'key "{ref["key"]}" not found in {kind} "{ref["name"]}" (env {name})')
    return env


def container_argv(container: dict, env: Mapping[str, str]) -> list[str]:
    command = container.get("command") or []
    if not command:
        raise ConfigError(
            f'container "{container["name"]}": the dev pod runner runs the command '
            "of the pod spec and cannot read an image's entrypoint; set command"
        )
    return [expand(a, env) for a in [*command, *(container.get("args") or [])]]


def exit_code(returncode: int) -> int:
    """Container runtimes report death by signal N as 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def terminated_state(code: int, started: str, finished: str, message: str, reason: str | None = None) -> dict:
    state = {
        "exitCode": code,
        "reason": reason or ("Completed" if code == 0 else "Error"),
        "startedAt": started,
        "finishedAt": finished,
    }
    if message:
        state["message"] = message
    return state


def container_status(container: dict, state: dict, ready: bool, pid: int | None = None) -> dict:
    status = {
        "name": container["name"],
        "image": container.get("image", ""),
        "imageID": "",
        "ready": ready,
        "started": "running" in state,
        "restartCount": 0,
        "state": state,
    }
    if pid is not None:
        status["containerID"] = f"runner://{pid}"
    return status


def final_phase(exit_codes: list[int]) -> str:
    return "Succeeded" if all(c == 0 for c in exit_codes) else "Failed"


def pod_conditions(now: str, ready: bool, initialized: bool = True) -> list[dict]:
    def cond(t: str, ok: bool) -> dict:
        return {"type": t, "status": "True" if ok else "False", "lastTransitionTime": now}

    return [cond("Initialized", initialized), cond("ContainersReady", ready), cond("Ready", ready)]


def fallback_message(log_text: str, max_lines: int = 80, max_bytes: int = 2048) -> str:
    """FallbackToLogsOnError: the last lines of the log, capped like the kubelet does."""
    tail = "\n".join(log_text.splitlines()[-max_lines:])
    return tail.encode()[-max_bytes:].decode(errors="replace")


CLUSTER_DOMAIN = "cluster.local"


def hosts_names(pod: dict) -> list[str]:
    """The DNS names a pod with hostname and subdomain gets through its headless Service
    (<hostname>.<subdomain>.<ns>.svc.<domain>), plus the short form a pod's search path
    resolves (<hostname>.<subdomain>). No DNS server here: these go into /etc/hosts."""
    spec, ns = pod["spec"], pod["metadata"]["namespace"]
    host, sub = spec.get("hostname"), spec.get("subdomain")
    if not host or not sub:
        return []
    return [f"{host}.{sub}.{ns}.svc.{CLUSTER_DOMAIN}", f"{host}.{sub}.{ns}.svc", f"{host}.{sub}"]


def hosts_file(base: str, entries: dict[str, list[str]]) -> str:
    """The host's /etc/hosts plus one line per pod IP with its names."""
    lines = [base.rstrip("\n"), "# pods of the dev cluster's runner nodes"]
    lines += [f"{ip}\t{' '.join(names)}" for ip, names in sorted(entries.items()) if names]
    return "\n".join(lines) + "\n"
