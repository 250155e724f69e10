"""Termination notices: how each cloud (and each node-lifecycle tool) says, on the Node
object, that a node is about to be taken away. Pure: a Node in, the notice (or None) out.

Where a notice shows, and how long before the node goes:
  GKE      taint cloud.google.com/impending-node-termination (NoSchedule): a Spot or
           preemptible VM's preemption notice, 30 s (up to 120 s configured) ahead
  AWS      taints of the AWS Node Termination Handler: aws-node-termination-handler/spot-itn
           (the two-minute Spot interruption notice), .../asg-lifecycle-termination,
           .../scheduled-maintenance, .../rebalance-recommendation (an early warning)
  Karpenter taint karpenter.sh/disrupted (v1; karpenter.sh/disruption=disrupting before):
           the node is being drained for a spot interruption or consolidation
  Azure    AKS's node problem detector: condition VMEventScheduled=True for a Preempt,
           Terminate or Redeploy scheduled event (about 30 s ahead for Spot), and the
           taint remediator.aks.microsoft.com/unschedulable of AKS's node auto-drain
  cluster-autoscaler  taint ToBeDeletedByClusterAutoscaler: a scale-down is draining it"""

from __future__ import annotations

from dataclasses import dataclass

NOTICE_TAINTS = {
    "cloud.google.com/impending-node-termination": "GKE preemption notice",
    "aws-node-termination-handler/spot-itn": "AWS Spot interruption notice",
    "aws-node-termination-handler/asg-lifecycle-termination": "AWS Auto Scaling termination",
    "aws-node-termination-handler/scheduled-maintenance": "AWS scheduled maintenance",
    "aws-node-termination-handler/rebalance-recommendation": "AWS rebalance recommendation",
    "karpenter.sh/disrupted": "Karpenter disruption",
    "karpenter.sh/disruption": "Karpenter disruption",
    "remediator.aks.microsoft.com/unschedulable": "AKS node auto-drain",
    "ToBeDeletedByClusterAutoscaler": "cluster-autoscaler scale-down",
}
AZURE_EVENT_CONDITION = "VMEventScheduled"
# scheduled events that take the VM away (Freeze and Reboot keep its memory and disks)
AZURE_TAKING_EVENTS = ("preempt", "terminate", "redeploy")


@dataclass(frozen=True)
class Notice:
    node: str
    source: str  # the taint key or condition type
    what: str  # in words, for Events and logs

    @property
    def taint(self) -> bool:
        """A NoSchedule taint: the scheduler keeps new pods off the node by itself."""
        return self.source in NOTICE_TAINTS

    @property
    def reason(self) -> str:
        return f"node {self.node}: {self.what} ({self.source})"


def notice(node: dict) -> Notice | None:
    """The termination notice a Node carries, or None."""
    name = node["metadata"]["name"]
    for taint in (node.get("spec") or {}).get("taints") or []:
        key = taint.get("key")
        if key in NOTICE_TAINTS:
            return Notice(name, key, NOTICE_TAINTS[key])
    for cond in (node.get("status") or {}).get("conditions") or []:
        if cond.get("type") == AZURE_EVENT_CONDITION and cond.get("status") == "True":
            text = f"{cond.get('reason') or ''} {cond.get('message') or ''}".lower()
            if any(event in text for event in AZURE_TAKING_EVENTS):
                return Notice(name, AZURE_EVENT_CONDITION, "Azure scheduled event")
    return None


def pods_on(node: str, pods: list[dict]) -> list[dict]:
    """The running pods (of one job's cached pods) bound to `node`."""
    return [
        p
        for p in pods
        if (p.get("spec") or {}).get("nodeName") == node
        and (p.get("status") or {}).get("phase") in ("Pending", "Running")
        and not p["metadata"].get("deletionTimestamp")
    ]
