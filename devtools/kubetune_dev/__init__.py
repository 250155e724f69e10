"""Dev tooling beside the operator, never shipped in its image or wheel: the dev cluster,
the demo, the local trainer runner, the models that need no hub, and the generators of
crds/, the chart's CRD copy and the README's reference. `python -m kubetune_dev --help`."""

from pathlib import Path

# The one place that knows where the checkout is: this package lives in <repo>/devtools.
REPO_ROOT = Path(__file__).resolve().parents[2]
