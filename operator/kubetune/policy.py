"""What a cluster admin lets FineTuneJob authors put into their pods through
spec.podOverrides: the chart's `policy` values, passed to the operator as KUBETUNE_POLICY
(JSON). Creating a FineTuneJob otherwise means running any image under any
ServiceAccount of the namespace, on any tainted node, at any priority. An empty list
leaves that setting unbounded; the operator's own trainer images are always allowed."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

POLICY_ENV = "KUBETUNE_POLICY"


@dataclass(frozen=True)
class Policy:
    images: tuple[str, ...] = ()  # allowed prefixes of podOverrides.image ("registry.example.com/ml/")
    service_accounts: tuple[str, ...] = ()
    priority_classes: tuple[str, ...] = ()
    toleration_keys: tuple[str, ...] = ()
    # prefixes of the pod label and annotation keys a job may add: an annotation can mean
    # a cloud IAM role (kube2iam's iam.amazonaws.com/role), a sidecar injected or not, a
    # pod the autoscaler may not evict; a label can match another app's NetworkPolicy
    label_keys: tuple[str, ...] = ()
    annotation_keys: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, environ=os.environ) -> Policy:
        raw = json.loads(environ.get(POLICY_ENV) or "{}")
        return cls(
            images=tuple(raw.get("allowedImages") or ()),
            service_accounts=tuple(raw.get("allowedServiceAccounts") or ()),
            priority_classes=tuple(raw.get("allowedPriorityClasses") or ()),
            toleration_keys=tuple(raw.get("allowedTolerationKeys") or ()),
            label_keys=tuple(raw.get("allowedLabelKeyPrefixes") or ()),
            annotation_keys=tuple(raw.get("allowedAnnotationKeyPrefixes") or ()),
        )


def violations(spec: dict, policy: Policy) -> list[str]:
    """What in spec.podOverrides the policy does not allow, each naming its field."""
    over = spec.get("podOverrides") or {}
    out = []
    image = over.get("image")
    if image and policy.images and not any(image.startswith(p) for p in policy.images):
        out.append(
            f"spec.podOverrides.image: {image!r} is not under an allowed prefix ({', '.join(policy.images)})"
        )
    for field, allowed in (
        ("serviceAccountName", policy.service_accounts),
        ("priorityClassName", policy.priority_classes),
    ):
        value = over.get(field)
        if value and allowed and value not in allowed:
            out.append(f"spec.podOverrides.{field}: {value!r} is not allowed ({', '.join(allowed)})")
    if policy.toleration_keys:
        for i, t in enumerate(over.get("tolerations") or []):
            key = t.get("key")
            if key not in policy.toleration_keys:
                what = repr(key) if key else "a toleration of every taint (no key)"
                out.append(
                    f"spec.podOverrides.tolerations[{i}]: {what} is not an allowed taint key "
                    f"({', '.join(policy.toleration_keys)})"
                )
    for field, allowed in (("labels", policy.label_keys), ("annotations", policy.annotation_keys)):
        if allowed:
            for key in sorted(over.get(field) or {}):
                if not key.startswith(allowed):
                    out.append(
                        f"spec.podOverrides.{field}[{key!r}]: the key is not under an allowed prefix "
                        f"({', '.join(allowed)})"
                    )
    return out
